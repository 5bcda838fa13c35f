"""Will it fit, and how fast: the analytic memory plan (`memory`), the deviceless compile of the run's own step for a
named GPU (`aot`, with its target descriptions in ``gpu_targets/``), the published model shapes the plan knows
by name (`model_shapes`), the step-time estimate (`estimate`: a roofline of the compiled HLO, or analytic) and
the ``train.remat=auto`` choice above them (`remat`).

The names below are imported on first use (PEP 562), so that `python -m jqlora.plan --help` can list the published
shapes without importing JAX; `tests/test_layout.py` counts these module names as imports like any other.
"""

from __future__ import annotations

import importlib
from typing import Any

_FACE = {
    "jqlora.planning.memory": ("BUILTIN", "CE_CHUNK", "HEADROOM", "LINEARS", "REMATS", "WEIGHTS_ROW", "Plan",
                               "weights_row", "linear_shapes", "lora_param_count", "memory_plan", "quantized_bytes",
                               "settings_from_config", "weight_bytes", "GRPO_LOGITS", "grpo_plan",
                               "kv_cache_bytes"),
    "jqlora.planning.aot": ("GPUS", "AotError", "CompiledStep", "Gpu", "abstract_model", "compile_step",
                                "compiled", "compiled_peak", "compute_capability", "gpu_device", "step_arguments",
                                "target_config"),
    "jqlora.planning.aot_grpo": ("GrpoShapes", "compile_grpo_step", "compile_rollout", "grpo_shapes"),
    "jqlora.planning.model_shapes": ("HUB_IDS", "NAMES", "PUBLISHED"),
    "jqlora.planning.remat": ("AUTO_ORDER", "COMPILED_HEADROOM", "Ranked", "choose_remat", "choose_remat_compiled",
                              "device_budget", "gpu_figures", "pick", "rank_remat", "rank_remat_compiled",
                              "ranking_lines", "resolve_remat"),
    "jqlora.planning.estimate": ("CATEGORIES", "Estimate", "analytic_step", "model_flops"),  # (estimate: the module)
}
_WHERE = {name: module for module, names in _FACE.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'jqlora.planning' has no attribute {name!r}")
