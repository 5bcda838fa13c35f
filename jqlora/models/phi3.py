"""Phi-3 / Phi-3.5 / Phi-4-mini (``model_type`` phi3): config mapping and Hugging Face key table.

What differs from Llama (Abdin et al., "Phi-3 Technical Report", 2024; "Phi-4-Mini Technical Report", 2025):

- fused projections in the checkpoint and the model: ``self_attn.qkv_proj`` [(N + 2K) H, D] (rows: q, then k, then
  v) and ``mlp.gate_up_proj`` [2F, D] (gate rows first), so peft's target names are the fused module names and an
  adapter on ``qkv_proj`` has one A [r, D] and one B [(N + 2K) H, r] (``fused_qkv``, ``fused_gate_up``);
- LongRoPE (``rope_type`` longrope, older ``su``): per-frequency factors, ``long_factor`` once the sequence exceeds
  ``original_max_position_embeddings``, ``short_factor`` before, and an attention factor (see `rope.py`);
- partial rotary (Phi-4-mini, ``partial_rotary_factor`` 0.75): RoPE on the first 3/4 of each head;
- a sliding window on every layer when ``sliding_window`` is set (as Mistral).
"""

from __future__ import annotations

from typing import Any

from jqlora.models.config import ModelConfig, config_errors, positive_ints
from jqlora.models.hf import HFKey, layer_table
from jqlora.models.llama import _rope

MODEL_TYPES = ("phi3",)


def config_from_dict(d: dict[str, Any], where: str) -> ModelConfig:
    """A Phi-3 family ``config.json`` (``d``, read from ``where``) as a `ModelConfig`."""
    bad = config_errors(d, where, MODEL_TYPES, "silu")
    positive_ints(d, bad, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    heads = d["num_attention_heads"]
    head_dim = int(d.get("head_dim") or d["hidden_size"] // heads)
    max_pos = int(d.get("max_position_embeddings") or 4096)
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    if params.get("rope_type", params.get("type")) in ("su", "yarn"):  # transformers' own renaming for Phi-3
        params = {**params, "rope_type": "longrope"}
        params.pop("type", None)
    if params.get("rope_type", params.get("type", "default")) not in ("default", "longrope"):
        raise bad(f"unsupported rope type {params.get('rope_type', params.get('type'))!r} for phi3: expected default "
                  "or longrope")
    prf = float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0)
    rope = _rope({**d, "rope_scaling": params or None, "rope_parameters": None}, max_pos, bad)
    window = d.get("sliding_window")
    n_layers = d["num_hidden_layers"]
    return ModelConfig(
        model_type="phi3",
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        sliding_windows=(int(window) if window else None,) * n_layers,
        max_position_embeddings=max_pos,
        rope=rope,
        partial_rotary_factor=prf,
        fused_qkv=True,
        fused_gate_up=True,
    )


def key_table(cfg: ModelConfig) -> list[HFKey]:
    """Every tensor a Phi-3 family checkpoint of ``cfg`` must provide."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    NH, KH = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return layer_table(cfg, [
        ("input_layernorm.weight", (D,), "norm"),
        ("self_attn.qkv_proj.weight", (NH + 2 * KH, D), "linear"),
        ("self_attn.o_proj.weight", (D, NH), "linear"),
        ("post_attention_layernorm.weight", (D,), "norm"),
        ("mlp.gate_up_proj.weight", (2 * F, D), "linear"),
        ("mlp.down_proj.weight", (D, F), "linear"),
    ])
