"""Hugging Face checkpoints ⇄ jqlora's quantized parameters, streamed one tensor at a time.

Reading (`Checkpoint`): a local model directory with `config.json` and single or sharded safetensors (with
`model.safetensors.index.json`), or PyTorch `pytorch_model*.bin` (torch is imported only then), in bf16/fp16/fp32;
or a bitsandbytes 4-bit checkpoint (`quantization_config.load_in_4bit`), whose NF4/FP4 weights are returned as
`quant.QuantizedTensor` exactly as stored (no dequantize / requantize). `get` returns JAX arrays on the default
device; `get_host` returns numpy arrays read into host memory without a memory map, for the sharded loader
(`jqlora.load_model(..., mesh=)`), which places each tensor's shards on their devices itself.

Writing (`convert`): each tensor is read, quantized if it is a linear weight, and kept only in its quantized form,
so peak host memory stays near the largest single tensor plus the quantized output. Two output formats:
- ``jqlora``: `jqlora.json` (format version, quantization settings, the static fields of every quantized tensor)
  + `model.safetensors` holding `<hf key>.codes|absmax|nested_absmax|offset` for quantized weights and `<hf key>`
  for the rest, + the source `config.json`. Reloading reads arrays, nothing is requantized.
- ``bnb``: a Hugging Face bitsandbytes-4bit checkpoint (config with `quantization_config`, the six tensors per
  linear layer) that `transformers.AutoModelForCausalLM.from_pretrained` loads with bitsandbytes. MoE experts
  (Mixtral, Qwen3-MoE) are written unquantized in ``dtype``, as transformers + bitsandbytes saves them (it quantizes
  only ``nn.Linear``; transformers 5 fuses the experts into 3-D parameters); loading quantizes them.
Tokenizer files and the generation config travel along. Output is written to a temporary directory beside DST and
renamed into place only when complete, so a failed conversion never leaves a DST that looks finished.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np

from jqlora import quant
from jqlora.io import ShardWriter, atomic_directory, copy_side_files

FORMAT_VERSION = 1
JQLORA_META = "jqlora.json"
_QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


class ConvertError(ValueError):
    """A problem with a checkpoint or a conversion request; the message names the file and key."""


# ----------------------------------------------------------------------------------------------------------------
# Reading


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The model's `config.json` as a dict; a clear error when missing or unreadable."""
    cfg = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise ConvertError(f"{path}: not a directory (expected a Hugging Face model directory)")
    if not cfg.is_file():
        raise ConvertError(f"{cfg}: missing (a Hugging Face model directory has a config.json)")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{cfg}: not valid JSON ({e})") from None


def _bnb_settings(config: dict[str, Any], where: Path) -> dict[str, Any] | None:
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ConvertError(f"{where}: quantization_config.quant_method {method!r} is not supported (only bitsandbytes 4-bit)")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ConvertError(f"{where}: 8-bit bitsandbytes checkpoints are not supported (only 4-bit)")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ConvertError(f"{where}: quantization_config has neither load_in_4bit nor load_in_8bit")
    return qc


