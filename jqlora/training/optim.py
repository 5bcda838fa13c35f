"""The optimizer: linear warmup then cosine / linear / constant decay, global-norm clipping, AdamW, all inside
`optax.MultiSteps` for gradient accumulation.

    lr(t) = peak · t / W                                                  t < W (warmup, W capped at the run length)
    lr(t) = peak · (m + (1 - m) · ½ (1 + cos(π p)))   cosine,    p = (t - W) / (T - W) ∈ [0, 1], m = min_lr_ratio
    lr(t) = peak · (m + (1 - m) · (1 - p))            linear
    lr(t) = peak                                      constant

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019) is applied to whatever tree it is given;
the train step gives it the LoRA parameters only (`nnx.split(model, nnx.LoRAParam, ...)`), so the frozen base model
has no optimizer state at all; train.optimizer_state stores Adam's two moments in float32 (`optax.adamw`), bfloat16
or bitsandbytes' blockwise 8 bits (`jqlora.training.optim8bit`). `optax.MultiSteps(every_k_schedule=k)` averages k
micro-step gradients and applies the inner chain every k-th call; t counts optimizer steps (not micro-steps).

LoRA+ (Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", 2024): with ``plus_ratio`` λ the
B matrices (and DoRA magnitudes, 1-D like peft's ``groupB``) train with learning rate λ · lr(t), the A matrices with
lr(t): an `optax.multi_transform` of two AdamW by parameter label ("a" / "b"), still inside clipping and MultiSteps,
as `peft.optimizers.create_loraplus_optimizer` groups them. Embedding adapters form peft's third group, whose
peak learning rate is ``loraplus_lr_embedding`` (peft's default 1e-6, `PLUS_LR_EMBEDDING`) on the same schedule.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jqlora.training.optim8bit import OPTIMIZER_BLOCK, adamw_lowp, is_quantized, resolve_state


def make_schedule(train_cfg, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the optimizer step (0-based) for a `jqlora.config.TrainConfig`."""
    peak = float(train_cfg.learning_rate)
    total = max(int(total_steps), 1)
    warmup = min(int(train_cfg.warmup_steps), total)
    floor = peak * float(train_cfg.min_lr_ratio)
    decay = max(total - warmup, 1)
    kind = train_cfg.lr_schedule
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=float(train_cfg.min_lr_ratio))
    elif kind == "linear":
        after = optax.linear_schedule(peak, floor, decay)
    elif kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown lr_schedule {kind!r}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


class GradNormState(NamedTuple):
    norm: jax.Array  # global norm of the last (accumulated, unclipped) gradient


def record_grad_norm() -> optax.GradientTransformation:
    """Identity on the updates; keeps their global norm in its state (read back with `last_grad_norm`)."""

    def init(params):
        del params
        return GradNormState(jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del state, params
        return updates, GradNormState(optax.global_norm(updates).astype(jnp.float32))

    return optax.GradientTransformation(init, update)


def last_grad_norm(opt_state) -> jax.Array:
    """The global norm of the gradient the last optimizer step applied (before clipping)."""
    return opt_state.inner_opt_state[0].norm


PLUS_B_LEAVES = ("lora_b", "magnitude")  # the leaves LoRA+ trains at plus_ratio x lr (peft: lora_B and 1-D params)
PLUS_EMBED_LEAVES = ("lora_embedding_a", "lora_embedding_b")  # peft's "embedding" group under LoRA+
PLUS_LR_EMBEDDING = 1e-6  # its peak learning rate (peft's loraplus_lr_embedding default)


def loraplus_labels(params) -> object:
    """"b" for every B matrix / DoRA magnitude leaf of a LoRA param tree, "embed" for embedding adapters, "a" for
    the rest (LoRA+ groups)."""

    def label(path, _):
        last = path[-1]
        name = str(getattr(last, "key", getattr(last, "name", last)))
        return "b" if name in PLUS_B_LEAVES else ("embed" if name in PLUS_EMBED_LEAVES else "a")

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(train_cfg, total_steps: int, plus_ratio: float | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``MultiSteps(record norm ∘ clip ∘ AdamW, every_k_schedule=grad_accum_steps)`` and its learning-rate
    schedule; with ``plus_ratio`` (LoRA+, None or 0 = off) the AdamW is a multi-transform whose "b" leaves have
    ``plus_ratio`` times the learning rate. With train.memory=min and no accumulation (grad_accum_steps 1) the
    wrapper is `single_step`: the same updates without MultiSteps' float32 accumulator."""
    schedule = make_schedule(train_cfg, total_steps)
    parts = [record_grad_norm()]
    if train_cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.max_grad_norm)))

    def adamw(lr):
        state = resolve_state(train_cfg.optimizer_state, getattr(train_cfg, "memory", "default"))
        return adamw_lowp(lr, state, b1=float(train_cfg.adam_b1), b2=float(train_cfg.adam_b2),
                          eps=float(train_cfg.adam_eps), weight_decay=float(train_cfg.weight_decay))

    if plus_ratio:
        ratio = float(plus_ratio)
        embed = PLUS_LR_EMBEDDING / float(train_cfg.learning_rate)
        parts.append(optax.multi_transform({"a": adamw(schedule), "b": adamw(lambda t: ratio * schedule(t)),
                                            "embed": adamw(lambda t: embed * schedule(t))}, loraplus_labels))
    else:
        parts.append(adamw(schedule))
    inner = optax.chain(*parts)
    if int(train_cfg.grad_accum_steps) == 1 and getattr(train_cfg, "memory", "default") == "min":
        return single_step(inner), schedule  # (no accumulator: a float32 copy of the adapters saved)
    return optax.MultiSteps(inner, every_k_schedule=int(train_cfg.grad_accum_steps)), schedule


