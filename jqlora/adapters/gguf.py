"""The merged model as one GGUF file for llama.cpp, Ollama and LM Studio (`python -m jqlora.export --gguf TYPE`).

Written with the gguf package (llama.cpp's own writer), streamed: the tensor infos first, then one merged tensor
at a time (`jqlora.adapters.merge.merged_tensor`, float32, W + s·(AB)ᵀ), so host memory holds one tensor, not the
model. Names and layout follow llama.cpp's converter (``convert_hf_to_gguf.py``):

- tensors: gguf's ``TensorNameMap`` (``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight``); for
  the ``llama`` architecture (Llama, Mistral) the rows of q_proj / k_proj are permuted per head from Hugging Face's
  rotate-half order to llama.cpp's interleaved RoPE order, ``W.reshape(n, 2, H/2, D).swapaxes(1, 2)``;
- types: ``f16`` / ``bf16``: every matrix in that type, vectors (norms, biases) in float32; ``q8_0``: matrices whose
  rows are a multiple of 32 in Q8_0 (blocks of 32 with one float16 scale), the others in float16;
- metadata: the architecture's hyperparameters, RoPE (theta; ``linear`` and ``yarn`` scaling as keys; ``llama3`` as
  the ``rope_freqs`` tensor of per-frequency divisors, as llama.cpp reads it), and the tokenizer with its chat
  template (`jqlora.adapters.gguf_vocab`).

The k-quants (``q4_k_m``, ``q5_k_m``, ``q6_k``) are not in the gguf package (it can only read them): they need
llama.cpp's ``llama-quantize`` on PATH, which requantizes the f16 file written here (its importance-free mixes).

Supported: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3, each with what llama.cpp needs for it
(`jqlora.adapters.gguf_families`: Gemma's norm offset and soft-caps, sliding windows, Phi-3's fused projections and
LongRoPE). Anything llama.cpp would run differently is refused in one line: a file that loads and answers wrong is
worse than none. An Ollama ``Modelfile`` goes beside the file (`jqlora.adapters.ollama`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jqlora.adapters.errors import ExportError
from jqlora.adapters.gguf_families import (check_supported, context_length, extra_tensors, family_metadata,
                                           to_llamacpp)
from jqlora.adapters.gguf_vocab import add_tokenizer
from jqlora.adapters.merge import merged_tensor
from jqlora.adapters.ollama import write_modelfile
from jqlora.checkpoints import atomic_directory
from jqlora.models import hf_key_table

TYPES = ("f16", "bf16", "q8_0")
K_QUANTS = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
log = logging.getLogger("jqlora.export")


def check_type(qtype: str) -> str | None:
    """A one-line refusal for a ``--gguf`` type that cannot be made here; the path of llama-quantize for a k-quant."""
    if qtype not in TYPES and qtype not in K_QUANTS:
        raise ExportError(f"--gguf {qtype!r}: expected one of {', '.join([*TYPES, *K_QUANTS])}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ExportError("--gguf needs the gguf package (llama.cpp's writer): pip install 'jqlora[gguf]'") from None
    if qtype not in K_QUANTS:
        return None
    quantizer = shutil.which("llama-quantize")
    if quantizer is None:
        raise ExportError(f"--gguf {qtype} needs llama.cpp's llama-quantize on PATH (the gguf package cannot make "
                          "k-quants); write --gguf f16 and run: llama-quantize model-f16.gguf out.gguf "
                          f"{K_QUANTS[qtype]}")
    return quantizer


def llama3_rope_factors(r: Any, head_dim: int) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp divides the default frequencies by for a ``llama3`` RoPE ([head_dim/2])."""
    inv_freq = 1.0 / r.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old = r.original_max_position_embeddings
    low, high = old / r.low_freq_factor, old / r.high_freq_factor
    smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    mid = 1.0 / ((1 - smooth) / r.factor + smooth)
    factors = np.where(wavelen < high, 1.0, np.where(wavelen > low, r.factor, mid))
    return factors.astype(np.float32)


