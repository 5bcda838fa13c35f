#!/usr/bin/env python
"""What a GRPO step costs: rollout and training apart (measured), or the compiled peaks of both programs on a GPU.

    python tools/grpo_cost.py                                 # configs/demo-grpo.yaml's shapes, a few steps here
    python tools/grpo_cost.py --steps 6 train.batch_size=16   # overrides of the config follow
    python tools/grpo_cost.py --model llama3-8b --gpu h100-sxm --generations 8 --new-tokens 512   # aot venv

Measured mode runs `jqlora.run.grpo.GRPOTrainer` on the config (the demo base by default) for ``--steps`` steps in a
scratch directory and times each step's phases: the rollout (`GRPOTrainer.rollout`: prefill, the token loop and
the copy back to the host), the scoring (reward functions, advantages) and the training (the μ · k jitted
micro-steps, and the old / reference log-probs when there are any). The first ``--warmup`` steps (compiles) are left
out. Reported: generation tokens/s (completion tokens sampled / rollout time), training tokens/s (prompt + completion
tokens · μ / training time, the trainer's own ``training_tokens_per_s``) and each phase's share of the step.

``--gpu NAME`` compiles the two programs of a GRPO run deviceless for that GPU instead
(`jqlora.planning.aot_grpo`, needs the aot venv: Python 3.12, jax[cuda13]) at a published shape: the train
micro-step on ``--batch`` completion rows, and the rollout of ``--prompts`` × ``--generations`` rows with its KV
cache. It prints each program's compiled peak (arguments + temporaries + outputs - donated) beside the memory plan
(`jqlora.planning.grpo_plan`), and the KV cache's bytes.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def measure(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """Per-phase seconds and tokens of ``steps`` GRPO steps (after ``warmup`` more) of the run config."""
    import jax
    import numpy as np

    from jqlora.config import load_config
    from jqlora.run import GRPOTrainer

    os.chdir(REPO)  # (the config's relative paths)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [*overrides, f"output_dir={out}", f"train.max_steps={warmup + steps}",
                                   "train.save_every=0", "log.tensorboard=false"])
        trainer = GRPOTrainer(cfg, progress=False, export=False)
        trainer.maybe_resume()
        phase = {}
        rollout, score = trainer.rollout, trainer.score

        def timed(name, fn):
            def run(*a):
                t = time.perf_counter()
                r = fn(*a)
                phase[name] = phase.get(name, 0.0) + time.perf_counter() - t
                return r
            return run

        trainer.rollout, trainer.score = timed("rollout", rollout), timed("score", score)
        rows = []
        try:
            for i in range(warmup + steps):
                phase.clear()
                t = time.perf_counter()
                _, trained, tokens = trainer.one_step()
                jax.effects_barrier()
                step_s = time.perf_counter() - t
                rec = trainer._window_metrics[-1]
                ro = trainer.last_rollout[1]
                rows.append({"step": i + 1, "step_s": step_s, "rollout_s": phase["rollout"], "score_s": phase["score"],
                             "train_s": step_s - phase["rollout"] - phase["score"],
                             "completion_tokens": int(ro.completion_mask.sum()), "tokens": tokens,
                             "generation_tokens_per_s": rec["generation_tokens_per_s"],
                             "training_tokens_per_s": rec["training_tokens_per_s"],
                             "reward": rec["reward"], "rows": int(ro.completion_mask.shape[0])})
        finally:
            trainer.run_dir.close()
        g = cfg.grpo
        kept = rows[warmup:]
        total = {k: float(np.sum([r[k] for r in kept])) for k in ("step_s", "rollout_s", "score_s", "train_s",
                                                                  "completion_tokens", "tokens")}
        return {"config": config, "overrides": overrides, "device": str(jax.devices()[0].device_kind),
                "backend": jax.default_backend(), "cpus": os.cpu_count(), "steps": rows, "warmup": warmup,
                "shapes": {"rollout_rows": rows[-1]["rows"], "num_generations": g.num_generations,
                           "max_new_tokens": g.max_new_tokens, "micro_batch": cfg.train.batch_size,
                           "grad_accum": cfg.train.grad_accum_steps, "num_iterations": g.num_iterations},
                "generation_tokens_per_s": total["completion_tokens"] / total["rollout_s"],
                "training_tokens_per_s": total["tokens"] * g.num_iterations / total["train_s"],
                "generation_share": total["rollout_s"] / total["step_s"],
                "scoring_share": total["score_s"] / total["step_s"],
                "training_share": total["train_s"] / total["step_s"], "step_s": total["step_s"] / len(kept),
                # (a shared machine's slow steps aside: the median step's phases)
                "median": {k: float(np.median([r[k] for r in kept])) for k in ("step_s", "rollout_s", "train_s")}}


def compiled(args) -> dict:
    """The compiled peaks of the GRPO train micro-step and of the rollout at a published shape, with the plan."""
    from jqlora.config import load_config
    from jqlora.planning import BUILTIN, aot_grpo, memory_plan, settings_from_config

    rows = args.prompts * args.generations
    if rows % args.batch:
        raise ValueError(f"--prompts {args.prompts} x --generations {args.generations} = {rows} rollout rows do not "
                         f"split into micro-batches of --batch {args.batch}")
    cfg = load_config(None, ["model.path=/not/needed", f"data.max_length={args.prompt_length}",
                             "train.objective=grpo", f"train.batch_size={args.batch}",
                             f"train.grad_accum_steps={rows // args.batch}", f"grpo.num_generations={args.generations}",
                             f"grpo.max_new_tokens={args.new_tokens}", "grpo.rewards=[none:none]",
                             f"train.remat={args.remat}", "lora.r=16", "lora.alpha=32", "lora.dropout=0",
                             "lora.targets=all-linear", "model.quant=nf4", "model.double_quant=true",
                             "model.dtype=bfloat16"])
    shape = BUILTIN[args.model]
    shapes = aot_grpo.grpo_shapes(cfg)
    plan = memory_plan(shape, **settings_from_config(cfg), name=args.model, attention="cudnn")
    out = {"model": args.model, "gpu": args.gpu, "shapes": vars(shapes) | {"cache_slots": shapes.cache_slots},
           "plan": {"total": plan.total, "rows": plan.rows, "phases": plan.phase_totals()}}
    for name, fn in (("train_step", aot_grpo.compile_grpo_step), ("rollout", aot_grpo.compile_rollout)):
        t = time.perf_counter()
        c = fn(shape, cfg, args.gpu, shapes=shapes)
        out[name] = {**c.memory, "peak": c.peak_bytes, "compile_s": time.perf_counter() - t}
        print(f"  compiled {name}: peak {c.peak_bytes / 2**30:.2f} GiB in {out[name]['compile_s']:.0f} s",
              file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo-grpo.yaml"))
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of --config (measured mode)")
    p.add_argument("--steps", type=int, default=4, help="steps measured (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out (they compile)")
    p.add_argument("--gpu", default=None, help="compile deviceless for this GPU (h100-sxm, h200, a100-80gb, l4)")
    p.add_argument("--model", default="llama3-8b", help="with --gpu: a built-in shape (jqlora.planning.BUILTIN)")
    p.add_argument("--generations", type=int, default=8, help="with --gpu: G")
    p.add_argument("--new-tokens", type=int, default=512, help="with --gpu: grpo.max_new_tokens")
    p.add_argument("--prompt-length", type=int, default=512, help="with --gpu: prompt tokens (data.max_length)")
    p.add_argument("--prompts", type=int, default=4, help="with --gpu: prompts per generation batch")
    p.add_argument("--batch", type=int, default=8, help="with --gpu: completion rows per micro-step")
    p.add_argument("--remat", default="full", choices=("none", "full", "save_dots", "save_dots_no_batch"))
    p.add_argument("--out", default=None, help="write the JSON results here")
    args = p.parse_intermixed_args(argv)
    if args.gpu is not None:
        from jqlora.planning import BUILTIN, aot

        if args.gpu not in aot.GPUS or args.model not in BUILTIN:
            print(f"grpo_cost: --gpu {args.gpu} / --model {args.model}: expected a GPU of {', '.join(aot.GPUS)} and "
                  f"a model of {', '.join(BUILTIN)}", file=sys.stderr)
            return 2
        try:
            res = compiled(args)
        except (aot.AotError, ValueError) as e:
            print(f"grpo_cost: {e}", file=sys.stderr)
            return 2
        s, gib = res["shapes"], 2**30
        print(f"{args.model} on {args.gpu} (deviceless): {args.prompts} prompts x G={args.generations}, prompt "
              f"{args.prompt_length} -> {s['prompt']} slots, {args.new_tokens} new -> {s['completion']}, cache "
              f"{s['cache_slots']} slots; train micro-step {args.batch} rows, remat={args.remat}")
        print("| program | arguments GiB | temporaries GiB | peak GiB | plan GiB |")
        print("|---|---|---|---|---|")
        for name, phase in (("train_step", "train"), ("rollout", "rollout")):
            r = res[name]
            print(f"| {name} | {r['argument'] / gib:.2f} | {r['temp'] / gib:.2f} | {r['peak'] / gib:.2f} | "
                  f"{res['plan']['phases'][phase] / gib:.2f} |")
        kv = next(v for k, v in res["plan"]["rows"].items() if k.startswith("rollout: KV cache"))
        print(f"KV cache (prompts x G = {s['rollout_rows']} rows): {kv / gib:.2f} GiB; the run's peak is the larger "
              f"program's: {max(res['train_step']['peak'], res['rollout']['peak']) / gib:.2f} GiB of "
              f"{aot.GPUS[args.gpu].memory_bytes / gib:.0f} GiB")
    else:
        res = measure(args.config, args.overrides, args.steps, args.warmup)
        s = res["shapes"]
        print(f"{Path(args.config).name} on {res['device']} ({res['backend']}, {res['cpus']} CPUs): "
              f"{s['rollout_rows']} rollouts of <= {s['max_new_tokens']} tokens per step (G={s['num_generations']}), "
              f"{s['grad_accum']} x {s['micro_batch']} rows trained x mu={s['num_iterations']}; {args.steps} steps "
              f"after {args.warmup} warm-up")
        print("| step | s | rollout s | score s | train s | completion tokens | reward |")
        print("|---|---|---|---|---|---|---|")
        for r in res["steps"][res["warmup"]:]:
            print(f"| {r['step']} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['score_s']:.3f} | "
                  f"{r['train_s']:.2f} | {r['completion_tokens']} | {r['reward']:.3f} |")
        print(f"generation {res['generation_tokens_per_s']:.0f} tok/s, training {res['training_tokens_per_s']:.0f} "
              f"tok/s; generation {res['generation_share']:.0%} of the step time, scoring "
              f"{res['scoring_share']:.1%}, training {res['training_share']:.0%} ({res['step_s']:.2f} s a step)")
        m, last = res["median"], res["steps"][-1]
        print(f"median step {m['step_s']:.2f} s: rollout {m['rollout_s']:.2f} s "
              f"({last['completion_tokens'] / m['rollout_s']:.0f} tok/s), training {m['train_s']:.2f} s "
              f"({last['tokens'] * s['num_iterations'] / m['train_s']:.0f} tok/s), generation "
              f"{m['rollout_s'] / m['step_s']:.0%} of the step")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), **res}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
