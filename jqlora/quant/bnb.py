"""bitsandbytes' serialized form of a 4-bit weight (what transformers writes for a ``Linear4bit``): the packed codes
plus ``absmax`` / ``quant_map`` / ``nested_absmax`` / ``nested_quant_map`` and the JSON ``quant_state`` blob, read into
and written from `QuantizedTensor` without changing a bit (the layout is in `jqlora.quant.blockwise`'s docstring).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jqlora.quant.blockwise import BLOCK_SIZES, CODEBOOKS, DTYPES, NESTED_BLOCK_SIZE, QUANT_TYPES, QuantizedTensor


_STORAGE_DTYPES = {
    "uint8": np.uint8,
    "int8": np.int8,
    "float16": np.float16,
    "bfloat16": jnp.bfloat16,
    "float32": np.float32,
    "int32": np.int32,
    "int64": np.int64,
    "float64": np.float64,
    "int16": np.int16,
}


def to_numpy(value: Any, key: str) -> np.ndarray:
    """A numpy view of a numpy/JAX array or a torch tensor (bf16 tensors are reinterpreted bytewise)."""
    if type(value).__module__.startswith("torch"):
        t = value.detach().cpu().contiguous()
        if str(t.dtype) == "torch.bfloat16":
            return t.view(-1).view(__import__("torch").int16).numpy().view(jnp.bfloat16).reshape(tuple(t.shape))
        return t.numpy()
    try:
        return np.asarray(value)
    except Exception as e:  # noqa: BLE001 - report what the key held
        raise ValueError(f"{key}: cannot read a {type(value).__name__} as an array ({e})") from None


def to_bnb(q: QuantizedTensor, prefix: str = "weight", *, quant_storage: str = "uint8") -> dict[str, np.ndarray]:
    """The tensors transformers saves for a bitsandbytes 4-bit ``Linear4bit`` weight, as numpy arrays.

    Keys: ``{prefix}``, ``{prefix}.absmax``, ``{prefix}.quant_map``, and with double quantization
    ``{prefix}.nested_absmax``, ``{prefix}.nested_quant_map``; plus ``{prefix}.quant_state.bitsandbytes__<type>``
    (UTF-8 JSON of the non-tensor fields). ``quant_storage`` reinterprets the packed bytes (bitsandbytes'
    ``bnb_4bit_quant_storage``, e.g. bfloat16 for FSDP).
    """
    if q.batch_shape:
        raise ValueError(f"to_bnb takes one tensor, got a stack with batch shape {q.batch_shape}")
    if quant_storage not in _STORAGE_DTYPES:
        raise ValueError(f"unsupported quant_storage {quant_storage!r}: expected one of {', '.join(_STORAGE_DTYPES)}")
    packed = np.asarray(q.codes, dtype=np.uint8)
    storage = np.dtype(_STORAGE_DTYPES[quant_storage])
    if packed.size % storage.itemsize:
        raise ValueError(
            f"{prefix}: {packed.size} packed bytes do not divide into {quant_storage} ({storage.itemsize} bytes)"
        )
    out = {prefix: packed.view(storage).reshape(-1, 1)}
    meta: dict[str, Any] = {
        "quant_type": q.quant_type,
        "blocksize": q.block_size,
        "dtype": q.dtype,
        "shape": list(q.shape),
    }
    out[f"{prefix}.quant_map"] = CODEBOOKS[q.quant_type].copy()
    if q.double_quant:
        out[f"{prefix}.absmax"] = np.asarray(q.absmax, dtype=np.uint8)
        out[f"{prefix}.nested_absmax"] = np.asarray(q.nested_absmax, dtype=np.float32)
        out[f"{prefix}.nested_quant_map"] = CODEBOOKS["dynamic8"].copy()
        meta.update(
            nested_blocksize=NESTED_BLOCK_SIZE,
            nested_dtype="float32",
            nested_offset=float(np.asarray(q.offset, dtype=np.float32)),
        )
    else:
        out[f"{prefix}.absmax"] = np.asarray(q.absmax, dtype=np.float32)
    blob = json.dumps(meta).encode("utf-8")
    out[f"{prefix}.quant_state.bitsandbytes__{q.quant_type}"] = np.frombuffer(blob, dtype=np.uint8).copy()
    return out


def from_bnb(tensors: Mapping[str, Any], prefix: str = "weight", *, where: str = "") -> QuantizedTensor:
    """Read a bitsandbytes-serialized 4-bit weight (the keys `to_bnb` writes) without requantizing.

    ``tensors`` maps keys to numpy arrays or torch tensors; ``where`` (e.g. a file name) prefixes error messages.
    Every field is checked against the others and against jqlora's codebooks.
    """
    at = f"{where}: " if where else ""

    def get(key: str, required: bool = True) -> np.ndarray | None:
        full = f"{prefix}.{key}" if key else prefix
        if full not in tensors:
            if required:
                raise ValueError(f"{at}missing tensor {full!r} of a bitsandbytes 4-bit weight")
            return None
        return to_numpy(tensors[full], full)

    state_keys = [k for k in tensors if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if len(state_keys) != 1:
        raise ValueError(
            f"{at}expected exactly one '{prefix}.quant_state.bitsandbytes__<nf4|fp4>' tensor, found {state_keys or 'none'}"
        )
    state_key = state_keys[0]
    try:
        meta = json.loads(bytes(to_numpy(tensors[state_key], state_key).astype(np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{at}{state_key}: not a JSON quant state ({e})") from None
    quant_type = meta.get("quant_type")
    if quant_type not in QUANT_TYPES or state_key.rsplit("__", 1)[1] != quant_type:
        raise ValueError(f"{at}{state_key}: unsupported or inconsistent quant_type {quant_type!r}")
    block_size = meta.get("blocksize")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"{at}{state_key}: unsupported blocksize {block_size!r}")
    dtype = meta.get("dtype")
    if dtype not in DTYPES:
        raise ValueError(f"{at}{state_key}: unsupported dtype {dtype!r}")
    shape = tuple(int(d) for d in meta.get("shape") or ())
    n = int(np.prod(shape, dtype=np.int64))
    if not shape or n == 0:
        raise ValueError(f"{at}{state_key}: missing or empty shape {meta.get('shape')!r}")
    n_blocks = -(-n // block_size)

    packed = np.ascontiguousarray(get("")).reshape(-1).view(np.uint8)
    if packed.size != -(-n // 2):
        raise ValueError(f"{at}{prefix}: {packed.size} packed bytes, expected {-(-n // 2)} for shape {shape}")
    quant_map = get("quant_map", required=False)
    if quant_map is not None and not np.array_equal(quant_map.astype(np.float32), CODEBOOKS[quant_type]):
        raise ValueError(f"{at}{prefix}.quant_map: differs from the standard {quant_type} codebook")
    absmax = get("absmax").reshape(-1)
    if absmax.size != n_blocks:
        raise ValueError(f"{at}{prefix}.absmax: {absmax.size} values, expected {n_blocks} blocks of {block_size}")

    nested = get("nested_absmax", required=False)
    if nested is None:
        if absmax.dtype != np.float32:
            raise ValueError(f"{at}{prefix}.absmax: dtype {absmax.dtype}, expected float32 without double quantization")
        return QuantizedTensor(jnp.asarray(packed), jnp.asarray(absmax), None, None, shape, dtype, block_size, quant_type)

    if meta.get("nested_blocksize") != NESTED_BLOCK_SIZE:
        raise ValueError(f"{at}{state_key}: nested_blocksize {meta.get('nested_blocksize')!r}, expected 256")
    if absmax.dtype != np.uint8:
        raise ValueError(f"{at}{prefix}.absmax: dtype {absmax.dtype}, expected uint8 codes with double quantization")
    nested = nested.reshape(-1).astype(np.float32)
    if nested.size != -(-n_blocks // NESTED_BLOCK_SIZE):
        raise ValueError(f"{at}{prefix}.nested_absmax: {nested.size} values, expected {-(-n_blocks // NESTED_BLOCK_SIZE)}")
    nested_map = get("nested_quant_map", required=False)
    if nested_map is not None and not np.array_equal(nested_map.astype(np.float32), CODEBOOKS["dynamic8"]):
        raise ValueError(f"{at}{prefix}.nested_quant_map: differs from the standard dynamic 8-bit map")
    if "nested_offset" not in meta:
        raise ValueError(f"{at}{state_key}: missing nested_offset")
    offset = np.float32(meta["nested_offset"])
    return QuantizedTensor(
        jnp.asarray(packed), jnp.asarray(absmax), jnp.asarray(nested), jnp.asarray(offset), shape, dtype, block_size, quant_type
    )
