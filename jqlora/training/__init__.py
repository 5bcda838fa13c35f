"""One optimizer step, as pure functions: the objective (chunked cross-entropy over the trained tokens, with the MoE
load-balancing term), its gradient with respect to the LoRA parameters only, the jitted micro-step that
`optax.MultiSteps` accumulates (`step`), and the optimizer: AdamW with LoRA+ groups, the schedule, clipping and the
recorded gradient norm (`optim`); online RL: the GRPO loss family by TRL 1.16's definitions (`grpo`) and the reward
functions it scores rollouts with (`rewards`)."""

from jqlora.training import grpo, optim, rewards, step
from jqlora.training.optim import make_optimizer, make_schedule, total_optimizer_steps
from jqlora.training.step import (CE_CHUNK, STEP_KEYS, make_eval_stats_step, make_eval_step, make_grad_fn,
                                  make_loss_fn, make_train_step, step_batch)

__all__ = [
    "CE_CHUNK", "STEP_KEYS", "make_eval_stats_step", "make_eval_step", "make_grad_fn", "make_loss_fn",
    "grpo", "make_optimizer", "make_schedule", "make_train_step", "optim", "rewards", "step", "step_batch",
    "total_optimizer_steps",
]
