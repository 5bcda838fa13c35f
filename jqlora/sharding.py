"""Device mesh, partition rules for every variable of the model, and multi-host start.

The mesh has three named axes (sizes multiply to the device count):

    data    pure data parallelism: the batch is split, every weight is replicated
    fsdp    fully-sharded data parallelism (ZeRO-3): the batch is split *and* the frozen weights, LoRA params and
            optimizer state are split; XLA all-gathers a layer's weights inside the scanned layer body
    tensor  tensor (Megatron) parallelism for unquantized kernels; for 4-bit kernels it is one more weight split

Activations and the batch are sharded along the batch axis over ("data", "fsdp"); the layer axis L of the
stacked layers is never sharded (the layer scan walks it).

Processes. With `jax.distributed` (`initialize_distributed`, from the environment) the mesh spans the devices of
every process. Each process builds only the batch rows its own devices hold (`assemble_batch`), places the frozen
weights it loaded by the same rules (`jax.device_put` keeps just the local shards), and gathers sharded arrays to
the host only when asked (`to_host`, which every process must call); `is_primary` picks the process that writes
files and `any_process` lets all of them agree on a flag (a signal one of them received).

Partition rules (by the variable's name and type; dims counted from the end so the leading L axis is ignored):

    QuantData codes [L, n/2], absmax [L, n_blocks]     flat last axis over ("fsdp", "tensor") — falling back to
                                                       ("fsdp",), then ("tensor",), then replicated — and only when
                                                       every shard holds whole quantization blocks: n_blocks divisible
                                                       by the shard count and no partial last block. Codes and absmax
                                                       are split at the same block boundaries.
    QuantData nested_absmax [L, n_blocks/256]          the same axes when each shard's absmax is whole nested blocks
                                                       of 256; else replicated (it is 1/16384 of the weights)
    QuantData offset [L]                               replicated
    Frozen weight of q/k/v/gate/up_proj [L, O, I]      O over tensor, I over fsdp      (column-parallel; also
                                                       the fused qkv_proj / gate_up_proj of Phi-3)
    Frozen weight of o/down_proj [L, O, I]             I over tensor, O over fsdp      (row-parallel)
    Frozen bias [L, O]                                 O over tensor for column-parallel modules, else replicated
    LoRAParam lora_a [L, I, R], lora_b [L, R, O]       the feature dim (I, resp. O) over fsdp, the rank replicated:
                                                       with FSDP the adapters, their gradients and the AdamW moments
                                                       shrink with the mesh like the base weights (for Llama-3-70B at
                                                       r=16 they are ~3.3 GB replicated). Not split over tensor: they
                                                       are tiny, and the rank-R intermediate would need a reduction.
    embed_tokens / lm_head weight [V, D]               V over ("fsdp", "tensor"), else V over fsdp, else D over fsdp
    norms (and anything not named above)               replicated

Any dimension that does not divide falls back to replication for that dimension, and `partition_specs` reports
it (`notes`), so a plan that silently keeps a full copy per device cannot happen. Errors that make a mesh unusable
(sizes that do not divide the device count, a tensor axis that does not divide the heads, a batch that does not
divide over data×fsdp) raise ValueError naming the axis and the sizes.

Letters: L layers, O/I out/in features, R LoRA rank, V vocabulary, D hidden size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("jqlora.sharding")

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
EMBEDDINGS = ("embed_tokens", "lm_head")
NESTED_BLOCK_SIZE = 256
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # jqlora.quant.BLOCK_SIZES (kept import-free)


# ---------------------------------------------------------------------------------------------------------------
# The mesh


def _check_size(name: str, value: Any) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"mesh.{name}={value!r} must be a positive integer or 'auto'")
    return int(value)


def resolve_mesh_shape(data: int | str = 1, fsdp: int | str = "auto", tensor: int | str = 1,
                       n_devices: int | None = None) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes for ``n_devices`` (default: all devices), with one "auto" axis filled in."""
    n = jax.device_count() if n_devices is None else int(n_devices)
    sizes = {name: _check_size(name, v) for name, v in zip(AXES, (data, fsdp, tensor))}
    autos = [k for k, v in sizes.items() if v == "auto"]
    if len(autos) > 1:
        raise ValueError(f"mesh: at most one axis may be 'auto', got {', '.join(f'{a}=auto' for a in autos)}")
    fixed = math.prod(v for v in sizes.values() if v != "auto")
    desc = " × ".join(f"{k}={v}" for k, v in sizes.items() if v != "auto")
    if n % fixed:
        bad = next((k for k, v in sizes.items() if v != "auto" and v > 1 and n % v), None)
        bad = bad or next(k for k, v in sizes.items() if v != "auto" and v > 1)
        raise ValueError(f"mesh.{bad}={sizes[bad]}: {desc} = {fixed} does not divide the {n} devices")
    if autos:
        sizes[autos[0]] = n // fixed
    elif fixed != n:
        bad = next(k for k, v in sizes.items() if v > 1) if fixed > 1 else "fsdp"
        raise ValueError(f"mesh.{bad}={sizes[bad]}: {desc} = {fixed} devices, but {n} are present "
                         f"(set one axis to 'auto' to use them all)")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int | str = 1, fsdp: int | str = "auto", tensor: int | str = 1,
              devices: Iterable[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default all); one axis may be "auto" (the rest).

    Axes are `AxisType.Auto`, so `jax.jit` propagates shardings from its inputs (GSPMD), as the train step expects.
    """
    devs = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devs))
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devs)


def mesh_from_config(mesh_cfg: Any, devices: Iterable[Any] | None = None) -> Mesh:
    """`make_mesh` from a `jqlora.config.MeshConfig` (or anything with .data/.fsdp/.tensor)."""
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices)


def _size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def check_model_fits(mesh: Mesh, model_config: Any, batch_size: int | None = None,
                     eval_batch_size: int | None = None) -> None:
    """ValueError naming the axis and sizes when the mesh cannot split the model (heads, MLP) or the batches.

    ``model_config`` is a `jqlora.models.ModelConfig` (or anything with its attribute names).
    """
    t = mesh.shape["tensor"]
    if t > 1:
        for attr in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            dim = int(getattr(model_config, attr))
            if dim % t:
                raise ValueError(f"mesh.tensor={t} does not divide the model's {attr}={dim}")
    n = _size(mesh, BATCH_AXES)
    for key, rows in (("train.batch_size", batch_size), ("train.eval_batch_size", eval_batch_size)):
        if rows is not None and rows % n:
            raise ValueError(f"{key}={rows} is not divisible by mesh data × fsdp = "
                             f"{mesh.shape['data']} × {mesh.shape['fsdp']} = {n}")


# ---------------------------------------------------------------------------------------------------------------
# Partition rules


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _is_variable(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def _kind(var: Any) -> str:
    """'quant' | 'frozen' | 'lora' | 'array' from the variable's type (plain arrays: 'array')."""
    if not _is_variable(var):
        return "array"
    from flax import nnx

    from jqlora.lora import Frozen, QuantData

    if isinstance(var, QuantData):
        return "quant"
    if isinstance(var, nnx.LoRAParam):
        return "lora"
    if isinstance(var, Frozen):
        return "frozen"
    return "array"


