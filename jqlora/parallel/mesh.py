"""The device mesh: four named axes, data × fsdp × seq × tensor, whose sizes multiply to the device count (the
partition rules that place every variable on it are in `jqlora.parallel.rules`).

    data    pure data parallelism: the batch is split, every weight is replicated
    fsdp    fully-sharded data parallelism (ZeRO-3): the batch is split *and* the frozen weights, LoRA params and
            optimizer state are split; XLA all-gathers a layer's weights inside the scanned layer body
    seq     sequence (context) parallelism: every row's tokens are split, so N devices hold N× the context; attention
            swaps the sequence split for a head split around itself (Ulysses, `jqlora.models.sequence`), every other
            op of the layer and the cross-entropy run on the device's own tokens; the weights, adapters and optimizer
            state are split over it as over fsdp (`jqlora.parallel.rules`)
    tensor  tensor (Megatron) parallelism for unquantized kernels; for 4-bit kernels it is one more weight split
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh


AXES = ("data", "fsdp", "seq", "tensor")  # (tensor innermost: the fastest links)
SEQ_AXIS = "seq"
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
                       n_devices: int | None = None, *, seq: int | str = 1) -> tuple[int, ...]:
    """The (data, fsdp, tensor) sizes for ``n_devices`` (default: all devices), with one "auto" axis filled in;
    (data, fsdp, seq, tensor), the mesh's own order, when ``seq`` is not 1."""
    n = jax.device_count() if n_devices is None else int(n_devices)
    sizes = {name: _check_size(name, v) for name, v in zip(AXES, (data, fsdp, seq, tensor))}
    autos = [k for k, v in sizes.items() if v == "auto"]
    if len(autos) > 1:
        raise ValueError(f"mesh: at most one axis may be 'auto', got {', '.join(f'{a}=auto' for a in autos)}")
    fixed = math.prod(v for v in sizes.values() if v != "auto")
    # (the seq axis named only when it is used: most runs never set mesh.seq)
    desc = " × ".join(f"{k}={v}" for k, v in sizes.items() if v != "auto" and (k != "seq" or v != 1))
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
    if seq == 1:
        return sizes["data"], sizes["fsdp"], sizes["tensor"]
    return sizes["data"], sizes["fsdp"], sizes["seq"], sizes["tensor"]


def make_mesh(data: int | str = 1, fsdp: int | str = "auto", tensor: int | str = 1,
              devices: Iterable[Any] | None = None, *, seq: int | str = 1) -> Mesh:
    """A ("data", "fsdp", "seq", "tensor") mesh over ``devices`` (default all); one axis may be "auto" (the rest).

    Axes are `AxisType.Auto`, so `jax.jit` propagates shardings from its inputs (GSPMD), as the train step expects.
    """
    devs = list(jax.devices() if devices is None else devices)
    d, f, *s, t = resolve_mesh_shape(data, fsdp, tensor, len(devs), seq=seq)
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh((d, f, s[0] if s else 1, t), AXES, axis_types=auto, devices=devs)


def mesh_from_config(mesh_cfg: Any, devices: Iterable[Any] | None = None) -> Mesh:
    """`make_mesh` from a `jqlora.config.MeshConfig` (or anything with .data/.fsdp/.seq/.tensor)."""
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices, seq=getattr(mesh_cfg, "seq", 1))


def seq_size(mesh: Any) -> int:
    """The mesh's seq axis size (1 on a mesh without one)."""
    return int(dict(mesh.shape).get(SEQ_AXIS, 1))


def mesh_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def check_seq_heads(seq: int, tensor: int, num_heads: int, num_kv_heads: int) -> None:
    """ValueError naming mesh.seq and the head counts when Ulysses attention cannot split the heads over ``seq``
    devices: each device takes N / (seq · tensor) query heads, and the K / tensor KV heads a device holds must split
    over seq, or be few enough to be repeated to seq (seq a multiple of them)."""
    if seq <= 1:
        return
    local_kv = num_kv_heads // max(tensor, 1)
    on_tensor = f" / mesh.tensor={tensor}" if tensor > 1 else ""
    if num_heads % (seq * tensor):
        raise ValueError(f"mesh.seq={seq} does not divide the model's num_attention_heads={num_heads}{on_tensor} "
                         f"(sequence parallelism splits the query heads over the seq axis; "
                         f"num_key_value_heads={num_kv_heads})")
    if local_kv % seq and seq % local_kv:
        raise ValueError(f"mesh.seq={seq} and the model's num_key_value_heads={num_kv_heads}{on_tensor} do not "
                         f"divide one another (num_attention_heads={num_heads}): KV heads are split over the seq "
                         "axis, or repeated when fewer")


def check_model_fits(mesh: Mesh, model_config: Any, batch_size: int | None = None,
                     eval_batch_size: int | None = None, seq_len: int | None = None) -> None:
    """ValueError naming the axis and sizes when the mesh cannot split the model (heads, MLP), the batches or (on a
    seq axis) the rows' ``seq_len`` tokens.

    ``model_config`` is a `jqlora.models.ModelConfig` (or anything with its attribute names).
    """
    t = mesh.shape["tensor"]
    if t > 1:
        for attr in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            dim = int(getattr(model_config, attr))
            if dim % t:
                raise ValueError(f"mesh.tensor={t} does not divide the model's {attr}={dim}")
    s = seq_size(mesh)
    check_seq_heads(s, t, int(model_config.num_attention_heads), int(model_config.num_key_value_heads))
    if s > 1 and seq_len is not None and seq_len % s:
        raise ValueError(f"data.max_length={seq_len} is not divisible by mesh.seq={s} (each device holds "
                         "max_length / seq tokens of every row)")
    n = mesh_size(mesh, BATCH_AXES)
    for key, rows in (("train.batch_size", batch_size), ("train.eval_batch_size", eval_batch_size)):
        if rows is not None and rows % n:
            raise ValueError(f"{key}={rows} is not divisible by mesh data × fsdp = "
                             f"{mesh.shape['data']} × {mesh.shape['fsdp']} = {n}")


# ---------------------------------------------------------------------------------------------------------------
# Partition rules


