"""Preference examples (token ids) -> padded batches: TRL's collation, at a fixed row length.

A paired example (prompt p, chosen c, rejected r) becomes two rows, p + c and p + r, as TRL's
`DataCollatorForPreference` concatenates them (chosen and rejected go through the model in one batch). A KTO example
(prompt p_i, completion y_i, label) becomes its row p_i + y_i and a mismatched one p_i + y_{i-1} (the completions
rotated by one within the micro-batch, TRL's KL pairs). Arrays are [B, 2, S]: the pair axis second, so a batch
sharded by rows over devices keeps each pair (or KTO example and its mismatch) on one device:

    input_ids        the tokens, right-padded with pad_id
    targets          the next token (0 past the end)
    completion_mask  1 where the target is a completion token (the log-probs summed per sequence)
    token_mask       1 where the target is a real token (ORPO's NLL of the chosen rows: prompt and completion)
    segment_ids      1 on real tokens, 0 on padding
    positions        0, 1, 2, ...
    valid [B]        1 for an example, 0 for a padding row (a short last batch)
    label [B]        KTO only: 1 desirable, 0 undesirable

Rows longer than S = data.max_length keep their first S tokens (the data reader has already cut prompts by
preference.max_prompt_length / truncation_mode, so that only what does not fit is lost).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAIR_KEYS = ("input_ids", "targets", "completion_mask", "token_mask", "segment_ids", "positions")


def _row(prompt: Sequence[int], completion: Sequence[int], S: int, pad_id: int) -> dict[str, np.ndarray]:
    ids = (list(prompt) + list(completion))[:S]
    n, n_prompt = len(ids), min(len(prompt), S)
    out = {k: np.zeros(S, np.int32) for k in PAIR_KEYS}
    out["input_ids"][:] = pad_id
    out["input_ids"][:n] = ids
    out["targets"][:n - 1] = ids[1:]
    out["completion_mask"][max(n_prompt - 1, 0):n - 1] = 1  # target t is token t + 1
    out["token_mask"][:n - 1] = 1
    out["segment_ids"][:n] = 1
    out["positions"][:] = np.arange(S)
    return out


def _empty(S: int, pad_id: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros(S, np.int32) for k in PAIR_KEYS}
    out["input_ids"][:] = pad_id
    out["positions"][:] = np.arange(S)
    return out


class PairDataset:
    """Preference examples with ``batch(rows)`` -> the arrays of the module docstring (``None`` rows: padding).

    ``examples`` are `PairIds` (prompt, chosen, rejected) or, with ``kind="unpaired"``, `UnpairedIds` (prompt,
    completion, label): anything with those attributes."""

    def __init__(self, examples: Sequence, max_length: int, pad_id: int, kind: str = "paired"):
        if kind not in ("paired", "unpaired"):
            raise ValueError(f"kind must be paired or unpaired, not {kind!r}")
        self.examples = list(examples)
        self.S = int(max_length)
        self.pad_id = int(pad_id or 0)
        self.kind = kind
        self.stats: dict = {}

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, rows: Sequence[int | None]) -> dict[str, np.ndarray]:
        S, pad = self.S, self.pad_id
        exs = [self.examples[r] if r is not None else None for r in rows]
        if self.kind == "paired":
            pairs = [(_row(e.prompt, e.chosen, S, pad), _row(e.prompt, e.rejected, S, pad)) if e is not None
                     else (_empty(S, pad), _empty(S, pad)) for e in exs]
        else:
            real = [i for i, e in enumerate(exs) if e is not None]
            prev = {i: real[(j - 1) % len(real)] for j, i in enumerate(real)}  # y_{i-1}, cyclic over real rows
            pairs = [(_row(e.prompt, e.completion, S, pad), _row(e.prompt, exs[prev[i]].completion, S, pad))
                     if e is not None else (_empty(S, pad), _empty(S, pad)) for i, e in enumerate(exs)]
        out = {k: np.stack([np.stack([a[k], b[k]]) for a, b in pairs]) for k in PAIR_KEYS}
        out["valid"] = np.asarray([e is not None for e in exs], np.float32)
        if self.kind == "unpaired":
            out["label"] = np.asarray([bool(e.label) if e is not None else False for e in exs], np.float32)
        return out
