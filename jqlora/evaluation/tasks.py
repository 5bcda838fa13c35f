"""Which lm-eval tasks to run, checked before any weights are loaded, and running them (``lm_eval.simple_evaluate``).

A task is a name lm-eval knows (its built-in tasks, groups and tags, glob patterns allowed), a name defined by a
task YAML under ``include_path`` (a folder, searched as lm-eval's ``--include_path`` does), or the path of a task
YAML file. Anything else is a `TaskError` naming the task, with the closest known names.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import Any


class TaskError(ValueError):
    """A task that lm-eval cannot find, or a task folder that is not one (printed as one line)."""


def task_manager(include_path: str | os.PathLike | None = None, *, include_defaults: bool = True):
    """lm-eval's `TaskManager` over its built-in tasks (unless ``include_defaults=False``) and ``include_path``."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise TaskError(f"--include-path {include_path}: not a directory")
    return TaskManager(include_path=None if include_path is None else str(include_path),
                       include_defaults=include_defaults)


def resolve_tasks(names: Sequence[str], manager) -> list[str]:
    """``names`` as lm-eval loads them (YAML files as paths); `TaskError` for the first one it does not know."""
    out: list[str] = []
    for name in names:
        name = name.strip()
        if not name:
            raise TaskError("--tasks: an empty task name (a doubled or trailing comma?)")
        if name.endswith((".yaml", ".yml")):
            if not os.path.isfile(name):
                raise TaskError(f"--tasks {name}: no such task YAML file")
            out.append(os.path.abspath(name))
            continue
        if not manager.match_tasks([name]):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (lm-eval ls tasks lists them)"
            raise TaskError(f"--tasks {name}: unknown task, not among lm-eval's {len(manager.all_tasks)} tasks, groups "
                            f"and tags nor in --include-path{hint}")
        out.append(name)
    return out


def evaluate(lm, tasks: Sequence[str], manager, *, limit: float | None = None, num_fewshot: int | None = None,
             log_samples: bool = False, apply_chat_template: bool = False, bootstrap_iters: int = 100000,
             seed: int = 0, **kw: Any) -> dict:
    """``lm_eval.simple_evaluate`` of the model ``lm`` (an lm-eval LM, e.g. `JqloraLM`) on ``tasks``: lm-eval's
    results dict (``results``, ``configs``, ``n-samples``, and ``samples`` with ``log_samples``)."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        log_samples=log_samples, apply_chat_template=apply_chat_template, bootstrap_iters=bootstrap_iters,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed, **kw)
