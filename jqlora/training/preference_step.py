"""The preference train step: per-sequence completion log-probs of the policy and of the reference, the objective of
`jqlora.training.preference`, and the jitted micro-step that `optax.MultiSteps` accumulates.

The reference is the same model with another adapter tree under `stop_gradient`: the adapter-off base (every A / B
zero, DoRA magnitudes the base's row norms: exactly the frozen 4-bit base, no copy of its weights) or, with
``preference.reference=init``, the adapter the run started from (``lora.init_from``). It runs on the same batch in
the same step, deterministically (no LoRA dropout; TRL's peft reference disables the adapter). ORPO and SimPO have
none. KTO's mismatched rows run through the policy with no gradient (TRL computes them under no_grad). The reference
pass is not shared with the policy pass (their adapters differ from the first update on): it is a second forward
over the same rows, with no backward and nothing kept for one (`jax.named_scope` "policy" / "reference" in the HLO).

Log-probs per token are computed in chunks of ``ce_chunk`` tokens (a `jax.lax.scan` over a `jax.checkpoint`-ed
body, as the SFT loss does), so the [2B·S, V] float32 logits are never materialized; with them comes each token's
mean logit over the vocabulary (TRL's ``logits/*`` metrics, no gradient).

Accumulation (k micro-batches, N valid examples in the step): micro-step j differentiates (k/N) · Σ_j ℓ_i + b_j, b_j
the micro-batch's NLL term (ORPO / SimPO with cpo_alpha); MultiSteps averages the k gradients, so the step
minimizes (1/N) Σ ℓ_i + (1/k) Σ_j b_j: the mean over every pair of the step, plus the mean over micro-batches of
their token-mean NLL (TRL's Trainer: each micro-batch's loss is its own mean). With micro-batches of equal size this
is TRL's loss under gradient accumulation, term for term.

Shapes: B pairs (or KTO examples), S sequence, R = 2B rows, D hidden, V vocabulary, T = R·S tokens, C chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jqlora.lora import SplitModel
from jqlora.training import preference as P
from jqlora.models import QuantHead
from jqlora.training.step import CE_CHUNK, _token_chunks, head_stats, optax_apply

PAIR_STEP_KEYS = ("input_ids", "targets", "completion_mask", "token_mask", "segment_ids", "positions", "valid")
KTO_STEP_KEYS = PAIR_STEP_KEYS + ("label",)


def token_logps(h_BSD: jax.Array, w_VD: jax.Array | QuantHead, targets_BS: jax.Array, chunk: int = CE_CHUNK,
                logit_cap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(log p(target) [B, S], mean logit over the vocabulary [B, S], no gradient) in float32, chunk by chunk."""
    B, S = targets_BS.shape
    ones = jnp.ones(targets_BS.shape, jnp.float32)

    V = w_VD.vocab if isinstance(w_VD, QuantHead) else w_VD.shape[0]

    @jax.checkpoint
    def body(_, xs):
        h_CD, t_C, _m = xs
        lse_C, tgt_C, sum_C, _ = head_stats(h_CD, w_VD, t_C, logit_cap)  # (a QuantHead block by block)
        return None, (tgt_C - lse_C, jax.lax.stop_gradient(sum_C / V))

    _, (lp_NC, ml_NC) = jax.lax.scan(body, None, _token_chunks(h_BSD, targets_BS, ones, chunk))
    return lp_NC.reshape(-1)[:B * S].reshape(B, S), ml_NC.reshape(-1)[:B * S].reshape(B, S)


def _rows(x):
    """[B, 2, ...] -> [2B, ...] (pair i's rows at 2i and 2i + 1)."""
    return x.reshape((-1,) + x.shape[2:])


def make_forward(split: SplitModel, ce_chunk: int = CE_CHUNK) -> Callable:
    """forward(lora, frozen, batch, rng, deterministic) -> (log p [2B, S], mean logit [2B, S]) of every row."""

    def forward(lora, frozen, batch, rng, deterministic):
        model = nnx.merge(split.graphdef, split.to_state(lora), frozen)
        # rows are right-padded, one example each: causality alone keeps real tokens from the padding
        h = model.hidden_states(_rows(batch["input_ids"]), None, _rows(batch["positions"]),
                                deterministic=deterministic, key=rng)
        return token_logps(h, model.ce_head(), _rows(batch["targets"]), ce_chunk,
                           logit_cap=model.config.final_softcap)

    return forward


