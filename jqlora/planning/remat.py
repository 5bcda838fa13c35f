"""``train.remat=auto``: the policy a run uses when the config leaves it to jqlora — among the policies whose memory
fits, the one with the lowest estimated step time (`jqlora.planning.estimate`), not the first in a fixed list.

The memory is either compiled (on a GPU, or for a named GPU target: the run's own step, `jqlora.planning.aot`), and
then the step time is the roofline of that compiled step; or planned (`jqlora.planning.memory`, elsewhere and on a
mesh of several devices), and then the step time is the analytic recompute-cost rule (`estimate.analytic_step`).
The ranking comes back with the choice, one line per policy. This sits above the plan, the compiler and the estimate:
none of them imports the model builder or this module."""

from __future__ import annotations

import dataclasses
from typing import Any

from jqlora.models import ModelConfig
from jqlora.planning.aot import GPUS, Gpu, compiled
from jqlora.planning.estimate import analytic_step, model_flops
from jqlora.planning.memory import HEADROOM, Plan, memory_plan, settings_from_config

AUTO_ORDER = ("none", "save_dots", "save_dots_no_batch", "full")  # the candidates, least recomputation first
COMPILED_HEADROOM = 0.97  # share of the budget a compiled peak may fill (the compiler counts every buffer it plans)


@dataclasses.dataclass(frozen=True)
class Ranked:
    """One candidate policy: its bytes per device (planned or compiled), whether they fit, its estimated step."""

    policy: str
    bytes: float
    fits: bool
    ms: float

    def line(self) -> str:
        return (f"{self.policy} {self.bytes / 1e9:.2f} GB {'fits' if self.fits else 'does NOT fit'}, "
                f"est. {self.ms:.1f} ms/step")


def pick(ranking: list[Ranked]) -> Ranked:
    """The fastest estimate among those that fit (of equal estimates, the one needing less memory); the least memory
    when none fits."""
    fitting = [r for r in ranking if r.fits]
    return min(fitting, key=lambda r: (round(r.ms, 6), r.bytes)) if fitting else min(ranking, key=lambda r: r.bytes)


def ranking_lines(ranking: list[Ranked]) -> list[str]:
    """The candidates fastest first (those that fit before those that do not), for printing."""
    ordered = sorted(ranking, key=lambda r: (not r.fits, round(r.ms, 6), r.bytes))
    return [f"rank {i}: {r.line()}" for i, r in enumerate(ordered, 1)]


def gpu_figures(gpu: str | None = None) -> Gpu:
    """The roofline figures of a named target, else of this machine's first device by its kind (H100 figures for a
    device jqlora has no figures for, e.g. a CPU: the ranking then is an H100's)."""
    if gpu is not None:
        return GPUS[gpu]
    import jax

    kind = getattr(jax.devices()[0], "device_kind", "").upper()
    for key, name in (("GH200", "gh200"), ("H200", "h200"), ("H100", "h100-sxm"), ("A100", "a100-80gb"),
                      ("L4", "l4")):
        if key in kind:
            return GPUS[name]
    return GPUS["h100-sxm"]


def rank_remat(shape: ModelConfig, budget: float, *, headroom: float = HEADROOM, gpu: str | None = "h100-sxm",
               **settings: Any) -> list[Ranked]:
    """Every candidate's plan against ``headroom × budget`` and its analytic step estimate on ``gpu``."""
    figures = GPUS[gpu or "h100-sxm"]
    out = []
    for policy in AUTO_ORDER:
        p = memory_plan(shape, remat=policy, **settings)
        est = analytic_step(shape, figures, remat=policy, **settings)
        out.append(Ranked(policy, p.total, p.total <= headroom * budget, est.total_ms))
    return out


