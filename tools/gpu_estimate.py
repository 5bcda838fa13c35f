"""A roofline estimate of one train step on a named GPU, from the step's compiled HLO (`jqlora.planning.aot`, deviceless).

    python tools/gpu_estimate.py --model llama3-8b --seq 2048 --batch 1 --gpu h100-sxm \\
        --remat full,save_dots_no_batch,save_dots,none --png estimate.png

Every kernel of the optimized HLO (a fusion, a custom call such as cuDNN attention, a copy), counted as often as
the loops around it run (`known_trip_count` of each while loop), costs

    time = max(bytes read + written / HBM bandwidth, FLOPs / bf16 tensor peak) + a launch cost,

bytes from the kernel's operand and result shapes, FLOPs = 2·M·N·K for every dot inside it, and for cuDNN flash
attention 4·B·N·T·S·H forward (halved for the causal mask, scaled by W/S for a sliding window) and 2.5× that
backward. The kernels are grouped as frozen matmuls, LoRA (a dot with the adapter rank as a dimension),
attention, dequantization (codebook lookups without a dot), cross-entropy (the chunked-CE loop), elementwise and
launches. tokens/s = B·S / time; MFU = model FLOPs / (time × peak) with tools/bench.py's definition: per token
4N + 6·L·S·Nq·H, N the frozen linear and lm_head parameters (forward and input gradient; adapters left out).

Where it is weak: no autotuning happened, so the GEMM tiles are fallbacks and every kernel is assumed to reach its
roofline (real GEMMs reach 60–80% of peak, small ones less); caches, overlap of kernels, and CUDA-graph launch
amortization are ignored; bytes count each operand once per kernel (no re-reads, no L2 hits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "token": 0}
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
        "after-all", "partition-id", "replica-id", "opt-barrier", "copy-start", "copy-done", "iota", "fusion-done"}
CATEGORIES = ("frozen matmuls", "LoRA", "attention", "dequantization", "cross-entropy", "elementwise", "launches")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \((.*)\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*)$")


def _arrays(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_str)
            if dt in DTYPE_BYTES]


def _bytes(type_str: str) -> float:
    return sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in _arrays(type_str))


@dataclasses.dataclass
class Instr:
    name: str
    type: str
    opcode: str
    rest: str

    def operands(self) -> list[str]:
        depth, out = 1, []
        for i, ch in enumerate(self.rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                out = re.findall(r"%([\w.\-]+)", self.rest[:i])
                break
        return out

    def attr(self, key: str) -> str | None:
        m = re.search(rf"{key}=%?([\w.\-$]+)", self.rest)
        return m.group(1) if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.rest)
        return m.group(1) if m else ""


def parse(text: str) -> tuple[dict[str, list[Instr]], dict[str, dict[str, str]], str]:
    """Computations (name → instructions), each one's value types (name → type), and the entry's name."""
    comps: dict[str, list[Instr]] = {}
    types: dict[str, dict[str, str]] = {}
    entry, current = "", None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = h.group(2)
            comps[current], types[current] = [], {}
            if h.group(1):
                entry = current
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if m:
            ins = Instr(*m.groups())
            comps[current].append(ins)
            types[current][ins.name] = ins.type
        elif line.startswith("}"):
            current = None
    return comps, types, entry


def _dot_flops(comps, types, comp: str, seen=None) -> tuple[float, list[tuple[int, ...]]]:
    """2·M·N·K over the dots of a fused computation (and those it calls), and the dots' operand/result dims."""
    flops, dims = 0.0, []
    for ins in comps.get(comp, []):
        if ins.opcode == "dot":
            ops = ins.operands()
            lhs = _arrays(types[comp].get(ops[0], ""))
            out = _arrays(ins.type)
            contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
            k = math.prod(lhs[0][1][int(d)] for d in contract.group(1).split(",") if d) if lhs and contract else 1
            flops += 2.0 * math.prod(out[0][1]) * k
            dims += [a[1] for o in ops for a in _arrays(types[comp].get(o, ""))] + [out[0][1]]
        for key in ("calls",):
            sub = ins.attr(key)
            if sub and sub in comps:
                f, d = _dot_flops(comps, types, sub)
                flops, dims = flops + f, dims + d
    return flops, dims