def _metadata(w: Any, cfg: Any, arch: str, name: str, file_type: int) -> None:
    import gguf

    w.add_name(name)
    w.add_context_length(context_length(cfg, arch))
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    r = cfg.rope
    if r.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(r.factor)
    elif r.rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(r.factor)
        w.add_rope_scaling_orig_ctx_len(r.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(r.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(r.beta_slow)
    family_metadata(w, cfg, arch)


def _ggml_type(shape: tuple[int, ...], qtype: str) -> Any:
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return T.F32
    if qtype == "q8_0":
        return T.Q8_0 if shape[-1] % 32 == 0 else T.F16
    return {"f16": T.F16, "bf16": T.BF16}[qtype]


def _encode(value: np.ndarray, ggml_type: Any) -> np.ndarray:
    import gguf

    T = gguf.GGMLQuantizationType
    if ggml_type in (T.F32, T.F16):
        return value.astype(np.float32 if ggml_type == T.F32 else np.float16)
    return gguf.quantize(np.ascontiguousarray(value, dtype=np.float32), ggml_type)


def _tensor_info(shape: tuple[int, ...], ggml_type: Any) -> tuple[tuple[int, ...], Any, int, Any]:
    """(shape, numpy dtype, bytes, raw type) as `GGUFWriter.add_tensor_info` takes them."""
    import gguf

    T = gguf.GGMLQuantizationType
    if ggml_type in (T.F32, T.F16):
        dtype = np.float32 if ggml_type == T.F32 else np.float16
        return shape, dtype, int(np.prod(shape)) * np.dtype(dtype).itemsize, None
    byte_shape = tuple(gguf.quant_shape_to_byte_shape(shape, ggml_type))
    return byte_shape, np.uint8, int(np.prod(byte_shape)), ggml_type


def write_gguf(model: Any, base_path: str | os.PathLike, dst: str | os.PathLike, qtype: str = "f16", *,
               chat_template: str | None = None, tokenizer_path: str | os.PathLike | None = None,
               overwrite: bool = False, modelfile: bool = True) -> Path:
    """Write ``model`` (base + adapters, merged) into ``dst/model-{qtype}.gguf`` and, with ``modelfile``, an Ollama
    ``dst/Modelfile`` for it (`jqlora.adapters.ollama`); returns the GGUF's path."""
    import gguf

    quantizer = check_type(qtype)
    cfg = model.config
    arch = check_supported(cfg)
    if context_length(cfg, arch) < cfg.max_position_embeddings:
        log.warning("GGUF context_length %d, the sliding window (max_position_embeddings %d): llama.cpp's %s "
                    "architecture has no sliding window, so longer contexts would attend past it",
                    context_length(cfg, arch), cfg.max_position_embeddings, arch)
    written = "f16" if quantizer else qtype
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[written]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    plan = []  # (gguf name, table entry or a ready array, ggml type)
    for entry in hf_key_table(cfg):
        name = names.get_name(entry.key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"GGUF export: no llama.cpp name for {entry.key} ({arch})")
        plan.append((name, entry, _ggml_type(tuple(entry.shape), written)))
    if cfg.rope.rope_type == "llama3":
        plan.append(("rope_freqs.weight", llama3_rope_factors(cfg.rope, cfg.head_dim), gguf.GGMLQuantizationType.F32))
    plan += [(name, value, gguf.GGMLQuantizationType.F32) for name, value in extra_tensors(cfg, arch)]
    infos = [_tensor_info(tuple(e.shape) if hasattr(e, "key") else e.shape, t) for _, e, t in plan]
    need = sum(n for _, _, n, _ in infos) + (1 << 20)
    with atomic_directory(dst, overwrite=overwrite, error=ExportError, need=need * (2 if quantizer else 1)) as tmp:
        path = tmp / f"model-{written}.gguf"
        w = gguf.GGUFWriter(path, arch)
        _metadata(w, cfg, arch, Path(base_path).resolve().name, int(file_type))
        add_tokenizer(w, tokenizer_path or base_path, cfg.vocab_size, chat_template)
        for (name, _, _), (shape, dtype, nbytes, raw) in zip(plan, infos):
            w.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, entry, t in tqdm(plan, desc="gguf", unit="tensor", disable=None, dynamic_ncols=True):
            value = to_llamacpp(merged_tensor(model, entry), entry, cfg, arch) if hasattr(entry, "key") else entry
            w.write_tensor_data(_encode(value, t))
        w.close()
        if quantizer:
            final = tmp / f"model-{qtype}.gguf"
            r = subprocess.run([quantizer, str(path), str(final), K_QUANTS[qtype]], capture_output=True, text=True)
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
                raise ExportError(f"llama-quantize {K_QUANTS[qtype]} failed: {tail[0]}")
            path.unlink()
            path = final
        name = path.name
        if modelfile:
            note = write_modelfile(tmp, name, chat_template, tokenizer_path or base_path)
            if note:
                log.warning("%s", note)
    return Path(dst) / name