def _axes_present(mesh: Mesh, axes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a for a in axes if mesh.shape[a] > 1)


def _spec_entry(axes: tuple[str, ...]) -> Any:
    return axes[0] if len(axes) == 1 else axes


def _spec(ndim: int, dims: Mapping[int, tuple[str, ...]]) -> P:
    """A PartitionSpec of rank ``ndim`` with ``dims`` (negative indices) → mesh axes, None elsewhere."""
    entries: list[Any] = [None] * ndim
    for d, axes in dims.items():
        if axes:
            entries[ndim + d] = _spec_entry(axes)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


@dataclasses.dataclass
class _Ctx:
    mesh: Mesh
    notes: list[str]
    siblings: dict[tuple[str, ...], dict[str, tuple[int, ...]]]  # module path → {variable name: shape}


def _pick_dim(mesh: Mesh, size: int, candidates: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """The first candidate axis group (size-1 axes dropped) whose product divides ``size``; () when none does."""
    for axes in candidates:
        axes = _axes_present(mesh, axes)
        if axes and size % _size(mesh, axes) == 0:
            return axes
    return ()


def _weight_axes_wanted(mesh: Mesh, groups: Iterable[tuple[str, ...]]) -> bool:
    return any(_axes_present(mesh, g) for g in groups)


def _quant_spec(path: tuple[str, ...], name: str, shape: tuple[int, ...], ctx: _Ctx) -> P:
    mesh = ctx.mesh
    where = ".".join(path + (name,))
    if name == "offset" or len(shape) == 0:
        return P()
    sib = ctx.siblings.get(path, {})
    codes, absmax = sib.get("codes"), sib.get("absmax")
    if codes is None or absmax is None:
        ctx.notes.append(f"{where}: replicated (no codes/absmax pair to align blocks with)")
        return P()
    n_bytes, n_blocks = codes[-1], absmax[-1]
    block = (2 * n_bytes) // n_blocks if n_blocks else 0
    # no partial last block (nor odd padding): only then is 2·bytes / blocks exactly a valid block size
    whole = n_blocks > 0 and 2 * n_bytes == n_blocks * block and block in BLOCK_SIZES
    wanted = [("fsdp", "tensor"), ("fsdp",), ("tensor",)]
    if not _weight_axes_wanted(mesh, wanted):
        return P()
    axes = _pick_dim(mesh, n_blocks, wanted) if whole else ()
    if not axes:
        if name == "codes":
            n_shards = _size(mesh, _axes_present(mesh, ("fsdp", "tensor")))
            why = "a partial last block" if not whole else f"{n_blocks} blocks do not split into {n_shards} shards"
            ctx.notes.append(f"{'.'.join(path)}: 4-bit kernel replicated ({why}; a shard never splits a block)")
        return P()
    if name in ("codes", "absmax"):
        return _spec(len(shape), {-1: axes})
    if name == "nested_absmax":
        if n_blocks % (_size(mesh, axes) * NESTED_BLOCK_SIZE) == 0:
            return _spec(len(shape), {-1: axes})
        return P()  # tiny (one float per 256 blocks); kept whole so no nested block is split
    ctx.notes.append(f"{where}: replicated (unknown quantized variable)")
    return P()


def _frozen_spec(path: tuple[str, ...], name: str, shape: tuple[int, ...], ctx: _Ctx) -> P:
    mesh = ctx.mesh
    module = path[-1] if path else ""
    where = ".".join(path + (name,))
    if module in EMBEDDINGS and name == "weight" and len(shape) >= 2:
        V, D = shape[-2], shape[-1]
        axes = _pick_dim(mesh, V, [("fsdp", "tensor"), ("fsdp",)])
        if axes:
            return _spec(len(shape), {-2: axes})
        axes = _pick_dim(mesh, D, [("fsdp",)])
        if axes:
            return _spec(len(shape), {-1: axes})
        if _axes_present(mesh, ("fsdp", "tensor")):
            ctx.notes.append(f"{where}: replicated (neither V={V} nor D={D} divides over fsdp)")
        return P()
    linear = module in COLUMN_PARALLEL or module in ROW_PARALLEL
    if linear and name == "weight" and len(shape) >= 2:
        t_dim, f_dim = (-2, -1) if module in COLUMN_PARALLEL else (-1, -2)
        dims = {}
        for dim, axis in ((t_dim, "tensor"), (f_dim, "fsdp")):
            size = shape[dim]
            if mesh.shape[axis] > 1:
                if size % mesh.shape[axis] == 0:
                    dims[dim] = (axis,)
                else:
                    ctx.notes.append(f"{where}: dim {size} not split over {axis}={mesh.shape[axis]} (replicated)")
        return _spec(len(shape), dims)
    if linear and name == "bias" and module in COLUMN_PARALLEL:
        axes = _pick_dim(mesh, shape[-1], [("tensor",)])
        return _spec(len(shape), {-1: axes}) if axes else P()
    return P()  # norms, biases of row-parallel modules, scalars


def _lora_spec(path: tuple[str, ...], name: str, shape: tuple[int, ...], ctx: _Ctx) -> P:
    mesh = ctx.mesh
    if len(shape) < 2 or name not in ("lora_a", "lora_b"):
        return P()
    dim = -2 if name == "lora_a" else -1  # A [.., I, R]: split I;  B [.., R, O]: split O
    axes = _pick_dim(mesh, shape[dim], [("fsdp",)])
    return _spec(len(shape), {dim: axes}) if axes else P()


def _rule(path: tuple[str, ...], var: Any, shape: tuple[int, ...], ctx: _Ctx) -> P:
    module_path, name = path[:-1], path[-1] if path else ""
    kind = _kind(var)
    if kind == "array":  # a plain dict leaf (e.g. the LoRA pure dict): tell by name
        kind = "lora" if name in ("lora_a", "lora_b") else ("quant" if name in (
            "codes", "absmax", "nested_absmax", "offset") else "frozen")
    if kind == "quant":
        return _quant_spec(module_path, name, shape, ctx)
    if kind == "lora":
        return _lora_spec(module_path, name, shape, ctx)
    return _frozen_spec(module_path, name, shape, ctx)


def _flat(tree: Any) -> tuple[list[tuple[tuple[str, ...], Any]], Any]:
    """[(path names, Variable-or-array)] with Variables as leaves, and the treedef of the array leaves."""
    items = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_variable)
    flat = [(tuple(_key_name(k) for k in p), v) for p, v in items]
    return flat, jax.tree.structure(tree)


