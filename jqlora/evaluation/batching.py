"""Batched scoring and generation on jqlora's own model, padded to bucketed shapes so one compile serves many requests.

Scoring (what lm-eval's ``loglikelihood`` and ``loglikelihood_rolling`` need): a row is token ids ``x_0 .. x_n`` of
which the last ``c`` are the continuation. The model reads ``x_0 .. x_{n-1}`` and the row's score is

    log p(continuation) = Σ_{t = n-c}^{n-1} log softmax(z_t)[x_{t+1}],   greedy = ∀t: argmax z_t = x_{t+1}

(z_t the float32 logits at position t), the quantity lm-eval's ``hf`` backend computes. Rows are right-padded to
S = `jqlora.models.decode.bucket` (longest row) slots and the batch to a fixed B rows; padding is segment 0 (the model
keeps it apart from the real tokens, segment 1) and carries no score. The log-softmax, the gather and the sums run
inside the jitted program, so only ``[B]`` floats leave it, never ``[B, S, V]`` logits. One program per (B, S).

Generation (``generate_until``): the KV-cache decoder (`jqlora.models.decode.generate_stream`), the prompts left-padded
there, the batch padded here to B rows with copies of its last prompt, so the step compiles once per (B, cache length).
Decoding stops as soon as every row has emitted an EOS id or its text holds a stop string.

Shape letters: B rows, S token slots, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora.models.decode import bucket, generate_stream


def _score_rows(model, ids_BS, targets_BS, scored_BS, segment_BS):
    logits_BSV = model(ids_BS, segment_ids=segment_BS)
    logp_BSV = jax.nn.log_softmax(logits_BSV.astype(jnp.float32), axis=-1)
    token_BS = jnp.take_along_axis(logp_BSV, targets_BS[..., None], axis=-1)[..., 0]
    greedy_BS = jnp.argmax(logits_BSV, axis=-1).astype(jnp.int32) == targets_BS
    logp_B = jnp.sum(jnp.where(scored_BS, token_BS, 0.0), axis=-1)
    greedy_B = jnp.all(greedy_BS | ~scored_BS, axis=-1)
    return logp_B, greedy_B


class Scorer:
    """Scores rows of token ids with one model (see the module docstring); `compiles` counts the programs built."""

    def __init__(self, model, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.graphdef, self.state = nnx.split(model)
        graphdef = self.graphdef
        self._fn = jax.jit(lambda state, *arrays: _score_rows(nnx.merge(graphdef, state), *arrays))

    def update(self, model) -> None:
        """Score with ``model``'s values from now on (the same structure: e.g. the adapters after more training)."""
        graphdef, self.state = nnx.split(model)
        assert graphdef == self.graphdef, "Scorer.update needs a model of the same structure"

    @property
    def compiles(self) -> int:
        return self._fn._cache_size()

    def score(self, rows: Sequence[tuple[Sequence[int], int]],
              on_batch: Callable[[int], object] | None = None) -> list[tuple[float, bool]]:
        """(log-probability of the last ``c`` tokens given the ones before, whether each is the argmax) per row
        ``(ids, c)``, ``1 <= c < len(ids)``, in the order given; rows of similar length should come together.
        ``on_batch(n)`` is called after each batch of n rows (a progress bar)."""
        out: list[tuple[float, bool]] = []
        B = self.batch_size
        for i in range(0, len(rows), B):
            chunk = rows[i:i + B]
            S = bucket(max(len(ids) - 1 for ids, _ in chunk))
            ids_BS = np.zeros((B, S), np.int32)
            targets_BS = np.zeros((B, S), np.int32)
            scored_BS = np.zeros((B, S), bool)
            segment_BS = np.zeros((B, S), np.int32)
            for b, (ids, c) in enumerate(chunk):
                n = len(ids) - 1
                if not 1 <= c <= n:
                    raise ValueError(f"a row of {len(ids)} tokens cannot score its last {c}")
                ids_BS[b, :n] = ids[:-1]
                targets_BS[b, :n] = ids[1:]
                scored_BS[b, n - c:n] = True
                segment_BS[b, :n] = 1
            logp_B, greedy_B = self._fn(self.state, *map(jnp.asarray, (ids_BS, targets_BS, scored_BS, segment_BS)))
            logp_B, greedy_B = np.asarray(logp_B), np.asarray(greedy_B)
            out += [(float(logp_B[b]), bool(greedy_B[b])) for b in range(len(chunk))]
            if on_batch is not None:
                on_batch(len(chunk))
        return out


def generate_rows(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    finished: Callable[[list[int]], bool],
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> list[list[int]]:
    """The new tokens of every prompt, up to and including its first EOS id (at most ``max_new_tokens``), decoding
    ``batch_size`` rows at a time; a batch stops early once every row has ended or ``finished(its tokens)``."""
    eos = {int(e) for e in eos_ids}
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[i:i + batch_size]]
        n = len(chunk)
        rows: list[list[int]] = [[] for _ in range(n)]
        ended = [False] * n
        padded = chunk + [chunk[-1]] * (batch_size - n)
        for tok_B in generate_stream(model, padded, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, top_k=top_k, eos_token_id=sorted(eos) or None, seed=seed):
            for b in range(n):
                if ended[b]:
                    continue
                t = int(tok_B[b])
                rows[b].append(t)
                ended[b] = t in eos or finished(rows[b])
            if all(ended):
                break
        out += rows
    return out
