"""Blockwise 4-bit quantization (NF4 / FP4) with double quantization, bit-compatible with bitsandbytes.

Math (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023, sec. 3):

A weight W (any shape, dtype bf16/fp16/fp32) is flattened row-major into n values and cut into blocks of B
values (the last block may be partial). For block b

    absmax_b = max_i |w_i|,      s_i = clip(w_i * (1 / absmax_b), -1, 1),      code_i = nearest(s_i, Q)

where Q is the 16-entry NF4 or FP4 codebook. "Nearest" is decided against the float32 midpoints of adjacent
(sorted) codebook entries, a value on a midpoint taking the lower entry; this is what bitsandbytes does on every
backend. Two codes share a byte, the even element in the high nibble. Dequantization is w_i ≈ Q[code_i] * absmax_b,
computed in float32 and rounded once to the output dtype.

Double quantization compresses the float32 absmax vector a (one value per block):

    c = mean(a),     a' = a - c,     blocks of 256: m_k = max |a'_j|,     q_j = nearest(a'_j * (1 / m_k), D)

with D the 256-entry signed dynamic 8-bit map, every block scaled by the float32 reciprocal (the partial last one
too). "Nearest" is bitsandbytes' CUDA kernel's rule (``kQuantizeBlockwise`` / ``dQuantize<0>``), exactly: the
boundary between D[j] and D[j+1] is their float32 midpoint, a value on it taking the even index. That is the exact
nearest entry but on those ulp-wide boundaries, and tests/dq_cuda_oracle.py (a numpy emulation of the
kernel) is its oracle. bitsandbytes 0.50's CPU kernel approximates the search and disagrees on ~0.03-0.25% of
entries (measured there). Storage per parameter:
4 bits + 32/B bits of absmax (0.5 for B=64), or 4 + 8/B + 32/(256·B) bits with double quantization (≈0.127).

Conventions and where they differ from bitsandbytes:
- The last partial block is scaled by a true division (as bitsandbytes' CPU/default backend does); full blocks by
  the reciprocal. All-zero blocks store absmax 0 and code for 0 (NF4 code 7, FP4 code 0), as on bitsandbytes' CPU
  backend; its CUDA kernel may pick another code for such blocks, with the same dequantized value 0.
- The double-quantization offset c is the float32 mean computed by XLA; bitsandbytes uses torch's float32 mean.
  They can differ in the last bit, which is why nested codes are compared by agreement rate, not byte for byte.
- Subnormal float32 inputs (|w| < 1.2e-38) count as zero: XLA flushes denormals on CPU. bitsandbytes keeps them,
  so a block whose absmax is itself subnormal can code differently. Real checkpoints do not contain such blocks.
- NaN or Inf in a weight raises ValueError (bitsandbytes silently produces garbage). Under `jax.jit` the check
  cannot raise; non-finite blocks then dequantize to NaN rather than to plausible numbers.

Everything here is a pure function of arrays; `quantize` and `dequantize` are jit-able, and `QuantizedTensor` is a
pytree whose array leaves may carry leading batch axes (stacked layers) that `dequantize` maps over.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

QUANT_TYPES = ("nf4", "fp4")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZE = 256
DTYPES = ("bfloat16", "float16", "float32")
# Floor of absmax before taking its reciprocal, so an all-zero block scales to 0. bitsandbytes uses 1e-38, a float32
# subnormal that XLA flushes to zero on CPU (1 / 0 = inf, 0 · inf = NaN); the smallest normal float32 is the same
# floor for every block whose absmax is a normal number.
_ABSMAX_FLOOR = np.float32(np.finfo(np.float32).tiny)


def _load_codebooks() -> dict[str, np.ndarray]:
    books: dict[str, list[tuple[int, np.float32]]] = {}
    text = (Path(__file__).resolve().parent / "codebooks.txt").read_text()  # (beside this file, from any cwd)
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, index, bits, _ = line.split()
        value = np.frombuffer(bytes.fromhex(bits)[::-1], dtype=np.float32)[0]
        books.setdefault(name, []).append((int(index), value))
    out = {}
    for name, entries in books.items():
        entries.sort()
        assert [i for i, _ in entries] == list(range(len(entries))), name
        out[name] = np.array([v for _, v in entries], dtype=np.float32)
    return out


CODEBOOKS: dict[str, np.ndarray] = _load_codebooks()
"""float32 codebooks by name: ``nf4`` and ``fp4`` (16 entries, index = code), ``dynamic8`` (256 entries)."""


def codebook(quant_type: str) -> np.ndarray:
    """The 16-entry float32 codebook of ``nf4`` or ``fp4`` (index = 4-bit code)."""
    _check_quant_type(quant_type)
    return CODEBOOKS[quant_type]


@functools.cache
def _thresholds_4bit(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Float32 midpoints between sorted codebook entries, and the code of each sorted position."""
    book = CODEBOOKS[quant_type]
    order = np.argsort(book, kind="stable").astype(np.uint8)
    ordered = book[order]
    mids = (ordered[:-1] + ordered[1:]) / np.float32(2)  # float32 arithmetic, as bitsandbytes
    return mids.astype(np.float32), order


