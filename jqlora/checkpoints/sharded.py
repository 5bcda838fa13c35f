"""Sharded streaming load (`from_hf_tensors_sharded`, `jqlora.load_model(..., mesh=)`): the model is built abstractly
(`nnx.eval_shape`), `jqlora.parallel.partition_specs` plans a `NamedSharding` for every variable, and then the
checkpoint is read one tensor at a time into host memory and each device receives only its shard of it:

- a linear kernel W [O, I] is flattened row-major into blocks of ``block_size``; where its codes and absmax are
  split over mesh axes (always at whole blocks, see `jqlora.parallel.rules`) and the split holds whole blocks, the
  flat W is placed with that split and every device quantizes its own blocks (`jax.shard_map`), which is exact: codes
  and absmax of a block depend on that block only. Double quantization needs the mean of every absmax of the tensor,
  so the float32 absmax (1/32 of the bf16 tensor) is gathered to every device, the 8-bit step is computed there
  the way `quant.quantize` computes it on one device (bit for bit the same), and each device keeps its part.
  A kernel the rules keep whole (blocks that do not split evenly) is quantized on the default device instead.
- everything else (embeddings, norms, biases, unquantized kernels) goes from host memory straight to its shards.
- stacked layer variables [L, ...] are allocated once on their shards and filled layer by layer in place
  (a jitted update that donates its buffer); the layer axis is never sharded. Each tensor's placement is waited
  for before the next tensor is read, so reads cannot run ahead of the devices and pile up in host memory.
- LoRA adapters are initialized as in the unsharded load (on one device; they are small) and then placed.

Host memory stays near one checkpoint tensor (plus what the devices hold when the devices are the host's own), and
no device ever holds more than one tensor in bf16. The values equal those of the unsharded load bit for bit.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jqlora import parallel
from jqlora import quant as q
from jqlora.lora import LoraConfig, LoraLinear, QuantSpec, compute_dtype, set_layer_values
from jqlora.models import (HFKey, LlamaForCausalLM, ModelConfig, TensorGetter, check_filled, checkpoint_pieces,
                           hf_key_table)

log = logging.getLogger("jqlora.models")




def from_hf_tensors_sharded(
    cfg: ModelConfig,
    get: TensorGetter,
    mesh: Mesh,
    *,
    lora: LoraConfig | None = None,
    quant: str = "nf4",
    double_quant: bool = True,
    block_size: int = 64,
    dtype: Any = "bfloat16",
    lora_dtype: Any = "float32",
    seed: int = 0,
    remat: str = "full",
    scan_layers: bool = True,
    desc: str = "loading",
    quantize_experts: bool = True,
) -> LlamaForCausalLM:
    """`from_hf_tensors` with every variable placed on ``mesh`` by `jqlora.parallel`'s partition rules while it is
    read, one tensor at a time (see the module docstring). ``get`` should return host (numpy) arrays, e.g.
    `convert.Checkpoint.get_host`. Same checks and errors as `from_hf_tensors`, and the same values bit for bit."""
    from tqdm.auto import tqdm

    parallel.check_model_fits(mesh, cfg)
    qspec = QuantSpec(quant, double_quant, block_size, quantize_experts)
    cdtype = compute_dtype(dtype)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, lora, qspec, cdtype, rngs=nnx.Rngs(seed),
                                                    lora_dtype=lora_dtype, remat=remat, scan_layers=scan_layers))
    state = nnx.state(model)
    specs, notes = parallel.partition_specs(state, mesh)
    for note in notes:
        log.info("sharding: %s", note)
    placer = _Placer(mesh, {tuple(path): (var, spec) for (path, var), spec in zip(nnx.to_flat_state(state), specs)})
    del state
    quant_dtypes: dict[tuple[str, ...], tuple[str, str]] = {}  # module path -> (dtype name, first key)

    pieces = checkpoint_pieces(cfg, get, qspec, cdtype, quant_dtypes,
                               quantize=lambda entry, arr: placer.quantize(entry, arr, qspec))
    bar = tqdm(total=len(hf_key_table(cfg)), desc=desc, unit="tensor", disable=None, dynamic_ncols=True)
    last = None
    for entry, name, value in pieces:
        placer.put(entry, name, value)
        del value  # (no reference outlives its placement)
        if entry is not last:
            bar.update()
            last = entry
    bar.close()

    for path, value in placer.arrays.items():
        _variable_at(model, path).set_value(value)
    for path, (dtype_name, _) in quant_dtypes.items():
        _variable_at(model, path).quant_dtype = dtype_name
    _init_lora_sharded(model, seed, placer)
    check_filled(model)
    return model


class _Placer:
    """Puts one checkpoint tensor at a time onto the shards its variable is planned to have."""

    def __init__(self, mesh: Mesh, plan: dict[tuple, tuple[Any, P]]):
        self.mesh = mesh
        self.plan = plan  # variable path -> (abstract Variable, PartitionSpec)
        self.arrays: dict[tuple, jax.Array] = {}  # variable path -> its (stacked) array on the mesh

    def put(self, entry: HFKey, name: str, value: Any) -> None:
        """``value`` (host or device array) becomes ``entry``'s slice of variable ``name`` on its shards."""
        path = entry.path + (name,)
        if path not in self.plan:
            raise ValueError(f"{entry.key}: the model has no variable {'.'.join(path)}")
        var, spec = self.plan[path]
        index = getattr(entry, "index", () if entry.layer is None else (entry.layer,))  # (layer[, expert])
        n = len(index)
        shape = tuple(var.shape[n:])
        if tuple(np.shape(value)) != shape:
            raise ValueError(f"{entry.key}: {name} has shape {tuple(np.shape(value))}, expected {shape}")
        full = NamedSharding(self.mesh, spec)
        if not n:
            self.arrays[path] = jax.block_until_ready(_to_devices(value, full, var.dtype))
            return
        assert all(a is None for a in tuple(spec)[:n]), (path, spec)  # layer / expert axes are never split here
        part = _to_devices(value, NamedSharding(self.mesh, P(*spec[n:])), var.dtype)
        buf = self.arrays.get(path)
        if buf is None:
            buf = _zeros(tuple(var.shape), np.dtype(var.dtype), full)()
        self.arrays[path] = jax.block_until_ready(_layer_setter(full)(buf, part, *map(np.int32, index)))

    def quantize(self, entry: HFKey, arr: np.ndarray, qspec: QuantSpec) -> q.QuantizedTensor:
        """``arr`` quantized; each device quantizes its own blocks where the plan splits the kernel at whole blocks."""
        _, spec = self.plan[entry.path + ("codes",)]
        axes = spec[-1] if len(spec) > 1 else None  # (the flat block axis, last)
        shards = _n_shards(self.mesh, axes)
        if axes is None or arr.size % (shards * qspec.block_size):
            try:  # kept whole (or blocks not evenly split): quantized on one device, as without a mesh
                return q.quantize(arr, qspec.quant, block_size=qspec.block_size, double_quant=qspec.double_quant)
            except ValueError as e:
                raise ValueError(f"{entry.key}: {e}") from None
        flat = arr.reshape(-1)
        x = jax.make_array_from_callback(flat.shape, NamedSharding(self.mesh, P(axes)), lambda index: flat[index])
        codes, absmax, bad = _block_quantizer(self.mesh, axes, qspec.quant, qspec.block_size)(x)
        del x
        if int(jnp.sum(bad)):
            try:  # raises with the count and the first bad index
                q.quantize(arr, qspec.quant, block_size=qspec.block_size, double_quant=False)
            except ValueError as e:
                raise ValueError(f"{entry.key}: {e}") from None
            raise AssertionError(f"{entry.key}: non-finite values found per shard but not in the whole tensor")
        nested = offset = None
        if qspec.double_quant:  # needs the mean of every absmax: computed on every device from all of them
            absmax, nested, offset = _double_quantizer()(jax.device_put(absmax, NamedSharding(self.mesh, P())))
        return q.QuantizedTensor(codes, absmax, nested, offset, tuple(arr.shape), arr.dtype.name, qspec.block_size,
                                 qspec.quant)