def partition_specs(tree: Any, mesh: Mesh) -> tuple[list[P], list[str]]:
    """A PartitionSpec per array leaf of ``tree`` (an nnx.State, the LoRA pure dict, or a nested dict of arrays),
    in `jax.tree.leaves` order, and the notes on what was replicated against the mesh's wishes."""
    flat, _ = _flat(tree)
    siblings: dict[tuple[str, ...], dict[str, tuple[int, ...]]] = {}
    for path, v in flat:
        siblings.setdefault(path[:-1], {})[path[-1] if path else ""] = tuple(np.shape(v))
    ctx = _Ctx(mesh, [], siblings)
    specs = []
    for path, v in flat:
        specs.append(_rule(path, v, tuple(np.shape(v)), ctx))
    n_leaves = len(jax.tree.leaves(tree))
    assert n_leaves == len(specs), (n_leaves, len(specs))
    return specs, ctx.notes


def named_shardings(tree: Any, mesh: Mesh) -> Any:
    """A tree shaped like ``tree`` (array leaves replaced) holding each leaf's NamedSharding."""
    specs, _ = partition_specs(tree, mesh)
    return jax.tree.unflatten(jax.tree.structure(tree), [NamedSharding(mesh, s) for s in specs])


def shard_tree(tree: Any, mesh: Mesh, *, log_notes: bool = True) -> Any:
    """``tree`` with every array leaf `jax.device_put` onto its NamedSharding (same tree type and structure)."""
    specs, notes = partition_specs(tree, mesh)
    if log_notes:
        for note in notes:
            log.info("sharding: %s", note)
    leaves = jax.tree.leaves(tree)
    put = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(leaves, specs)]
    return jax.tree.unflatten(jax.tree.structure(tree), put)