@functools.cache
def _thresholds_cuda(name: str) -> np.ndarray:
    """bitsandbytes' CUDA rule (``dQuantize<0>``) as thresholds t_j, for float32 x: x > t_j  ⇔  x takes entry j+1
    over entry j. The boundary is the float32 midpoint m_j = fl(D[j] + D[j+1]) · 0.5, and a value on it takes the
    even index of the two (the kernel's binary search lands on even indices and keeps the landing entry on a tie):
    t_j = m_j for even j, the float32 just below m_j for odd j."""
    book = CODEBOOKS[name]
    assert np.all(np.diff(book) > 0), name
    t = ((book[:-1] + book[1:]) * np.float32(0.5)).astype(np.float32)  # float32 arithmetic, as the kernel
    odd = np.arange(t.size) % 2 == 1
    t[odd] = np.nextafter(t[odd], np.float32(-np.inf))
    return t


# ----------------------------------------------------------------------------------------------------------------
# The pytree


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A 4-bit blockwise-quantized tensor in bitsandbytes' layout.

    Array fields (each may have the same extra leading axes, e.g. a stack of layers):
      codes:          uint8 [ceil(n / 2)], two 4-bit codes per byte, even element in the high nibble.
      absmax:         float32 [n_blocks], or uint8 [n_blocks] (dynamic-map codes) with double quantization.
      nested_absmax:  float32 [ceil(n_blocks / 256)] with double quantization, else None.
      offset:         float32 [] with double quantization (the mean subtracted before it), else None.
    Static fields: the original ``shape`` and ``dtype`` name, ``block_size``, ``quant_type``.
    """

    codes: Any
    absmax: Any
    nested_absmax: Any
    offset: Any
    shape: tuple[int, ...]
    dtype: str
    block_size: int
    quant_type: str

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_blocks(self) -> int:
        return -(-self.size // self.block_size)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-1])

    def nbytes(self) -> int:
        """Bytes of storage (codes + scales), all leading axes included."""
        leaves = [self.codes, self.absmax, self.nested_absmax, self.offset]
        return int(sum(np.prod(a.shape, dtype=np.int64) * np.dtype(a.dtype).itemsize for a in leaves if a is not None))

    def tree_flatten(self):
        return (self.codes, self.absmax, self.nested_absmax, self.offset), (
            self.shape,
            self.dtype,
            self.block_size,
            self.quant_type,
        )

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def __repr__(self) -> str:
        dq = "+dq" if self.double_quant else ""
        batch = f"batch={self.batch_shape}, " if self.batch_shape else ""
        return f"QuantizedTensor({self.quant_type}{dq}, {batch}shape={self.shape}, dtype={self.dtype}, block={self.block_size})"


# ----------------------------------------------------------------------------------------------------------------
# Checks at the boundary


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unsupported quant type {quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")


def _check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"unsupported block size {block_size!r}: expected one of {BLOCK_SIZES}")


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return name


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


# ----------------------------------------------------------------------------------------------------------------
# Quantize / dequantize


def _blockwise_scale(x_N: jax.Array, block_size: int, divide_last: bool = True) -> tuple[jax.Array, jax.Array]:
    """float32 [n] → (scaled values in [-1, 1] as [n_blocks, block_size] padded with 0, absmax [n_blocks]);
    ``divide_last``: a partial last block is divided by its absmax (else scaled by the reciprocal like the rest)."""
    n = x_N.shape[0]
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    x_KB = jnp.pad(x_N, (0, pad)).reshape(n_blocks, block_size)
    absmax_K = jnp.max(jnp.abs(x_KB), axis=1)
    # A block holding NaN/Inf gets absmax NaN, so it dequantizes to NaN (XLA's max need not propagate NaN).
    absmax_K = jnp.where(jnp.all(jnp.isfinite(x_KB), axis=1), absmax_K, jnp.nan)
    safe_K = jnp.maximum(absmax_K, _ABSMAX_FLOOR)
    scaled_KB = x_KB * (jnp.float32(1) / safe_K)[:, None]
    if pad and divide_last:  # bitsandbytes' CPU kernel divides the partial last block (not times the reciprocal)
        # (the barrier stops XLA from rewriting x / broadcast(a) into x * (1 / a), which rounds differently)
        divisor_B = jax.lax.optimization_barrier(jnp.broadcast_to(safe_K[-1], (block_size,)))
        scaled_KB = scaled_KB.at[-1].set(x_KB[-1] / divisor_B)
    return jnp.clip(scaled_KB, -1.0, 1.0), absmax_K


def _nearest(scaled: jax.Array, thresholds: np.ndarray) -> jax.Array:
    """Index of the first threshold ≥ x, i.e. the number of thresholds below x (ties go to the lower entry)."""
    if len(thresholds) <= 16:
        t = jnp.asarray(thresholds)
        return jnp.sum(scaled[..., None] > t, axis=-1, dtype=jnp.int32)
    return jnp.searchsorted(jnp.asarray(thresholds), scaled, side="left").astype(jnp.int32)


def _pack_nibbles(codes_N: jax.Array) -> jax.Array:
    codes_N = codes_N.astype(jnp.uint8)
    if codes_N.shape[0] % 2:
        codes_N = jnp.pad(codes_N, (0, 1))
    pairs = codes_N.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def _unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
    # one broadcast shift (high nibble first), not a stack of two arrays: on a GPU XLA fuses it into the codebook
    # lookup, where a stack (a concatenate) was written out as a u8 copy of the kernel first
    shifts = jnp.asarray([4, 0], packed.dtype)
    return ((packed[..., None] >> shifts) & 0xF).reshape(*packed.shape[:-1], -1)[..., :n]


def double_quantize(absmax_K: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(uint8 codes [K], nested absmax [ceil(K / 256)], offset) of float32 block scales, by the CUDA rule."""
    offset = jnp.mean(absmax_K)  # (XLA: the float32 sum times the float32 1/K)
    # Centre by the stored float32 offset: XLA's CPU backend repeats the mean's multiply in each fusion that uses it,
    # and there contracts it with the subtraction into one fused multiply-add (one rounding fewer: nested absmax
    # one ulp off, measured). A select between the two keeps them apart; it changes no finite value.
    offset = jnp.where(jnp.isfinite(offset), offset, jnp.float32(jnp.nan))
    scaled_MB, nested_M = _blockwise_scale(absmax_K - offset, NESTED_BLOCK_SIZE, divide_last=False)
    q = _nearest(scaled_MB, _thresholds_cuda("dynamic8")).reshape(-1)[: absmax_K.shape[0]]
    return q.astype(jnp.uint8), nested_M, offset


