"""Ahead-of-time compiles of a GRPO run's two programs for a named GPU (`jqlora.planning.aot`'s machinery): the
jitted train micro-step (`jqlora.training.grpo_step.make_grpo_train_step`, as `jqlora.run.grpo` jits it) and the
rollout (`jqlora.models.sampling`'s prefill + token loop, one program with its KV cache of prompts × G rows).

    compile_grpo_step(shape, cfg, "h100-sxm")    # train.batch_size completion rows of bucket(prompt) + bucket(new)
    compile_rollout(shape, cfg, "h100-sxm")      # train.batch_size · train.grad_accum_steps rows, as one step samples

The prompt length is ``data.max_length`` (the prompt tokens a GRPO run keeps), the completion length
``grpo.max_new_tokens``; both are rounded up to the sampler's buckets (`decode.bucket`), the shapes the run compiles.
A run's device holds both programs' arguments (the 4-bit base, the adapter and its optimizer state) all along; the
two programs' temporaries (the train step's activations, the rollout's KV cache) are never alive together.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jqlora.planning.aot import AotError, CompiledStep, _memory, _traced_for, abstract_model, gpu_device


@dataclasses.dataclass(frozen=True)
class GrpoShapes:
    """The padded shapes a GRPO run compiles: rows per micro-step, rollout rows, prompt slots, completion slots."""

    train_rows: int
    rollout_rows: int
    prompt: int  # P = bucket(data.max_length)
    completion: int  # C = T = bucket(grpo.max_new_tokens)

    @property
    def cache_slots(self) -> int:
        """M: the rollout's KV-cache length, bucket(P + T) (`jqlora.models.sampling`)."""
        from jqlora.models.decode import bucket

        return bucket(self.prompt + self.completion)


def grpo_shapes(cfg, *, prompt: int | None = None, new_tokens: int | None = None, rows: int | None = None,
                rollout_rows: int | None = None) -> GrpoShapes:
    """`GrpoShapes` of a run config (``prompt`` / ``new_tokens`` / ``rows`` / ``rollout_rows`` override it)."""
    from jqlora.models.decode import bucket

    rows = rows or cfg.train.batch_size
    return GrpoShapes(rows, rollout_rows or rows * cfg.train.grad_accum_steps,
                      bucket(prompt or cfg.data.max_length), bucket(new_tokens or cfg.grpo.max_new_tokens))


def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def compile_grpo_step(shape, cfg, gpu: str | None = "h100-sxm", *, remat: str | None = None,
                      shapes: GrpoShapes | None = None) -> CompiledStep:
    """The run's GRPO micro-step (lora, opt_state, frozen, batch) for ``gpu`` (None: this machine's first device):
    old log-probs in the batch when grpo.num_iterations > 1, reference log-probs when grpo.beta > 0."""
    from jax.sharding import SingleDeviceSharding

    from jqlora.lora import SplitModel
    from jqlora.training import optim
    from jqlora.training.grpo import GRPOLossConfig
    from jqlora.training.grpo_step import make_grpo_train_step

    remat = remat or cfg.train.remat
    if remat == "auto":
        raise AotError("compile_grpo_step needs a concrete remat policy, not auto")
    device = gpu_device(gpu) if gpu is not None else jax.devices()[0]
    on_gpu = gpu is not None or device.platform == "gpu"
    model = abstract_model(shape, cfg, remat=remat, attention="cudnn" if on_gpu else "xla")
    split = SplitModel.of(model)
    g, k = cfg.grpo, cfg.train.grad_accum_steps
    tx, _ = optim.make_optimizer(cfg.train, max(1, (cfg.train.max_steps or 1) * g.num_iterations),
                                 cfg.lora.plus_ratio)
    loss_cfg = GRPOLossConfig(loss_type=g.loss_type, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
                              max_completion_length=g.max_new_tokens, temperature=g.temperature)
    s = shapes or grpo_shapes(cfg)
    sharding = SingleDeviceSharding(device)
    place = lambda x: _sds(x.shape, x.dtype, sharding)  # noqa: E731
    lora = jax.tree.map(place, split.lora)
    opt = jax.tree.map(place, jax.eval_shape(tx.init, split.lora))
    frozen = jax.tree.map(place, split.frozen)
    B, P, C = s.train_rows, s.prompt, s.completion
    batch = {"prompt_ids": _sds((B, P), jnp.int32, sharding), "prompt_mask": _sds((B, P), jnp.int32, sharding),
             "completion_ids": _sds((B, C), jnp.int32, sharding),
             "completion_mask": _sds((B, C), jnp.int32, sharding),
             "advantages": _sds((B,), jnp.float32, sharding), "num_items": _sds((), jnp.float32, sharding)}
    if g.num_iterations > 1:
        batch["old_logps"] = _sds((B, C), jnp.float32, sharding)
    if g.beta > 0:
        batch["ref_logps"] = _sds((B, C), jnp.float32, sharding)
    step = make_grpo_train_step(split, tx, loss_cfg, k)
    with _traced_for(gpu):
        traced = step.trace(lora, opt, frozen, batch)
    compiled = traced.lower().compile()
    return CompiledStep(compiled, gpu, _memory(compiled))


def compile_rollout(shape, cfg, gpu: str | None = "h100-sxm", *, shapes: GrpoShapes | None = None) -> CompiledStep:
    """The run's rollout program (`jqlora.models.sampling`: prefill, then the token loop with the KV cache of
    ``rollout_rows`` = prompts × G rows and bucket(P + T) slots) for ``gpu``; its arguments are the merged model's
    state (base + adapter), the prompts and the sampling settings."""
    from jax.sharding import SingleDeviceSharding

    from jqlora.models.decode import _Static
    from jqlora.models.sampling import _rollout_jit

    device = gpu_device(gpu) if gpu is not None else jax.devices()[0]
    model = abstract_model(shape, cfg, remat=cfg.train.remat if cfg.train.remat != "auto" else "full",
                           attention="xla")  # (the cached forward runs XLA attention on every backend)
    graphdef, state = nnx.split(model)
    s = shapes or grpo_shapes(cfg)
    sharding = SingleDeviceSharding(device)
    state = jax.tree.map(lambda x: _sds(x.shape, x.dtype, sharding), state)
    B, P = s.rollout_rows, s.prompt
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))  # (the trainer's raw key, folded per step)
    scalar = lambda dtype: _sds((), dtype, sharding)  # noqa: E731
    args = (_Static(graphdef), s.completion, state, _sds((B, P), jnp.int32, sharding), _sds((B,), jnp.int32, sharding),
            scalar(jnp.int32), _sds(key.shape, key.dtype, sharding), scalar(jnp.float32), scalar(jnp.float32),
            scalar(jnp.int32), _sds((2,), jnp.int32, sharding), scalar(jnp.int32))
    with _traced_for(gpu):
        traced = _rollout_jit.trace(*args)
    compiled = traced.lower().compile()
    return CompiledStep(compiled, gpu, _memory(compiled))
