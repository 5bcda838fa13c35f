"""A training run's directory: orbax checkpoints, the metrics log, the loss plot and the saved config.

    output_dir/
      config.yaml          the resolved config of the run (written by process 0)
      metrics.jsonl        one JSON record per log / eval event, {"step": ..., "loss": ...} or {"eval_loss": ...}
      loss.png             train and eval loss against the optimizer step
      checkpoints/<step>/  orbax: state (LoRA params, optimizer leaves, PRNG key) + meta (step, data position)

Arrays are saved shard by shard (every process writes its own shards) and restored onto the shardings the caller
asks for, which may differ from the saving run's mesh. Only process 0 writes the metrics, the plot and the config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax


class RunDirError(ValueError):
    """A problem with the run directory (not writable, no checkpoint, ...): the message names the path."""


class RunDir:
    """The files of one run; ``primary`` is whether this process writes the shared (non-checkpoint) files."""

    def __init__(self, out: str | os.PathLike, *, keep: int | None = None, primary: bool = True,
                 create: bool = True):
        self.out = str(out)
        self.primary = primary
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.config_path = os.path.join(self.out, "config.yaml")
        self.checkpoints = os.path.abspath(os.path.join(self.out, "checkpoints"))
        if create:
            check_writable(self.out)
        self._keep = keep
        self._create = create
        self._manager = None

    # -- checkpoints ------------------------------------------------------------------------------------------------

    @property
    def manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=self._create)
            self._manager = ocp.CheckpointManager(self.checkpoints, options=options)
        return self._manager

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        if not os.path.isdir(self.checkpoints):
            return []
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Write checkpoint ``step`` (every process takes part) and wait until it is complete."""
        import orbax.checkpoint as ocp

        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

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
            self._manager.wait_until_finished()

    # -- metrics ----------------------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if not self.primary:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
        if not self.primary or not os.path.isfile(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(self.metrics_path, "w") as f:
            f.writelines(lines)

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
        fig.savefig(os.path.join(self.out, "loss.png"), dpi=100)
        plt.close(fig)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_writable(out: str) -> None:
    """Create ``out`` if needed and prove this process can write in it."""
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


def _entries(out: str | os.PathLike) -> list[str]:
    """The directory's entries, without this module's own write probes."""
    if not os.path.isdir(out):
        return []
    return sorted(e for e in os.listdir(out) if not e.startswith(".write_test."))


def dir_kind(out: str | os.PathLike) -> str:
    """"empty" (missing or empty), "run" (a jqlora run: it has config.yaml) or "foreign" (anything else)."""
    entries = _entries(out)
    if not entries:
        return "empty"
    return "run" if "config.yaml" in entries else "foreign"


def aside_name(out: str | os.PathLike) -> Path:
    """A free sibling name for moving ``out`` aside: ``<out>.old-<UTC time>`` (``-2``, ``-3``, ... if taken)."""
    import time

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


def open_run_dir(cfg, *, primary: bool = True, barrier=None) -> tuple[RunDir, str | None]:
    """The `RunDir` of ``cfg.output_dir`` once it is this run's to write, and a note to print (or None).

    An empty or missing directory is fresh. A directory holding a jqlora run is resumed when train.resume is on
    and the config agrees with its config.yaml on every key that resuming depends on. Anything else (another
    run, a changed config, a directory that is not a run) is refused, or with train.overwrite=true renamed aside
    (``<output_dir>.old-<time>``), so nothing in it is ever changed or lost. Every process decides the same from
    the same files; only the primary renames, and ``barrier()`` (if given) lets the others wait for it."""
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
        target = aside_name(out)
        if primary:
            target = move_aside(out)
        note = f"output_dir {out}: train.overwrite=true, the old contents were moved to {target}"
    if barrier is not None:
        barrier()
    return RunDir(out, keep=tc.keep_checkpoints, primary=primary), note
