#!/usr/bin/env python
"""The compiled cost of per-layer LoRA ranks (padded to the largest rank with a frozen mask, `jqlora.lora`) against
uniform ranks, and of unstacking the layers (what per-layer ranks would need without the padding).

    python tools/rank_pattern_cost.py                        # a 1024-wide, 8-layer Llama shape, seq 512 (CPU)
    python tools/rank_pattern_cost.py --layers 16 --out cost.json

Every variant compiles `jqlora.training.step.make_train_step` for the same abstract NF4 model (bf16 compute, all seven
projections adapted; shapes only, nothing is run) and reports XLA's cost analysis (flops, bytes accessed), memory
analysis (temporary and argument bytes) and the compile time. XLA's cost analysis counts a scanned layer body once,
so the scanned rows compare one layer's step work, the unrolled row the whole stack's:

- ``uniform-rmax``: r = 16 in every layer (what the padded adapter stores);
- ``padded``: ranks 4 / 8 / 16 cycling over the layers, stored at 16 with the mask and a per-layer scaling;
- ``alphas``: r = 16 everywhere, alpha by layer (the per-layer scaling only, no mask);
- ``uniform-rmin``: r = 4 everywhere (a lower bound on the adapter work of any per-layer split);
- ``unrolled-rmax``: uniform r = 16 with the layers unrolled (`scan_layers=False`): the compile-time and code-size
  price that unstacking (a separate rank per layer module) would pay at least, besides its own per-layer shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPE = dict(model_type="llama", vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)
RANKS = (4, 8, 16)


def lora_config(variant: str, layers: int):
    from jqlora.lora import LoraConfig

    base = dict(r=16, alpha=32, targets="all-linear")
    if variant == "padded":
        names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
        pattern = {f"model.layers.{i}.{n}": RANKS[i % len(RANKS)] for i in range(layers) for n in names}
        return LoraConfig(**base, rank_pattern=pattern)
    if variant == "alphas":
        return LoraConfig(**base, alpha_pattern={f"model.layers.{i}.self_attn.q_proj": 8 + i for i in range(layers)})
    if variant == "uniform-rmin":
        return LoraConfig(**{**base, "r": 4})
    return LoraConfig(**base)


def measure(variant: str, layers: int, seq: int, batch: int, remat: str) -> dict:
    import jax
    from flax import nnx
    from jax.sharding import SingleDeviceSharding

    from jqlora.planning import aot
    from jqlora.training import optim
    from jqlora.config import TrainConfig
    from jqlora.lora import QuantSpec, count_params
    from jqlora.models.llama import LlamaForCausalLM, ModelConfig
    from jqlora.lora import SplitModel
    from jqlora.training.step import make_train_step

    cfg = ModelConfig(**{**SHAPE, "num_hidden_layers": layers})
    lora = lora_config(variant, layers)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, lora, QuantSpec("nf4"), "bfloat16", rngs=nnx.Rngs(0),
                                                    remat=remat, scan_layers=variant != "unrolled-rmax",
                                                    attention="xla"))
    split = SplitModel.of(model)
    tc = TrainConfig(batch_size=batch, grad_accum_steps=1, max_steps=10, learning_rate=1e-4, lr_schedule="constant",
                     warmup_steps=0)
    tx, _ = optim.make_optimizer(tc, 10, None)
    args = aot.step_arguments(split, tx, batch=batch, seq=seq, sharding=SingleDeviceSharding(jax.devices()[0]))
    t = time.perf_counter()
    compiled = make_train_step(split, tx).trace(*args).lower().compile()
    seconds = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    return {"variant": variant, "trained_params": count_params(split.lora), "flops": float(cost.get("flops", 0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0)), "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "generated_code_bytes": int(mem.generated_code_size_in_bytes), "compile_s": seconds,
            "backend": jax.default_backend()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--remat", default="full")
    p.add_argument("--out", default=None, help="write the JSON results here")
    args = p.parse_args(argv)
    variants = ("uniform-rmax", "padded", "alphas", "uniform-rmin", "unrolled-rmax")
    rows = [measure(v, args.layers, args.seq, args.batch, args.remat) for v in variants]
    base = rows[0]
    print(f"L={args.layers} seq={args.seq} batch={args.batch} remat={args.remat} on {base['backend']}")
    print("| variant | trained params | GFLOP | / rmax | GB accessed | / rmax | temp MiB | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['trained_params']:,} | {r['flops'] / 1e9:.3f} | {r['flops'] / base['flops']:.4f} "
              f"| {r['bytes_accessed'] / 1e9:.3f} | {r['bytes_accessed'] / base['bytes_accessed']:.4f} | "
              f"{r['temp_bytes'] / 2**20:.1f} | {r['compile_s']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