def _double_dequantize(q_K: jax.Array, nested_M: jax.Array, offset: jax.Array) -> jax.Array:
    n = q_K.shape[0]
    values = jnp.asarray(CODEBOOKS["dynamic8"])[q_K.astype(jnp.int32)]
    pad = nested_M.shape[0] * NESTED_BLOCK_SIZE - n
    scaled = (jnp.pad(values, (0, pad)).reshape(-1, NESTED_BLOCK_SIZE) * nested_M[:, None]).reshape(-1)[:n]
    # Keep the product and the sum as two roundings (bitsandbytes does); a fused multiply-add would differ.
    return jax.lax.optimization_barrier(scaled) + offset


def quantize(
    x: jax.Array | np.ndarray,
    quant_type: str = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool = True,
) -> QuantizedTensor:
    """Quantize ``x`` (bf16/fp16/fp32, any shape) to 4 bits in bitsandbytes' layout.

    Raises ValueError for an unsupported quant type, block size or dtype, an empty tensor, or (outside jit) NaN/Inf.
    """
    _check_quant_type(quant_type)
    _check_block_size(block_size)
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    dtype = _dtype_name(x.dtype)
    shape = tuple(int(d) for d in x.shape)
    if int(np.prod(shape, dtype=np.int64)) == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {shape})")
    codes, absmax, nested, offset, n_bad = _quantize_jit(jnp.asarray(x), quant_type, block_size, double_quant)
    if not _is_traced(n_bad) and int(n_bad):
        flat = np.asarray(jnp.asarray(x).reshape(-1), dtype=np.float32)
        bad = ~np.isfinite(flat)
        first = int(np.argmax(bad))
        index = tuple(int(i) for i in np.unravel_index(first, shape))
        raise ValueError(
            f"cannot quantize a tensor with non-finite values: {int(bad.sum())} NaN/Inf of {flat.size}, "
            f"first {flat[first]} at index {index}"
        )
    return QuantizedTensor(codes, absmax, nested, offset, shape, dtype, block_size, quant_type)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_jit(x, quant_type: str, block_size: int, double_quant: bool):
    x_N = x.reshape(-1).astype(jnp.float32)
    scaled_KB, absmax_K = _blockwise_scale(x_N, block_size)
    mids, order = _thresholds_4bit(quant_type)
    n = x_N.shape[0]
    # An odd count leaves half a byte: bitsandbytes fills it with the code of 0.0 (the block padding is 0.0).
    index = _nearest(scaled_KB, mids).reshape(-1)[: n + n % 2]
    codes = jnp.asarray(order)[index] if quant_type != "nf4" else index
    packed = _pack_nibbles(codes)
    n_bad = jnp.sum(~jnp.isfinite(x_N), dtype=jnp.int32)  # (a max-reduction need not propagate NaN, so count)
    if not double_quant:
        return packed, absmax_K, None, None, n_bad
    q_K, nested_M, offset = double_quantize(absmax_K)
    return packed, q_K, nested_M, offset, n_bad


