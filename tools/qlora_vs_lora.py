"""QLoRA (NF4 + double quantization) against plain LoRA on the unquantized base, on a task the base cannot know.

The task is a fixed random mapping: "Code <key>?" → "<value>" for random 4-letter keys and values, so the only way
to lower the loss is to learn the mapping into the adapter. Both runs share the demo base model, data order, seed
and hyperparameters; only `model.quant` differs. The QLoRA paper's claim, at small scale: the 4-bit base reaches the
same loss as the 16-bit one (here: the final loss within 5%).

    python tools/qlora_vs_lora.py [--steps 200] [--seeds 0,1,2] [--out runs/qlora_vs_lora]

prints, per seed, both loss curves (the loss over the whole mapping, measured every steps/6) and the final losses,
then the means over seeds (run-to-run variance on this tiny random base is large, so one seed says little), and
writes curves.json and curves.png (seed 0) to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_task(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(4))  # noqa: E731
    rows = [{"messages": [{"role": "user", "content": f"Code {word()}?"}, {"role": "assistant", "content": word()}]}
            for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(quant: str, data: Path, out: Path, steps: int, extra: list[str]) -> list[tuple[int, float]]:
    from jqlora import train
    from jqlora.config import load_config

    cfg = load_config(None, [
        f"model.quant={quant}", f"data.path={data}", f"data.eval_path={data}", f"output_dir={out}",
        f"train.max_steps={steps}", "train.log_every=5", f"train.eval_every={max(steps // 6, 1)}", "train.save_every=0",
        "train.batch_size=8", "train.grad_accum_steps=1", "lora.dropout=0.0", "train.learning_rate=2e-3",
        "data.max_length=48", "train.sample_prompt=null", *extra,
    ])
    trainer = train.Trainer(cfg, progress=False, export=False)
    code = trainer.run()
    if code:
        sys.exit(f"training with model.quant={quant} failed ({code})")
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    # The loss over the whole mapping (eval over the training rows, no dropout): not a noisy window of batches.
    return [(r["step"], r["eval_loss"]) for r in lines if "eval_loss" in r]


def compare(steps: int, out: Path, extra: list[str] = ()) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_task(Path(tmp) / "mapping.jsonl")
        curves = {q: run(q, data, Path(tmp) / q, steps, list(extra)) for q in ("nf4", "none")}
    final = {q: c[-1][1] for q, c in curves.items()}  # loss over all rows after the last step
    result = {"curves": curves, "final": final, "relative_gap": abs(final["nf4"] - final["none"]) / final["none"]}
    (out / "curves.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=str(REPO / "runs" / "qlora_vs_lora"))
    args = ap.parse_args()
    out = Path(args.out)
    results = {}
    for seed in (int(x) for x in args.seeds.split(",")):
        r = compare(args.steps, out / f"seed{seed}", [f"train.seed={seed}"])
        results[seed] = r
        print(f"seed {seed}: {'step':>6} {'QLoRA (nf4)':>12} {'LoRA (unquantized)':>19}")
        for (s, a), (_, b) in zip(r["curves"]["nf4"], r["curves"]["none"]):
            print(f"        {s:>6} {a:12.4f} {b:19.4f}")
    mean = {q: sum(r["final"][q] for r in results.values()) / len(results) for q in ("nf4", "none")}
    gap = abs(mean["nf4"] - mean["none"]) / mean["none"]
    print(f"final loss, mean over seeds {sorted(results)}: QLoRA {mean['nf4']:.4f}, LoRA {mean['none']:.4f}, "
          f"relative gap {gap:.2%}")
    (out / "summary.json").write_text(json.dumps({"mean_final": mean, "relative_gap": gap,
                                                  "final_by_seed": {s: r["final"] for s, r in results.items()}}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results[min(results)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for q, label in (("nf4", "QLoRA (NF4 + DQ)"), ("none", "LoRA (unquantized base)")):
        ax.plot(*zip(*first["curves"][q]), label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss over the whole mapping")
    ax.set_title(f"random key→value mapping, demo base model, seed {min(results)}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    print(f"wrote {out / 'curves.png'}")


if __name__ == "__main__":
    main()
