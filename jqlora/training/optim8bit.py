"""Adam with its moments stored in bfloat16 or in blockwise 8 bits (train.optimizer_state), as optax transforms.

8-bit (Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via Block-wise Quantization", 2022; bitsandbytes'
``AdamW8bit``): each moment of a parameter with at least ``min_8bit_size`` = 4096 elements is stored as uint8 codes
shaped like the parameter plus one float32 absmax per block of 256 (`jqlora.quant.quantize_dynamic`): the first
moment m with the signed dynamic map, the second v with the unsigned one. Smaller parameters keep float32 moments.
One step t (1-based), as bitsandbytes' blockwise CPU update orders it:

    m, v  = dequantize(state)                          (map[code] · absmax of the block)
    m     = β1 m + (1 - β1) g,      v = β2 v + (1 - β2) g²
    u     = (m / (1 - β1^t)) / (sqrt(v) / sqrt(1 - β2^t) + ε)       (from the float32 m, v before requantizing)
    state = quantize(m), quantize(v)                   (new absmax = max |·| of each block)

then ``optax.add_decayed_weights`` and the learning rate, as `optax.adamw` (p ← p - lr · (u + λ p); bitsandbytes
writes p (1 - lr λ) - lr · u: the same up to rounding). The 8-bit state renormalizes every block each step (a decaying
block decays through its float32 absmax) and matches bitsandbytes (tests/training/test_optim8bit.py).

bfloat16: every moment is stored in bfloat16, computed in float32 as above, and rounded stochastically (the float32
bit pattern plus 16 uniform random bits, truncated: E[stored] = the float32 value; the bits are a function of the
step count and the leaf, so runs and resumes repeat). Round-to-nearest would freeze v: with β2 = 0.999 and g² < v,
β2 v + (1 - β2) g² is within 0.1% of v, under half a bfloat16 step, so v would never decay.

Layer-stacked LoRA leaves ([L, ...]) are one tensor here: its blocks run over the flattened stack (for Llama shapes
each layer's slice is a whole number of blocks) and the 4096-element threshold applies to the whole stack.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jqlora.quant import OPTIMIZER_BLOCK, dequantize_dynamic, quantize_dynamic

STATE_DTYPES = ("float32", "bfloat16", "8bit")  # = config.base.OPTIMIZER_STATES


def resolve_state(state: str, memory: str = "default") -> str:
    """train.optimizer_state with ``auto`` resolved: 8bit under train.memory=min (every saving), else float32."""
    if state == "auto":
        return "8bit" if memory == "min" else "float32"
    return state
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep float32 state


class Quantized8bit(NamedTuple):
    """One moment of one parameter in 8 bits: uint8 codes shaped like it, float32 absmax per block of 256."""

    codes: jax.Array
    absmax: jax.Array


class ScaleByAdamLowpState(NamedTuple):
    count: jax.Array  # int32 steps taken
    mu: Any  # first moments: a tree like the parameters of Quantized8bit / bfloat16 / float32 leaves
    nu: Any  # second moments


def is_quantized(x: Any) -> bool:
    return isinstance(x, Quantized8bit)


def state_bytes_per_parameter(state: str) -> float:
    """Bytes of both Adam moments per (large) parameter: 8 (float32), 4 (bfloat16), 2 + 8/256 (8bit)."""
    return {"float32": 8.0, "bfloat16": 4.0, "8bit": 2.0 + 2 * 4 / OPTIMIZER_BLOCK}[state]


def _zeros(p: jax.Array, state: str):
    if state == "8bit" and int(np.prod(np.shape(p), dtype=np.int64)) >= MIN_8BIT_SIZE:
        blocks = -(-int(np.prod(np.shape(p), dtype=np.int64)) // OPTIMIZER_BLOCK)
        return Quantized8bit(jnp.zeros(np.shape(p), jnp.uint8), jnp.zeros((blocks,), jnp.float32))
    return jnp.zeros(np.shape(p), jnp.bfloat16 if state == "bfloat16" else jnp.float32)


def _load(s, signed: bool) -> jax.Array:
    if is_quantized(s):
        return dequantize_dynamic(s.codes, s.absmax, signed)
    return s.astype(jnp.float32)


def round_bf16_stochastic(x: jax.Array, key: jax.Array) -> jax.Array:
    """float32 → bfloat16, rounding up in magnitude with probability (the dropped low 16 bits) / 2^16."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    kept = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(kept, jnp.float32).astype(jnp.bfloat16)


def _store(x: jax.Array, like, signed: bool, key: jax.Array):
    if is_quantized(like):
        return Quantized8bit(*quantize_dynamic(x, signed))
    if like.dtype == jnp.bfloat16:
        return round_bf16_stochastic(x, key)
    return x.astype(like.dtype)


def scale_by_adam_lowp(state: str = "8bit", b1: float = 0.9, b2: float = 0.999,
                       eps: float = 1e-8) -> optax.GradientTransformation:
    """`optax.scale_by_adam` (eps_root 0) whose moments are stored as ``state`` ("float32", "bfloat16", "8bit")."""
    if state not in STATE_DTYPES:
        raise ValueError(f"optimizer state {state!r}: expected one of {', '.join(STATE_DTYPES)}")

    def init(params):
        mu = jax.tree.map(lambda p: _zeros(p, state), params)
        nu = jax.tree.map(lambda p: _zeros(p, state), params)
        return ScaleByAdamLowpState(jnp.zeros([], jnp.int32), mu, nu)

    def update(updates, st, params=None):
        del params
        count = optax.safe_increment(st.count)
        t = count.astype(jnp.float32)
        c1 = 1.0 - jnp.float32(b1) ** t
        c2 = jnp.sqrt(1.0 - jnp.float32(b2) ** t)
        grads, treedef = jax.tree.flatten(updates)
        mus, nus = treedef.flatten_up_to(st.mu), treedef.flatten_up_to(st.nu)
        out_u, out_m, out_v = [], [], []
        step_key = jax.random.fold_in(jax.random.PRNGKey(0), count)
        for i, (g, m_s, v_s) in enumerate(zip(grads, mus, nus)):
            key_m, key_v = jax.random.split(jax.random.fold_in(step_key, i))
            g = g.astype(jnp.float32)
            m = b1 * _load(m_s, True) + (1.0 - b1) * g
            v = b2 * _load(v_s, False) + (1.0 - b2) * g * g
            out_u.append((m / c1) / (jnp.sqrt(v) / c2 + eps))
            out_m.append(_store(m, m_s, True, key_m))
            out_v.append(_store(v, v_s, False, key_v))
        unflat = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
        return unflat(out_u), ScaleByAdamLowpState(count, unflat(out_m), unflat(out_v))

    return optax.GradientTransformation(init, update)


def adamw_lowp(learning_rate, state: str = "8bit", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-4) -> optax.GradientTransformation:
    """`optax.adamw` with its moments stored as ``state`` (float32 is `optax.adamw` itself)."""
    if state == "float32":
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.chain(scale_by_adam_lowp(state, b1, b2, eps), optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))
