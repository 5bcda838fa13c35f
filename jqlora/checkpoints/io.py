"""Writing output directories safely: atomic directories, sharded safetensors, and the files that travel along.

Every directory jqlora writes (converted checkpoints, adapters, merged models) is built in a temporary sibling and
renamed into place only when complete, so a failure never leaves an output that looks finished, and an existing
output is replaced only when asked (and then only after the new one is complete).

A temporary directory is named ``.<dst>.partial-<host>-<pid>-<random>``; one left by a process that died (kill -9,
a power cut) is removed by the next write to the same ``dst``, which says so. A full disk is one line naming the file
being written, the space needed and the space free (`check_free_space` before writing where the size is known,
`disk_full_error` for the write that fails anyway).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jqlora.checkpoints.checksums import write_checksums

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Files copied along with model weights (tokenizer, chat template, generation config).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


log = logging.getLogger("jqlora.io")


class OutputError(ValueError):
    """An output that cannot be written (exists, its parent is not writable, the disk is full)."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or what it wraps) is a full disk or an exceeded quota; libraries that write (safetensors,
    orbax, tensorstore) raise their own types with the OS error inside or only in the message."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text or "ENOSPC" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def free_bytes(path: str | os.PathLike) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(path: str | os.PathLike, need: int, what: str, *, error: type[ValueError] = OutputError) -> None:
    """Raise ``error`` (one line) if the file system of ``path`` has less than ``need`` bytes free for ``what``."""
    free = free_bytes(path)
    if free < need:
        raise error(f"not enough space for {what}: it needs about {_mb(need)}, {_mb(free)} free on the file "
                    f"system of {path}")


def disk_full_error(e: BaseException, target: str | os.PathLike, *, error: type[ValueError] = OutputError,
                    need: int | None = None) -> ValueError:
    """The one-line error for a write of ``target`` that failed because the disk is full."""
    free = free_bytes(Path(target).parent)
    needs = f"it needs about {_mb(need)}, " if need else ""
    return error(f"no space left on device writing {target}: {needs}{_mb(free)} free; nothing was left half-written")


def _owner_alive(name: str) -> bool | None:
    """For a temporary directory name ``.x.partial-<host>-<pid>-<rand>``: whether its writer is still running
    (None when that cannot be told: another host, or a name without host and PID)."""
    parts = name.rsplit(".partial-", 1)[-1].rsplit(".old-", 1)[-1].split("-")
    if len(parts) < 3 or not parts[-2].isdigit():
        return None
    host, pid = "-".join(parts[:-2]), int(parts[-2])
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(dst: str | os.PathLike) -> list[Path]:
    """Remove the temporary directories that interrupted writes of ``dst`` left beside it (their writer is gone);
    returns what was removed."""
    dst = Path(dst)
    if not dst.parent.is_dir():
        return []
    removed = []
    for p in sorted(dst.parent.glob(f".{dst.name}.partial-*")) + sorted(dst.parent.glob(f".{dst.name}.old-*")):
        if _owner_alive(p.name) is False:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.warning("removed %d leftover temporary director%s of an interrupted write of %s: %s", len(removed),
                    "y" if len(removed) == 1 else "ies", dst, ", ".join(p.name for p in removed))
    return removed


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False, error: type[ValueError] = OutputError,
                     need: int | None = None, checksums: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst``; on success it replaces ``dst``, on failure it is removed.

    A non-empty ``dst`` is an ``error`` unless ``overwrite``; even then it is only removed after the new directory
    is complete and in place. Leftovers of earlier interrupted writes of ``dst`` are removed first (and said so); a
    full disk while writing becomes one ``error`` line naming the file. ``need``: the bytes about to be written,
    checked against the free space before anything is written. ``checksums``: write ``CHECKSUMS`` (size and sha256
    of every file, `jqlora.checkpoints.checksums`) last, for a directory that is read back and trusted later. The
    directory and its files get the modes the umask gives (not ``mkdtemp``'s private 0700).
    """
    dst = Path(dst)
    clean_leftovers(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise error(f"{dst}: already exists and is not empty; choose a new output directory")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"{dst.parent}: cannot create ({e.strerror})") from None
    if not os.access(dst.parent, os.W_OK):
        raise error(f"{dst.parent}: not writable")
    if need:
        check_free_space(dst.parent, int(need * 1.02) + (1 << 20), f"writing {dst}", error=error)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{socket.gethostname()}-{os.getpid()}-",
                                dir=dst.parent))
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, ValueError) and is_disk_full(e):
            target = getattr(e, "filename", None) or dst
            raise disk_full_error(e, target, error=error) from None
        raise
    honour_umask(tmp)
    if checksums:
        write_checksums(tmp)
    old = None
    if dst.exists():
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        else:
            old = dst.parent / f".{dst.name}.old-{tmp.name.rsplit('.partial-', 1)[-1]}"
            dst.rename(old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain ``mkdir`` / ``open`` would have (0777 / 0666 less the
    umask): ``mkdtemp`` and ``mkstemp`` create them private whatever the umask."""
    mask = umask()
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = (0o777 if p.is_dir() else 0o666) & ~mask
        if p.is_file() and os.stat(p).st_mode & 0o100:  # (an executable stays executable)
            mode = 0o777 & ~mask
        os.chmod(p, mode)


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save numpy/JAX arrays (bfloat16 included) as one safetensors file."""
    import jax.numpy as jnp
    from safetensors.flax import save_file

    try:
        save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type with the OS error in the text
        if is_disk_full(e):
            need = sum(int(getattr(v, "nbytes", 0)) for v in tensors.values())
            raise disk_full_error(e, path, need=need) from None
        raise


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever ``max_bytes`` is reached, so host memory holds at most
    one shard; `finish` names the shards as Hugging Face does and writes the index (or a single model.safetensors).
    """

    def __init__(self, directory: Path, max_bytes: int, metadata: dict[str, str]):
        self.directory, self.max_bytes, self.metadata = Path(directory), max_bytes, metadata
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, Any]) -> None:
        self.pending.update(tensors)
        self.pending_bytes += sum(int(v.nbytes) for v in tensors.values())
        if self.pending_bytes >= self.max_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        path = self.directory / f".shard-{len(self.shards):05d}.safetensors"
        save_safetensors(self.pending, path, self.metadata)
        self.shards.append((path, list(self.pending)))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self._flush()
        if len(self.shards) == 1:
            os.replace(self.shards[0][0], self.directory / WEIGHTS)
            return
        n, weight_map = len(self.shards), {}
        for i, (path, keys) in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.directory / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer / generation-config files present in ``src`` to ``dst``; returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
