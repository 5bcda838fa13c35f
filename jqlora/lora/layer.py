"""LoRA over a frozen, possibly 4-bit quantized, dense kernel (QLoRA).

Math (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021; Dettmers et al., "QLoRA", 2023;
Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023 for rsLoRA):

    y = x · Wᵀ (+ b)  +  s · ((dropout(x) · A) · B),      s = alpha / r   (alpha / √r with rsLoRA)

W is the frozen base kernel in Hugging Face / bitsandbytes layout ``[out, in]``; with quantization it is stored as
NF4/FP4 codes and block scales (``jqlora.quant``) and dequantized to the compute dtype inside the call. A ``[in, r]``
starts as peft does (``kaiming_uniform_(a=√5)`` on its ``[r, in]`` weight, i.e. U(±1/√in)) and B ``[r, out]`` at 0,
so a fresh adapter leaves the base model unchanged. peft stores the transposes (``lora_A.weight`` ``[r, in]``,
``lora_B.weight`` ``[out, r]``); export transposes.

Per-layer ranks and alphas (``rank_pattern`` / ``alpha_pattern`` keys naming one layer's module, e.g.
``model.layers.3.self_attn.q_proj``, and ``layers_to_transform``): layers are stacked and scanned, so a module kind
whose rank differs between layers is stored at the largest rank R with a frozen 0/1 mask ``[L, R]`` (1 on the first
r_l columns) and a frozen per-layer scaling ``[L]`` (s_l = alpha_l / r_l; 0 and an all-zero mask on a layer that is
not transformed)::

    y = x · Wᵀ + s_l · (((dropout(x) · A) ⊙ m_l) · B)

The masked columns of A and rows of B start at 0 and get exactly 0 gradient, so Adam's moments stay 0 and weight decay
keeps them 0: the math of a rank-r_l adapter in every layer. Only module kinds that differ between layers get the
mask / scaling; the uniform case is unchanged.

Variables: adapters are ``nnx.LoRAParam`` (the only thing trained); every frozen array is a ``Frozen`` variable
(not an ``nnx.Param``), and quantized data its subclass ``QuantData``, so ``nnx.state(model, nnx.LoRAParam)`` selects
exactly the adapters and nothing frozen can get a gradient or optimizer state.

Shape letters: B batch, S sequence, I in features, O out features, R LoRA rank.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jqlora import quant as q
from jqlora.lora import dora
from jqlora.lora.spec import LoraSpec

FROZEN_MATMUL = "frozen_matmul"  # checkpoint name of a quantized kernel's matmul output
QUANTS = ("nf4", "fp4", "none")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


class Frozen(nnx.Variable):
    """A frozen base-model array (embedding, norm, bias, unquantized kernel): never trained, never in an optimizer."""


class QuantData(Frozen):
    """Frozen 4-bit quantized kernel data: packed codes, block scales, nested scales, offset."""


# ----------------------------------------------------------------------------------------------------------------
# Settings (the LoRA ones: jqlora.lora.spec)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How frozen linear kernels are stored: ``nf4`` / ``fp4`` (bitsandbytes blockwise 4-bit) or ``none``."""

    quant: str = "nf4"
    double_quant: bool = True
    block_size: int = 64
    experts: bool = True  # MoE: quantize the fused experts too (False: they stay in the compute dtype)

    def __post_init__(self):
        if self.quant not in QUANTS:
            raise ValueError(f"unsupported quant {self.quant!r}: expected one of {', '.join(QUANTS)}")
        if self.quant != "none" and self.block_size not in q.BLOCK_SIZES:
            raise ValueError(f"unsupported quant block size {self.block_size!r}: expected one of {q.BLOCK_SIZES}")

    def quantizes(self, expert: int | None) -> bool:
        """Whether a linear kernel (an MoE expert's when ``expert`` is not None) is stored 4-bit."""
        return self.enabled and (expert is None or self.experts)

    @property
    def enabled(self) -> bool:
        return self.quant != "none"


def compute_dtype(dtype: Any) -> jnp.dtype:
    """A checked compute dtype from a name or dtype (bfloat16, float16, float32)."""
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    return jnp.dtype(name)


# ----------------------------------------------------------------------------------------------------------------
# The layer