def block_absmax(q: QuantizedTensor) -> jax.Array:
    """The float32 per-block scales (dequantizing the nested 8-bit codes when double-quantized)."""
    if q.codes.ndim > 1:
        return jax.vmap(block_absmax)(q)
    if not q.double_quant:
        return q.absmax
    return _double_dequantize(q.absmax, q.nested_absmax, q.offset)


def dequantize(q: QuantizedTensor, dtype: Any = None) -> jax.Array:
    """float32 Q[code] * absmax, rounded once to ``dtype`` (default: the original dtype); shape ``batch + shape``."""
    out_dtype = jnp.dtype(_dtype_name(dtype if dtype is not None else q.dtype))
    if q.codes.ndim > 1:
        return jax.vmap(lambda t: dequantize(t, out_dtype))(q)
    n, bs = q.size, q.block_size
    absmax_K = block_absmax(q)
    with jax.named_scope("dequantize_codes"):  # the codebook lookup: what tests/test_perf.py counts in compiled HLO
        values_N = jnp.asarray(CODEBOOKS[q.quant_type])[_unpack_nibbles(q.codes, n).astype(jnp.int32)]
    n_blocks = absmax_K.shape[0]
    if n == n_blocks * bs:
        out = values_N.reshape(n_blocks, bs) * absmax_K[:, None]
    else:
        out = jnp.pad(values_N, (0, n_blocks * bs - n)).reshape(n_blocks, bs) * absmax_K[:, None]
    return out.reshape(-1)[:n].reshape(q.shape).astype(out_dtype)


def stack(tensors: list[QuantizedTensor]) -> QuantizedTensor:
    """Stack same-shaped quantized tensors along a new leading axis (e.g. one per layer)."""
    first = tensors[0]
    for i, t in enumerate(tensors):
        if jax.tree_util.tree_structure(t) != jax.tree_util.tree_structure(first):
            raise ValueError(f"cannot stack quantized tensor {i} ({t!r}) with tensor 0 ({first!r})")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *tensors)


def bits_per_parameter(quant_type: str = "nf4", block_size: int = 64, double_quant: bool = True) -> float:
    """Storage bits per weight of the layout (asymptotic: large tensors, ignoring the tiny constant codebooks)."""
    _check_quant_type(quant_type)
    _check_block_size(block_size)
    if double_quant:
        return 4 + 8 / block_size + 32 / (NESTED_BLOCK_SIZE * block_size) + 0.0
    return 4 + 32 / block_size


