"""What a run tells its user before and while it trains: dataset statistics, one-line warnings about settings that
are legal but almost certainly not meant, the progress line, and examples rendered with their trained tokens marked.

numpy only (no JAX), so `python -m jqlora.train --dry-run` stays light.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

TINY_DATASET = 1000  # rows: below this, a run that does not see every row once is probably a mistake


def dataset_stats(ds) -> dict[str, Any]:
    """Rows, examples, trained and real tokens, truncations, drops and packing efficiency of a `TokenDataset`."""
    lengths = [len(e.ids) for e in ds.examples]
    real = int(sum(lengths))
    st = dict(getattr(ds, "stats", {}) or {})
    return {
        "rows": len(ds),
        "examples": len(ds.examples),
        "trained_tokens": ds.num_trained_tokens,
        "tokens": real,
        "truncated": int(st.get("truncated", 0)),
        "dropped": int(st.get("dropped_long", 0)) + int(st.get("dropped_empty", 0)),
        "packing_efficiency": real / max(len(ds) * ds.max_length, 1),  # real tokens / row slots
    }


def format_stats(name: str, s: dict[str, Any]) -> str:
    return (f"{name}: {s['rows']} rows of {s['examples']} examples, {s['trained_tokens']} trained tokens of "
            f"{s['tokens']}, {s['truncated']} truncated, {s['dropped']} dropped, "
            f"rows {100 * s['packing_efficiency']:.1f}% filled")


def settings_warnings(cfg, train_ds, total_steps: int) -> list[str]:
    """One line per setting that will quietly waste the run."""
    tc, out = cfg.train, []
    if tc.warmup_steps >= total_steps:
        out.append(f"warning: train.warmup_steps={tc.warmup_steps} >= the run's {total_steps} optimizer steps: "
                   "the learning rate never reaches its peak")
    rows = len(train_ds)
    seen = total_steps * tc.batch_size * tc.grad_accum_steps
    if rows <= TINY_DATASET and seen < rows:
        out.append(f"warning: the run sees {seen} of the {rows} training rows (less than one epoch of a small "
                   f"dataset: {total_steps} steps x {tc.batch_size} rows x {tc.grad_accum_steps} accumulation)")
    st = getattr(train_ds, "stats", {}) or {}
    kept = len(train_ds.examples)
    if kept and st.get("truncated", 0) >= kept:
        out.append(f"warning: every one of the {kept} training examples is cut at data.max_length="
                   f"{cfg.data.max_length}: raise data.max_length")
    return out


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(rec: dict, total_steps: int, eta_s: float) -> str:
    """``step 10/100 loss 2.3456 lr 1.00e-03 grad_norm 0.532 tok/s 4100 trained_tokens 12345 eta 1m20s``."""
    grad = rec.get("grad_norm")
    return (f"step {rec['step']}/{total_steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
            f"grad_norm {'?' if grad is None else f'{grad:.3f}'} tok/s {rec['tokens_per_s']:.0f} "
            f"trained_tokens {rec['trained_tokens']} eta {format_duration(eta_s)}")


def eval_line(rec: dict) -> str:
    parts = [f"eval step {rec['step']}: loss {rec['eval_loss']:.4f}"]
    if "eval_perplexity" in rec:
        parts.append(f"perplexity {rec['eval_perplexity']:.3f}")
    if "eval_accuracy" in rec:
        parts.append(f"token accuracy {rec['eval_accuracy']:.4f}")
    return ", ".join(parts)


def render_example(tokenizer, example, max_chars: int = 2000) -> str:
    """The example's text with each run of trained tokens wrapped in [[...]]."""
    ids = np.asarray(example.ids)
    trained = np.zeros(len(ids), bool)
    trained[1:] = np.asarray(example.trained)[1:].astype(bool)  # the first token is never a target
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            text = tokenizer.decode(ids[start:i].tolist())
            parts.append(f"[[{text}]]" if trained[start] else text)
            start = i
    text = "".join(parts)
    return text if len(text) <= max_chars else text[:max_chars] + " ..."
