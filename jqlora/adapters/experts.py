"""peft interchange of the MoE expert adapters (`jqlora.models.moe.ExpertLora`), for `jqlora.adapters`.

transformers 5.24 stores Mixtral / Qwen3-MoE experts as fused 3-D parameters ``mlp.experts.gate_up_proj``
[E, 2F, D] and ``mlp.experts.down_proj`` [E, D, F]; peft 0.21 adapts them with ``target_parameters`` (a
``ParamWrapper`` per parameter, ``adapter_config.json``: ``"target_parameters": ["mlp.experts.down_proj",
"mlp.experts.gate_up_proj"]``). Two parameters of one module nest two wrappers, the first parameter the module
registers (``gate_up_proj``) innermost, so its keys carry a ``base_layer``:

    base_model.model.model.layers.{i}.mlp.experts.base_layer.lora_A.weight   [E·r, D]    gate_up_proj
    base_model.model.model.layers.{i}.mlp.experts.base_layer.lora_B.weight   [2F, r·E]
    base_model.model.model.layers.{i}.mlp.experts.lora_A.weight              [E·r, F]    down_proj
    base_model.model.model.layers.{i}.mlp.experts.lora_B.weight              [D, r·E]

peft reads A as (E, r, in) (the expert axis outermost) and B as (out, r, E) (the expert axis innermost), and adds
``s · B[:, :, e] · A[e]`` to expert e's [out, in] kernel, s = alpha / r with r the per-expert rank. jqlora holds
``lora_a`` [L, E, I, r] and ``lora_b`` [L, E, r, O], so A = a[e].T stacked over e and B[o, j, e] = b[e, j, o].
jqlora writes and reads both parameters together (``lora.experts``); peft's ``all-linear`` on these models also
targets the router (``mlp.gate.weight``), which jqlora keeps frozen: such an adapter is refused on import.

Shape letters: L layers, E experts, I in features, O out features, r rank.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from jqlora.adapters.errors import AdapterError
from jqlora.adapters.format import PREFIX
from jqlora.lora import LoraSpec

# the model's expert adapters -> peft's module name inside a layer (the nesting above) and target parameter
WRAPPERS = {"gate_up_lora": ("mlp.experts.base_layer", "mlp.experts.gate_up_proj"),
            "down_lora": ("mlp.experts", "mlp.experts.down_proj")}
TARGET_PARAMETERS = sorted(t for _, t in WRAPPERS.values())
EXPERT_MODULES = {m for m, _ in WRAPPERS.values()}  # peft module names (inside a layer) of expert adapters


def expert_modules(model: Any) -> list[tuple[str, Any]]:
    """``(name in WRAPPERS, ExpertLora)`` of the model's expert adapters (none without ``lora.experts``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    experts = getattr(getattr(layers, "mlp", None), "experts", None)
    if experts is None or getattr(experts, "gate_up_lora", None) is None:
        return []
    return [(name, getattr(experts, name)) for name in WRAPPERS]


