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

Shape letters: B batch, S sequence, D hidden, F MLP hidden, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jqlora.lora import Frozen, LoraConfig, LoraLinear, LoraSpec, QuantSpec, check_rank_fits, lora_a_init
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


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype: Any, rngs: nnx.Rngs, scale: bool = False,
                 lora: LoraSpec | None = None, lora_dtype: Any = jnp.float32):
        self.weight = Frozen((0.02 * jax.random.normal(rngs.params(), (vocab, dim), jnp.float32)).astype(dtype))
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

    def __call__(self, ids_BS: jax.Array) -> jax.Array:
        h_BSD = jnp.take(self.weight[...], ids_BS, axis=0)
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
                 lora_dtype: Any = jnp.float32):
        self.weight = Frozen((0.02 * jax.random.normal(rngs.params(), (vocab, dim), jnp.float32)).astype(dtype))
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

    def head_weight(self) -> jax.Array:
        """``W + s (A B)ᵀ`` ``[V, D]`` in the weight's dtype (W without an adapter)."""
        w_VD = self.weight[...]
        if self.spec is None:
            return w_VD
        delta_VD = jnp.matmul(self.lora_a[...].astype(w_VD.dtype), self.lora_b[...].astype(w_VD.dtype)).T
        return w_VD + delta_VD * jnp.asarray(self.spec.scaling, w_VD.dtype)


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