class Checkpoint:
    """A Hugging Face model directory, read one tensor at a time.

    `keys()` lists logical tensors (a bitsandbytes 4-bit weight's six stored tensors are one key); `get(key)`
    returns a JAX array in the checkpoint's own dtype, or a `quant.QuantizedTensor` for a 4-bit weight.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = read_config(self.path)
        self.bnb = _bnb_settings(self.config, self.path / "config.json")
        self._files: dict[str, Path] = {}  # stored key → file
        self._handles: dict[Path, Any] = {}
        self._headers: dict[Path, dict[str, Any]] = {}  # safetensors headers, for reads without mmap
        self._torch_shards: dict[Path, dict[str, Any]] = {}
        self._index()
        stored = set(self._files)
        self._quantized = {k.rsplit(".quant_state.", 1)[0] for k in stored if ".quant_state.bitsandbytes__" in k}
        parts = {f"{k}{s}" for k in self._quantized for s in _QUANT_SUFFIXES}
        parts |= {k for k in stored if ".quant_state.bitsandbytes__" in k}
        self._keys = sorted(stored - parts, key=_natural_key)

    # -- discovery
    def _index(self) -> None:
        p = self.path
        for index_name, kind in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "bin")):
            index = p / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConvertError(f"{index}: not a valid shard index ({e!s})") from None
                for key, name in weight_map.items():
                    f = p / name
                    if not f.is_file():
                        raise ConvertError(f"{index}: shard {name!r} (holding {key!r}) is missing")
                    self._files[key] = f
                self.kind = kind
                self._check_bin_reader()
                return
        single_st = sorted(p.glob("*.safetensors"))
        if single_st:
            self.kind = "st"
            for f in single_st:
                stored = self._st_handle(f).keys()
                for key in stored:
                    self._files[key] = f
            return
        single_bin = sorted(p.glob("pytorch_model*.bin"))
        if single_bin:
            self.kind = "bin"
            self._check_bin_reader()
            for f in single_bin:
                for key in self._bin_shard(f):
                    self._files[key] = f
            return
        raise ConvertError(f"{p}: no model weights (model.safetensors, a safetensors index, or pytorch_model.bin)")

    def _check_bin_reader(self) -> None:
        if self.kind != "bin":
            return
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConvertError(
                f"{self.path}: PyTorch .bin weights need torch to read (pip install torch), or convert them to "
                "safetensors first"
            ) from None

    def _st_handle(self, f: Path):
        if f not in self._handles:
            from safetensors import SafetensorError, safe_open

            try:
                self._handles[f] = safe_open(str(f), framework="flax")
            except (SafetensorError, OSError) as e:
                raise ConvertError(f"{f}: unreadable safetensors file, truncated or corrupt ({e})") from None
        return self._handles[f]

    def _st_header(self, f: Path) -> dict[str, Any]:
        if f not in self._headers:
            self._headers[f] = _read_st_header(f)
        return self._headers[f]

    def _bin_shard(self, f: Path) -> dict[str, Any]:
        if f not in self._torch_shards:
            import torch

            try:
                self._torch_shards[f] = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
                raise ConvertError(f"{f}: unreadable PyTorch checkpoint ({type(e).__name__}: {e})") from None
        return self._torch_shards[f]

    # -- access
    def keys(self) -> list[str]:
        return list(self._keys)

    def is_quantized(self, key: str) -> bool:
        return key in self._quantized

    def file_of(self, key: str) -> Path:
        return self._files[key]

    def _raw(self, key: str):
        if key not in self._files:
            raise ConvertError(f"{self.path}: missing tensor {key!r}")
        f = self._files[key]
        if self.kind == "st":
            try:
                return self._st_handle(f).get_tensor(key)
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ConvertError(f"{f}: cannot read tensor {key!r} ({e})") from None
        shard = self._bin_shard(f)
        if key not in shard:
            raise ConvertError(f"{f}: missing tensor {key!r} (listed in the index)")
        return _torch_to_jax(shard[key], f, key)

    def get(self, key: str) -> jax.Array | quant.QuantizedTensor:
        if key in self._quantized:
            parts = {k: self._raw(k) for k in self._files if k == key or k.startswith(key + ".")}
            try:
                return quant.from_bnb({k: np.asarray(v) for k, v in parts.items()}, key, where=str(self._files[key]))
            except ValueError as e:
                raise ConvertError(str(e)) from None
        return self._raw(key)

    def get_host(self, key: str) -> np.ndarray | quant.QuantizedTensor:
        """Like `get`, but a plain tensor comes back as a numpy array in host memory (no device is touched), for
        loaders that place each tensor's shards on their devices themselves. A safetensors tensor is read with
        plain file reads, not through a memory map: a mapped file's pages stay resident (and count in the process's
        RSS) while it is open, so reading a whole checkpoint that way holds all of it."""
        if key in self._quantized:
            return self.get(key)
        if key not in self._files:
            raise ConvertError(f"{self.path}: missing tensor {key!r}")
        f = self._files[key]
        if self.kind == "st":
            return _read_st_tensor(f, self._st_header(f), key)
        shard = self._bin_shard(f)
        if key not in shard:
            raise ConvertError(f"{f}: missing tensor {key!r} (listed in the index)")
        return _torch_to_numpy(shard[key], f, key)

    def shape_of(self, key: str) -> tuple[int, ...]:
        """The logical shape of a tensor without reading its data (safetensors only; else reads it)."""
        if key in self._quantized:
            return self.get(key).shape  # the quant state is small; the packed weight is read once
        if self.kind == "st":
            return tuple(self._st_handle(self._files[key]).get_slice(key).get_shape())
        return tuple(self._raw(key).shape)

    def close(self) -> None:
        self._handles.clear()
        self._headers.clear()
        self._torch_shards.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _natural_key(key: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key))


def _torch_to_jax(t: Any, f: Path, key: str) -> jax.Array:
    import torch

    if not isinstance(t, torch.Tensor):
        raise ConvertError(f"{f}: entry {key!r} is a {type(t).__name__}, not a tensor")
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return jnp.asarray(t.view(torch.int16).numpy().view(jnp.bfloat16))
    return jnp.asarray(t.numpy())


_ST_DTYPES = {"BF16": jnp.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
              "I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
              "U64": np.uint64, "BOOL": np.bool_}


def _read_st_header(f: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then the JSON), with "__start__" added:
    the file offset where the tensor data begins."""
    try:
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if size <= 0 or size > 100 * 2**20:
                raise ValueError(f"header length {size}")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{f}: unreadable safetensors file, truncated or corrupt ({e})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{f}: unreadable safetensors file (the header is not a JSON object)")
    header["__start__"] = 8 + size
    return header


