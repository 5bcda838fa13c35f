"""Hugging Face checkpoint tensors -> model variables: the key table's entry type, the checked stream of checkpoint
pieces both loaders use, and `from_hf_tensors`.

`hf_key_table(cfg)` is the one table per family (the family module's `key_table`) from Hugging Face keys to
variables; it drives loading, the converter's checks, merged export and peft names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora import quant as q
from jqlora.lora import LoraConfig, LoraLinear, QuantSpec, compute_dtype, set_layer_values
from jqlora.models.config import ModelConfig, family


@dataclasses.dataclass(frozen=True)
class HFKey:
    """Where one Hugging Face tensor lives in the model (`CausalLM`).

    ``path`` is the module path (``("model", "layers", "self_attn", "q_proj")``) and ``name`` the variable on it
    (``weight`` / ``bias``); ``layer`` indexes the stacked axis (None outside the layers), ``expert`` the expert
    axis after it (MoE experts, see moe.py; None elsewhere). ``kind`` is ``linear``
    (a kernel that may be quantized), ``bias``, ``embedding``, ``norm`` or ``lm_head``. ``shape`` is the Hugging
    Face shape; ``transpose`` is always False: kernels keep the Hugging Face ``[out, in]`` layout.
    """

    key: str
    path: tuple[str, ...]
    name: str
    layer: int | None
    shape: tuple[int, ...]
    kind: str
    transpose: bool = False
    expert: int | None = None

    @property
    def index(self) -> tuple[int, ...]:
        """Where this tensor sits in its stacked variable: (layer, expert) as far as they are set."""
        return tuple(i for i in (self.layer, self.expert) if i is not None)


def hf_key_table(cfg: ModelConfig) -> list[HFKey]:
    """Every tensor a Hugging Face checkpoint of ``cfg`` must provide, in checkpoint order (the family's table)."""
    return family(cfg.model_type).key_table(cfg)


def layer_table(cfg: ModelConfig, per_layer: list[tuple[str, tuple[int, ...], str]],
                lm_head: bool | None = None) -> list[HFKey]:
    """The table of a decoder with ``per_layer`` (suffix, shape, kind) entries under ``model.layers.{i}``, the
    embedding first, then the layers, the final norm and (untied) the LM head."""
    D, V = cfg.hidden_size, cfg.vocab_size
    table = [HFKey("model.embed_tokens.weight", ("model", "embed_tokens"), "weight", None, (V, D), "embedding")]
    for i in range(cfg.num_hidden_layers):
        for suffix, shape, kind in per_layer:
            module, name = suffix.rsplit(".", 1)
            table.append(HFKey(f"model.layers.{i}.{suffix}", ("model", "layers", *module.split(".")), name, i,
                               shape, kind))
    table.append(HFKey("model.norm.weight", ("model", "norm"), "weight", None, (D,), "norm"))
    if not cfg.tie_word_embeddings if lm_head is None else lm_head:
        table.append(HFKey("lm_head.weight", ("lm_head",), "weight", None, (V, D), "lm_head"))
    return table


TensorGetter = Callable[[str], "np.ndarray | q.QuantizedTensor"]


def _module_at(model: nnx.Module, path: tuple[str, ...]) -> Any:
    m = model
    for part in path:
        m = getattr(m, part)
    return m


def _host_array(value: Any, key: str) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        return q.to_numpy(value, key)
    try:
        return np.asarray(value)
    except Exception as e:  # noqa: BLE001 - say which key held what
        raise ValueError(f"{key}: cannot read a {type(value).__name__} as an array ({e})") from None


def checkpoint_pieces(cfg: ModelConfig, get: TensorGetter, qspec: QuantSpec, cdtype: Any,
                      quant_dtypes: dict[tuple[str, ...], tuple[str, str]],
                      quantize: Callable[[HFKey, np.ndarray], q.QuantizedTensor] | None = None):
    """Every variable slice a checkpoint provides, checked, as ``(entry, variable name, value)``: a quantized kernel
    as its codes / absmax (/ nested_absmax / offset), anything else as a host array in ``cdtype``. ``get(key)`` is
    called once per key in `hf_key_table` order, and each tensor is dropped before the next is read. A missing key,
    a wrong shape, a quantization other than ``qspec`` or kernels of one module quantized from different dtypes raise
    ValueError naming the key; ``quant_dtypes`` (module path -> (dtype, first key)) is filled for the caller.
    ``quantize(entry, host array)`` quantizes a kernel (default: `quant.quantize` on the default device)."""
    if quantize is None:
        def quantize(entry, arr):
            return q.quantize(arr, qspec.quant, block_size=qspec.block_size, double_quant=qspec.double_quant)

    for entry in hf_key_table(cfg):
        try:
            value = get(entry.key)
        except KeyError:
            value = None
        if value is None:
            raise ValueError(f"missing tensor {entry.key!r} in the checkpoint")
        arr = qt = None
        if isinstance(value, q.QuantizedTensor):
            if entry.kind != "linear":
                raise ValueError(f"{entry.key}: a quantized tensor where a plain {entry.kind} weight is expected")
            if value.shape != entry.shape or value.batch_shape:
                raise ValueError(f"{entry.key}: shape {value.batch_shape + value.shape}, expected {entry.shape}")
            qt = value
        else:
            arr = _host_array(value, entry.key)
            if tuple(arr.shape) != entry.shape:
                raise ValueError(f"{entry.key}: shape {tuple(arr.shape)}, expected {entry.shape}")
            if arr.dtype.name not in q.DTYPES:
                arr = arr.astype(np.float32)
            if entry.kind == "linear" and qspec.quantizes(entry.expert):
                qt = quantize(entry, arr)
        if entry.kind == "linear" and qspec.quantizes(entry.expert):
            got = (qt.quant_type, qt.block_size, qt.double_quant)
            want = (qspec.quant, qspec.block_size, qspec.double_quant)
            if got != want:
                raise ValueError(
                    f"{entry.key}: checkpoint is quantized as (quant, block_size, double_quant)={got}, but {want} "
                    "was requested; load with matching quantization settings"
                )
            seen = quant_dtypes.setdefault(entry.path, (qt.dtype, entry.key))
            if seen[0] != qt.dtype:
                raise ValueError(f"{entry.key}: quantized from {qt.dtype}, but {seen[1]} from {seen[0]}")
            yield entry, "codes", qt.codes
            yield entry, "absmax", qt.absmax
            if qt.double_quant:
                yield entry, "nested_absmax", qt.nested_absmax
                yield entry, "offset", qt.offset
        else:
            if qt is not None:  # a bnb-quantized kernel loaded unquantized
                arr = np.asarray(q.dequantize(qt, cdtype))
            yield entry, entry.name, arr.astype(cdtype, copy=False)  # (no copy of a tensor already in cdtype)
        del value, arr, qt  # the host copy goes before the next tensor is read


def from_hf_tensors(
    cfg: ModelConfig,
    get: TensorGetter,
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
    quantize_experts: bool = True,
    memory: str = "default",
) -> Any:
    """Build the model from Hugging Face tensors fetched one key at a time by ``get(key)``.

    ``get`` returns an array (numpy / JAX / torch) or, for a linear kernel of a bitsandbytes checkpoint, a
    ``quant.QuantizedTensor`` that is used as is (never requantized). Other kernels are quantized from the
    checkpoint's own dtype. Every shape is checked against ``cfg``; a missing key or wrong shape raises ValueError
    naming the key. The model is built abstractly (`nnx.eval_shape`), so no full-size random weights are made;
    each stacked variable is filled into one host buffer, then moved to the device once. Adapters are initialized
    from ``seed`` as peft does. ``quantize_experts`` False keeps MoE experts in the compute dtype (`QuantSpec`).
    ``memory`` is train.memory: with ``min`` the embedding and lm_head tables are quantized as they stream in,
    from the compute-dtype values the default mode holds (`layers.QuantHead`).
    """
    qspec = QuantSpec(quant, double_quant, block_size, quantize_experts)
    cdtype = compute_dtype(dtype)
    from jqlora.models.decoder import CausalLM

    model = nnx.eval_shape(lambda: CausalLM(cfg, lora, qspec, cdtype, rngs=nnx.Rngs(seed),
                                            lora_dtype=lora_dtype, remat=remat, scan_layers=scan_layers,
                                            memory=memory))
    head_quant = model.head_quant
    buffers: dict[tuple[tuple[str, ...], str], np.ndarray] = {}
    quant_dtypes: dict[tuple[str, ...], tuple[str, str]] = {}  # module path -> (dtype name, first key)

    def buffer(path: tuple[str, ...], name: str) -> np.ndarray:
        if (path, name) not in buffers:
            var = getattr(_module_at(model, path), name)
            buffers[(path, name)] = np.zeros(var.shape, var.dtype)
        return buffers[(path, name)]

    def put(entry: HFKey, name: str, value: np.ndarray) -> None:
        buf = buffer(entry.path, name)
        index = entry.index
        if buf[index].shape != value.shape:
            raise ValueError(f"{entry.key}: {name} has shape {value.shape}, expected {buf[index].shape}")
        buf[index] = value

    for entry, name, value in checkpoint_pieces(cfg, get, qspec, cdtype, quant_dtypes):
        module = _module_at(model, entry.path)
        if entry.kind in ("embedding", "lm_head") and getattr(module, "codes", None) is not None:
            # (quantized from the compute-dtype table, the values the default mode would use)
            t = q.quantize(np.asarray(value), head_quant.quant, block_size=head_quant.block_size,
                           double_quant=head_quant.double_quant)
            for part in ("codes", "absmax", "nested_absmax", "offset"):
                if getattr(t, part) is not None:
                    put(entry, part, np.asarray(getattr(t, part)))
            module.quant_dtype = t.dtype
            continue
        put(entry, name, np.asarray(value))

    for (path, name), buf in buffers.items():
        getattr(_module_at(model, path), name).set_value(jnp.asarray(buf))
    for path, (dtype_name, _) in quant_dtypes.items():
        _module_at(model, path).quant_dtype = dtype_name
    # Adapters (the only variables not from the checkpoint)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LoraLinear) and module.lora_a is not None:
            module.lora_a.set_value(jnp.zeros(module.lora_a.shape, module.lora_a.dtype))
            module.lora_b.set_value(jnp.zeros(module.lora_b.shape, module.lora_b.dtype))
    set_layer_values(model.model.layers)  # per-layer ranks / alphas: masks and scalings (built abstractly above)
    model.set_layer_indices()  # (train.memory=min)
    model.init_lora(jax.random.key(seed))
    check_filled(model)
    return model


def check_filled(model: nnx.Module) -> None:
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if isinstance(var.get_value(), jax.ShapeDtypeStruct):
            raise AssertionError(f"variable {'.'.join(map(str, path))} was not loaded")
