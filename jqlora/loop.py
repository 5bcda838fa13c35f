"""The training loop: builds the model, data and optimizer from a config, runs (or resumes) the steps, evaluates,
checkpoints, samples and exports the adapter.

Devices (`jqlora.sharding`): the trainer lays a ("data", "fsdp", "tensor") mesh from the `mesh` config section over
every device of every process, places the frozen weights, LoRA params and optimizer state by the partition rules and
each batch along its rows over data × fsdp; jit propagates those shardings through the step. On one device this is
the plain single-device run. With several processes (`jax.distributed`, started from the environment by
`jqlora.train.main()`) each process builds only the batch rows of its own devices, all run the same loop, and
process 0 alone writes metrics, the loss plot and the adapter.

Checkpoints (`jqlora.rundir`): a run whose output_dir holds a checkpoint continues from it (train.resume), and
continues exactly: the same batches, dropout keys and losses as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
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
from jqlora.config import save_config
from jqlora.data import BatchIterator, build_datasets, eval_batches, load_tokenizer
from jqlora.divergence import DivergenceMonitor
from jqlora.rundir import RunDir, RunDirError, RunLockedError
from jqlora.step import CE_CHUNK, NoLoraError, SplitModel, make_eval_step, make_train_step, step_batch

log = logging.getLogger("jqlora.train")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = "assets/demo/model"


class UserError(ValueError):
    """A user mistake found by the trainer (missing model, unwritable output_dir, ...): one line, exit code 2."""


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


def _lora_config(cfg):
    from jqlora.lora import LoraConfig

    return LoraConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=cfg.lora.targets,
                      rslora=cfg.lora.rslora)


def _open_run_dir(out: str, keep: int, primary: bool) -> RunDir:
    """The run directory, locked by process 0; every process stops if another trainer holds it."""
    error = None
    try:
        run_dir = RunDir(out, keep=keep, primary=primary)
    except RunLockedError as e:
        error = str(e)
    except RunDirError as e:
        raise UserError(str(e)) from None
    if sharding.any_process(error is not None):
        raise UserError(error or f"output_dir {out} is in use by another trainer (see process 0)")
    return run_dir


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
        self.run_dir = _open_run_dir(self.out, self.tc.keep_checkpoints, self.primary)
        try:
            self._setup(cfg, ce_chunk)
        except BaseException:
            self.run_dir.close()  # (a run that never started leaves the lock as it found it)
            raise

    def _setup(self, cfg, ce_chunk: int) -> None:
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
        try:
            split = SplitModel.of(self.model)
        except NoLoraError as e:
            raise UserError(str(e)) from None
        self.split = sharding.shard_model_state(split, self.mesh)
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
        self.monitor = DivergenceMonitor()

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def _ckpt_tree(self) -> dict:
        opt_leaves = jax.tree.leaves(self.opt_state)
        return {"lora": self.lora, "opt": {f"{i:05d}": x for i, x in enumerate(opt_leaves)}, "rng": self.rng}

    def save(self) -> None:
        if self._saved_step == self.step:
            return
        meta = {"step": self.step, "data": self.iterator.state(), "total_steps": self.total_steps,
                "divergence": self.monitor.state()}
        try:
            self.run_dir.save(self.step, self._ckpt_tree(), meta)
        except RunDirError as e:
            raise UserError(str(e)) from None
        self._saved_step = self.step

    def maybe_resume(self) -> bool:
        latest = self.run_dir.latest_verified_step() if self.tc.resume else None
        if latest is None:
            return False
        # restored onto this run's placed arrays' shardings, whatever the saving run's mesh was
        try:
            state, meta = self.run_dir.restore(latest, self._ckpt_tree())
        except Exception as e:  # noqa: BLE001 - orbax's many types; the files are intact (verified): incompatible
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{self.run_dir.step_dir(latest)}: cannot be restored into this run ({first})") from None
        self.lora = state["lora"]
        treedef = jax.tree.structure(self.opt_state)
        self.opt_state = jax.tree.unflatten(treedef, [state["opt"][k] for k in sorted(state["opt"])])
        self.rng = state["rng"]
        self.step = int(meta["step"])
        self.iterator.restore(meta["data"])
        self.monitor.restore(meta.get("divergence"))
        self._saved_step = self.step
        self.run_dir.truncate_metrics(self.step)
        log.info("resumed from %s at step %d", self.out, self.step)
        return True

    def _log(self, record: dict) -> None:
        self.run_dir.log(record)

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
            save_config(self.cfg, self.run_dir.config_path)
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
            self.run_dir.close()

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
                # (the loss of step N is that of the state saved after step N-1: that state is the first bad one)
                return self._stop_bad(f"the loss is {loss} at step {self.step}", bad_from=self.step - 1)
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
                diverged = self.monitor.update(self.step, rec["loss"], self.step - window_steps)
                window_loss, window_steps, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
                if diverged is not None:
                    if tc.stop_on_divergence:
                        bar.close()
                        return self._stop_bad(f"training diverged at step {self.step}: {diverged}",
                                              bad_from=self.monitor.streak_start or self.step - 1)
                    if self.monitor.streak == self.monitor.patience and self.primary:
                        print(f"warning: training diverged at step {self.step}: {diverged}; going on "
                              "(train.stop_on_divergence=false)", file=sys.stderr)
            if tc.eval_every and self.step % tc.eval_every == 0 and self.eval_ds is not None:
                self._log({"step": self.step, "eval_loss": self.evaluate()})
                evaluated_at = self.step
            if tc.save_every and self.step % tc.save_every == 0:
                if self.monitor.suspect:  # (the newest checkpoint stays one from before the loss went up)
                    log.info("step %d: not saving a checkpoint while the loss is far above its early value",
                             self.step)
                else:
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
        self.run_dir.plot()
        self.print_sample(f"after {self.step} steps")
        if self.export:
            self.export_adapter()
        return 0

    def _stop_bad(self, why: str, bad_from: int) -> int:
        """Stop a run whose state went bad from step ``bad_from`` on: nothing is saved or exported, checkpoints of
        that step or later are moved to checkpoints.bad/ (so a resume cannot pick them), the last good one is named."""
        moved = [self.run_dir.quarantine(s) for s in self.run_dir.steps() if s >= bad_from]
        last = self.run_dir.latest_step()
        where = f"step {last} in {self.run_dir.checkpoints}" if last is not None else "none saved"
        if moved:
            where += f"; {len(moved)} later one(s), saved as the loss went bad, moved to {self.run_dir.bad_dir}"
        if self.primary:
            print(f"error: {why}; stopped without saving (last good checkpoint: {where}). Lower "
                  "train.learning_rate or check the data.", file=sys.stderr)
        return 1

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
        losses = [r["loss"] for r in self.run_dir.read_metrics() if "loss" in r]
        card = {"data": self.cfg.data.path, "steps": self.step, "final_loss": f"{losses[-1]:.4f}" if losses else "n/a"}
        out = peft.save_adapter(self.split.model(lora), os.path.join(self.out, "adapter"),
                                lora_config=_lora_config(self.cfg), base_model_name_or_path=self.cfg.model.path,
                                card=card, overwrite=True)
        log.info("adapter written to %s", out)