def _kernel_bytes(comps, types, comp: str, ins: Instr) -> float:
    """Bytes a kernel reads and writes: each operand and the result once, except an operand its fused computation
    only slices (the slice is read: one layer of a stacked kernel) and a buffer updated in place by a
    dynamic-update-slice (only the update is written: one layer's slot of a stacked residual)."""
    sub = ins.attr("calls")
    body = comps.get(sub, []) if sub else []
    params = {int(m.group(1)): p.name for p in body if p.opcode == "parameter"
              for m in [re.match(r"(\d+)\)", p.rest)] if m}
    by_name = {b.name: b for b in body}
    in_place = {}  # parameter name -> bytes of the update written into it
    # an async fusion-start's result also carries its operands: only the fused computation's root is written
    written = _bytes(body[-1].type) if ins.opcode == "fusion-start" and body else _bytes(ins.type)
    for b in body:
        if b.opcode == "dynamic-update-slice":
            target, update = b.operands()[:2]
            if target in by_name and by_name[target].opcode == "parameter":
                in_place[target] = _bytes(types[sub].get(update, ""))
    if in_place:
        written = max(0.0, written - sum(_bytes(by_name[t].type) for t in in_place)) + sum(in_place.values())
    total = written
    for i, o in enumerate(ins.operands()):
        full = _bytes(types[comp].get(o, ""))
        name = params.get(i)
        if name in in_place:
            full = 0.0
        elif name is not None:
            users = [u for u in body if name in u.operands()]
            if users and all(u.opcode in ("dynamic-slice", "slice") for u in users):
                full = min(full, sum(_bytes(u.type) for u in users))
        total += full
    return total


def _has(comps, comp: str, needle: str) -> bool:
    return any(needle in ins.op_name or (ins.attr("calls") and _has(comps, ins.attr("calls"), needle))
               for ins in comps.get(comp, []))


@dataclasses.dataclass
class Estimate:
    ms: dict[str, float]
    kernels: int
    tokens: int
    model_flops: float
    peak_flops: float

    @property
    def total_ms(self) -> float:
        return sum(self.ms.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.total_ms / 1e3)

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.total_ms / 1e3) / self.peak_flops


def estimate(text: str, gpu, *, tokens: int, model_flops: float, lora_rank: int, vocab: int) -> Estimate:
    comps, types, entry = parse(text)
    ms: dict[str, float] = defaultdict(float)
    kernels = 0

    def walk(comp: str, times: float, in_ce: bool) -> None:
        nonlocal kernels
        for ins in comps[comp]:
            if ins.opcode == "while":
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.rest)
                body = ins.attr("body")
                ce = in_ce or any(vocab in d for d in _dot_flops(comps, types, body)[1]) if body else in_ce
                walk(body, times * (int(trip.group(1)) if trip else 1), ce)
                continue
            if ins.opcode in ("call", "conditional"):
                for sub in re.findall(r"(?:to_apply|branch_computations=\{|calls)=?%([\w.\-]+)", ins.rest):
                    if sub in comps:
                        walk(sub, times, in_ce)
                continue
            if ins.opcode in FREE:
                continue
            nbytes = _kernel_bytes(comps, types, comp, ins)
            flops, category = 0.0, "elementwise"
            target = re.search(r'custom_call_target="([^"]+)"', ins.rest)
            if ins.opcode == "custom-call" and target and "fmha" in target.group(1):
                ops = ins.operands()
                q = _arrays(types[comp].get(ops[0], ""))[0][1]  # B T N H
                k = _arrays(types[comp].get(ops[1], ""))[0][1]
                window = re.search(r'"sliding_window_length":\s*"?(\d+)', ins.rest)
                causal = "CAUSAL" in (re.search(r'"mask_type":\s*"(\w+)"', ins.rest) or [None, ""])[1]
                share = min(1.0, int(window.group(1)) / k[1]) if window and int(window.group(1)) else (
                    0.5 if causal else 1.0)
                flops = 4.0 * q[0] * q[2] * q[1] * k[1] * q[3] * share
                flops *= 2.5 if "Backward" in target.group(1) else 1.0
                category = "attention"
            elif ins.opcode == "fusion" or ins.opcode == "custom-call":
                sub = ins.attr("calls")
                flops, dims = _dot_flops(comps, types, sub) if sub else (0.0, [])
                if in_ce or any(vocab in d for d in dims):
                    category = "cross-entropy"
                elif "xla_attention" in ins.op_name or (sub and _has(comps, sub, "xla_attention")):
                    category = "attention"
                elif flops:
                    category = "LoRA" if any(lora_rank in d for d in dims) else "frozen matmuls"
                elif sub and _has(comps, sub, "dequantize_codes"):
                    category = "dequantization"
            elif in_ce:
                category = "cross-entropy"
            t = max(nbytes / gpu.hbm_bytes_per_s, flops / gpu.bf16_flops)
            ms[category] += times * t * 1e3
            ms["launches"] += times * gpu.launch_s * 1e3
            kernels += int(times)

    walk(entry, 1.0, False)
    return Estimate({c: ms.get(c, 0.0) for c in CATEGORIES}, kernels, tokens, model_flops, gpu.bf16_flops)


def model_flops(shape, *, tokens: int, seq: int) -> float:
    """Useful FLOPs of one QLoRA step (see the module docstring)."""
    from jqlora.planning import linear_shapes

    L, D, V = shape.num_hidden_layers, shape.hidden_size, shape.vocab_size
    n = L * sum(o * i for o, i in linear_shapes(shape).values()) + V * D
    return tokens * (4 * n + 6 * L * seq * shape.num_attention_heads * shape.head_dim)


