"""A training run, from a config to an adapter on disk: building the model the config names (`build`), the trainer's
loop with evaluation, samples, signals and the final export (`loop`; for preference objectives `preference`, for GRPO
`grpo`), the run directory with its checkpoints, checksums, lock and metrics (`directory`, `checksums`, `lock`,
`metrics`, `progress`), divergence detection (`divergence`), the best evaluation and early stopping (`best`),
``--dry-run`` (`dry_run`), ``lora.init_from`` (`init_from`) and the way back from a run directory to its model for
the export (`restore`)."""

from jqlora.run.directory import RunDir, RunDirError, find_run, open_run_dir, read_metrics
from jqlora.run.dry_run import DryRunError, dry_run
from jqlora.run.lock import LockError, RunLock
from jqlora.run.loop import Trainer
from jqlora.run.preference import PreferenceTrainer
from jqlora.run.grpo import GRPOTrainer
from jqlora.run.model import DEMO_MODEL, UserError, build_model, ensure_demo_model
from jqlora.run.restore import restore_for_export
from jqlora.run.best import Best, best_checkpoint

__all__ = [
    "Best", "DEMO_MODEL", "DryRunError", "GRPOTrainer", "LockError", "PreferenceTrainer", "RunDir", "RunDirError", "RunLock", "Trainer", "UserError",
    "best_checkpoint", "build_model", "dry_run", "ensure_demo_model", "find_run", "open_run_dir", "read_metrics",
    "restore_for_export",
]