def make_preference_loss(split: SplitModel, obj: P.Objective, ce_chunk: int = CE_CHUNK) -> Callable:
    """loss_fn(lora, ref_lora, frozen, batch, rng, deterministic) -> `preference.Result` of one micro-batch."""
    forward = make_forward(split, ce_chunk)
    sg = jax.lax.stop_gradient

    def sums(lp_RS, mask_BTS):
        return jnp.sum(lp_RS * _rows(mask_BTS).astype(jnp.float32), axis=-1).reshape(-1, 2)

    def loss_fn(lora, ref_lora, frozen, batch, rng, deterministic=False):
        with jax.named_scope("policy"):  # (the passes' names in the compiled HLO: tests/aot, profiles)
            lp, ml = forward(lora, frozen, batch, rng, deterministic)
        cm = batch["completion_mask"]
        seq, mls = sums(lp, cm), sums(ml, cm)
        n = jnp.sum(cm.astype(jnp.float32), axis=-1)  # [B, 2]
        valid = batch["valid"].astype(jnp.float32)
        ref = None
        if obj.uses_reference:
            with jax.named_scope("reference"):
                rlp, _ = forward(sg(ref_lora), frozen, batch, None, True)
            ref = sg(sums(rlp, cm))
        if obj.kind == "kto":
            pol = P.KtoStats(seq[:, 0], sg(seq[:, 1]), mls[:, 0])
            return P.kto(obj, pol, P.KtoStats(ref[:, 0], ref[:, 1]), P.KtoMasks(batch["label"], n[:, 0], valid))
        nll_sum = nll_count = None
        if obj.kind == "orpo" or (obj.kind == "simpo" and obj.cpo_alpha):
            mask = batch["token_mask"] if obj.kind == "orpo" else cm  # ORPO: the whole chosen row; CPO: completion
            m = mask[:, 0].astype(jnp.float32) * valid[:, None]
            nll_sum = -jnp.sum(lp.reshape(-1, 2, lp.shape[-1])[:, 0] * m)
            nll_count = jnp.sum(m)
        masks = P.PairMasks(n[:, 0], n[:, 1], valid, nll_sum, nll_count)
        pol = P.PairStats(seq[:, 0], seq[:, 1], mls[:, 0], mls[:, 1])
        return P.paired_loss(obj, pol, None if ref is None else P.PairStats(ref[:, 0], ref[:, 1]), masks)

    return loss_fn


def make_preference_train_step(split: SplitModel, tx, obj: P.Objective, ce_chunk: int = CE_CHUNK) -> Callable:
    """The jitted micro-step (lora, opt_state, ref_lora, frozen, batch, rng, grad_scale) -> (lora, opt_state, the
    micro-batch's share of the step loss × k, its metrics); grad_scale = k / N (see the module docstring)."""
    loss_fn = make_preference_loss(split, obj, ce_chunk)

    def objective(lora, ref_lora, frozen, batch, rng, grad_scale):
        res = loss_fn(lora, ref_lora, frozen, batch, rng)
        return res.loss_sum * grad_scale + res.batch_loss, res.metrics

    def step(lora, opt_state, ref_lora, frozen, batch, rng, grad_scale):
        (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(lora, ref_lora, frozen, batch, rng,
                                                                              grad_scale)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax_apply(lora, updates), opt_state, value, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def make_preference_eval_step(split: SplitModel, obj: P.Objective, ce_chunk: int = CE_CHUNK) -> Callable:
    """eval(lora, ref_lora, frozen, batch) -> (the micro-batch's loss, TRL's; its metrics), no dropout."""
    loss_fn = make_preference_loss(split, obj, ce_chunk)

    def ev(lora, ref_lora, frozen, batch):
        res = loss_fn(lora, ref_lora, frozen, batch, None, deterministic=True)
        return res.loss(jnp.maximum(jnp.sum(batch["valid"]), 1.0)), res.metrics

    return jax.jit(ev)


def base_reference(split: SplitModel, lora: dict) -> dict:
    """The adapter tree that makes the model its adapter-off base: A, B zero; DoRA magnitudes ‖W‖ per row."""
    zeros = jax.tree.map(jnp.zeros_like, lora)
    model = split.model(zeros)
    for _, m in model.iter_modules():
        if getattr(m, "magnitude", None) is not None and hasattr(m, "reset_magnitude"):
            m.reset_magnitude()
    return nnx.state(model, nnx.LoRAParam).to_pure_dict()


def step_keys(obj: P.Objective) -> tuple[str, ...]:
    return KTO_STEP_KEYS if obj.kind == "kto" else PAIR_STEP_KEYS
