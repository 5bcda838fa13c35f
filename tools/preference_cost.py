#!/usr/bin/env python
"""The compiled cost of a preference step against the SFT step on the same tokens (XLA's own numbers).

    python tools/preference_cost.py                          # a 1024-wide, 2-layer Llama shape, seq 256 (CPU)
    python tools/preference_cost.py --model llama3-8b --layers 2 --seq 2048 --pairs 1   # on a GPU

The same random NF4 model (tools/bench.py's weights, bf16 compute, r=16 on all seven projections) compiles
`jqlora.training.step.make_train_step` on 2P rows of S tokens and `jqlora.training.preference_step`'s step for each
objective on P pairs (2P rows: chosen and rejected): dpo and kto add the reference forward pass (the same 4-bit
base under another adapter tree, no backward), orpo and simpo have none. Reported: XLA's cost analysis (FLOPs) and
memory analysis (temporary bytes: what the step needs besides its arguments), both relative to SFT. The reference
pass is not shared with the policy pass: its adapter differs from the first step on.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench  # noqa: E402  (tools/bench.py: model shapes and random weights)

MODELS = {**bench.MODELS, "cpu-1k": {**bench.MODELS["tiny"], "vocab_size": 8192, "hidden_size": 1024,
                                     "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4}}
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto")


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def measure(hf: dict, seq: int, pairs: int, remat: str) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jqlora.config import TrainConfig
    from jqlora.lora import LoraConfig, SplitModel
    from jqlora.models.llama import ModelConfig, from_hf_tensors
    from jqlora.training import optim
    from jqlora.training.preference import Objective
    from jqlora.training.preference_step import base_reference, make_preference_train_step
    from jqlora.training.step import make_train_step

    cfg = ModelConfig.from_hf(hf)
    lora = LoraConfig(r=bench.LORA_R, alpha=bench.LORA_ALPHA, targets=bench.LORA_TARGETS)
    model = from_hf_tensors(cfg, bench.random_getter(cfg, 0), lora=lora, quant="nf4", double_quant=True,
                            block_size=64, dtype="bfloat16", lora_dtype="float32", seed=0, remat=remat)
    split = SplitModel.of(model)
    del model
    tc = TrainConfig(batch_size=2 * pairs, grad_accum_steps=1, max_steps=1, learning_rate=1e-4,
                     lr_schedule="constant", warmup_steps=0)
    tx, _ = optim.make_optimizer(tc, 1)
    opt_state = tx.init(split.lora)
    rng = np.random.default_rng(1)
    rows = 2 * pairs
    ids = rng.integers(0, cfg.vocab_size, (rows, seq), dtype=np.int32)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy()
    ones = np.ones((rows, seq), np.int32)
    sft = {"input_ids": ids, "targets": np.roll(ids, -1, axis=1), "loss_mask": ones, "segment_ids": ones,
           "positions": pos}
    pair = {k: v.reshape(pairs, 2, seq) for k, v in (("input_ids", ids), ("targets", np.roll(ids, -1, axis=1)),
                                                     ("completion_mask", ones), ("token_mask", ones),
                                                     ("segment_ids", ones), ("positions", pos))}
    pair["valid"] = np.ones((pairs,), np.float32)
    pair["label"] = np.ones((pairs,), np.float32)
    key, scale = jax.random.key(0), jnp.float32(1.0)
    ref = base_reference(split, split.lora)
    out = []
    for name in OBJECTIVES:
        if name == "sft":
            c = make_train_step(split, tx).lower(split.lora, opt_state, split.frozen, sft, key, scale).compile()
        else:
            step = make_preference_train_step(split, tx, Objective(kind=name))
            batch = dict(pair) if name == "kto" else {k: v for k, v in pair.items() if k != "label"}
            c = step.lower(split.lora, opt_state, ref, split.frozen, batch, key, scale).compile()
        mem = c.memory_analysis()
        out.append({"objective": name, "flops": _flops(c), "temp_bytes": int(mem.temp_size_in_bytes),
                    "argument_bytes": int(mem.argument_size_in_bytes), "backend": jax.default_backend(),
                    "device": str(jax.devices()[0].device_kind)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cpu-1k", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None, help="run only this many layers")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--pairs", type=int, default=1, help="pairs per micro-batch (2 rows each; SFT gets 2x rows)")
    p.add_argument("--remat", default="full", choices=bench.REMATS[:4])
    p.add_argument("--out", default=None, help="write the JSON results here")
    args = p.parse_args(argv)
    hf = dict(MODELS[args.model])
    if args.layers:
        hf["num_hidden_layers"] = args.layers
    rows = measure(hf, args.seq, args.pairs, args.remat)
    base = rows[0]
    print(f"{args.model} L={hf['num_hidden_layers']} seq={args.seq} rows={2 * args.pairs} remat={args.remat} "
          f"on {base['device']} ({base['backend']})")
    print("| objective | GFLOPs | / sft | temp MiB | / sft |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['flops'] / 1e9:.2f} | {r['flops'] / base['flops']:.2f} | "
              f"{r['temp_bytes'] / 2**20:.1f} | {r['temp_bytes'] / max(base['temp_bytes'], 1):.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
