"""A checkpoint directory to a model: a Hugging Face checkpoint (safetensors or .bin, sharded or not, or
bitsandbytes 4-bit) quantized while it streams in, or a `python -m jqlora.convert` output as stored; on a mesh of
several devices each tensor goes straight to its shards (`jqlora.checkpoints.sharded`)."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from jax.sharding import Mesh

from jqlora.checkpoints.conversion import is_jqlora_dir, load_jqlora
from jqlora.checkpoints.errors import ConvertError
from jqlora.checkpoints.reader import Checkpoint, check_checkpoint
from jqlora.checkpoints.sharded import from_hf_tensors_sharded
from jqlora.lora import LoraConfig
from jqlora.models import LlamaForCausalLM, ModelConfig, TensorGetter, from_hf_tensors, hf_key_table


def load_checkpoint(
    path: str | os.PathLike,
    *,
    quant: str = "nf4",
    double_quant: bool = True,
    block_size: int = 64,
    dtype: Any = "bfloat16",
    lora: LoraConfig | None = None,
    seed: int = 0,
    remat: str = "full",
    mesh: Mesh | None = None,
    quantize_experts: bool = True,
    memory: str = "default",
) -> LlamaForCausalLM:
    """Load a model from a Hugging Face directory (converted on the fly) or a `python -m jqlora.convert` output.

    A Hugging Face directory may hold safetensors (single or sharded), PyTorch .bin, or a bitsandbytes 4-bit
    checkpoint (whose 4-bit weights are used as stored). A jqlora directory is loaded with the quantization it was
    converted with (``quant``/``double_quant``/``block_size`` are then taken from it). ``lora`` adds fresh adapters
    (peft initialization); `jqlora.load_model` also loads a peft adapter onto it. ``quantize_experts`` False keeps
    the fused MoE experts in ``dtype`` (as transformers + bitsandbytes does; 4-bit stored experts are dequantized).
    The model maps int32 ``input_ids[B, S]`` (optionally ``segment_ids``, ``positions``) to
    float32 logits ``[B, S, V]``.

    ``mesh`` (a ("data", "fsdp", "tensor") mesh, `jqlora.parallel.make_mesh`): every variable is placed on the mesh
    by `jqlora.parallel`'s partition rules while loading, one tensor at a time, so no device and no host ever holds
    the whole model unquantized (see the module docstring); the values equal the unsharded load's bit for bit.

    ``memory`` is train.memory (``min``: the embedding and lm_head stored 4-bit too, `models.decoder.CausalLM`).
    """
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (jqlora.parallel.make_mesh), got {type(mesh).__name__}")
    if memory != "default":
        if mesh is not None:
            raise ConvertError("train.memory=min: a quantized embedding / lm_head is loaded on one device only (not "
                               "streamed into a mesh's shards); use train.memory=default on a mesh")
        build = functools.partial(from_hf_tensors, memory=memory)
    else:
        build = from_hf_tensors if mesh is None else functools.partial(from_hf_tensors_sharded, mesh=mesh,
                                                                       desc=f"loading {_name(path)}")
    if is_jqlora_dir(path):
        config, meta, get, _ = load_jqlora(path, host=mesh is not None)
        quant, double_quant, block_size = meta["quant"], meta["double_quant"], meta["block_size"]
        stored = {m["quant_type"] for m in meta["quantized"].values()}
        if stored:
            quant = stored.pop()
            double_quant = all(m["double_quant"] for m in meta["quantized"].values())
            block_size = next(iter(meta["quantized"].values()))["block_size"]
        else:
            quant = "none"
        cfg = ModelConfig.from_hf(config)
        where = os.path.join(os.fspath(path), "model.safetensors")
        return _naming_the_tensor(build, cfg, get, lambda key: where, lora=lora, quant=quant,
                                  double_quant=double_quant, block_size=block_size, dtype=dtype, seed=seed,
                                  remat=remat, quantize_experts=quantize_experts)
    with Checkpoint(path) as ckpt:
        try:
            cfg = ModelConfig.from_hf(ckpt.config)
        except ValueError as e:
            raise ConvertError(f"{ckpt.path / 'config.json'}: {e}") from None
        check_checkpoint(ckpt)
        if ckpt.bnb and quant != "none":  # a 4-bit checkpoint keeps its own quantization
            sample = ckpt.get(next(e.key for e in hf_key_table(cfg) if e.kind == "linear"))
            quant, double_quant, block_size = sample.quant_type, sample.double_quant, sample.block_size
        return _naming_the_tensor(build, cfg, ckpt.get if mesh is None else ckpt.get_host, ckpt.file_of, lora=lora,
                                  quant=quant, double_quant=double_quant, block_size=block_size, dtype=dtype,
                                  seed=seed, remat=remat, quantize_experts=quantize_experts)


def _naming_the_tensor(build, cfg: ModelConfig, get: TensorGetter, file_of, **kwargs):
    """``build(cfg, get, **kwargs)``, where a ValueError about a tensor's values (NaN/Inf weights, ...) becomes a
    `ConvertError` naming the checkpoint file and the key of the tensor it came from."""
    last: list[str | None] = [None]
    quantized = set() if kwargs.get("quant", "none") == "none" else {
        e.key for e in hf_key_table(cfg)
        if e.kind == "linear" and (e.expert is None or kwargs.get("quantize_experts", True))}  # (quantize checks these itself, on the way)

    def tracked(key: str):
        last[0] = key
        value = get(key)
        if key not in quantized:
            check_finite(value)
        return value

    try:
        return build(cfg, tracked, **kwargs)
    except ConvertError:
        raise
    except ValueError as e:
        key = last[0]
        if key is None:
            raise
        text = str(e).splitlines()[0]
        if text.startswith(f"{key}:"):
            text = text[len(key) + 1:].lstrip()
        try:
            where = file_of(key)
        except (KeyError, ValueError):  # (a key the checkpoint does not hold)
            raise e from None
        raise ConvertError(f"{where}: {key}: {text}") from None


def check_finite(value) -> None:
    """Raise ValueError when a float tensor (the embedding, a norm, lm_head, an unquantized kernel) holds NaN/Inf:
    a weight read as it is, so that nothing downstream (quantization's own check) would name it."""
    import jax
    import jax.numpy as jnp

    dtype = getattr(value, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or getattr(value, "size", 0) == 0:
        return
    if isinstance(value, jax.Array):
        bad = int(jnp.sum(~jnp.isfinite(value), dtype=jnp.int32))
    elif isinstance(value, np.ndarray):
        bad = int(np.count_nonzero(~np.isfinite(value)))
    else:
        return
    if bad:
        raise ValueError(f"{bad} NaN/Inf of {value.size} values (the checkpoint is damaged: this weight is not "
                         "finite)")


def _name(path: str | os.PathLike) -> str:
    return os.path.basename(os.path.normpath(os.fspath(path)))


