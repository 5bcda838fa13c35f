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
