"""Gemma 2 and Gemma 3 (text decoder): config mapping and Hugging Face key table.

What differs from Llama (Gemma Team, "Gemma 2", 2024; "Gemma 3 Technical Report", 2025), each a `ModelConfig` field
the shared decoder reads:

- GeGLU MLP: down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))                                   (``hidden_act``)
- RMSNorm scales by (1 + w), multiplied in float32 before the cast back                       (``norm_unit_offset``)
- sandwich norms: h = x + post_attention_layernorm(attn(input_layernorm(x))),
  y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))                        (``sandwich_norms``)
- embeddings times √D, with √D rounded to the compute dtype first, as transformers does         (``embed_scale``)
- attention logits scaled by query_pre_attn_scalar^-½ instead of head_dim^-½                   (``attn_scale``)
- Gemma 2: soft-capping, cap · tanh(x / cap), of the attention logits (before the mask) and of the final logits
                                                                               (``attn_softcap``, ``final_softcap``)
- alternating sliding-window and global layers: Gemma 2 every other layer (1:1), Gemma 3 five local to one global;
  Gemma 3 has a second RoPE (base 10k) for its local layers while the global ones use base 1M, linearly scaled in
  the larger checkpoints                                                    (``sliding_windows``, ``rope_local``)
- Gemma 3: q_norm / k_norm per head (also (1 + w))                                                     (``qk_norm``)
- tied embeddings and a 256k vocabulary (the chunked cross-entropy never materializes [tokens, V] logits).

Per-layer windows and RoPE bases under `scan`: one stack with stacked per-layer values, not two stacks. Every layer
has the same variables and shapes, so one scanned body serves all; what differs per layer is a window width (an
int32 [L] array scanned with the layers; a global layer's width exceeds every sequence) and which RoPE table it
uses (an int32 [L] index into cos/sin tables [R, B, S, H] computed once before the scan, R = 2 for Gemma 3). Two
stacks would have to interleave 5:1 (Gemma 3) or 1:1 (Gemma 2) in layer order, so they would need a scan over
groups of six (or two) layers with a remainder, a second compiled body and layer indices that no longer match the
checkpoint's; the stacked flags cost one [L] array each and a dynamic index into a small table.
"""

from __future__ import annotations

from typing import Any

from jqlora.models.config import ModelConfig, RopeConfig, config_errors, positive_ints, rope_from_dict
from jqlora.models.hf import HFKey, layer_table
from jqlora.models.llama import attention_keys, mlp_keys

MODEL_TYPES = ("gemma2", "gemma3_text")
_DEFAULT_MAX_POS = {"gemma2": 8192, "gemma3_text": 131072}
_DEFAULT_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # every n-th layer is global


def config_from_dict(d: dict[str, Any], where: str) -> ModelConfig:
    """A Gemma 2 / Gemma 3 text ``config.json`` (``d``, read from ``where``) as a `ModelConfig`."""
    bad = config_errors(d, where, MODEL_TYPES, "gelu_pytorch_tanh", ("hidden_activation", "hidden_act"))
    model_type = d["model_type"]
    if d.get("use_bidirectional_attention"):
        raise bad("unsupported use_bidirectional_attention=true: only causal attention is implemented")
    positive_ints(d, bad, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    n_layers = d["num_hidden_layers"]
    heads = d["num_attention_heads"]
    head_dim = int(d.get("head_dim") or d["hidden_size"] // heads)
    max_pos = int(d.get("max_position_embeddings") or _DEFAULT_MAX_POS[model_type])

    pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or _DEFAULT_PATTERN[model_type])
    layer_types = d.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)
    ]
    if len(layer_types) != n_layers:
        raise bad(f"layer_types has {len(layer_types)} entries for {n_layers} layers")
    for i, t in enumerate(layer_types):
        if t not in ("sliding_attention", "full_attention"):
            raise bad(f"unsupported layer_types[{i}] {t!r}")
    window = d.get("sliding_window")
    windows = [int(window) if t == "sliding_attention" and window else None for t in layer_types]

    rope, rope_local = _ropes(d, model_type, max_pos, bad)
    scalar = d.get("query_pre_attn_scalar") or head_dim
    bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=model_type == "gemma3_text",
        sliding_windows=tuple(windows),
        max_position_embeddings=max_pos,
        rope=rope,
        hidden_act="gelu_pytorch_tanh",
        norm_unit_offset=True,
        sandwich_norms=True,
        embed_scale=True,
        attn_scale=float(scalar) ** -0.5,
        attn_softcap=_cap(d, "attn_logit_softcapping", bad),
        final_softcap=_cap(d, "final_logit_softcapping", bad),
        rope_local=rope_local,
    )


def _cap(d: dict[str, Any], key: str, bad) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise bad(f"{key} must be a positive number or null, got {v!r}")
    return float(v)


def _ropes(d: dict[str, Any], model_type: str, max_pos: int, bad) -> tuple[RopeConfig, RopeConfig | None]:
    """(global RoPE, local RoPE or None). Gemma 3's ``rope_parameters`` has one entry per layer type; the older
    spelling is ``rope_theta`` + ``rope_scaling`` (global layers) and ``rope_local_base_freq`` (local layers)."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    per_type = any(isinstance(v, dict) for v in params.values())
    if model_type == "gemma2":
        if per_type:
            raise bad("unsupported per-layer-type rope_parameters for gemma2")
        return rope_from_dict(params, d, max_pos, bad), None
    if per_type:
        unknown = set(params) - {"full_attention", "sliding_attention"}
        if unknown:
            raise bad(f"unsupported rope_parameters layer types {sorted(unknown)}")
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full, local = params, {"rope_type": "default"}
    full.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    return rope_from_dict(full, {}, max_pos, bad), rope_from_dict(local, {}, max_pos, bad)


def key_table(cfg: ModelConfig) -> list[HFKey]:
    """Every tensor a Gemma 2 / Gemma 3 text checkpoint of ``cfg`` must provide (no lm_head when tied)."""
    D = cfg.hidden_size
    per_layer = attention_keys(cfg) + [("post_attention_layernorm.weight", (D,), "norm")]
    per_layer += mlp_keys(cfg, "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
    return layer_table(cfg, per_layer)
