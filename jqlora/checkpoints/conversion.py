"""Writing jqlora's quantized parameters (and bitsandbytes-4bit checkpoints) from Hugging Face checkpoints; reading
them back (`load_jqlora`). The overview and formats are in `jqlora.convert`'s docstring; the CLI is there too."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jqlora import quant
from jqlora.checkpoints.errors import ConvertError
from jqlora.checkpoints.io import ShardWriter, atomic_directory, copy_side_files
from jqlora.checkpoints.reader import Checkpoint, check_checkpoint, natural_key, read_config


FORMAT_VERSION = 1
JQLORA_META = "jqlora.json"
SOURCE_KEY = "jqlora_source"  # config.json of a `--format bnb` conversion: the checkpoint it was made from

def _quantized_arrays(key: str, q: quant.QuantizedTensor) -> dict[str, np.ndarray]:
    out = {f"{key}.codes": np.asarray(q.codes), f"{key}.absmax": np.asarray(q.absmax)}
    if q.double_quant:
        out[f"{key}.nested_absmax"] = np.asarray(q.nested_absmax)
        out[f"{key}.offset"] = np.asarray(q.offset).reshape(1)
    return out


def _quantized_meta(q: quant.QuantizedTensor) -> dict[str, Any]:
    return {"shape": list(q.shape), "dtype": q.dtype, "block_size": q.block_size, "quant_type": q.quant_type,
            "double_quant": q.double_quant}


def _progress(items: list[str], desc: str) -> Iterator[str]:
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, unit="tensor", disable=None, dynamic_ncols=True))


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    block_size: int = 64,
    dtype: str = "bfloat16",
    fmt: str = "jqlora",
    max_shard_bytes: int = 2 * 10**9,
) -> Path:
    """Convert the HF checkpoint at ``src`` into ``dst`` (see the module docstring); returns ``dst``.

    ``quant_type`` "none" keeps linear weights unquantized (cast to ``dtype``); ``dtype`` is the dtype of every
    unquantized tensor written. Keys and shapes are checked against the model family's table (from `config.json`)
    before anything is written; only the tensors the model uses are written (linear kernels quantized).
    """
    if fmt not in ("jqlora", "bnb"):
        raise ConvertError(f"--format {fmt!r}: expected jqlora or bnb")
    if quant_type not in (*quant.QUANT_TYPES, "none"):
        raise ConvertError(f"--quant {quant_type!r}: expected nf4, fp4 or none")
    if fmt == "bnb" and quant_type == "none":
        raise ConvertError("--format bnb needs --quant nf4 or fp4")
    if dtype not in quant.DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: expected one of {', '.join(quant.DTYPES)}")
    if block_size not in quant.BLOCK_SIZES:
        raise ConvertError(f"--block-size {block_size}: expected one of {quant.BLOCK_SIZES}")
    src, dst = Path(src), Path(dst)
    ckpt = Checkpoint(src)
    table = check_checkpoint(ckpt)
    out_dtype = jnp.dtype(dtype)
    metas: dict[str, dict[str, Any]] = {}
    need = sum(_output_bytes(entry, ckpt, quant_type, block_size, double_quant, out_dtype.itemsize) for entry in table)
    with ckpt, atomic_directory(dst, error=ConvertError, need=need) as tmp:
        out = ShardWriter(tmp, max_shard_bytes, {"format": "pt" if fmt == "bnb" else "jqlora"})
        for entry in _progress(table, f"converting {src.name}"):
            key = entry.key
            value = ckpt.get(key)
            if isinstance(value, quant.QuantizedTensor):  # already 4-bit (bitsandbytes checkpoint): as stored
                q = value
            elif entry.kind == "linear" and quant_type != "none" and not (fmt == "bnb" and entry.expert is not None):
                try:
                    q = quant.quantize(value, quant_type, block_size=block_size, double_quant=double_quant)
                except ValueError as e:
                    raise ConvertError(f"{ckpt.file_of(key)}: {key}: {e}") from None
            else:
                if not jnp.issubdtype(value.dtype, jnp.floating):
                    raise ConvertError(f"{ckpt.file_of(key)}: {key}: unexpected dtype {value.dtype}")
                out.add({key: np.asarray(value.astype(out_dtype))})
                continue
            if fmt == "bnb":
                out.add(quant.to_bnb(q, key))
            else:
                out.add(_quantized_arrays(key, q))
                metas[key] = _quantized_meta(q)
            del value
        out.finish()
        config = dict(ckpt.config)
        if fmt == "bnb":
            config["quantization_config"] = _bnb_quantization_config(quant_type, double_quant, dtype, ckpt, metas)
            config["torch_dtype"] = dtype
            config[SOURCE_KEY] = hf_source(src)  # (the original, for an adapter trained on dst; transformers keeps it)
        else:
            meta = {
                "format": "jqlora",
                "version": FORMAT_VERSION,
                "source": hf_source(src),  # the original checkpoint (what an adapter trained on dst needs)
                "quant": quant_type if not ckpt.bnb else ckpt.bnb.get("bnb_4bit_quant_type", "nf4"),
                "double_quant": double_quant,
                "block_size": block_size,
                "dtype": dtype,
                "quantized": metas,
            }
            (tmp / JQLORA_META).write_text(json.dumps(meta, indent=1))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_side_files(src, tmp)
    return dst


def _output_bytes(entry, ckpt: Checkpoint, quant_type: str, block_size: int, double_quant: bool,
                  itemsize: int) -> int:
    """About how many bytes ``entry`` takes in the converted output."""
    n = int(np.prod(entry.shape))
    if ckpt.is_quantized(entry.key) or (entry.kind == "linear" and quant_type != "none"):
        blocks = -(-n // block_size)
        return (n + 1) // 2 + (blocks if double_quant else 4 * blocks) + 4 * (-(-blocks // 256))
    return n * itemsize


def _bnb_quantization_config(quant_type, double_quant, dtype, ckpt: Checkpoint, metas) -> dict[str, Any]:
    if ckpt.bnb:  # re-saving a bitsandbytes checkpoint keeps its settings
        return dict(ckpt.bnb)
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def load_jqlora(path: str | os.PathLike, *, host: bool = False
                ) -> tuple[dict[str, Any], dict[str, Any], Callable[[str], Any], list[str]]:
    """Open a jqlora-format directory: (HF config, jqlora meta, get(key) → array | QuantizedTensor, keys).

    ``host=True``: `get` returns numpy arrays (and QuantizedTensors of numpy arrays) read into host memory, not
    JAX arrays on the default device."""
    path = Path(path)
    config = read_config(path)
    meta_file = path / JQLORA_META
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{meta_file}: missing or unreadable ({e})") from None
    if meta.get("format") != "jqlora" or meta.get("version") != FORMAT_VERSION:
        raise ConvertError(f"{meta_file}: not a jqlora v{FORMAT_VERSION} checkpoint")
    ckpt = Checkpoint(path)
    quantized = meta["quantized"]
    stored = ckpt.keys()
    plain = [k for k in stored if not any(k.startswith(q + ".") for q in quantized)]
    read = ckpt.get_host if host else ckpt.get

    def get(key: str):
        if key in quantized:
            m = quantized[key]
            arrays = {s: read(f"{key}.{s}") for s in ("codes", "absmax")}
            if m["double_quant"]:
                arrays["nested_absmax"] = read(f"{key}.nested_absmax")
                arrays["offset"] = read(f"{key}.offset").reshape(())
            return quant.QuantizedTensor(
                arrays["codes"], arrays["absmax"], arrays.get("nested_absmax"), arrays.get("offset"),
                tuple(m["shape"]), m["dtype"], m["block_size"], m["quant_type"],
            )
        return read(key)

    return config, meta, get, sorted([*plain, *quantized], key=natural_key)


def is_jqlora_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / JQLORA_META).is_file()


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_CACHE = re.compile(r"models--([^/]+?)--(.+)")


def hf_source(path: str | os.PathLike) -> str:
    """Where the original Hugging Face checkpoint behind ``path`` lives, for an adapter's base_model_name_or_path:
    for a jqlora- or bnb-converted directory, the source its conversion recorded; else the hub id (from a hub cache
    path ``.../models--org--name/snapshots/...`` or the config's ``_name_or_path``); else the absolute path."""
    p = Path(path)
    for meta, key in ((JQLORA_META, "source"), ("config.json", SOURCE_KEY)):  # jqlora / bnb conversions record it
        try:
            source = json.loads((p / meta).read_text()).get(key) if (p / meta).is_file() else None
        except (OSError, ValueError, AttributeError):
            source = None
        if isinstance(source, str) and source:
            return source
    resolved = p.resolve()
    for part in reversed(resolved.parts):
        m = _HUB_CACHE.fullmatch(part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    try:
        name = json.loads((p / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):
        name = None
    if isinstance(name, str) and _HUB_ID.fullmatch(name) and not os.path.exists(name):
        return name
    return str(resolved)
