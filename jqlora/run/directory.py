"""A training run's directory: orbax checkpoints, the metrics log, the loss plot and the saved config.

    output_dir/
      config.yaml          the resolved config of the run (written by process 0)
      metrics.jsonl        one JSON record per log / eval event, {"step": ..., "loss": ...} or {"eval_loss": ...}
      loss.png             train and eval loss against the optimizer step
      checkpoints/<step>/  orbax: state (LoRA params, optimizer leaves, PRNG key) + meta (step, data position),
                           and CHECKSUMS (sha256 and size of every file of the checkpoint), written last
      checkpoints.bad/     checkpoints that failed verification, moved aside (never deleted)
    (beside it: .<name>.lock, held by the running trainer (flock); it holds its PID and host)

Arrays are saved shard by shard (every process writes its own shards) and restored onto the shardings the caller
asks for, which may differ from the saving run's mesh. Only process 0 writes the metrics, the plot and the config.

Trust. A checkpoint counts only once its CHECKSUMS file is written, after orbax has finished every other file, and
it is restored only after every listed file is verified (size and sha256). One that fails (a missing, truncated or
altered file, or no CHECKSUMS: a save cut short) is reported in one warning, moved to ``checkpoints.bad/`` and the
next older one is tried. Rotation (``keep``) happens here, not in orbax: only after a new checkpoint is verified are
older ones beyond ``keep`` removed, so the newest verified checkpoint is never removed first. Before a save, the
free space is checked against the checkpoint's size; a full disk is one line naming the directory, the space needed
and the space free, and the earlier checkpoints stay as they were.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import jax

from jqlora.checkpoints import OutputError, check_free_space, is_disk_full
from jqlora.data import data_sources
from jqlora.run import background, journal
from jqlora.run.checksums import CHECKSUMS, verify_checkpoint, write_checksums
from jqlora.run.lock import LockError, RunLock

log = logging.getLogger("jqlora.rundir")

BAD_DIR = "checkpoints.bad"


class RunDirError(ValueError):
    """A problem with the run directory (not writable, no checkpoint, ...): the message names the path."""


class CheckpointError(RunDirError):
    """A checkpoint that cannot be used (fails verification, or cannot be written)."""


class RunDir:
    """The files of one run; ``primary`` is whether this process writes the shared (non-checkpoint) files.

    ``create``: a run that writes (the trainer) creates the directory, proves it writable and takes its lock
    (`lock`); readers (export) pass ``create=False`` and take no lock."""

    def __init__(self, out: str | os.PathLike, *, keep: int | None = None, primary: bool = True,
                 create: bool = True, lock: RunLock | None = None):
        self.out = str(out)
        self.primary = primary
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.config_path = os.path.join(self.out, "config.yaml")
        self.checkpoints = os.path.abspath(os.path.join(self.out, "checkpoints"))
        self.bad_dir = os.path.abspath(os.path.join(self.out, BAD_DIR))
        self._lock: RunLock | None = lock  # (one the caller already holds, or taken here)
        if create:
            check_writable(self.out)
            if primary and lock is None:
                self._lock = RunLock(self.out)
                try:
                    self._lock.acquire()
                except LockError as e:
                    raise RunDirError(str(e)) from None
        self._keep = keep
        self.protected: set[int] = set()  # steps the rotation keeps whatever their age (train.keep_best)
        self._create = create
        self._manager = None
        self._failed = False  # (a save failed: its background threads are not waited for again)

    def close(self) -> None:
        """Wait (bounded) for pending writes and release the lock."""
        try:
            if not self._failed:
                self.wait()
        except Exception as e:  # noqa: BLE001 - closing: the save's own error was already reported
            log.debug("closing %s: %s", self.out, e)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- checkpoints ------------------------------------------------------------------------------------------------

    @property
    def manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            # (no max_to_keep: rotation is ours, after the new checkpoint is verified)
            options = ocp.CheckpointManagerOptions(create=self._create)
            self._manager = ocp.CheckpointManager(self.checkpoints, options=options)
        return self._manager

    def steps(self) -> list[int]:
        """The steps of the checkpoint directories, oldest first (complete or not: see `verify`). Read from the
        directory itself: orbax does not list a step whose own metadata is damaged, yet will not save over it."""
        if not os.path.isdir(self.checkpoints):
            return []
        return sorted(int(p.name) for p in Path(self.checkpoints).iterdir() if p.name.isdigit() and p.is_dir())

    def latest_step(self) -> int | None:
        """The newest checkpoint that verifies (see `verify`); None if there is none."""
        for step in reversed(self.steps()):
            if self.verify(step) is None:
                return step
        return None

    def step_dir(self, step: int) -> Path:
        return Path(self.checkpoints) / str(step)

    def verify(self, step: int) -> str | None:
        """None if checkpoint ``step`` is complete and intact, else why not (one line)."""
        return verify_checkpoint(self.step_dir(step))

    def latest_verified_step(self) -> int | None:
        """The newest checkpoint that verifies. Each newer one that fails is reported in one warning and moved to
        ``checkpoints.bad/`` (by process 0; never deleted), so that a later save of the same step is possible."""
        bad = []
        found = None
        for step in reversed(self.steps()):
            why = self.verify(step)
            if why is None:
                found = step
                break
            bad.append((step, why))
        for step, why in bad:
            where = self.quarantine(step)
            log.warning("warning: checkpoint %s is not usable (%s); moved to %s, trying the one before",
                        self.step_dir(step), why, where)
        return found

    def quarantine(self, step: int) -> str:
        """Move checkpoint ``step`` to ``checkpoints.bad/`` (process 0 only); returns where it went."""
        src = self.step_dir(step)
        dst = Path(self.bad_dir) / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if self.primary:
            os.makedirs(self.bad_dir, exist_ok=True)
            n = 0
            while dst.exists():
                n += 1
                dst = dst.with_name(f"{dst.name.split('.')[0]}.{n}")
            os.replace(src, dst)
        self._refresh()
        return str(dst)

    def _refresh(self) -> None:
        """After process 0 moved or removed step directories: every process re-reads the steps (orbax caches)."""
        _barrier("jqlora-rundir-refresh")
        if self._manager is not None:
            self._manager.reload()

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Write checkpoint ``step`` (every process takes part), wait until it is complete, write its checksums,
        then rotate. Raises `CheckpointError` (one line) when the disk is full; the earlier checkpoints are kept."""
        import orbax.checkpoint as ocp

        need = int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))) + (1 << 20)
        os.makedirs(self.checkpoints, exist_ok=True)
        try:
            check_free_space(self.checkpoints, need, f"checkpoint {self.step_dir(step)}")
        except OutputError as e:
            raise CheckpointError(str(e)) from None
        try:
            with background.quiet_orbax():  # (orbax's thread tracebacks; the failure is reported in one line)
                self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                meta=ocp.args.JsonSave(meta)), force=True)
                background.bounded(self.manager.wait_until_finished, f"checkpoint {self.step_dir(step)}")
            if self.primary:
                write_checksums(self.step_dir(step))
            _barrier("jqlora-rundir-checksums")  # (every process sees a complete checkpoint from here on)
        except Exception as e:  # noqa: BLE001 - orbax wraps the OSError of a full disk in its own types
            self._failed = True
            self._manager = None  # (a later save starts a fresh manager, not one with a failed thread)
            self._discard_partial(step)
            if is_disk_full(e):
                free = shutil.disk_usage(self.checkpoints).free
                raise CheckpointError(
                    f"no space left on device writing checkpoint {self.step_dir(step)}: it needs about "
                    f"{_mb(need)}, {_mb(free)} free; earlier checkpoints are intact") from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"writing checkpoint {self.step_dir(step)} failed ({type(e).__name__}: "
                                  f"{first}); earlier checkpoints are intact") from None
        self._rotate(step)

    def _discard_partial(self, step: int) -> None:
        """Remove what a failed save of ``step`` left (orbax's temporary directory, or a step without checksums)."""
        if not self.primary:
            return
        for p in Path(self.checkpoints).iterdir():
            if p.name.startswith(f"{step}.orbax-checkpoint-tmp") or (
                    p.name == str(step) and not (p / CHECKSUMS).is_file()):
                shutil.rmtree(p, ignore_errors=True)

    def _rotate(self, newest: int) -> None:
        """Keep the newest ``keep`` checkpoints and the `protected` ones; only called once ``newest`` is verified."""
        if self._keep is None:
            return
        steps = self.steps()
        old = [s for s in steps if s < newest][: max(0, len(steps) - self._keep)]
        old = [s for s in old if s not in self.protected]
        if not old:
            return
        if self.primary and self.verify(newest) is None:  # (never rotate away old ones for an unverified new one)
            for step in old:
                shutil.rmtree(self.step_dir(step), ignore_errors=True)
        self._refresh()

    def restore_meta(self, step: int) -> dict:
        import orbax.checkpoint as ocp

        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """(state, meta) of checkpoint ``step``; the arrays come back with the shapes, dtypes and shardings of
        ``like`` (a tree of arrays or ShapeDtypeStructs)."""
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                       meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        if self._manager is not None:
            background.bounded(self._manager.wait_until_finished, f"saving in {self.checkpoints}")

    # -- metrics ----------------------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        """Append one record to metrics.jsonl, whole or not at all (`jqlora.run.journal`)."""
        if not self.primary:
            return
        try:
            journal.append(self.metrics_path, record)
        except journal.JournalError as e:
            raise RunDirError(str(e)) from None

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
        if not self.primary:
            return
        try:
            journal.rewrite(self.metrics_path, lambda r: r.get("step", 0) <= step)
        except journal.JournalError as e:
            raise RunDirError(str(e)) from None

    def plot(self) -> None:
        """loss.png: train and eval loss against the optimizer step."""
        if not self.primary or not os.path.isfile(self.metrics_path):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.read_metrics()
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        if train:
            ax.plot(*zip(*train), label="train")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / trained token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(self.out, "loss.png")  # (replaced whole: a kill mid-write leaves the last one)
        try:
            fig.savefig(path + ".tmp", dpi=100, format="png")
            os.replace(path + ".tmp", path)
        except OSError as e:  # (a full disk: the picture is a convenience; what the run needs is checked where written)
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")
            if not getattr(self, "_plot_warned", False):
                self._plot_warned = True
                log.warning("warning: %s not updated (%s); the run goes on", path, e.strerror or e)
        finally:
            plt.close(fig)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl (a torn last line skipped with a warning)."""
    try:
        return journal.read(path)
    except journal.JournalError as e:
        raise RunDirError(str(e)) from None


def check_writable(out: str) -> None:
    """Create ``out`` if needed and prove this process can write in it."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise RunDirError(f"output_dir {out}: is a file, not a directory; choose another output_dir")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise RunDirError(f"output_dir {out}: not writable ({e.strerror or e})") from None


