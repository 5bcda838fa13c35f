"""The jitted GRPO micro-step: the completions' log-probs under the policy, `jqlora.training.grpo.grpo_loss` with
TRL 1.16's accumulation accounting, and the optimizer update that `optax.MultiSteps` accumulates.

TRL sums the gradients of its k micro-batch losses L_j (grpo / bnpo / dr_grpo divided by k; dapo divided by the
generation batch's completion tokens N), so its update follows ∇ Σ_j L_j. MultiSteps averages the k micro-gradients,
so micro-step j differentiates k · L_j: the same update. The step returns L_j; Σ_j L_j is the step's loss.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jqlora.lora import SplitModel
from jqlora.training.grpo import GRPOLossConfig, completion_logps, grpo_loss
from jqlora.training.step import optax_apply

STEP_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items",
             "old_logps", "ref_logps")


def make_grpo_objective(split: SplitModel, cfg: GRPOLossConfig, grad_accum: int) -> Callable:
    """objective(lora, frozen, batch) -> (L_j, metrics): micro-batch j's share of TRL's accumulated loss."""

    def objective(lora, frozen, batch):
        model = nnx.merge(split.graphdef, split.to_state(lora), frozen)
        logps, entropy = completion_logps(model, batch, cfg.temperature)
        mask = jnp.asarray(batch["completion_mask"])
        loss, metrics = grpo_loss(logps, mask, batch["advantages"], cfg, old_logps_BC=batch.get("old_logps"),
                                  ref_logps_BC=batch.get("ref_logps"), num_items=batch["num_items"],
                                  grad_accum=grad_accum, steps_per_generation=grad_accum)
        m = mask.astype(jnp.float32)
        metrics["entropy"] = (entropy * m).sum() / jnp.maximum(m.sum(), 1.0)
        return loss, metrics

    return objective


def make_grpo_train_step(split: SplitModel, tx, cfg: GRPOLossConfig, grad_accum: int) -> Callable:
    """The jitted micro-step (lora, opt_state, frozen, batch) -> (lora, opt_state, L_j, metrics)."""
    objective = make_grpo_objective(split, cfg, grad_accum)

    def scaled(lora, frozen, batch):
        loss, metrics = objective(lora, frozen, batch)
        return loss * grad_accum, (loss, metrics)

    def step(lora, opt_state, frozen, batch):
        grads, (loss, metrics) = jax.grad(scaled, has_aux=True)(lora, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax_apply(lora, updates), opt_state, loss, metrics

    return jax.jit(step, donate_argnums=(0, 1))
