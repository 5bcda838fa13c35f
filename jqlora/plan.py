"""An analytic per-device memory plan for a QLoRA run: will it fit, and where do the bytes go?

    python -m jqlora.plan --model llama3-70b --seq 2048 --batch 1 --fsdp 2 --remat full
    python -m jqlora.plan --model-config path/to/config.json --seq 2048 --batch 1
    python -m jqlora.plan --config configs/llama3-8b.yaml [key.sub=value ...] [--devices 8]

Rows (bytes per device; B = rows per device, S = sequence, T = B·S tokens, D hidden, F MLP width, N/K query/KV heads
of size H, L layers, V vocabulary, r LoRA rank, c = bytes of the compute dtype, P = fsdp × tensor):

    base weights        exact storage of the frozen model: per linear kernel of n values ceil(n/2) code bytes +
                        n/block absmax (1 byte with double quantization, else 4) + ceil(blocks/256)·4 nested scales
                        + 4 offset bytes (≈ 4.127 bits/param at block 64), embeddings / lm_head / norms in the
                        compute dtype; split over P (norms replicated), as `jqlora.sharding` places them
    gathered layer      FSDP only: one layer's 4-bit kernels all-gathered, twice (the next layer is prefetched)
    LoRA + AdamW        fp32 adapters + gradient + accumulated gradient (optax.MultiSteps) + 2 moments = 20 B/param,
                        split over fsdp
    residual stream     every remat policy but none: the scanned layer input, L · T·D·c
    saved matmuls       save_dots: every dot output of every layer (base, LoRA A and B; with XLA attention also its
                        scores and values, a cuDNN attention call is no dot);
                        save_dots_no_batch: the same without attention's (batched) dots; offload: those of
                        save_dots_no_batch in pinned host memory (a host row, not in the device total)
    layer working set   one layer recomputed for its backward: activations T·(6D + 2NH + 2KH + 3F)·c, attention
                        scores and probabilities B·N·S²·(2c) with XLA attention, or cuDNN flash attention's float32
                        softmax statistics B·64·N·S·4 (its packed layout has room for 64 segments a row), and the layer's
                        kernels dequantized to c; with remat none every layer keeps its activations (× L) but not its
                        dequantized kernels (the 4-bit matmul's backward dequantizes again, `lora.quantized_matmul`)
    cross-entropy       one chunk of 1024 tokens of float32 logits and their gradient, 2 · 1024·V·4, plus the final
                        hidden states and their gradient 2·T·D·c

Not counted: XLA's temporary buffers and fragmentation, the CUDA context (~0.5 GB), the batch itself.
The tensor axis divides the per-layer working set and saved matmuls (heads and MLP are split), not the residuals.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any

from jqlora.lora import ADAPTABLE_MODULES as LINEARS
from jqlora.models.llama import ModelConfig, hf_key_table

NESTED = 256
CE_CHUNK = 1024
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
REMATS = ("none", "full", "save_dots", "save_dots_no_batch", "offload")  # = jqlora.config.REMAT_POLICIES
AUTO_ORDER = ("none", "save_dots", "save_dots_no_batch", "full")  # fastest first: what `train.remat=auto` tries
WEIGHTS_ROW = "base weights (4-bit + bf16)"
HEADROOM = 0.85  # share of a device's memory the plan may fill: XLA temporaries, fragmentation, CUDA context


# Published config.json values (the fields that shape memory and compute), shared with tools/bench.py.
PUBLISHED: dict[str, dict[str, Any]] = {
    "llama3-8b": {  # meta-llama/Meta-Llama-3-8B (3.1 has the same shapes)
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "llama3-70b": {  # meta-llama/Meta-Llama-3-70B
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "mistral-7b": {  # mistralai/Mistral-7B-v0.1
        "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 32768, "sliding_window": 4096,
        "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "qwen2.5-7b": {  # Qwen/Qwen2.5-7B (q/k/v biases)
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "use_sliding_window": False,
        "sliding_window": 131072, "max_window_layers": 28, "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "gemma2-9b": {  # google/gemma-2-9b (1:1 local/global layers, soft-capping, tied 256k vocabulary)
        "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336,
        "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "query_pre_attn_scalar": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 8192,
        "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
    },
    "gemma3-12b": {  # google/gemma-3-12b-pt, its text_config (5:1 local/global layers, two RoPE bases)
        "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 3840, "intermediate_size": 15360,
        "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "query_pre_attn_scalar": 256, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072, "sliding_window": 1024, "sliding_window_pattern": 6,
        "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
    },
    # Phi: fused qkv_proj / gate_up_proj. Their LongRoPE factor lists are left out here: they change no shape.
    "phi3.5-mini": {  # microsoft/Phi-3.5-mini-instruct
        "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "sliding_window": 262144, "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "phi4-mini": {  # microsoft/Phi-4-mini-instruct (GQA, partial rotary 0.75, tied 200k vocabulary)
        "model_type": "phi3", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8, "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "sliding_window": 262144, "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
    "mixtral-8x7b": {  # mistralai/Mixtral-8x7B-v0.1: 8 experts, 2 per token
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 1e6,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 32768, "num_local_experts": 8, "num_experts_per_tok": 2,
        "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "qwen3-30b-a3b": {  # Qwen/Qwen3-30B-A3B: 128 experts of width 768, 8 per token
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
}
NAMES = {"llama3-8b": "Llama-3-8B", "llama3-70b": "Llama-3-70B", "mistral-7b": "Mistral-7B",
         "qwen2.5-7b": "Qwen2.5-7B", "gemma2-9b": "Gemma-2-9B", "gemma3-12b": "Gemma-3-12B",
         "phi3.5-mini": "Phi-3.5-mini", "phi4-mini": "Phi-4-mini", "mixtral-8x7b": "Mixtral-8x7B",
         "qwen3-30b-a3b": "Qwen3-30B-A3B"}
BUILTIN: dict[str, ModelConfig] = {k: ModelConfig.from_hf(v) for k, v in PUBLISHED.items()}


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """[out, in] of each linear kernel of one layer, from the model's own HF key table; MoE experts as
    ``experts.<name>`` [E · out, in] (all experts of the layer, which carry no adapter)."""
    shapes = {}
    for e in hf_key_table(cfg):
        if e.kind == "linear" and e.layer == 0 and e.expert in (None, 0):
            if e.expert is None:
                shapes[e.path[-1]] = e.shape
            else:
                shapes[f"experts.{e.path[-1]}"] = (cfg.num_experts * e.shape[0], e.shape[1])
    return shapes


def quantized_bytes(n: int, block_size: int = 64, double_quant: bool = True) -> int:
    """Exact storage of one 4-bit tensor of n values: codes, absmax, nested absmax and offset."""
    blocks = -(-n // block_size)
    if double_quant:
        return -(-n // 2) + blocks + 4 * -(-blocks // NESTED) + 4
    return -(-n // 2) + 4 * blocks


def weight_bytes(shape: ModelConfig, *, quant: str = "nf4", double_quant: bool = True, block_size: int = 64,
                 dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes of the whole frozen model: {'quantized', 'unquantized', 'norms', 'per_layer_quantized', 'total'}."""
    L, D, V = shape.num_hidden_layers, shape.hidden_size, shape.vocab_size
    per_layer = 0
    for O, I in linear_shapes(shape).values():
        per_layer += quantized_bytes(O * I, block_size, double_quant) if quant != "none" else O * I * dtype_bytes
    biases = (shape.num_attention_heads + 2 * shape.num_key_value_heads) * shape.head_dim if shape.qkv_bias else 0
    router = shape.num_experts * D  # MoE: the router stays unquantized
    norms = L * (2 * D + (2 * shape.head_dim if shape.qk_norm else 0) + biases + router) + D
    embed = V * D * (1 if shape.tie_word_embeddings else 2)
    quantized = L * per_layer if quant != "none" else 0
    unquantized = (embed + norms) * dtype_bytes + (L * per_layer if quant == "none" else 0)
    return {"quantized": quantized, "unquantized": unquantized, "norms": norms * dtype_bytes,
            "per_layer_quantized": per_layer, "total": quantized + unquantized}


