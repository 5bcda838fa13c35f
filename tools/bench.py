#!/usr/bin/env python
"""Time QLoRA training steps of jqlora, and of the PyTorch reference stack, on the machine this runs on.

    python tools/bench.py --model llama3-8b --seq 2048 --batch 1 --remat full --out results.json
    python tools/bench.py --model llama3-8b,mistral-7b,qwen2.5-7b --seq 512,2048,8192 --remat full,save_dots
    python tools/bench.py --model llama3-70b-4layers --layers 4 --seq 2048
    python tools/bench.py --model tiny --steps 3 --warmup 1          # CPU smoke test (jqlora + torch reference)

Models are the published config.json shapes of real checkpoints with random weights (normal · 0.02, bf16, made on
the host one tensor at a time and quantized on the way in by `from_hf_tensors`), so no checkpoint file is needed.
Every configuration is NF4 + double quantization (blocks of 64), bf16 compute, LoRA r=16 / alpha=32 on all seven
linear projections (float32 adapters), AdamW (+ global-norm clipping at 1.0) on the adapters only.

Each (implementation, model, seq, batch, remat) runs in its own subprocess, so device memory, the peak-memory
counter and allocator caches of one never leak into another (jax's allocator keeps what it grew).

Timing (tools follow ../.library/device/METHOD.md): `--warmup` steps first (compilation, autotuning, allocator
growth), then `--steps` steps, each timed on the host clock after the device has finished
(`jax.block_until_ready` on the new adapters, optimizer state and loss; `torch.cuda.synchronize()`); the median is
reported, every step time is in the JSON. Batches are random token ids (never zeros), rotated among several.

Throughput counts trained tokens: jqlora trains every position (loss_mask of ones, targets given), B·S per step;
the transformers reference shifts labels inside the model, B·(S-1) per step.

Model FLOPs per token (forward + backward; remat recomputation is not counted, it is not useful work):

    N      = L · (D·Nq·H + 2·D·Nkv·H + Nq·H·D + 3·D·F) + V·D        linear layers + lm_head (no biases, norms)
    linear = 2N (forward) + 2N (backward)                           frozen weights: only the input-gradient matmul,
                                                                    no weight gradient, hence 2N and not 4N
    attn   = L · (4·S·Nq·H forward + 8·S·Nq·H backward) / 2         QKᵀ and PV: 2·S·Nq·H each per token; the
           = 6 · L · S · Nq·H                                       backward is twice the forward; causal halves it
    flops_per_token = 4N + 6·L·S·Nq·H

LoRA adapter FLOPs (6 · r · Σ(in+out) per token, under 1% here) are left out, as the issue defines it.
MFU = flops_per_token · B · S / step time / peak, where peak is a measured bf16 matmul rate on the same device
(median over repeats of a large square `jnp.dot` in bf16, 8192 on a GPU, 1024 on a CPU, inputs rotated).

Peak memory is `jax.devices()[0].memory_stats()["peak_bytes_in_use"]` (with XLA_PYTHON_CLIENT_PREALLOCATE=false,
set here before jax is imported) over the whole worker (loading and quantization included), and
`torch.cuda.max_memory_allocated()` over the whole worker for the reference; "n/a" on a CPU.

The reference is transformers + bitsandbytes (Linear4bit, nf4, double quant, bf16 compute) + peft LoRA, SDPA
attention, gradient checkpointing (non-reentrant; off when --remat none), torch AdamW (fused on CUDA) on the LoRA
parameters; the base model is not passed through peft's prepare_model_for_kbit_training, which would upcast
embeddings, norms and lm_head to float32 (jqlora keeps them in bf16, as does unsloth). Without CUDA only the tiny
shape runs the reference (bitsandbytes' CPU 4-bit path is far too slow for 7B shapes). unsloth is tried by import
and its availability reported; it is not run.

The markdown table has one row per configuration; "jq/ref" is reference step time / jqlora step time at equal
tokens per step, i.e. jqlora's throughput over the reference's (> 1: jqlora is faster).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from jqlora.planning.model_shapes import PUBLISHED  # noqa: E402

LORA_R, LORA_ALPHA = 16, 32.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0
INIT_STD = 0.02

# Published config.json values live in jqlora.planning.model_shapes (one table for the plan and the benchmark).
MODELS: dict[str, dict] = {
    **{k: v for k, v in PUBLISHED.items() if k != "llama3-70b"},
    # meta-llama/Meta-Llama-3-70B, only the first --layers layers (default 4)
    "llama3-70b-4layers": {**PUBLISHED["llama3-70b"], "num_hidden_layers": 4},
    "tiny": {  # a smoke-test shape, Llama layout
        "model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu",
    },
}
REMATS = ("none", "full", "save_dots", "save_dots_no_batch", "offload")


class BenchError(Exception):
    """A user mistake on the command line: one line, exit code 2."""


def hf_config(model: str, layers: int | None = None) -> dict:
    if model not in MODELS:
        raise BenchError(f"--model {model!r}: expected one of {', '.join(MODELS)}")
    d = dict(MODELS[model])
    if layers is not None:
        if layers < 1:
            raise BenchError(f"--layers {layers}: must be >= 1")
        d["num_hidden_layers"] = layers
    return d


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def flops_per_token(cfg, seq: int) -> dict:
    """Model FLOPs per token of one training step (see the module docstring); ``cfg`` a jqlora ModelConfig."""
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = D * q + 2 * D * kv + q * D + 3 * D * F
    if getattr(cfg, "num_experts", None):  # MoE: the router and the top-k experts each token visits
        per_layer = D * q + 2 * D * kv + q * D + D * cfg.num_experts + 3 * D * F * cfg.num_experts_per_tok
    n_linear = L * per_layer + V * D
    linear = 4 * n_linear
    attention = 6 * L * seq * q
    return {"n_linear": n_linear, "linear": linear, "attention": attention, "total": linear + attention}


# ---------------------------------------------------------------------------------------------------------------
# jqlora worker


def random_tensor(shape, seed: int, std: float = INIT_STD):
    """normal · std in bf16 (numpy, host), rounded to nearest-even from float32."""
    import numpy as np
    from ml_dtypes import bfloat16

    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= std
    return a.astype(bfloat16)


def random_getter(cfg, seed: int = 0, init: str = "host"):
    """A `from_hf_tensors` getter making each Hugging Face tensor on the fly (norm weights are ones).

    ``init="host"``: numpy on the host (about a minute per 10⁹ values on a slow core); ``"device"``: `jax.random` on
    the default device (seconds for an 8B model on a GPU; the tensor still passes through the host once).
    """
    import numpy as np
    from ml_dtypes import bfloat16

    from jqlora.models.llama import hf_key_table

    table = {e.key: (i, e) for i, e in enumerate(hf_key_table(cfg))}

    def get(key: str):
        i, entry = table[key]
        if entry.kind == "norm":
            return np.ones(entry.shape, bfloat16)
        if init == "device":
            import jax
            import jax.numpy as jnp

            x = jax.random.normal(jax.random.key(seed * 100_003 + i), entry.shape, jnp.float32) * INIT_STD
            return x.astype(jnp.bfloat16)
        return random_tensor(entry.shape, seed * 100_003 + i)

    return get


def matmul_peak(n: int, reps: int = 10, repeats: int = 5) -> float:
    """Measured bf16 matmul rate (FLOP/s): median over ``repeats`` of ``reps`` back-to-back ``n³`` dots."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(1), 4)
    xs = [jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys]
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(xs[0], xs[1]))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [dot(xs[i % 4], xs[(i + 1) % 4]) for i in range(reps)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / reps)
    return 2.0 * n**3 / statistics.median(times)


