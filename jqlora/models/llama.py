"""Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3: config mapping and Hugging Face key table.

The decoder itself (`decoder.py`) is shared by every family; the Llama behaviour is its default. What differs within
this family: Qwen2 has q/k/v biases, Llama an optional bias on all four projections (``attention_bias``); Qwen3
normalizes q and k per head (q_norm / k_norm); Mistral applies its sliding window on every layer, Qwen2/3 only with
``use_sliding_window``, on the layers ``layer_types`` marks. RoPE scalings: default, linear, dynamic NTK, llama3, YaRN
(`rope.py`).

For callers that predate the split, this module re-exports the shared names (`LlamaForCausalLM`, `ModelConfig`,
`from_hf_tensors`, `hf_key_table` — the dispatching one — ...).
"""

from __future__ import annotations

from typing import Any, Callable

from jqlora.models.attention import NO_WINDOW as _NO_WINDOW  # noqa: F401 - re-exported
from jqlora.models.config import ModelConfig, RopeConfig, config_errors, positive_ints, rope_from_dict
from jqlora.models.decoder import (  # noqa: F401 - re-exported: the decoder every family shares
    Attention,
    CausalLM,
    DecoderLayer,
    DecoderModel,
    LlamaForCausalLM,
    LlamaModel,
)
from jqlora.models.hf import (  # noqa: F401 - re-exported: the loading API
    HFKey,
    TensorGetter,
    check_filled,
    checkpoint_pieces,
    from_hf_tensors,
    hf_key_table,
    layer_table,
)
from jqlora.models.layers import MLP, Embed, LMHead, RMSNorm  # noqa: F401 - re-exported
from jqlora.models.rope import _apply_rope, rope_cos_sin, rope_frequencies, rope_tables  # noqa: F401 - re-exported
from jqlora.models.stack import REMAT_POLICIES, _remat_policy, segment_positions, softcap  # noqa: F401

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# ----------------------------------------------------------------------------------------------------------------
# Config


def config_from_dict(d: dict[str, Any], where: str) -> ModelConfig:
    """The Llama family's ``config.json`` (``d``, read from ``where``) as a `ModelConfig`."""
    bad = config_errors(d, where, MODEL_TYPES, "silu", ("hidden_act", "hidden_activation"))
    model_type = d["model_type"]
    if d.get("mlp_bias"):
        raise bad("unsupported mlp_bias=true: only bias-free MLPs are implemented")
    prf = d.get("partial_rotary_factor", (d.get("rope_parameters") or d.get("rope_scaling") or {}).get(
        "partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise bad(f"unsupported partial_rotary_factor {prf!r}: only full rotary embeddings are implemented")
    positive_ints(d, bad, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    n_layers = d["num_hidden_layers"]
    heads = d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    max_pos = int(d.get("max_position_embeddings") or {"llama": 2048, "mistral": 131072}.get(model_type, 32768))

    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    elif model_type == "mistral":
        qkv_bias = o_bias = False
    else:  # llama, qwen3: one flag for all four projections
        qkv_bias = o_bias = bool(d.get("attention_bias", False))

    # Sliding windows: Mistral applies its window on every layer; Qwen2/3 only with use_sliding_window, on the layers
    # `layer_types` marks (by default those from max_window_layers on).
    windows: list[int | None] = [None] * n_layers
    if model_type == "mistral":
        if d.get("sliding_window"):
            windows = [int(d["sliding_window"])] * n_layers
    elif model_type in ("qwen2", "qwen3"):
        if d.get("use_sliding_window") and d.get("sliding_window"):
            layer_types = d.get("layer_types") or [
                "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
                for i in range(n_layers)
            ]
            if len(layer_types) != n_layers:
                raise bad(f"layer_types has {len(layer_types)} entries for {n_layers} layers")
            for i, t in enumerate(layer_types):
                if t not in ("sliding_attention", "full_attention"):
                    raise bad(f"unsupported layer_types[{i}] {t!r}")
            windows = [int(d["sliding_window"]) if t == "sliding_attention" else None for t in layer_types]
    elif d.get("layer_types") and any(t != "full_attention" for t in d["layer_types"]):
        raise bad(f"unsupported layer_types {sorted(set(d['layer_types']))} for model_type {model_type!r}")

    return ModelConfig(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=model_type == "qwen3",
        sliding_windows=tuple(windows),
        max_position_embeddings=max_pos,
        rope=_rope(d, max_pos, bad),
    )




def _rope(d: dict[str, Any], max_pos: int, bad: Callable[[str], ValueError]) -> RopeConfig:
    """Both spellings: transformers 5 ``rope_parameters`` and the older ``rope_scaling`` + top-level ``rope_theta``."""
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise bad("unsupported per-layer-type rope_parameters")
    return rope_from_dict(params, d, max_pos, bad)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face keys


def key_table(cfg: ModelConfig) -> list[HFKey]:
    """Every tensor a Llama-family checkpoint of ``cfg`` must provide, in checkpoint order."""
    return layer_table(cfg, attention_keys(cfg) + mlp_keys(cfg, "post_attention_layernorm.weight"))


def attention_keys(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(suffix, HF shape, kind) of the input norm and the attention block of one layer."""
    D = cfg.hidden_size
    NH, KH, H = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.head_dim
    per_layer: list[tuple[str, tuple[int, ...], str]] = [
        ("input_layernorm.weight", (D,), "norm"),
        ("self_attn.q_proj.weight", (NH, D), "linear"),
        ("self_attn.k_proj.weight", (KH, D), "linear"),
        ("self_attn.v_proj.weight", (KH, D), "linear"),
        ("self_attn.o_proj.weight", (D, NH), "linear"),
    ]
    if cfg.qkv_bias:
        per_layer += [("self_attn.q_proj.bias", (NH,), "bias"), ("self_attn.k_proj.bias", (KH,), "bias"),
                      ("self_attn.v_proj.bias", (KH,), "bias")]
    if cfg.o_bias:
        per_layer.append(("self_attn.o_proj.bias", (D,), "bias"))
    if cfg.qk_norm:
        per_layer += [("self_attn.q_norm.weight", (H,), "norm"), ("self_attn.k_norm.weight", (H,), "norm")]
    return per_layer


def mlp_keys(cfg: ModelConfig, *norms: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(suffix, HF shape, kind) of the ``norms`` (D each) and the gated MLP of one layer."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    return [(norm, (D,), "norm") for norm in norms] + [
        ("mlp.gate_proj.weight", (F, D), "linear"),
        ("mlp.up_proj.weight", (F, D), "linear"),
        ("mlp.down_proj.weight", (D, F), "linear"),
    ]
