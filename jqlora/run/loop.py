"""The training loop: builds the model, data and optimizer from a config, runs (or resumes) the steps, evaluates,
checkpoints, samples and exports the adapter.

Devices (`jqlora.parallel`): the trainer lays a ("data", "fsdp", "tensor") mesh from the `mesh` config section over
every device of every process, places the frozen weights, LoRA params and optimizer state by the partition rules and
each batch along its rows over data × fsdp; jit propagates those shardings through the step. On one device this is
the plain single-device run. With several processes (`jax.distributed`, started from the environment by
`jqlora.train.main()`) each process builds only the batch rows of its own devices, all run the same loop, and
process 0 alone writes metrics, the loss plot and the adapter.

Checkpoints (`jqlora.run.directory`): a run whose output_dir holds a checkpoint continues from it (train.resume), and
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

import jax
import jax.numpy as jnp
from flax import nnx

from jqlora import parallel
from jqlora.adapters import init_state
from jqlora.config import save_config
from jqlora.data import BatchIterator, build_datasets, check_ids, check_tokenizer, load_tokenizer, map_paths
from jqlora.data import stats
from jqlora.lora import LoraConfig, NoLoraError, SplitModel
from jqlora.run import background, progress
from jqlora.run.best import BestTracker
from jqlora.run.directory import RunDir, RunDirError, open_run_dir
from jqlora.run.evaluation import Evaluation
from jqlora.run.divergence import DivergenceMonitor
from jqlora.run.eval_tasks import EvalTasks
from jqlora.run.lock import LockError, RunLock
from jqlora.run.model import UserError, build_model
from jqlora.run.samples import Samples, readable
from jqlora.training import optim
from jqlora.training.step import CE_CHUNK, make_eval_stats_step, make_train_step, step_batch

log = logging.getLogger("jqlora.train")



def _absolute(path: str | None) -> str | None:
    """A local path made absolute (so the saved config and the adapter name it from anywhere); hub names stay."""
    if path is None or os.path.isabs(path) or not os.path.exists(path):
        return path
    return os.path.abspath(path)


EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as shells report them


def _open_run_dir(cfg, primary: bool) -> RunDir:
    """The run directory, once it is this run's: process 0 locks it first (every process stops if another trainer
    holds it), then `rundir.open_run_dir` refuses, resumes or moves aside what is there."""
    out, lock, error = cfg.output_dir, None, None
    if primary:
        try:
            lock = RunLock(out)
            lock.acquire()
        except LockError as e:  # (locked by another trainer, or not writable)
            error = str(e)
    if parallel.any_process(error is not None):  # (one collective, on every process)
        raise UserError(error or f"output_dir {out}: not usable (see process 0)")
    try:
        run_dir, note = open_run_dir(cfg, primary=primary, lock=lock, barrier=lambda: parallel.any_process(False))
    except RunDirError as e:
        if lock is not None:
            lock.release()
        raise UserError(str(e)) from None
    if note and primary:
        log.warning(note)
    return run_dir


# ---------------------------------------------------------------------------------------------------------------
# The trainer


class Trainer(Samples, Evaluation):
    """Builds everything from a `jqlora.config.Config` and runs (or resumes) training; `run()` returns an exit code."""

    def __init__(self, cfg, *, progress: bool | None = None, export: bool = True, ce_chunk: int = CE_CHUNK):
        cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, path=_absolute(cfg.model.path),
                                      tokenizer_path=_absolute(cfg.model.tokenizer_path)),
            data=dataclasses.replace(cfg.data, path=map_paths(cfg.data.path, _absolute),
                                     eval_path=map_paths(cfg.data.eval_path, _absolute)),
        )
        if cfg.model.path is None or cfg.data.path is None:
            raise UserError(f"{'model.path' if cfg.model.path is None else 'data.path'} is not set")
        if cfg.log.wandb and importlib.util.find_spec("wandb") is None:  # (before minutes of loading)
            raise UserError("log.wandb=true needs the wandb package (pip install wandb), or set log.wandb=false")
        self.writers = None
        self.started = time.perf_counter()  # (the CLI sets its own start: time to first step counts the imports)
        self.cfg = cfg
        self.tc = cfg.train
        self.out = cfg.output_dir
        self.primary = parallel.is_primary()
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.primary
        self.export = export
        self.run_dir = _open_run_dir(cfg, self.primary)  # before anything is loaded
        try:
            self._setup(cfg, ce_chunk)
        except BaseException:
            self.run_dir.close()  # (a run that never started leaves the lock as it found it)
            raise

    def _setup(self, cfg, ce_chunk: int) -> None:
        try:  # (a mesh that cannot be laid fails before the minutes of loading a large model)
            self.mesh = parallel.mesh_from_config(cfg.mesh)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.init_kind = None
        if cfg.lora.init_from is not None:  # (checked before the minutes of loading)
            from jqlora.run import init_from

            try:
                self.init_kind = init_from.check(cfg)
            except init_from.InitFromError as e:
                raise UserError(str(e)) from None
        try:  # (train.eval_tasks are looked up before minutes of loading)
            self.eval_tasks = EvalTasks.of(cfg)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.model = build_model(cfg, lambda shape: self._before_weights(cfg, shape), mesh=self.mesh,
                                 run_dir=self.out)
        if self.mesh.shape["seq"] > 1:  # sequence parallelism: every row's tokens over the seq axis
            self.model.seq_mesh = self.mesh
        if self.eval_tasks is not None:
            self.eval_tasks.tokenizer = self.tokenizer
        self.iterator = self._make_iterator(cfg)
        self.total_steps = optim.total_optimizer_steps(self.tc, self.iterator.batches_per_epoch)
        if self.primary:
            for line in stats.settings_warnings(cfg, self.train_ds, self.total_steps):
                log.warning(line)
        self.tx, self.schedule = self._make_optimizer(cfg)

        # Placement: the model's own arrays are swapped for the placed ones, so no unsharded copy stays behind.
        try:
            split = SplitModel.of(self.model)
        except NoLoraError as e:
            raise UserError(str(e)) from None
        self.split = parallel.shard_model_state(split, self.mesh)
        nnx.update(self.model, self.split.to_state(self.split.lora), self.split.frozen)
        self.lora = self.split.lora
        self.opt_state = parallel.shard_optimizer_state(self.tx.init(self.lora), self.lora, self.mesh)
        self.opt_leaves = optim.check_state_is_lora_only(self.opt_state, self.lora)
        self.rng = jax.device_put(jax.random.PRNGKey(self.tc.seed), parallel.replicated(self.mesh))
        self.step = 0
        self.trained_tokens = 0  # cumulative over the run (resumes included)
        self.window = {"loss": 0.0, "steps": 0, "tokens": 0}  # the steps since the last log line
        self.evaluated_at: int | None = None
        self.eval_accuracy: float | None = None  # of the last evaluate(): trained tokens predicted right (argmax)
        self._stop_signal: int | None = None
        self._saved_step: int | None = None
        self._warned_divergence = False
        self.monitor = DivergenceMonitor(uniform_loss=math.log(self.model.config.vocab_size))
        self.best = BestTracker(self.tc, self.run_dir)  # train.metric_for_best, early stopping (jqlora.run.best)
        self._make_steps(cfg, ce_chunk)

    def _before_weights(self, cfg, shape) -> None:
        """What needs the model's config.json but no weight (seconds, not the minutes of loading): the model fits the
        mesh, the tokenizer and the data are read, and both are within the model's vocabulary (`jqlora.data.vocab`:
        an id past vocab_size gives NaN losses, not an error)."""
        parallel.check_model_fits(self.mesh, shape, self.tc.batch_size, self.tc.eval_batch_size,
                                  seq_len=cfg.data.max_length)
        where = cfg.model.tokenizer_path or cfg.model.path
        self.tokenizer = tokenizer = load_tokenizer(where)
        check_tokenizer(tokenizer, where, shape.vocab_size, cfg.model.path)
        self.train_ds, self.eval_ds = self._datasets(cfg, tokenizer)
        for ds in (self.train_ds, self.eval_ds):
            if ds is not None:
                check_ids(ds.examples, tokenizer, where, shape.vocab_size, cfg.model.path)

    def _datasets(self, cfg, tokenizer):
        """(train, eval or None) datasets with ``batch(rows)``; SFT's token rows here (preference: jqlora.run.preference)."""
        return build_datasets(cfg.data, tokenizer, seed=self.tc.seed)

    def _make_iterator(self, cfg) -> BatchIterator:
        """The row ids of each micro-batch, resumable (GRPO: its prompts, jqlora.run.grpo)."""
        return BatchIterator(parallel.RowIds(len(self.train_ds)), self.tc.batch_size, seed=self.tc.seed,
                             shuffle=cfg.data.shuffle, mixture=getattr(self.train_ds, "mixture", None))

    def _make_optimizer(self, cfg):
        return optim.make_optimizer(self.tc, self.total_steps, cfg.lora.plus_ratio)

    def _make_steps(self, cfg, ce_chunk: int) -> None:
        self.train_step = make_train_step(self.split, self.tx, ce_chunk, packed=cfg.data.packing,
                                          aux_coef=self.tc.router_aux_loss_coef,
                                          neftune_alpha=self.tc.neftune_alpha or 0.0)
        self.eval_step = make_eval_stats_step(self.split, ce_chunk)

    def window_metrics(self) -> dict:
        """Objective-specific metrics of the steps since the last log line (none for SFT)."""
        return {}

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def _ckpt_tree(self) -> dict:
        opt_leaves = jax.tree.leaves(self.opt_state)
        return {"lora": self.lora, "opt": {f"{i:05d}": x for i, x in enumerate(opt_leaves)}, "rng": self.rng}

    def save(self) -> None:
        if self._saved_step == self.step:
            return
        meta = {"step": self.step, "data": self.iterator.state(), "total_steps": self.total_steps,
                "trained_tokens": self.trained_tokens, "window": dict(self.window),
                "divergence": self.monitor.state(), "best": self.best.state()}
        try:
            self.run_dir.save(self.step, self._ckpt_tree(), meta)
        except RunDirError as e:
            raise UserError(str(e)) from None
        self._saved_step = self.step

    def maybe_resume(self) -> bool:
        latest = self.run_dir.latest_verified_step() if self.tc.resume else None
        if latest is None:  # (this run's own directory, stopped before its first checkpoint: start it over)
            self.run_dir.truncate_metrics(-1)
            self.start_from()
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
        self.restore_extra(state)
        self.step = int(meta["step"])
        self.iterator.restore(meta["data"])
        self.monitor.restore(meta.get("divergence"))
        self.best.restore(meta.get("best"))
        self.trained_tokens = int(meta.get("trained_tokens", 0))
        self.window = dict(meta.get("window", self.window))  # the first log line after a resume is a full window
        self._saved_step = self.step
        self.run_dir.truncate_metrics(self.step)
        if any("eval_loss" in r and r["step"] == self.step for r in self.run_dir.read_metrics()):
            self.evaluated_at = self.step  # (a finished run that is run again does not evaluate twice)
        log.info("resumed from %s at step %d", self.out, self.step)
        return True

    def restore_extra(self, state: dict) -> None:
        """What a subclass keeps in the checkpoint beside the adapters, optimizer and rng (nothing for SFT)."""

    def start_from(self) -> None:
        """Adapters (and with train.resume_optimizer the optimizer state) from ``lora.init_from``; what PiSSA / LoftQ
        runs save for their export (jqlora.run.init_from, jqlora.adapters.init_state)."""
        if self.cfg.lora.init_from is not None:
            from jqlora.run import init_from

            try:
                init_from.start(self)
            except init_from.InitFromError as e:
                raise UserError(str(e)) from None
        if self.cfg.lora.init in ("pissa", "loftq") and self.primary:
            init_state.prepare_run(self.split.model(jax.tree.map(jnp.asarray, parallel.to_host(self.lora))),
                                    self.cfg, self.out)

    def _log(self, record: dict) -> None:
        try:
            self.run_dir.log(record)
        except RunDirError as e:  # (a full disk: the file keeps whole records, the run resumes from a checkpoint)
            raise UserError(str(e)) from None
        self.run_dir.plot()  # (loss.png as of this log or eval window)
        if self.writers is not None:
            self.writers.write(record)

    def _log_eval(self) -> None:
        loss = self.evaluate()
        rec = {"step": self.step, "eval_loss": loss, **self.eval_metrics(loss)}
        if self.eval_tasks is not None:
            rec.update(self.eval_tasks.metrics(self.split.model(self.lora)))
        samples = self.eval_samples()
        if samples:
            rec["eval_samples"] = samples
        self._log(rec)
        self.best.update(self.step, rec)
        if self.primary:
            log.info(progress.eval_line(rec))
            for x in samples:
                log.info("  sample: %s -> %s", x["prompt"], readable(x["reply"]))
        self.evaluated_at = self.step

    # -- the loop ---------------------------------------------------------------------------------------------------

    def place_batch(self, dataset, rows) -> dict[str, jax.Array]:
        """The step inputs of ``rows`` of ``dataset`` on the mesh (this process builds only its own devices' rows)."""
        return parallel.assemble_batch(rows, lambda some: step_batch(dataset.batch(some)), self.mesh)

    def one_step(self) -> tuple[float, int, int]:
        """One optimizer step (k micro-steps); returns (mean loss over its trained tokens, trained, input tokens)."""
        k = self.tc.grad_accum_steps
        micro = [self.place_batch(self.train_ds, next(self.iterator)) for _ in range(k)]
        trained, tokens = parallel.token_counts([b["loss_mask"] for b in micro], [b["segment_ids"] for b in micro])
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
        self.trained_tokens += n_trained
        return float(loss_sum) / max(n_trained, 1), n_trained, n_tokens

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def run(self) -> int:
        """Train to the end (0), stop on train.stop_at_step (0) or a signal (130 SIGINT, 143 SIGTERM) with a
        checkpoint, or stop on a non-finite loss (1)."""
        import contextlib

        from tqdm.contrib.logging import logging_redirect_tqdm

        from jqlora.run.metrics import MetricWriters, WriterError

        try:
            self.maybe_resume()
        except RunDirError as e:
            raise UserError(str(e)) from None
        if self.primary:
            save_config(self.cfg, self.run_dir.config_path)
        try:
            self.writers = MetricWriters(self.cfg, self.out, primary=self.primary, start_step=self.step)
        except WriterError as e:
            raise UserError(str(e)) from None
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        try:
            # with a progress bar, log lines are written above it, not through it
            with logging_redirect_tqdm() if self.progress else contextlib.nullcontext():
                return self._loop()
        except UserError as e:
            if background.stuck():  # (a save thread that never ends would hold the process at exit, forever)
                if self.writers is not None:
                    self.writers.close()
                background.exit_now(f"error: {str(e).splitlines()[0]}", 2)
            raise
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            self.run_dir.close()
            if self.writers is not None:
                self.writers.close()

    def _log_train(self, lr: float, t0: float, start_step: int, window_t0: float, tokens: int) -> dict:
        w = self.window
        now = time.perf_counter()
        rate = (self.step - start_step) / max(now - t0, 1e-9)  # optimizer steps per second in this process
        rec = {"step": self.step, "loss": w["loss"] / w["steps"], "lr": lr,
               "grad_norm": float(optim.last_grad_norm(self.opt_state)),
               "tokens_per_s": tokens / max(now - window_t0, 1e-9),
               "trained_tokens": self.trained_tokens, **self.window_metrics()}
        self._log(rec)
        if self.primary:
            log.info(progress.progress_line(rec, self.total_steps, (self.total_steps - self.step) / max(rate, 1e-12)))
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        self.window = {"loss": 0.0, "steps": 0, "tokens": 0}
        return rec

    def _loop(self) -> int:
        from tqdm import tqdm

        tc = self.tc
        self.bar = bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, unit="step",
                              dynamic_ncols=True)
        if (self.step >= self.total_steps or self.best.stopped) and self.primary:
            log.info("%s: the run already finished at step %d (raise train.%s to train on)", self.out, self.step,
                     "early_stopping_patience" if self.best.stopped else "max_steps")
        if self.step == 0:
            self.print_sample("before training")
        if self.step == 0 and self.eval_ds is not None and self.evaluated_at is None:  # before any training
            self._log_eval()
            if self.best.save_now(self.step):  # (train.keep_best: the untrained adapter may stay the best)
                self.save()
        t0, start_step = time.perf_counter(), self.step
        window_t0, session_tokens = t0, 0
        while self.step < self.total_steps and not self.best.stopped:
            lr = float(self.schedule(self.step))
            loss, n_trained, n_tokens = self.one_step()
            if not math.isfinite(loss):
                bar.close()
                # (the loss of step N is that of the state saved after step N-1: that state is the first bad one)
                return self._stop_bad(f"the loss is {loss} at step {self.step}", bad_from=self.step - 1)
            self.window["loss"] += loss
            self.window["steps"] += 1
            self.window["tokens"] += n_tokens
            session_tokens += n_tokens
            if self.step == start_step + 1 and self.primary:
                log.info("first step done %.1f s after start", time.perf_counter() - self.started)
            bar.update(1)
            if self.step % tc.log_every == 0 or self.step == self.total_steps:
                window_start = self.step - self.window["steps"]
                rec = self._log_train(lr, t0, start_step, window_t0, session_tokens)  # (this session's throughput)
                window_t0, session_tokens = time.perf_counter(), 0
                diverged = self.monitor.update(self.step, rec["loss"], window_start, rec.get("grad_norm"))
                if diverged is not None:
                    if tc.stop_on_divergence:
                        bar.close()
                        return self._stop_bad(f"training diverged at step {self.step}: {diverged}",
                                              bad_from=self.monitor.streak_start or self.step - 1)
                    if not self._warned_divergence and self.primary:
                        self._warned_divergence = True
                        log.warning("warning: training diverged at step %d: %s; going on "
                                    "(train.stop_on_divergence=false)", self.step, diverged)
            if tc.eval_every and self.step % tc.eval_every == 0 and self.eval_ds is not None:
                self._log_eval()
            if (tc.save_every and self.step % tc.save_every == 0) or self.best.save_now(self.step):
                if self.monitor.suspect:  # (the newest checkpoint stays one from before the loss went up)
                    log.info("step %d: not saving a checkpoint while the loss is far above its early value",
                             self.step)
                else:
                    self.save()
            if self.best.stopped:
                if self.primary:
                    log.info(self.best.stop_line(self.step))
                break
            stop_at = tc.stop_at_step is not None and self.step >= tc.stop_at_step and self.step < self.total_steps
            signalled = parallel.any_process(self._stop_signal is not None)  # every process stops at the same step
            if signalled or stop_at:
                bar.close()
                self.save()
                why = ("train.stop_at_step" if not signalled else signal.Signals(self._stop_signal).name
                       if self._stop_signal is not None else "a signal to another process")
                if self.primary:
                    print(f"{why}: stopped at step {self.step}; checkpoint saved in {self.out}/checkpoints, "
                          "run again to resume", file=sys.stderr)
                if not signalled:
                    return 0
                return EXIT_CODES.get(self._stop_signal, 130)
        bar.close()
        verdict = None if self._warned_divergence else self.monitor.finish()  # (the final windows, as they stand)
        if verdict is not None:
            if tc.stop_on_divergence:
                return self._stop_bad(f"training diverged by the end of the run (step {self.step}): {verdict}",
                                      bad_from=self.monitor.streak_start or self.step - 1)
            if self.primary:
                log.warning("warning: training diverged by the end of the run (step %d): %s; going on "
                            "(train.stop_on_divergence=false)", self.step, verdict)
        if self.eval_ds is not None and self.evaluated_at != self.step:
            self._log_eval()
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

    def export_adapter(self) -> None:
        lora = jax.tree.map(jnp.asarray, parallel.to_host(self.lora))  # (every process takes part in the gather)
        if not self.primary:
            return
        losses = [r["loss"] for r in self.run_dir.read_metrics() if "loss" in r]
        from jqlora.checkpoints import hf_source

        card = {"data": self.cfg.data.path, "steps": self.step, "final_loss": f"{losses[-1]:.4f}" if losses else "n/a"}
        base = hf_source(self.cfg.model.path)  # the original HF checkpoint, also behind a converted base
        if base != os.path.abspath(self.cfg.model.path):
            card["trained_on"] = f"{os.path.abspath(self.cfg.model.path)} (jqlora's 4-bit copy of the base)"
        out = init_state.save_adapter(self.split.model(lora), self.cfg, self.out, os.path.join(self.out, "adapter"),
                                       lora_config=LoraConfig.from_config(self.cfg.lora), base=base, card=card,
                                       overwrite=True)
        log.info("adapter written to %s", out)
