"""The decoder's building blocks other than attention: RMSNorm (both variants), embeddings, the LM head, the
LoRA-augmented linear and the gated MLP.

RMSNorm(x) = x / sqrt(mean(x²) + eps) computed in float32 (Zhang & Sennrich 2019). Llama casts it back to the
input dtype and then multiplies by w; Gemma multiplies by (1 + w) in float32 and casts after
(``norm_unit_offset``). The MLP is gated (Shazeer, "GLU Variants Improve Transformer", 2020):
down_proj(act(gate_proj(x)) * up_proj(x)) with act = SiLU (SwiGLU: Llama, Mistral, Qwen) or tanh-approximated GELU
(GeGLU: Gemma). Phi-3 stores gate and up as one fused ``gate_up_proj`` (gate rows first).

Chunked MLP (``chunk`` = C > 0 tokens): the MLP acts on each token alone, so it is computed over the B·S tokens in
chunks of C (`jax.lax.map` over a `jax.checkpoint`-ed chunk body, the last chunk zero-padded): the [B, S, F]
gate / up activations exist for one chunk at a time, in the forward and in the backward, which recomputes them per
chunk. The result is the unchunked MLP's up to the order of float operations; LoRA dropout is drawn per chunk
(``fold_in(key, chunk index)``), so with dropout the masks differ from the unchunked ones.

LoRA on the embedding and the LM head (``lora.targets`` naming ``embed_tokens`` / ``lm_head``), as peft's
``lora.Embedding`` and ``lora.Linear`` compute them:

    embed(ids) = W[ids] + s · A_e[ids] B_e      A_e [V, R] (peft lora_embedding_A [R, V], init 0),
                                                B_e [R, D] (peft lora_embedding_B [D, R], init N(0, 1))
    head(h)    = h (W + s (A B)ᵀ)ᵀ              A [D, R], B [R, V] like any linear (peft lora_A / lora_B)

The head adapter is folded into the head weight ``[V, D]`` (one extra copy of it per step), so it takes no dropout
(the config refuses lm_head with lora.dropout > 0); peft takes no dropout on the embedding either. With tied
embeddings the embedding adapter changes the input side only, as in peft; an lm_head adapter is refused there.

Quantized embedding and head (``train.memory=min``; `QuantHead`): the table ``[V, D]`` is held as NF4 (/FP4) codes
with (double-quantized) block scales like a linear kernel, D a multiple of the block so each row is whole blocks.
The embedding gathers the codes and scales of the rows a batch uses and dequantizes only those
(`quant.dequantize_rows`, equal to dequantizing all and gathering, bit for bit); the cross-entropy reads the head
one block of vocabulary rows at a time (`QuantHead.rows`), so no ``[V, D]`` compute-dtype copy is ever live in the
train step. With tied embeddings the one quantized table serves both.

Shape letters: B batch, S sequence, D hidden, F MLP hidden, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jqlora import quant as q
from jqlora.lora import Frozen, LoraConfig, LoraLinear, LoraSpec, QuantData, QuantSpec, check_rank_fits, lora_a_init
from jqlora.models.config import ModelConfig

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: Any, unit_offset: bool = False):
        self.weight = Frozen((jnp.zeros if unit_offset else jnp.ones)((dim,), dtype))
        self.eps = eps
        self.unit_offset = unit_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:  # Gemma: (1 + w) in float32, then cast
            return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * y.astype(x.dtype)


def rms_norm(cfg: ModelConfig, dim: int, dtype: Any) -> RMSNorm:
    """The family's RMSNorm over ``dim`` features."""
    return RMSNorm(dim, cfg.rms_norm_eps, dtype, cfg.norm_unit_offset)


NEFTUNE_KEY = 0x4E4546  # folded into a step's key for NEFTune's noise


def neftune_noise(key: jax.Array, shape_BSD: tuple[int, int, int], alpha: float, dtype: Any) -> jax.Array:
    """NEFTune's noise (Jain et al. 2023), as transformers' ``neftune_post_forward_hook`` draws it for an
    embedding output of shape [B, S, D]: uniform in [-m, m], m = alpha / sqrt(S · D), S the (padded) sequence
    length of the tensor and D its width; drawn in float32, cast to the output's dtype."""
    bound = float(alpha) / math.sqrt(shape_BSD[1] * shape_BSD[2])
    return jax.random.uniform(key, tuple(shape_BSD), jnp.float32, -bound, bound).astype(dtype)


