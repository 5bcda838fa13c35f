"""Rows and batches: tokenized examples packed into rows, rows into resumable, seeded micro-batches.

Batch contract (numpy, every array [B, S] with S = data.max_length):
    input_ids    int32    token ids; padding holds the pad id
    targets      int32    the next token within the same segment: targets[t] = input_ids[t+1]; 0 at a segment's
                          last token and on padding
    loss_mask    float32  1.0 where targets[t] is a trained token, else 0 (last token of each segment, padding,
                          prompt tokens with train_on=completion)
    segment_ids  int32    1..k for the k examples packed in a row, 0 on padding (attention stays within a segment)
    positions    int32    0, 1, ... restarting in every segment; 0 on padding
A row holds one example (data.packing=false) or several (best-fit decreasing by length); rows are built once and
shuffled per epoch with a generator seeded by (seed, epoch), or, for weighted sources, drawn by a `Mixture`. The
last batch of an epoch is filled with padding rows (all-zero loss_mask) unless drop_last. `BatchIterator.state()` is a JSON-able position that `restore` resumes from
exactly.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Iterator, Sequence

import numpy as np

from jqlora.data.errors import DataError

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Example:
    """One encoded example: its token ids and which of them are trained targets; ``where`` names its source."""

    ids: np.ndarray  # int32 [L]
    trained: np.ndarray  # bool [L]: token t is a trained target (predicted from tokens < t)
    where: str


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: example indices grouped into rows of at most max_length tokens, deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row index)
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > {max_length}")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, r = free.pop(j)
            rows[r].append(i)
        else:
            r, space = len(rows), max_length
            rows.append([i])
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return rows


class TokenDataset:
    """Tokenized examples arranged in rows of max_length tokens (one example per row, or packed)."""

    def __init__(self, examples: list[Example], max_length: int, *, packing: bool, pad_id: int = 0):
        self.examples = examples
        self.stats: dict = {}  # filled by build_datasets: examples, truncated, dropped_long, dropped_empty
        self.parts: list[tuple[str, TokenDataset]] = []  # several sources: (name, its rows), in row order
        self.mixture: Mixture | None = None  # weighted sources: each epoch's order is drawn by the mixture
        self.max_length = max_length
        self.pad_id = pad_id
        if packing:
            self.rows = pack([len(e.ids) for e in examples], max_length)
        else:
            self.rows = [[i] for i in range(len(examples))]

    @classmethod
    def concat(cls, parts: Sequence["TokenDataset"]) -> "TokenDataset":
        """The parts' rows one after the other (each part packed on its own: no row mixes two parts)."""
        first = parts[0]
        out = cls([], first.max_length, packing=False, pad_id=first.pad_id)
        for part in parts:
            base = len(out.examples)
            out.examples = out.examples + list(part.examples)
            out.rows = out.rows + [[base + i for i in row] for row in part.rows]
        return out

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_trained_tokens(self) -> int:
        return int(sum(e.trained[1:].sum() for e in self.examples))

    def row(self, r: int) -> dict[str, np.ndarray]:
        """One row of the batch contract, each array [S]."""
        S = self.max_length
        input_ids = np.full(S, self.pad_id, np.int32)
        targets = np.zeros(S, np.int32)
        loss_mask = np.zeros(S, np.float32)
        segment_ids = np.zeros(S, np.int32)
        positions = np.zeros(S, np.int32)
        at = 0
        for k, i in enumerate(self.rows[r], start=1):
            ex = self.examples[i]
            n = len(ex.ids)
            input_ids[at: at + n] = ex.ids
            targets[at: at + n - 1] = ex.ids[1:]
            loss_mask[at: at + n - 1] = ex.trained[1:]
            segment_ids[at: at + n] = k
            positions[at: at + n] = np.arange(n, dtype=np.int32)
            at += n
        assert at <= S, (at, S)
        return dict(input_ids=input_ids, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids,
                    positions=positions)

    def empty_row(self) -> dict[str, np.ndarray]:
        S = self.max_length
        return dict(input_ids=np.full(S, self.pad_id, np.int32), targets=np.zeros(S, np.int32),
                    loss_mask=np.zeros(S, np.float32), segment_ids=np.zeros(S, np.int32),
                    positions=np.zeros(S, np.int32))

    def batch(self, rows: Sequence[int | None]) -> dict[str, np.ndarray]:
        """Stack rows ([B, S] each); None stands for a padding row."""
        parts = [self.row(r) if r is not None else self.empty_row() for r in rows]
        return {k: np.stack([p[k] for p in parts]) for k in BATCH_KEYS}


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The row order of an epoch: a permutation drawn from (seed, epoch), or 0..n-1 without shuffling."""
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_rows)


class Mixture:
    """Sampled mixing of sources laid one after the other (source i holds rows starts[i] .. starts[i] + counts[i]).

    An epoch has as many rows as all the sources together, N = Σ counts. Its order is a pure function of (seed,
    epoch): each of the N positions draws its source i with probability p_i = weights_i / Σ weights (one categorical
    draw per position), and source i's positions take its rows in turn from a stream of permutations of its rows
    (seeded by (seed, epoch, i, cycle); in row order without shuffling), so a source drawn more often than it has rows
    repeats every row before any row a third time, and one drawn less often shows a fresh subset each epoch."""

    def __init__(self, weights: Sequence[float], counts: Sequence[int]):
        w = np.asarray(weights, np.float64)
        self.p = w / w.sum()
        self.counts = [int(n) for n in counts]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def order(self, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
        n = sum(self.counts)
        source = np.random.default_rng([int(seed), int(epoch), 0x4D4958]).choice(len(self.p), size=n, p=self.p)
        out = np.empty(n, np.int64)
        for i, count in enumerate(self.counts):
            where = np.flatnonzero(source == i)
            cycles = -(-len(where) // count)
            stream = [np.random.default_rng([int(seed), int(epoch), i, c]).permutation(count) if shuffle
                      else np.arange(count) for c in range(cycles)]
            out[where] = self.starts[i] + (np.concatenate(stream)[: len(where)] if stream else 0)
        return out


class BatchIterator:
    """Micro-batches of `batch_size` rows, epoch after epoch (forever when epochs is None), resumable.

    state() is {"epoch", "index", "seed", "rows"}: the next batch starts at position `index` of epoch `epoch`'s
    order. An epoch's last batch is padded with empty rows, or skipped when partial and drop_last.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 epochs: int | None = None, drop_last: bool = False, mixture: Mixture | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if drop_last and len(dataset) < batch_size:
            raise DataError(f"{len(dataset)} rows make no full batch of {batch_size} (drop_last)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epochs = epochs
        self.drop_last = drop_last
        self.mixture = mixture if mixture is not None else getattr(dataset, "mixture", None)
        if self.mixture is not None and sum(self.mixture.counts) != len(dataset):
            raise ValueError(f"a mixture of {sum(self.mixture.counts)} rows over a dataset of {len(dataset)}")
        self.epoch = 0
        self.index = 0
        self._order_epoch, self._order = -1, None

    @property
    def batches_per_epoch(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def state(self) -> dict:
        out = {"epoch": self.epoch, "index": self.index, "seed": self.seed, "rows": len(self.dataset)}
        if self.mixture is not None:  # (a resume checks that the sources and weights are those it saved)
            out["mixture"] = {"rows": self.mixture.counts, "p": [float(x) for x in self.mixture.p]}
        return out

    def restore(self, state: dict) -> None:
        """Continue from a `state()`; its seed wins over the constructor's, so the data order carries on."""
        rows = state.get("rows", len(self.dataset))
        if rows != len(self.dataset):
            raise DataError(f"cannot resume the data position: the checkpoint saw {rows} rows, the dataset now has "
                            f"{len(self.dataset)} (changed data, max_length or packing?)")
        mine = self.state().get("mixture")
        if state.get("mixture") != mine and (state.get("mixture") is not None or mine is not None):
            raise DataError(f"cannot resume the data position: the checkpoint's data mixture {state.get('mixture')} "
                            f"is not this run's {mine} (changed data.path sources or weights?)")
        self.epoch, self.index, self.seed = int(state["epoch"]), int(state["index"]), int(state["seed"])

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = (epoch_order(len(self.dataset), self.seed, self.epoch, self.shuffle) if self.mixture is None
                           else self.mixture.order(self.seed, self.epoch, self.shuffle))
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        n, b = len(self.dataset), self.batch_size
        if self.drop_last and self.index + b > n:
            self.epoch, self.index = self.epoch + 1, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        order = self._epoch_order()
        rows = [int(r) for r in order[self.index: self.index + b]]
        rows += [None] * (b - len(rows))
        self.index += b
        if self.index >= n:
            self.epoch, self.index = self.epoch + 1, 0
        return self.dataset.batch(rows)


def eval_batches(dataset: TokenDataset, batch_size: int, max_batches: int | None = None):
    """The eval set in order, the last batch padded; at most max_batches."""
    it = BatchIterator(dataset, batch_size, shuffle=False, epochs=1)
    for k, batch in enumerate(it):
        if max_batches is not None and k >= max_batches:
            return
        yield batch
