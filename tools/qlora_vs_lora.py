"""QLoRA (NF4 + double quantization) against plain LoRA on the unquantized base, on a task the base cannot know.

Two synthetic tasks, both "Code <key>?" → "<value>" with random 4-letter keys and values, so the only way to lower
the loss is to learn the mapping into the adapter:

  pairs (default)  every key has two values and appears four times, twice with each: the best possible model puts
                   1/2 on each value, so the optimal loss is known exactly — ln 2 per row over the row's trained
                   tokens (the values of one key start with different tokens). The final losses are compared where
                   they are well defined (both near a known, non-zero optimum), and the excess over that optimum is
                   reported too.
  mapping          one value per key (optimum 0): the final losses are small numbers whose ratio is dominated by how
                   far each run got before the learning rate decayed; reported for completeness.

Both runs share a random base (the demo's architecture and tokenizer, weights drawn from numpy seed 0 as transformers
initializes Llama: `random_base`), data order, seed and hyperparameters; only `model.quant` differs. The QLoRA
paper's claim, at small scale: the 4-bit base reaches the same loss as the 16-bit one (here: within 5%).

    python tools/qlora_vs_lora.py [--task pairs|mapping] [--steps 400] [--seeds 0,1,2] [--out runs/qlora_vs_lora]
    python tools/qlora_vs_lora.py --loftq-iters 2 ...      (a third run, from a LoftQ start on NF4: the share of the
                                                            QLoRA-vs-LoRA gap it closes)
    python tools/qlora_vs_lora.py --layer-cost [--loftq-iters 2] [--svd-niter 4]
        (LoftQ / PiSSA start-up cost, one 8B-shaped kernel; --svd-niter: the randomized SVD, lora.svd_niter)

prints, per seed, both loss curves (the loss over the whole training set, measured every steps/6) and the final
losses, then the means over seeds (run-to-run variance on this tiny random base is large, so one seed says little),
and writes curves.json, summary.json and curves.png (seed 0) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(4))


def _row(key: str, value: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Code {key}?"}, {"role": "assistant", "content": value}]}


def make_task(path: Path, task: str = "pairs", n: int = 48, seed: int = 0) -> Path:
    """Write the task's rows to ``path`` (jsonl): ``n`` keys (mapping) or ``n // 2`` keys × 4 rows (pairs)."""
    rng = random.Random(seed)
    if task == "mapping":
        rows = [_row(_word(rng), _word(rng)) for _ in range(n)]
    else:
        rows = []
        for _ in range(n // 2):
            key, a = _word(rng), _word(rng)
            b = _word(rng)
            while b[0] == a[0]:  # the two values part at their first token, so the ambiguity costs exactly ln 2
                b = _word(rng)
            rows += [_row(key, a), _row(key, b), _row(key, a), _row(key, b)]
        rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def optimal_loss(data: Path) -> float:
    """The pairs task's optimum, in nats per trained token: ln 2 per row over all rows' trained tokens (counted by
    the demo tokenizer through its chat template, as the trainer masks them: the assistant turn and its end token)."""
    from jqlora.config import demo_config
    from jqlora.data import encode_records, load_tokenizer, read_records

    cfg = demo_config()
    examples, _ = encode_records(read_records(str(data)), load_tokenizer(cfg.model.path))
    trained = sum(int(ex.trained[1:].sum()) for ex in examples)  # a row's first token is never a target
    return len(examples) * math.log(2) / trained


VARIANTS = {"nf4": ["model.quant=nf4"], "none": ["model.quant=none"]}  # + "loftq" with --loftq-iters


def run(quant: str, data: Path, out: Path, steps: int, extra: list[str]) -> list[tuple[int, float]]:
    from jqlora.config import demo_config
    from jqlora.run import Trainer

    cfg = demo_config([
        *VARIANTS[quant], f"data.path={data}", f"data.eval_path={data}", f"output_dir={out}",
        f"train.max_steps={steps}", "train.log_every=5", f"train.eval_every={max(steps // 6, 1)}", "train.save_every=0",
        "train.batch_size=8", "train.grad_accum_steps=1", "lora.dropout=0.0", "train.learning_rate=2e-3",
        "data.max_length=48", "train.sample_prompt=null", *extra,
    ])
    trainer = Trainer(cfg, progress=False, export=False)
    code = trainer.run()
    if code:
        sys.exit(f"training with model.quant={quant} failed ({code})")
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    # The loss over the whole mapping (eval over the training rows, no dropout): not a noisy window of batches.
    return [(r["step"], r["eval_loss"]) for r in lines if "eval_loss" in r]


def gap_closed(loss: dict) -> float | None:
    """(QLoRA − LoftQ) / (QLoRA − LoRA): 1 closes the gap, 0 does nothing, < 0 widens it; None with no gap."""
    gap = loss["nf4"] - loss["none"]
    return (loss["nf4"] - loss["loftq"]) / gap if gap > 0 else None


def _pct(x: float | None) -> str:
    return "n/a (QLoRA not above LoRA)" if x is None else f"{x:+.1%}"


def random_base(out: Path) -> Path:
    """A randomly initialized model of the demo's shape with the demo tokenizer, in ``out``: the demo's own base is
    pretrained (it knows capitals), this one knows nothing, so only the adapter can learn the task."""
    import shutil

    import jax.numpy as jnp
    import numpy as np
    import transformers

    from jqlora.config import demo_config
    from jqlora.checkpoints import save_safetensors
    from jqlora.models.llama import ModelConfig, hf_key_table

    demo = Path(demo_config().model.path)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        shutil.copy(demo / name, out / name)
    config = transformers.AutoConfig.from_pretrained(out)
    rng = np.random.default_rng(0)
    tensors = {}
    for entry in hf_key_table(ModelConfig.from_hf(config.to_dict())):
        if entry.kind == "norm":
            value = np.ones(entry.shape, np.float32)
        else:
            # a frozen random lm_head at std 0.02 caps every logit near 0.02·sqrt(hidden)·sqrt(hidden); 1/sqrt(hidden)
            # leaves the adapters room to learn
            std = config.hidden_size ** -0.5 if entry.kind == "lm_head" else config.initializer_range
            value = rng.normal(0.0, std, entry.shape).astype(np.float32)
        tensors[entry.key] = jnp.asarray(value, jnp.bfloat16)
    save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def compare(task: str, steps: int, out: Path, extra: list[str] = ()) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_task(Path(tmp) / f"{task}.jsonl", task)
        floor = optimal_loss(data) if task == "pairs" else 0.0
        base = random_base(Path(tmp) / "base")
        curves = {q: run(q, data, Path(tmp) / q, steps, [f"model.path={base}", *extra]) for q in VARIANTS}
    final = {q: c[-1][1] for q, c in curves.items()}  # loss over all rows after the last step
    result = {"task": task, "optimal_loss": floor, "curves": curves, "final": final,
              "relative_gap": (final["nf4"] - final["none"]) / final["none"]}
    if "loftq" in final:  # the share of QLoRA's excess over LoRA that LoftQ removes, at the start and at the end
        start = {q: c[0][1] for q, c in curves.items()}
        result["loftq_gap_closed"] = {"start": gap_closed(start), "final": gap_closed(final)}
    (out / "curves.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("pairs", "mapping"), default="pairs")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=str(REPO / "runs" / "qlora_vs_lora"))
    ap.add_argument("--loftq-iters", type=int, default=0,
                    help="also train from a LoftQ start (lora.init=loftq, this many iterations) on the NF4 base")
    ap.add_argument("--svd-niter", type=int, default=None,
                    help="PiSSA / LoftQ with the randomized SVD of this many power iterations (lora.svd_niter)")
    ap.add_argument("--layer-cost", action="store_true",
                    help="only time LoftQ / PiSSA / plain NF4 on one 8B-shaped kernel (4096x14336) on this CPU")
    args = ap.parse_args()
    if args.layer_cost:
        layer_cost(max(args.loftq_iters, 1), niter=args.svd_niter)
        return
    if args.loftq_iters:
        VARIANTS["loftq"] = ["model.quant=nf4", "lora.init=loftq", f"lora.loftq_iters={args.loftq_iters}"]
        if args.svd_niter is not None:
            VARIANTS["loftq"].append(f"lora.svd_niter={args.svd_niter}")
    out = Path(args.out)
    results = {}
    for seed in (int(x) for x in args.seeds.split(",")):
        r = compare(args.task, args.steps, out / f"seed{seed}", [f"train.seed={seed}"])
        results[seed] = r
        print(f"seed {seed}: {'step':>6} {'QLoRA (nf4)':>12} {'LoRA (unquantized)':>19}", flush=True)
        for (s, a), (_, b) in zip(r["curves"]["nf4"], r["curves"]["none"]):
            print(f"        {s:>6} {a:12.4f} {b:19.4f}", flush=True)
    floor = results[min(results)]["optimal_loss"]
    mean = {q: sum(r["final"][q] for r in results.values()) / len(results) for q in VARIANTS}
    gap = (mean["nf4"] - mean["none"]) / mean["none"]
    print(f"task {args.task}, {args.steps} steps, optimal loss {floor:.4f}")
    for s, r in results.items():
        f = r["final"]
        print(f"  seed {s}: QLoRA {f['nf4']:.4f}  LoRA {f['none']:.4f}  gap {r['relative_gap']:+.2%}  "
              f"excess over optimum: QLoRA {f['nf4'] - floor:.4f}  LoRA {f['none'] - floor:.4f}")
    print(f"final loss, mean over seeds {sorted(results)}: QLoRA {mean['nf4']:.4f}, LoRA {mean['none']:.4f}, "
          f"relative gap {gap:+.2%}; excess over the optimum: QLoRA {mean['nf4'] - floor:.4f}, "
          f"LoRA {mean['none'] - floor:.4f}")
    if "loftq" in mean:
        for s, r in results.items():
            c = r["loftq_gap_closed"]
            print(f"  seed {s}: LoftQ ({args.loftq_iters} iterations) start {r['curves']['loftq'][0][1]:.4f} "
                  f"(QLoRA {r['curves']['nf4'][0][1]:.4f}, LoRA {r['curves']['none'][0][1]:.4f}): closes "
                  f"{_pct(c['start'])} of the gap at step 0; final {r['final']['loftq']:.4f}: {_pct(c['final'])}")
        print(f"LoftQ final loss, mean over seeds: {mean['loftq']:.4f}; share of the final gap closed "
              f"{_pct(gap_closed(mean))}")
    (out / "summary.json").write_text(json.dumps({
        "task": args.task, "steps": args.steps, "optimal_loss": floor, "mean_final": mean, "relative_gap": gap,
        "final_by_seed": {s: r["final"] for s, r in results.items()}}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results[min(results)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for q, label in (("nf4", "QLoRA (NF4 + DQ)"), ("none", "LoRA (unquantized base)"), ("loftq", "LoftQ on NF4")):
        if q not in first["curves"]:
            continue
        ax.plot(*zip(*first["curves"][q]), label=label)
    if floor:
        ax.axhline(floor, color="gray", linestyle=":", label=f"optimum {floor:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss over the training set (nats/token)")
    ax.set_title(f"{args.task} task, demo base model, seed {min(results)}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    print(f"wrote {out / 'curves.png'}")


def layer_cost(iters: int, r: int = 16, alpha: float = 32.0, shape: tuple[int, int] = (4096, 14336),
               niter: int | None = None) -> None:
    """Wall time of plain NF4 + DQ, PiSSA and LoftQ (``iters``) on one random bf16-like kernel of ``shape``, and the
    LoftQ error per iteration relative to plain NF4's (the start-up cost is this times the number of kernels)."""
    import time

    import numpy as np

    from jqlora.lora import initialize as LI
    from jqlora import quant as q

    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
    quantize = lambda x: q.quantize(x, "nf4", block_size=64, double_quant=True)
    dequantize = lambda t: np.asarray(q.dequantize(t, np.float32))
    dequantize(quantize(w))  # (compiled once)
    t0 = time.perf_counter()
    plain = float(np.linalg.norm(w - dequantize(quantize(w))))
    t_plain = time.perf_counter() - t0
    if niter is not None:
        LI.top_svd(w, r, niter)  # (compiled once)
    t0 = time.perf_counter()
    LI.pissa(w, r, alpha / r, niter)
    t_pissa = time.perf_counter() - t0
    how = "full SVD" if niter is None else f"randomized SVD, {niter} power iterations"
    print(f"kernel {shape[0]}x{shape[1]}, r={r}: NF4+DQ quantize+dequantize {t_plain:.2f} s; PiSSA ({how}) "
          f"{t_pissa:.1f} s", flush=True)
    t0 = time.perf_counter()
    for i, (_, _, _, err) in zip(range(1, iters + 1), LI.loftq_steps(w, r, alpha / r, quantize, dequantize, niter)):
        print(f"  LoftQ iteration {i}: {time.perf_counter() - t0:.1f} s so far, error {err / plain:.4f} of plain "
              "NF4's", flush=True)


if __name__ == "__main__":
    main()
