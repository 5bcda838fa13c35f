"""A run's datasets from its config (`build_datasets`): one source, or several when ``data.path`` is a list.

Sources. ``data.path`` is one dataset or a list of entries, each a string or ``{path, weight, split, subset,
format}`` (split, subset and format default to the data section's; `data_sources`). Every source is read, split,
encoded with its own format (auto: detected from its first record), fitted to data.max_length and packed on its
own, so no row mixes two sources, and its statistics are its own (``TokenDataset.parts``). The training set is the sources'
rows one after the other:
- without weights (concatenation) its rows are shuffled together per epoch, as one dataset's are;
- with a weight on every entry (sampled mixing) each epoch's order is a `rows.Mixture`: as many rows as the
  sources hold together, each row's source drawn with probability weight / Σ weights, seeded by (train.seed,
  epoch), so the mixture's position is the plain (epoch, index) a checkpoint saves and a resume continues exactly.
  (datasets' ``interleave_datasets(probabilities=...)`` draws the same way, but its stream's position cannot be
  saved and restored.)

Eval sets. ``data.eval_path`` (a source or a list, without weights) gives them; else ``data.eval_split`` reads that
split of every source, else ``data.eval_fraction`` holds out that fraction of every source's records (seeded by
train.seed). They are concatenated and evaluated in order, each source on its own too (the trainer's
eval_loss_<i>), and the dry run shows them per source.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from jqlora.data.errors import DataError
from jqlora.data.records import FORMATS, Record, _pad_id, detect_format, encode_records, fit_length, read_records
from jqlora.data.rows import Mixture, TokenDataset


@dataclasses.dataclass(frozen=True)
class Source:
    path: str
    what: str  # the setting that names it: data.path, data.path[1], data.eval_path[0]
    split: str
    subset: str | None
    format: str
    weight: float | None


def data_sources(data_cfg, key: str = "path", split: str | None = None) -> list[Source]:
    """The entries of ``data.<key>`` (path or eval_path) as Sources, with the data section's defaults filled in."""
    value = getattr(data_cfg, key)
    if value is None:
        return []
    many = isinstance(value, (list, tuple))
    out = []
    for i, entry in enumerate(value if many else [value]):
        e = {"path": entry} if isinstance(entry, str) else dict(entry)
        out.append(Source(str(e["path"]), f"data.{key}[{i}]" if many else f"data.{key}",
                          e.get("split") or split or data_cfg.split, e.get("subset") or data_cfg.subset,
                          e.get("format") or data_cfg.format, e.get("weight")))
    return out


def map_paths(value: Any, fn: Callable[[str], str]) -> Any:
    """``data.path`` / ``data.eval_path`` with ``fn`` applied to every source's path (the structure kept)."""
    if isinstance(value, (list, tuple)):
        return [fn(e) if isinstance(e, str) else {**e, "path": fn(e["path"])} for e in value]
    return value if value is None else fn(value)


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic hold-out: round(fraction * n) records (at least 1 when fraction > 0) chosen by seed."""
    if fraction <= 0:
        return records, []
    n = len(records)
    n_eval = max(1, int(round(fraction * n)))
    if n_eval >= n:
        raise DataError(f"data.eval_fraction={fraction} leaves no training records out of {n}")
    perm = np.random.default_rng([int(seed), 0x5E1]).permutation(n)
    held = np.zeros(n, dtype=bool)
    held[perm[:n_eval]] = True
    return [r for r, h in zip(records, held) if not h], [r for r, h in zip(records, held) if h]


def _format(records: list[Record], fmt: str, data_cfg) -> str:
    if fmt == "auto":
        fmt = detect_format(records[0], messages_field=data_cfg.messages_field, text_field=data_cfg.text_field)
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r} (one of auto, {', '.join(FORMATS)})")
    return fmt


def _combine(parts: list[tuple[str, TokenDataset]], weights: list | None) -> TokenDataset:
    if len(parts) == 1 and weights is None:
        return parts[0][1]
    ds = TokenDataset.concat([p for _, p in parts])
    ds.parts = parts
    ds.stats = {k: sum(int(p.stats.get(k, 0)) for _, p in parts)
                for k in ("examples", "truncated", "dropped_long", "dropped_empty")}
    if weights is not None:
        ds.mixture = Mixture(weights, [len(p) for _, p in parts])
    return ds


def build_datasets(data_cfg, tokenizer, *, seed: int = 0) -> tuple[TokenDataset, TokenDataset | None]:
    """Train and eval TokenDatasets for a `jqlora.config.DataConfig` (eval None when there is none)."""
    pad = _pad_id(tokenizer)
    many = isinstance(data_cfg.path, (list, tuple))

    def make(records, fmt, name):
        examples, _ = encode_records(records, tokenizer, fmt=fmt, train_on=data_cfg.train_on,
                                     messages_field=data_cfg.messages_field, text_field=data_cfg.text_field,
                                     chat_template=data_cfg.chat_template, train_on_eos=data_cfg.train_on_eos)
        stats: dict = {}
        examples = fit_length(examples, data_cfg.max_length, data_cfg.overlong, name=name, stats=stats)
        ds = TokenDataset(examples, data_cfg.max_length, packing=data_cfg.packing, pad_id=pad)
        ds.stats = stats
        return ds

    def read(s: Source, split: str | None = None) -> list[Record]:
        return read_records(s.path, split=split or s.split, subset=s.subset, what=s.what)

    train_parts, eval_parts, formats = [], [], []
    eval_sources = data_sources(data_cfg, "eval_path", split=data_cfg.eval_split)
    train_sources = data_sources(data_cfg, "path")
    for s in train_sources:
        records = read(s)
        held: list[Record] = []
        if data_cfg.eval_split and not eval_sources:
            held = read(s, data_cfg.eval_split)
        elif not eval_sources:
            records, held = split_records(records, data_cfg.eval_fraction, seed)
        fmt = _format(records, s.format, data_cfg)
        formats.append(fmt)
        name = f"{s.what} ({s.path})" if many else s.path
        train_parts.append((name, make(records, fmt, name)))
        if held:
            eval_parts.append((name, make(held, fmt, name + " (eval)")))
    for s in eval_sources:
        records = read(s)
        # (one training source: its eval set is read in its format, as it always was)
        fmt = _format(records, formats[0] if s.format == "auto" and not many else s.format, data_cfg)
        name = f"{s.what} ({s.path})" if isinstance(data_cfg.eval_path, (list, tuple)) else s.path
        eval_parts.append((name, make(records, fmt, name + " (eval)")))
    weights = [s.weight for s in train_sources] if train_sources[0].weight is not None else None
    train = _combine(train_parts, weights)
    return train, _combine(eval_parts, None) if eval_parts else None
