"""peft interchange of the adapters on the embedding and the LM head (`jqlora.models.layers`), for
`jqlora.adapters.export` and `jqlora.adapters.load`.

peft names them ``base_model.model.model.embed_tokens.lora_embedding_A`` ``[r, V]`` / ``lora_embedding_B`` ``[D, r]``
(no ``.weight``; jqlora holds ``lora_embedding_a [V, r]`` / ``lora_embedding_b [r, D]``) and
``base_model.model.lm_head.lora_A.weight`` ``[r, D]`` / ``lora_B.weight`` ``[V, r]`` (jqlora: ``lora_a [D, r]`` /
``lora_b [r, V]``): jqlora holds the transposes. peft's ``save_pretrained`` also stores full copies of those base
weights (``...embed_tokens.base_layer.weight``; jqlora's export does not): import accepts one equal to the base
model's weight and refuses any other (a resized vocabulary).
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from jqlora.adapters.errors import AdapterError
from jqlora.adapters.format import PREFIX, parse_key
from jqlora.lora import match_pattern

HEADS = {"model.embed_tokens": "embed_tokens", "lm_head": "lm_head"}  # peft module name -> lora.targets name


def head_modules(model: Any) -> list[tuple[str, Any, Any, Any]]:
    """``(peft module name, module, A variable, B variable)`` for an adapted embedding / LM head."""
    out = []
    embed = model.model.embed_tokens
    if getattr(embed, "spec", None) is not None:
        out.append(("model.embed_tokens", embed, embed.lora_embedding_a, embed.lora_embedding_b))
    head = getattr(model, "lm_head", None)
    if head is not None and getattr(head, "spec", None) is not None:
        out.append(("lm_head", head, head.lora_a, head.lora_b))
    return out


def head_key(module: str, ab: str, suffix: str = "") -> str:
    """peft's key of A or B of ``module`` (``suffix``: ``.<adapter name>`` or empty)."""
    if module == "model.embed_tokens":
        return f"{PREFIX}{module}.lora_embedding_{ab}{suffix}"
    return f"{PREFIX}{module}.lora_{ab}{suffix}.weight"


def head_tensors(model: Any) -> dict[str, np.ndarray]:
    """peft's state dict entries of the embedding / head adapters (float32)."""
    out = {}
    for name, _, a, b in head_modules(model):
        out[head_key(name, "A")] = np.ascontiguousarray(np.asarray(a[...].astype(jnp.float32)).T)
        out[head_key(name, "B")] = np.ascontiguousarray(np.asarray(b[...].astype(jnp.float32)).T)
    return out


def check_base_copy(model: Any, match: re.Match, key: str, value: np.ndarray, path: Any) -> None:
    """A peft copy of a base weight (``BASE_COPY_RE`` matched ``key``) must be the model's own weight."""
    head = model.model.embed_tokens if match["module"] == "model.embed_tokens" else model.lm_head
    base = None if head is None else np.asarray(head.weight[...].astype(jnp.float32))
    if base is None or base.shape != value.shape or not np.allclose(base, value, rtol=1e-2, atol=1e-2):
        raise AdapterError(f"{path}: {key} differs from the base model's {match['module']} weight (a resized "
                           "vocabulary?); jqlora adapts the base weights as they are")


def head_specs(shapes: dict[str, tuple[int, ...]], cfg: dict, path: Any) -> dict[str, tuple[int, float]]:
    """``{"embed_tokens" | "lm_head": (r, alpha)}`` from an adapter's tensor shapes and config."""
    out = {}
    for key, shape in shapes.items():
        module, ab, _ = parse_key(key, path)
        if module in HEADS and ab == "A":
            if cfg.get("use_dora"):
                raise AdapterError(f"{path}: DoRA on {HEADS[module]} is not supported by jqlora ({key})")
            alpha = float(match_pattern(cfg.get("alpha_pattern"), module, cfg["lora_alpha"]))
            out[HEADS[module]] = (int(shape[0]), alpha)
    return out


def head_updates(model: Any, by_module: dict, suffix: str, cfg: dict, path: Any, adapter_dir: Any,
                 used: set) -> list[tuple[Any, np.ndarray]]:
    """``(variable, value)`` for every embedding / head adapter of ``model`` from the adapter's tensors
    ``by_module[(module, 'A' | 'B')] = (key, value)``; the keys taken are added to ``used``."""
    rslora = bool(cfg.get("use_rslora", False))
    updates = []
    for name, m, a, b in head_modules(model):
        for ab, var in (("A", a), ("B", b)):
            key = head_key(name, ab, suffix)
            if (name, ab) not in by_module:
                raise AdapterError(f"{path}: missing key {key!r} (the model adapts {HEADS[name]} with r={m.spec.r})")
            key, value = by_module[(name, ab)]
            expected = tuple(var.shape[::-1])
            if tuple(value.shape) != expected:
                raise AdapterError(f"{path}: {key} has shape {tuple(value.shape)}, expected {expected}")
            updates.append((var, value.T))
            used.add((name, ab))
        alpha = float(match_pattern(cfg.get("alpha_pattern"), name, cfg["lora_alpha"]))
        scaling = alpha / math.sqrt(m.spec.r) if rslora else alpha / m.spec.r
        if not math.isclose(scaling, m.spec.scaling, rel_tol=1e-6):
            raise AdapterError(f"{adapter_dir}: {name} has LoRA scaling {scaling:g} in the adapter but "
                               f"{m.spec.scaling:g} in the model; build the model with "
                               "lora=jqlora.adapters.read_adapter_config(adapter_dir)")
    return updates
