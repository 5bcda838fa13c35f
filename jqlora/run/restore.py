"""A run directory (or one checkpoint in it) back to the model it trained, for `python -m jqlora.export`: the run's
own config builds the model, and the newest verified (or the named) checkpoint's adapter is put on it."""

from __future__ import annotations

import dataclasses
import os

import jax

from jqlora.adapters import ExportError
from jqlora.config import load_config
from jqlora.lora import SplitModel
from jqlora.run.directory import RunDir, find_run
from jqlora.run.model import build_model
from jqlora.training import optim


def restore_for_export(src: str | os.PathLike, *, step: int | None = None, quant: str | None = None):
    """(model with the adapter of ``step`` (default latest), config, step) from a run dir or a checkpoint in it."""
    src, step = find_run(src, step)
    cfg = load_config(str(src / "config.yaml"), [])
    if quant is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quant=quant))
    run = RunDir(src, create=False)
    steps = run.steps()
    if not steps:
        raise ExportError(f"{run.checkpoints}: no complete checkpoint to export")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ExportError(f"{run.checkpoints}: no checkpoint for step {step} (have {', '.join(map(str, steps))})")
    why = run.verify(step)
    if why is not None:
        raise ExportError(f"{run.step_dir(step)}: not usable ({why})")
    meta = run.restore_meta(step)
    model = build_model(cfg, run_dir=str(src))
    split = SplitModel.of(model)
    tx, _ = optim.make_optimizer(cfg.train, int(meta["total_steps"]), cfg.lora.plus_ratio)
    opt_leaves = jax.tree.leaves(tx.init(split.lora))
    tree = {"lora": split.lora, "opt": {f"{i:05d}": x for i, x in enumerate(opt_leaves)},
            "rng": jax.random.PRNGKey(0)}
    state, _ = run.restore(step, tree)
    return split.model(state["lora"]), cfg, step
