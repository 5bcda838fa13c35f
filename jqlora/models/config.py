"""`ModelConfig`: the architecture of one decoder checkpoint, read from a Hugging Face ``config.json``.

One dataclass describes every supported family; what a family does differently is a field (an activation, a norm
variant, soft-capping, ...) whose default is the Llama behaviour. Each family module (`llama`, `gemma`) maps its
``config.json`` to these fields (`config_from_dict`) and owns its Hugging Face key table (`key_table`);
`FAMILIES` says which module reads which ``model_type``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable, Mapping

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")

# model_type -> the family module (under jqlora.models) that reads its config and owns its key table
FAMILIES: dict[str, str] = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gemma2": "gemma", "gemma3_text": "gemma", "phi3": "phi3",
    "mixtral": "mixtral", "qwen3_moe": "qwen3_moe",
}
MODEL_TYPES = tuple(FAMILIES)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings (transformers' ``rope_parameters``, normalized)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # llama3 / yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    attention_factor: float | None = None  # yarn (None: derived from factor / mscale)
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None  # longrope


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of one checkpoint (see `ModelConfig.from_hf`). Defaults are the Llama behaviour."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None (or an empty tuple) = full causal attention
    max_position_embeddings: int = 2048
    rope: RopeConfig = RopeConfig()
    # What other families do differently (defaults: Llama)
    hidden_act: str = "silu"  # MLP activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU, Gemma)
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + w), multiplied in float32
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and around the MLP (see gemma.py)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size), rounded to the compute dtype
    attn_scale: float | None = None  # attention logit scale; None = head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: attention logits -> cap * tanh(logits / cap)
    final_softcap: float | None = None  # Gemma 2: output logits -> cap * tanh(logits / cap)
    rope_local: RopeConfig | None = None  # Gemma 3: RoPE of the sliding-window layers (None: `rope` everywhere)
    partial_rotary_factor: float = 1.0  # Phi-4-mini: rotate the first head_dim · factor features of each head
    fused_qkv: bool = False  # Phi-3: one qkv_proj [(N + 2K) H, D] instead of q/k/v_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj [2F, D] (gate rows first) instead of gate/up_proj
    # Sparse MoE (Mixtral, Qwen3-MoE; see moe.py): every layer's MLP is num_experts experts of width
    # intermediate_size, num_experts_per_tok of them per token, chosen by a frozen router
    num_experts: int = 0  # 0: a dense MLP
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True  # renormalize the top-k router probabilities to sum to 1 (Mixtral always does)
    router_weights_f32: bool = True  # Mixtral: expert outputs times float32 weights; Qwen3-MoE: in the compute dtype

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_hidden_layers)
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ValueError(
                f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_hidden_layers} layers"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} gives {self.rotary_dim} rotary "
                             f"features of head_dim {self.head_dim}: expected an even number in (0, head_dim]")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in [1, num_experts "
                             f"{self.num_experts}]")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}: expected one of {', '.join(ACTIVATIONS)}")
        for key in ("short_factor", "long_factor"):  # (LongRoPE, in any family that has it)
            factors = getattr(self.rope, key)
            if factors is not None and len(factors) != self.rotary_dim // 2:
                raise ValueError(f"rope {key} has {len(factors)} entries, expected rotary dims / 2 = "
                                 f"{self.rotary_dim // 2}")

    @property
    def rotary_dim(self) -> int:
        """Features of each head that RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def layer_ropes(self) -> tuple[int, ...]:
        """Per layer, which RoPE it uses: 0 = `rope`, 1 = `rope_local` (the sliding-window layers, when set)."""
        if self.rope_local is None:
            return (0,) * self.num_hidden_layers
        return tuple(int(w is not None) for w in self.sliding_windows)

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any]) -> "ModelConfig":
        """Read a Hugging Face ``config.json`` (a checkpoint dir, the file, or its parsed dict)."""
        where = "config"
        if isinstance(source, Mapping):
            d = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            with open(path) as f:
                d = json.load(f)
        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"{where}: unsupported model_type {model_type!r}: expected one of "
                             f"{', '.join(MODEL_TYPES)}")
        return family(model_type).config_from_dict(d, where)


def family(model_type: str):
    """The family module for ``model_type`` (it has ``config_from_dict`` and ``key_table``)."""
    return importlib.import_module(f"jqlora.models.{FAMILIES[model_type]}")


def config_errors(d: dict[str, Any], where: str, model_types: tuple[str, ...], activation: str,
                  act_keys: tuple[str, ...] = ("hidden_act",)) -> Callable[[str], ValueError]:
    """The checks every family's ``config_from_dict`` starts with (it was routed by ``model_type``; its MLP's
    activation, read from the first of ``act_keys`` that is set, is the one implemented), and the ``bad(what)``
    maker of its one-line errors naming ``where``."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{where}: {what}")

    assert d.get("model_type") in model_types, d.get("model_type")
    act = next((d[k] for k in act_keys if d.get(k)), activation)
    if act != activation:
        raise bad(f"unsupported {act_keys[0]} {act!r}: only {activation!r} is implemented")
    return bad


def positive_ints(d: dict[str, Any], bad: Callable[[str], ValueError], *keys: str) -> None:
    for key in keys:
        if not isinstance(d.get(key), int) or isinstance(d.get(key), bool) or d[key] <= 0:
            raise bad(f"{key} must be a positive integer, got {d.get(key)!r}")


def rope_from_dict(params: dict[str, Any], d: dict[str, Any], max_pos: int,
                   bad: Callable[[str], ValueError]) -> RopeConfig:
    """One RoPE from its parameters (transformers 5 ``rope_parameters`` or the older ``rope_scaling``), with the
    top-level ``rope_theta`` / ``original_max_position_embeddings`` of ``d`` as fallbacks."""
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise bad(f"unsupported rope type {rope_type!r}: expected one of {', '.join(ROPE_TYPES)}")
    original = None
    if rope_type in ("llama3", "yarn", "longrope"):
        original = int(d.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                       or max_pos)
    factor = params.get("factor")
    if factor is None:
        if rope_type in ("yarn", "longrope"):
            factor = max_pos / original
        elif rope_type != "default":
            raise bad(f"rope type {rope_type!r} needs a 'factor'")
        else:
            factor = 1.0
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise bad(f"rope type 'llama3' needs {key!r}")
    short = long = None
    if rope_type == "longrope":
        short, long = params.get("short_factor"), params.get("long_factor")
        for key, v in (("short_factor", short), ("long_factor", long)):
            if not isinstance(v, list) or not all(isinstance(x, (int, float)) for x in v):
                raise bad(f"rope type 'longrope' needs {key!r} as a list of numbers, got {v!r}")
        short, long = tuple(map(float, short)), tuple(map(float, long))
    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        factor=float(factor),
        original_max_position_embeddings=original,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        attention_factor=params.get("attention_factor"),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        short_factor=short,
        long_factor=long,
    )
