"""The adapter as a llama.cpp LoRA GGUF (`python -m jqlora.export --gguf-adapter`), right for every module's scaling.

llama.cpp applies a LoRA GGUF as ``y = W x + s · B (A x)`` with one ``adapter.lora.alpha`` per file and
``s = alpha / r`` where ``r`` is each tensor's own rank (``llama-adapter.cpp``). peft's scaling is per module:
``alpha_m / r_m`` with ``alpha_pattern`` / ``rank_pattern`` (per layer too) and ``alpha_m / √r_m`` with rsLoRA, so
llama.cpp's converter (``convert_lora_to_gguf.py``), which writes the file-level alpha, is silently wrong for them.
Here each module's own scaling is folded into B: ``B' = B · s_m · r_m / alpha``, so that llama.cpp's
``alpha / r_m · B' A = s_m · B A``, the peft delta, for every module (a plain adapter keeps B as it is).

Tensors: ``blk.{i}.attn_q.weight.lora_a`` ``[r, in]`` and ``...lora_b`` ``[out, r]`` in float32 (the names of the
base tensor they adapt, `jqlora.adapters.gguf`), B's rows in llama.cpp's q / k order for the ``llama`` architecture.
Refused in one line: DoRA (llama.cpp has no magnitude; ``--gguf`` writes the merged model instead), LoRA on the
embedding / LM head or the MoE experts, and PiSSA / LoftQ runs (their adapter belongs to an adjusted base).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jqlora.adapters.errors import ExportError
from jqlora.adapters.experts import expert_modules
from jqlora.adapters.export import lora_modules
from jqlora.adapters.gguf_families import PERMUTED, check_supported, permute_rows
from jqlora.adapters.heads import head_modules
from jqlora.checkpoints import atomic_directory

FILE = "adapter-f32.gguf"


def adapter_tensors(model: Any, alpha: float, arch: str) -> dict[str, np.ndarray]:
    """The LoRA GGUF tensors of ``model`` for a file-level ``alpha`` (each module's scaling folded into B)."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    out: dict[str, np.ndarray] = {}
    for name, m in lora_modules(model):
        if m.magnitude is not None:
            raise ExportError("--gguf-adapter: llama.cpp has no DoRA (its magnitude vector); write the merged model "
                              "with --gguf instead")
        for i in range(m.lora_a.shape[0]):
            a_IR, b_RO, s = m.layer_adapter(i)
            r = a_IR.shape[-1]
            if r == 0:
                continue
            key = f"model.layers.{i}.{name}.weight"
            base = names.get_name(key, try_suffixes=(".weight",))
            if base is None:
                raise ExportError(f"--gguf-adapter: no llama.cpp name for {key} ({arch})")
            b_OR = b_RO.T.astype(np.float64) * (s * r / alpha)
            if arch in PERMUTED and name.endswith(("q_proj", "k_proj")):
                b_OR = permute_rows(b_OR, cfg.num_attention_heads if name.endswith("q_proj") else cfg.num_key_value_heads)
            out[f"{base}.lora_a"] = np.ascontiguousarray(a_IR.T, dtype=np.float32)
            out[f"{base}.lora_b"] = np.ascontiguousarray(b_OR, dtype=np.float32)
    return out


def write_gguf_adapter(model: Any, dst: str | os.PathLike, *, name: str = "", init: str = "",
                       overwrite: bool = False) -> Path:
    """Write ``model``'s adapters as ``dst/adapter-f32.gguf`` (llama.cpp ``--lora``); returns the file's path."""
    import gguf

    if init in ("pissa", "loftq"):
        raise ExportError(f"--gguf-adapter: a lora.init={init} adapter belongs to an adjusted base that llama.cpp "
                          "does not have; write the merged model with --gguf instead")
    if head_modules(model) or expert_modules(model):
        raise ExportError("--gguf-adapter: LoRA on embed_tokens / lm_head or on MoE experts is not written to a "
                          "LoRA GGUF; write the merged model with --gguf instead")
    lora_config = getattr(model, "lora_config", None)
    if lora_config is None or not lora_modules(model):
        raise ExportError("--gguf-adapter: the model has no LoRA adapters to export")
    arch = check_supported(model.config)
    alpha = float(lora_config.alpha)
    tensors = adapter_tensors(model, alpha, arch)
    need = sum(int(v.nbytes) for v in tensors.values()) + (1 << 20)
    with atomic_directory(dst, overwrite=overwrite, error=ExportError, need=need) as tmp:
        w = gguf.GGUFWriter(tmp / FILE, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if name:
            w.add_name(name)
        for key, value in tensors.items():
            w.add_tensor(key, value)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(dst) / FILE
