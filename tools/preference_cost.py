#!/usr/bin/env python
"""The compiled cost of a preference step against the SFT step on the same tokens (XLA's own numbers).

    python tools/preference_cost.py                          # a 1024-wide, 2-layer Llama shape, seq 256 (CPU)
    python tools/preference_cost.py --model llama3-8b --layers 2 --seq 2048 --pairs 1   # on a GPU
    python tools/preference_cost.py --model llama3-8b --seq 2048 --pairs 1 --gpu h100-sxm  # deviceless (py3.12 venv)

The same random NF4 model (tools/bench.py's weights, bf16 compute, r=16 on all seven projections) compiles
`jqlora.training.step.make_train_step` on 2P rows of S tokens and `jqlora.training.preference_step`'s step for each
objective on P pairs (2P rows: chosen and rejected): dpo and kto add the reference forward pass (the same 4-bit
base under another adapter tree, no backward), orpo and simpo have none. Reported: XLA's cost analysis (FLOPs) and
memory analysis (temporary bytes: what the step needs besides its arguments), both relative to SFT. The reference
pass is not shared with the policy pass: its adapter differs from the first step on.

``--gpu NAME`` compiles the same steps deviceless for that GPU instead (`jqlora.planning.aot.compile_step`: abstract
weights, cuDNN attention; needs the aot venv: Python 3.12, jax[cuda13]) and adds the compiled peak (arguments +
temporaries + outputs - donated). A deviceless executable has no cost analysis: the FLOPs are the matmuls' (every
dot of the compiled HLO, each loop body times its trip count; cuDNN attention is a custom call, counted apart).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import collections
import functools
import json
import math
import re
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


_COMP = re.compile(r"^(ENTRY )?%([\w.-]+) .*\{$")
_SHAPE = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = \w+\[([\d,]*)\]")
_DOT = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = \w+\[([\d,]*)\]\S* dot\(%([\w.-]+), %[\w.-]+\).*?"
                  r"lhs_contracting_dims=\{([\d,]*)\}")
_CALLS = re.compile(r"(calls|to_apply|body|condition|true_computation|false_computation)=%([\w.-]+)")


def hlo_dot_flops(text: str) -> tuple[float, dict[str, float]]:
    """2 · (output elements) · (contracted elements) over every dot of a compiled HLO module, each computation
    weighted by how often it runs (a while body by its known trip count: the scanned layers, the loss chunks);
    and the weighted count of each cuDNN attention call (custom calls, not dots: their FLOPs are not in the sum)."""
    comps: dict[str, list[str]] = {}
    entry, cur = None, None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            entry = cur if m.group(1) else entry
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            comps[cur].append(line)
    shapes = {}
    for lines in comps.values():
        for line in lines:
            m = _SHAPE.match(line)
            if m:
                shapes[m.group(1)] = [int(d) for d in m.group(2).split(",") if d]

    @functools.cache
    def total(name: str) -> tuple[float, tuple]:
        flops, calls = 0.0, collections.Counter()
        for line in comps[name]:
            m = _DOT.match(line)
            if m:
                lhs = shapes[m.group(2)]
                flops += 2.0 * math.prod(int(d) for d in m.group(1).split(",") if d) * math.prod(
                    lhs[int(d)] for d in m.group(3).split(",") if d)
            target = re.search(r'custom_call_target="(__cudnn\$fmha[^"]*)"', line)
            if target:
                calls[target.group(1)] += 1
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            for kind, callee in _CALLS.findall(line):
                n = int(trips.group(1)) if kind == "body" and trips else 1
                f, c = total(callee)
                flops += n * f
                for k, v in c:
                    calls[k] += n * v
        return flops, tuple(calls.items())

    flops, calls = total(entry)
    return flops, dict(calls)


def measure_gpu(hf: dict, seq: int, pairs: int, remat: str, gpu: str, objectives: tuple[str, ...]) -> list[dict]:
    """Per objective: the compiled memory and the dot FLOPs of the step (`hlo_dot_flops`), deviceless."""
    from jqlora.config import load_config
    from jqlora.models.llama import ModelConfig
    from jqlora.planning import aot

    shape = ModelConfig.from_hf(hf)
    out = []
    for name in objectives:
        rows = 2 * pairs if name == "sft" else pairs
        cfg = load_config(None, [f"data.max_length={seq}", "data.packing=false", f"train.batch_size={max(rows, 2)}",
                                 f"train.objective={name}", f"lora.r={bench.LORA_R}", f"lora.alpha={bench.LORA_ALPHA}",
                                 f"lora.targets=[{','.join(bench.LORA_TARGETS)}]", "model.quant=nf4",
                                 "model.double_quant=true", "model.block_size=64", "model.dtype=bfloat16",
                                 f"train.remat={remat}"])  # (batch_size >= 2: KTO's check; the compile takes rows)
        c = aot.compile_step(shape, cfg, gpu, batch=rows)
        flops, attention = hlo_dot_flops(c.hlo())
        out.append({"objective": name, "device": gpu, "backend": "deviceless", "flops": flops,
                    "attention_calls": attention, "temp_bytes": c.memory["temp"],
                    "argument_bytes": c.memory["argument"], "peak_bytes": c.peak_bytes, "memory": c.memory})
        print(f"  compiled {name}: {flops / 1e12:.2f} dot TFLOP, peak {c.peak_bytes / 2**30:.2f} GiB, {attention}",
              file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cpu-1k", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None, help="run only this many layers")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--pairs", type=int, default=1, help="pairs per micro-batch (2 rows each; SFT gets 2x rows)")
    p.add_argument("--remat", default="full", choices=bench.REMATS[:4])
    p.add_argument("--gpu", default=None, help="compile deviceless for this GPU (h100-sxm, h200, a100-80gb, l4) "
                                               "instead of running on this machine's device")
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help="with --gpu: which (sft first)")
    p.add_argument("--out", default=None, help="write the JSON results here")
    args = p.parse_args(argv)
    hf = dict(MODELS[args.model])
    if args.gpu is not None:
        from jqlora.planning import aot

        if args.gpu not in aot.GPUS:
            print(f"preference_cost: --gpu {args.gpu}: unknown; expected one of {', '.join(aot.GPUS)}", file=sys.stderr)
            return 2
        if args.layers:
            hf["num_hidden_layers"] = args.layers
        objectives = tuple(args.objectives.split(","))
        if objectives[0] != "sft" or not set(objectives) <= set(OBJECTIVES):
            print(f"preference_cost: --objectives {args.objectives}: expected sft first, then any of "
                  f"{', '.join(OBJECTIVES[1:])}", file=sys.stderr)
            return 2
        try:
            rows = measure_gpu(hf, args.seq, args.pairs, args.remat, args.gpu, objectives)
        except aot.AotError as e:
            print(f"preference_cost: {e}", file=sys.stderr)
            return 2
    else:
        if args.layers:
            hf["num_hidden_layers"] = args.layers
        rows = measure(hf, args.seq, args.pairs, args.remat)
    base = rows[0]
    print(f"{args.model} L={hf['num_hidden_layers']} seq={args.seq} rows={2 * args.pairs} remat={args.remat} "
          f"on {base['device']} ({base['backend']})")
    if args.gpu is None:
        print("| objective | GFLOPs | / sft | temp MiB | / sft |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['objective']} | {r['flops'] / 1e9:.2f} | {r['flops'] / base['flops']:.2f} | "
                  f"{r['temp_bytes'] / 2**20:.1f} | {r['temp_bytes'] / max(base['temp_bytes'], 1):.2f} |")
    else:
        print("| objective | dot TFLOP | / sft | temp GiB | / sft | peak GiB | / sft |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['objective']} | {r['flops'] / 1e12:.2f} | {r['flops'] / base['flops']:.3f} | {r['temp_bytes'] / 2**30:.2f} | "
                  f"{r['temp_bytes'] / max(base['temp_bytes'], 1):.3f} | {r['peak_bytes'] / 2**30:.2f} | "
                  f"{r['peak_bytes'] / base['peak_bytes']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
