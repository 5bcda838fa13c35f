"""Qwen3-MoE (``model_type`` qwen3_moe): config mapping and Hugging Face key table.

Qwen3 attention (q/k RMSNorm per head, no biases by default) with a sparse MoE MLP on every layer (`moe.py`):
``num_experts`` SwiGLU experts of width ``moe_intermediate_size``, ``num_experts_per_tok`` per token; the router
takes softmax then top-k, renormalized only when ``norm_topk_prob``, and its weights are rounded to the compute
dtype before they scale the expert outputs (Qwen Team, "Qwen3 Technical Report", 2025).

Checkpoint layout (hub, and what transformers 5.24 saves): per layer ``mlp.gate.weight`` [E, D] (the router) and
``mlp.experts.{e}.{gate,up,down}_proj.weight``. Layers with a dense MLP (``mlp_only_layers``,
``decoder_sparse_step`` > 1) are not supported: the layer stack scans one layer body. Adapters as for Mixtral
(`mixtral.py`): the attention, and with ``lora.experts`` the fused experts (peft ``target_parameters``, same keys);
the router carries none.
"""

from __future__ import annotations

from typing import Any

from jqlora.models.config import ModelConfig, config_errors, positive_ints
from jqlora.models.hf import HFKey
from jqlora.models.mixtral import moe_config, moe_table

MODEL_TYPES = ("qwen3_moe",)


def config_from_dict(d: dict[str, Any], where: str) -> ModelConfig:
    """A Qwen3-MoE ``config.json`` (``d``, read from ``where``) as a `ModelConfig`."""
    bad = config_errors(d, where, MODEL_TYPES, "silu")
    experts = d.get("num_experts", d.get("num_local_experts"))
    d = {**d, "num_experts": experts}
    positive_ints(d, bad, "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_experts", "num_experts_per_tok")
    if d.get("mlp_only_layers") or int(d.get("decoder_sparse_step", 1) or 1) != 1:
        raise bad(f"unsupported dense MLP layers (mlp_only_layers={d.get('mlp_only_layers')}, decoder_sparse_step="
                  f"{d.get('decoder_sparse_step')}): only a sparse MLP on every layer is implemented")
    if d.get("use_sliding_window"):
        raise bad("unsupported use_sliding_window=true for qwen3_moe: only full attention is implemented")
    n_layers, heads = d["num_hidden_layers"], d["num_attention_heads"]
    max_pos = int(d.get("max_position_embeddings") or 32768)
    try:
        return moe_config(d, "qwen3_moe", n_layers, heads, max_pos, (None,) * n_layers, num_experts=experts,
                          norm_topk_prob=bool(d.get("norm_topk_prob", False)), router_weights_f32=False, bad=bad,
                          qk_norm=True, bias=bool(d.get("attention_bias", False)), default_eps=1e-6,
                          intermediate=d["moe_intermediate_size"])
    except ValueError as e:
        raise bad(str(e)) from None


def key_table(cfg: ModelConfig) -> list[HFKey]:
    """Every tensor a Qwen3-MoE checkpoint of ``cfg`` must provide."""
    return moe_table(cfg, "mlp", {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"})
