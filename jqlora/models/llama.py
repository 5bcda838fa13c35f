"""Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3) in Flax NNX, matching Hugging Face transformers.

Per layer (pre-norm; Touvron et al., "LLaMA", 2023):

    h  = x + o_proj(attn(rope(q_norm(q_proj(n))), rope(k_norm(k_proj(n))), v_proj(n))),   n = RMSNorm(x)
    y  = h + down_proj(silu(gate_proj(m)) * up_proj(m)),                                   m = RMSNorm(h)

RMSNorm(x) = w * (x / sqrt(mean(x²) + eps)), computed in float32 and cast back before the weight multiply. RoPE
(Su et al., "RoFormer", 2021) uses transformers' rotate-half layout: q' = q cos + rotate_half(q) sin with
cos/sin = cos/sin(concat(p·f, p·f)) · attention_factor, f the inverse frequencies, optionally rescaled: linear
(Chen et al. 2023), dynamic NTK (recomputed from the batch's largest position when it exceeds the trained length),
llama3 (Llama 3.1 wavelength-banded), YaRN (Peng et al. 2023, with its attention factor 0.1 ln(s) + 1). Attention
(`jqlora.models.attention`) is softmax(q kᵀ / √head_dim) v with grouped KV heads (GQA/MQA), causal, restricted to
tokens of the same segment (packed documents never see each other; segment 0 is padding) and, for sliding-window
layers, to the last W tokens.
Qwen3 normalizes q and k per head (q_norm / k_norm); Qwen2 has q/k/v biases.

Layers are stacked (every layer variable has a leading axis L) and run by `jax.lax.scan` over one layer body wrapped
in `jax.checkpoint` with a named remat policy (`REMAT_POLICIES`), or unrolled. Module and variable names are the
Hugging Face ones (`model.layers.self_attn.q_proj`, ...), so checkpoint conversion and peft export never rename;
`hf_key_table` is the one table from Hugging Face keys to variables.

Shape letters: B batch, S sequence (T queries), D hidden, N query heads, K key/value heads, H head dim,
F MLP hidden, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora import quant as q
from jqlora.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from jqlora.models.attention import NO_WINDOW as _NO_WINDOW
from jqlora.models.attention import attention
from jqlora.lora import FROZEN_MATMUL, Frozen, LoraConfig, LoraLinear, QuantSpec, compute_dtype

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "offload")


# ----------------------------------------------------------------------------------------------------------------
# Config


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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of one Llama-family checkpoint (see `ModelConfig.from_hf`)."""

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
        return _config_from_dict(d, where)


