"""Reading Hugging Face checkpoints one tensor at a time (`Checkpoint`), for `jqlora.convert` and the loaders.

A local model directory with `config.json` and single or sharded safetensors (with `model.safetensors.index.json`),
or PyTorch `pytorch_model*.bin` (torch is imported only then), in bf16/fp16/fp32; or a bitsandbytes 4-bit checkpoint
(`quantization_config.load_in_4bit`), whose NF4/FP4 weights are returned as `quant.QuantizedTensor` exactly as stored
(no dequantize / requantize). `get` returns JAX arrays on the default device; `get_host` returns numpy arrays read
into host memory without a memory map, for the sharded loader (`jqlora.load_model(..., mesh=)`), which places each
tensor's shards on their devices itself. `check_checkpoint` checks every key the model needs against config.json.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np

from jqlora import quant
from jqlora.checkpoints.errors import ConvertError

_QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")




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
        self._keys = sorted(stored - parts, key=natural_key)

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
                raise ConvertError(_torch_load_error(f, e)) from None
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


def natural_key(key: str) -> tuple:
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


def _torch_load_error(f: Path, e: Exception) -> str:
    """One line for a .bin that torch's weights-only unpickler refused (a pickle that would import or call
    something: possibly malicious) or could not read; never torch's advice to load it without that protection."""
    import re

    text = str(e)
    if "Weights only load failed" in text or type(e).__name__ == "UnpicklingError":
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"a reference to {found.group(1)}" if found else "objects other than tensors"
        return (f"{f}: refused: this pickle holds {what}, code that loading would run (jqlora reads .bin "
                "checkpoints only with torch's weights-only loader); use a safetensors copy from a source you trust")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{f}: unreadable PyTorch checkpoint ({type(e).__name__}: {first})"
