"""A roofline estimate of one train step on a named GPU, from the step's compiled HLO (`jqlora.planning.aot`, deviceless).

    python tools/gpu_estimate.py --model llama3-8b --seq 2048 --batch 1 --gpu h100-sxm \\
        --remat full,save_dots_no_batch,save_dots,none --png estimate.png

The model (a roofline over every kernel of the optimized HLO, the host link for offloaded bytes, and what it leaves
out) is `jqlora.planning.estimate`, which `train.remat=auto` ranks policies by; its docstring says how each kernel is
priced. A roofline is an upper bound on speed: measured steps are slower.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from jqlora.planning.estimate import CATEGORIES, estimate, model_flops



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