def lora_a_init(key: jax.Array, shape: Sequence[int], in_features: int, dtype: Any = jnp.float32) -> jax.Array:
    """peft's default A init: ``kaiming_uniform_(a=√5)`` on ``[r, in]`` is U(±1/√in), here laid out ``[..., in, r]``."""
    bound = 1.0 / math.sqrt(in_features)
    return jax.random.uniform(key, tuple(shape), dtype=jnp.dtype(dtype), minval=-bound, maxval=bound)


class LoraLinear(nnx.Module):
    """``y = x Wᵀ (+ b) + s (dropout(x) A) B`` with a frozen (optionally 4-bit) kernel ``W [out, in]``.

    Variables: ``weight`` (Frozen ``[O, I]``) when unquantized, else ``codes`` / ``absmax`` (/ ``nested_absmax`` /
    ``offset`` with double quantization) as QuantData plus plain attributes ``quant_shape``, ``quant_dtype``,
    ``block_size``, ``quant_type``; ``bias`` (Frozen ``[O]``) if ``use_bias``; ``lora_a`` ``[I, R]`` and ``lora_b``
    ``[R, O]`` (nnx.LoRAParam in ``param_dtype``) if ``lora`` is given, and ``magnitude`` ``[O]`` (nnx.LoRAParam)
    with DoRA (``lora.dora``; `jqlora.lora.dora`). Arrays may carry leading axes (stacked layers). A per-layer spec
    (``lora.per_layer``) adds Frozen ``lora_scale`` (``[L]`` stacked) and, where ranks differ, ``lora_mask``
    (``[L, R]``), filled by `set_layer_values` once the layers are stacked.
    """

    tile_bytes = 0  # > 0 (train.memory=min): the quantized kernel is dequantized this many bytes at a time
    layer_index = None  # train.memory=min: Frozen int32 [L], each stacked layer's index (set by the decoder)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        lora: LoraSpec | None = None,
        quant: QuantSpec = QuantSpec("none"),
        use_bias: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = compute_dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.spec = lora
        self.quant = quant
        # A random base kernel (HF's normal(0, 0.02) init); real weights are loaded over it.
        w_OI = 0.02 * jax.random.normal(rngs.params(), (out_features, in_features), jnp.float32)
        if quant.enabled:
            self.set_quantized(q.quantize(w_OI.astype(self.dtype), quant.quant, block_size=quant.block_size,
                                          double_quant=quant.double_quant))
        else:
            self.weight = Frozen(w_OI.astype(self.dtype))
        self.bias = Frozen(jnp.zeros((out_features,), self.dtype)) if use_bias else None
        if lora is not None:
            self.lora_a = nnx.LoRAParam(lora_a_init(rngs.params(), (in_features, lora.r), in_features, param_dtype))
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora.r, out_features), self.param_dtype))
        else:
            self.lora_a = self.lora_b = None
        per_layer = lora is not None and lora.per_layer
        # placeholders (a layer body is built once for all layers): set_layer_values writes each layer's
        self.lora_scale = Frozen(jnp.asarray(lora.scaling, jnp.float32)) if per_layer else None
        self.lora_mask = Frozen(jnp.ones((lora.r,), self.dtype)) if per_layer and lora.masked else None
        if lora is not None and lora.dora:
            self.magnitude = nnx.LoRAParam(jnp.zeros((out_features,), self.param_dtype))
            self.reset_magnitude()
        else:
            self.magnitude = None

    # -- the frozen kernel ------------------------------------------------------------------------------------------

    def set_quantized(self, t: q.QuantizedTensor) -> None:
        """Store ``t`` (possibly stacked) as this layer's kernel; its static fields become plain attributes."""
        if t.shape != (self.out_features, self.in_features):
            raise ValueError(f"quantized kernel shape {t.shape}, expected {(self.out_features, self.in_features)}")
        self.codes = QuantData(t.codes)
        self.absmax = QuantData(t.absmax)
        self.nested_absmax = QuantData(t.nested_absmax) if t.double_quant else None
        self.offset = QuantData(t.offset) if t.double_quant else None
        self.quant_shape = t.shape
        self.quant_dtype = t.dtype
        self.block_size = t.block_size
        self.quant_type = t.quant_type

    def quantized(self) -> q.QuantizedTensor:
        """The kernel as a ``quant.QuantizedTensor`` (array fields keep any leading stacked axes)."""
        nested = self.nested_absmax[...] if self.nested_absmax is not None else None
        offset = self.offset[...] if self.offset is not None else None
        return q.QuantizedTensor(self.codes[...], self.absmax[...], nested, offset, self.quant_shape,
                                 self.quant_dtype, self.block_size, self.quant_type)

    def kernel(self) -> jax.Array:
        """The base kernel ``[..., O, I]`` in the compute dtype (dequantized if quantized)."""
        if self.quant.enabled:
            return q.dequantize(self.quantized(), self.dtype)
        return self.weight[...].astype(self.dtype)

    @property
    def scaling(self) -> float | jax.Array:
        """s; a per-layer adapter's s_l (``[L]`` when stacked, a scalar inside the scanned layer body)."""
        if self.spec is None:
            return 0.0
        return self.lora_scale[...] if self.lora_scale is not None else self.spec.scaling

    def _scaling_for(self, ndim: int) -> float | jax.Array:
        """`scaling` broadcastable against a (possibly stacked) array of ``ndim`` dims whose last 2 are per layer."""
        s = self.scaling
        if isinstance(s, float) or s.ndim == 0:
            return s
        return s.reshape(s.shape + (1,) * (ndim - s.ndim))

    def masked_a(self) -> jax.Array:
        """A ``[..., I, R]`` with a per-layer adapter's unused columns zeroed (A itself otherwise)."""
        a = self.lora_a[...]
        return a if self.lora_mask is None else a * self.lora_mask[...][..., None, :].astype(a.dtype)

    def set_layer_values(self) -> None:
        """Write a per-layer adapter's stacked mask and scaling from its spec, and zero A's / B's unused entries
        (call once the layers are stacked; nothing for a uniform adapter)."""
        if self.lora_scale is None:
            return
        spec = self.spec
        if self.lora_scale.shape != (len(spec.layer_ranks),):
            raise ValueError(f"per-layer LoRA spec for {len(spec.layer_ranks)} layers on an adapter stacked as "
                             f"{self.lora_scale.shape}")
        self.lora_scale.set_value(jnp.asarray(spec.layer_scalings(), jnp.float32))
        if self.lora_mask is not None:
            mask = np.arange(spec.r)[None, :] < np.asarray(spec.layer_ranks)[:, None]
            self.lora_mask.set_value(jnp.asarray(mask, self.dtype))
            self.lora_a.set_value(self.masked_a())
            self.lora_b.set_value(self.lora_b[...] * jnp.asarray(mask, self.param_dtype)[..., :, None])
        self.reset_magnitude()

    def layer_adapter(self, layer: int) -> tuple[np.ndarray, np.ndarray, float]:
        """float32 ``(A [I, r_l], B [r_l, O], s_l)`` of one stacked layer (``r_l`` = 0: the layer is not adapted)."""
        a = np.asarray(self.lora_a[...][layer].astype(jnp.float32))
        b = np.asarray(self.lora_b[...][layer].astype(jnp.float32))
        if not self.spec.per_layer:
            return a, b, float(self.spec.scaling)
        r = self.spec.layer_ranks[layer]
        return a[:, :r], b[:r], float(self.spec.layer_scalings()[layer])

    def merged_kernel(self) -> jax.Array:
        """float32 ``W + s (A B)ᵀ`` ``[..., O, I]``: the kernel a merged Hugging Face checkpoint stores."""
        w = self.kernel().astype(jnp.float32)
        if self.lora_a is None:
            return w
        s = self._scaling_for(w.ndim)
        if self.magnitude is not None:
            return dora.merged_kernel(self.magnitude[...], w, self.masked_a(), self.lora_b[...], s)
        delta_IO = jnp.matmul(self.masked_a().astype(jnp.float32), self.lora_b[...].astype(jnp.float32))
        return w + s * jnp.swapaxes(delta_IO, -1, -2)

    def reset_lora(self, key: jax.Array) -> None:
        """Re-initialize the adapter as peft does (A uniform, B zero), keeping shapes and any stacked axes."""
        if self.lora_a is None:
            return
        self.lora_a.set_value(lora_a_init(key, self.lora_a.shape, self.in_features, self.param_dtype))
        self.lora_a.set_value(self.masked_a())  # (a per-layer adapter's unused columns stay 0)
        self.lora_b.set_value(jnp.zeros(self.lora_b.shape, self.param_dtype))
        self.reset_magnitude()

    def reset_magnitude(self) -> None:
        """DoRA: the magnitude ``‖W + s (A B)ᵀ‖`` per output row of the current kernel and adapter, as peft starts it
        (call again after loading base weights or A / B); nothing without DoRA."""
        if self.magnitude is None:
            return
        w = self.kernel().astype(jnp.float32)
        self.magnitude.set_value(dora.weight_norm(w, self.masked_a(), self.lora_b[...], self._scaling_for(w.ndim))
                                 .astype(self.param_dtype))

    # -- the call ---------------------------------------------------------------------------------------------------

    def __call__(self, x_BSI: jax.Array, *, deterministic: bool = True, key: jax.Array | None = None) -> jax.Array:
        """``x [..., I]`` → ``y [..., O]`` in the compute dtype; ``key`` drives LoRA dropout when not deterministic."""
        x = x_BSI.astype(self.dtype)
        if self.quant.enabled:
            # named so that the remat policies that save matmul outputs can still see this one (a custom_vjp hides
            # the dot inside from dots_saveable)
            if self.tile_bytes:  # train.memory=min: a tile of the kernel dequantized at a time
                t = self.quantized()  # (inside the layer scan: every layer's kernel, read at layer_index)
                layer = self.layer_index[...] if t.batch_shape and self.layer_index is not None else None
                y = tiled_quantized_matmul(x, t, self.dtype, self.tile_bytes, layer)
            else:
                y = quantized_matmul(x, self.quantized(), self.dtype)
            y = checkpoint_name(y, FROZEN_MATMUL)
        else:
            y = _dot_last(x, self.weight[...].astype(self.dtype))
        base = y
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is None:
            return y
        h = x
        if self.spec.dropout > 0.0 and not deterministic:
            if key is None:
                raise ValueError("LoRA dropout needs a PRNG key when deterministic=False")
            keep = jax.random.bernoulli(key, 1.0 - self.spec.dropout, h.shape)
            h = jnp.where(keep, h / jnp.asarray(1.0 - self.spec.dropout, h.dtype), jnp.zeros((), h.dtype))
        a_IR = self.lora_a[...].astype(self.dtype)
        b_RO = self.lora_b[...].astype(self.dtype)
        hA = jnp.matmul(h, a_IR)
        if self.lora_mask is not None:  # per-layer ranks: this layer's unused columns are 0 (and get 0 gradient)
            mask_R = self.lora_mask[...].astype(self.dtype)
            hA = hA * mask_R
            if self.magnitude is not None:
                a_IR = a_IR * mask_R
        delta = jnp.matmul(hA, b_RO)
        if self.magnitude is not None:  # DoRA (jqlora.lora.dora); with dropout the base term sees the dropped input
            w_OI = self.kernel()
            if h is not x:
                base = _dot_last(h, w_OI)
            scale_O = dora.magnitude_scale(self.magnitude[...], w_OI, a_IR, b_RO, self.scaling)
            return y + dora.dora_extra(scale_O, base, delta, self.scaling)
        return y + delta * jnp.asarray(self.scaling, self.dtype)


