"""Attention for the decoder families: softmax(s(q kᵀ · scale) + mask) v over grouped KV heads (GQA/MQA).

A query at slot t may see the key at slot s when all of these hold:

- causal: ``s <= t`` (slots are sequence indices, shared by queries and keys: a training batch uses ``arange(S)``
  for both, KV-cache decoding the new tokens' cache slots and every cache slot);
- same segment: ``q_segment_ids[b, t] == kv_segment_ids[b, s]`` (packed documents never see each other;
  decoding marks left padding as segment 0 and real tokens as 1);
- sliding window of width W: ``t - s < W`` (transformers' ``q_pos - k_pos < W``; Mistral, Qwen2's window layers).

``s`` is the identity, or logit soft-capping ``c · tanh(x / c)`` (Gemma 2) when ``logit_softcap`` is given.
Implementations: ``"xla"`` is `jax.nn.dot_product_attention`'s XLA path (CPU and parity tests); ``"cudnn"`` is
cuDNN's fused flash attention on NVIDIA GPUs (bf16/fp16), with no dense mask: causality and the sliding window are
cuDNN's own mask modes, and packed segments are its packed layout (per-row segment offsets and lengths: every run of
equal segment ids is one sequence, padding included, so no query sees past its segment); ``"auto"`` is cuDNN on a
GPU backend in half precision and XLA elsewhere. Where cuDNN cannot express a case (a window that is not a static
int, queries not aligned with the keys, soft-capping) the XLA path runs instead and the reason is logged once.

Shape letters: B batch, T query slots, S key/value slots, N query heads, K key/value heads, H head dim.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger("jqlora.attention")

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
NO_WINDOW = 2**30  # a "sliding window" longer than any sequence
# Runs of equal segment ids per row that cuDNN's packed layout is given room for (its softmax statistics are
# [B·MAX_SEGMENTS, N, T] float32); a row holding more makes the attention output NaN rather than silently wrong.
MAX_SEGMENTS = 64


def resolve_implementation(implementation: str, dtype=jnp.bfloat16) -> str:
    """``"xla"`` or ``"cudnn"`` for a name in `IMPLEMENTATIONS` (``"auto"``: cuDNN on a GPU backend, half precision)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}: expected one of "
                         f"{', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if jax.default_backend() == "gpu" and half else "xla"
    return implementation


@functools.cache
def _fallback(reason: str) -> None:
    log.warning("attention: XLA path instead of cuDNN: %s", reason)


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
    impl = resolve_implementation(implementation, q_BTNH.dtype)
    if impl == "cudnn":
        why = _cudnn_unsupported(q_BTNH, q_slots, kv_slots, q_segment_ids, kv_segment_ids, window, logit_softcap)
        if why is None:
            return _cudnn(q_BTNH, k_BSKH, v_BSKH, scale, q_segment_ids, window)
        _fallback(why)
        impl = "xla"
    q_slots = jnp.arange(T, dtype=jnp.int32) if q_slots is None else q_slots
    kv_slots = jnp.arange(S, dtype=jnp.int32) if kv_slots is None else kv_slots
    mask_BTS = attention_mask(q_slots, kv_slots, q_segment_ids, kv_segment_ids, window)
    if logit_softcap is not None:
        if impl != "xla":
            raise ValueError(f"logit soft-capping is implemented on the XLA path only, not {impl!r}")
        return _softcapped_xla(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, logit_softcap)
    with jax.named_scope("xla_attention"):  # names its ops in the HLO (tools/gpu_estimate.py groups them)
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], scale=scale,
                                            implementation="xla")


def _cudnn_unsupported(q_BTNH, q_slots, kv_slots, q_segment_ids, kv_segment_ids, window, softcap) -> str | None:
    """Why cuDNN's kernel cannot run this case (None: it can)."""
    if jnp.dtype(q_BTNH.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN attention needs bf16/fp16, got {q_BTNH.dtype}"
    if q_slots is not None or kv_slots is not None:
        return "queries at explicit slots (a KV cache): not cuDNN's aligned causal mask"
    if softcap is not None:
        return "logit soft-capping"
    if window is not None and not isinstance(window, int):
        return "a per-layer (traced) sliding window; cuDNN's window length is static"
    if (q_segment_ids is None) != (kv_segment_ids is None) or (
            q_segment_ids is not None and q_segment_ids is not kv_segment_ids):
        return "different query and key segment ids"
    return None


def segment_runs(segment_ids_BS: jax.Array, m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Offsets ``[B, m+1]`` and lengths ``[B, m]`` (int32, -1 past the last) of the runs of equal segment ids of
    each row, and ``[B]`` whether a row has more than ``m`` runs (those past the m-th are then not described)."""
    seg_BS = jnp.asarray(segment_ids_BS)
    B, S = seg_BS.shape
    starts_BS = jnp.concatenate([jnp.ones((B, 1), bool), seg_BS[:, 1:] != seg_BS[:, :-1]], axis=1)
    run_BS = jnp.cumsum(starts_BS, axis=1, dtype=jnp.int32) - 1  # which run each token is in
    n_B = run_BS[:, -1] + 1
    lengths_BM = jax.vmap(lambda r: jnp.zeros((m,), jnp.int32).at[r].add(1, mode="drop"))(run_BS)
    offsets_BM = jnp.cumsum(lengths_BM, axis=1, dtype=jnp.int32) - lengths_BM
    used_BM = jnp.arange(m, dtype=jnp.int32)[None] < n_B[:, None]
    lengths_BM = jnp.where(used_BM, lengths_BM, -1)
    offsets_BM = jnp.where(used_BM, offsets_BM, -1)
    offsets_BM1 = jnp.concatenate([offsets_BM, jnp.full((B, 1), -1, jnp.int32)], axis=1)
    return offsets_BM1, lengths_BM, n_B > m


def _cudnn(q_BTNH, k_BSKH, v_BSKH, scale: float, segment_ids_BS, window: int | None) -> jax.Array:
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    if segment_ids_BS is None:
        return cudnn_attention(q_BTNH, k_BSKH, v_BSKH, scale=scale, mask_type=MaskType.CAUSAL,
                               sliding_window_length=window)
    offsets, lengths, overflow_B = segment_runs(segment_ids_BS, min(MAX_SEGMENTS, q_BTNH.shape[1]))
    out_BTNH = cudnn_attention(q_BTNH, k_BSKH, v_BSKH, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                               kv_offsets=offsets, scale=scale, mask_type=MaskType.PADDING_CAUSAL,
                               sliding_window_length=window)
    return jnp.where(overflow_B[:, None, None, None], jnp.nan, out_BTNH).astype(out_BTNH.dtype)


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