def shard_model_state(split_or_state: Any, mesh: Mesh) -> Any:
    """Place the model's arrays on ``mesh`` by the partition rules.

    A `jqlora.train.SplitModel` comes back as a new SplitModel (lora and frozen placed; graphdef/treedef shared);
    an `nnx.State`, a LoRA pure dict or any nested dict of arrays comes back with the same structure.
    """
    if hasattr(split_or_state, "frozen") and hasattr(split_or_state, "lora") and hasattr(split_or_state, "graphdef"):
        return dataclasses.replace(split_or_state, lora=shard_tree(split_or_state.lora, mesh),
                                   frozen=shard_tree(split_or_state.frozen, mesh))
    return shard_tree(split_or_state, mesh)


def shard_optimizer_state(opt_state: Any, lora: Any, mesh: Mesh) -> Any:
    """Place an optax state built for ``lora`` (already placed): every leaf whose dict-key path and shape match a
    LoRA parameter (accumulated gradients, Adam moments) gets that parameter's sharding; the rest is replicated."""
    by_path = {}
    for p, x in jax.tree_util.tree_leaves_with_path(lora):
        by_path[tuple(_key_name(k) for k in p)] = x
    replicated = NamedSharding(mesh, P())

    def place(p, x):
        keys = tuple(_key_name(k) for k in p if isinstance(k, jax.tree_util.DictKey))
        match = by_path.get(keys)
        if match is not None and tuple(np.shape(match)) == tuple(np.shape(x)) and hasattr(match, "sharding"):
            return jax.device_put(x, match.sharding)
        return jax.device_put(x, replicated)

    return jax.tree_util.tree_map_with_path(place, opt_state)


