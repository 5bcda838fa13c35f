"""jqlora.models.sampling (GRPO rollouts) against its own full-recompute forward (per-token log-probs), jqlora.generate
(greedy tokens), a float64 numpy reference of the top-k / top-p filtered distribution, and invariants (a key fixes
the completions, stop ids end a row, truncation flags, one compilation per shape bucket)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlora.lora import LoraConfig
from jqlora.models import decode, sampling
from test_model import forward, load, make_hf, token_ids
from tiny import randomize_lora

PROMPTS = [token_ids(1, 5, seed=1)[0], token_ids(1, 9, seed=2)[0], token_ids(1, 3, seed=3)[0]]
STOP = (3, 17, 40, 77, 101, 120)  # a few ids, so some rows stop early and some run to max_new_tokens


@functools.cache
def model():
    _, path = make_hf("llama", dict(max_position_embeddings=128), seed=4)
    m = load(path, lora=LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "up_proj", "down_proj")))
    randomize_lora(m, seed=5, scale=0.3)
    return m


def full_logps(m, r: sampling.Rollout, temperature: float) -> np.ndarray:
    """log softmax(z / temperature) of each completion token from one forward over prompt + completion (no cache)."""
    ids = np.concatenate([r.prompt_ids, r.completion_ids], 1)
    live = np.concatenate([r.prompt_mask, np.ones_like(r.completion_mask)], 1)
    logits = np.asarray(forward(m, jnp.asarray(ids), jnp.asarray(live)), np.float64)
    P, C = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    z = logits[:, P - 1:P + C - 1] / (temperature or 1.0)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    return np.take_along_axis(logp, r.completion_ids[..., None].astype(np.int64), -1)[..., 0] * r.completion_mask


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_logps_equal_full_recompute_and_rows_stop(temperature, top_k, top_p):
    m = model()
    r = sampling.sample_rollouts(m, PROMPTS, num_generations=4, max_new_tokens=14, key=jax.random.key(0),
                                 temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=STOP, pad_id=0)
    assert r.completion_ids.shape[0] == 12 and r.prompt_ids.shape == (12, 16)
    np.testing.assert_allclose(r.logps, full_logps(m, r, temperature), atol=1e-5, rtol=0)
    lengths = r.lengths
    assert r.truncated.any() and (~r.truncated).any()  # both kinds of rows are exercised
    for row, n, trunc in zip(r.completion_ids, lengths, r.truncated):
        stops = [i for i, t in enumerate(row[:n]) if t in STOP]
        if trunc:
            assert n == 14 and not stops
        else:
            assert stops == [n - 1]  # ends at its first stop id, which is part of the completion
        assert (row[n:] == 0).all()
    # the prompts sit left-padded, each copied G times next to each other
    for g, p in enumerate(PROMPTS):
        for row in range(4 * g, 4 * g + 4):
            np.testing.assert_array_equal(r.prompt_ids[row, 16 - len(p):], p)
            assert r.prompt_mask[row].sum() == len(p)


def test_same_key_same_completions():
    m = model()
    kw = dict(num_generations=3, max_new_tokens=10, temperature=1.2, stop_ids=STOP)
    a = sampling.sample_rollouts(m, PROMPTS, key=jax.random.key(7), **kw)
    b = sampling.sample_rollouts(m, PROMPTS, key=jax.random.key(7), **kw)
    c = sampling.sample_rollouts(m, PROMPTS, key=jax.random.key(8), **kw)
    np.testing.assert_array_equal(a.completion_ids, b.completion_ids)
    np.testing.assert_array_equal(a.logps, b.logps)
    assert not np.array_equal(a.completion_ids, c.completion_ids)
    assert len({tuple(x) for x in a.completions()[:3]}) > 1  # the G copies of a prompt differ


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 1)])
def test_greedy_equals_generate(temperature, top_k):
    m = model()
    r = sampling.sample_rollouts(m, PROMPTS, num_generations=2, max_new_tokens=12, key=jax.random.key(3),
                                 temperature=temperature, top_k=top_k, stop_ids=STOP)
    for g, p in enumerate(PROMPTS):
        ref = decode.generate(m, p, max_new_tokens=12, eos_token_id=list(STOP)).tolist()
        for row in (2 * g, 2 * g + 1):
            assert r.completions()[row] == ref


def _filtered_float64(z: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The distribution sampled from: softmax over the top k, then the smallest prefix reaching top_p (float64)."""
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(z.size, bool)
    keep[order[:top_k or z.size]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    ps = p[order]
    before = np.cumsum(ps) - ps
    nucleus = np.zeros(z.size, bool)
    nucleus[order[(before < top_p) | (np.arange(z.size) == 0)]] = True
    q = np.where(keep & nucleus, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.5, 8, 1.0), (1.3, 0, 0.7), (2.0, 12, 0.8)])
def test_top_k_top_p_distribution_matches_float64(temperature, top_k, top_p):
    m = model()
    n = 4000
    r = sampling.sample_rollouts(m, [PROMPTS[1]], num_generations=n, max_new_tokens=1, key=jax.random.key(11),
                                 temperature=temperature, top_k=top_k, top_p=top_p)
    logits = np.asarray(forward(m, jnp.asarray(PROMPTS[1][None])), np.float64)[0, -1]
    want = _filtered_float64(logits / temperature, top_k, top_p)
    got = np.bincount(r.completion_ids[:, 0], minlength=want.size) / n
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want))  # never outside the filtered support
    assert (want > 0).sum() > 2
    se = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(got - want) <= 5 * se + 1e-12), np.abs(got - want).max()


def test_one_compilation_per_bucket():
    m = model()
    kw = dict(num_generations=2, key=jax.random.key(0), stop_ids=STOP)
    sampling.sample_rollouts(m, [PROMPTS[0], PROMPTS[1]], max_new_tokens=9, **kw)
    before = sampling.compile_count()
    sampling.sample_rollouts(m, [PROMPTS[2], PROMPTS[1]], max_new_tokens=16, **kw)  # P 16, T 16: same bucket
    sampling.sample_rollouts(m, [token_ids(1, 14)[0], PROMPTS[0]], max_new_tokens=12, **kw)
    assert sampling.compile_count() == before
