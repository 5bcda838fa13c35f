"""Rotary position embeddings (Su et al., "RoFormer", 2021) as transformers computes them.

Rotate-half layout: q' = q cos + rotate_half(q) sin with cos/sin = cos/sin(concat(p·f, p·f)) · attention_factor,
f the inverse frequencies, optionally rescaled: linear (Chen et al. 2023), dynamic NTK (recomputed from the batch's
largest position when it exceeds the trained length), llama3 (Llama 3.1 wavelength-banded), YaRN (Peng et al. 2023,
with its attention factor 0.1 ln(s) + 1), LongRoPE (Phi-3, below). Partial rotary (Phi-4-mini) rotates only the first
rotary_dim = head_dim · partial_rotary_factor features of each head. A model may have two RoPEs (Gemma 3: one for
its sliding-window layers), so every function takes the `RopeConfig` to use (default: ``cfg.rope``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jqlora.models.config import ModelConfig, RopeConfig


def rope_frequencies(cfg: ModelConfig, seq_len: jax.Array | int | None = None,
                     rope: RopeConfig | None = None) -> tuple[jax.Array, float]:
    """float32 inverse frequencies ``[H/2]`` and the attention factor, as transformers computes them.

    ``seq_len`` (max position + 1, may be traced) matters only for dynamic NTK scaling; ``rope`` defaults to
    ``cfg.rope``.
    """
    r, dim = rope or cfg.rope, cfg.rotary_dim
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
        return _yarn(r, dim)
    if r.rope_type == "longrope":
        return _longrope(r, exponents, seq_len)
    raise AssertionError(r.rope_type)


def _longrope(r: RopeConfig, exponents: jax.Array,
              seq_len: jax.Array | int | None) -> tuple[jax.Array, float]:
    """LongRoPE (Ding et al. 2024; Phi-3's ``su``): per-frequency rescaling by ``long_factor`` once the sequence
    (max position + 1) exceeds the pretrained length, ``short_factor`` before; attention factor
    sqrt(1 + ln(s) / ln(original)) with s = factor (default max_position_embeddings / original)."""
    original, factor = r.original_max_position_embeddings, r.factor
    attention_factor = r.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = jnp.asarray(r.short_factor, jnp.float32)
    ext = short
    if seq_len is not None:
        ext = jnp.where(jnp.asarray(seq_len, jnp.int32) > original, jnp.asarray(r.long_factor, jnp.float32), short)
    return 1.0 / (ext * r.theta**exponents), float(attention_factor)


def _yarn(r: RopeConfig, dim: int) -> tuple[jax.Array, float]:
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


def rope_cos_sin(cfg: ModelConfig, positions_BS: jax.Array, dtype: Any,
                 rope: RopeConfig | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[B, S, R]`` in ``dtype`` for integer positions, R = rotary dims (dynamic NTK and LongRoPE look at
    the batch's largest)."""
    r = rope or cfg.rope
    seq_len = jnp.max(positions_BS) + 1 if r.rope_type in ("dynamic", "longrope") else None
    inv_freq, attention_factor = rope_frequencies(cfg, seq_len, r)
    freqs_BSh = positions_BS.astype(jnp.float32)[..., None] * inv_freq
    emb_BSH = jnp.concatenate([freqs_BSh, freqs_BSh], axis=-1)
    return (jnp.cos(emb_BSH) * attention_factor).astype(dtype), (jnp.sin(emb_BSH) * attention_factor).astype(dtype)


def apply_rope(x_BSNH: jax.Array, cos_BSR: jax.Array, sin_BSR: jax.Array) -> jax.Array:
    """Rotate the first R features of every head (partial rotary: R < H leaves the rest as they are)."""
    R = cos_BSR.shape[-1]
    if R < x_BSNH.shape[-1]:
        return jnp.concatenate([apply_rope(x_BSNH[..., :R], cos_BSR, sin_BSR), x_BSNH[..., R:]], axis=-1)
    half = R // 2
    rotated = jnp.concatenate([-x_BSNH[..., half:], x_BSNH[..., :half]], axis=-1)
    return x_BSNH * cos_BSR[:, :, None, :] + rotated * sin_BSR[:, :, None, :]


_apply_rope = apply_rope  # the older name


def rope_tables(cfg: ModelConfig, positions_BS: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[R, B, S, H]``: one table per RoPE of the model (`ModelConfig.layer_ropes` indexes them)."""
    tables = [rope_cos_sin(cfg, positions_BS, dtype, r) for r in (cfg.rope, cfg.rope_local) if r is not None]
    return jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables])
