"""What each model family needs in a GGUF file for llama.cpp to run it as transformers does, or a one-line refusal.

The conventions are llama.cpp's (its converter ``convert_hf_to_gguf.py`` and the architectures' graphs in
``src/models/*.cpp``), per family:

- Llama, Mistral (``llama``): q_proj / k_proj rows permuted per head to llama.cpp's interleaved RoPE order
  (`permute_rows`); Qwen2 / Qwen3 / Gemma / Phi-3 use the rotate-half (NeoX) order, as Hugging Face does.
- Gemma 2 / Gemma 3 (``gemma2``, ``gemma3``): Hugging Face's RMSNorm scales by ``1 + w``, llama.cpp's by ``w``, so
  every norm weight (q_norm / k_norm too) is written with the 1 added. Soft-capping as
  ``attn_logit_softcapping`` / ``final_logit_softcapping`` (Gemma 2 always caps both, so a Gemma 2 without caps is
  refused), the window as ``attention.sliding_window`` and which layers slide as the boolean array
  ``attention.sliding_window_pattern``; Gemma 3's local RoPE base as ``rope.freq_base_swa`` (its local layers get no
  RoPE scaling in llama.cpp, its global ones the ``linear`` factor). llama.cpp ignores ``query_pre_attn_scalar``:
  it scales queries by head_dim^-½ (hidden/heads ^-½ for the 27B, told by its layer count), so any other scale is
  refused. Gemma 2's LM head is always the embedding (an untied one is refused).
- Phi-3 (``phi3``): the fused ``attn_qkv`` / ``ffn_up`` (gate rows first) as they are; partial rotary as
  ``rope.dimension_count``; LongRoPE as llama.cpp's converter writes it: ``rope_factors_long`` /
  ``rope_factors_short`` tensors, ``rope.scaling.original_context_length`` and ``rope.scaling.attn_factor``.
  llama.cpp picks the long factors when its context size (``n_ctx``) exceeds the original length, transformers
  when the sequence does: the same up to ``n_ctx`` = the original length (a warning says so).
- Sliding windows: Gemma 2/3 have them in llama.cpp; ``llama``, ``qwen2`` and ``phi3`` do not (llama.cpp turns
  Phi-3's off), so there the file declares the shortest window as its ``context_length`` (`context_length`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from jqlora.adapters.errors import ExportError

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
         "gemma3_text": "gemma3", "phi3": "phi3"}
PERMUTED = ("llama",)  # architectures whose q / k rows llama.cpp wants in interleaved RoPE order
GEMMA = ("gemma2", "gemma3")
BIG_GEMMA_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp's 27B, whose query scale is (hidden / heads)^-½
log = logging.getLogger("jqlora.export")


def _refusal(cfg: Any, arch: str) -> str | None:
    r = cfg.rope
    if cfg.num_experts or ((cfg.fused_qkv or cfg.fused_gate_up) and arch != "phi3"):
        return "MoE or fused projections"
    if cfg.partial_rotary_factor != 1.0 and arch != "phi3":
        return f"partial rotary embeddings (factor {cfg.partial_rotary_factor})"
    allowed = {"phi3": ("default", "longrope"), "gemma2": ("default",), "gemma3": ("default", "linear")}
    if r.rope_type not in allowed.get(arch, ("default", "linear", "llama3", "yarn")):
        return f"rope type {r.rope_type!r}"
    if r.rope_type == "yarn" and (r.attention_factor is not None or r.mscale is not None
                                  or r.mscale_all_dim is not None or not r.truncate):
        return "a yarn RoPE with attention_factor / mscale / truncate=false, which llama.cpp computes otherwise"
    gemma = arch in GEMMA
    if cfg.hidden_act != ("gelu_pytorch_tanh" if gemma else "silu") or cfg.norm_unit_offset != gemma:
        return "settings of another family"
    if cfg.o_bias or (cfg.qkv_bias and arch not in ("qwen2", "llama")):
        return "attention biases llama.cpp does not read for this architecture"
    scale = cfg.head_dim ** -0.5
    if gemma and cfg.num_hidden_layers == BIG_GEMMA_LAYERS[arch]:
        scale = (cfg.hidden_size // cfg.num_attention_heads) ** -0.5
    if cfg.attn_scale is not None and not math.isclose(cfg.attn_scale, scale, rel_tol=1e-6):
        return (f"an attention scale {cfg.attn_scale:.6g} (query_pre_attn_scalar) where llama.cpp's {arch} uses "
                f"{scale:.6g}")
    if not gemma:
        if cfg.attn_softcap or cfg.final_softcap:
            return "settings of another family"
        return None
    windows = {w for w in cfg.sliding_windows if w is not None}
    if len(windows) > 1:
        return f"several sliding windows {sorted(windows)}"
    if arch == "gemma2":
        if cfg.attn_softcap is None or cfg.final_softcap is None:
            return "no attention / final soft-capping, which llama.cpp's gemma2 always applies"
        if not cfg.tie_word_embeddings:
            return "an LM head apart from the embedding, which llama.cpp's gemma2 does not read"
    elif cfg.attn_softcap is not None:
        return "attention soft-capping, which llama.cpp's gemma3 does not apply"
    local = cfg.rope_local
    if windows and local is not None and local.rope_type != "default":
        return f"a scaled local-layer RoPE ({local.rope_type}), which llama.cpp's {arch} does not apply"
    return None


def check_supported(cfg: Any) -> str:
    """The gguf architecture name of ``cfg`` (a `jqlora.models.ModelConfig`), or a one-line refusal."""
    family = cfg.model_type
    if family not in ARCHS:
        raise ExportError(f"GGUF export of model_type {family!r} is not supported (supported: "
                          f"{', '.join(sorted(ARCHS))}); export --merge and convert with llama.cpp")
    arch = ARCHS[family]
    why = _refusal(cfg, arch)
    if why:
        raise ExportError(f"GGUF export of this {family} model: {why}; llama.cpp would answer differently")
    return arch


def context_length(cfg: Any, arch: str | None = None) -> int:
    """The context the file declares: ``max_position_embeddings``, or, for an architecture without sliding windows
    in llama.cpp, the shortest window when there is one (up to the window, attention is the same)."""
    windows = [w for w in cfg.sliding_windows if w is not None]
    if (arch or ARCHS.get(cfg.model_type)) in GEMMA:
        return cfg.max_position_embeddings
    return min([cfg.max_position_embeddings, *windows])


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half row order → llama.cpp's interleaved pairs, per head (rows, or a bias)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def family_metadata(w: Any, cfg: Any, arch: str) -> None:
    """The keys beyond the common ones (`jqlora.adapters.gguf`) that ``arch`` needs."""
    if arch in GEMMA:
        if cfg.attn_softcap is not None:
            w.add_attn_logit_softcapping(cfg.attn_softcap)
        if cfg.final_softcap is not None:
            w.add_final_logit_softcapping(cfg.final_softcap)
        windows = [w_ for w_ in cfg.sliding_windows if w_ is not None]
        if windows:
            w.add_sliding_window(windows[0])
            w.add_sliding_window_pattern([w_ is not None for w_ in cfg.sliding_windows])
            w.add_rope_freq_base_swa((cfg.rope_local or cfg.rope).theta)  # (the local layers' base)
    elif arch == "phi3":
        r = cfg.rope
        if r.rope_type == "longrope":
            w.add_rope_scaling_orig_ctx_len(r.original_max_position_embeddings)
            w.add_rope_scaling_attn_factors(longrope_attention_factor(r))
            if cfg.max_position_embeddings > r.original_max_position_embeddings:
                log.warning("Phi-3 LongRoPE: llama.cpp uses the long factors whenever its context (n_ctx) exceeds "
                            "%d, transformers only once the sequence does; run with n_ctx <= %d for the same "
                            "answers on short prompts", r.original_max_position_embeddings,
                            r.original_max_position_embeddings)


def longrope_attention_factor(r: Any) -> float:
    """LongRoPE's attention factor as transformers computes it (`jqlora.models.rope`): the given one, else
    sqrt(1 + ln(s) / ln(original)) with s = factor."""
    if r.attention_factor is not None:
        return float(r.attention_factor)
    return 1.0 if r.factor <= 1.0 else math.sqrt(1 + math.log(r.factor) / math.log(r.original_max_position_embeddings))


def extra_tensors(cfg: Any, arch: str) -> list[tuple[str, np.ndarray]]:
    """Tensors llama.cpp reads that the checkpoint does not hold: Phi-3's LongRoPE factors."""
    r = cfg.rope
    if arch == "phi3" and r.rope_type == "longrope":
        return [("rope_factors_long.weight", np.asarray(r.long_factor, np.float32)),
                ("rope_factors_short.weight", np.asarray(r.short_factor, np.float32))]
    return []


def to_llamacpp(value: np.ndarray, entry: Any, cfg: Any, arch: str) -> np.ndarray:
    """A merged Hugging Face tensor as llama.cpp's ``arch`` reads it (q / k row order, Gemma's norm offset)."""
    if arch in PERMUTED and entry.path[-1] in ("q_proj", "k_proj"):
        return permute_rows(value, cfg.num_attention_heads if entry.path[-1] == "q_proj" else cfg.num_key_value_heads)
    if arch in GEMMA and entry.kind == "norm":
        return value.astype(np.float32) + 1.0
    return value