def _dot_last(x: jax.Array, w_OI: jax.Array) -> jax.Array:
    """``x [..., I] · W [O, I]ᵀ`` → ``[..., O]``."""
    return jax.lax.dot_general(x, w_OI, (((x.ndim - 1,), (1,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def quantized_matmul(x: jax.Array, t: q.QuantizedTensor, dtype: Any) -> jax.Array:
    """``x · dequantize(t)ᵀ`` whose backward keeps the 4-bit kernel, not its dequantized copy (bitsandbytes'
    ``MatMul4Bit`` does the same): the backward matmul dequantizes again. Without this rule autodiff saves the
    dequantized kernel of every layer as a residual when nothing is rematerialized (a full bf16 copy of the model);
    with it every remat policy dequantizes each kernel once in the forward pass and once in the backward pass
    (checked on the compiled HLO in tests/test_lora.py)."""
    return _dot_last(x, q.dequantize(t, dtype))


def _quantized_matmul_fwd(x, t, dtype):
    return quantized_matmul(x, t, dtype), t


def _quantized_matmul_bwd(dtype, t, g):
    w_OI = q.dequantize(t, dtype)
    dx = jax.lax.dot_general(g, w_OI, (((g.ndim - 1,), (0,)), ((), ())))
    return dx, jax.tree.map(lambda _: None, t)  # the frozen kernel gets no cotangent


quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd)


def _tiles(n: int, kernel_bytes: int, tile_bytes: int, unit: int = 1) -> int:
    """The fewest tiles, a divisor of n / unit, that keep one tile of the kernel within ``tile_bytes``."""
    units = n // unit
    for k in range(max(1, -(-kernel_bytes // tile_bytes)), units + 1):
        if units % k == 0:
            return k
    return units


def tiled_quantized_matmul(x: jax.Array, t: q.QuantizedTensor, dtype: Any, tile_bytes: int,
                           layer: jax.Array | None = None) -> jax.Array:
    """`quantized_matmul` that dequantizes at most ``tile_bytes`` of the kernel at a time (train.memory=min), never
    the whole ``[O, I]`` copy: the forward pass walks tiles of output rows, ``y[..., rows] = x · W[rows]ᵀ``, the
    backward tiles of input columns (whole quantization blocks), ``dx[..., cols] = g · W[:, cols]``, each a
    `jax.lax.scan` writing its slice in place. Every output element is the same full-length dot product as in
    `quantized_matmul`; only fewer dequantized values are live at once. ``layer``: ``t`` is the stack of every
    layer's kernel and the tiles are read from kernel ``layer`` in place (the layer scan then copies no layer's
    codes out of the stack first)."""
    if layer is None:
        return _tiled(x, t, jnp.zeros((), jnp.int32), dtype, tile_bytes, False)
    return _tiled(x, t, jnp.asarray(layer, jnp.int32), dtype, tile_bytes, True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _tiled(x, t, layer, dtype, tile_bytes, stacked):
    return _tiled_forward(x, t, layer, dtype, tile_bytes, stacked)


def _tiled_forward(x, t, layer, dtype, tile_bytes, stacked):
    O, I = t.shape
    at = layer if stacked else None
    n = _tiles(O, O * I * jnp.dtype(dtype).itemsize, tile_bytes)
    if n == 1 and not stacked:
        return _dot_last(x, q.dequantize(t, dtype))
    R = O // n
    zero = jnp.int32(0)

    def tile(y, i):
        y_R = _dot_last(x, q.dequantize_block(t, i * R, R, zero, I, dtype, at))
        return jax.lax.dynamic_update_slice_in_dim(y, y_R.astype(y.dtype), i * R, axis=y.ndim - 1), None

    y0 = jnp.zeros((*x.shape[:-1], O), jnp.result_type(x.dtype, dtype))
    return jax.lax.scan(tile, y0, jnp.arange(n, dtype=jnp.int32))[0]


def _tiled_fwd(x, t, layer, dtype, tile_bytes, stacked):
    return _tiled_forward(x, t, layer, dtype, tile_bytes, stacked), (t, layer)


def _tiled_bwd(dtype, tile_bytes, stacked, res, g):
    t, layer = res
    O, I = t.shape
    n = _tiles(I, O * I * jnp.dtype(dtype).itemsize, tile_bytes, t.block_size)
    none = jax.tree.map(lambda _: None, t)  # the frozen kernel gets no cotangent
    if n == 1 and not stacked:
        return (*_quantized_matmul_bwd(dtype, t, g), None)
    C = I // n
    zero = jnp.int32(0)
    at = layer if stacked else None

    def tile(dx, i):
        w_OC = q.dequantize_block(t, zero, O, i * C, C, dtype, at)
        dx_C = jax.lax.dot_general(g, w_OC, (((g.ndim - 1,), (0,)), ((), ())))
        return jax.lax.dynamic_update_slice_in_dim(dx, dx_C.astype(dx.dtype), i * C, axis=dx.ndim - 1), None

    dx0 = jnp.zeros((*g.shape[:-1], I), jnp.result_type(g.dtype, dtype))
    dx = jax.lax.scan(tile, dx0, jnp.arange(n, dtype=jnp.int32))[0]
    return dx, none, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def count_params(tree: Any) -> int:
    """Number of array elements in a pytree of arrays / Variables / states."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def set_layer_values(layers: nnx.Module) -> None:
    """`LoraLinear.set_layer_values` on every adapter of the stacked ``layers``."""
    for _, m in nnx.iter_modules(layers):
        if isinstance(m, LoraLinear) and m.lora_a is not None:
            m.set_layer_values()
