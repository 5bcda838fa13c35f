"""`python -m jqlora.train`: QLoRA fine-tuning from a config.

    python -m jqlora.train [--config FILE] [key.sub=value ...]      # no --config and no model.path: the demo
    python -m jqlora.train --config FILE ... --dry-run               # config, data statistics, memory plan; no weights

The pieces: `jqlora.training.step` (the pure jitted step and the chunked loss), `jqlora.run.loop` (the `Trainer`:
setup, loop, eval, samples, adapter export), `jqlora.run.directory` (checkpoints, metrics, plot of one run directory).
JAX is imported only after the arguments are parsed, so `--help` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

log = logging.getLogger("jqlora.train")

EXIT_USER_ERROR = 2


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


def _epilog() -> str:
    from jqlora.config import schema_lines

    return ("config keys (key = default -- what it does); set them in the YAML file or as key.sub=value:\n"
            + "\n".join(schema_lines())
            + "\n\nA resumed run (same output_dir) may change only: max_steps / epochs / stop_at_step, the log, eval "
              "and save cadences,\neval_batches / eval_batch_size / eval_path / eval_split, keep_checkpoints, "
              "sample_prompt, remat and the mesh.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jqlora.train", description="QLoRA fine-tuning (JAX).",
                                formatter_class=_HelpFormatter, epilog=_epilog())
    p.add_argument("--config", default=None,
                   help="YAML config (default: the demo, configs/demo.yaml, when model.path is not given either)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines still go to stderr)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, dataset statistics, two rendered examples and the memory plan, "
                        "then exit without loading weights")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
    return p.parse_intermixed_args(argv)  # (flags anywhere among the overrides)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("jqlora.parallel").setLevel(logging.INFO)  # the multi-process start, replicated weights
    logging.getLogger("jqlora.data").setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    from jqlora.config import ConfigError, load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        return _user_error(e)
    # the records checked early, for the objective's fields (SFT formats, preference pairs, KTO, GRPO prompts)
    if args.dry_run or not _holds_files(cfg.output_dir):  # (a run to resume: its checks speak first)
        from jqlora.data import DataError, check_data

        if not os.path.isdir(cfg.model.path):  # (the model is named before the data, as the full start does)
            return _user_error(ConfigError(f"model.path {cfg.model.path}: no such directory"))
        try:
            check_data(cfg.data, cfg.train.objective)  # (seconds, before JAX and the weights)
        except DataError as e:
            return _user_error(e)
    if args.dry_run:
        from jqlora.run import DryRunError, dry_run

        try:
            return dry_run(cfg)
        except (ConfigError, DryRunError) as e:
            return _user_error(e)

    from jqlora import compile_cache, parallel
    from jqlora.checkpoints import ConvertError
    from jqlora.data import DataError
    from jqlora.run import GRPOTrainer, PreferenceTrainer, Trainer, UserError

    compile_cache.enable()  # (before the first compilation)
    try:
        parallel.initialize_distributed()  # before anything touches the devices
        cls = {"sft": Trainer, "grpo": GRPOTrainer}.get(cfg.train.objective, PreferenceTrainer)
        trainer = cls(cfg, progress=False if args.no_progress else None)
        trainer.started = started
        return trainer.run()
    except (ConfigError, DataError, UserError, ConvertError, parallel.DistributedError) as e:
        return _user_error(e)


def _holds_files(path: str | None) -> bool:
    """Anything at ``path`` but an empty directory (a run to resume, a stranger's files, a file)."""
    import os

    if not path or not os.path.lexists(path):
        return False
    return not os.path.isdir(path) or any(os.scandir(path))


def _user_error(e: Exception) -> int:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    from jqlora.cli import run

    run(main)  # (sys.exit(main()), quiet when a pipe's reader has gone: `... | head`)