def dequantize_rows(q: QuantizedTensor, rows: jax.Array, dtype: Any = None) -> jax.Array:
    """Rows ``rows`` (int array, any shape R) of a quantized matrix ``[V, D]``, dequantized: ``[*R, D]`` equal to
    ``dequantize(q, dtype)[rows]`` bit for bit, reading only those rows' codes and scales (an embedding lookup, or
    a block of lm_head rows). Needs D to be a multiple of the block size, so that every row is whole blocks."""
    V, D = q.shape if len(q.shape) == 2 else (None, None)
    if V is None or q.batch_shape or D % q.block_size:
        raise ValueError(f"dequantize_rows needs an unstacked [V, D] tensor with D a multiple of the block size "
                         f"{q.block_size}; got {q!r}")
    out_dtype = jnp.dtype(_dtype_name(dtype if dtype is not None else q.dtype))
    per_row = D // q.block_size  # blocks per row
    rows = jnp.asarray(rows, jnp.int32)
    codes_RH = jnp.take(q.codes.reshape(V, D // 2), rows, axis=0)  # (H = D / 2 bytes a row)
    scales_RK = jnp.take(q.absmax.reshape(V, per_row), rows, axis=0)
    if q.double_quant:  # the same two roundings as _double_dequantize, on the gathered blocks only
        block_RK = rows[..., None] * per_row + jnp.arange(per_row, dtype=jnp.int32)
        nested_RK = jnp.take(q.nested_absmax, block_RK // NESTED_BLOCK_SIZE, axis=0)
        scaled = jnp.asarray(CODEBOOKS["dynamic8"])[scales_RK.astype(jnp.int32)] * nested_RK
        scales_RK = jax.lax.optimization_barrier(scaled) + q.offset
    with jax.named_scope("dequantize_codes"):
        values_RD = jnp.asarray(CODEBOOKS[q.quant_type])[_unpack_nibbles(codes_RH, D).astype(jnp.int32)]
    values_RKB = values_RD.reshape(*rows.shape, per_row, q.block_size) * scales_RK[..., None]
    return values_RKB.reshape(*rows.shape, D).astype(out_dtype)


def dequantize_block(q: QuantizedTensor, row0: jax.Array, rows: int, col0: jax.Array, cols: int,
                     dtype: Any = None, layer: jax.Array | None = None) -> jax.Array:
    """The tile ``[row0 : row0 + rows, col0 : col0 + cols]`` of a quantized matrix ``[O, I]``, dequantized, equal to
    the same slice of ``dequantize(q, dtype)`` bit for bit, reading only the tile's codes and scales. ``rows`` /
    ``cols`` are static; I, ``cols`` and ``col0`` are multiples of the block size (each tile row is whole blocks).
    ``layer``: ``q`` is a stack ``[L]`` of such matrices and the tile is read from matrix ``layer`` (no copy of that
    matrix's codes is made first)."""
    if layer is not None:
        if len(q.batch_shape) != 1:
            raise ValueError(f"dequantize_block(layer=) needs a stack of matrices; got {q!r}")
        q = QuantizedTensor(q.codes, q.absmax, None if q.nested_absmax is None else
                            jnp.take(q.nested_absmax, layer, axis=0)[None],
                            None if q.offset is None else jnp.take(q.offset, layer, axis=0)[None],
                            q.shape, q.dtype, q.block_size, q.quant_type)
    L = q.batch_shape[0] if layer is not None else None
    if len(q.shape) != 2 or (q.batch_shape and layer is None) or q.shape[1] % q.block_size or cols % q.block_size:
        raise ValueError(f"dequantize_block needs an unstacked [O, I] tensor and a tile of whole blocks "
                         f"({q.block_size}); got {q!r}, {rows} x {cols}")
    O, I = q.shape
    bs, per_row = q.block_size, q.shape[1] // q.block_size
    out_dtype = jnp.dtype(_dtype_name(dtype if dtype is not None else q.dtype))
    row0, col0 = jnp.asarray(row0, jnp.int32), jnp.asarray(col0, jnp.int32)
    if layer is None:
        codes = jax.lax.dynamic_slice(q.codes.reshape(O, I // 2), (row0, col0 // 2), (rows, cols // 2))
        scales = jax.lax.dynamic_slice(q.absmax.reshape(O, per_row), (row0, col0 // bs), (rows, cols // bs))
    else:
        at = jnp.asarray(layer, jnp.int32)
        codes = jax.lax.dynamic_slice(q.codes.reshape(L, O, I // 2), (at, row0, col0 // 2), (1, rows, cols // 2))[0]
        scales = jax.lax.dynamic_slice(q.absmax.reshape(L, O, per_row), (at, row0, col0 // bs),
                                       (1, rows, cols // bs))[0]
        q = QuantizedTensor(None, None, None if q.nested_absmax is None else q.nested_absmax[0],
                            None if q.offset is None else q.offset[0], q.shape, q.dtype, q.block_size, q.quant_type)
    if q.double_quant:  # the same two roundings as _double_dequantize, on the tile's blocks only
        block = ((row0 + jnp.arange(rows, dtype=jnp.int32))[:, None] * per_row + col0 // bs
                 + jnp.arange(cols // bs, dtype=jnp.int32)[None, :])
        nested = jnp.take(q.nested_absmax, block // NESTED_BLOCK_SIZE, axis=0)
        scaled = jnp.asarray(CODEBOOKS["dynamic8"])[scales.astype(jnp.int32)] * nested
        scales = jax.lax.optimization_barrier(scaled) + q.offset
    with jax.named_scope("dequantize_codes"):
        values = jnp.asarray(CODEBOOKS[q.quant_type])[_unpack_nibbles(codes, cols).astype(jnp.int32)]
    return (values.reshape(rows, cols // bs, bs) * scales[..., None]).reshape(rows, cols).astype(out_dtype)