def _device_peak_bytes():
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def run_jqlora(hf: dict, seq: int, batch: int, remat: str, steps: int, warmup: int, dropout: float,
               seed: int, init: str = "host") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jqlora.training import optim
    from jqlora.config import TrainConfig
    from jqlora.lora import LoraConfig
    from jqlora.models.llama import ModelConfig, from_hf_tensors
    from jqlora.lora import SplitModel
    from jqlora.training.step import make_train_step

    cfg = ModelConfig.from_hf(hf)
    t0 = time.perf_counter()
    model = from_hf_tensors(cfg, random_getter(cfg, seed, init),
                            lora=LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=dropout, targets=LORA_TARGETS),
                            quant="nf4", double_quant=True, block_size=64, dtype="bfloat16", lora_dtype="float32",
                            seed=seed, remat=remat)
    split = SplitModel.of(model)
    jax.block_until_ready(split.frozen)
    load_s = time.perf_counter() - t0
    del model

    total = warmup + steps
    tc = TrainConfig(batch_size=batch, grad_accum_steps=1, max_steps=total, learning_rate=LEARNING_RATE,
                     lr_schedule="constant", warmup_steps=0, max_grad_norm=MAX_GRAD_NORM, remat=_cfg_remat(remat))
    tx, _ = optim.make_optimizer(tc, total)
    lora = split.lora
    opt_state = tx.init(lora)
    step = make_train_step(split, tx)

    rng = np.random.default_rng(seed + 1)
    batches = []
    for _ in range(min(4, total)):
        ids = rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
        batches.append(jax.device_put({
            "input_ids": ids,
            "targets": np.roll(ids, -1, axis=1),
            "loss_mask": np.ones((batch, seq), np.int32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        }))
    tokens = batch * seq
    grad_scale = jnp.float32(1.0 / tokens)
    key = jax.random.key(seed)
    times, losses = [], []
    for i in range(total):
        t = time.perf_counter()
        lora, opt_state, loss_sum = step(lora, opt_state, split.frozen, batches[i % len(batches)],
                                         jax.random.fold_in(key, i), grad_scale)
        jax.block_until_ready((lora, opt_state, loss_sum))
        times.append(time.perf_counter() - t)
        losses.append(float(loss_sum) / tokens)
    return {
        "impl": "jqlora",
        "load_s": load_s,
        "first_step_s": times[0],
        "step_s": times[warmup:],
        "tokens_per_step": tokens,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_bytes": _device_peak_bytes(),
        "device": _jax_device_name(),
        "matmul_peak_flops": matmul_peak(1024 if jax.default_backend() == "cpu" else 8192),
    }


def _cfg_remat(remat: str) -> str:
    # TrainConfig accepts a subset of the model's remat policies; the model gets the policy directly.
    from jqlora.config import REMAT_POLICIES

    return remat if remat in REMAT_POLICIES else "full"


def _jax_device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')}"


# ---------------------------------------------------------------------------------------------------------------
# PyTorch reference worker


def reference_skip_reason(model: str) -> str | None:
    """Why the torch reference cannot run here (None: it can); imports torch, so call it in the worker."""
    for mod in ("torch", "bitsandbytes", "peft", "transformers"):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed"
    import torch

    if not torch.cuda.is_available() and model != "tiny":
        return "CUDA unavailable: the torch reference runs 7B-class shapes only on a GPU (CPU: tiny only)"
    return None


def try_unsloth() -> str:
    """Whether unsloth imports here (it is reported, not run)."""
    try:
        import unsloth
    except Exception as e:  # noqa: BLE001 - unsloth needs a GPU and its own stack; any failure means unavailable
        first = str(e).splitlines()[0] if str(e) else ""
        return f"unavailable ({type(e).__name__}: {first})"
    return f"available ({getattr(unsloth, '__version__', '?')}; not run)"


def build_torch_model(hf: dict, device, dtype, seed: int):
    """transformers model of ``hf`` with random bitsandbytes NF4 (double-quant) linears, built on the meta device."""
    import bitsandbytes as bnb
    import torch
    import transformers

    d = dict(hf)
    model_type = d.pop("model_type")
    tcfg = transformers.AutoConfig.for_model(model_type, **d)
    tcfg.use_cache = False
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tcfg, dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).mul_(INIT_STD)  # no float32 copy

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                    compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                    quant_storage=torch.uint8, device="meta")
            new.weight = bnb.nn.Params4bit(randn(module.out_features, module.in_features), requires_grad=False,
                                           compress_statistics=True, quant_type="nf4", blocksize=64).to(device)
            if module.bias is not None:
                new.bias = torch.nn.Parameter(randn(module.out_features), requires_grad=False)
            parent_name, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), child, new)
    for name, p in list(model.named_parameters()):
        if p.device.type != "meta":
            continue
        value = torch.ones(p.shape, dtype=dtype, device=device) if p.ndim == 1 else randn(*p.shape)
        module_name, pname = name.rsplit(".", 1)
        setattr(model.get_submodule(module_name), pname, torch.nn.Parameter(value, requires_grad=False))
    with torch.device(device):  # rotary inverse frequencies are buffers computed at init
        for name, module in list(model.named_modules()):
            if name.endswith("rotary_emb"):
                parent_name, child = name.rsplit(".", 1)
                setattr(model.get_submodule(parent_name), child, type(module)(config=tcfg))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    assert not left, f"tensors left on the meta device: {left[:5]}"
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; peft dispatches on it
    return model