def to_peft(a_EIR: np.ndarray, b_ERO: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer's (lora_a [E, I, r], lora_b [E, r, O]) as peft's (lora_A [E·r, I], lora_B [O, r·E])."""
    E, I, r = a_EIR.shape
    O = b_ERO.shape[-1]
    A = np.transpose(a_EIR, (0, 2, 1)).reshape(E * r, I)
    B = np.transpose(b_ERO, (2, 1, 0)).reshape(O, r * E)
    return np.ascontiguousarray(A), np.ascontiguousarray(B)


def from_peft(A: np.ndarray, B: np.ndarray, E: int) -> tuple[np.ndarray, np.ndarray]:
    """peft's (lora_A [E·r, I], lora_B [O, r·E]) as (lora_a [E, I, r], lora_b [E, r, O])."""
    r = A.shape[0] // E
    a_EIR = np.transpose(A.reshape(E, r, A.shape[1]), (0, 2, 1))
    b_ERO = np.transpose(B.reshape(B.shape[0], r, E), (2, 1, 0))
    return a_EIR, b_ERO


def expert_tensors(model: Any) -> dict[str, np.ndarray]:
    """peft's state dict entries of the expert adapters (float32)."""
    out = {}
    for name, m in expert_modules(model):
        a_LEIR = np.asarray(m.lora_a[...].astype(jnp.float32))
        b_LERO = np.asarray(m.lora_b[...].astype(jnp.float32))
        module = WRAPPERS[name][0]
        for i in range(a_LEIR.shape[0]):
            A, B = to_peft(a_LEIR[i], b_LERO[i])
            out[f"{PREFIX}model.layers.{i}.{module}.lora_A.weight"] = A
            out[f"{PREFIX}model.layers.{i}.{module}.lora_B.weight"] = B
    return out


def check_export(model: Any, lora_config: Any) -> list[str] | None:
    """``target_parameters`` for adapter_config.json (None without expert adapters); the experts' rank and alpha
    must be the config's own ``r`` / ``lora_alpha`` (peft's rank_pattern is not written for them)."""
    mods = expert_modules(model)
    for name, m in mods:
        if m.spec.r != int(lora_config.r) or not math.isclose(m.spec.alpha, float(lora_config.alpha)):
            raise AdapterError(f"experts.{name}: r={m.spec.r}, alpha={m.spec.alpha:g} differ from the LoraConfig's "
                               f"r={lora_config.r}, alpha={lora_config.alpha:g}")
    return list(TARGET_PARAMETERS) if mods else None


def check_config(cfg: dict, path: Any) -> bool:
    """Whether an adapter config's ``target_parameters`` asks for the expert adapters (both, or none)."""
    targets = cfg.get("target_parameters")
    if targets in (None, [], {}):
        return False
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{path}: target_parameters must be a list of parameter names, got {targets!r}")
    names = sorted(set(targets))
    if names == TARGET_PARAMETERS or names == ["down_proj", "gate_up_proj"]:
        return True
    router = [t for t in names if t.endswith("gate.weight")]
    if router:
        raise AdapterError(f"{path}: target_parameters={targets!r} adapts the MoE router ({router[0]}; peft's "
                           "all-linear does): jqlora keeps the router frozen and reads expert adapters on "
                           f"{TARGET_PARAMETERS} only")
    raise AdapterError(f"{path}: target_parameters={targets!r} is not supported: jqlora reads expert adapters on "
                       f"both {TARGET_PARAMETERS} (lora.experts) or none")


def expert_updates(model: Any, by_module: dict, suffix: str, cfg: dict, path: Any, used: set
                   ) -> list[tuple[Any, np.ndarray]]:
    """``(variable, value)`` for every expert adapter of ``model`` from the adapter's tensors
    ``by_module[(module, 'A' | 'B')] = (key, value)``; the keys taken are added to ``used``."""
    rslora = bool(cfg.get("use_rslora", False))
    out = []
    for name, m in expert_modules(model):
        L, E, I, r = m.lora_a.shape
        O = m.lora_b.shape[-1]
        a_LEIR = np.zeros((L, E, I, r), np.float32)
        b_LERO = np.zeros((L, E, r, O), np.float32)
        for i in range(L):
            module = f"model.layers.{i}.{WRAPPERS[name][0]}"
            parts = {}
            for ab, expected in (("A", (E * r, I)), ("B", (O, r * E))):
                key = f"{PREFIX}{module}.lora_{ab}{suffix}.weight"
                if (module, ab) not in by_module:
                    raise AdapterError(f"{path}: missing key {key!r} (the model adapts {WRAPPERS[name][1]} with "
                                       f"r={r})")
                key, value = by_module[(module, ab)]
                if tuple(value.shape) != expected:
                    raise AdapterError(f"{path}: {key} has shape {tuple(value.shape)}, expected {expected} "
                                       f"({E} experts, r={r})")
                parts[ab] = value
                used.add((module, ab))
            a_LEIR[i], b_LERO[i] = from_peft(parts["A"], parts["B"], E)
        alpha = float(cfg["lora_alpha"])
        scaling = LoraSpec(r=r, alpha=alpha, rslora=rslora).scaling
        if not math.isclose(scaling, m.scaling, rel_tol=1e-6):
            raise AdapterError(f"{path}: {WRAPPERS[name][1]} has LoRA scaling {scaling:g} in the adapter but "
                               f"{m.scaling:g} in the model; build it with "
                               "lora=jqlora.adapters.read_adapter_config(...)")
        out += [(m.lora_a, a_LEIR), (m.lora_b, b_LERO)]
    return out

