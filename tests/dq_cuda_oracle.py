"""An emulation of bitsandbytes' CUDA double quantization, in numpy: the oracle for jqlora's nested 8-bit scale codes.

What GPU users of bitsandbytes get with ``compress_statistics=True`` (``bnb_4bit_use_double_quant``): the float32
block absmax values a of the 4-bit step, centred by their mean c, are quantized again with the signed dynamic 8-bit
map D (256 sorted entries, D[0] = -1, D[255] = 1) by the CUDA kernel ``kQuantizeBlockwise`` in blocks of 256
(bitsandbytes' csrc/kernels.cu; written here from reading that source, not translated from it):

    per block k of 256 values v = a - c:   m_k = max |v|  (float32),   r = 1 / m_k  (float32),
                                           x = v · r      (one float32 multiply, in every block, the last one too)
    code = dQuantize<0>(D, x):  a binary search over D that starts at index 127 and moves ±64, ±32, ..., ±1
    (stepping right while x > D[pivot]), remembering the last index passed on either side (the virtual bounds are
    0 and 255, read from D at the end); then x is compared with the float32 midpoint (D[pivot] + D[side]) · 0.5 of
    the landing entry and the bound on x's side: strictly past it takes the bound, else the landing entry.

Every step is float32 arithmetic, which numpy reproduces bit for bit (IEEE-754, round to nearest), except one:
bitsandbytes builds its kernels with ``--use_fast_math``, so the GPU's ``1 / m`` is the hardware's approximate
reciprocal (within one unit in the last place), emulated here by the correctly rounded one. That can change a code
only for an x within a few float32 ulps of a midpoint. The mean c is an input: torch's float32 mean on a GPU
reduces in an order of its own, and callers compare nested codes given the same c.

bitsandbytes' CPU kernel (what ``bitsandbytes.functional`` runs without a GPU) approximates this search and picks
another code for a small share of values; tests/quant/test_dq_cuda_oracle.py measures that share. (tests/tiny.py `nf4_dq_float64` uses it too.)
"""

from __future__ import annotations

import numpy as np

NESTED = 256
_F32 = np.float32


def dquantize(x: np.ndarray, code: np.ndarray) -> np.ndarray:
    """The dynamic-map code of each float32 ``x`` as the CUDA ``dQuantize<0>`` picks it (uint8, shape of x)."""
    code = np.asarray(code, _F32)
    assert code.shape == (256,) and np.all(np.diff(code) > 0)
    x = np.asarray(x, _F32)
    pivot = np.full(x.shape, 127, np.int64)
    below_i = np.zeros(x.shape, np.int64)  # the last index passed going right (x above it) ...
    above_i = np.full(x.shape, 255, np.int64)  # ... and going left (x at or below it)
    below, above = np.full(x.shape, _F32(-1)), np.full(x.shape, _F32(1))
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = x > val
        below_i, below = np.where(right, pivot, below_i), np.where(right, val, below)
        above_i, above = np.where(right, above_i, pivot), np.where(right, above, val)
        pivot = np.where(right, pivot + step, pivot - step)
        val = code[pivot]
    above = np.where(above_i == 255, code[255], above)  # (the virtual bounds read their entries)
    below = np.where(below_i == 0, code[0], below)
    mid_up = (above + val) * _F32(0.5)  # float32 sum, then an exact halving
    mid_down = (below + val) * _F32(0.5)
    assert mid_up.dtype == _F32 and mid_down.dtype == _F32
    right = x > val
    out = np.where(right, np.where(x > mid_up, above_i, pivot), np.where(x < mid_down, below_i, pivot))
    return out.astype(np.uint8)


def quantize_blockwise(values: np.ndarray, code: np.ndarray, blocksize: int = NESTED) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """``kQuantizeBlockwise`` on float32 ``values`` (flat): (uint8 codes [n], float32 block absmax [ceil(n / bs)])."""
    v = np.asarray(values, _F32).reshape(-1)
    n = v.size
    blocks = -(-n // blocksize)
    padded = np.zeros(blocks * blocksize, _F32)
    padded[:n] = v
    vb = padded.reshape(blocks, blocksize)
    absmax = np.max(np.abs(vb), axis=1)  # (the zero padding never raises a max of |v|)
    with np.errstate(divide="ignore"):
        recip = _F32(1) / absmax  # float32 reciprocal, used for every block (the partial last one too)
    with np.errstate(invalid="ignore"):
        x = vb * recip[:, None]
    assert x.dtype == _F32
    return dquantize(x, code).reshape(-1)[:n], absmax


def double_quantize(absmax: np.ndarray, offset: np.float32, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CUDA double quantization of the float32 4-bit block scales ``absmax`` given the mean ``offset``:
    (uint8 nested codes [n_blocks], float32 nested absmax [ceil(n_blocks / 256)])."""
    centred = np.asarray(absmax, _F32) - _F32(offset)  # float32 subtraction, as torch does it
    return quantize_blockwise(centred, code, NESTED)


def nearest_float64(x: np.ndarray, code: np.ndarray) -> np.ndarray:
    """The entry of ``code`` nearest each ``x`` in float64 (the first of two equidistant ones)."""
    book = np.asarray(code, np.float64)
    return np.argmin(np.abs(np.asarray(x, np.float64)[..., None] - book), axis=-1).astype(np.uint8)