def find_run(src: str | os.PathLike, step: int | None = None) -> tuple[Path, int | None]:
    """(run directory, step) from a run directory or a checkpoint directory inside one (``.../checkpoints/<step>``)."""
    src = Path(src).resolve()
    if src.name.isdigit() and src.parent.name == "checkpoints":
        if step is not None and step != int(src.name):
            raise RunDirError(f"{src}: is the checkpoint of step {src.name}, but --step {step} was given")
        src, step = src.parent.parent, int(src.name)
    if not (src / "config.yaml").is_file():
        raise RunDirError(f"{src}: not a training run directory (no config.yaml)")
    return src, step


# ---------------------------------------------------------------------------------------------------------------
# Whose directory is it? (a run never writes into another run's or a stranger's directory)


# What a run writes at its start, before its config.yaml (PiSSA / LoftQ: jqlora.adapters.init_state), and the
# temporary names of its atomic writes (jqlora.checkpoints.io.atomic_directory) of those and of the adapter.
_START_DIRS = ("init_state", "init_adapter", "base")
_OWN_PARTIAL = re.compile(r"^\.(init_state|init_adapter|base|adapter)\.(partial|old)-")


def _entries(out: str | os.PathLike) -> list[str]:
    """The directory's entries, without this module's own write probes."""
    if not os.path.isdir(out):
        return []
    return sorted(e for e in os.listdir(out) if not e.startswith(".write_test."))