def _quantized_table(module: nnx.Module, w_VD: jax.Array, quant: QuantSpec | None) -> None:
    """Store ``w_VD`` on ``module`` as ``weight`` (Frozen), or quantized by ``quant`` as ``codes`` / ``absmax`` (/
    ``nested_absmax`` / ``offset``) QuantData with the static fields as plain attributes (as `LoraLinear`)."""
    if quant is None or not quant.enabled:
        module.weight = Frozen(w_VD)
        module.codes = None
        return
    V, D = w_VD.shape
    if D % quant.block_size:
        raise ValueError(f"train.memory=min: hidden size {D} is not a multiple of model.block_size "
                         f"{quant.block_size}, so the embedding's rows are not whole blocks; pick a block size "
                         "dividing it")
    set_quantized_table(module, q.quantize(w_VD, quant.quant, block_size=quant.block_size,
                                           double_quant=quant.double_quant))


def set_quantized_table(module: nnx.Module, t: q.QuantizedTensor) -> None:
    """Store the quantized table ``t`` on an `Embed` / `LMHead` built quantized (loading fills it this way)."""
    module.weight = None
    module.codes = QuantData(t.codes)
    module.absmax = QuantData(t.absmax)
    module.nested_absmax = QuantData(t.nested_absmax) if t.double_quant else None
    module.offset = QuantData(t.offset) if t.double_quant else None
    module.quant_shape, module.quant_dtype = t.shape, t.dtype
    module.block_size, module.quant_type = t.block_size, t.quant_type


def _table(module: nnx.Module) -> q.QuantizedTensor | None:
    """The module's quantized table, or None when it holds a plain ``weight``."""
    if module.codes is None:
        return None
    nested = module.nested_absmax[...] if module.nested_absmax is not None else None
    offset = module.offset[...] if module.offset is not None else None
    return q.QuantizedTensor(module.codes[...], module.absmax[...], nested, offset, module.quant_shape,
                             module.quant_dtype, module.block_size, module.quant_type)


def heads_spec(memory: str, quant: str = "nf4", block_size: int = 64) -> QuantSpec | None:
    """How train.memory stores the embedding and lm_head tables: None (``default``: the compute dtype), or for
    ``min`` the model's 4-bit type (NF4 when the linears are unquantized) with double quantization at ``block_size``."""
    if memory == "default":
        return None
    if memory != "min":
        raise ValueError(f"train.memory {memory!r}: expected default or min")
    return QuantSpec(quant if quant != "none" else "nf4", True, block_size)


HEAD_BLOCK_ROWS = 4096  # vocabulary rows of a quantized head dequantized at once (Llama-3: 32 blocks of 32 MiB bf16)


@jax.tree_util.register_pytree_node_class
class QuantHead:
    """The LM head for the chunked cross-entropy as a quantized ``[V, D]`` table (and an lm_head adapter A ``[D, R]``,
    B ``[R, V]`` scaled by s), read ``size`` vocabulary rows at a time: never a whole ``[V, D]`` copy."""

    def __init__(self, table: q.QuantizedTensor, dtype: Any, lora_a=None, lora_b=None, scaling: float = 0.0,
                 block_rows: int = HEAD_BLOCK_ROWS):
        self.table, self.dtype = table, jnp.dtype(dtype)
        self.lora_a, self.lora_b, self.scaling = lora_a, lora_b, scaling
        self.block_rows = min(int(block_rows), table.shape[0])  # vocabulary rows dequantized at once

    @property
    def vocab(self) -> int:
        return self.table.shape[0]

    def rows(self, start: jax.Array, size: int) -> jax.Array:
        """Rows [start, start + size) of ``W + s (A B)ᵀ`` in the compute dtype (equal, row for row, to
        `LMHead.head_weight` over the dequantized table)."""
        w_RD = q.dequantize_rows(self.table, start + jnp.arange(size, dtype=jnp.int32), self.dtype)
        if self.lora_a is None:
            return w_RD
        b_RV = jax.lax.dynamic_slice_in_dim(self.lora_b.astype(self.dtype), start, size, axis=1)
        delta_RD = jnp.matmul(self.lora_a.astype(self.dtype), b_RV).T
        return w_RD + delta_RD * jnp.asarray(self.scaling, self.dtype)

    def tree_flatten(self):
        return (self.table, self.lora_a, self.lora_b), (self.dtype, self.scaling, self.block_rows)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], aux[0], children[1], children[2], aux[1], aux[2])


