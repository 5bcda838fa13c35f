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


def resolve_tasks(names: Sequence[str], include_path: str | os.PathLike | None = None, *,
                  include_defaults: bool = True):
    """(``names`` as lm-eval loads them, YAML files as absolute paths; the `TaskManager` to load them with), or a
    `TaskError` for the first name that is neither. When ``include_path`` defines every named task, lm-eval's
    built-in tasks are not indexed (seconds saved); otherwise they are."""
    out, named = [], []
    for name in names:
        name = name.strip()
        if not name:
            raise TaskError("--tasks: an empty task name (a doubled or trailing comma?)")
        if name.endswith((".yaml", ".yml")):
            if not os.path.isfile(name):
                raise TaskError(f"--tasks {name}: no such task YAML file")
            name = os.path.abspath(name)
        else:
            named.append(name)
        out.append(name)
    if include_path is not None:
        own = task_manager(include_path, include_defaults=False)
        leaves = set(own.all_subtasks)  # (a group or tag of the folder may name lm-eval's own tasks)
        if not include_defaults or all(own.match_tasks([n]) and leaves.issuperset(own.match_tasks([n]))
                                       for n in named):
            manager = own
        else:
            manager = task_manager(include_path)
    else:
        manager = task_manager(None, include_defaults=include_defaults)
    for name in named:
        if not manager.match_tasks([name]):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (lm-eval ls tasks lists them)"
            where = (f"lm-eval's {len(manager.all_tasks)} tasks, groups and tags" if include_defaults
                     else "the tasks")
            raise TaskError(f"--tasks {name}: unknown task, not among {where}"
                            f"{' nor in --include-path' if include_path is not None else ''}{hint}")
    return out, manager


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
