#!/usr/bin/env python
"""The memory and speed cost of DoRA (and LoRA+) on jqlora's compiled train step, against plain QLoRA.

    python tools/dora_cost.py                                  # a 1024-wide, 2-layer Llama shape, seq 512 (CPU)
    python tools/dora_cost.py --model llama3-8b --layers 2 --seq 2048 --remat full --out dora.json   # a GPU

Each variant (lora, dora, loraplus) builds the same random NF4 model (tools/bench.py's random weights, bf16 compute,
r=16 on all seven projections), compiles `jqlora.training.step.make_train_step`, and reports XLA's compiled memory analysis
(argument, output, temporary bytes: what the step needs besides the model) and the median of `--steps` timed steps
after `--warmup` (host clock after `jax.block_until_ready`). DoRA computes ‖W + s·BA‖ per output row from the
dequantized kernel in every forward pass (so once more per layer under remat), and trains one more vector per module.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench  # noqa: E402  (tools/bench.py: model shapes and random weights)

MODELS = {**bench.MODELS, "cpu-1k": {**bench.MODELS["tiny"], "vocab_size": 8192, "hidden_size": 1024,
                                     "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4}}
VARIANTS = ("lora", "dora", "loraplus")


def measure(hf: dict, variant: str, seq: int, batch: int, remat: str, steps: int, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jqlora.training import optim
    from jqlora.config import TrainConfig
    from jqlora.lora import LoraConfig, count_params
    from jqlora.models.llama import ModelConfig, from_hf_tensors
    from jqlora.lora import SplitModel
    from jqlora.training.step import make_train_step

    cfg = ModelConfig.from_hf(hf)
    lora = LoraConfig(r=bench.LORA_R, alpha=bench.LORA_ALPHA, targets=bench.LORA_TARGETS, dora=variant == "dora")
    model = from_hf_tensors(cfg, bench.random_getter(cfg, 0), lora=lora, quant="nf4", double_quant=True,
                            block_size=64, dtype="bfloat16", lora_dtype="float32", seed=0, remat=remat)
    split = SplitModel.of(model)
    del model
    tc = TrainConfig(batch_size=batch, grad_accum_steps=1, max_steps=steps + warmup, learning_rate=1e-4,
                     lr_schedule="constant", warmup_steps=0, remat=remat if remat != "none" else "none")
    tx, _ = optim.make_optimizer(tc, steps + warmup, 4.0 if variant == "loraplus" else None)
    opt_state = tx.init(split.lora)
    step = make_train_step(split, tx)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
    data = jax.device_put({"input_ids": ids, "targets": np.roll(ids, -1, axis=1),
                           "loss_mask": np.ones((batch, seq), np.int32), "segment_ids": np.ones((batch, seq), np.int32),
                           "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()})
    scale, key = jnp.float32(1.0 / (batch * seq)), jax.random.key(0)
    mem = step.lower(split.lora, opt_state, split.frozen, data, key, scale).compile().memory_analysis()
    lora_params = split.lora
    times = []
    for i in range(steps + warmup):
        t = time.perf_counter()
        lora_params, opt_state, loss = step(lora_params, opt_state, split.frozen, data, key, scale)
        jax.block_until_ready((lora_params, opt_state, loss))
        times.append(time.perf_counter() - t)
    return {"variant": variant, "trained_params": count_params(lora_params),
            "temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes), "step_s_median": statistics.median(times[warmup:]),
            "step_s": times[warmup:], "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cpu-1k", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None, help="run only this many layers")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--remat", default="full", choices=bench.REMATS[:4])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--out", default=None, help="write the JSON results here")
    args = p.parse_args(argv)
    hf = dict(MODELS[args.model])
    if args.layers:
        hf["num_hidden_layers"] = args.layers
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"dora_cost: --variants: unknown {bad[0]!r} (expected {', '.join(VARIANTS)})", file=sys.stderr)
        return 2
    rows = [measure(hf, v, args.seq, args.batch, args.remat, args.steps, args.warmup) for v in variants]
    base = next((r for r in rows if r["variant"] == "lora"), rows[0])
    print(f"{args.model} L={hf['num_hidden_layers']} seq={args.seq} batch={args.batch} remat={args.remat} "
          f"on {rows[0]['device']} ({rows[0]['backend']})")
    print("| variant | trained params | temp MiB | step s (median) | step / lora |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['trained_params']:,} | {r['temp_bytes'] / 2**20:.1f} | "
              f"{r['step_s_median']:.3f} | {r['step_s_median'] / base['step_s_median']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
