"""Where a run's metric records go besides `metrics.jsonl`: TensorBoard event files (tensorboardX) and, when asked
for and installed, Weights & Biases. Only the primary process writes.

    output_dir/tensorboard/   events: train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/trained_tokens,
                              eval/loss, eval/perplexity, and the eval samples as text (eval/samples)

A resumed run purges the events after its checkpoint's step (TensorBoard's purge_step), so curves never run twice.
W&B (`log.wandb=true`) resumes the same run id (kept in output_dir/wandb_id); `WANDB_MODE=offline` needs no network.
"""

from __future__ import annotations

import os
from typing import Any


class WriterError(ValueError):
    """A logging backend was asked for but cannot run (e.g. wandb not installed): one line, exit code 2."""


def _tag(key: str) -> str:
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


class MetricWriters:
    def __init__(self, cfg, out: str, *, primary: bool = True, start_step: int = 0):
        self.tb = None
        self.wandb = None
        if not primary:
            return
        if cfg.log.wandb:
            try:
                import wandb
            except ImportError:
                raise WriterError("log.wandb=true needs the wandb package (pip install wandb), or set "
                                  "log.wandb=false") from None
            from jqlora.config import config_to_dict

            id_file = os.path.join(out, "wandb_id")
            run_id = open(id_file).read().strip() if os.path.isfile(id_file) else wandb.util.generate_id()
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
            self.wandb = wandb.init(project=cfg.log.wandb_project or "jqlora", id=run_id, resume="allow", dir=out,
                                    name=os.path.basename(os.path.abspath(out)), config=config_to_dict(cfg))
        if cfg.log.tensorboard:
            from tensorboardX import SummaryWriter

            # a resumed run drops the events a stopped session wrote after its checkpoint's step
            self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start_step + 1 if start_step else 0)
            # tensorboardX writes from a queue in a thread, so its flush() may find the last window's events still
            # queued (lost to a kill -9): they are written as they come instead, and flush() puts them on disk
            events = self.tb._get_file_writer().event_writer
            events.add_event = events._ev_writer.write_event

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        scalars = {_tag(k): float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
            for k, v in record.items():
                if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):  # eval samples
                    text = "\n\n".join(f"**{x.get('prompt', '')}** → {x.get('reply', '')}" for x in v)
                    self.tb.add_text(_tag(k), text, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def finite_means(rows: list[dict]) -> dict:
    """The mean of each metric over ``rows`` (dicts of numbers or device scalars, e.g. a step's micro-batches),
    skipping rows where it is missing or not finite (a KTO micro-batch without a desirable example has no
    rewards/chosen); a metric no row has is left out."""
    import jax
    import numpy as np

    rows = [{k: float(v) for k, v in r.items()} for r in jax.device_get(rows)]
    out = {}
    for k in sorted({k for r in rows for k in r}):
        vals = [r[k] for r in rows if k in r and np.isfinite(r[k])]
        if vals:
            out[k] = float(np.mean(vals))
    return out