class Embed(nnx.Module):
    """``embed_tokens``: a ``[V, D]`` table (``weight``, or 4-bit with ``quant``: see the module docstring)."""

    def __init__(self, vocab: int, dim: int, dtype: Any, rngs: nnx.Rngs, scale: bool = False,
                 lora: LoraSpec | None = None, lora_dtype: Any = jnp.float32, quant: QuantSpec | None = None):
        _quantized_table(self, (0.02 * jax.random.normal(rngs.params(), (vocab, dim), jnp.float32)).astype(dtype),
                         quant)
        self.dtype = jnp.dtype(dtype)
        self.scale = math.sqrt(dim) if scale else None
        self.spec = lora
        if lora is not None:
            self.lora_embedding_a = nnx.LoRAParam(jnp.zeros((vocab, lora.r), lora_dtype))
            self.lora_embedding_b = nnx.LoRAParam(jax.random.normal(rngs.params(), (lora.r, dim), lora_dtype))
        else:
            self.lora_embedding_a = self.lora_embedding_b = None

    def reset_lora(self, key: jax.Array) -> None:
        """peft's embedding init: A zero, B standard normal."""
        if self.spec is not None:
            a, b = self.lora_embedding_a, self.lora_embedding_b
            a.set_value(jnp.zeros(a.shape, a.dtype))
            b.set_value(jax.random.normal(key, b.shape, b.dtype))

    def quantized(self) -> q.QuantizedTensor | None:
        return _table(self)

    def table(self) -> jax.Array:
        """The whole ``[V, D]`` table in the compute dtype (dequantized when quantized: decoding, export)."""
        t = _table(self)
        return self.weight[...] if t is None else q.dequantize(t, self.dtype)

    def __call__(self, ids_BS: jax.Array) -> jax.Array:
        t = _table(self)
        if t is None:
            h_BSD = jnp.take(self.weight[...], ids_BS, axis=0)
        else:  # only the rows used are dequantized
            h_BSD = q.dequantize_rows(t, ids_BS, self.dtype)
        if self.spec is not None:
            dt = h_BSD.dtype
            a_BSR = jnp.take(self.lora_embedding_a[...].astype(dt), ids_BS, axis=0)
            delta_BSD = jnp.matmul(a_BSR, self.lora_embedding_b[...].astype(dt))
            h_BSD = h_BSD + delta_BSD * jnp.asarray(self.spec.scaling, dt)  # (peft scales it with Gemma's too)
        if self.scale is not None:  # Gemma: sqrt(D) rounded to the weight's dtype first, as transformers does
            h_BSD = h_BSD * jnp.asarray(self.scale, h_BSD.dtype)
        return h_BSD


class LMHead(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype: Any, rngs: nnx.Rngs, lora: LoraSpec | None = None,
                 lora_dtype: Any = jnp.float32, quant: QuantSpec | None = None):
        _quantized_table(self, (0.02 * jax.random.normal(rngs.params(), (vocab, dim), jnp.float32)).astype(dtype),
                         quant)
        self.dtype = jnp.dtype(dtype)
        self.spec = lora
        self.in_features = dim
        if lora is not None:
            self.lora_a = nnx.LoRAParam(lora_a_init(rngs.params(), (dim, lora.r), dim, lora_dtype))
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora.r, vocab), lora_dtype))
        else:
            self.lora_a = self.lora_b = None

    def reset_lora(self, key: jax.Array) -> None:
        """peft's linear init: A uniform, B zero."""
        if self.spec is not None:
            self.lora_a.set_value(lora_a_init(key, self.lora_a.shape, self.in_features, self.lora_a.dtype))
            self.lora_b.set_value(jnp.zeros(self.lora_b.shape, self.lora_b.dtype))

    def quantized(self) -> q.QuantizedTensor | None:
        return _table(self)

    def head_weight(self) -> jax.Array:
        """``W + s (A B)ᵀ`` ``[V, D]`` in the weight's dtype (W without an adapter; dequantized when quantized)."""
        t = _table(self)
        w_VD = self.weight[...] if t is None else q.dequantize(t, self.dtype)
        if self.spec is None:
            return w_VD
        delta_VD = jnp.matmul(self.lora_a[...].astype(w_VD.dtype), self.lora_b[...].astype(w_VD.dtype)).T
        return w_VD + delta_VD * jnp.asarray(self.spec.scaling, w_VD.dtype)

    def ce_head(self, block_rows: int = HEAD_BLOCK_ROWS) -> jax.Array | QuantHead:
        """What the chunked cross-entropy reads: `head_weight`, or a `QuantHead` when the table is quantized."""
        t = _table(self)
        if t is None:
            return self.head_weight()
        if self.spec is None:
            return QuantHead(t, self.dtype, block_rows=block_rows)
        return QuantHead(t, self.dtype, self.lora_a[...], self.lora_b[...], self.spec.scaling, block_rows)


