"""Preference objectives as pure functions: (policy log-probs, reference log-probs, masks) -> (loss, metrics).

Each is TRL 1.16's, term for term (`trl.DPOTrainer`, `trl.experimental.cpo.CPOTrainer` with loss_type="simpo",
`trl.experimental.orpo.ORPOTrainer`, `trl.KTOTrainer`). Per pair (or KTO example) i of a micro-batch, with π / ρ
the policy / reference log-probability of a completion summed over its tokens, n its number of tokens, β
``preference.beta``, ε ``preference.label_smoothing`` and σ the logistic function:

    Δ_i = (π_c - ρ_c) - (π_r - ρ_r)                                    (the DPO margin; c chosen, r rejected)
    sigmoid   ℓ = -(1-ε) log σ(βΔ) - ε log σ(-βΔ)                     (Rafailov et al. 2023; ε > 0: cDPO)
    hinge     ℓ = max(0, 1 - βΔ)                                      (SLiC, Zhao et al. 2023)
    ipo       ℓ = ((π_c-ρ_c)/n_c - (π_r-ρ_r)/n_r - 1/(2β))²           (Azar et al. 2023; TRL's per-token form)
    robust    ℓ = (-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)        (Chowdhury et al. 2024)
    simpo     ℓ = -(1-ε) log σ(β(p_c - p_r) - γ) - ε log σ(-β(p_c - p_r) + γ),  p = π / n   (Meng et al. 2024),
              plus α · NLL of the chosen completions (CPO's cpo_alpha; 0 for SimPO), no reference
    orpo      ℓ = -β log σ(o),  o = (p_c - p_r) - (log(1 - e^{p_c}) - log(1 - e^{p_r})),  p = π / n
              (Hong et al. 2024), plus the NLL of the chosen *rows* (prompt and completion: TRL 1.16's), no reference
    kto       ℓ = w_d (1 - σ(β(π-ρ - z)))  desirable,  w_u (1 - σ(β(z - (π-ρ))))  undesirable   (Ethayarajh et al.
              2024), z = max(0, mean_i(π'_i - ρ'_i)) over the micro-batch's mismatched (prompt_i, completion_{i-1})
              pairs, no gradient through z

Normalization (what `jqlora.training.preference_step` builds on): the per-example terms are returned summed over the
micro-batch's valid examples, so that the step divides by the number of examples of the whole accumulated step (the
mean over pairs across micro-batches, like SFT's mean over tokens); the NLL terms of ORPO / CPO are a mean over the
micro-batch's tokens, and the step averages them over its micro-batches, as TRL's Trainer does with gradient
accumulation (each micro-batch's loss is a token mean there).

Metrics are TRL's, per micro-batch: ``rewards/chosen`` = mean β(π_c - ρ_c) (DPO, KTO) or β p_c (ORPO, SimPO),
``rewards/rejected`` likewise, ``rewards/accuracies`` = mean [r_c > r_r], ``rewards/margins`` = mean (r_c - r_r),
``logps/chosen`` / ``logps/rejected`` = mean π (p for ORPO / SimPO), ``logits/chosen`` / ``logits/rejected`` = the
mean over the completion tokens of the mean logit over the vocabulary; ORPO adds ``nll_loss``, ``log_odds_ratio`` =
mean log σ(o), ``log_odds_chosen`` = mean o; SimPO ``nll_loss``; KTO ``kl`` = z. A KTO metric a micro-batch cannot
have (no desirable example) is NaN there; a step's metric is the mean over its micro-batches that have it.

Everything is dtype-preserving (float64 in, float64 out), no Flax, no files.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto")
PREFERENCE_OBJECTIVES = OBJECTIVES[1:]
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
REFERENCE_FREE = ("orpo", "simpo")  # no reference pass
PAIRED = ("dpo", "orpo", "simpo")


@dataclasses.dataclass(frozen=True)
class Objective:
    """The static settings of one preference objective (from the ``preference`` config section)."""

    kind: str = "dpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @classmethod
    def from_config(cls, objective: str, pref) -> "Objective":
        return cls(kind=objective, beta=float(pref.beta), loss_type=pref.loss_type,
                   label_smoothing=float(pref.label_smoothing), simpo_gamma=float(pref.simpo_gamma),
                   cpo_alpha=float(pref.cpo_alpha), desirable_weight=float(pref.kto_desirable_weight),
                   undesirable_weight=float(pref.kto_undesirable_weight))

    @property
    def uses_reference(self) -> bool:
        return self.kind not in REFERENCE_FREE


class PairStats(NamedTuple):
    """Per-pair sums of one micro-batch [B] (chosen c, rejected r), from one model (policy or reference)."""

    logps_c: jax.Array  # Σ log p over the chosen completion's tokens
    logps_r: jax.Array
    mean_logits_c: jax.Array | None = None  # Σ over those tokens of the mean logit over the vocabulary (metrics)
    mean_logits_r: jax.Array | None = None


class PairMasks(NamedTuple):
    n_c: jax.Array  # [B] completion tokens of the chosen
    n_r: jax.Array  # [B] of the rejected
    valid: jax.Array  # [B] 1 for a real pair, 0 for a padding row
    nll_sum: jax.Array | None = None  # scalar: Σ -log p over the NLL tokens (ORPO: chosen rows; CPO: chosen completions)
    nll_count: jax.Array | None = None  # scalar: their number


class Result(NamedTuple):
    loss_sum: jax.Array  # Σ over the valid examples of their per-example loss (the step divides by its examples)
    batch_loss: jax.Array  # a per-micro-batch term (ORPO / CPO NLL; 0 otherwise): the step averages it
    metrics: dict  # TRL's names -> per-micro-batch values (NaN where a micro-batch has none)

    def loss(self, n_examples) -> jax.Array:
        """The micro-batch's own loss, TRL's: the mean over its examples plus its batch term."""
        return self.loss_sum / n_examples + self.batch_loss


def _mean(x, valid):
    n = jnp.sum(valid)
    return jnp.sum(x * valid) / jnp.maximum(n, 1)


def _log1mexp(x):
    """log(1 - e^x) for x < 0, by the branch at -ln 2 that avoids cancellation (Mächler 2012)."""
    return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(jnp.minimum(x, -math.log(2.0)))),
                     jnp.log(-jnp.expm1(jnp.maximum(x, -math.log(2.0)))))


def _logits_metrics(stats: PairStats, masks: PairMasks, valid) -> dict:
    if stats.mean_logits_c is None:
        return {}
    c = jnp.sum(stats.mean_logits_c * valid) / jnp.maximum(jnp.sum(masks.n_c * valid), 1)
    r = jnp.sum(stats.mean_logits_r * valid) / jnp.maximum(jnp.sum(masks.n_r * valid), 1)
    return {"logits/chosen": c, "logits/rejected": r}


def _reward_metrics(r_c, r_r, lp_c, lp_r, valid) -> dict:
    return {"rewards/chosen": _mean(r_c, valid), "rewards/rejected": _mean(r_r, valid),
            "rewards/accuracies": _mean((r_c > r_r).astype(r_c.dtype), valid),
            "rewards/margins": _mean(r_c - r_r, valid),
            "logps/chosen": _mean(lp_c, valid), "logps/rejected": _mean(lp_r, valid)}


def _smoothed_sigmoid(z, eps):
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def dpo(obj: Objective, policy: PairStats, reference: PairStats, masks: PairMasks) -> Result:
    """DPO and its loss_type variants (sigmoid / cDPO, ipo, hinge, robust); see the module docstring."""
    valid = masks.valid.astype(policy.logps_c.dtype)
    ratio_c = policy.logps_c - jax.lax.stop_gradient(reference.logps_c)
    ratio_r = policy.logps_r - jax.lax.stop_gradient(reference.logps_r)
    delta = ratio_c - ratio_r
    beta, eps = obj.beta, obj.label_smoothing
    if obj.loss_type == "sigmoid":
        per = _smoothed_sigmoid(beta * delta, eps)
    elif obj.loss_type == "hinge":
        per = jax.nn.relu(1.0 - beta * delta)
    elif obj.loss_type == "ipo":
        d = ratio_c / jnp.maximum(masks.n_c, 1) - ratio_r / jnp.maximum(masks.n_r, 1)
        per = (d - 1.0 / (2.0 * beta)) ** 2
    elif obj.loss_type == "robust":
        per = ((1.0 - eps) * -jax.nn.log_sigmoid(beta * delta) + eps * jax.nn.log_sigmoid(-beta * delta)) / (
            1.0 - 2.0 * eps)
    else:
        raise ValueError(f"unknown preference loss_type {obj.loss_type!r}")
    r_c, r_r = jax.lax.stop_gradient(beta * ratio_c), jax.lax.stop_gradient(beta * ratio_r)
    metrics = _reward_metrics(r_c, r_r, jax.lax.stop_gradient(policy.logps_c), jax.lax.stop_gradient(policy.logps_r),
                              valid)
    metrics.update(_logits_metrics(policy, masks, valid))
    return Result(jnp.sum(per * valid), jnp.zeros((), per.dtype), metrics)


def _nll(masks: PairMasks, dtype):
    if masks.nll_sum is None:
        return jnp.zeros((), dtype)
    return masks.nll_sum / jnp.maximum(masks.nll_count, 1)


def orpo(obj: Objective, policy: PairStats, masks: PairMasks) -> Result:
    """ORPO: the chosen rows' NLL (a token mean over the micro-batch) minus β · mean log σ(log odds ratio)."""
    valid = masks.valid.astype(policy.logps_c.dtype)
    p_c = policy.logps_c / jnp.maximum(masks.n_c, 1)
    p_r = policy.logps_r / jnp.maximum(masks.n_r, 1)
    log_odds = (p_c - p_r) - (_log1mexp(p_c) - _log1mexp(p_r))
    ratio = jax.nn.log_sigmoid(log_odds)
    nll = _nll(masks, p_c.dtype)
    sg = jax.lax.stop_gradient
    metrics = _reward_metrics(sg(obj.beta * p_c), sg(obj.beta * p_r), sg(p_c), sg(p_r), valid)
    metrics.update(_logits_metrics(policy, masks, valid))
    metrics.update({"nll_loss": sg(nll), "log_odds_ratio": sg(_mean(ratio, valid)),
                    "log_odds_chosen": sg(_mean(log_odds, valid))})
    return Result(jnp.sum(-obj.beta * ratio * valid), nll, metrics)


