"""QLoRA training: a pure jitted train step over the LoRA parameters, and the loop around it.

    python -m jqlora.train [--config FILE] [key.sub=value ...]      # no arguments: the demo (configs/demo.yaml)

Loss normalization. An optimizer step sees k = train.grad_accum_steps micro-batches holding N trained tokens in all
(the loop fetches the k micro-batches first and counts their loss_mask). The step loss is the mean over those N
tokens, L = (1/N) Σ_tokens ℓ. Micro-step j computes the gradient of (k/N) Σ_{tokens in j} ℓ; `optax.MultiSteps`
averages the k micro-gradients, (1/k) Σ_j (k/N) ∇Σ_j ℓ = ∇L, so k micro-batches give exactly the update of one
k-times-larger batch, however the trained tokens are spread over the micro-batches.

Cross-entropy is computed in chunks of `ce_chunk` tokens (a `jax.lax.scan` over a `jax.checkpoint`-ed chunk body):
logits [chunk, V] in float32 exist for one chunk at a time, and are recomputed in the backward pass, so the
[B·S, V] float32 logits are never materialized.

The step is `jax.jit(step, donate_argnums=(0, 1))(lora_params, opt_state, frozen_state, batch, rng, grad_scale)`;
lora_params is a plain nested dict (`nnx.State.to_pure_dict()` of the `nnx.LoRAParam` state), frozen_state the
rest of the model (`nnx.split(model, nnx.LoRAParam, ...)`), so only LoRA leaves have gradients and optimizer state.

Devices (`jqlora.sharding`): the trainer lays a ("data", "fsdp", "tensor") mesh from the `mesh` config section over
every device of every process, places the frozen weights, LoRA params and optimizer state by the partition rules and
each batch along its rows over data × fsdp; jit propagates those shardings through the step. On one device this is
the plain single-device run. With several processes (`jax.distributed`, started from the environment by `main()`)
each process builds only the batch rows of its own devices, all run the same loop, and process 0 alone writes
metrics, the loss plot and the adapter.

Checkpoints (orbax, output_dir/checkpoints/<step>): LoRA params, optimizer state, the base PRNG key, and JSON
metadata (step, data iterator position). Arrays are saved shard by shard (every process writes its own shards) and
restored onto the shardings of the current mesh, which may differ from the saving run's. A run whose output_dir holds
a checkpoint continues from it (train.resume), and continues exactly: the same batches, dropout keys and losses as an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora import optim, sharding
from jqlora.config import ConfigError, load_config, save_config
from jqlora.data import BatchIterator, DataError, build_datasets, eval_batches, load_tokenizer

log = logging.getLogger("jqlora.train")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = "assets/demo/model"
CE_CHUNK = 1024  # tokens per cross-entropy chunk
STEP_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


class UserError(ValueError):
    """A user mistake found by the trainer (missing model, unwritable output_dir, ...): one line, exit code 2."""


# ---------------------------------------------------------------------------------------------------------------
# Loss


def chunked_ce_sum(h_BSD: jax.Array, w_VD: jax.Array, targets_BS: jax.Array, mask_BS: jax.Array,
                   chunk: int = CE_CHUNK) -> jax.Array:
    """Σ mask · (logsumexp(h wᵀ) - (h wᵀ)[target]) in float32, over chunks of `chunk` tokens (B S tokens in all)."""
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

    @jax.checkpoint
    def body(total, xs):
        h_CD, t_C, m_C = xs
        logits_CV = jax.lax.dot_general(h_CD, w_VD, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
        tgt_C = jnp.take_along_axis(logits_CV, t_C[:, None], axis=-1)[:, 0]
        return total + jnp.sum((lse_C - tgt_C) * m_C), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (h_TD.reshape(n, c, D), t_T.reshape(n, c), m_T.reshape(n, c)))
    return total


def full_ce_sum(logits_BSV: jax.Array, targets_BS: jax.Array, mask_BS: jax.Array) -> jax.Array:
    """The plain reference: Σ mask · cross-entropy from full logits."""
    logp = jax.nn.log_softmax(logits_BSV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets_BS[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(nll * mask_BS.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------------------------
# The pure step


@dataclasses.dataclass
class SplitModel:
    """A model cut into graphdef + LoRA params (pure dict) + frozen state, with the way back."""

    graphdef: Any
    lora: dict
    frozen: Any
    treedef: Any  # of the LoRA nnx.State, whose leaves are in the pure dict's leaf order

    @classmethod
    def of(cls, model: nnx.Module) -> SplitModel:
        graphdef, lora_state, frozen = nnx.split(model, nnx.LoRAParam, ...)
        pure = lora_state.to_pure_dict()
        state_paths = [tuple(getattr(k, "key", getattr(k, "name", k)) for k in p[:-1])
                       for p, _ in jax.tree_util.tree_leaves_with_path(lora_state)]
        pure_paths = [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(pure)]
        assert state_paths == pure_paths, "LoRA state and its pure dict flatten in different orders"
        if not pure_paths:
            raise UserError("the model has no LoRA parameters to train (check lora.targets)")
        return cls(graphdef, pure, frozen, jax.tree.structure(lora_state))

    def to_state(self, lora: dict):
        return jax.tree.unflatten(self.treedef, jax.tree.leaves(lora))

    def model(self, lora: dict | None = None) -> nnx.Module:
        return nnx.merge(self.graphdef, self.to_state(self.lora if lora is None else lora), self.frozen)


def make_loss_fn(split: SplitModel, ce_chunk: int = CE_CHUNK) -> Callable:
    """loss_fn(lora, frozen, batch, rng, deterministic) -> (Σ token losses, number of trained tokens)."""

    def loss_fn(lora, frozen, batch, rng, deterministic=False):
        model = nnx.merge(split.graphdef, split.to_state(lora), frozen)
        h_BSD = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"],
                                    deterministic=deterministic, key=rng)
        loss_sum = chunked_ce_sum(h_BSD, model.lm_head_weight(), batch["targets"], batch["loss_mask"], ce_chunk)
        return loss_sum, jnp.sum(batch["loss_mask"].astype(jnp.float32))

    return loss_fn


def make_grad_fn(split: SplitModel, ce_chunk: int = CE_CHUNK) -> Callable:
    """grad_fn(lora, frozen, batch, rng, grad_scale) -> (grad_scale · ∇Σℓ, Σℓ); not jitted."""
    loss_fn = make_loss_fn(split, ce_chunk)

    def scaled(lora, frozen, batch, rng, grad_scale):
        loss_sum, _ = loss_fn(lora, frozen, batch, rng)
        return loss_sum * grad_scale, loss_sum

    def grad_fn(lora, frozen, batch, rng, grad_scale):
        grads, loss_sum = jax.grad(scaled, has_aux=True)(lora, frozen, batch, rng, grad_scale)
        return grads, loss_sum

    return grad_fn


def make_train_step(split: SplitModel, tx, ce_chunk: int = CE_CHUNK) -> Callable:
    """The jitted micro-step (lora, opt_state, frozen, batch, rng, grad_scale) -> (lora, opt_state, Σℓ)."""
    grad_fn = make_grad_fn(split, ce_chunk)

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


def step_batch(batch: dict) -> dict:
    return {k: batch[k] for k in STEP_KEYS}


# ---------------------------------------------------------------------------------------------------------------
# Setup helpers


def _resolve(path: str | None) -> str | None:
    """A relative path that does not exist here but does in the repository (the demo assets) is taken from there."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = REPO_ROOT / path
    return str(candidate) if candidate.exists() else path