# ---------------------------------------------------------------------------------------------------------------
# Batch


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over ("data", "fsdp"), the other ``ndim - 1`` dims (sequence, ...) whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """`jax.device_put` each array of a batch along its rows; ValueError if the rows do not divide."""
    n = _size(mesh, BATCH_AXES)
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


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


class RowIds:
    """Stands in for a dataset in `jqlora.batches.BatchIterator`: its "batches" are the row ids (None: a padding row), to
    be built by `assemble_batch` on each process for its own devices only."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batch(self, rows: Sequence[Any]) -> list[Any]:
        return list(rows)


@jax.jit
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
    d = _size(mesh, BATCH_AXES)
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


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def per_device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes each device holds for the arrays of ``tree``, summed over the arrays' addressable shards.

    Replicated arrays count in full on every device that holds a copy; numpy / non-jax leaves are ignored.
    """
    out: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        if not isinstance(x, jax.Array):
            continue
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + int(shard.data.nbytes)
    return out


def to_host(tree: Any) -> Any:
    """``tree`` as numpy arrays holding the global values, also of arrays spread over several processes (then every
    process must call it: the shards are gathered with `multihost_utils.process_allgather`)."""
    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# ---------------------------------------------------------------------------------------------------------------
# Multi-host


_DISTRIBUTED = False


class DistributedError(ValueError):
    """The environment describes a multi-process run that cannot start (a bad variable, no coordinator)."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def distributed_env() -> dict[str, Any] | None:
    """What the environment says about a multi-process run, or None for a single process.

    ``JAX_COORDINATOR_ADDRESS`` (host:port) with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (and optionally
    ``JAX_LOCAL_DEVICE_IDS``, comma-separated) are passed on explicitly; otherwise a SLURM (``SLURM_NTASKS`` > 1)
    or Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1) launch is left to JAX's own cluster detection.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        kwargs: dict[str, Any] = {"coordinator_address": address}
        n, pid = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
        if n is not None:
            kwargs["num_processes"] = n
        if pid is not None:
            kwargs["process_id"] = pid
        ids = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        if ids:
            kwargs["local_device_ids"] = [int(i) for i in ids.split(",") if i.strip()]
        return kwargs
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        n = _env_int(var)
        if n is not None and n > 1:
            return {}
    return None


def initialize_distributed() -> bool:
    """Call `jax.distributed.initialize` when the environment describes a multi-process run (see
    `distributed_env`); returns whether this process is part of one. Safe to call twice; call it before any
    other JAX call (it must run before the backends start)."""
    global _DISTRIBUTED
    if _DISTRIBUTED:
        return True
    kwargs = distributed_env()
    if kwargs is None:
        return False
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:  # no coordinator, a wrong process id, ...: the environment's mistake
        where = kwargs.get("coordinator_address", "the cluster environment")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"jax.distributed.initialize ({where}) failed: {first}") from None
    _DISTRIBUTED = True
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """Whether this is process 0, the one that writes metrics, plots and exports (always, in a one-process run)."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (all processes must call it; a plain bool on one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))
