"""jqlora.models.attention against a float64 numpy computation of the same definition."""

import numpy as np
import pytest

import jax.numpy as jnp

from jqlora.models.attention import attention


def _oracle(q, k, v, scale, q_slots, kv_slots, q_seg, kv_seg, window, cap):
    """float64 softmax attention with GQA, written out loop-free in numpy."""
    B, T, N, H = q.shape
    K = k.shape[2]
    kk = np.repeat(k, N // K, axis=2)
    vv = np.repeat(v, N // K, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, kk) * scale
    if cap is not None:
        logits = cap * np.tanh(logits / cap)
    d = q_slots[:, None] - kv_slots[None, :]
    allowed = (d >= 0)[None]
    if q_seg is not None:
        allowed = allowed & (q_seg[:, :, None] == kv_seg[:, None, :])
    if window is not None:
        allowed = allowed & (d < window)[None]
    logits = np.where(allowed[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, vv)


@pytest.mark.parametrize("case", ["plain", "packed", "window", "softcap", "offset"])
def test_attention_matches_float64(case):
    rng = np.random.default_rng(0)
    B, T, S, N, K, H = 2, 12, 12, 4, 2, 8
    if case == "offset":  # decoding: 3 new queries at slots 5..7 over a 12-slot cache
        T = 3
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, K, H)).astype(np.float32)
    v = rng.standard_normal((B, S, K, H)).astype(np.float32)
    q_slots = np.arange(T) + (5 if case == "offset" else 0)
    kv_slots = np.arange(S)
    seg = window = cap = None
    q_seg = kv_seg = None
    if case == "packed":
        seg = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
        q_seg = kv_seg = seg
    if case == "offset":
        kv_seg = np.array([[0] * 2 + [1] * 10, [1] * 12])
        q_seg = np.ones((B, T), np.int64)
    if case == "window":
        window = 4
    if case == "softcap":
        cap = 1.5
    kw = dict(q_slots=jnp.asarray(q_slots), kv_slots=jnp.asarray(kv_slots),
              q_segment_ids=None if q_seg is None else jnp.asarray(q_seg),
              kv_segment_ids=None if kv_seg is None else jnp.asarray(kv_seg), window=window, logit_softcap=cap)
    got = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=H**-0.5, implementation="xla",
                               **kw))
    want = _oracle(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), H**-0.5, q_slots, kv_slots,
                   q_seg, kv_seg, window, cap)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
