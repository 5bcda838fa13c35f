"""Rotary position embeddings (Su et al., "RoFormer", 2021) as transformers computes them.

Rotate-half layout: q' = q cos + rotate_half(q) sin with cos/sin = cos/sin(concat(p·f, p·f)) · attention_factor,
f the inverse frequencies, optionally rescaled: linear (Chen et al. 2023), dynamic NTK (recomputed from the batch's
largest position when it exceeds the trained length), llama3 (Llama 3.1 wavelength-banded), YaRN (Peng et al. 2023,
with its attention factor 0.1 ln(s) + 1). A model may have two RoPEs (Gemma 3: one for its sliding-window layers),
so every function takes the `RopeConfig` to use (default: ``cfg.rope``).
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
    r, dim = rope or cfg.rope, cfg.head_dim
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
    raise AssertionError(r.rope_type)


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
    """cos, sin ``[B, S, H]`` in ``dtype`` for integer positions (dynamic NTK looks at the batch's largest)."""
    r = rope or cfg.rope
    seq_len = jnp.max(positions_BS) + 1 if r.rope_type == "dynamic" else None
    inv_freq, attention_factor = rope_frequencies(cfg, seq_len, r)
    freqs_BSh = positions_BS.astype(jnp.float32)[..., None] * inv_freq
    emb_BSH = jnp.concatenate([freqs_BSh, freqs_BSh], axis=-1)
    return (jnp.cos(emb_BSH) * attention_factor).astype(dtype), (jnp.sin(emb_BSH) * attention_factor).astype(dtype)


def apply_rope(x_BSNH: jax.Array, cos_BSH: jax.Array, sin_BSH: jax.Array) -> jax.Array:
    half = x_BSNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BSNH[..., half:], x_BSNH[..., :half]], axis=-1)
    return x_BSNH * cos_BSH[:, :, None, :] + rotated * sin_BSH[:, :, None, :]


_apply_rope = apply_rope  # the older name


def rope_tables(cfg: ModelConfig, positions_BS: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[R, B, S, H]``: one table per RoPE of the model (`ModelConfig.layer_ropes` indexes them)."""
    tables = [rope_cos_sin(cfg, positions_BS, dtype, r) for r in (cfg.rope, cfg.rope_local) if r is not None]
    return jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables])
