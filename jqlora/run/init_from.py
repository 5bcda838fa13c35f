"""``lora.init_from=DIR``: start a run's adapters from earlier training instead of peft's fresh initialization.

DIR is either
- a peft LoRA adapter directory (``adapter_config.json``; e.g. ``RUN/adapter`` of an earlier jqlora run, or one
  peft wrote): A and B are read with `jqlora.adapters.load_adapter`, which checks every key, shape and scaling against
  the adapters this run's ``lora`` section builds; the optimizer starts fresh (there is no optimizer state in it);
- a jqlora run directory (``config.yaml`` + ``checkpoints/``) or one checkpoint in it (``RUN/checkpoints/N``): the
  adapters of its newest verified (or that) checkpoint; with ``train.resume_optimizer=true`` also its optimizer state
  (Adam's moments and bias-correction count, so the update continues as the earlier run's would). The learning-rate
  schedule is always this run's own, from its step 0 (its warmup included); data order, dropout keys and step
  counters start afresh too.

The common flow is SFT on one dataset, then more SFT on another: the second run names the first's adapter (or run
directory) here. A run that has its own checkpoint resumes from it and ignores ``init_from`` (it was applied when
that run started). The adapters must have the same targets, ranks and scaling as this run's: a mismatch is one line
naming the key (alpha / r / targets) or the tensor.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import optax
from flax import nnx

ADAPTER_CONFIG = "adapter_config.json"
log = logging.getLogger("jqlora.train")


class InitFromError(ValueError):
    """``lora.init_from`` names something that cannot start this run; the message is one line."""


def kind(path: str | os.PathLike) -> str:
    """"adapter" or "run" for ``lora.init_from=path``; `InitFromError` (one line) when it is neither."""
    p = Path(path)
    where = f"lora.init_from={path}"
    if not p.exists():
        raise InitFromError(f"{where}: no such directory")
    if not p.is_dir():
        raise InitFromError(f"{where}: not a directory (expected a peft adapter directory or a jqlora run)")
    if (p / ADAPTER_CONFIG).is_file():
        return "adapter"
    from jqlora.run.directory import RunDirError, find_run

    try:
        find_run(p)
    except RunDirError:
        raise InitFromError(f"{where}: neither a peft adapter directory ({ADAPTER_CONFIG}) nor a jqlora run "
                            "directory (config.yaml) or a checkpoint in one") from None
    return "run"


def check(cfg) -> str:
    """The kind of ``cfg.lora.init_from`` with the settings that go with it checked (before any loading)."""
    what = kind(cfg.lora.init_from)
    if what == "adapter" and cfg.train.resume_optimizer:
        raise InitFromError(f"train.resume_optimizer=true: lora.init_from={cfg.lora.init_from} is a peft adapter, "
                            "which holds no optimizer state (name the jqlora run directory instead, or set "
                            "train.resume_optimizer=false)")
    if what == "run":
        _check_run_lora(cfg)
    return what


def _check_run_lora(cfg) -> None:
    """The earlier run's lora settings that shape or scale the adapters equal this run's."""
    from jqlora.run.directory import RunDirError, find_run, read_saved_config

    src, _ = find_run(cfg.lora.init_from)
    try:
        saved = read_saved_config(src)
    except RunDirError as e:
        raise InitFromError(f"lora.init_from: {e}") from None
    for key in ("r", "alpha", "targets", "rslora"):
        a, b = getattr(saved.lora, key), getattr(cfg.lora, key)
        if a != b:
            raise InitFromError(f"lora.init_from={cfg.lora.init_from}: that run has lora.{key}={_show(a)}, this run "
                                f"lora.{key}={_show(b)}; the adapters must have the same shape and scaling")


def _show(v: Any) -> str:
    return repr(list(v)) if isinstance(v, tuple) else repr(v)


def from_adapter(model: nnx.Module, adapter_dir: str | os.PathLike) -> nnx.Module:
    """``model`` (built with this run's lora settings) with A/B read from a peft adapter directory, in place."""
    from jqlora.adapters import AdapterError, load_adapter

    try:
        return load_adapter(model, adapter_dir)
    except AdapterError as e:
        raise InitFromError(f"lora.init_from: {str(e).splitlines()[0]}") from None


def from_run(path: str | os.PathLike, lora: Any, opt_state: Any | None, make_tx) -> tuple[Any, Any | None, int]:
    """(lora, opt_state or None, step) from the newest verified checkpoint of a run (or the checkpoint named).

    ``lora``: this run's placed adapters (the restored arrays get their shapes and shardings). ``opt_state``: this
    run's placed optimizer state to restore the saved one onto (train.resume_optimizer), or None to restore the
    adapters only (the saved optimizer tree is rebuilt from that run's config with ``make_tx(train_cfg, steps)``).
    """
    from jqlora.config import load_config
    from jqlora.run.directory import RunDir, find_run

    src, step = find_run(path)
    run = RunDir(src, create=False)
    steps = run.steps()
    if step is None:
        step = run.latest_step()
        if step is None:
            raise InitFromError(f"lora.init_from={path}: {run.checkpoints} holds no complete checkpoint")
    elif step not in steps or run.verify(step) is not None:
        why = run.verify(step) if step in steps else "missing"
        raise InitFromError(f"lora.init_from={path}: checkpoint {step} is not usable ({why})")
    if opt_state is None:
        saved_cfg = load_config(str(src / "config.yaml"), [])
        opt_like = jax.tree.leaves(make_tx(saved_cfg.train, int(run.restore_meta(step)["total_steps"])).init(lora))
        what = "this run's adapters"
    else:
        opt_like = jax.tree.leaves(opt_state)
        what = "this run's adapters and optimizer (train.resume_optimizer=true needs the same train.max_grad_norm " \
               "on/off and train.optimizer_state)"
    tree = {"lora": lora, "opt": {f"{i:05d}": x for i, x in enumerate(opt_like)}, "rng": jax.random.PRNGKey(0)}
    try:
        state, _ = run.restore(step, tree)
    except Exception as e:  # noqa: BLE001 - orbax's many types: the shapes or the tree differ
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InitFromError(f"lora.init_from={path}: checkpoint {step} does not fit {what} ({first[:200]})") from None
    if opt_state is None:
        return state["lora"], None, step
    opt = jax.tree.unflatten(jax.tree.structure(opt_state), [state["opt"][k] for k in sorted(state["opt"])])
    return state["lora"], restart_schedule(opt), step


def restart_schedule(opt_state: Any) -> Any:
    """``opt_state`` with the learning-rate schedule's step count at 0 (Adam's own count and moments kept)."""

    def reset(s):
        if isinstance(s, optax.ScaleByScheduleState):
            return s._replace(count=jax.numpy.zeros_like(s.count))
        return s

    return jax.tree.map(reset, opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))


def start(trainer: Any) -> None:
    """Set ``trainer``'s adapters (and optimizer state) from ``cfg.lora.init_from`` (a `jqlora.run.loop.Trainer` whose
    ``init_kind`` is `check`'s answer); they keep their placement."""
    import jax.numpy as jnp

    from jqlora.lora import SplitModel
    from jqlora.training import optim

    src = trainer.cfg.lora.init_from
    if trainer.init_kind == "adapter":
        model = from_adapter(trainer.split.model(trainer.lora), src)
        trainer.lora = jax.tree.map(lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
                                    SplitModel.of(model).lora, trainer.lora)
        how = "a fresh optimizer"
    else:
        like = trainer.opt_state if trainer.tc.resume_optimizer else None
        trainer.lora, opt, step = from_run(src, trainer.lora, like, lambda tc, n: optim.make_optimizer(tc, n)[0])
        if opt is not None:
            trainer.opt_state = opt
        how = f"checkpoint {step}, " + ("its optimizer state" if opt is not None else "a fresh optimizer")
    if trainer.primary:
        log.info("adapters from %s (%s)", src, how)
