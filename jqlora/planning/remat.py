"""``train.remat=auto``: the policy a run uses when the config leaves it to jqlora, chosen from the memory each policy
needs, either compiled (on a GPU, or for a named GPU target: the run's own step, `jqlora.planning.aot`) or
planned (`jqlora.planning.memory`, elsewhere and on a mesh of several devices). This sits above both: the plan
never imports the compiler, and the compiler never imports the model builder."""

from __future__ import annotations

from typing import Any

from jqlora.models import ModelConfig
from jqlora.planning.aot import compiled_peak
from jqlora.planning.memory import HEADROOM, Plan, memory_plan, settings_from_config

AUTO_ORDER = ("none", "save_dots", "save_dots_no_batch", "full")  # fastest first: what `train.remat=auto` tries


def choose_remat(shape: ModelConfig, budget: float, *, headroom: float = HEADROOM,
                 **settings: Any) -> tuple[str, Plan]:
    """The fastest policy of `AUTO_ORDER` whose plan fits ``headroom × budget`` bytes per device, and its plan; the
    least-memory policy (full) and its plan when none fits. ``settings`` are `memory_plan`'s other arguments."""
    for policy in AUTO_ORDER:
        p = memory_plan(shape, remat=policy, **settings)
        if p.total <= headroom * budget:
            return policy, p
    return "full", memory_plan(shape, remat="full", **settings)


def device_budget() -> int | None:
    """Bytes one accelerator can hold (XLA's ``bytes_limit``); None where the backend does not say (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


COMPILED_HEADROOM = 0.97  # share of the budget a compiled peak may fill (the compiler counts every buffer it plans)


def choose_remat_compiled(shape: ModelConfig, cfg: Any, budget: float, gpu: str | None,
                          headroom: float = COMPILED_HEADROOM) -> tuple[str, int, list[str]]:
    """The fastest policy of `AUTO_ORDER` whose *compiled* step peak (`jqlora.planning.aot`) fits ``headroom × budget``,
    its peak, and one line per policy tried; full (the least memory) when none fits."""
    tried = []
    peak = 0
    for policy in AUTO_ORDER:
        peak = compiled_peak(shape, cfg, gpu, policy)["peak"]
        tried.append(f"{policy} {peak / 1e9:.2f} GB")
        if peak <= headroom * budget:
            return policy, peak, tried
    return "full", peak, tried


def _compiled_auto(cfg: Any, shape: ModelConfig, axes: dict[str, int] | None, budget: float,
                   gpu: str | None) -> tuple[str, str] | None:
    """`resolve_remat` from compiled figures, or None where this step cannot be compiled for one device here."""
    import jax

    if axes is not None and any(int(v) != 1 for v in axes.values()):
        return None  # the compiled figure covers one device; a mesh keeps the analytic plan
    if gpu is None and jax.default_backend() != "gpu":
        return None
    policy, peak, tried = choose_remat_compiled(shape, cfg, budget, gpu)
    fits = "fits" if peak <= COMPILED_HEADROOM * budget else "does NOT fit"
    where = gpu or jax.devices()[0].device_kind
    return policy, (f"remat auto: {policy}, compiled peak {peak / 1e9:.2f} GB per device on {where} {fits} in "
                    f"{COMPILED_HEADROOM:.0%} of {budget / 1e9:.2f} GB (tried {', '.join(tried)})")


def resolve_remat(cfg: Any, shape: ModelConfig, axes: dict[str, int] | None = None,
                  budget: float | None = None, gpu: str | None = None) -> tuple[str, str]:
    """``train.remat`` with ``auto`` resolved, and a line saying why.

    On a GPU (or for a named ``gpu`` target, compiled deviceless) the choice comes from the compiled peak of the
    run's own step for each policy (`choose_remat_compiled`); elsewhere, and on a mesh of several devices, from the
    analytic plan (`choose_remat`)."""
    if cfg.train.remat != "auto":
        return cfg.train.remat, f"remat {cfg.train.remat} (from the config)"
    budget = budget if budget is not None else device_budget()
    if budget is None:
        return "full", "remat auto: the device does not report its memory (CPU), so full (the least memory)"
    compiled = _compiled_auto(cfg, shape, axes, budget, gpu)
    if compiled is not None:
        return compiled
    policy, p = choose_remat(shape, budget, **settings_from_config(cfg, axes))
    fits = "fits" if p.total <= HEADROOM * budget else "does NOT fit"
    return policy, (f"remat auto: {policy}, planned {p.total / 1e9:.2f} GB per device {fits} in {HEADROOM:.0%} of "
                    f"{budget / 1e9:.2f} GB (python -m jqlora.plan for the rows)")