def run_torch(hf: dict, seq: int, batch: int, remat: str, steps: int, warmup: int, dropout: float,
              seed: int, model_name: str = "", init: str = "host") -> dict:
    why = reference_skip_reason(model_name)
    if why is not None:
        return {"impl": "torch+bnb+peft", "skipped": why, "unsloth": try_unsloth()}
    import peft
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = build_torch_model(hf, device, dtype, seed)
    if remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=dropout,
                                                       target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            **({"fused": True} if cuda else {}))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed + 1)
    total = warmup + steps
    batches = [torch.randint(0, hf["vocab_size"], (batch, seq), generator=gen).to(device) for _ in range(min(4, total))]
    times, losses = [], []
    for i in range(total):
        ids = batches[i % len(batches)]
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if MAX_GRAD_NORM > 0:
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())  # waits for the device
        sync()
        times.append(time.perf_counter() - t)
        losses.append(loss)
    return {
        "impl": "torch+bnb+peft",
        "load_s": load_s,
        "first_step_s": times[0],
        "step_s": times[warmup:],
        "tokens_per_step": batch * (seq - 1),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "device": f"cuda:{torch.cuda.get_device_name()}" if cuda else f"cpu:{platform.processor() or 'cpu'}",
        "gradient_checkpointing": remat != "none",
        "unsloth": try_unsloth(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Driver


def _worker(args) -> int:
    spec = json.loads(args.worker_spec)
    if spec.pop("impl") == "jqlora":
        spec.pop("model_name", None)
        fn = run_jqlora
    else:
        fn = run_torch
    result = fn(**spec)
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


def _run_worker(impl: str, spec: dict, timeout: float | None) -> dict:
    payload = json.dumps({"impl": impl, **spec})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-spec", payload]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT "):])
            result["worker_wall_s"] = time.perf_counter() - t0
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"impl": impl, "error": f"worker exited {proc.returncode}: " + " | ".join(tail)}