def _hlo(args, shape, cfg, remat: str) -> tuple[str, int]:
    """The compiled step's HLO text and peak bytes (from --hlo-dir when there)."""
    from jqlora.planning import aot

    stem = None
    if args.hlo_dir:
        tag = f"{args.model}-L{shape.num_hidden_layers}-s{args.seq}-b{args.batch}-{args.gpu}-{remat}-" \
              f"{args.attention or 'cudnn'}"
        stem = Path(args.hlo_dir) / tag
        if stem.with_suffix(".hlo").exists():
            return stem.with_suffix(".hlo").read_text(), json.loads(stem.with_suffix(".json").read_text())["peak"]
    c = aot.compiled(shape, cfg, args.gpu, remat, args.attention)
    if stem is not None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".hlo").write_text(c.hlo())
        stem.with_suffix(".json").write_text(json.dumps({**c.memory, "peak": c.peak_bytes}))
    return c.hlo(), c.peak_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gpu", default="h100-sxm")
    ap.add_argument("--remat", default="full", help="comma-separated policies")
    ap.add_argument("--layers", type=int, default=None, help="compile only this many layers (quicker; the figures are for that many)")
    ap.add_argument("--config", default="configs/llama3-8b.yaml")
    ap.add_argument("--overrides", nargs="*", default=[], help="key.sub=value overrides of --config")
    ap.add_argument("--attention", default=None, choices=("cudnn", "xla"),
                    help="xla: the step as it was before cuDNN attention (default: cudnn)")
    ap.add_argument("--hlo-dir", default=None, help="keep each compiled HLO and its memory figures here, and read "
                                                    "them back instead of compiling when present")
    ap.add_argument("--png", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from jqlora.planning import aot
    from jqlora.config import load_config
    from jqlora.planning import BUILTIN, memory_plan, settings_from_config

    if args.model not in BUILTIN or args.gpu not in aot.GPUS:
        print(f"gpu_estimate: --model one of {', '.join(BUILTIN)}; --gpu one of {', '.join(aot.GPUS)}",
              file=sys.stderr)
        return 2
    full = BUILTIN[args.model]
    shape = full
    if args.layers:
        shape = dataclasses.replace(full, num_hidden_layers=args.layers,
                                    sliding_windows=full.sliding_windows[:args.layers])
    cfg = load_config(args.config, ["model.path=/not/needed", f"data.max_length={args.seq}",
                                    f"train.batch_size={args.batch}", *args.overrides])
    gpu = aot.GPUS[args.gpu]
    tokens = args.batch * args.seq
    rows = []
    for remat in args.remat.split(","):
        text, peak = _hlo(args, shape, cfg, remat)
        est = estimate(text, gpu, tokens=tokens, model_flops=model_flops(shape, tokens=tokens, seq=args.seq),
                       lora_rank=cfg.lora.r, vocab=shape.vocab_size)
        plan = memory_plan(shape, **{**settings_from_config(cfg), "remat": remat,
                                     "attention": args.attention or "cudnn"})
        rows.append(dict(remat=remat, peak_gb=peak / 1e9, plan_gb=plan.total / 1e9, ms=est.total_ms,
                         tokens_per_s=est.tokens_per_s, mfu=est.mfu, kernels=est.kernels, breakdown=est.ms))
    layers = f", {shape.num_hidden_layers} of {full.num_hidden_layers} layers" if args.layers else ""
    print(f"{args.model} seq {args.seq} batch {args.batch} on {args.gpu}{layers}, attention "
          f"{args.attention or 'cudnn'} (roofline estimate from the compiled HLO)")
    print("| remat | compiled peak GB | plan GB | est. ms/step | tokens/s | MFU | " + " | ".join(CATEGORIES) + " |")
    print("|---" * (6 + len(CATEGORIES)) + "|")
    for r in rows:
        print(f"| {r['remat']} | {r['peak_gb']:.1f} | {r['plan_gb']:.1f} | {r['ms']:.0f} | {r['tokens_per_s']:.0f} | "
              f"{r['mfu']:.0%} | " + " | ".join(f"{r['breakdown'][c]:.1f}" for c in CATEGORIES) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 0.6 + 0.5 * len(rows)))
        left = [0.0] * len(rows)
        for c in CATEGORIES:
            vals = [r["breakdown"][c] for r in rows]
            ax.barh([r["remat"] for r in rows], vals, left=left, label=c)
            left = [a + b for a, b in zip(left, vals)]
        ax.set_xlabel(f"estimated ms per step ({args.model}, seq {args.seq}, batch {args.batch}, {args.gpu})")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35))
        fig.savefig(args.png, bbox_inches="tight", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