def lora_param_count(shape: ModelConfig, r: int = 16, targets: tuple[str, ...] = LINEARS) -> int:
    return shape.num_hidden_layers * sum(r * (O + I) for name, (O, I) in linear_shapes(shape).items()
                                         if name in targets)


@dataclasses.dataclass
class Plan:
    title: str
    rows: dict[str, float]
    total_weight_bytes: int
    notes: list[str]
    host_rows: dict[str, float] = dataclasses.field(default_factory=dict)  # pinned host memory, not on the device

    @property
    def total(self) -> float:
        return float(sum(self.rows.values()))

    def table(self) -> str:
        width = max(len(k) for k in list(self.rows) + ["total per device"])
        lines = [self.title, "-" * (width + 14)]
        for k, v in self.rows.items():
            lines.append(f"{k:<{width}}  {v / 1e9:>9.2f} GB")
        lines.append("-" * (width + 14))
        lines.append(f"{'total per device':<{width}}  {self.total / 1e9:>9.2f} GB")
        for k, v in self.host_rows.items():
            lines.append(f"{k + ' (host)':<{width}}  {v / 1e9:>9.2f} GB")
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def _model_config(path: str) -> ModelConfig:
    try:
        return ModelConfig.from_hf(path)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise _Usage(f"{path}: not a usable config.json ({e})") from None