def _versions() -> dict:
    """Installed versions, read from package metadata (importing torch here would cost every run seconds)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "bitsandbytes", "peft", "unsloth"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _stats(row: dict, flops: dict, seq: int, batch: int, peak_flops: float | None) -> dict:
    if "error" in row or "skipped" in row:
        return row
    med = statistics.median(row["step_s"])
    row["step_ms_median"] = med * 1e3
    row["step_ms_min"] = min(row["step_s"]) * 1e3
    row["step_ms_max"] = max(row["step_s"]) * 1e3
    row["tokens_per_s"] = row["tokens_per_step"] / med
    row["flops_per_step"] = flops["total"] * batch * seq
    row["achieved_flops"] = row["flops_per_step"] / med
    row["mfu"] = row["achieved_flops"] / peak_flops if peak_flops else None
    return row


def _fmt(x, spec: str, na: str = "n/a") -> str:
    return na if x is None else format(x, spec)


def table(results: list[dict]) -> str:
    head = ("| model | seq | batch | remat | step ms | tokens/s | peak GB | MFU | ref step ms | ref tokens/s "
            "| ref peak GB | jq/ref |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        jq, ref = r["jqlora"], r["reference"]
        if "error" in jq:
            cells = ["error"] * 4
        else:
            mfu = _fmt(jq["mfu"] and 100 * jq["mfu"], ".1f") + ("%" if jq["mfu"] else "")
            cells = [f"{jq['step_ms_median']:.1f}", f"{jq['tokens_per_s']:.0f}",
                     _fmt(jq["peak_bytes"] and jq["peak_bytes"] / 2**30, ".2f"), mfu]
        if "step_ms_median" in ref:
            rcells = [f"{ref['step_ms_median']:.1f}", f"{ref['tokens_per_s']:.0f}",
                      _fmt(ref["peak_bytes"] and ref["peak_bytes"] / 2**30, ".2f")]
            ratio = (f"{ref['step_ms_median'] / jq['step_ms_median']:.2f}x" if "step_ms_median" in jq else "n/a")
        else:
            rcells, ratio = ["skipped" if "skipped" in ref else "error", "-", "-"], "n/a"
        c = r["config"]
        lines.append("| " + " | ".join([c["model"], str(c["seq"]), str(c["batch"]), c["remat"], *cells, *rcells,
                                        ratio]) + " |")
    return "\n".join(lines)


def _csv(text: str, kind=str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--layers", type=int, default=None, help="run only this many layers (default: the checkpoint's)")
    p.add_argument("--seq", default=None, help="comma-separated sequence lengths (512, 2048, 8192; default 512 for "
                                               "tiny, 2048 otherwise)")
    p.add_argument("--batch", default="1", help="comma-separated micro-batch sizes")
    p.add_argument("--remat", default="full", help=f"comma-separated remat policies: {', '.join(REMATS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", choices=("torch", "none"), default="torch")
    p.add_argument("--init", choices=("host", "device"), default="host",
                   help="where jqlora's random weights are drawn: numpy on the host, or jax.random on the device "
                        "(much faster for 7B+ shapes on a GPU)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    p.add_argument("--out", default=None, help="write the JSON results here")
    p.add_argument("--worker-spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_spec is not None:
        return _worker(args)

    try:
        models = _csv(args.model)
        for m in models:
            hf_config(m, args.layers)
        seqs = _csv(args.seq, int) if args.seq else None
        batches = _csv(args.batch, int)
        remats = _csv(args.remat)
        bad = [r for r in remats if r not in REMATS]
        if bad:
            raise BenchError(f"--remat {bad[0]!r}: expected one of {', '.join(REMATS)}")
        if any(s < 2 for s in seqs or []) or any(b < 1 for b in batches):
            raise BenchError("--seq must be >= 2 and --batch >= 1")
        if args.steps < 1 or args.warmup < 0:
            raise BenchError("--steps must be >= 1 and --warmup >= 0")
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2

    from jqlora.models.llama import ModelConfig

    versions = _versions()
    print(f"# jqlora bench {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}  "
          + "  ".join(f"{k}={v}" for k, v in versions.items()), flush=True)
    unsloth_note = None

    results = []
    for model in models:
        hf = hf_config(model, args.layers)
        cfg = ModelConfig.from_hf(hf)
        for seq in seqs or [512 if model == "tiny" else 2048]:
            for batch in batches:
                for remat in remats:
                    spec = {"hf": hf, "seq": seq, "batch": batch, "remat": remat, "steps": args.steps,
                            "warmup": args.warmup, "dropout": args.lora_dropout, "seed": args.seed,
                            "model_name": model, "init": args.init}
                    label = f"{model} seq={seq} batch={batch} remat={remat}"
                    print(f"# {label}: jqlora ...", flush=True)
                    jq = _run_worker("jqlora", spec, args.timeout)
                    if args.reference == "none":
                        ref = {"impl": "torch+bnb+peft", "skipped": "--reference none"}
                    else:
                        print(f"# {label}: torch reference ...", flush=True)
                        ref = _run_worker("torch", spec, args.timeout)
                    if ref.get("unsloth") and unsloth_note is None:
                        unsloth_note = ref["unsloth"]
                        print(f"# unsloth: {unsloth_note}", flush=True)
                    if "skipped" in ref:
                        print(f"# {label}: torch reference skipped: {ref['skipped']}", flush=True)
                    for r in (jq, ref):
                        if "error" in r:
                            print(f"# {label}: {r['impl']} failed: {r['error']}", flush=True)
                    results.append({
                        "config": {"model": model, "seq": seq, "batch": batch, "remat": remat,
                                   "layers": cfg.num_hidden_layers, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
                                   "lora_dropout": args.lora_dropout, "quant": "nf4+double_quant", "dtype": "bfloat16"},
                        "flops_per_token": flops_per_token(cfg, seq),
                        "jqlora": jq,
                        "reference": ref,
                    })

    # One peak for every row: the best bf16 matmul rate any worker measured on this device.
    peaks = [r["jqlora"]["matmul_peak_flops"] for r in results if "matmul_peak_flops" in r["jqlora"]]
    for r in results:
        c = r["config"]
        for k in ("jqlora", "reference"):
            _stats(r[k], r["flops_per_token"], c["seq"], c["batch"], max(peaks) if peaks else None)
        jq, ref = r["jqlora"], r["reference"]
        r["ref_ms_over_jq_ms"] = (ref["step_ms_median"] / jq["step_ms_median"]
                                  if "step_ms_median" in ref and "step_ms_median" in jq else None)
    md = table(results)
    print()
    print(md, flush=True)
    device = next((r["jqlora"]["device"] for r in results if "device" in r["jqlora"]), None)
    print(f"\ndevice {device}; measured bf16 matmul peak "
          + (f"{max(peaks) / 1e12:.2f} TFLOP/s" if peaks else "n/a")
          + "; jq/ref = reference step ms / jqlora step ms (> 1: jqlora faster)")
    if args.out:
        doc = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device,
            "host": platform.node(),
            "versions": versions,
            "unsloth": unsloth_note or ("not installed" if versions["unsloth"] is None else "installed, not tried"),
            "matmul_peak_flops": max(peaks) if peaks else None,
            "steps": args.steps,
            "warmup": args.warmup,
            "results": results,
            "rows": [r[k] | {"config": r["config"]} for r in results for k in ("jqlora", "reference")],
            "table": md,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")
    failed = any("error" in r[k] for r in results for k in ("jqlora", "reference"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