def _to_devices(value: Any, target: NamedSharding, dtype: Any) -> jax.Array:
    """``value`` (a host array, or a JAX array on this mesh or on one device) as ``dtype`` on ``target``'s shards;
    from the host each device receives only its own slice."""
    if isinstance(value, jax.Array):
        if value.dtype != dtype:
            value = value.astype(dtype)
        on_mesh = isinstance(value.sharding, NamedSharding) and value.sharding.mesh == target.mesh
        if on_mesh or (jax.process_count() == 1 and value.is_fully_addressable):
            return jax.device_put(value, target)
        value = np.asarray(value)  # a process-local array in a multi-process run: through the host
    host = np.asarray(value)
    dtype = np.dtype(dtype)
    return jax.make_array_from_callback(host.shape, target, lambda index: np.asarray(host[index], dtype=dtype))


def _n_shards(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


@functools.cache
def _block_quantizer(mesh: Mesh, axes: Any, quant_type: str, block_size: int):
    """flat W split over ``axes`` at whole blocks → (codes, float32 absmax) split the same way, and the number of
    non-finite values per shard; every device quantizes its own blocks (no double quantization)."""
    spec = P(axes)

    def local(x):
        t = q.quantize(x, quant_type, block_size=block_size, double_quant=False)
        bad = jnp.sum(~jnp.isfinite(x), dtype=jnp.int32).reshape(1)
        return t.codes, t.absmax, bad

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=(spec, spec, spec)))