def memory_plan(shape: ModelConfig, *, seq: int, batch: int = 1, data: int = 1, fsdp: int = 1, tensor: int = 1,
                remat: str = "full", r: int = 16, targets: tuple[str, ...] = LINEARS, quant: str = "nf4",
                double_quant: bool = True, block_size: int = 64, dtype: str = "bfloat16",
                ce_chunk: int = CE_CHUNK, name: str = "model", attention: str = "xla",
                dropout: float = 0.0) -> Plan:
    """Bytes per device; ``batch`` is rows per device (each device of the data × fsdp axes sees its own rows)."""
    if remat not in REMATS:
        raise ValueError(f"remat {remat!r}: expected one of {', '.join(REMATS)}")
    c = DTYPE_BYTES[dtype]
    P = fsdp * tensor
    L, D, F = shape.num_hidden_layers, shape.hidden_size, shape.intermediate_size
    if shape.num_experts:  # MoE: each token runs k experts, in dispatch tiles padded up to ~2x (models/moe.py)
        F = 2 * shape.num_experts_per_tok * F
    N, K, H, V = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim, shape.vocab_size
    B, S = batch, seq
    T = B * S
    w = weight_bytes(shape, quant=quant, double_quant=double_quant, block_size=block_size, dtype_bytes=c)
    rows: dict[str, float] = {}
    rows[WEIGHTS_ROW] = (w["total"] - w["norms"]) / P + w["norms"]
    if P > 1:
        rows["gathered layer (fsdp prefetch, x2)"] = 2 * w["per_layer_quantized"] * (1 - 1 / P)
    n_lora = lora_param_count(shape, r, targets)
    rows["LoRA params+grad+acc+AdamW (fp32)"] = 20 * n_lora / fsdp
    residual = L * T * D * c
    acts = T * (6 * D + 2 * N * H + 2 * K * H + 3 * F) * c / tensor
    if dropout > 0 and remat == "none":
        # what the compiler keeps per layer with LoRA dropout and no remat (read off the compiled Llama-3-8B step,
        # h100-sxm, seq 2048): each adapter's dropped input and its mask, both float32 RMSNorm inputs, 6 F-wide
        # and 6 D-wide compute-dtype activations, q/k/v and the attention output
        acts = T * ((6 * F + 6 * D + 2 * N * H + 2 * K * H) * c + 2 * D * 4 + (5 * D + N * H + F)) / tensor
    flash = attention == "cudnn"
    scores = (B * min(64, S) * N * S * 4 if flash else 2 * B * N * S * S * c) / tensor
    kernels = sum(O * I for O, I in linear_shapes(shape).values()) * c / tensor
    outs = T * (N * H + 2 * K * H + D + 2 * F + D) * c
    n_lin = len(targets)
    no_batch_dots = (2 * outs + T * r * n_lin * c) / tensor  # base and LoRA B outputs, LoRA A outputs
    dots = no_batch_dots + (0 if flash else (B * N * S * S * c + T * N * H * c) / tensor)  # + attention's dots
    host: dict[str, float] = {}
    if remat == "none":
        rows["all layers' activations (no remat)"] = L * (acts + scores)
        rows["one layer's dequantized kernels"] = kernels
    else:
        rows["residual stream checkpoints"] = residual
        if remat == "save_dots":
            rows["saved matmul outputs"] = L * dots
        elif remat == "save_dots_no_batch":
            rows["saved matmul outputs (no attention)"] = L * no_batch_dots
        elif remat == "offload":
            host["saved matmul outputs (no attention)"] = L * no_batch_dots
        rows["layer working set (recomputed)"] = acts + scores + kernels
    rows["cross-entropy chunk + final hidden"] = 2 * min(ce_chunk, T) * V * 4 + 2 * T * D * c
    notes = [f"{w['quantized'] * 8 / max(1, sum(O * I for O, I in linear_shapes(shape).values()) * L):.3f} "
             f"bits/param for the linear kernels; {n_lora / 1e6:.1f} M LoRA params (r={r})",
             f"all devices together hold {w['total'] / 1e9:.2f} GB of base weights"]
    if remat == "offload":
        notes.append("offload: the saved matmuls live in pinned host memory (GPU; on a backend without it they stay "
                     "on the device, as save_dots_no_batch)")
    title = (f"{name}: seq={S} batch={B}/device data={data} fsdp={fsdp} tensor={tensor} remat={remat} "
             f"r={r} {quant}{'+dq' if double_quant else ''} {dtype}")
    return Plan(title, rows, w["total"], notes, host)