def single_step(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``MultiSteps(inner, every_k_schedule=1)`` without its accumulated gradient: every call is an optimizer step,
    the state a `optax.MultiStepsState` with empty ``acc_grads`` (train.memory=min at train.grad_accum_steps=1)."""
    def init(params):
        zero = jnp.zeros([], jnp.int32)
        return optax.MultiStepsState(mini_step=zero, gradient_step=zero, inner_opt_state=inner.init(params),
                                     acc_grads=(), skip_state=())

    def update(grads, state, params=None):
        updates, inner_state = inner.update(grads, state.inner_opt_state, params)
        return updates, state._replace(inner_opt_state=inner_state, gradient_step=state.gradient_step + 1)

    return optax.GradientTransformation(init, update)


def total_optimizer_steps(train_cfg, batches_per_epoch: int) -> int:
    """train.max_steps, or enough optimizer steps for train.epochs passes over the data."""
    if train_cfg.max_steps is not None:
        return int(train_cfg.max_steps)
    micro = math.ceil(float(train_cfg.epochs) * batches_per_epoch)
    return max(1, math.ceil(micro / int(train_cfg.grad_accum_steps)))


def check_state_is_lora_only(opt_state, params) -> int:
    """Assert that every non-scalar optimizer leaf has the shape of a trained parameter; returns how many there are.

    With MultiSteps ∘ (clip, AdamW) that is 3 per parameter: the accumulated gradient, Adam's mu and nu (2 with
    `single_step`, which accumulates nothing). An 8-bit
    moment (train.optimizer_state=8bit) counts as one: its codes have the parameter's shape, beside them one absmax
    per block of 256 of them.
    """
    param_shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(params)]
    allowed = set(param_shapes)
    state_shapes = []
    for x in jax.tree.leaves(opt_state, is_leaf=is_quantized):
        if is_quantized(x):
            blocks = -(-int(np.prod(np.shape(x.codes), dtype=np.int64)) // OPTIMIZER_BLOCK)
            assert tuple(np.shape(x.absmax)) == (blocks,), (np.shape(x.codes), np.shape(x.absmax))
            x = x.codes
        if np.ndim(x) > 0:
            state_shapes.append(tuple(np.shape(x)))
    stray = [s for s in state_shapes if s not in allowed]
    assert not stray, f"optimizer state holds non-LoRA leaves of shapes {stray[:5]}"
    accumulates = bool(jax.tree.leaves(getattr(opt_state, "acc_grads", None)))
    expected = (3 if accumulates else 2) * len(param_shapes)
    assert len(state_shapes) == expected, (len(state_shapes), expected)
    return len(state_shapes)