@functools.cache
def _double_quantizer():
    # quant.quantize's own double-quantization step, jitted alone: on the same backend it gives the bits that the
    # fused single-device quantize gives (checked against it in tests/test_load_sharded.py)
    return jax.jit(q.double_quantize)


@functools.cache
def _zeros(shape: tuple[int, ...], dtype: np.dtype, sharding: NamedSharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.cache
def _layer_setter(sharding: NamedSharding):
    """(stacked buffer, one layer's value, layer index) → the buffer with that layer set, in place (donated)."""
    def update(buf, value, *index):  # (layer[, expert]): the leading axes of buf
        starts = (*index, *(0,) * value.ndim)
        return jax.lax.dynamic_update_slice(buf, value.reshape((1,) * len(index) + value.shape), starts)

    return jax.jit(update, out_shardings=sharding, donate_argnums=0)


def _variable_at(model: nnx.Module, path: tuple) -> Any:
    """The Variable (or, for a module path, the module) at an nnx path."""
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _init_lora_sharded(model: LlamaForCausalLM, seed: int, placer: _Placer) -> None:
    """The adapters initialized exactly as `from_hf_tensors` does (zeros, then ``model.init_lora(key(seed))``, on
    the default device), then moved onto their planned shardings. They are made whole on one device first (a few GB
    for a 70B model at r=16): compiling the random-number generation for every sharding costs seconds per load."""
    modules = [m for _, m in nnx.iter_modules(model) if isinstance(m, LoraLinear) and m.lora_a is not None]
    if not modules:
        return
    for module in modules:
        module.lora_a.set_value(jnp.zeros(module.lora_a.shape, module.lora_a.dtype))
        module.lora_b.set_value(jnp.zeros(module.lora_b.shape, module.lora_b.dtype))
    set_layer_values(model.model.layers)  # per-layer ranks / alphas: masks and scalings, replicated
    for module in modules:
        for var in (module.lora_scale, module.lora_mask):
            if var is not None:
                var.set_value(jax.device_put(var[...], NamedSharding(placer.mesh, P())))
    model.init_lora(jax.random.key(seed))
    place_lora(model, placer.mesh)


def place_lora(model: LlamaForCausalLM, mesh: Mesh) -> LlamaForCausalLM:
    """Every adapter of ``model`` moved onto its planned sharding (after `jqlora.adapters.load_adapter` filled them)."""

    lora_state = nnx.state(model, nnx.LoRAParam)
    specs, _ = parallel.partition_specs(lora_state, mesh)
    for (path, var), spec in zip(nnx.to_flat_state(lora_state), specs):
        value = var.get_value()
        _variable_at(model, tuple(path)).set_value(_to_devices(value, NamedSharding(mesh, spec), value.dtype))
    return model
