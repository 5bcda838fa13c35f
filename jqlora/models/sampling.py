"""Batched rollouts for online RL (GRPO): every prompt sampled G times by the KV-cache decoder (`decode.py`).

The B = n_prompts · G rows (each prompt's G copies next to each other, so a group is rows ``[g·G, (g+1)·G)``, as
TRL's repeat sampler orders them) are left-padded to one prompt block of P = `decode.bucket` (longest prompt) slots
and decoded with a cache of M = bucket(P + T) slots, T = bucket(max_new_tokens). The prefill and the whole token
loop are one jitted program (a `jax.lax.while_loop` that ends as soon as every row has stopped, or after
max_new_tokens), compiled once per (B, P, T) bucket, never per token or per prompt length.

Per step i, row b draws token t_i from logits z / temperature filtered by top_k then top_p (`decode.sample`, with the
key ``fold_in(key, i)``: one key gives the same completions) and records its log-probability under the
temperature-scaled, unfiltered distribution, log softmax(z / temperature)[t_i] (temperature 0: greedy, log softmax(z)),
the same quantity TRL's GRPO loss computes for the policy (its ``per_token_logps``), so at the first of μ iterations
the old log-probs are these. A row stops at its first stop id (EOS / end of turn; the stop token is part of the
completion and of its mask); after it the row emits ``pad_id`` with mask 0 and log-prob 0. A row that never stopped
is flagged truncated.

Shape letters: B rows, P prompt slots, T new tokens, M cache slots, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora.models.decode import _Static, bucket, forward_cached, init_cache, sample
from jqlora.models.llama import LlamaForCausalLM


@dataclasses.dataclass(frozen=True)
class Rollout:
    """What one batch of rollouts produced (numpy; B = n_prompts · G rows, prompt g's copies at g·G ... g·G+G-1)."""

    prompt_ids: np.ndarray  # int32 [B, P], left-padded with pad_id
    prompt_mask: np.ndarray  # int32 [B, P], 1 on real prompt tokens
    completion_ids: np.ndarray  # int32 [B, C], C = the longest completion; right-padded with pad_id
    completion_mask: np.ndarray  # int32 [B, C], 1 on generated tokens (the stop token included)
    logps: np.ndarray  # float32 [B, C], log softmax(z / temperature) of each generated token, 0 where masked
    truncated: np.ndarray  # bool [B]: no stop id within max_new_tokens
    num_generations: int

    @property
    def lengths(self) -> np.ndarray:
        return self.completion_mask.sum(-1)

    def completions(self) -> list[list[int]]:
        """Each row's generated ids (the stop token included, no padding)."""
        return [row[:n].tolist() for row, n in zip(self.completion_ids, self.lengths)]


def _rollout(graphdef, T, state, ids_BP, pad_B, max_new, key, temperature, top_p, top_k, stop_S, pad_id):
    model = nnx.merge(graphdef.value, state)
    B, P = ids_BP.shape
    cache = init_cache(model, B, bucket(P + T))
    logits_BV, cache = forward_cached(model, cache, ids_BP, 0, pad_B)  # (static start: slots [0, P) only)
    inv_t = 1.0 / jnp.where(temperature > 0, temperature, 1.0)

    def cond(carry):
        i, _, _, _, _, done_B = carry
        return (i < max_new) & ~jnp.all(done_B)

    def body(carry):
        i, logits_BV, cache, tok_BT, lp_BT, done_B = carry
        token_B = sample(logits_BV, jax.random.fold_in(key, i), temperature, top_p, top_k)
        logp_BV = jax.nn.log_softmax(logits_BV * inv_t, axis=-1)
        lp_B = jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
        token_B = jnp.where(done_B, pad_id, token_B)
        lp_B = jnp.where(done_B, 0.0, lp_B)
        tok_BT = jax.lax.dynamic_update_slice(tok_BT, token_B[:, None], (0, i))
        lp_BT = jax.lax.dynamic_update_slice(lp_BT, lp_B[:, None], (0, i))
        done_B = done_B | jnp.any(token_B[:, None] == stop_S[None, :], axis=-1)
        logits_BV, cache = forward_cached(model, cache, token_B[:, None], P + i, pad_B)
        return i + 1, logits_BV, cache, tok_BT, lp_BT, done_B

    tok_BT = jnp.full((B, T), pad_id, jnp.int32)
    lp_BT = jnp.zeros((B, T), jnp.float32)
    done_B = jnp.zeros((B,), bool)
    n, _, _, tok_BT, lp_BT, done_B = jax.lax.while_loop(
        cond, body, (jnp.int32(0), logits_BV, cache, tok_BT, lp_BT, done_B))
    # the mask: every token up to and including a row's first stop id, within the n steps run
    step_T = jnp.arange(T, dtype=jnp.int32)
    is_stop_BT = jnp.any(tok_BT[..., None] == stop_S, axis=-1) & (step_T[None, :] < n)
    first_stop_B = jnp.where(is_stop_BT.any(-1), jnp.argmax(is_stop_BT, axis=-1), T)
    mask_BT = (step_T[None, :] <= first_stop_B[:, None]) & (step_T[None, :] < n)
    return tok_BT, mask_BT.astype(jnp.int32), jnp.where(mask_BT, lp_BT, 0.0), ~done_B


_rollout_jit = jax.jit(_rollout, static_argnums=(0, 1))


def compile_count() -> int:
    """How many rollout programs have been compiled so far (for recompilation checks)."""
    return _rollout_jit._cache_size()


def sample_rollouts(
    model: LlamaForCausalLM,
    prompt_ids: Sequence[Sequence[int]],
    *,
    num_generations: int,
    max_new_tokens: int,
    key: jax.Array,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> Rollout:
    """Sample ``num_generations`` completions of every prompt (token id lists) in one batch (see the module doc)."""
    prompts = [[int(t) for t in p] for p in prompt_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if num_generations < 1 or max_new_tokens < 1:
        raise ValueError(f"need num_generations >= 1 and max_new_tokens >= 1, got {num_generations}, "
                         f"{max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    cfg = model.config
    V = cfg.vocab_size
    flat = [t for p in prompts for t in p]
    if min(flat) < 0 or max(flat) >= V:
        raise ValueError(f"prompt token ids must be in [0, {V}), got {min(flat)}..{max(flat)}")
    P = bucket(max(len(p) for p in prompts))
    T = bucket(max_new_tokens)
    if cfg.rope.rope_type == "longrope" and P + T > cfg.rope.original_max_position_embeddings:
        raise ValueError("rollouts past LongRoPE's original_max_position_embeddings "
                         f"({cfg.rope.original_max_position_embeddings}) are not supported: the cache would need "
                         "recomputing with the long factors")
    G = num_generations
    B = len(prompts) * G
    ids_BP = np.full((B, P), pad_id, np.int32)
    mask_BP = np.zeros((B, P), np.int32)
    pad_B = np.zeros((B,), np.int32)
    for g, p in enumerate(prompts):
        rows = slice(g * G, (g + 1) * G)
        pad_B[rows] = P - len(p)
        ids_BP[rows, P - len(p):] = p
        mask_BP[rows, P - len(p):] = 1
    stop = np.asarray(list(stop_ids) or [-1], np.int32)  # -1: no stop id (never generated)
    graphdef, state = nnx.split(model)
    tok, mask, lp, truncated = _rollout_jit(
        _Static(graphdef), T, state, jnp.asarray(ids_BP), jnp.asarray(pad_B), jnp.int32(max_new_tokens), key,
        jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k), jnp.asarray(stop), jnp.int32(pad_id))
    mask = np.asarray(mask)
    C = max(int(mask.sum(-1).max()), 1)
    return Rollout(ids_BP, mask_BP, np.asarray(tok)[:, :C], mask[:, :C], np.asarray(lp)[:, :C],
                   np.asarray(truncated), G)
