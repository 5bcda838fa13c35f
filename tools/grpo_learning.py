#!/usr/bin/env python
"""Does the GRPO demo learn? The mean reward of its first and last steps, over a few seeds, with samples.

    python tools/grpo_learning.py                          # configs/demo-grpo.yaml, seeds 0 1 2
    python tools/grpo_learning.py --seeds 0 --window 5 train.max_steps=20   # overrides go to every run

Each seed is one `python -m jqlora.train --config CONFIG train.seed=S output_dir=<temp dir>` in a fresh process
(``--keep DIR`` keeps the run directories under DIR; ``--report DIR`` then prints their report again without
training). From each run's metrics.jsonl it prints the mean reward of the
first and the last ``--window`` steps, each with two standard errors: over the completions (the window's
n = window x completions per step rewards pooled from the per-step means and Bessel-corrected stds, as if
independent) and over the steps (the std of the window's step means / sqrt(window): completions of one step share
prompts and a policy, so this one is the more cautious). Then the run's wall time, and from completions.jsonl the
first logged group's completions and the last one's, with their rewards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WALL = "grpo_learning_wall_s.txt"  # (a kept run's wall time, for --report)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def window_stats(rows: list[dict], per_step: int) -> dict:
    """Pooled statistics of the completions behind metric ``rows`` (each: ``reward`` = the step's mean over
    ``per_step`` completions, ``reward_std`` = their Bessel-corrected std): mean, per-completion standard error,
    per-step standard error, and n."""
    k = len(rows)
    means = [float(r["reward"]) for r in rows]
    stds = [float(r["reward_std"]) if r.get("reward_std") is not None else 0.0 for r in rows]
    n = k * per_step
    mean = sum(means) / k
    ss = sum((per_step - 1) * s * s + per_step * (m - mean) ** 2 for m, s in zip(means, stds))
    se = math.sqrt(ss / (n - 1) / n) if n > 1 else math.nan
    se_steps = math.sqrt(sum((m - mean) ** 2 for m in means) / (k - 1) / k) if k > 1 else math.nan
    return {"mean": mean, "se": se, "se_steps": se_steps, "n": n}


def summarize(run_dir: str | Path, window: int, per_step: int) -> dict:
    """First / last ``window`` steps' `window_stats` of a run directory's metrics.jsonl."""
    rows = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "reward" in r and "step" in r]
    rows.sort(key=lambda r: r["step"])
    if len(rows) < 2 * window:
        raise SystemExit(f"{run_dir}/metrics.jsonl: {len(rows)} steps with a reward, fewer than 2 x --window {window}")
    return {"steps": len(rows), "first": window_stats(rows[:window], per_step),
            "last": window_stats(rows[-window:], per_step)}


def samples(run_dir: str | Path, count: int) -> tuple[dict, dict] | None:
    """The first and last logged groups of completions.jsonl, ``count`` completions each."""
    path = Path(run_dir) / "completions.jsonl"
    if not path.is_file():
        return None
    lines = read_jsonl(path)
    if not lines:
        return None

    def cut(g):
        scored = [r for r in g["reward"] if r is not None]
        return {"step": g["step"], "prompt": g["prompt"], "completions": g["completions"][:count],
                "reward": g["reward"][:count], "group": len(g["reward"]),
                "group_mean": sum(scored) / len(scored) if scored else math.nan}

    return cut(lines[0]), cut(lines[-1])


def _text(c) -> str:
    return c if isinstance(c, str) else str(c[-1].get("content", "")) if c else ""


def run_seed(config: str, seed: int, out: Path, overrides: list[str], quiet: bool) -> float:
    """Train one seed into ``out``; the wall time in seconds (SystemExit with the trainer's last lines on failure)."""
    cmd = [sys.executable, "-m", "jqlora.train", "--config", config, "--no-progress", f"train.seed={seed}",
           f"output_dir={out}", *overrides]
    path = [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-5:])
        raise SystemExit(f"seed {seed}: the trainer exited {proc.returncode}:\n{tail}")
    if not quiet:
        print(f"seed {seed}: {wall:.0f} s", file=sys.stderr, flush=True)
    return wall


def per_step_completions(config: str, overrides: list[str]) -> int:
    """Completions per step: train.batch_size x train.grad_accum_steps of the config with the overrides."""
    from jqlora.config import load_config

    cfg = load_config(str(REPO / config) if not os.path.isabs(config) else config, overrides)
    return cfg.train.batch_size * cfg.train.grad_accum_steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo-grpo.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--window", type=int, default=10, help="steps averaged at the start and at the end")
    p.add_argument("--samples", type=int, default=3, help="completions shown before / after")
    p.add_argument("--keep", default=None, help="keep the run directories under this folder")
    p.add_argument("--report", default=None, help="train nothing: report the runs a --keep left in this folder")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides passed to every run")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    per_step = per_step_completions(args.config, args.overrides)
    tmp = None
    if args.report:
        root = Path(args.report)
    elif args.keep:
        root = Path(args.keep)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="grpo-learning-")
        root = Path(tmp.name)
    results = []
    try:
        for seed in args.seeds:
            out = root / f"seed-{seed}"
            if args.report:
                if not (out / "metrics.jsonl").is_file():
                    raise SystemExit(f"--report {args.report}: no {out}/metrics.jsonl")
                wall_file = out / WALL
                wall = float(wall_file.read_text()) if wall_file.is_file() else math.nan
            else:
                if out.exists() and any(out.iterdir()):
                    raise SystemExit(f"--keep {args.keep}: {out} is not empty (a run there would resume, not start)")
                wall = run_seed(args.config, seed, out, args.overrides, args.quiet)
                (out / WALL).write_text(f"{wall:.1f}\n")
            results.append((seed, wall, summarize(out, args.window, per_step), samples(out, args.samples)))
    finally:
        if tmp is not None:  # (each run's numbers and samples are read before its folder goes)
            tmp.cleanup()
    w = args.window
    print(f"{args.config} {' '.join(args.overrides)}".strip())
    print(f"mean reward of the first / last {w} steps ({w} x {per_step} completions each); se: per completion, "
          f"(per step)")
    print(f"{'seed':>4}  {'steps':>5}  {'first':>6}  {'se':>14}  {'last':>6}  {'se':>14}  {'rise/se':>7}  {'wall':>6}")
    for seed, wall, s, _ in results:
        f, last = s["first"], s["last"]
        rise = (last["mean"] - f["mean"]) / math.hypot(f["se"], last["se"])
        print(f"{seed:>4}  {s['steps']:>5}  {f['mean']:6.3f}  {f['se']:6.3f} ({f['se_steps']:.3f})  "
              f"{last['mean']:6.3f}  {last['se']:6.3f} ({last['se_steps']:.3f})  {rise:7.1f}  {'-' if math.isnan(wall) else f'{wall:.0f}s':>6}")
    for seed, _, _, smp in results:
        if smp is None:
            continue
        for label, g in zip(("before", "after"), smp):
            print(f"\nseed {seed}, {label} (step {g['step']}, group mean reward {g['group_mean']:.2f} of "
                  f"{g['group']}): {g['prompt']!r}")
            for c, r in zip(g["completions"], g["reward"]):
                print(f"  {r if r is None else f'{r:.1f}':>4}  {_text(c)!r}")


if __name__ == "__main__":
    main()
