"""bitsandbytes' dynamic 8-bit maps and blockwise 8-bit (de)quantization with them (the 8-bit optimizer states).

Dynamic map (Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", 2016; bitsandbytes'
``create_dynamic_map``): for exponent i = 0..6, the midpoints of an evenly spaced grid of 2^i + 1 (signed) or
2^(i+1) + 1 (unsigned) float32 points on [0.1, 1], times 10^(i-6); the signed map adds their negatives; both add 0
and 1 and are sorted: 256 entries, strictly increasing. Generated here in float32 the way torch computes it
(``torch.linspace`` is a fused multiply-add from the nearer end, the product by 10^(i-6) a float32 multiply), so the
map is bit-identical to bitsandbytes' (tests/quant/test_dynamic.py); the signed map is `CODEBOOKS["dynamic8"]`.

Blockwise 8-bit (bitsandbytes' ``quantize_blockwise``, block B = 256 for the optimizers): x is flattened, cut into
blocks, each scaled by its absmax into [-1, 1] (times the reciprocal; the partial last block divided, as in
`jqlora.quant.blockwise`) and coded to the nearest map entry (the float32 midpoint between two entries goes to the
lower one). Dequantization is map[code] · absmax in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.quant.blockwise import _blockwise_scale, _nearest

OPTIMIZER_BLOCK = 256  # bitsandbytes' block for blockwise 8-bit optimizer states


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=float32)``: start + step·i for the first half, end - step·(n-1-i) for
    the rest, each one rounding of an exact product and sum (a fused multiply-add)."""
    a, b = np.float32(start), np.float32(end)
    step = np.float32((b - a) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    low = (np.float64(a) + np.float64(step) * i).astype(np.float32)
    high = (np.float64(b) - np.float64(step) * (n - 1 - i)).astype(np.float32)
    return np.where(np.arange(n) < n // 2, low, high)


@functools.cache
def dynamic_map(signed: bool = True) -> np.ndarray:
    """The 256-entry float32 dynamic map (bitsandbytes' ``create_dynamic_map(signed)``, 7 exponent bits)."""
    values: list[np.ndarray] = []
    for i in range(7):
        grid = _linspace_f32(0.1, 1.0, (2 ** i if signed else 2 ** (i + 1)) + 1)
        means = ((grid[:-1] + grid[1:]) / np.float32(2)).astype(np.float32)
        scale = np.float32(10.0 ** (i - 6))
        values.append((scale * means).astype(np.float32))
        if signed:
            values.append((-scale * means).astype(np.float32))
    out = np.sort(np.concatenate([*values, np.array([0.0, 1.0], np.float32)]))
    assert out.shape == (256,) and np.all(np.diff(out) > 0), out.shape
    return out


@functools.cache
def _midpoints(signed: bool) -> np.ndarray:
    book = dynamic_map(signed)
    return ((book[:-1] + book[1:]) * np.float32(0.5)).astype(np.float32)


def quantize_dynamic(x: jax.Array, signed: bool, block_size: int = OPTIMIZER_BLOCK) -> tuple[jax.Array, jax.Array]:
    """(uint8 codes shaped like ``x``, float32 absmax [ceil(n / block_size)]) of ``x`` (jit-able)."""
    x_N = x.reshape(-1).astype(jnp.float32)
    scaled_KB, absmax_K = _blockwise_scale(x_N, block_size)
    codes = _nearest(scaled_KB, _midpoints(signed)).reshape(-1)[: x_N.shape[0]]
    return codes.astype(jnp.uint8).reshape(x.shape), absmax_K


def dequantize_dynamic(codes: jax.Array, absmax_K: jax.Array, signed: bool,
                       block_size: int = OPTIMIZER_BLOCK) -> jax.Array:
    """float32 map[codes] · absmax of their block, shaped like ``codes``."""
    n = int(np.prod(codes.shape, dtype=np.int64))
    values = jnp.asarray(dynamic_map(signed))[codes.reshape(-1).astype(jnp.int32)]
    pad = absmax_K.shape[0] * block_size - n
    blocks = jnp.pad(values, (0, pad)).reshape(-1, block_size) * absmax_K[:, None]
    return blocks.reshape(-1)[:n].reshape(codes.shape)
