"""``train.eval_tasks``: lm-eval tasks on the model being trained, at every evaluation (`jqlora.evaluation`, the
model of ``python -m jqlora.eval``). The tasks are looked up when the trainer starts, so a misspelt one fails in
seconds, not at the first evaluation; their metrics join the eval record as ``eval_tasks/<task>/<metric>``
(lm-eval's metric names, its default filter's suffix dropped). Single-process only, like the eval samples."""

from __future__ import annotations

import os
from typing import Any

import jax


class EvalTasks:
    """The tasks of ``train.eval_tasks`` and the lm-eval model that scores a trainer's model on them."""

    def __init__(self, tasks: list[str], *, include_path: str | None, limit: int | None,
                 generation_config: str | None, batch_size: int, tokenizer: Any = None):
        try:
            from jqlora.evaluation import TaskError, resolve_tasks
        except ImportError as e:
            raise ValueError(f"train.eval_tasks needs lm-eval: pip install 'jqlora[eval]' ({e})") from None
        if include_path is not None and not os.path.isdir(include_path):
            raise ValueError(f"train.eval_tasks_include_path {include_path}: not a directory")
        try:
            self.tasks, self.manager = resolve_tasks(tasks, include_path)
        except TaskError as e:
            raise ValueError(str(e).replace("--tasks", "train.eval_tasks", 1).replace(
                "--include-path", "train.eval_tasks_include_path")) from None
        self.limit, self.tokenizer, self.generation_config = limit, tokenizer, generation_config
        self.batch_size = batch_size
        self.lm = None

    @classmethod
    def of(cls, cfg) -> EvalTasks | None:
        """The run's ``train.eval_tasks`` (None without any); a ValueError naming the key for a mistake."""
        tc = cfg.train
        if not tc.eval_tasks:
            return None
        return cls(list(tc.eval_tasks), include_path=tc.eval_tasks_include_path, limit=tc.eval_tasks_limit,
                   generation_config=cfg.model.path, batch_size=tc.eval_batch_size or tc.batch_size)

    def metrics(self, model) -> dict[str, float]:
        """``{"eval_tasks/<task>/<metric>": value}`` of ``model`` (a trainer's current model)."""
        if jax.process_count() > 1:
            return {}
        from jqlora.evaluation import JqloraLM, evaluate

        if self.lm is None:  # (one lm-eval model for the whole run: each evaluation reuses its compiled programs)
            self.lm = JqloraLM(model=model, tokenizer=self.tokenizer, generation_config=self.generation_config,
                               batch_size=self.batch_size)
        else:
            self.lm.set_model(model)
        os.environ.setdefault("DISABLE_MULTIPROC", "1")  # (lm-eval's bootstrap pool would fork JAX's threads)
        results = evaluate(self.lm, self.tasks, self.manager, limit=self.limit, bootstrap_iters=0)
        out = {}
        for task, values in results["results"].items():
            for key, value in values.items():
                name, comma, filt = key.partition(",")  # ("metric,filter": alias and sample_len are not metrics)
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not comma or name.endswith("_stderr") or not numeric:
                    continue
                out[f"eval_tasks/{task}/{name}" + ("" if filt in ("", "none") else f",{filt}")] = float(value)
        return out