def choose_remat(shape: ModelConfig, budget: float, *, headroom: float = HEADROOM, gpu: str | None = "h100-sxm",
                 **settings: Any) -> tuple[str, Plan]:
    """The policy of `AUTO_ORDER` with the lowest analytic step estimate whose plan fits ``headroom × budget`` bytes
    per device, and its plan; the least-memory policy (full) when none fits. ``settings`` are `memory_plan`'s."""
    chosen = pick(rank_remat(shape, budget, headroom=headroom, gpu=gpu, **settings))
    return chosen.policy, memory_plan(shape, remat=chosen.policy, **settings)


def device_budget() -> int | None:
    """Bytes one accelerator can hold (XLA's ``bytes_limit``); None where the backend does not say (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def rank_remat_compiled(shape: ModelConfig, cfg: Any, budget: float, gpu: str | None,
                        headroom: float = COMPILED_HEADROOM) -> list[Ranked]:
    """Every candidate's *compiled* step peak (`jqlora.planning.aot`) against ``headroom × budget``, and the roofline
    estimate of that compiled step (`estimate.estimate`)."""
    figures = gpu_figures(gpu)
    tokens = cfg.train.batch_size * cfg.data.max_length
    flops = model_flops(shape, tokens=tokens, seq=cfg.data.max_length)
    out = []
    for policy in AUTO_ORDER:
        c = compiled(shape, cfg, gpu, policy)
        est = c.estimate(figures, tokens=tokens, model_flops=flops, lora_rank=cfg.lora.r, vocab=shape.vocab_size)
        out.append(Ranked(policy, c.peak_bytes, c.peak_bytes <= headroom * budget, est.total_ms))
    return out


def choose_remat_compiled(shape: ModelConfig, cfg: Any, budget: float, gpu: str | None,
                          headroom: float = COMPILED_HEADROOM) -> tuple[str, int, list[str]]:
    """The policy of `AUTO_ORDER` with the lowest estimated time whose compiled step peak fits ``headroom × budget``,
    its peak, and the ranking (one line per policy); full's least memory when none fits."""
    ranking = rank_remat_compiled(shape, cfg, budget, gpu, headroom)
    chosen = pick(ranking)
    return chosen.policy, int(chosen.bytes), ranking_lines(ranking)


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
    return policy, (f"remat auto: {policy}, the fastest estimate whose compiled peak fits; {peak / 1e9:.2f} GB per "
                    f"device on {where} {fits} in {COMPILED_HEADROOM:.0%} of {budget / 1e9:.2f} GB "
                    f"({'; '.join(tried)})")


def resolve_remat(cfg: Any, shape: ModelConfig, axes: dict[str, int] | None = None,
                  budget: float | None = None, gpu: str | None = None) -> tuple[str, str]:
    """``train.remat`` with ``auto`` resolved, and a line saying why (with the ranking).

    On a GPU (or for a named ``gpu`` target, compiled deviceless) the choice comes from the compiled peak and the
    roofline of the run's own step for each policy (`choose_remat_compiled`); elsewhere, and on a mesh of several
    devices, from the analytic plan and the analytic step estimate (`choose_remat`)."""
    if cfg.train.remat != "auto":
        return cfg.train.remat, f"remat {cfg.train.remat} (from the config)"
    budget = budget if budget is not None else device_budget()
    if budget is None:
        return "full", "remat auto: the device does not report its memory (CPU), so full (the least memory)"
    compiled_choice = _compiled_auto(cfg, shape, axes, budget, gpu)
    if compiled_choice is not None:
        return compiled_choice
    settings = settings_from_config(cfg, axes)
    ranking = rank_remat(shape, budget, gpu=gpu or "h100-sxm", **settings)
    chosen = pick(ranking)
    fits = "fits" if chosen.fits else "does NOT fit"
    return chosen.policy, (f"remat auto: {chosen.policy}, the fastest analytic estimate whose plan fits; planned "
                           f"{chosen.bytes / 1e9:.2f} GB per device {fits} in {HEADROOM:.0%} of {budget / 1e9:.2f} GB "
                           f"({'; '.join(ranking_lines(ranking))}; python -m jqlora.plan for the rows)")
