"""Tiny random Hugging Face models made by transformers at test time (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": 16}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 32}),
}


def make_model(path: Path, family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0,
               save_kwargs: dict | None = None, **overrides) -> Path:
    """Save a tiny random ``family`` model to ``path``; returns ``path``."""
    cls, extra = FAMILIES[family]
    config = cls(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # break symmetry in norms so a wrong mapping shows up
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    save_kwargs = dict(save_kwargs or {})
    as_bin = save_kwargs.pop("safe_serialization", True) is False
    model.save_pretrained(path, **save_kwargs)
    if as_bin:  # transformers 5 writes only safetensors: rewrite each shard as a PyTorch pickle
        _to_bin(Path(path))
    return Path(path)


def _to_bin(path: Path) -> None:
    import json

    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    shards = sorted(path.glob("*.safetensors"))
    names = {}
    for i, shard in enumerate(shards):
        name = "pytorch_model.bin" if len(shards) == 1 else f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(load_file(str(shard)), path / name)
        names[shard.name] = name
        shard.unlink()
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: names[v] for k, v in data["weight_map"].items()}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps(data))
        index.unlink()


# Families beyond Llama: configs that exercise what differs (windows shorter than the test sequences, soft-caps that
# bind, a second RoPE), with every kernel width a multiple of 64 so bitsandbytes' CPU 4-bit path is a valid oracle.
FAMILY_CONFIGS = {
    "gemma2": (transformers.Gemma2Config, dict(
        head_dim=16, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0)),
    "gemma3": (transformers.Gemma3TextConfig, dict(
        head_dim=16, num_hidden_layers=3, sliding_window=6, sliding_window_pattern=3, query_pre_attn_scalar=24,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}})),
    # Phi-3.5 / Phi-4-mini: fused qkv_proj / gate_up_proj, LongRoPE past its original 16 positions, partial rotary
    "phi3": (transformers.Phi3Config, dict(
        head_dim=16, sliding_window=12, max_position_embeddings=64, original_max_position_embeddings=16,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.3, 2.1, 3.7], "long_factor": [1.1, 2.5, 6.0, 17.0]})),
}


def make_family_model(path: Path, family: str, seed: int = 0, **overrides):
    """A tiny random ``family`` model (`FAMILY_CONFIGS` or `FAMILIES`, eager attention, float32) with weights scaled so
    every term matters (kernels ~ 1/sqrt(fan-in); norm weights off their neutral value), saved to ``path``.
    Returns (the transformers model, ``path``)."""
    cls, extra = {**FAMILIES, **FAMILY_CONFIGS}[family]
    config = cls(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    neutral = 0.0 if family.startswith("gemma") else 1.0  # Gemma norms scale by (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(neutral + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    return model, Path(path)


# Sparse MoE (Mixtral, Qwen3-MoE): 4 experts, 2 per token, widths multiples of 64 (bitsandbytes' CPU path)
MOE_CONFIGS = {
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=12)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)),
}


def make_moe_model(path: Path, family: str, seed: int = 0, **overrides):
    """A tiny random MoE ``family`` model (`MOE_CONFIGS`, eager attention, float32), kernels ~ 1/sqrt(fan-in) and
    norms off 1, saved to ``path``. Returns (the transformers model, ``path``)."""
    cls, extra = MOE_CONFIGS[family]
    config = cls(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    return model, Path(path)


# ----------------------------------------------------------------------------------------------------------------
# Helpers the family tests share (tests/test_families.py, test_moe.py, test_moe_aux.py)


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x).long()).logits.float().numpy()


def jq_logits(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(x)))


def randomize_lora(model, seed: int, scale: float = 0.2) -> None:
    """Nonzero random A and B in every adapted module (a fresh adapter has B = 0 and would hide transposes)."""
    from flax import nnx

    from jqlora.lora import LoraLinear

    key = jax.random.key(seed)
    for i, (_, m) in enumerate(nnx.iter_modules(model)):
        if isinstance(m, LoraLinear) and m.lora_a is not None:
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            m.lora_a.set_value(scale * jax.random.normal(ka, m.lora_a.shape, m.lora_a.dtype))
            m.lora_b.set_value(scale * jax.random.normal(kb, m.lora_b.shape, m.lora_b.dtype))


def bnb_config() -> transformers.BitsAndBytesConfig:
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)


def bnb_model(src) -> torch.nn.Module:
    """transformers + bitsandbytes; train(): bitsandbytes' exact CPU path (the tiny configs have no dropout)."""
    return transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb_config(),
                                                             dtype=torch.float32, attn_implementation="eager").train()


# ----------------------------------------------------------------------------------------------------------------
# A float64 oracle of NF4 + double quantization in bitsandbytes' flat-block layout, written from the format (not from
# jqlora.quant): for widths that are not multiples of 64, where bitsandbytes' own CPU 4-bit matmul is wrong.


