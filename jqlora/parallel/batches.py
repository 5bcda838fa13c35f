"""The batch on a mesh: rows over ("data", "fsdp"), and in a multi-process run each process builds only the rows its
own devices hold (`assemble_batch`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jqlora.parallel.mesh import BATCH_AXES, mesh_size




def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over ("data", "fsdp"), the other ``ndim - 1`` dims (sequence, ...) whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """`jax.device_put` each array of a batch along its rows; ValueError if the rows do not divide."""
    n = mesh_size(mesh, BATCH_AXES)
    out = {}
    for key, x in batch.items():
        rows = np.shape(x)[0] if np.ndim(x) else None
        if rows is None:
            out[key] = jax.device_put(x, NamedSharding(mesh, P()))
            continue
        if rows % n:
            raise ValueError(f"batch['{key}'] has {rows} rows, not divisible by mesh data × fsdp = "
                             f"{mesh.shape['data']} × {mesh.shape['fsdp']} = {n}")
        out[key] = jax.device_put(x, batch_sharding(mesh, np.ndim(x)))
    return out


class RowIds:
    """Stands in for a dataset in `jqlora.data.BatchIterator`: its "batches" are the row ids (None: a padding row), to
    be built by `assemble_batch` on each process for its own devices only."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batch(self, rows: Sequence[Any]) -> list[Any]:
        return list(rows)


@jax.jit
def token_counts(masks: list[jax.Array], segments: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(trained tokens, input tokens) in global micro-batches (loss masks, segment ids), replicated on every device."""
    trained = sum(jax.numpy.sum(m.astype(np.float32)) for m in masks)
    return trained, sum(jax.numpy.sum((s > 0).astype(np.int32)) for s in segments)


def local_row_ranges(mesh: Mesh, n_rows: int) -> list[tuple[int, int]]:
    """The [start, stop) row ranges of an ``n_rows`` batch that this process's devices hold (rows over data×fsdp)."""
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((n_rows,))
    return sorted({idx[0].indices(n_rows)[:2] for idx in index_map.values()})


def assemble_batch(rows: Sequence[Any], build: Callable[[Sequence[Any]], Mapping[str, np.ndarray]],
                   mesh: Mesh) -> dict[str, jax.Array]:
    """The global batch of ``rows`` (row ids) on ``mesh``, rows over ("data", "fsdp"), from the rows this process's
    devices hold only: ``build(some_rows)`` returns arrays whose first dimension is those rows, and each process calls
    it for its own row ranges (`jax.make_array_from_callback`), so in a multi-process run every process reads its part
    of the batch and nothing else. On one process it is `shard_batch(build(rows), mesh)`."""
    n = len(rows)
    d = mesh_size(mesh, BATCH_AXES)
    if n % d:
        raise ValueError(f"a batch of {n} rows is not divisible by mesh data × fsdp = "
                         f"{mesh.shape['data']} × {mesh.shape['fsdp']} = {d}")
    pieces = {(a, b): build(rows[a:b]) for a, b in local_row_ranges(mesh, n)}
    first = next(iter(pieces.values()))
    out = {}
    for key, sample in first.items():
        def part(index, key=key):
            a, b, _ = index[0].indices(n)
            return pieces[(a, b)][key][(slice(None),) + tuple(index[1:])]

        shape = (n,) + tuple(np.shape(sample)[1:])
        out[key] = jax.make_array_from_callback(shape, batch_sharding(mesh, len(shape)), part)
    return out
