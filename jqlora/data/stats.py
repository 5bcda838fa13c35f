"""What a run tells its user about its data before it trains: dataset statistics, one-line warnings about settings
that are legal but almost certainly not meant, and examples rendered with their trained tokens marked.

numpy only (no JAX), so `python -m jqlora.train --dry-run` stays light.
"""

from __future__ import annotations

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


def source_lines(ds) -> list[str]:
    """One statistics line per source of a dataset of several (none for one source); with a mixture, each
    source's share of an epoch's rows and how many times over that shows its rows."""
    lines, mixture, total = [], getattr(ds, "mixture", None), len(ds)
    for i, (name, part) in enumerate(getattr(ds, "parts", None) or []):
        line = "  " + format_stats(name, dataset_stats(part))
        if mixture is not None:
            share = float(mixture.p[i])
            line += (f"; weight {100 * share:.1f}%: ~{share * total:.0f} of an epoch's {total} rows "
                     f"({share * total / max(len(part), 1):.2f}x its rows)")
        lines.append(line)
    return lines


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
