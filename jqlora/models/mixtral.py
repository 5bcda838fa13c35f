"""Mixtral (``model_type`` mixtral): config mapping and Hugging Face key table.

Llama attention (grouped KV heads, RoPE, optional sliding window on every layer) with a sparse MoE MLP on every
layer (`moe.py`): ``num_local_experts`` SwiGLU experts of width ``intermediate_size``, ``num_experts_per_tok`` per
token, the router's top-k probabilities renormalized (Jiang et al., "Mixtral of Experts", 2024).

Checkpoint layout: the one on the hub and the one transformers 5.24 saves (it converts its fused in-memory
``mlp.experts.gate_up_proj`` [E, 2F, D] / ``down_proj`` [E, D, F] back on save): per layer
``block_sparse_moe.gate.weight`` [E, D] (the router) and ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up)
[F, D], ``w2`` (down) [D, F]. The model names them ``mlp.gate`` and ``mlp.experts.{gate,up,down}_proj``.
transformers + bitsandbytes quantizes only ``nn.Linear`` modules, so a transformers-saved ``*-bnb-4bit`` Mixtral
holds 4-bit attention kernels and unquantized experts and router; the experts are quantized on load here.

Adapters: the attention projections q/k/v/o (``target_modules``, as in Llama) are adapted, and an exported
adapter names them explicitly. The experts are fused 3-D parameters in transformers 5.24, which peft 0.21 adapts
only through ``target_parameters`` (a ParamWrapper per parameter: ``mlp.experts.base_layer.lora_A`` [E·r, D] /
``lora_B`` [2F, r·E] for ``gate_up_proj``, ``mlp.experts.lora_A`` / ``lora_B`` for ``down_proj``). With
``lora.experts`` jqlora adapts both (`moe.py`) and exports / imports them that way (`jqlora.adapters.experts`); peft's
own ``all-linear`` on these models adds those and the router (``gate.weight``): the router stays frozen here, and an
adapter on it is refused on import.
"""

from __future__ import annotations

from typing import Any

from jqlora.models.config import ModelConfig, config_errors, positive_ints
from jqlora.models.hf import HFKey
from jqlora.models.llama import _rope, attention_keys

MODEL_TYPES = ("mixtral",)
EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}  # ours -> the checkpoint's


def config_from_dict(d: dict[str, Any], where: str) -> ModelConfig:
    """A Mixtral ``config.json`` (``d``, read from ``where``) as a `ModelConfig`."""
    bad = config_errors(d, where, MODEL_TYPES, "silu")
    positive_ints(d, bad, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_local_experts", "num_experts_per_tok")
    n_layers, heads = d["num_hidden_layers"], d["num_attention_heads"]
    max_pos = int(d.get("max_position_embeddings") or 131072)
    window = d.get("sliding_window")
    try:
        return moe_config(d, "mixtral", n_layers, heads, max_pos, (int(window) if window else None,) * n_layers,
                          num_experts=d["num_local_experts"], norm_topk_prob=True, router_weights_f32=True,
                          bad=bad, qk_norm=False, bias=False, default_eps=1e-5)
    except ValueError as e:
        raise bad(str(e)) from None


def moe_config(d, model_type, n_layers, heads, max_pos, windows, *, num_experts, norm_topk_prob,
               router_weights_f32, bad, qk_norm, bias, default_eps, intermediate=None) -> ModelConfig:
    """The `ModelConfig` of a Llama-attention MoE decoder (Mixtral, Qwen3-MoE)."""
    return ModelConfig(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=int(intermediate or d["intermediate_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
        rms_norm_eps=float(d.get("rms_norm_eps", default_eps)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=qk_norm,
        sliding_windows=tuple(windows),
        max_position_embeddings=max_pos,
        rope=_rope(d, max_pos, bad),
        num_experts=int(num_experts),
        num_experts_per_tok=int(d["num_experts_per_tok"]),
        norm_topk_prob=norm_topk_prob,
        router_weights_f32=router_weights_f32,
    )


def moe_table(cfg: ModelConfig, block: str, expert_names: dict[str, str]) -> list[HFKey]:
    """Embedding, per layer (attention keys, the router ``{block}.gate`` and every expert's kernels
    ``{block}.experts.{e}.{name}``), final norm, LM head; model paths ``mlp.gate`` / ``mlp.experts.*``."""
    D, V, F, E = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.num_experts
    shapes = {"gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}
    table = [HFKey("model.embed_tokens.weight", ("model", "embed_tokens"), "weight", None, (V, D), "embedding")]
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}"
        for suffix, shape, kind in attention_keys(cfg) + [("post_attention_layernorm.weight", (D,), "norm")]:
            module, name = suffix.rsplit(".", 1)
            table.append(HFKey(f"{pre}.{suffix}", ("model", "layers", *module.split(".")), name, i, shape, kind))
        table.append(HFKey(f"{pre}.{block}.gate.weight", ("model", "layers", "mlp", "gate"), "weight", i, (E, D),
                           "router"))
        for e in range(E):
            for ours, theirs in expert_names.items():
                table.append(HFKey(f"{pre}.{block}.experts.{e}.{theirs}.weight",
                                   ("model", "layers", "mlp", "experts", ours), "weight", i, shapes[ours], "linear",
                                   expert=e))
    table.append(HFKey("model.norm.weight", ("model", "norm"), "weight", None, (D,), "norm"))
    if not cfg.tie_word_embeddings:
        table.append(HFKey("lm_head.weight", ("lm_head",), "weight", None, (V, D), "lm_head"))
    return table


def key_table(cfg: ModelConfig) -> list[HFKey]:
    """Every tensor a Mixtral checkpoint of ``cfg`` must provide."""
    return moe_table(cfg, "block_sparse_moe", EXPERT_NAMES)
