"""`python -m jqlora.train`: QLoRA fine-tuning from a config.

    python -m jqlora.train [--config FILE] [key.sub=value ...]      # no arguments: the demo (configs/demo.yaml)

The pieces: `jqlora.step` (the pure jitted step and the chunked loss), `jqlora.loop` (the `Trainer`: setup, loop,
eval, samples, adapter export), `jqlora.rundir` (checkpoints, metrics, plot of one run directory).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jqlora import sharding
from jqlora.config import ConfigError, load_config
from jqlora.data import DataError
from jqlora.loop import Trainer, UserError

log = logging.getLogger("jqlora.train")


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
