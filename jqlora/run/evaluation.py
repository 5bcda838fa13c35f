"""The trainer's evaluation: the eval loss, perplexity and accuracy over every trained token of the eval set, and
with several eval sources each source's loss apart (``eval_loss_<i>``)."""

from __future__ import annotations

import math

from jqlora import parallel
from jqlora.data import eval_batches


class Evaluation:
    """Eval metrics of a trainer's model (a mixin of `jqlora.run.loop.Trainer`: it uses ``eval_ds``, ``tc``,
    ``eval_step``, ``lora``, ``split`` and ``place_batch``)."""

    def eval_metrics(self, loss: float) -> dict:
        return {"eval_perplexity": math.exp(min(loss, 700.0)), "eval_accuracy": self.eval_accuracy,
                **getattr(self, "eval_by_source", {})}

    def evaluate(self) -> float | None:
        """The eval loss over every trained token of the eval set; with several eval sources (and no
        train.eval_batches cap) each source's too, as eval_loss_<i> in ``eval_by_source``."""
        if self.eval_ds is None:
            return None
        bs = self.tc.eval_batch_size or self.tc.batch_size
        total, count, right = 0.0, 0.0, 0.0
        parts = [len(p) for _, p in self.eval_ds.parts] if self.tc.eval_batches is None else []
        ranges = [(sum(parts[:i]), n) for i, n in enumerate(parts)] if len(parts) > 1 else [(0, len(self.eval_ds))]
        self.eval_by_source = {}
        for i, (lo, n_rows) in enumerate(ranges):
            part_total, part_count = 0.0, 0.0
            for rows in eval_batches(parallel.RowIds(n_rows), bs, self.tc.eval_batches):
                rows = [None if r is None else lo + r for r in rows]
                s, n, c = self.eval_step(self.lora, self.split.frozen, self.place_batch(self.eval_ds, rows))
                part_total += float(s)
                part_count += float(n)
                right += float(c)
            total, count = total + part_total, count + part_count
            if len(ranges) > 1:
                self.eval_by_source[f"eval_loss_{i}"] = part_total / max(part_count, 1.0)
        self.eval_accuracy = right / max(count, 1.0)
        return total / max(count, 1.0)
