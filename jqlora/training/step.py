"""The pure train step: chunked cross-entropy, the model cut into LoRA params and frozen state, jitted micro-steps.

Loss normalization. An optimizer step sees k = train.grad_accum_steps micro-batches holding N trained tokens in all
(the loop fetches the k micro-batches first and counts their loss_mask). The step loss is the mean over those N
tokens, L = (1/N) Σ_tokens ℓ. Micro-step j computes the gradient of (k/N) Σ_{tokens in j} ℓ; `optax.MultiSteps`
averages the k micro-gradients, (1/k) Σ_j (k/N) ∇Σ_j ℓ = ∇L, so k micro-batches give exactly the update of one
k-times-larger batch, however the trained tokens are spread over the micro-batches.

MoE load-balancing loss (train.router_aux_loss_coef = c > 0, models with experts only). Each micro-batch's objective
is its share of the mean CE plus c · aux, aux = `moe.load_balancing_loss` of that micro-batch's router logits over
every layer, its real tokens (segment_ids > 0, transformers' attention_mask). At k = 1 the step loss is exactly
transformers' MixtralForCausalLM ``loss`` (mean CE + router_aux_loss_coef · aux_loss, output_router_logits=True).
With k > 1 micro-step j differentiates (k/N) Σ_j ℓ + c · aux_j, so the step's loss is the mean CE over the N
tokens plus c · (1/k) Σ_j aux_j: the mean of the micro-batches' aux losses, as transformers' Trainer accumulates
(aux is a product of two token means, so it is not the aux of the k-times-larger batch: accumulation = big batch
holds for the CE term only). The returned Σℓ then includes c · aux_j · N/k, so Σ_j / N is that step loss.
Evaluation (`make_eval_step`, `make_eval_stats_step`) reports the CE alone.

Cross-entropy is computed in chunks of `ce_chunk` tokens (a `jax.lax.scan` over a `jax.checkpoint`-ed chunk body):
logits [chunk, V] in float32 exist for one chunk at a time, and are recomputed in the backward pass, so the
[B·S, V] float32 logits are never materialized.

With a quantized head (``train.memory=min``, `models.layers.QuantHead`) each chunk also walks the vocabulary in
blocks of R rows (a `jax.lax.scan` over a checkpointed block body): the block's rows are dequantized, its logits
[C, R] formed, and a running logsumexp kept, m ← max(m, max z), s ← s·e^(m_old − m) + Σ e^(z − m), lse = m + log s
(m held constant for the gradient: d lse / dz = softmax either way). Neither the [V, D] head in the compute dtype
nor the [C, V] logits is ever live; the backward recomputes each block. The last block starts at V − R when R does
not divide V, and the columns its predecessor already counted are masked out.

The step is `jax.jit(step, donate_argnums=(0, 1))(lora_params, opt_state, frozen_state, batch, rng, grad_scale)`;
lora_params is a plain nested dict (`nnx.State.to_pure_dict()` of the `nnx.LoRAParam` state), frozen_state the
rest of the model (`nnx.split(model, nnx.LoRAParam, ...)`), so only LoRA leaves have gradients and optimizer state.
Shapes: B batch rows, S sequence, D hidden, V vocabulary, T = B·S tokens, C tokens per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jqlora.lora import SplitModel
from jqlora.models.sequence import splits, token_sum
from jqlora.models import QuantHead

CE_CHUNK = 1024  # tokens per cross-entropy chunk
STEP_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def _token_chunks(h_BSD: jax.Array, targets_BS: jax.Array, mask_BS: jax.Array, chunk: int):
    """(h [n, C, D], targets [n, C], mask [n, C]): the B·S tokens in n chunks of C, zero-padded (mask 0)."""
    D = h_BSD.shape[-1]
    h_TD = h_BSD.reshape(-1, D)
    t_T = targets_BS.reshape(-1).astype(jnp.int32)
    m_T = mask_BS.reshape(-1).astype(jnp.float32)
    T = h_TD.shape[0]
    c = max(1, min(int(chunk), T))
    n = -(-T // c)
    pad = n * c - T
    if pad:
        h_TD = jnp.pad(h_TD, ((0, pad), (0, 0)))
        t_T = jnp.pad(t_T, (0, pad))
        m_T = jnp.pad(m_T, (0, pad))
    return h_TD.reshape(n, c, D), t_T.reshape(n, c), m_T.reshape(n, c)


def _chunk_logits(h_CD: jax.Array, w_VD: jax.Array, logit_cap: float | None) -> jax.Array:
    """float32 logits [C, V] of one chunk, soft-capped to ``logit_cap`` · tanh(z / ``logit_cap``) when given."""
    logits_CV = jax.lax.dot_general(h_CD, w_VD, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return logits_CV if logit_cap is None else jnp.tanh(logits_CV / logit_cap) * logit_cap


def head_stats(h_CD: jax.Array, head: jax.Array | QuantHead, t_C: jax.Array, logit_cap: float | None = None):
    """(logsumexp z, z[target], Σ_v z, argmax z) per token, float32 [C] each, z = h headᵀ (soft-capped): from the
    whole [C, V] logits for a plain ``[V, D]`` head, block by block for a `QuantHead` (the module docstring)."""
    if not isinstance(head, QuantHead):
        logits_CV = _chunk_logits(h_CD, head, logit_cap)
        lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
        tgt_C = jnp.take_along_axis(logits_CV, t_C[:, None], axis=-1)[:, 0]
        return lse_C, tgt_C, jnp.sum(logits_CV, axis=-1), jnp.argmax(logits_CV, axis=-1)
    V, R, C = head.vocab, head.block_rows, h_CD.shape[0]
    n = -(-V // R)

    @jax.checkpoint
    def block(carry, i):
        m_C, s_C, tgt_C, sum_C, best_C, arg_C = carry
        start = jnp.minimum(i * R, V - R)
        cols_R = start + jnp.arange(R, dtype=jnp.int32)
        fresh_R = cols_R >= i * R  # (the last block's first columns were counted by the block before)
        logits_CR = _chunk_logits(h_CD, head.rows(start, R), logit_cap)
        z_CR = jnp.where(fresh_R[None, :], logits_CR, -jnp.inf)
        zmax_C = jnp.max(z_CR, axis=-1)
        new_m_C = jax.lax.stop_gradient(jnp.maximum(m_C, zmax_C))
        s_C = s_C * jnp.exp(m_C - new_m_C) + jnp.sum(jnp.exp(z_CR - new_m_C[:, None]), axis=-1)
        hit_CR = (cols_R[None, :] == t_C[:, None]) & fresh_R[None, :]
        tgt_C = tgt_C + jnp.sum(jnp.where(hit_CR, logits_CR, 0.0), axis=-1)
        sum_C = sum_C + jnp.sum(jnp.where(fresh_R[None, :], logits_CR, 0.0), axis=-1)
        better_C = zmax_C > best_C  # (strictly: the first maximum wins, as jnp.argmax)
        arg_C = jnp.where(better_C, start + jnp.argmax(z_CR, axis=-1).astype(jnp.int32), arg_C)
        best_C = jnp.where(better_C, zmax_C, best_C)
        return (new_m_C, s_C, tgt_C, sum_C, best_C, arg_C), None

    zero = jnp.zeros((C,), jnp.float32)
    ninf = jnp.full((C,), -jnp.inf, jnp.float32)
    init = (ninf, zero, zero, zero, ninf, jnp.zeros((C,), jnp.int32))
    (m_C, s_C, tgt_C, sum_C, _, arg_C), _ = jax.lax.scan(block, init, jnp.arange(n, dtype=jnp.int32))
    return m_C + jnp.log(s_C), tgt_C, sum_C, arg_C


def chunked_ce_sum(h_BSD: jax.Array, w_VD: jax.Array | QuantHead, targets_BS: jax.Array, mask_BS: jax.Array,
                   chunk: int = CE_CHUNK, logit_cap: float | None = None) -> jax.Array:
    """Σ mask · (logsumexp(z) - z[target]) in float32 with z = h wᵀ (soft-capped to ``logit_cap`` · tanh(z /
    ``logit_cap``) when given, Gemma 2's final logits), over chunks of `chunk` tokens (B S tokens in all); ``w_VD``
    may be a `QuantHead` (read block by block: the module docstring)."""

    @jax.checkpoint
    def body(total, xs):
        h_CD, t_C, m_C = xs
        lse_C, tgt_C, _, _ = head_stats(h_CD, w_VD, t_C, logit_cap)
        return total + jnp.sum((lse_C - tgt_C) * m_C), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), _token_chunks(h_BSD, targets_BS, mask_BS, chunk))
    return total


def chunked_ce_and_correct(h_BSD: jax.Array, w_VD: jax.Array | QuantHead, targets_BS: jax.Array, mask_BS: jax.Array,
                           chunk: int = CE_CHUNK, logit_cap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(`chunked_ce_sum`, Σ mask · [argmax(z) = target]): the loss and the trained tokens predicted right (for
    evaluation: token accuracy), in one pass over the same chunks."""

    def body(carry, xs):
        total, right = carry
        h_CD, t_C, m_C = xs
        lse_C, tgt_C, _, arg_C = head_stats(h_CD, w_VD, t_C, logit_cap)
        hit_C = (arg_C == t_C).astype(jnp.float32)
        return (total + jnp.sum((lse_C - tgt_C) * m_C), right + jnp.sum(hit_C * m_C)), None

    zero = jnp.zeros((), jnp.float32)
    (total, right), _ = jax.lax.scan(body, (zero, zero), _token_chunks(h_BSD, targets_BS, mask_BS, chunk))
    return total, right


def full_ce_sum(logits_BSV: jax.Array, targets_BS: jax.Array, mask_BS: jax.Array) -> jax.Array:
    """The plain reference: Σ mask · cross-entropy from full logits."""
    logp = jax.nn.log_softmax(logits_BSV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets_BS[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(nll * mask_BS.astype(jnp.float32))


def _ce(model, ce_fn: Callable, h_BSD: jax.Array, batch: dict, ce_chunk: int):
    """``ce_fn`` (`chunked_ce_sum` or `chunked_ce_and_correct`) of the batch; with the tokens split over a seq mesh
    axis (`jqlora.models.sequence`) each device's own tokens in chunks, summed over the mesh: the same sums."""
    def ce(h, w, t, m):
        return ce_fn(h, w, t, m, ce_chunk, logit_cap=model.config.final_softcap)

    args = (h_BSD, model.ce_head(), batch["targets"], batch["loss_mask"])
    mesh = getattr(model, "seq_mesh", None)
    return token_sum(mesh, ce, *args) if splits(mesh, *h_BSD.shape[:2]) else ce(*args)


def make_loss_fn(split: SplitModel, ce_chunk: int = CE_CHUNK, packed: bool = True,
                 aux_coef: float = 0.0, neftune_alpha: float = 0.0) -> Callable:
    """loss_fn(lora, frozen, batch, rng, deterministic) -> (Σ token losses, number of trained tokens), and with
    ``aux_coef`` > 0 a third value: the micro-batch's MoE load-balancing loss (see the module docstring).

    ``packed=False`` (rows of one right-padded example each, data.packing=false) leaves the segment ids out of
    attention: causality alone keeps every real token from the padding after it, and padding carries no loss, so
    the loss and its gradient are the same, with plain causal attention (cuDNN's cheapest mask).

    ``neftune_alpha`` > 0 (train.neftune_alpha): NEFTune's noise on the embedding outputs when not
    ``deterministic`` (training), from the micro-step's key; evaluation (deterministic) never sees it."""
    if aux_coef and not split.model().config.num_experts:
        raise ValueError(f"train.router_aux_loss_coef: {aux_coef} needs a model with experts (Mixtral, Qwen3-MoE); "
                         "this model has a dense MLP: set it to 0")

    def loss_fn(lora, frozen, batch, rng, deterministic=False):
        from jqlora.models import moe

        model = nnx.merge(split.graphdef, split.to_state(lora), frozen)
        mask_BS = (jnp.asarray(batch["segment_ids"]) > 0).astype(jnp.float32) if aux_coef else None
        out = model.hidden_states(batch["input_ids"], batch["segment_ids"] if packed else None,
                                  batch["positions"], deterministic=deterministic, key=rng,
                                  router_stats_mask=mask_BS, embed_noise=neftune_alpha)
        h_BSD, stats_L2E = out if aux_coef else (out, None)
        loss_sum = _ce(model, chunked_ce_sum, h_BSD, batch, ce_chunk)
        n = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        if not aux_coef:
            return loss_sum, n
        return loss_sum, n, moe.aux_from_stats(stats_L2E, mask_BS.reshape(-1), mask_BS.size)

    return loss_fn


def make_grad_fn(split: SplitModel, ce_chunk: int = CE_CHUNK, packed: bool = True,
                 aux_coef: float = 0.0, neftune_alpha: float = 0.0) -> Callable:
    """grad_fn(lora, frozen, batch, rng, grad_scale) -> (∇ objective, Σℓ); not jitted. The objective is
    grad_scale · Σℓ, plus ``aux_coef`` · aux when > 0 (then the returned Σℓ holds aux_coef · aux / grad_scale
    too: see the module docstring)."""
    loss_fn = make_loss_fn(split, ce_chunk, packed, aux_coef, neftune_alpha)

    def scaled(lora, frozen, batch, rng, grad_scale):
        out = loss_fn(lora, frozen, batch, rng)
        if not aux_coef:
            return out[0] * grad_scale, out[0]
        objective = out[0] * grad_scale + aux_coef * out[2]
        return objective, objective / grad_scale

    def grad_fn(lora, frozen, batch, rng, grad_scale):
        grads, loss_sum = jax.grad(scaled, has_aux=True)(lora, frozen, batch, rng, grad_scale)
        return grads, loss_sum

    return grad_fn


def make_train_step(split: SplitModel, tx, ce_chunk: int = CE_CHUNK, packed: bool = True,
                    aux_coef: float = 0.0, neftune_alpha: float = 0.0) -> Callable:
    """The jitted micro-step (lora, opt_state, frozen, batch, rng, grad_scale) -> (lora, opt_state, Σℓ)."""
    grad_fn = make_grad_fn(split, ce_chunk, packed, aux_coef, neftune_alpha)

    def step(lora, opt_state, frozen, batch, rng, grad_scale):
        grads, loss_sum = grad_fn(lora, frozen, batch, rng, grad_scale)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax_apply(lora, updates), opt_state, loss_sum

    return jax.jit(step, donate_argnums=(0, 1))


def optax_apply(params, updates):
    import optax

    return optax.apply_updates(params, updates)


def make_eval_step(split: SplitModel, ce_chunk: int = CE_CHUNK) -> Callable:
    loss_fn = make_loss_fn(split, ce_chunk)
    return jax.jit(lambda lora, frozen, batch: loss_fn(lora, frozen, batch, None, deterministic=True))


def make_eval_stats_step(split: SplitModel, ce_chunk: int = CE_CHUNK) -> Callable:
    """eval(lora, frozen, batch) -> (Σ token losses, trained tokens, trained tokens predicted right), no dropout."""

    def stats(lora, frozen, batch):
        model = nnx.merge(split.graphdef, split.to_state(lora), frozen)
        h_BSD = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"],
                                    deterministic=True, key=None)
        loss_sum, right = _ce(model, chunked_ce_and_correct, h_BSD, batch, ce_chunk)
        return loss_sum, jnp.sum(batch["loss_mask"].astype(jnp.float32)), right

    return jax.jit(stats)


def step_batch(batch: dict) -> dict:
    return {k: batch[k] for k in STEP_KEYS}