def _read_st_tensor(f: Path, header: dict[str, Any], key: str) -> np.ndarray:
    """One tensor of a safetensors file, read into a fresh numpy array (no memory map)."""
    info = header.get(key)
    if not isinstance(info, dict):
        raise ConvertError(f"{f}: missing tensor {key!r}")
    try:
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{f}: cannot read tensor {key!r} (unsupported or malformed entry {info!r}: {e})") from None
    n_bytes = end - begin
    if n_bytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
        raise ConvertError(f"{f}: cannot read tensor {key!r} ({n_bytes} bytes for shape {shape} of {info['dtype']})")
    buf = np.empty(n_bytes, np.uint8)
    with open(f, "rb") as fh:
        fh.seek(header["__start__"] + begin)
        got = fh.readinto(memoryview(buf))
    if got != n_bytes:
        raise ConvertError(f"{f}: truncated: tensor {key!r} needs {n_bytes} bytes, the file holds {got}")
    return buf.view(dtype).reshape(shape)


def _torch_to_numpy(t: Any, f: Path, key: str) -> np.ndarray:
    import torch

    if not isinstance(t, torch.Tensor):
        raise ConvertError(f"{f}: entry {key!r} is a {type(t).__name__}, not a tensor")
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()


# ----------------------------------------------------------------------------------------------------------------
# Writing


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

    return config, meta, get, sorted([*plain, *quantized], key=_natural_key)


def is_jqlora_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / JQLORA_META).is_file()


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_CACHE = re.compile(r"models--([^/]+?)--(.+)")


def hf_source(path: str | os.PathLike) -> str:
    """Where the original Hugging Face checkpoint behind ``path`` lives, for an adapter's base_model_name_or_path:
    for a jqlora-converted directory, the source its conversion recorded; else the hub id (from a hub cache path
    ``.../models--org--name/snapshots/...`` or the config's ``_name_or_path``); else the absolute path."""
    p = Path(path)
    if is_jqlora_dir(p):
        try:
            source = json.loads((p / JQLORA_META).read_text()).get("source")
        except (OSError, ValueError):
            source = None
        if source:
            return str(source)
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


# ----------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jqlora.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="Hugging Face model directory (safetensors, .bin, or bitsandbytes 4-bit)")
    ap.add_argument("dst", help="output directory (must not exist or be empty)")
    ap.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"])
    ap.add_argument("--no-double-quant", action="store_true", help="keep float32 block scales")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=list(quant.DTYPES), help="dtype of unquantized tensors")
    ap.add_argument("--format", default="jqlora", choices=["jqlora", "bnb"], dest="fmt")
    ap.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 500MB, 5GB (default 2GB)")
    args = ap.parse_args(argv)
    try:
        shard_bytes = _parse_size(args.max_shard_size)
    except ValueError:
        print(f"error: --max-shard-size {args.max_shard_size!r}: expected a size such as 500MB or 5GB", file=sys.stderr)
        return 2
    try:
        dst = convert(
            args.src, args.dst, quant_type=args.quant, double_quant=not args.no_double_quant,
            block_size=args.block_size, dtype=args.dtype, fmt=args.fmt, max_shard_bytes=shard_bytes,
        )
    except (ConvertError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(text)
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def check_checkpoint(ckpt: Checkpoint) -> list:
    """The model table's entries for ``ckpt``, after checking that every key is present with its config's shape."""
    from jqlora.models import llama

    where = ckpt.path / "config.json"
    try:
        cfg = llama.ModelConfig.from_hf(ckpt.config)
    except ValueError as e:
        raise ConvertError(f"{where}: {e}") from None
    table = llama.hf_key_table(cfg)
    present = set(ckpt.keys())
    for entry in table:
        if entry.key not in present:
            raise ConvertError(f"{ckpt.path}: missing tensor {entry.key!r} (required by {cfg.model_type} config)")
        shape = ckpt.shape_of(entry.key)
        if tuple(shape) != tuple(entry.shape):
            raise ConvertError(
                f"{ckpt.file_of(entry.key)}: {entry.key} has shape {tuple(shape)}, expected {tuple(entry.shape)} "
                "from config.json"
            )
    return table


if __name__ == "__main__":
    sys.exit(main())