def _run_start_only(out: str | os.PathLike, entries: list[str]) -> bool:
    """Whether ``out`` holds only what a run's start writes, or the partial writes of it that a kill left: that
    run is started afresh (it rewrites all of them), not refused as a stranger's directory."""
    ours = os.path.join(out, "init_state")  # (its init_state.json and CHECKSUMS: no stranger's folder has both)
    saved = os.path.isfile(os.path.join(ours, "init_state.json")) and os.path.isfile(os.path.join(ours, CHECKSUMS))
    for e in entries:
        if _OWN_PARTIAL.match(e):
            continue
        if e in _START_DIRS and saved and os.path.isdir(os.path.join(out, e)):
            continue
        return False
    return True


def dir_kind(out: str | os.PathLike) -> str:
    """"empty" (missing, empty, or only a run's start files and its own partial writes), "run" (a jqlora run: it
    has config.yaml) or "foreign" (anything else)."""
    entries = _entries(out)
    if not entries or ("config.yaml" not in entries and _run_start_only(out, entries)):
        return "empty"
    return "run" if "config.yaml" in entries else "foreign"


def aside_name(out: str | os.PathLike) -> Path:
    """A free sibling name for moving ``out`` aside: ``<out>.old-<UTC time>`` (``-2``, ``-3``, ... if taken)."""
    out = Path(os.path.abspath(out))
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    candidate, n = out.with_name(f"{out.name}.old-{stamp}"), 1
    while candidate.exists():
        n += 1
        candidate = out.with_name(f"{out.name}.old-{stamp}-{n}")
    return candidate


