"""Attention for the decoder families: softmax(s(q kᵀ · scale) + mask) v over grouped KV heads (GQA/MQA).

A query at slot t may see the key at slot s when all of these hold:

- causal: ``s <= t`` (slots are sequence indices, shared by queries and keys: a training batch uses ``arange(S)``
  for both, KV-cache decoding the new tokens' cache slots and every cache slot);
- same segment: ``q_segment_ids[b, t] == kv_segment_ids[b, s]`` (packed documents never see each other;
  decoding marks left padding as segment 0 and real tokens as 1);
- sliding window of width W: ``t - s < W`` (transformers' ``q_pos - k_pos < W``; Mistral, Qwen2's window layers).

``s`` is the identity, or logit soft-capping ``c · tanh(x / c)`` (Gemma 2) when ``logit_softcap`` is given.
Implementations: ``"xla"`` is `jax.nn.dot_product_attention`'s XLA path (CPU and parity tests); ``"cudnn"`` is its
cuDNN fused (flash) attention for NVIDIA GPUs; ``"auto"`` is cuDNN on a GPU backend and XLA elsewhere.

Shape letters: B batch, T query slots, S key/value slots, N query heads, K key/value heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
NO_WINDOW = 2**30  # a "sliding window" longer than any sequence


def resolve_implementation(implementation: str) -> str:
    """``"xla"`` or ``"cudnn"`` for a name in `IMPLEMENTATIONS` (``"auto"``: cuDNN on a GPU backend)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}: expected one of "
                         f"{', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        return "cudnn" if jax.default_backend() == "gpu" else "xla"
    return implementation


def attention_mask(
    q_slots: jax.Array,
    kv_slots: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    window: int | jax.Array | None = None,
) -> jax.Array:
    """Boolean ``[B or 1, T, S]``: which keys each query may see (see the module docstring).

    ``q_slots`` ``[T]`` or ``[B, T]``, ``kv_slots`` ``[S]`` or ``[B, S]``; segment ids ``[B, T]`` / ``[B, S]``
    (None: one segment); ``window`` None for full causal attention, else an int or a traced int32 scalar.
    """
    q_slots, kv_slots = jnp.asarray(q_slots, jnp.int32), jnp.asarray(kv_slots, jnp.int32)
    q_BT = q_slots if q_slots.ndim == 2 else q_slots[None]
    kv_BS = kv_slots if kv_slots.ndim == 2 else kv_slots[None]
    distance_BTS = q_BT[:, :, None] - kv_BS[:, None, :]
    mask_BTS = distance_BTS >= 0
    if q_segment_ids is not None or kv_segment_ids is not None:
        if q_segment_ids is None or kv_segment_ids is None:
            raise ValueError("segment ids must be given for both queries and keys, or for neither")
        q_seg, kv_seg = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)
        mask_BTS = mask_BTS & (q_seg[:, :, None] == kv_seg[:, None, :])
    if window is not None:
        mask_BTS = mask_BTS & (distance_BTS < window)
    return mask_BTS


def attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    scale: float,
    q_slots: jax.Array | None = None,
    kv_slots: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    window: int | jax.Array | None = None,
    implementation: str = "xla",
    logit_softcap: float | None = None,
) -> jax.Array:
    """``[B, T, N, H]`` attention output in q's dtype; slots default to ``arange(T)`` / ``arange(S)``."""
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    q_slots = jnp.arange(T, dtype=jnp.int32) if q_slots is None else q_slots
    kv_slots = jnp.arange(S, dtype=jnp.int32) if kv_slots is None else kv_slots
    impl = resolve_implementation(implementation)
    mask_BTS = attention_mask(q_slots, kv_slots, q_segment_ids, kv_segment_ids, window)
    if logit_softcap is not None:
        if impl != "xla":
            raise ValueError(f"logit soft-capping is implemented on the XLA path only, not {impl!r}")
        return _softcapped_xla(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, logit_softcap)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], scale=scale,
                                        implementation=impl)


def _softcapped_xla(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float, cap: float) -> jax.Array:
    """Attention with ``cap · tanh(logits / cap)`` before the mask; scores and softmax in float32."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    logits_BKGTS = cap * jnp.tanh(logits_BKGTS / cap)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)