def _config_from_dict(d: dict[str, Any], where: str) -> ModelConfig:
    def bad(what: str) -> ValueError:
        return ValueError(f"{where}: {what}")

    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise bad(f"unsupported model_type {model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    act = d.get("hidden_act", d.get("hidden_activation", "silu"))
    if act != "silu":
        raise bad(f"unsupported hidden_act {act!r}: only 'silu' is implemented")
    if d.get("mlp_bias"):
        raise bad("unsupported mlp_bias=true: only bias-free MLPs are implemented")
    prf = d.get("partial_rotary_factor", (d.get("rope_parameters") or d.get("rope_scaling") or {}).get(
        "partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise bad(f"unsupported partial_rotary_factor {prf!r}: only full rotary embeddings are implemented")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(d.get(key), int) or d[key] <= 0:
            raise bad(f"{key} must be a positive integer, got {d.get(key)!r}")

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
        rope=_rope_from_dict(d, max_pos, bad),
    )


def _rope_from_dict(d: dict[str, Any], max_pos: int, bad: Callable[[str], ValueError]) -> RopeConfig:
    """Both spellings: transformers 5 ``rope_parameters`` and the older ``rope_scaling`` + top-level ``rope_theta``."""
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise bad("unsupported per-layer-type rope_parameters")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise bad(f"unsupported rope type {rope_type!r}: expected one of {', '.join(ROPE_TYPES)}")
    original = None
    if rope_type in ("llama3", "yarn"):
        original = int(d.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                       or max_pos)
    factor = params.get("factor")
    if factor is None:
        if rope_type == "yarn":
            factor = max_pos / original
        elif rope_type != "default":
            raise bad(f"rope type {rope_type!r} needs a 'factor'")
        else:
            factor = 1.0
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise bad(f"rope type 'llama3' needs {key!r}")
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
    )


# ----------------------------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_frequencies(cfg: ModelConfig, seq_len: jax.Array | int | None = None) -> tuple[jax.Array, float]:
    """float32 inverse frequencies ``[H/2]`` and the attention factor, as transformers computes them.

    ``seq_len`` (max position + 1, may be traced) matters only for dynamic NTK scaling.
    """
    r, dim = cfg.rope, cfg.head_dim
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    inv_freq = 1.0 / (r.theta**exponents)
    if r.rope_type == "default":
        return inv_freq, 1.0
    if r.rope_type == "linear":
        return inv_freq / r.factor, 1.0
    if r.rope_type == "dynamic":
        max_pos = cfg.max_position_embeddings
        if seq_len is None:
            return inv_freq, 1.0
        seq = jnp.maximum(jnp.asarray(seq_len, jnp.int32), max_pos).astype(jnp.float32)
        base = r.theta * ((r.factor * seq / max_pos) - (r.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**exponents), 1.0
    if r.rope_type == "llama3":
        old = r.original_max_position_embeddings
        low_wavelen = old / r.low_freq_factor
        high_wavelen = old / r.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)
        smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return jnp.where(medium, smoothed, scaled), 1.0
    if r.rope_type == "yarn":
        return _yarn(cfg)
    raise AssertionError(r.rope_type)


def _yarn(cfg: ModelConfig) -> tuple[jax.Array, float]:
    r, dim = cfg.rope, cfg.head_dim
    factor, original = r.factor, r.original_max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = r.attention_factor
    if attention_factor is None:
        if r.mscale and r.mscale_all_dim:
            attention_factor = mscale(factor, r.mscale) / mscale(factor, r.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(r.theta))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = r.theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def rope_cos_sin(cfg: ModelConfig, positions_BS: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[B, S, H]`` in ``dtype`` for integer positions (dynamic NTK looks at the batch's largest)."""
    seq_len = jnp.max(positions_BS) + 1 if cfg.rope.rope_type == "dynamic" else None
    inv_freq, attention_factor = rope_frequencies(cfg, seq_len)
    freqs_BSh = positions_BS.astype(jnp.float32)[..., None] * inv_freq
    emb_BSH = jnp.concatenate([freqs_BSh, freqs_BSh], axis=-1)
    return (jnp.cos(emb_BSH) * attention_factor).astype(dtype), (jnp.sin(emb_BSH) * attention_factor).astype(dtype)


def _apply_rope(x_BSNH: jax.Array, cos_BSH: jax.Array, sin_BSH: jax.Array) -> jax.Array:
    half = x_BSNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BSNH[..., half:], x_BSNH[..., :half]], axis=-1)
    return x_BSNH * cos_BSH[:, :, None, :] + rotated * sin_BSH[:, :, None, :]


# ----------------------------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: Any):
        self.weight = Frozen(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * y.astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype: Any, rngs: nnx.Rngs):
        self.weight = Frozen((0.02 * jax.random.normal(rngs.params(), (vocab, dim), jnp.float32)).astype(dtype))

    def __call__(self, ids_BS: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids_BS, axis=0)


class LMHead(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype: Any, rngs: nnx.Rngs):
        self.weight = Frozen((0.02 * jax.random.normal(rngs.params(), (vocab, dim), jnp.float32)).astype(dtype))


def _linear(cfg_lora: LoraConfig | None, name: str, n_in: int, n_out: int, *, bias: bool, quant: QuantSpec,
            dtype: Any, lora_dtype: Any, rngs: nnx.Rngs) -> LoraLinear:
    spec = cfg_lora.for_module(name) if cfg_lora is not None else None
    return LoraLinear(n_in, n_out, lora=spec, quant=quant, use_bias=bias, dtype=dtype, param_dtype=lora_dtype,
                      rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, quant: QuantSpec, dtype: Any, lora_dtype: Any,
                 rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(quant=quant, dtype=dtype, lora_dtype=lora_dtype, rngs=rngs)
        self.q_proj = _linear(lora, "self_attn.q_proj", D, N * H, bias=cfg.qkv_bias, **kw)
        self.k_proj = _linear(lora, "self_attn.k_proj", D, K * H, bias=cfg.qkv_bias, **kw)
        self.v_proj = _linear(lora, "self_attn.v_proj", D, K * H, bias=cfg.qkv_bias, **kw)
        self.o_proj = _linear(lora, "self_attn.o_proj", N * H, D, bias=cfg.o_bias, **kw)
        self.q_norm = RMSNorm(H, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(H, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H

    def __call__(self, x_BSD, cos_BSH, sin_BSH, segment_ids_BS, window, *, implementation: str,
                 deterministic: bool, keys) -> jax.Array:
        B, S, _ = x_BSD.shape
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
        kw = lambda i: dict(deterministic=deterministic, key=None if keys is None else keys[i])  # noqa: E731
        q_BSNH = self.q_proj(x_BSD, **kw(0)).reshape(B, S, N, H)
        k_BSKH = self.k_proj(x_BSD, **kw(1)).reshape(B, S, K, H)
        v_BSKH = self.v_proj(x_BSD, **kw(2)).reshape(B, S, K, H)
        if self.q_norm is not None:
            q_BSNH, k_BSKH = self.q_norm(q_BSNH), self.k_norm(k_BSKH)
        q_BSNH = _apply_rope(q_BSNH, cos_BSH, sin_BSH)
        k_BSKH = _apply_rope(k_BSKH, cos_BSH, sin_BSH)
        out_BSNH = attention(q_BSNH, k_BSKH, v_BSKH, scale=H**-0.5, q_segment_ids=segment_ids_BS,
                             kv_segment_ids=segment_ids_BS, window=window, implementation=implementation)
        return self.o_proj(out_BSNH.reshape(B, S, N * H), **kw(3))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, quant: QuantSpec, dtype: Any, lora_dtype: Any,
                 rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=False, quant=quant, dtype=dtype, lora_dtype=lora_dtype, rngs=rngs)
        self.gate_proj = _linear(lora, "mlp.gate_proj", D, F, **kw)
        self.up_proj = _linear(lora, "mlp.up_proj", D, F, **kw)
        self.down_proj = _linear(lora, "mlp.down_proj", F, D, **kw)

    def __call__(self, x_BSD, *, deterministic: bool, keys) -> jax.Array:
        kw = lambda i: dict(deterministic=deterministic, key=None if keys is None else keys[i])  # noqa: E731
        gate_BSF = self.gate_proj(x_BSD, **kw(0))
        up_BSF = self.up_proj(x_BSD, **kw(1))
        return self.down_proj(jax.nn.silu(gate_BSF) * up_BSF, **kw(2))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, quant: QuantSpec, dtype: Any, lora_dtype: Any,
                 rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, lora, quant, dtype, lora_dtype, rngs)
        self.mlp = MLP(cfg, lora, quant, dtype, lora_dtype, rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def __call__(self, x_BSD, cos_BSH, sin_BSH, segment_ids_BS, window, *, implementation: str,
                 deterministic: bool, key) -> jax.Array:
        keys = None if key is None else jax.random.split(key, 7)
        attn = self.self_attn(self.input_layernorm(x_BSD), cos_BSH, sin_BSH, segment_ids_BS, window,
                              implementation=implementation, deterministic=deterministic,
                              keys=None if keys is None else keys[:4])
        h_BSD = x_BSD + attn
        mlp = self.mlp(self.post_attention_layernorm(h_BSD), deterministic=deterministic,
                       keys=None if keys is None else keys[4:])
        return h_BSD + mlp


class LlamaModel(nnx.Module):
    """``embed_tokens``, stacked ``layers`` (leading axis L on every variable), final ``norm``."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, quant: QuantSpec, dtype: Any, lora_dtype: Any,
                 rngs: nnx.Rngs):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype, rngs)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(r: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, lora, quant, dtype, lora_dtype, r)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


def _remat_policy(name: str):
    cp = jax.checkpoint_policies
    frozen = cp.save_only_these_names(FROZEN_MATMUL)  # the 4-bit matmuls: a dot inside a custom_vjp, named
    if name == "full":
        return cp.nothing_saveable
    if name == "save_dots":
        return cp.save_from_both_policies(cp.dots_saveable, frozen)
    if name == "save_dots_no_batch" or (name == "offload" and not _has_pinned_host()):
        # offload with nowhere to offload to keeps the dots on the device instead
        return cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable, frozen)
    if name == "offload":
        dots = cp.offload_dot_with_no_batch_dims("device", "pinned_host")
        names = cp.save_and_offload_only_these_names(names_which_can_be_saved=[], names_which_can_be_offloaded=[
            FROZEN_MATMUL], offload_src="device", offload_dst="pinned_host")

        def offload(prim, *args, **params):  # a checkpoint name decides by its name, every other op as a dot
            return (names if prim.name == "name" else dots)(prim, *args, **params)

        return offload
    raise ValueError(f"unknown remat policy {name!r}: expected one of {', '.join(REMAT_POLICIES)}")


def _has_pinned_host() -> bool:
    try:
        return any(m.kind == "pinned_host" for m in jax.devices()[0].addressable_memories())
    except Exception:  # noqa: BLE001 - a backend without memory spaces
        return False


def segment_positions(segment_ids_BS: jax.Array) -> jax.Array:
    """Positions restarting at 0 at the start of every run of equal segment ids."""
    S = segment_ids_BS.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), segment_ids_BS.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BS[..., :1], bool), segment_ids_BS[..., 1:] != segment_ids_BS[..., :-1]], axis=-1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=idx.ndim - 1)


class LlamaForCausalLM(nnx.Module):
    """Causal LM: ``model`` (embed_tokens, layers, norm) and ``lm_head`` (None with tied embeddings).

    ``remat`` (one of `REMAT_POLICIES`), ``scan_layers`` and ``attention`` (one of `ATTENTION_IMPLEMENTATIONS`:
    ``"auto"`` is cuDNN flash attention on a GPU backend, XLA elsewhere) are plain attributes that may be changed
    between calls.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        lora: LoraConfig | None = None,
        quant: QuantSpec | None = None,
        dtype: Any = "bfloat16",
        *,
        rngs: nnx.Rngs,
        lora_dtype: Any = "float32",
        remat: str = "full",
        scan_layers: bool = True,
        attention: str = "auto",
    ):
        quant = quant if quant is not None else QuantSpec()
        dtype = compute_dtype(dtype)
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {attention!r}: expected one of "
                             f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
        self.config = cfg
        self.lora_config = lora
        self.quant_spec = quant
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = scan_layers
        self.attention = attention
        self.model = LlamaModel(cfg, lora, quant, dtype, jnp.dtype(lora_dtype), rngs)
        self.lm_head = None if cfg.tie_word_embeddings else LMHead(cfg.vocab_size, cfg.hidden_size, dtype, rngs)

    def lm_head_weight(self) -> jax.Array:
        """``[V, D]`` in the compute dtype (the embedding matrix when tied)."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return head.weight[...]

    def hidden_states(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states ``[B, S, D]`` in the compute dtype."""
        cfg = self.config
        ids_BS = jnp.asarray(input_ids, jnp.int32)
        B, S = ids_BS.shape
        if positions is None:
            positions = (segment_positions(jnp.asarray(segment_ids)) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)))
        pos_BS = jnp.asarray(positions, jnp.int32)
        cos_BSH, sin_BSH = rope_cos_sin(cfg, pos_BS, self.dtype)
        seg_BS = None if segment_ids is None else jnp.asarray(segment_ids)
        windows = [w if w is not None else _NO_WINDOW for w in cfg.sliding_windows]
        windowed = any(w < S for w in windows)
        # one window shared by every layer is a static int (cuDNN's window length must be), else it is scanned over
        shared_window = windows[0] if len(set(windows)) == 1 else None

        h_BSD = self.model.embed_tokens(ids_BS)
        graphdef, state = nnx.split(self.model.layers)
        use_dropout = not deterministic and self.lora_config is not None and self.lora_config.dropout > 0
        if use_dropout and key is None:
            raise ValueError("LoRA dropout needs a PRNG key (key=...) when deterministic=False")
        keys = jax.random.split(key, cfg.num_hidden_layers) if use_dropout else None

        def body(h, xs):
            layer_state, window, layer_key = xs
            layer = nnx.merge(graphdef, layer_state)
            w = (window if shared_window is None else shared_window) if windowed else None
            return layer(h, cos_BSH, sin_BSH, seg_BS, w, implementation=self.attention,
                         deterministic=not use_dropout, key=layer_key), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_remat_policy(self.remat), prevent_cse=not self.scan_layers)
        xs = (state, jnp.asarray(windows, jnp.int32), keys)
        if self.scan_layers:
            h_BSD, _ = jax.lax.scan(body, h_BSD, xs)
        else:
            for i in range(cfg.num_hidden_layers):
                h_BSD, _ = body(h_BSD, jax.tree_util.tree_map(lambda x, i=i: x[i], xs))
        return self.model.norm(h_BSD)

    def __call__(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """float32 logits ``[B, S, V]``; ``segment_ids`` (0 = padding) keep packed documents apart."""
        h_BSD = self.hidden_states(input_ids, segment_ids, positions, deterministic=deterministic, key=key)
        w_VD = self.lm_head_weight()
        return jax.lax.dot_general(h_BSD, w_VD, (((2,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def init_lora(self, key: jax.Array) -> None:
        """(Re)initialize every adapter as peft does (A uniform, B zero); deterministic in ``key``."""
        for i, (_, module) in enumerate(sorted(nnx.iter_modules(self), key=lambda pm: tuple(map(str, pm[0])))):
            if isinstance(module, LoraLinear):
                module.reset_lora(jax.random.fold_in(key, i))


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face keys ⇄ variables, and loading


@dataclasses.dataclass(frozen=True)
class HFKey:
    """Where one Hugging Face tensor lives in `LlamaForCausalLM`.

    ``path`` is the module path (``("model", "layers", "self_attn", "q_proj")``) and ``name`` the variable on it
    (``weight`` / ``bias``); ``layer`` indexes the stacked axis (None outside the layers). ``kind`` is ``linear``
    (a kernel that may be quantized), ``bias``, ``embedding``, ``norm`` or ``lm_head``. ``shape`` is the Hugging
    Face shape; ``transpose`` is always False: kernels keep the Hugging Face ``[out, in]`` layout.
    """

    key: str
    path: tuple[str, ...]
    name: str
    layer: int | None
    shape: tuple[int, ...]
    kind: str
    transpose: bool = False


def hf_key_table(cfg: ModelConfig) -> list[HFKey]:
    """Every tensor a Hugging Face checkpoint of ``cfg`` must provide, in checkpoint order."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    NH, KH, H = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.head_dim
    table = [HFKey("model.embed_tokens.weight", ("model", "embed_tokens"), "weight", None, (V, D), "embedding")]
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
    per_layer += [
        ("post_attention_layernorm.weight", (D,), "norm"),
        ("mlp.gate_proj.weight", (F, D), "linear"),
        ("mlp.up_proj.weight", (F, D), "linear"),
        ("mlp.down_proj.weight", (D, F), "linear"),
    ]
    for i in range(cfg.num_hidden_layers):
        for suffix, shape, kind in per_layer:
            module, name = suffix.rsplit(".", 1)
            table.append(HFKey(f"model.layers.{i}.{suffix}", ("model", "layers", *module.split(".")), name, i,
                               shape, kind))
    table.append(HFKey("model.norm.weight", ("model", "norm"), "weight", None, (D,), "norm"))
    if not cfg.tie_word_embeddings:
        table.append(HFKey("lm_head.weight", ("lm_head",), "weight", None, (V, D), "lm_head"))
    return table


TensorGetter = Callable[[str], "np.ndarray | q.QuantizedTensor"]


def _module_at(model: nnx.Module, path: tuple[str, ...]) -> Any:
    m = model
    for part in path:
        m = getattr(m, part)
    return m


def _host_array(value: Any, key: str) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        return q._to_numpy(value, key)
    try:
        return np.asarray(value)
    except Exception as e:  # noqa: BLE001 - say which key held what
        raise ValueError(f"{key}: cannot read a {type(value).__name__} as an array ({e})") from None


def checkpoint_pieces(cfg: ModelConfig, get: TensorGetter, qspec: QuantSpec, cdtype: Any,
                      quant_dtypes: dict[tuple[str, ...], tuple[str, str]],
                      quantize: Callable[[HFKey, np.ndarray], q.QuantizedTensor] | None = None):
    """Every variable slice a checkpoint provides, checked, as ``(entry, variable name, value)``: a quantized kernel
    as its codes / absmax (/ nested_absmax / offset), anything else as a host array in ``cdtype``. ``get(key)`` is
    called once per key in `hf_key_table` order, and each tensor is dropped before the next is read. A missing key,
    a wrong shape, a quantization other than ``qspec`` or kernels of one module quantized from different dtypes raise
    ValueError naming the key; ``quant_dtypes`` (module path -> (dtype, first key)) is filled for the caller.
    ``quantize(entry, host array)`` quantizes a kernel (default: `quant.quantize` on the default device)."""
    if quantize is None:
        def quantize(entry, arr):
            return q.quantize(arr, qspec.quant, block_size=qspec.block_size, double_quant=qspec.double_quant)

    for entry in hf_key_table(cfg):
        try:
            value = get(entry.key)
        except KeyError:
            value = None
        if value is None:
            raise ValueError(f"missing tensor {entry.key!r} in the checkpoint")
        arr = qt = None
        if isinstance(value, q.QuantizedTensor):
            if entry.kind != "linear":
                raise ValueError(f"{entry.key}: a quantized tensor where a plain {entry.kind} weight is expected")
            if value.shape != entry.shape or value.batch_shape:
                raise ValueError(f"{entry.key}: shape {value.batch_shape + value.shape}, expected {entry.shape}")
            qt = value
        else:
            arr = _host_array(value, entry.key)
            if tuple(arr.shape) != entry.shape:
                raise ValueError(f"{entry.key}: shape {tuple(arr.shape)}, expected {entry.shape}")
            if arr.dtype.name not in q.DTYPES:
                arr = arr.astype(np.float32)
            if entry.kind == "linear" and qspec.enabled:
                qt = quantize(entry, arr)
        if entry.kind == "linear" and qspec.enabled:
            got = (qt.quant_type, qt.block_size, qt.double_quant)
            want = (qspec.quant, qspec.block_size, qspec.double_quant)
            if got != want:
                raise ValueError(
                    f"{entry.key}: checkpoint is quantized as (quant, block_size, double_quant)={got}, but {want} "
                    "was requested; load with matching quantization settings"
                )
            seen = quant_dtypes.setdefault(entry.path, (qt.dtype, entry.key))
            if seen[0] != qt.dtype:
                raise ValueError(f"{entry.key}: quantized from {qt.dtype}, but {seen[1]} from {seen[0]}")
            yield entry, "codes", qt.codes
            yield entry, "absmax", qt.absmax
            if qt.double_quant:
                yield entry, "nested_absmax", qt.nested_absmax
                yield entry, "offset", qt.offset
        else:
            if qt is not None:  # a bnb-quantized kernel loaded unquantized
                arr = np.asarray(q.dequantize(qt, cdtype))
            yield entry, entry.name, arr.astype(cdtype, copy=False)  # (no copy of a tensor already in cdtype)
        del value, arr, qt  # the host copy goes before the next tensor is read


def from_hf_tensors(
    cfg: ModelConfig,
    get: TensorGetter,
    *,
    lora: LoraConfig | None = None,
    quant: str = "nf4",
    double_quant: bool = True,
    block_size: int = 64,
    dtype: Any = "bfloat16",
    lora_dtype: Any = "float32",
    seed: int = 0,
    remat: str = "full",
    scan_layers: bool = True,
) -> LlamaForCausalLM:
    """Build the model from Hugging Face tensors fetched one key at a time by ``get(key)``.

    ``get`` returns an array (numpy / JAX / torch) or, for a linear kernel of a bitsandbytes checkpoint, a
    ``quant.QuantizedTensor`` that is used as is (never requantized). Other kernels are quantized from the
    checkpoint's own dtype. Every shape is checked against ``cfg``; a missing key or wrong shape raises ValueError
    naming the key. The model is built abstractly (`nnx.eval_shape`), so no full-size random weights are made;
    each stacked variable is filled into one host buffer, then moved to the device once. Adapters are initialized
    from ``seed`` as peft does.
    """
    qspec = QuantSpec(quant, double_quant, block_size)
    cdtype = compute_dtype(dtype)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, lora, qspec, cdtype, rngs=nnx.Rngs(seed),
                                                    lora_dtype=lora_dtype, remat=remat, scan_layers=scan_layers))
    buffers: dict[tuple[tuple[str, ...], str], np.ndarray] = {}
    quant_dtypes: dict[tuple[str, ...], tuple[str, str]] = {}  # module path -> (dtype name, first key)

    def buffer(path: tuple[str, ...], name: str) -> np.ndarray:
        if (path, name) not in buffers:
            var = getattr(_module_at(model, path), name)
            buffers[(path, name)] = np.zeros(var.shape, var.dtype)
        return buffers[(path, name)]

    def put(entry: HFKey, name: str, value: np.ndarray) -> None:
        buf = buffer(entry.path, name)
        index = () if entry.layer is None else (entry.layer,)
        if buf[index].shape != value.shape:
            raise ValueError(f"{entry.key}: {name} has shape {value.shape}, expected {buf[index].shape}")
        buf[index] = value

    for entry, name, value in checkpoint_pieces(cfg, get, qspec, cdtype, quant_dtypes):
        put(entry, name, np.asarray(value))

    for (path, name), buf in buffers.items():
        getattr(_module_at(model, path), name).set_value(jnp.asarray(buf))
    for path, (dtype_name, _) in quant_dtypes.items():
        _module_at(model, path).quant_dtype = dtype_name
    # Adapters (the only variables not from the checkpoint)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LoraLinear) and module.lora_a is not None:
            module.lora_a.set_value(jnp.zeros(module.lora_a.shape, module.lora_a.dtype))
            module.lora_b.set_value(jnp.zeros(module.lora_b.shape, module.lora_b.dtype))
    model.init_lora(jax.random.key(seed))
    _check_filled(model)
    return model


def _check_filled(model: nnx.Module) -> None:
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if isinstance(var.get_value(), jax.ShapeDtypeStruct):
            raise AssertionError(f"variable {'.'.join(map(str, path))} was not loaded")
