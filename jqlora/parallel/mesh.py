"""The device mesh: three named axes, data × fsdp × tensor, whose sizes multiply to the device count (the partition
rules that place every variable on it are in `jqlora.parallel.rules`).

    data    pure data parallelism: the batch is split, every weight is replicated
    fsdp    fully-sharded data parallelism (ZeRO-3): the batch is split *and* the frozen weights, LoRA params and
            optimizer state are split; XLA all-gathers a layer's weights inside the scanned layer body
    tensor  tensor (Megatron) parallelism for unquantized kernels; for 4-bit kernels it is one more weight split
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh


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


def mesh_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
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
    n = mesh_size(mesh, BATCH_AXES)
    for key, rows in (("train.batch_size", batch_size), ("train.eval_batch_size", eval_batch_size)):
        if rows is not None and rows % n:
            raise ValueError(f"{key}={rows} is not divisible by mesh data × fsdp = "
                             f"{mesh.shape['data']} × {mesh.shape['fsdp']} = {n}")


# ---------------------------------------------------------------------------------------------------------------
# Partition rules