def simpo(obj: Objective, policy: PairStats, masks: PairMasks) -> Result:
    """SimPO (TRL's CPO with loss_type="simpo"): length-normalized log-probs, margin γ, cpo_alpha · chosen NLL."""
    valid = masks.valid.astype(policy.logps_c.dtype)
    p_c = policy.logps_c / jnp.maximum(masks.n_c, 1)
    p_r = policy.logps_r / jnp.maximum(masks.n_r, 1)
    z = obj.beta * (p_c - p_r) - obj.simpo_gamma
    per = _smoothed_sigmoid(z, obj.label_smoothing)
    nll = _nll(masks, p_c.dtype) if obj.cpo_alpha else jnp.zeros((), p_c.dtype)
    sg = jax.lax.stop_gradient
    metrics = _reward_metrics(sg(obj.beta * p_c), sg(obj.beta * p_r), sg(p_c), sg(p_r), valid)
    metrics.update(_logits_metrics(policy, masks, valid))
    metrics["nll_loss"] = sg(nll)
    return Result(jnp.sum(per * valid), obj.cpo_alpha * nll, metrics)


class KtoStats(NamedTuple):
    """Per-example sums [B] of one micro-batch, from one model: the matched completion and the mismatched one."""

    logps: jax.Array
    kl_logps: jax.Array
    mean_logits: jax.Array | None = None


