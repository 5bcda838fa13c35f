"""The best evaluation and early stopping, as transformers does them (`Trainer._determine_best_metric` and
`EarlyStoppingCallback`), and the best checkpoint.

At each evaluation (the one before training included: transformers' ``eval_on_start``), with v the value of
``train.metric_for_best`` and b the best so far (none before the first evaluation; ±inf while no finite value beat
it), better(x, y) = x > y with ``train.greater_is_better``, else x < y:

    patience counter  <- 0 if there is no b yet, or better(v, b) and |v - b| > train.early_stopping_threshold;
                         else counter + 1                                  (the callback, which sees the old b)
    b, best step      <- v, this step  if better(v, b)                     (the trainer, after the callback)
    stop              <- counter >= train.early_stopping_patience

so a small improvement (within the threshold) still moves the best, yet counts against the patience. The run stops
at the first evaluation where the counter reaches the patience: it saves that step, evaluates nothing more and
exports its adapter as at the end of a run. A run that stopped early and is run again stays stopped (raise the
patience to go on).

With ``train.keep_best`` each new best is saved as a checkpoint at once (transformers' ``save_strategy="best"``) and
the rotation (train.keep_checkpoints) never removes the checkpoint of the best step; ``python -m jqlora.export RUN
DST --best`` exports it. This state lives in every checkpoint's meta (``"best"``), so a resumed run continues the
count exactly as an uninterrupted one; ``best.json`` in the run directory, replaced whole after each evaluation, is a
copy of the newest state for people and scripts.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import NamedTuple

from jqlora.adapters import ExportError
from jqlora.run.directory import RunDir, find_run
from jqlora.run.model import UserError
from jqlora.run.restore import held_checkpoint

log = logging.getLogger("jqlora.train")

BEST_JSON = "best.json"


class BestTracker:
    """The best value of train.metric_for_best, its step and the patience counter of one run (see the module)."""

    def __init__(self, tc, run_dir: RunDir):
        given = tc.metric_for_best  # (transformers' names and inference: "loss" is eval_loss, lower is better)
        self.metric = given if given.startswith("eval_") else f"eval_{given}"
        self.greater = not given.endswith("loss") if tc.greater_is_better is None else bool(tc.greater_is_better)
        self.patience, self.threshold, self.keep = tc.early_stopping_patience, tc.early_stopping_threshold, tc.keep_best
        self.run_dir = run_dir
        self.evaluations, self.best_metric, self.best_step, self.counter = 0, None, None, 0
        self.new_best_at: int | None = None

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.greater else a < b

    def update(self, step: int, record: dict) -> None:
        """Count the evaluation ``record`` of ``step`` (see the module)."""
        value = record.get(self.metric)
        if value is None:
            logged = ", ".join(k for k in record if k.startswith("eval_") and k != "eval_samples")
            raise UserError(f"train.metric_for_best={self.metric}: the evaluation logs no such metric (it logs "
                            f"{logged})")
        value = float(value)
        best = self.best_metric if self.best_metric is not None else -math.inf if self.greater else math.inf
        if self.evaluations == 0 or (self._better(value, best) and abs(value - best) > self.threshold):
            self.counter = 0
        else:
            self.counter += 1
        self.evaluations += 1
        self.new_best_at = None
        if self._better(value, best):
            self.best_metric, self.best_step, self.new_best_at = value, step, step
        self._protect()
        self._write()

    @property
    def stopped(self) -> bool:
        """Whether the patience has run out."""
        return self.patience is not None and self.counter >= self.patience

    def save_now(self, step: int) -> bool:
        """Whether ``step`` must be saved now: a new best with train.keep_best."""
        return self.keep and self.new_best_at == step

    def stop_line(self, step: int) -> str:
        best = "no finite value" if self.best_step is None else f"{self.best_metric:.6g} at step {self.best_step}"
        return (f"early stopping: {self.metric} did not improve by more than {self.threshold:g} in "
                f"{self.counter} evaluation(s) (train.early_stopping_patience={self.patience}); stopped at step "
                f"{step}, the best {self.metric}: {best}")

    def state(self) -> dict:
        return {"metric": self.metric, "greater_is_better": self.greater, "evaluations": self.evaluations,
                "best_metric": self.best_metric, "best_step": self.best_step, "patience_counter": self.counter}

    def restore(self, state: dict | None) -> None:
        """Continue from a checkpoint's ``state()`` (none: a checkpoint written before any evaluation)."""
        if state:
            self.evaluations, self.counter = int(state["evaluations"]), int(state["patience_counter"])
            self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        self._protect()
        if state:
            self._write()

    def _protect(self) -> None:
        self.run_dir.protected = {self.best_step} if self.keep and self.best_step is not None else set()

    def _write(self) -> None:
        if not self.run_dir.primary:
            return
        path = os.path.join(self.run_dir.out, BEST_JSON)
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump({**self.state(), "stopped": self.stopped}, f, indent=1)
            os.replace(path + ".tmp", path)
        except OSError as e:  # (a copy for people: what resuming needs is in the checkpoints)
            log.warning("warning: %s not updated (%s); the run goes on", path, e.strerror or e)


class Best(NamedTuple):
    """The best evaluation a run recorded: its step, train.metric_for_best and its value there."""
    step: int
    metric: str
    value: float

    def __str__(self) -> str:
        return f"step {self.step}, the best {self.metric}: {self.value:.6g}"


def best_checkpoint(src: str | os.PathLike) -> Best:
    """The best step a run recorded (its newest checkpoint's meta) and its metric, for ``export --best``; one-line
    errors."""
    run_dir, step = find_run(src)
    if step is not None:
        raise ExportError(f"{src}: --best takes the run directory, not one of its checkpoints")
    run = RunDir(run_dir, create=False)
    with held_checkpoint(run, None) as (held, newest):
        best = held.restore_meta(newest).get("best") or {}
    if best.get("best_step") is None:
        raise ExportError(f"{run_dir}: the run recorded no best checkpoint (no evaluation of "
                          f"train.metric_for_best by its checkpoint of step {newest})")
    if best["best_step"] not in run.steps():
        raise ExportError(f"{run_dir}: the best step {best['best_step']} ({best['metric']} "
                          f"{best['best_metric']:.6g}) has no checkpoint (have {', '.join(map(str, run.steps()))}); "
                          "train with train.keep_best=true to keep it")
    return Best(int(best["best_step"]), str(best["metric"]), float(best["best_metric"]))