def nf4_dq_float64(w: np.ndarray, block: int = 64, nested_block: int = 256) -> np.ndarray:
    """``w`` [out, in] quantized to NF4 with double quantization and dequantized, in float64.

    The weight is flattened row-major into blocks of ``block`` (the last one partial); per block absmax a and
    code = nearest NF4 entry to clip(w · (1/a), -1, 1) in float32 (the partial block divides by a), a value on a
    float32 midpoint taking the lower entry, as bitsandbytes buckets it. Double quantization as bitsandbytes does
    it on a GPU: c = torch's float32 mean of a, then a - c in blocks of ``nested_block`` coded by its CUDA kernel's
    rule (`dq_cuda_oracle`, float32 arithmetic). Value = NF4[code] · (D[q] · m + c) in float64. The codebooks are
    bitsandbytes'."""
    import bitsandbytes.functional as bnbf
    import dq_cuda_oracle

    nf4 = bnbf.get_4bit_type("nf4", device="cpu").numpy().astype(np.float32)
    dyn = bnbf.create_dynamic_map(signed=True).numpy().astype(np.float64)
    flat = np.asarray(w, np.float32).reshape(-1)
    full = flat.size - flat.size % block
    rows = [flat[i:i + block] for i in range(0, flat.size, block)]
    absmax = np.array([np.abs(r).max() for r in rows], np.float32)
    scaled = np.concatenate([np.clip(r * (np.float32(1) / a) if i * block < full else r / a, -1, 1)
                             for i, (r, a) in enumerate(zip(rows, absmax))]).astype(np.float32)
    mid = ((nf4[:-1] + nf4[1:]) / np.float32(2)).astype(np.float32)
    codes = np.searchsorted(mid, scaled, side="left")  # mid[i-1] < s <= mid[i] -> i
    c = torch.from_numpy(absmax).mean().numpy()  # (float32, as bitsandbytes' quantize_4bit takes it)
    q, m = dq_cuda_oracle.double_quantize(absmax, c, dyn.astype(np.float32))
    scale = dyn[q] * np.repeat(m.astype(np.float64), nested_block)[: q.size] + np.float64(c)
    return (nf4[codes].astype(np.float64) * np.repeat(scale, block)[: flat.size]).reshape(np.shape(w))


def nf4_dq_float64_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (transformers) in float64 with every kernel jqlora stores in 4-bit replaced by `nf4_dq_float64` of
    its float32 weight: each ``nn.Linear`` but ``lm_head``, and each expert's gate, up and down kernel of a fused
    3-D ``experts.gate_up_proj`` [E, 2F, D] / ``down_proj`` [E, D, F] (the checkpoint's per-expert w1 / w3 / w2).
    The MoE router stays in float, as bitsandbytes leaves it."""
    model = model.to(torch.float64)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.copy_(torch.from_numpy(nf4_dq_float64(mod.weight.float().numpy())))
            elif hasattr(mod, "gate_up_proj") and isinstance(mod.gate_up_proj, torch.nn.Parameter):
                F = mod.gate_up_proj.shape[1] // 2
                for e in range(mod.gate_up_proj.shape[0]):
                    for rows in (slice(0, F), slice(F, 2 * F)):
                        w = mod.gate_up_proj[e, rows].float().numpy()
                        mod.gate_up_proj[e, rows] = torch.from_numpy(nf4_dq_float64(w))
                    mod.down_proj[e] = torch.from_numpy(nf4_dq_float64(mod.down_proj[e].float().numpy()))
    return model


def moe_block_dots(E: int, k: int, T: int, D: int, F: int, lora=None) -> list[tuple[list[int], list[int]]]:
    """``(output dims, contracted dims)`` of every dot in the compiled forward HLO of one float32 Mixtral-shaped MoE
    block (``lora``: a `jqlora.lora.LoraConfig`, e.g. with expert adapters) on T tokens; a dot's FLOPs are
    2 · prod(output) · prod(contracted)."""
    import re

    from flax import nnx

    from jqlora.lora import QuantSpec
    from jqlora.models import moe
    from jqlora.models.config import ModelConfig

    cfg = ModelConfig(model_type="mixtral", vocab_size=8, hidden_size=D, intermediate_size=F, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=D, num_experts=E,
                      num_experts_per_tok=k)
    block = moe.MoE(cfg, QuantSpec("none"), jnp.float32, jnp.float32, nnx.Rngs(0), *([lora] if lora else []))
    graphdef, state = nnx.split(block)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    hlo = fn.lower(state, jax.ShapeDtypeStruct((1, T, D), jnp.float32)).compile().as_text()
    shapes, dots = {}, []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = \w+\[([\d,]*)\]", line)
        if m:
            shapes[m.group(1)] = [int(d) for d in m.group(2).split(",") if d]
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?[\w.-]+ = \w+\[([\d,]*)\][^=]*? dot\(%?([\w.-]+), %?([\w.-]+)\).*"
                     r"lhs_contracting_dims=\{([\d,]*)\}", line)
        if m:
            out = [int(d) for d in m.group(1).split(",") if d]
            dots.append((out, [shapes[m.group(2)][int(d)] for d in m.group(4).split(",") if d]))
    return dots
