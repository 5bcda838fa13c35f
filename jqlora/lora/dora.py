"""DoRA: weight-decomposed low-rank adaptation over a frozen (possibly 4-bit) kernel (QDoRA on the NF4 base).

Math (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024, eq. 5 and section 4.3), as peft 0.21
computes it (``peft/tuners/lora/dora.py``, ``DoraLinearLayer``):

    V = W + s · (A B)ᵀ                       [O, I], W the dequantized base kernel, s the LoRA scaling
    n = ‖V‖ per output row (the 2-norm over I), treated as a constant: no gradient flows through n
    y = x Wᵀ + b  +  (m / n - 1) ⊙ (x̃ Wᵀ)  +  (m / n) ⊙ s · (x̃ A) B

with m ``[O]`` the trained magnitude and x̃ the LoRA input: x itself, or dropout(x) when dropout is active (then
``x̃ Wᵀ`` is a second base matmul; without dropout it is the base output minus the bias). When x̃ = x this is
(m / n) ⊙ x Vᵀ + b. A fresh adapter starts with m = ‖W + s (A B)ᵀ‖ (= ‖W‖ per row while B = 0), so it leaves the
model unchanged. Merged: W' = (m / n)[:, None] · V.

peft saves m as ``<module>.lora_magnitude_vector`` ``[O]`` next to ``lora_A`` / ``lora_B``, and ``use_dora: true``.

Shape letters: O out features, I in features, R rank; leading axes (stacked layers) pass through.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weight_norm(w_OI: jax.Array, a_IR: jax.Array, b_RO: jax.Array, scaling: float) -> jax.Array:
    """``‖W + s (A B)ᵀ‖`` per output row ``[..., O]``, in W's dtype (no stop-gradient here)."""
    delta_OI = jnp.swapaxes(jnp.matmul(a_IR.astype(w_OI.dtype), b_RO.astype(w_OI.dtype)), -1, -2)
    return jnp.linalg.norm(w_OI + jnp.asarray(scaling, w_OI.dtype) * delta_OI, axis=-1)


def magnitude_scale(magnitude_O: jax.Array, w_OI: jax.Array, a_IR: jax.Array, b_RO: jax.Array,
                    scaling: float) -> jax.Array:
    """``m / n`` ``[..., O]`` with the norm n detached (DoRA section 4.3), in W's dtype."""
    n_O = jax.lax.stop_gradient(weight_norm(w_OI, jax.lax.stop_gradient(a_IR), jax.lax.stop_gradient(b_RO), scaling))
    return magnitude_O.astype(w_OI.dtype) / n_O


def dora_extra(scale_O: jax.Array, base_BSO: jax.Array, lora_BSO: jax.Array, scaling: float) -> jax.Array:
    """What DoRA adds to the base output: ``(m/n - 1) ⊙ base + (m/n) ⊙ s · lora`` (base without its bias)."""
    s = jnp.asarray(scaling, lora_BSO.dtype)
    return (scale_O - 1) * base_BSO + scale_O * (lora_BSO * s)


def merged_kernel(magnitude_O: jax.Array, w_OI: jax.Array, a_IR: jax.Array, b_RO: jax.Array,
                  scaling: float) -> jax.Array:
    """float32 ``(m / n)[:, None] · (W + s (A B)ᵀ)``: the kernel a merged checkpoint stores."""
    w_OI = w_OI.astype(jnp.float32)
    delta_OI = jnp.swapaxes(jnp.matmul(a_IR.astype(jnp.float32), b_RO.astype(jnp.float32)), -1, -2)
    v_OI = w_OI + scaling * delta_OI
    return (magnitude_O.astype(jnp.float32) / jnp.linalg.norm(v_OI, axis=-1))[..., None] * v_OI