def _has_weights(path: str) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin")))


def ensure_demo_model(path: str) -> None:
    """Build the tiny demo base model (tools/make_demo_model.py) when the demo path holds only the tokenizer."""
    demo = (REPO_ROOT / DEMO_MODEL).resolve()
    if Path(path).resolve() != demo or _has_weights(path):
        return
    spec = importlib.util.spec_from_file_location("_jqlora_make_demo_model", REPO_ROOT / "tools" / "make_demo_model.py")
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    log.info("building the demo model in %s", path)
    module.build(path)


def _check_output_dir(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"output_dir {out}: not writable ({e.strerror or e})") from None


def _lora_config(cfg):
    from jqlora.lora import LoraConfig

    return LoraConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=cfg.lora.targets,
                      rslora=cfg.lora.rslora)


def build_model(cfg, check: Callable[[Any], None] | None = None, mesh=None):
    """The quantized base model with fresh adapters, as the config says; ``check(ModelConfig)`` runs before loading.

    With a ``mesh`` of several devices in a single process, every tensor is loaded straight into its shards
    (`load_model(mesh=)`); otherwise the model is loaded on the default device (and placed by the caller).
    ``train.remat=auto`` is resolved here, from the memory plan of the model's shape on this mesh."""
    from jqlora.convert import ConvertError
    from jqlora.models import ModelConfig, load_model
    from jqlora.plan import resolve_remat

    path = cfg.model.path
    if not os.path.isdir(path):
        raise UserError(f"model.path {path}: no such directory")
    ensure_demo_model(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"model.path {path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        shape = ModelConfig.from_hf(path)
        if check is not None:
            try:
                check(shape)
            except ValueError as e:
                raise UserError(str(e).splitlines()[0]) from None
        axes = {k: int(v) for k, v in mesh.shape.items()} if mesh is not None else None
        remat, why = resolve_remat(cfg, shape, axes)
        if cfg.train.remat == "auto":
            log.info(why)
        streamed = mesh is not None and mesh.size > 1 and jax.process_count() == 1
        return load_model(path, quant=cfg.model.quant, double_quant=cfg.model.double_quant,
                          block_size=cfg.model.block_size, dtype=cfg.model.dtype, lora=_lora_config(cfg),
                          seed=cfg.train.seed, remat=remat, mesh=mesh if streamed else None)
    except (ConvertError, FileNotFoundError) as e:
        raise UserError(str(e).splitlines()[0]) from None


# ---------------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Builds everything from a `jqlora.config.Config` and runs (or resumes) training; `run()` returns an exit code."""

    def __init__(self, cfg, *, progress: bool | None = None, export: bool = True, ce_chunk: int = CE_CHUNK):
        cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, path=_resolve(cfg.model.path),
                                      tokenizer_path=_resolve(cfg.model.tokenizer_path)),
            data=dataclasses.replace(cfg.data, path=_resolve(cfg.data.path), eval_path=_resolve(cfg.data.eval_path)),
        )
        self.cfg = cfg
        self.tc = cfg.train
        self.out = cfg.output_dir
        self.primary = sharding.is_primary()
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.primary
        self.export = export
        _check_output_dir(self.out)

        try:  # (a mesh that cannot be laid fails before the minutes of loading a large model)
            self.mesh = sharding.mesh_from_config(cfg.mesh)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.model = build_model(cfg, lambda shape: sharding.check_model_fits(
            self.mesh, shape, self.tc.batch_size, self.tc.eval_batch_size), mesh=self.mesh)
        self.tokenizer = tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
        self.train_ds, self.eval_ds = build_datasets(cfg.data, tokenizer, seed=self.tc.seed)
        self.iterator = BatchIterator(sharding.RowIds(len(self.train_ds)), self.tc.batch_size, seed=self.tc.seed,
                                      shuffle=cfg.data.shuffle)
        self.total_steps = optim.total_optimizer_steps(self.tc, self.iterator.batches_per_epoch)
        self.tx, self.schedule = optim.make_optimizer(self.tc, self.total_steps)

        # Placement: the model's own arrays are swapped for the placed ones, so no unsharded copy stays behind.
        self.split = sharding.shard_model_state(SplitModel.of(self.model), self.mesh)
        nnx.update(self.model, self.split.to_state(self.split.lora), self.split.frozen)
        self.lora = self.split.lora
        self.opt_state = sharding.shard_optimizer_state(self.tx.init(self.lora), self.lora, self.mesh)
        self.opt_leaves = optim.check_state_is_lora_only(self.opt_state, self.lora)
        self.rng = jax.device_put(jax.random.PRNGKey(self.tc.seed), sharding.replicated(self.mesh))
        self.step = 0
        self.train_step = make_train_step(self.split, self.tx, ce_chunk)
        self.eval_step = make_eval_step(self.split, ce_chunk)
        self._stop_signal: int | None = None
        self._saved_step: int | None = None
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.ckpt = self._checkpoint_manager()

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def _checkpoint_manager(self):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(max_to_keep=self.tc.keep_checkpoints, create=True)
        return ocp.CheckpointManager(os.path.abspath(os.path.join(self.out, "checkpoints")), options=options)

    def _ckpt_tree(self) -> dict:
        opt_leaves = jax.tree.leaves(self.opt_state)
        return {"lora": self.lora, "opt": {f"{i:05d}": x for i, x in enumerate(opt_leaves)}, "rng": self.rng}

    def save(self) -> None:
        import orbax.checkpoint as ocp

        if self._saved_step == self.step:
            return
        meta = {"step": self.step, "data": self.iterator.state(), "total_steps": self.total_steps}
        self.ckpt.save(self.step, args=ocp.args.Composite(state=ocp.args.StandardSave(self._ckpt_tree()),
                                                          meta=ocp.args.JsonSave(meta)), force=True)
        self.ckpt.wait_until_finished()
        self._saved_step = self.step

    def maybe_resume(self) -> bool:
        import orbax.checkpoint as ocp

        latest = self.ckpt.latest_step() if self.tc.resume else None
        if latest is None:
            return False
        # the placed arrays' shapes, dtypes and shardings: restored onto this run's mesh, whatever the saving run's was
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._ckpt_tree())
        restored = self.ckpt.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      meta=ocp.args.JsonRestore()))
        state, meta = restored["state"], restored["meta"]
        self.lora = state["lora"]
        treedef = jax.tree.structure(self.opt_state)
        self.opt_state = jax.tree.unflatten(treedef, [state["opt"][k] for k in sorted(state["opt"])])
        self.rng = state["rng"]
        self.step = int(meta["step"])
        self.iterator.restore(meta["data"])
        self._saved_step = self.step
        self._truncate_metrics(self.step)
        log.info("resumed from %s at step %d", self.out, self.step)
        return True

    # -- metrics ----------------------------------------------------------------------------------------------------

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
        if not self.primary or not os.path.isfile(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(self.metrics_path, "w") as f:
            f.writelines(lines)

    def _log(self, record: dict) -> None:
        if not self.primary:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def evaluate(self) -> float | None:
        if self.eval_ds is None:
            return None
        bs = self.tc.eval_batch_size or self.tc.batch_size
        total, count = 0.0, 0.0
        for rows in eval_batches(sharding.RowIds(len(self.eval_ds)), bs, self.tc.eval_batches):
            s, n = self.eval_step(self.lora, self.split.frozen, self.place_batch(self.eval_ds, rows))
            total += float(s)
            count += float(n)
        return total / max(count, 1.0)

    def plot(self) -> None:
        if not self.primary or not os.path.isfile(self.metrics_path):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = _read_metrics(self.metrics_path)
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        if train:
            ax.plot(*zip(*train), label="train")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / trained token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(self.out, "loss.png"), dpi=100)
        plt.close(fig)

    # -- the loop ---------------------------------------------------------------------------------------------------

    def place_batch(self, dataset, rows) -> dict[str, jax.Array]:
        """The step inputs of ``rows`` of ``dataset`` on the mesh (this process builds only its own devices' rows)."""
        return sharding.assemble_batch(rows, lambda some: step_batch(dataset.batch(some)), self.mesh)

    def one_step(self) -> tuple[float, int, int]:
        """One optimizer step (k micro-steps); returns (mean loss over its trained tokens, trained, input tokens)."""
        k = self.tc.grad_accum_steps
        micro = [self.place_batch(self.train_ds, next(self.iterator)) for _ in range(k)]
        trained, tokens = sharding.token_counts([b["loss_mask"] for b in micro], [b["segment_ids"] for b in micro])
        # on the device: the micro-steps are dispatched without waiting for the counts
        grad_scale = jnp.float32(k) / jnp.maximum(trained, 1.0)
        loss_sum = jnp.zeros((), jnp.float32)
        for j, batch in enumerate(micro):
            key = jax.random.fold_in(self.rng, self.step * k + j)
            self.lora, self.opt_state, s = self.train_step(self.lora, self.opt_state, self.split.frozen, batch, key,
                                                           grad_scale)
            loss_sum = loss_sum + s
        self.step += 1
        n_trained, n_tokens = int(trained), int(tokens)
        return float(loss_sum) / max(n_trained, 1), n_trained, n_tokens

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def run(self) -> int:
        self.maybe_resume()
        if self.primary:
            save_config(self.cfg, os.path.join(self.out, "config.yaml"))
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        try:
            return self._loop()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            self.ckpt.wait_until_finished()

    def _loop(self) -> int:
        from tqdm import tqdm

        tc = self.tc
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True)
        window_loss, window_steps, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
        evaluated_at = None
        if self.step == 0:
            self.print_sample("before training")
        if self.step == 0 and self.eval_ds is not None:  # the held-out loss before any training
            self._log({"step": 0, "eval_loss": self.evaluate()})
            evaluated_at = 0
        while self.step < self.total_steps:
            lr = float(self.schedule(self.step))
            loss, n_trained, n_tokens = self.one_step()
            if not math.isfinite(loss):
                bar.close()
                last = self.ckpt.latest_step()
                where = f"step {last} in {self.out}/checkpoints" if last is not None else "none saved"
                if self.primary:
                    print(f"error: the loss is {loss} at step {self.step}; stopping without saving "
                          f"(last good checkpoint: {where}). Lower train.learning_rate or check the data.",
                          file=sys.stderr)
                return 1
            window_loss += loss
            window_steps += 1
            window_tokens += n_tokens
            bar.update(1)
            if self.step % tc.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_t0
                tps = window_tokens / max(elapsed, 1e-9)
                rec = {"step": self.step, "loss": window_loss / window_steps, "lr": lr, "tokens_per_s": tps,
                       "trained_tokens": n_trained}
                self._log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
                window_loss, window_steps, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
            if tc.eval_every and self.step % tc.eval_every == 0 and self.eval_ds is not None:
                self._log({"step": self.step, "eval_loss": self.evaluate()})
                evaluated_at = self.step
            if tc.save_every and self.step % tc.save_every == 0:
                self.save()
            stop_at = tc.stop_at_step is not None and self.step >= tc.stop_at_step and self.step < self.total_steps
            signalled = sharding.any_process(self._stop_signal is not None)  # every process stops at the same step
            if signalled or stop_at:
                bar.close()
                self.save()
                why = ("train.stop_at_step" if not signalled else signal.Signals(self._stop_signal).name
                       if self._stop_signal is not None else "a signal to another process")
                if self.primary:
                    print(f"{why}: stopped at step {self.step}; checkpoint saved in {self.out}/checkpoints, "
                          "run again to resume", file=sys.stderr)
                return 0
        bar.close()
        if self.eval_ds is not None and evaluated_at != self.step:
            self._log({"step": self.step, "eval_loss": self.evaluate()})
        self.save()
        self.plot()
        self.print_sample(f"after {self.step} steps")
        if self.export:
            self.export_adapter()
        return 0

    def sample(self, max_new_tokens: int = 32) -> str | None:
        """The model's greedy reply to ``train.sample_prompt`` (None without a prompt or a chat template)."""
        prompt = self.tc.sample_prompt
        if not prompt or not getattr(self.tokenizer, "chat_template", None) or jax.process_count() > 1:
            return None  # (generation is single-process)
        from jqlora.generate import generate

        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
        out = generate(self.split.model(self.lora), np.asarray(ids, np.int32), max_new_tokens=max_new_tokens,
                       eos_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()

    def print_sample(self, when: str) -> None:
        reply = self.sample()
        if reply is not None:
            print(f"[{when}] {self.tc.sample_prompt!r} -> {reply!r}", flush=True)

    def export_adapter(self) -> None:
        from jqlora import peft

        lora = jax.tree.map(jnp.asarray, sharding.to_host(self.lora))  # (every process takes part in the gather)
        if not self.primary:
            return
        losses = [r["loss"] for r in _read_metrics(self.metrics_path) if "loss" in r]
        card = {"data": self.cfg.data.path, "steps": self.step, "final_loss": f"{losses[-1]:.4f}" if losses else "n/a"}
        out = peft.save_adapter(self.split.model(lora), os.path.join(self.out, "adapter"),
                                lora_config=_lora_config(self.cfg), base_model_name_or_path=self.cfg.model.path,
                                card=card, overwrite=True)
        log.info("adapter written to %s", out)


def _read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# CLI


def restore_for_export(src: str | os.PathLike, *, step: int | None = None, quant: str | None = None):
    """(model with the adapter of ``step`` (default latest), config, step) from a run dir or a checkpoint in it."""
    import orbax.checkpoint as ocp

    from jqlora.config import load_config

    src = Path(src).resolve()
    if src.name.isdigit() and src.parent.name == "checkpoints":  # a checkpoint inside a run directory
        if step is not None and step != int(src.name):
            raise UserError(f"{src}: is the checkpoint of step {src.name}, but --step {step} was given")
        src, step = src.parent.parent, int(src.name)
    if not (src / "config.yaml").is_file():
        raise UserError(f"{src}: not a training run directory (no config.yaml)")
    cfg = load_config(str(src / "config.yaml"), [])
    if quant is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quant=quant))
    manager = ocp.CheckpointManager(str(src / "checkpoints"))
    steps = sorted(manager.all_steps())
    if not steps:
        raise UserError(f"{src / 'checkpoints'}: no complete checkpoint to export")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise UserError(f"{src / 'checkpoints'}: no checkpoint for step {step} (have {', '.join(map(str, steps))})")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    model = build_model(cfg)
    split = SplitModel.of(model)
    tx, _ = optim.make_optimizer(cfg.train, int(meta["total_steps"]))
    opt_leaves = jax.tree.leaves(tx.init(split.lora))
    tree = {"lora": split.lora, "opt": {f"{i:05d}": x for i, x in enumerate(opt_leaves)},
            "rng": jax.random.PRNGKey(0)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return split.model(state["lora"]), cfg, step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jqlora.train", description="QLoRA fine-tuning (JAX).")
    p.add_argument("--config", default=None, help="YAML config (default: the demo, configs/demo.yaml)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("jqlora.sharding").setLevel(logging.INFO)  # the multi-process start, replicated weights
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from jqlora.convert import ConvertError

    try:
        sharding.initialize_distributed()  # before anything touches the devices
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg, progress=False if args.no_progress else None)
        return trainer.run()
    except (ConfigError, DataError, UserError, ConvertError, sharding.DistributedError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
