"""`python -m jqlora.eval`: lm-eval-harness tasks on jqlora's own model (the NF4 or float base plus an adapter), in JAX.

    python -m jqlora.eval --model DIR [--adapter DIR] --tasks hellaswag,arc_easy [--limit 100] [--batch-size 8]
    python -m jqlora.eval --run RUN_DIR [--step N] --tasks my_task --include-path my_tasks/
    python -m jqlora.eval --model DIR --tasks path/to/task.yaml --log-samples --output-path results/

The model is lm-eval's ``"jqlora"`` (`jqlora.evaluation.JqloraLM`): requests are scored and decoded by jqlora's model
and KV-cache decoder, no merge and no PyTorch model. ``--run`` evaluates a training run's adapter at ``--step`` (default
the latest checkpoint) on the run's own base, loaded as trained. lm-eval's results table is printed and its results
written to ``OUTPUT_PATH/results_<time>.json`` (with ``--log-samples`` each task's samples beside it, as JSON lines).
Tasks and the adapter are checked before JAX and the weights load; a mistake is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jqlora.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="Hugging Face or jqlora model directory (the base; not with --run: the run's)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="peft LoRA adapter directory")
    src.add_argument("--run", help="a training run directory (or a checkpoint in it): its adapter on its base")
    p.add_argument("--step", type=int, help="with --run: the checkpoint step (default: the latest)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, globs or task YAML files")
    p.add_argument("--include-path", help="a folder of task YAMLs (your own tasks), as lm-eval's --include_path")
    p.add_argument("--limit", type=float, help="at most N documents per task (a fraction below 1: that share)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (padded to it: one compile per shape)")
    p.add_argument("--max-length", type=int, help="context length (default: the model's max_position_embeddings)")
    p.add_argument("--max-gen-toks", type=int, default=256, help="new tokens of a generation task that sets none")
    p.add_argument("--quant", choices=("nf4", "fp4", "none"), help="how to load the base (default nf4; --run: as "
                                                                       "trained)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="compute dtype (not with --run: the run's)")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts with the tokenizer's template")
    p.add_argument("--log-samples", action="store_true", help="also write every request and response")
    p.add_argument("--output-path", help="folder for the results JSON (default: RUN/eval with --run, else "
                                         "./eval_results)")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="for the standard errors (0: none)")
    p.add_argument("--seed", type=int, default=0)
    return p


class UsageError(Exception):
    """A user's mistake: printed as one line, exit status 2."""


def _check(args) -> None:
    from jqlora.generate import UsageError as AdapterUsage
    from jqlora.generate import check_adapter

    if args.run is None and args.model is None:
        raise UsageError("give --model DIR (with --adapter DIR) or --run RUN_DIR")
    if args.run is not None and args.model is not None:
        raise UsageError("--model does not go with --run: a run is evaluated on the base it trained on (model.path)")
    if args.step is not None and args.run is None:
        raise UsageError("--step goes with --run")
    if args.run is not None and args.dtype != "bfloat16":
        raise UsageError("--dtype does not go with --run: the run's model is evaluated in its own compute dtype")
    for flag, path in (("--model", args.model), ("--adapter", args.adapter), ("--run", args.run)):
        if path is not None and not os.path.isdir(path):
            raise UsageError(f"{flag} {path}: not a directory")
    if args.batch_size < 1 or (args.limit is not None and args.limit <= 0):
        raise UsageError("need --batch-size >= 1 and --limit > 0")
    if args.max_length is not None and args.max_length <= args.max_gen_toks:
        raise UsageError(f"--max-length {args.max_length} must exceed --max-gen-toks {args.max_gen_toks}")
    if args.adapter is not None:
        try:
            check_adapter(args.model, args.adapter)  # (seconds, before JAX and the weights)
        except AdapterUsage as e:
            raise UsageError(str(e)) from None


def _table(results: dict) -> str:
    """lm-eval's results table (and groups table). Its writer (pytablewriter, through DataProperty < 1.0, which pip
    picks where python-dateutil >= 3 is installed) converts cells in a process pool of cpu_count() workers: a fork
    after JAX has started its threads, which can deadlock. One worker converts them in this process."""
    from unittest import mock

    from lm_eval.utils import make_table

    with mock.patch("multiprocessing.cpu_count", return_value=1):
        tables = [make_table(results)] + ([make_table(results, "groups")] if results.get("groups") else [])
    return "\n".join(tables)


def _write_results(results: dict, out_dir: str) -> str:
    """results (lm-eval's dict, samples apart) to ``out_dir/results_<time>.json``, atomically; samples as JSON lines."""
    from lm_eval.utils import handle_non_serializable

    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    samples = results.pop("samples", None) or {}
    path = os.path.join(out_dir, f"results_{stamp}.json")
    n = 1
    while os.path.exists(path):  # (never over an earlier result)
        path, n = os.path.join(out_dir, f"results_{stamp}-{n}.json"), n + 1
    stem = path[:-len(".json")].replace("results_", "samples_", 1)
    files = {path: json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"}
    for task, rows in samples.items():
        files[f"{stem}_{task}.jsonl"] = "".join(
            json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows)
    for name, text in files.items():
        tmp = f"{name}.partial"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, name)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        _check(args)
        try:
            from jqlora.evaluation import JqloraLM, TaskError, evaluate, resolve_tasks
        except ImportError as e:
            raise UsageError(f"python -m jqlora.eval needs lm-eval: pip install 'jqlora[eval]' ({e})") from None
        try:  # (the tasks before the weights: a typo costs seconds)
            tasks, manager = resolve_tasks(args.tasks.split(","), args.include_path)
        except TaskError as e:
            raise UsageError(str(e)) from None
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        knobs = dict(batch_size=args.batch_size, max_length=args.max_length, max_gen_toks=args.max_gen_toks,
                     seed=args.seed)

        from jqlora import compile_cache

        compile_cache.enable()  # (before the first compilation)
        try:
            if args.run is not None:
                from jqlora.run import find_run, restore_for_export

                run_dir, _ = find_run(args.run, args.step)
                model, cfg, step = restore_for_export(args.run, step=args.step, quant=args.quant)
                lm = JqloraLM(model=model, tokenizer=cfg.model.tokenizer_path or cfg.model.path,
                              generation_config=cfg.model.path, **knobs)
                out_dir = args.output_path or os.path.join(run_dir, "eval")
                print(f"evaluating {run_dir} at step {step}", file=sys.stderr)
            else:
                lm = JqloraLM(pretrained=args.model, adapter=args.adapter, quant=args.quant or "nf4",
                              dtype=args.dtype, **knobs)
                out_dir = args.output_path or "eval_results"
        except (ValueError, OSError) as e:  # ConvertError / AdapterError / ExportError / RunDirError: ValueErrors
            raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        # lm-eval's bootstrap forks a process pool by default: after JAX has started its threads that can deadlock
        os.environ.setdefault("DISABLE_MULTIPROC", "1")
        results = evaluate(lm, tasks, manager, limit=limit, num_fewshot=args.num_fewshot,
                           log_samples=args.log_samples, apply_chat_template=args.apply_chat_template,
                           bootstrap_iters=args.bootstrap_iters, seed=args.seed)
        print(_table(results))
        print(f"wrote {_write_results(results, out_dir)}")
        return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    from jqlora.cli import run

    run(main)  # (sys.exit(main()), quiet when a pipe's reader has gone: `... | head`)
