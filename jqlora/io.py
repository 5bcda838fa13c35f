"""Writing output directories safely: atomic directories, sharded safetensors, and the files that travel along.

Every directory jqlora writes (converted checkpoints, adapters, merged models) is built in a temporary sibling and
renamed into place only when complete, so a failure never leaves an output that looks finished, and an existing
output is replaced only when asked (and then only after the new one is complete).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

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


class OutputError(ValueError):
    """An output directory that cannot be written (exists, or its parent is not writable)."""


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False,
                     error: type[ValueError] = OutputError) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst``; on success it replaces ``dst``, on failure it is removed.

    A non-empty ``dst`` is an ``error`` unless ``overwrite``; even then it is only removed after the new directory
    is complete and in place.
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise error(f"{dst}: already exists and is not empty; choose a new output directory")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"{dst.parent}: cannot create ({e.strerror})") from None
    if not os.access(dst.parent, os.W_OK):
        raise error(f"{dst.parent}: not writable")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        else:
            old = dst.parent / f".{dst.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
            dst.rename(old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save numpy/JAX arrays (bfloat16 included) as one safetensors file."""
    import jax.numpy as jnp
    from safetensors.flax import save_file

    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


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
