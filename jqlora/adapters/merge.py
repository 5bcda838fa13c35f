"""Merging adapters into full Hugging Face checkpoints (`python -m jqlora.export --merge`; its docstring says what a
merge computes), and where an adapter's base is."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jqlora import quant
from jqlora.adapters.errors import ExportError
from jqlora.adapters.tokenizer_files import make_portable
from jqlora.checkpoints import ShardWriter, atomic_directory, copy_side_files, read_config
from jqlora.lora import LoraLinear, dora
from jqlora.models import hf_key_table


def _module_at(model: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        model = getattr(model, part)
    return model


def _layer_slice(tree: Any, layer: int | tuple[int, ...] | None) -> Any:
    """``tree`` at stacked index ``layer`` (a layer, or (layer, expert) for MoE experts; None: as it is)."""
    if layer is None or layer == ():
        return tree
    return jax.tree_util.tree_map(lambda a: a[layer], tree)


def _expert_delta(experts: Any, name: str, index: tuple[int, ...]) -> jax.Array | float:
    """The expert adapter's s · (A B)ᵀ for expert kernel ``name`` (gate_proj / up_proj: its half of the fused
    gate_up_proj's [2F, D]) at (layer, expert) ``index``; 0 without expert adapters (`jqlora.models.moe`)."""
    m = getattr(experts, "down_lora" if name == "down_proj" else "gate_up_lora", None)
    if m is None:
        return 0.0
    a = _layer_slice(m.lora_a[...], index).astype(jnp.float32)
    b = _layer_slice(m.lora_b[...], index).astype(jnp.float32)
    d = m.scaling * (a @ b).T
    if name == "down_proj":
        return d
    F = d.shape[0] // 2
    return d[:F] if name == "gate_proj" else d[F:]


def merged_tensor(model: Any, entry: Any) -> np.ndarray:
    """float32 Hugging Face tensor for one key-table ``entry``: linear kernels merged with their adapter."""
    module = _module_at(model, entry.path)
    i = getattr(entry, "index", entry.layer)
    if entry.kind == "linear":
        assert isinstance(module, LoraLinear)
        if module.quant.enabled:
            w = quant.dequantize(_layer_slice(module.quantized(), i), jnp.float32)
        else:
            w = _layer_slice(module.weight[...], i).astype(jnp.float32)
        if module.lora_a is not None:
            a = _layer_slice(module.lora_a[...], i).astype(jnp.float32)
            b = _layer_slice(module.lora_b[...], i).astype(jnp.float32)
            s = module.scaling
            if module.spec.per_layer:  # this layer's rank and scaling (not adapted: r = 0, s = 0)
                a, b, s = (jnp.asarray(v) for v in module.layer_adapter(i if isinstance(i, int) else i[0]))
                s = float(s)
            if module.magnitude is not None:  # DoRA: (m / ‖W + s BA‖) · (W + s BA)
                w = dora.merged_kernel(_layer_slice(module.magnitude[...], i), w, a, b, s)
            else:
                w = w + s * (a @ b).T
        if getattr(entry, "expert", None) is not None:
            w = w + _expert_delta(_module_at(model, entry.path[:-1]), entry.path[-1], i)
        return np.asarray(w)
    if entry.name == "weight" and getattr(module, "spec", None) is not None:  # an adapted embedding / LM head
        if module is model.model.embed_tokens:
            if model.lm_head is None:
                raise ExportError("cannot merge an embed_tokens adapter into a model with tied embeddings (the "
                                  "merged embedding would change the output head too); export the adapter instead")
            s = module.spec.scaling
            a = module.lora_embedding_a[...].astype(jnp.float32)
            return np.asarray(module.weight[...].astype(jnp.float32) + s * (a @ module.lora_embedding_b[...]))
        a, b = module.lora_a[...].astype(jnp.float32), module.lora_b[...].astype(jnp.float32)
        return np.asarray(module.weight[...].astype(jnp.float32) + module.spec.scaling * (a @ b).T)
    value = getattr(module, entry.name)[...]
    return np.asarray(_layer_slice(value, i).astype(jnp.float32))


def merge_to_hf(
    model: Any,
    base_path: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
    chat_template: str | None = None,
    checksums: bool = False,
) -> Path:
    """Write ``model`` (base + adapters) as a plain Hugging Face checkpoint; ``base_path`` supplies config/tokenizer
    (written for transformers 4.x and 5.x, with ``chat_template``, the one training used, when given).
    ``checksums``: with a CHECKSUMS file, for a checkpoint the run reads back (a LoftQ run's ``base/``)."""
    if dtype not in quant.DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(quant.DTYPES)}")
    config = dict(read_config(base_path))
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    table = hf_key_table(model.config)
    out_dtype = jnp.dtype(dtype)
    need = sum(int(np.prod(entry.shape)) for entry in table) * out_dtype.itemsize
    with atomic_directory(dst, overwrite=overwrite, error=ExportError, need=need, checksums=checksums) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, {"format": "pt"})
        for entry in tqdm(table, desc="merging", unit="tensor", disable=None, dynamic_ncols=True):
            value = merged_tensor(model, entry)
            if value.shape != tuple(entry.shape):
                raise AssertionError(f"{entry.key}: merged shape {value.shape}, expected {entry.shape}")
            writer.add({entry.key: np.asarray(jnp.asarray(value).astype(out_dtype))})
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_side_files(base_path, tmp)
        make_portable(tmp, chat_template)
    return Path(dst)


# ----------------------------------------------------------------------------------------------------------------
# Sources: a run directory or an adapter


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def base_of_adapter(adapter: Path, base: str | None) -> Path:
    if base:
        return Path(base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    name = cfg.get("base_model_name_or_path") or ""
    if not name or not Path(name).is_dir():
        raise ExportError(
            f"{adapter / 'adapter_config.json'}: base_model_name_or_path {name!r} is not a local directory; "
            "pass --base MODEL_DIR"
        )
    return Path(name)
