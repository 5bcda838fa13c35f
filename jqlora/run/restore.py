"""A run directory (or one checkpoint in it) back to the model it trained, for `python -m jqlora.export`: the run's
own config builds the model, and the newest verified (or the named) checkpoint's adapter is put on it.

The run may still be training: its rotation (train.keep_checkpoints) can remove the checkpoint being exported at
any moment. So the export first holds it: every file of the step is hard-linked into a folder of the export's own
(``<run>/.export-hold-<host>-<pid>-<random>``, copied instead where links cannot be made), the held copy is verified
and restored, and the folder is removed at the end. A removed original no longer matters; a step rotated away before
it was held is one line (or, for the default step, the newest one is taken again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import tempfile
from pathlib import Path

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
    if getattr(cfg.train, "memory", "default") != "default":
        # the adapter is the same in every memory mode; the base's embedding and lm_head are exported (merged) as
        # the checkpoint holds them, not as train.memory=min's 4-bit copies
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, memory="default"))
    run = RunDir(src, create=False)
    with held_checkpoint(run, step) as (held, step):
        meta = held.restore_meta(step)
        model = build_model(cfg, run_dir=str(src))
        split = SplitModel.of(model)
        tx, _ = optim.make_optimizer(cfg.train, int(meta["total_steps"]), cfg.lora.plus_ratio)
        opt_leaves = jax.tree.leaves(tx.init(split.lora))
        tree = {"lora": split.lora, "opt": {f"{i:05d}": x for i, x in enumerate(opt_leaves)},
                "rng": jax.random.PRNGKey(0)}
        state, _ = held.restore(step, tree)
    return split.model(state["lora"]), cfg, step


@contextlib.contextmanager
def held_checkpoint(run: RunDir, step: int | None, tries: int = 3):
    """(a `RunDir` over a held and verified copy of checkpoint ``step`` (default: the newest), the step); see the
    module docstring. The held copy is removed on leaving."""
    for attempt in range(tries):
        steps = run.steps()
        if not steps:
            raise ExportError(f"{run.checkpoints}: no complete checkpoint to export")
        want = steps[-1] if step is None else step
        if want not in steps:
            raise ExportError(f"{run.checkpoints}: no checkpoint for step {want} (have {', '.join(map(str, steps))})")
        root = _hold_root(Path(run.out))
        held = RunDir(root, create=False)
        try:
            _link_tree(run.step_dir(want), held.step_dir(want))
            why = held.verify(want)
        except FileNotFoundError:
            why = "removed"
        if why is not None:
            shutil.rmtree(root, ignore_errors=True)
            if run.step_dir(want).is_dir():  # (damaged where it is)
                raise ExportError(f"{run.step_dir(want)}: not usable ({why})")
            if step is not None or attempt == tries - 1:  # (rotated away while it was being held)
                raise ExportError(f"{run.step_dir(want)}: removed while the export was taking it (the run's "
                                  "rotation, train.keep_checkpoints); export a newer step") from None
            continue
        try:
            yield held, want
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return


def _hold_root(run_out: Path) -> Path:
    prefix = f".export-hold-{socket.gethostname()}-{os.getpid()}-"
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=run_out))
    except OSError:  # (a run directory this user cannot write: copies in the temporary directory)
        return Path(tempfile.mkdtemp(prefix=prefix))


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` a copy of the tree ``src`` made of hard links (copies where a link cannot be made)."""
    if not src.is_dir():
        raise FileNotFoundError(src)
    for dirpath, _, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            a, b = Path(dirpath) / name, dst / rel / name
            try:
                os.link(a, b)
            except FileNotFoundError:
                raise
            except OSError:
                shutil.copy2(a, b)