def move_aside(out: str | os.PathLike) -> Path:
    """Rename ``out`` to `aside_name` (nothing is deleted or copied) and return the new name."""
    target = aside_name(out)
    try:
        os.rename(out, target)
    except OSError as e:
        raise RunDirError(f"output_dir {out}: cannot move it aside to {target} ({e.strerror or e})") from None
    return target


def read_saved_config(out: str | os.PathLike):
    """The `Config` a run in ``out`` saved (config.yaml), or None when there is none."""
    from jqlora.config import ConfigError, config_from_dict

    path = os.path.join(out, "config.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return config_from_dict(yaml.safe_load(f) or {}, source=path)
    except (yaml.YAMLError, ConfigError) as e:
        raise RunDirError(f"{path}: unreadable ({str(e).splitlines()[0]}); move it or set another output_dir") from None


def _read_paths(cfg) -> list[tuple[str, str]]:
    """(key, local path) of everything a run reads: the model, tokenizer, data and init_from folders or files."""
    keys = [("model.path", cfg.model.path), ("model.tokenizer_path", cfg.model.tokenizer_path),
            *[(s.what, s.path) for k in ("path", "eval_path") for s in data_sources(cfg.data, k)],
            ("lora.init_from", cfg.lora.init_from)]
    return [(k, str(v)) for k, v in keys if v and os.path.exists(str(v))]


def check_not_read(cfg) -> None:
    """Refuse (one line, before anything moves) to move ``output_dir`` aside when the run reads from it: the model,
    tokenizer, data or init_from path is ``output_dir`` itself or inside it."""
    out = os.path.realpath(cfg.output_dir)
    for key, path in _read_paths(cfg):
        real = os.path.realpath(path)
        if real == out or real.startswith(out.rstrip(os.sep) + os.sep):
            raise RunDirError(f"output_dir {cfg.output_dir}: train.overwrite=true would move it aside, but {key} "
                              f"{path} is {'that folder' if real == out else 'inside it'} and this run reads it; "
                              "choose another output_dir (nothing was moved)")


def open_run_dir(cfg, *, primary: bool = True, barrier=None, lock: RunLock | None = None
                 ) -> tuple[RunDir, str | None]:
    """The `RunDir` of ``cfg.output_dir`` once it is this run's to write, and a note to print (or None).

    An empty or missing directory is fresh. A directory holding a jqlora run is resumed when train.resume is on
    and the config agrees with its config.yaml on every key that resuming depends on. Anything else (another
    run, a changed config, a directory that is not a run) is refused, or with train.overwrite=true renamed aside
    (``<output_dir>.old-<time>``), so nothing in it is ever changed or lost. Every process decides the same from
    the same files; only the primary renames, and ``barrier()`` (if given) lets the others wait for it. ``lock``:
    the primary's lock on ``output_dir``, taken before looking, so a live run is never judged or moved (the lock is
    beside the directory and stays with the path)."""
    from jqlora.config import resume_conflicts

    out, tc = cfg.output_dir, cfg.train
    kind, note, aside = dir_kind(out), None, False
    if kind == "foreign":
        if not tc.overwrite:
            raise RunDirError(f"output_dir {out}: not empty and not a jqlora run (no config.yaml); choose a new "
                              "output_dir, or set train.overwrite=true to move it aside")
        aside = True
    elif kind == "run":
        saved = read_saved_config(out)
        if tc.overwrite:
            aside = True
        elif not tc.resume:
            raise RunDirError(f"output_dir {out}: holds a run and train.resume=false would mix two runs in it; "
                              "choose a new output_dir, or set train.overwrite=true to move the old run aside")
        else:
            conflicts = resume_conflicts(saved, cfg)
            if conflicts:
                changes = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in conflicts)
                raise RunDirError(f"output_dir {out}: cannot resume with a changed config: {changes} (set them "
                                  "back, choose a new output_dir, or set train.overwrite=true to move the old run "
                                  "aside)")
    if aside:
        check_not_read(cfg)
        target = aside_name(out)
        if primary:
            target = move_aside(out)
        note = f"output_dir {out}: train.overwrite=true, the old contents were moved to {target}"
    if barrier is not None:
        barrier()
    return RunDir(out, keep=tc.keep_checkpoints, primary=primary, lock=lock), note
