"""Partition rules: where every variable of the model lives on the data × fsdp × tensor mesh (`jqlora.parallel.mesh`).

Activations and the batch are sharded along the batch axis over ("data", "fsdp") (`jqlora.parallel.batches`); the
layer axis L of the stacked layers is never sharded (the layer scan walks it). A seq axis (sequence parallelism,
`jqlora.models.sequence`) splits the tokens of every row; for the weights it is one more FSDP axis: wherever a rule
below says fsdp it means ("fsdp", "seq") first, then fsdp alone (a row of 1 and seq 8 still splits the weights 8
ways), so the text keeps saying fsdp.

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
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jqlora.parallel.mesh import BLOCK_SIZES, COLUMN_PARALLEL, EMBEDDINGS, NESTED_BLOCK_SIZE, ROW_PARALLEL, mesh_size

log = logging.getLogger("jqlora.parallel")


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


FSDP = ("fsdp", "seq")  # the weights' FSDP group: a seq axis (tokens split) shards the weights as fsdp does


def _axes_present(mesh: Mesh, axes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a for a in axes if dict(mesh.shape).get(a, 1) > 1)


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
        if axes and size % mesh_size(mesh, axes) == 0:
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
    wanted = [FSDP + ("tensor",), FSDP, ("fsdp", "tensor"), ("fsdp",), ("tensor",)]
    if not _weight_axes_wanted(mesh, wanted):
        return P()
    axes = _pick_dim(mesh, n_blocks, wanted) if whole else ()
    if not axes:
        if name == "codes":
            n_shards = mesh_size(mesh, _axes_present(mesh, FSDP + ("tensor",)))
            why = "a partial last block" if not whole else f"{n_blocks} blocks do not split into {n_shards} shards"
            ctx.notes.append(f"{'.'.join(path)}: 4-bit kernel replicated ({why}; a shard never splits a block)")
        return P()
    if name in ("codes", "absmax"):
        return _spec(len(shape), {-1: axes})
    if name == "nested_absmax":
        if n_blocks % (mesh_size(mesh, axes) * NESTED_BLOCK_SIZE) == 0:
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
        axes = _pick_dim(mesh, V, [FSDP + ("tensor",), FSDP, ("fsdp", "tensor"), ("fsdp",)])
        if axes:
            return _spec(len(shape), {-2: axes})
        axes = _pick_dim(mesh, D, [FSDP, ("fsdp",)])
        if axes:
            return _spec(len(shape), {-1: axes})
        if _axes_present(mesh, FSDP + ("tensor",)):
            ctx.notes.append(f"{where}: replicated (neither V={V} nor D={D} divides over fsdp)")
        return P()
    linear = module in COLUMN_PARALLEL or module in ROW_PARALLEL
    if linear and name == "weight" and len(shape) >= 2:
        t_dim, f_dim = (-2, -1) if module in COLUMN_PARALLEL else (-1, -2)
        dims = {}
        for dim, group in ((t_dim, ("tensor",)), (f_dim, FSDP)):
            size = shape[dim]
            if _axes_present(mesh, group):
                axes = _pick_dim(mesh, size, [group, group[:1]])
                if axes:
                    dims[dim] = axes
                else:
                    n = mesh_size(mesh, _axes_present(mesh, group))
                    ctx.notes.append(f"{where}: dim {size} not split over {'×'.join(group)}={n} (replicated)")
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
    axes = _pick_dim(mesh, shape[dim], [FSDP, ("fsdp",)])
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


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())




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


