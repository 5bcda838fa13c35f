"""lm-eval-harness on jqlora's own model: `JqloraLM` (lm-eval's model interface, registered as ``"jqlora"``) over the
batched scorer and KV-cache generation of `batching`; `evaluate` runs tasks (built-in or from a folder of task YAMLs)
through ``lm_eval.simple_evaluate``. Needs the ``eval`` extra (``pip install jqlora[eval]``, lm-eval)."""

from jqlora.evaluation.batching import Scorer, generate_rows
from jqlora.evaluation.harness import JqloraLM
from jqlora.evaluation.tasks import TaskError, evaluate, resolve_tasks

__all__ = ["JqloraLM", "Scorer", "TaskError", "evaluate", "generate_rows", "resolve_tasks"]