def linear(cfg_lora: LoraConfig | None, name: str, n_in: int, n_out: int, *, bias: bool, quant: QuantSpec,
           dtype: Any, lora_dtype: Any, rngs: nnx.Rngs, num_layers: int | None = None) -> LoraLinear:
    """A (possibly quantized) frozen kernel with the adapter ``cfg_lora`` asks for at module ``name`` (of each of
    ``num_layers`` stacked decoder layers: per-layer ranks / alphas are resolved layer by layer)."""
    spec = cfg_lora.for_module(name, num_layers) if cfg_lora is not None else None
    if cfg_lora is not None:
        check_rank_fits(spec, name, n_in, n_out, cfg_lora.r)
    return LoraLinear(n_in, n_out, lora=spec, quant=quant, use_bias=bias, dtype=dtype, param_dtype=lora_dtype,
                      rngs=rngs)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, quant: QuantSpec, dtype: Any, lora_dtype: Any,
                 rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=False, quant=quant, dtype=dtype, lora_dtype=lora_dtype, rngs=rngs,
                  num_layers=cfg.num_hidden_layers)
        if cfg.fused_gate_up:  # Phi-3: one kernel, gate rows first
            self.gate_up_proj = linear(lora, "mlp.gate_up_proj", D, 2 * F, **kw)
            self.gate_proj = self.up_proj = None
        else:
            self.gate_up_proj = None
            self.gate_proj = linear(lora, "mlp.gate_proj", D, F, **kw)
            self.up_proj = linear(lora, "mlp.up_proj", D, F, **kw)
        self.down_proj = linear(lora, "mlp.down_proj", F, D, **kw)
        self.act = cfg.hidden_act

    def __call__(self, x_BSD, *, deterministic: bool, keys, chunk: int = 0) -> jax.Array:
        B, S, D = x_BSD.shape
        if not chunk or chunk >= B * S:
            return self._dense(x_BSD, deterministic=deterministic, keys=keys)
        T = B * S
        n = -(-T // chunk)
        x_TD = x_BSD.reshape(T, D)
        if n * chunk != T:
            x_TD = jnp.pad(x_TD, ((0, n * chunk - T), (0, 0)))

        @jax.checkpoint
        def one(xs):
            x_CD, i = xs
            ks = None if keys is None else [jax.random.fold_in(k, i) for k in keys]
            return self._dense(x_CD[None], deterministic=deterministic, keys=ks)[0]

        y_NCD = jax.lax.map(one, (x_TD.reshape(n, chunk, D), jnp.arange(n, dtype=jnp.int32)))
        return y_NCD.reshape(n * chunk, -1)[:T].reshape(B, S, -1)

    def _dense(self, x_BSD, *, deterministic: bool, keys) -> jax.Array:
        kw = lambda i: dict(deterministic=deterministic, key=None if keys is None else keys[i])  # noqa: E731
        if self.gate_up_proj is not None:
            gate_BSF, up_BSF = jnp.split(self.gate_up_proj(x_BSD, **kw(0)), 2, axis=-1)
        else:
            gate_BSF = self.gate_proj(x_BSD, **kw(0))
            up_BSF = self.up_proj(x_BSD, **kw(1))
        return self.down_proj(ACTIVATIONS[self.act](gate_BSF) * up_BSF, **kw(2))