def choose_remat(shape: ModelConfig, budget: float, *, headroom: float = HEADROOM,
                 **settings: Any) -> tuple[str, Plan]:
    """The fastest policy of `AUTO_ORDER` whose plan fits ``headroom × budget`` bytes per device, and its plan; the
    least-memory policy (full) and its plan when none fits. ``settings`` are `memory_plan`'s other arguments."""
    for policy in AUTO_ORDER:
        p = memory_plan(shape, remat=policy, **settings)
        if p.total <= headroom * budget:
            return policy, p
    return "full", memory_plan(shape, remat="full", **settings)


def device_budget() -> int | None:
    """Bytes one accelerator can hold (XLA's ``bytes_limit``); None where the backend does not say (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def settings_from_config(cfg: Any, axes: dict[str, int] | None = None) -> dict[str, Any]:
    """`memory_plan`'s settings from a run config; ``axes``: resolved mesh sizes (default: the config's, auto = 1)."""
    if axes is None:
        axes = {n: 1 if getattr(cfg.mesh, n) == "auto" else int(getattr(cfg.mesh, n)) for n in ("data", "fsdp",
                                                                                               "tensor")}
    rows = axes["data"] * axes["fsdp"] if all(isinstance(axes[n], int) for n in ("data", "fsdp")) else 1
    # train.batch_size is the global micro-batch: its rows are split over the data × fsdp devices
    return dict(seq=cfg.data.max_length, batch=max(1, cfg.train.batch_size // rows), r=cfg.lora.r,
                dropout=cfg.lora.dropout, dtype=cfg.model.dtype,
                quant=cfg.model.quant, double_quant=cfg.model.double_quant and cfg.model.quant != "none",
                block_size=cfg.model.block_size, **axes,
                targets=LINEARS if cfg.lora.targets == "all-linear" else tuple(cfg.lora.target_modules))


COMPILED_HEADROOM = 0.97  # share of the budget a compiled peak may fill (the compiler counts every buffer it plans)


def choose_remat_compiled(shape: ModelConfig, cfg: Any, budget: float, gpu: str | None,
                          headroom: float = COMPILED_HEADROOM) -> tuple[str, int, list[str]]:
    """The fastest policy of `AUTO_ORDER` whose *compiled* step peak (`jqlora.aot`) fits ``headroom × budget``,
    its peak, and one line per policy tried; full (the least memory) when none fits."""
    from jqlora import aot

    tried = []
    peak = 0
    for policy in AUTO_ORDER:
        peak = aot.compiled_peak(shape, cfg, gpu, policy)["peak"]
        tried.append(f"{policy} {peak / 1e9:.2f} GB")
        if peak <= headroom * budget:
            return policy, peak, tried
    return "full", peak, tried


def _compiled_auto(cfg: Any, shape: ModelConfig, axes: dict[str, int] | None, budget: float,
                   gpu: str | None) -> tuple[str, str] | None:
    """`resolve_remat` from compiled figures, or None where this step cannot be compiled for one device here."""
    import jax

    if axes is not None and any(int(v) != 1 for v in axes.values()):
        return None  # the compiled figure covers one device; a mesh keeps the analytic plan
    if gpu is None and jax.default_backend() != "gpu":
        return None
    policy, peak, tried = choose_remat_compiled(shape, cfg, budget, gpu)
    fits = "fits" if peak <= COMPILED_HEADROOM * budget else "does NOT fit"
    where = gpu or jax.devices()[0].device_kind
    return policy, (f"remat auto: {policy}, compiled peak {peak / 1e9:.2f} GB per device on {where} {fits} in "
                    f"{COMPILED_HEADROOM:.0%} of {budget / 1e9:.2f} GB (tried {', '.join(tried)})")


def resolve_remat(cfg: Any, shape: ModelConfig, axes: dict[str, int] | None = None,
                  budget: float | None = None, gpu: str | None = None) -> tuple[str, str]:
    """``train.remat`` with ``auto`` resolved, and a line saying why.

    On a GPU (or for a named ``gpu`` target, compiled deviceless) the choice comes from the compiled peak of the
    run's own step for each policy (`choose_remat_compiled`); elsewhere, and on a mesh of several devices, from the
    analytic plan (`choose_remat`)."""
    if cfg.train.remat != "auto":
        return cfg.train.remat, f"remat {cfg.train.remat} (from the config)"
    budget = budget if budget is not None else device_budget()
    if budget is None:
        return "full", "remat auto: the device does not report its memory (CPU), so full (the least memory)"
    compiled = _compiled_auto(cfg, shape, axes, budget, gpu)
    if compiled is not None:
        return compiled
    policy, p = choose_remat(shape, budget, **settings_from_config(cfg, axes))
    fits = "fits" if p.total <= HEADROOM * budget else "does NOT fit"
    return policy, (f"remat auto: {policy}, planned {p.total / 1e9:.2f} GB per device {fits} in {HEADROOM:.0%} of "
                    f"{budget / 1e9:.2f} GB (python -m jqlora.plan for the rows)")


# ---------------------------------------------------------------------------------------------------------------
# CLI

# Hugging Face hub ids (lower case) with the published shapes above; `--model` also takes the last part alone
# (a checkpoint directory's usual name) and a recipe's name (configs/<name>.yaml).
HUB_IDS: dict[str, str] = {
    **{f"meta-llama/{n}": "llama3-8b" for n in (
        "meta-llama-3-8b", "meta-llama-3-8b-instruct", "llama-3.1-8b", "llama-3.1-8b-instruct",
        "meta-llama-3.1-8b", "meta-llama-3.1-8b-instruct")},
    **{f"meta-llama/{n}": "llama3-70b" for n in (
        "meta-llama-3-70b", "meta-llama-3-70b-instruct", "llama-3.1-70b", "llama-3.1-70b-instruct",
        "meta-llama-3.1-70b", "meta-llama-3.1-70b-instruct", "llama-3.3-70b-instruct")},
    "mistralai/mistral-7b-v0.1": "mistral-7b", "mistralai/mistral-7b-instruct-v0.1": "mistral-7b",
    "mistralai/mistral-7b-v0.3": "mistral-7b-v0.3", "mistralai/mistral-7b-instruct-v0.3": "mistral-7b-v0.3",
    "qwen/qwen2.5-7b": "qwen2.5-7b", "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
}
# Mistral-7B v0.3 (the mistral-7b recipe's checkpoint): v0.1's shape with a 32768 vocabulary and no sliding window
_CLI_SHAPES = {"mistral-7b-v0.3": ModelConfig.from_hf({
    **{k: v for k, v in PUBLISHED["mistral-7b"].items() if k != "sliding_window"}, "vocab_size": 32768,
    "rope_theta": 1000000.0})}
_CLI_NAMES = {"mistral-7b-v0.3": "Mistral-7B-v0.3"}


def lookup_shape(name: str) -> tuple[ModelConfig, str] | None:
    """(shape, display name) for a built-in name, a hub id, a checkpoint directory's name or a recipe's name."""
    key = name.strip().rstrip("/").lower()
    if key in BUILTIN:
        return BUILTIN[key], NAMES[key]
    short = {hub.rsplit("/", 1)[-1]: v for hub, v in HUB_IDS.items()}
    found = HUB_IDS.get(key) or short.get(key.rsplit("/", 1)[-1])
    if found is None:
        from jqlora.config import REPO_ROOT

        recipe = REPO_ROOT / "configs" / f"{key}.yaml"
        if recipe.is_file() and key != "demo":
            from jqlora.config import load_config

            path = load_config(str(recipe), []).model.path or ""
            return lookup_shape(os.path.basename(path.rstrip("/"))) if path else None
        return None
    if found in BUILTIN:
        return BUILTIN[found], NAMES[found]
    return _CLI_SHAPES[found], _CLI_NAMES[found]


def _model_json(text: str) -> tuple[ModelConfig, str]:
    """--model-config: a config.json, its directory, or the JSON itself (``'{"model_type": "llama", ...}'``)."""
    import json

    if text.lstrip().startswith("{"):
        try:
            d = json.loads(text)
        except ValueError as e:
            raise _Usage(f"--model-config: not valid JSON ({e})") from None
        try:
            return ModelConfig.from_hf(d), "model"
        except (ValueError, TypeError, KeyError) as e:
            raise _Usage(f"--model-config: not a usable config ({e})") from None
    path = os.path.join(text, "config.json") if os.path.isdir(text) else text
    if not os.path.isfile(path):
        raise _Usage(f"--model-config {text}: no such file")
    return _model_config(path), os.path.basename(os.path.dirname(os.path.abspath(path)))



class _Usage(Exception):
    pass


def _resolve_axis(value: Any, name: str, devices: int, others: int) -> int:
    if value == "auto":
        if devices % others:
            raise _Usage(f"mesh.{name}=auto: {devices} devices do not divide by the other axes ({others})")
        return devices // others
    return int(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jqlora.plan", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help=f"a built-in shape ({', '.join(BUILTIN)}), a hub id such as "
                                     "meta-llama/Meta-Llama-3-8B, or a recipe's name (llama3-70b-fsdp2)")
    src.add_argument("--model-config", help="a Hugging Face config.json, its directory, or the JSON text itself")
    ap.add_argument("--config", help="a jqlora run config (YAML); overrides may follow. The shape comes from its "
                                     "model.path, or from --model / --model-config when that is not on this machine")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of --config")
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int, help="rows per device (default: 1, or a --config's train.batch_size split "
                                              "over its data × fsdp devices)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--fsdp", default=None)
    ap.add_argument("--tensor", default=None)
    ap.add_argument("--devices", type=int, default=None, help="device count for 'auto' mesh axes (default 1)")
    ap.add_argument("--remat", choices=REMATS + ("auto",))
    ap.add_argument("--memory", type=float, help="GB per device: say whether the plan fits (and pick remat auto)")
    ap.add_argument("--r", type=int)
    ap.add_argument("--dtype", choices=tuple(DTYPE_BYTES))
    ap.add_argument("--quant", choices=("nf4", "fp4", "none"))
    ap.add_argument("--dropout", type=float, help="LoRA dropout (default 0, or the --config's)")
    ap.add_argument("--compile", action="store_true", help="also compile the run's real train step (jqlora.aot) and "
                                                           "print the compiler's peak beside the plan")
    ap.add_argument("--gpu", default=None, help="with --compile: the target GPU (h100-sxm, h200, a100-80gb, l4), "
                                                "compiled deviceless; default: this machine's own device")
    args = ap.parse_args(argv)
    try:
        settings: dict[str, Any] = dict(seq=2048, batch=1, data=1, fsdp=1, tensor=1, remat="full", r=16,
                                        dtype="bfloat16", quant="nf4", double_quant=True, block_size=64,
                                        targets=LINEARS, dropout=0.0)
        if args.overrides and not args.config:
            raise _Usage(f"overrides {args.overrides} need --config")
        shape = None
        if args.config:
            from jqlora.config import ConfigError, load_config

            try:
                cfg = load_config(args.config, args.overrides)
            except ConfigError as e:
                raise _Usage(str(e)) from None
            model_path = cfg.model.path or ""
            path = os.path.join(model_path, "config.json")
            known = lookup_shape(os.path.basename(model_path.rstrip("/"))) if model_path else None
            if os.path.isfile(path):
                shape, name = _model_config(path), os.path.basename(model_path.rstrip("/"))
            elif not (args.model or args.model_config):
                if known is None:
                    raise _Usage(f"model.path {model_path or '(not set)'}: no config.json here and not a known "
                                 "model name; give the shape with --model or --model-config")
                shape, name = known  # the checkpoint is elsewhere: its published shape, by the directory's name
            settings.update(settings_from_config(cfg, {n: getattr(cfg.mesh, n) for n in ("data", "fsdp", "tensor")}),
                            remat=cfg.train.remat)
        if shape is None and args.model_config:
            shape, name = _model_json(args.model_config)
        elif shape is None:
            found = lookup_shape(args.model or "llama3-8b")
            if found is None:
                raise _Usage(f"--model {args.model}: unknown; expected one of {', '.join(BUILTIN)}, a hub id such as "
                             "meta-llama/Meta-Llama-3-8B, a recipe's name, or the shape with --model-config")
            shape, name = found
        for key in ("seq", "batch", "remat", "r", "dtype", "quant", "data", "fsdp", "tensor", "dropout"):
            if getattr(args, key) is not None:
                settings[key] = getattr(args, key)
        devices = args.devices or 1
        axes = {}
        for axis in ("data", "fsdp", "tensor"):
            v = settings[axis]
            axes[axis] = v if v == "auto" else int(v)
        fixed = math.prod(v for v in axes.values() if v != "auto")
        for axis, v in axes.items():
            if v == "auto":
                axes[axis] = _resolve_axis("auto", axis, devices, fixed)
        settings.update(axes)
        if args.config and args.batch is None:  # the recipe's global micro-batch, split over data × fsdp
            settings["batch"] = max(1, cfg.train.batch_size // (axes["data"] * axes["fsdp"]))
        if settings["quant"] == "none":
            settings["double_quant"] = False
        budget = args.memory * 1e9 if args.memory is not None else None
        if budget is None and args.compile and args.gpu is not None:
            from jqlora.aot import GPUS

            if args.gpu not in GPUS:
                raise _Usage(f"--gpu {args.gpu}: unknown; expected one of {', '.join(GPUS)}")
            budget = GPUS[args.gpu].memory_bytes
        auto = settings["remat"] == "auto"
        if auto:
            if budget is None:
                raise _Usage("remat auto picks by the device's memory: give it with --memory GB")
            settings.pop("remat")
            chosen, plan = choose_remat(shape, budget, name=name, **settings)
            print(f"remat auto -> {chosen} (the fastest of {', '.join(AUTO_ORDER)} whose plan fits "
                  f"{HEADROOM:.0%} of {budget / 1e9:.1f} GB)")
            settings["remat"] = chosen
        else:
            plan = memory_plan(shape, name=name, **settings)
    except _Usage as e:
        print(f"jqlora.plan: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"jqlora.plan: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(plan.table())
    if budget is not None:
        verdict = "fits" if plan.total <= HEADROOM * budget else "does NOT fit"
        print(f"{verdict}: {plan.total / 1e9:.2f} GB planned, {HEADROOM:.0%} of {budget / 1e9:.1f} GB = "
              f"{HEADROOM * budget / 1e9:.2f} GB usable per device")
    if args.compile:
        try:
            return _print_compiled(args, shape, name, settings, plan, budget, cfg if args.config else None, auto)
        except _Usage as e:
            print(f"jqlora.plan: {e}", file=sys.stderr)
            return 2
    return 0


def _on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def _compile_run_config(settings: dict[str, Any], cfg: Any | None) -> Any:
    """The run config whose step is compiled: the --config's (or the defaults), with the plan's settings."""
    import dataclasses as dc

    from jqlora.config import load_config

    cfg = cfg if cfg is not None else load_config(None, [])
    targets = settings["targets"]
    lora_targets = "all-linear" if tuple(targets) == tuple(LINEARS) else tuple(targets)
    return dc.replace(
        cfg, data=dc.replace(cfg.data, max_length=settings["seq"]),
        train=dc.replace(cfg.train, batch_size=settings["batch"]),
        lora=dc.replace(cfg.lora, r=settings["r"], targets=lora_targets, dropout=settings["dropout"]),
        model=dc.replace(cfg.model, dtype=settings["dtype"], quant=settings["quant"],
                         double_quant=settings["double_quant"], block_size=settings["block_size"]))


def _print_compiled(args, shape: ModelConfig, name: str, settings: dict[str, Any], plan: Plan,
                    budget: float | None, cfg: Any | None, auto: bool) -> int:
    """--compile: the compiler's peak of the run's step beside the analytic plan (one device)."""
    from jqlora import aot

    if any(int(settings[a]) != 1 for a in ("data", "fsdp", "tensor")):
        raise _Usage("--compile covers one device: use data=fsdp=tensor=1 (the analytic plan covers meshes)")
    if args.gpu is not None and args.gpu not in aot.GPUS:
        raise _Usage(f"--gpu {args.gpu}: unknown; expected one of {', '.join(aot.GPUS)}")
    run = _compile_run_config(settings, cfg)
    where = args.gpu or "this machine's device"
    remat = settings["remat"]
    try:
        if auto:
            remat, peak, tried = choose_remat_compiled(shape, run, budget, args.gpu)
            print(f"remat auto (compiled) -> {remat}: tried {', '.join(tried)}")
        attention = "cudnn" if args.gpu is not None or _on_gpu() else "xla"  # what the compiled step runs
        plan = memory_plan(shape, name=name, **{**settings, "remat": remat, "attention": attention})
        figures = aot.compiled_peak(shape, run, args.gpu, remat)
    except aot.AotError as e:
        raise _Usage(str(e)) from None
    peak = figures["peak"]
    print(f"compiled for {where} ({name}, remat={remat}): peak {peak / 1e9:.2f} GB = arguments "
          f"{figures['argument'] / 1e9:.2f} + temporaries {figures['temp'] / 1e9:.2f} + outputs "
          f"{figures['output'] / 1e9:.2f} - aliased {figures['alias'] / 1e9:.2f}; plan {plan.total / 1e9:.2f} GB "
          f"({(plan.total - peak) / peak:+.1%})")
    if budget is not None:
        verdict = "fits" if peak <= COMPILED_HEADROOM * budget else "does NOT fit"
        print(f"{verdict}: compiled peak {peak / 1e9:.2f} GB, {COMPILED_HEADROOM:.0%} of {budget / 1e9:.2f} GB = "
              f"{COMPILED_HEADROOM * budget / 1e9:.2f} GB usable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