class KtoMasks(NamedTuple):
    label: jax.Array  # [B] 1 desirable, 0 undesirable
    n: jax.Array  # [B] completion tokens
    valid: jax.Array  # [B]


def kto(obj: Objective, policy: KtoStats, reference: KtoStats, masks: KtoMasks) -> Result:
    """KTO with the micro-batch's KL estimate z (no gradient through it); see the module docstring."""
    sg = jax.lax.stop_gradient
    dtype = policy.logps.dtype
    valid = masks.valid.astype(dtype)
    des = masks.label.astype(dtype) * valid
    und = (1.0 - masks.label.astype(dtype)) * valid
    z = jnp.maximum(sg(_mean(policy.kl_logps - reference.kl_logps, valid)), 0.0)
    ratio = policy.logps - sg(reference.logps)
    beta = obj.beta
    per = (obj.desirable_weight * (1.0 - jax.nn.sigmoid(beta * (ratio - z))) * des
           + obj.undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z - ratio))) * und)
    n_d, n_u = jnp.sum(des), jnp.sum(und)
    nan = jnp.asarray(jnp.nan, dtype)

    def where_any(n, value):
        return jnp.where(n > 0, value, nan)

    rewards = sg(beta * ratio)
    r_c = where_any(n_d, jnp.sum(rewards * des) / jnp.maximum(n_d, 1))
    r_r = where_any(n_u, jnp.sum(rewards * und) / jnp.maximum(n_u, 1))
    metrics = {"kl": z, "rewards/chosen": r_c, "rewards/rejected": r_r,
               "logps/chosen": where_any(n_d, jnp.sum(sg(policy.logps) * des) / jnp.maximum(n_d, 1)),
               "logps/rejected": where_any(n_u, jnp.sum(sg(policy.logps) * und) / jnp.maximum(n_u, 1)),
               "rewards/margins": r_c - r_r}
    if policy.mean_logits is not None:
        t_d, t_u = jnp.sum(masks.n * des), jnp.sum(masks.n * und)
        metrics["logits/chosen"] = where_any(t_d, jnp.sum(sg(policy.mean_logits) * des) / jnp.maximum(t_d, 1))
        metrics["logits/rejected"] = where_any(t_u, jnp.sum(sg(policy.mean_logits) * und) / jnp.maximum(t_u, 1))
    return Result(jnp.sum(per), jnp.zeros((), dtype), metrics)


def paired_loss(obj: Objective, policy: PairStats, reference: PairStats | None, masks: PairMasks) -> Result:
    """The paired objectives by ``obj.kind`` (dpo, orpo, simpo)."""
    if obj.kind == "dpo":
        return dpo(obj, policy, reference, masks)
    if obj.kind == "orpo":
        return orpo(obj, policy, masks)
    if obj.kind == "simpo":
        return simpo(obj, policy, masks)
    raise ValueError(f"{obj.kind!r} is not a paired preference objective")
