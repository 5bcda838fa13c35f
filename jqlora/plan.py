"""`python -m jqlora.plan`: the per-device memory plan of a QLoRA run (`jqlora.planning.memory`), from a built-in
shape, a hub id, a recipe's name, a config.json or a run config, optionally beside the compiler's own peak
(`--compile`).

    python -m jqlora.plan --model llama3-70b --seq 2048 --batch 1 --fsdp 2 --remat full
    python -m jqlora.plan --model-config path/to/config.json --seq 2048 --batch 1
    python -m jqlora.plan --config configs/llama3-8b.yaml [key.sub=value ...] [--devices 8]
    python -m jqlora.plan --model llama3-70b --fsdp 8 --remat save_dots --compile --gpu h100-sxm  # deviceless mesh
    python -m jqlora.plan --model llama3-8b --max-seq --compile --gpu h100-sxm --memory 80  # the longest sequence

JAX is imported only after the arguments are parsed, so `--help` and argument errors are instant. The plan's
functions (`memory_plan`, `resolve_remat`, `BUILTIN`, ...) live in `jqlora.planning`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import TYPE_CHECKING, Any

from jqlora.config.schema import DTYPES, MEMORY_MODES, REMAT_POLICIES as REMATS
from jqlora.planning.lookup import UsageError as _Usage, cached_shape as _cached_shape, lookup_shape  # noqa: F401
from jqlora.planning.lookup import model_config_file as _model_config, model_json as _model_json
from jqlora.planning.model_shapes import PUBLISHED

if TYPE_CHECKING:
    from jqlora.models import ModelConfig
    from jqlora.planning import Plan


def _estimate_gpu(gpu: str | None) -> str:
    """The target whose figures the analytic step estimate uses: --gpu's, else an H100's."""
    from jqlora.planning.aot import GPUS

    if gpu is not None and gpu not in GPUS:
        raise _Usage(f"--gpu {gpu}: unknown; expected one of {', '.join(GPUS)}")
    return gpu or "h100-sxm"


EXIT_DOES_NOT_FIT = 3  # the plan (or the compiled peak) is over --memory / --gpu; 2 is a usage error


def _resolve_axis(value: Any, name: str, devices: int, others: int) -> int:
    if value == "auto":
        if devices % others:
            raise _Usage(f"mesh.{name}=auto: {devices} devices do not divide by the other axes ({others})")
        return devices // others
    return int(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m jqlora.plan", description=__doc__.split("\n")[0],
        epilog="exit status: 0 the plan (it fits), 3 it does NOT fit --memory (with --compile: the compiled peak does "
               "not fit --memory or the --gpu), 2 a usage error")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help=f"a built-in shape ({', '.join(PUBLISHED)}), a hub id such as "
                                     "meta-llama/Meta-Llama-3-8B (others are read from the local Hugging Face cache "
                                     "when there), a recipe's name (llama3-70b-fsdp2), or a local model directory")
    src.add_argument("--model-config", help="a Hugging Face config.json, its directory, or the JSON text itself")
    ap.add_argument("--config", help="a jqlora run config (YAML); overrides may follow. The shape comes from its "
                                     "model.path, or from --model / --model-config when that is not on this machine")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of --config")
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int, help="rows per device (default: 1, or a --config's train.batch_size split "
                                              "over its data × fsdp devices)")
    ap.add_argument("--data", default=None, help="mesh axis: data-parallel devices (or auto); --compile compiles the "
                                                  "mesh deviceless for --gpu")
    ap.add_argument("--fsdp", default=None, help="mesh axis: devices the weights are sharded over (or auto)")
    ap.add_argument("--tensor", default=None, help="mesh axis: tensor-parallel devices (or auto)")
    ap.add_argument("--seq-parallel", type=int, default=None, metavar="N",
                    help="mesh.seq: every row's tokens split over N devices (sequence parallelism; the heads must "
                         "divide by N); --compile compiles the mesh deviceless for --gpu")
    ap.add_argument("--devices", type=int, default=None, help="device count for 'auto' mesh axes (default 1)")
    ap.add_argument("--remat", choices=REMATS + ("auto",))
    ap.add_argument("--mode", choices=MEMORY_MODES, help="train.memory: min holds the embedding and lm_head "
                                                               "4-bit too (needs --remat full or offload)")
    ap.add_argument("--memory", type=float, help="GB per device: say whether the plan fits (and pick remat auto); "
                                                 "exit status 3 when it does NOT fit")
    ap.add_argument("--r", type=int)
    ap.add_argument("--dtype", choices=tuple(DTYPES))
    ap.add_argument("--quant", choices=("nf4", "fp4", "none"))
    ap.add_argument("--dropout", type=float, help="LoRA dropout (default 0, or the --config's)")
    ap.add_argument("--optimizer-state", choices=("auto", "float32", "bfloat16", "8bit"),
                    help="how the AdamW moments are stored (train.optimizer_state; default auto: 8bit with --mode min, "
                         "else float32; or the --config's)")
    ap.add_argument("--objective", choices=("sft", "grpo"), help="grpo: plan the rollout's KV cache of prompts × G "
                                                               "rows beside the train step (default: sft, or the --config's)")
    ap.add_argument("--generations", type=int, help="grpo: completions per prompt, G (default 8, or the --config's)")
    ap.add_argument("--new-tokens", type=int, help="grpo: tokens sampled per completion (default 256, or the "
                                                   "--config's grpo.max_new_tokens); --seq is the prompt's tokens")
    ap.add_argument("--prompts", type=int, help="grpo: prompts per generation batch, sampled at once (default: "
                                                "--batch / G, at least 1; or the --config's)")
    ap.add_argument("--compile", action="store_true", help="also compile the run's real train step (jqlora.planning.aot) and "
                                                           "print the compiler's peak beside the plan")
    ap.add_argument("--gpu", default=None, help="with --compile: the target GPU (h100-sxm, h200, a100-80gb, l4), "
                                                "compiled deviceless; default: this machine's own device")
    ap.add_argument("--max-seq", action="store_true", help="search the longest sequence whose plan (with --compile: "
                    "deviceless compiled peak) fits --memory / --gpu, with the long-context savings on; prints "
                    "'max seq: N tokens' (jqlora.planning.max_seq)")
    ap.add_argument("--grad-accum", type=int, default=None, dest="grad_accum",
                    help="train.grad_accum_steps (default 2, or the --config's); --mode min at 1 keeps no accumulator")
    ap.add_argument("--mlp-chunk", type=int, default=None, help="train.mlp_chunk (tokens; default 0: off, with "
                                                                "--max-seq 4096)")
    ap.add_argument("--offload-residual", action=argparse.BooleanOptionalAction, default=None,
                    help="train.offload_residual (default off, with --max-seq on; --mode min takes it)")
    args = ap.parse_intermixed_args(argv)  # (flags anywhere among the arguments)
    from jqlora import planning as M  # (after parsing: --help and usage errors need no JAX)

    try:
        settings: dict[str, Any] = dict(seq=2048, batch=1, data=1, fsdp=1, tensor=1, remat="full", r=16,
                                        dtype="bfloat16", quant="nf4", double_quant=True, block_size=64,
                                        targets=M.LINEARS, dropout=0.0, seq_parallel=1)
        if args.overrides and not args.config:
            raise _Usage(f"overrides {args.overrides} need --config")
        shape = None
        if args.config:
            from jqlora.config import ConfigError, load_config

            try:
                cfg = load_config(args.config, args.overrides)
            except ConfigError as e:
                raise _Usage(str(e)) from None
            model_path = cfg.model.path or ""
            path = os.path.join(model_path, "config.json")
            known = lookup_shape(os.path.basename(model_path.rstrip("/"))) if model_path else None
            if os.path.isfile(path):
                shape, name = _model_config(path), os.path.basename(model_path.rstrip("/"))
            elif not (args.model or args.model_config):
                if known is None:
                    raise _Usage(f"model.path {model_path or '(not set)'}: no config.json here and not a known "
                                 "model name; give the shape with --model or --model-config")
                shape, name = known  # the checkpoint is elsewhere: its published shape, by the directory's name
            settings.update(M.settings_from_config(cfg, {n: getattr(cfg.mesh, n) for n in ("data", "fsdp", "tensor")}),
                            remat=cfg.train.remat)
        if shape is None and args.model_config:
            shape, name = _model_json(args.model_config)
        elif shape is None and args.model and os.path.isfile(os.path.join(args.model, "config.json")):
            shape, name = _model_json(args.model)  # a local Hugging Face directory
        elif shape is None and args.model and os.path.isdir(args.model):
            raise _Usage(f"--model {args.model}: a directory without config.json (not a Hugging Face model directory)")
        elif shape is None and args.model and args.model.startswith((".", "/")):
            raise _Usage(f"--model {args.model}: no such directory")  # (a path, not a name or a hub id)
        elif shape is None:
            found = lookup_shape(args.model or "llama3-8b") or _cached_shape(args.model)
            if found is None:
                raise _Usage(f"--model {args.model}: unknown; expected one of {', '.join(PUBLISHED)}, a hub id such as "
                             "meta-llama/Meta-Llama-3-8B (or one in the local Hugging Face cache), a recipe's name, a local "
                             "model directory, or the shape with --model-config")
            shape, name = found
        for key in ("seq", "batch", "remat", "r", "dtype", "quant", "data", "fsdp", "tensor", "dropout",
                    "optimizer_state", "seq_parallel", "grad_accum"):
            if getattr(args, key) is not None:
                settings[key] = getattr(args, key)
        if args.mode is not None:  # train.memory
            settings["memory"] = args.mode
        if args.offload_residual is not None and not args.max_seq:  # (--max-seq sets both itself)
            settings["offload_residual"] = args.offload_residual
        if args.mlp_chunk is not None and not args.max_seq:
            settings["mlp_chunk"] = args.mlp_chunk
        if settings.get("memory", "default") == "min" and settings["remat"] not in ("full", "offload"):
            raise _Usage(f"--mode min takes --remat full (or offload), not {settings['remat']}")
        _grpo_settings(args, settings, cfg if args.config else None)
        devices = args.devices or 1
        axes = {}
        for axis in ("data", "fsdp", "tensor"):
            v = settings[axis]
            axes[axis] = v if v == "auto" else int(v)
        fixed = math.prod(v for v in axes.values() if v != "auto")
        for axis, v in axes.items():
            if v == "auto":
                axes[axis] = _resolve_axis("auto", axis, devices, fixed)
        settings.update(axes)
        if int(settings.get("grad_accum", 1)) < 1:
            raise _Usage(f"--grad-accum {settings['grad_accum']}: must be >= 1")
        n_seq = int(settings["seq_parallel"])
        if n_seq < 1:
            raise _Usage(f"--seq-parallel {n_seq}: must be >= 1")
        if n_seq > 1:  # (ValueError: one line naming mesh.seq and the head counts)
            from jqlora.parallel.mesh import check_seq_heads

            check_seq_heads(n_seq, int(axes["tensor"]), shape.num_attention_heads, shape.num_key_value_heads)
            if int(settings["seq"]) % n_seq:
                raise _Usage(f"--seq {settings['seq']} is not divisible by --seq-parallel {n_seq}")
        if args.config and args.batch is None:  # the recipe's global micro-batch, split over data × fsdp
            per_example = 1 if cfg.train.objective in ("sft", "grpo") else 2  # (preference: pairs of 2 rows)
            settings["batch"] = max(1, cfg.train.batch_size // (axes["data"] * axes["fsdp"])) * per_example
        if settings["quant"] == "none":
            settings["double_quant"] = False
        budget = args.memory * 1e9 if args.memory is not None else None
        if budget is None and args.compile and args.gpu is not None:
            from jqlora.planning.aot import GPUS

            if args.gpu not in GPUS:
                raise _Usage(f"--gpu {args.gpu}: unknown; expected one of {', '.join(GPUS)}")
            budget = GPUS[args.gpu].memory_bytes
        auto = settings["remat"] == "auto"
        if auto:
            if budget is None:
                raise _Usage("remat auto picks by the device's memory: give it with --memory GB")
            settings.pop("remat")
            ranking = M.rank_remat(shape, budget, gpu=_estimate_gpu(args.gpu), name=name, **settings)
            chosen = M.pick(ranking).policy
            print(f"remat auto -> {chosen} (the fastest analytic step estimate on {_estimate_gpu(args.gpu)} among "
                  f"{', '.join(M.AUTO_ORDER)} whose plan fits {M.HEADROOM:.0%} of {budget / 1e9:.1f} GB)")
            for line in M.ranking_lines(ranking):
                print(f"  {line}")
            plan = M.memory_plan(shape, name=name, **settings, remat=chosen)
            settings["remat"] = chosen
        elif args.max_seq:
            return _max_seq(args, shape, name, settings, budget, cfg if args.config else None)
        else:
            plan = M.memory_plan(shape, name=name, **settings)
    except _Usage as e:
        print(f"jqlora.plan: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"jqlora.plan: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(plan.table())
    fits = True
    if budget is not None:
        fits = plan.total <= M.HEADROOM * budget
        print(f"{'fits' if fits else 'does NOT fit'}: {plan.total / 1e9:.2f} GB planned, {M.HEADROOM:.0%} of "
              f"{budget / 1e9:.1f} GB = {M.HEADROOM * budget / 1e9:.2f} GB usable per device")
    if args.compile:
        try:
            # (the compiled peak, when there is one, decides)
            fits = _print_compiled(args, shape, name, settings, plan, budget, cfg if args.config else None, auto)
        except _Usage as e:
            print(f"jqlora.plan: {e}", file=sys.stderr)
            return 2
    return 0 if fits else EXIT_DOES_NOT_FIT


def _max_seq(args, shape: ModelConfig, name: str, settings: dict[str, Any], budget: float | None,
             cfg: Any | None) -> int:
    """--max-seq: the longest sequence within the budget (`jqlora.planning.max_seq`)."""
    from jqlora.planning import aot, max_seq

    if budget is None:
        raise _Usage("--max-seq searches within a budget: give --memory GB (or --compile with --gpu)")
    if settings.get("objective") == "grpo":
        raise _Usage("--max-seq covers train.objective=sft")
    chunk = args.mlp_chunk if args.mlp_chunk is not None else max_seq.LONG_MLP_CHUNK
    offload = args.offload_residual if args.offload_residual is not None else settings["remat"] != "none"
    if chunk < 0:
        raise _Usage(f"--mlp-chunk {chunk}: must be >= 0 (0: off)")
    if offload and settings["remat"] == "none":
        raise _Usage("--offload-residual needs a remat policy other than none")
    run = None
    if args.compile:
        if args.gpu is None:
            raise _Usage("--max-seq --compile compiles deviceless for a named GPU: give --gpu")
        run = _compile_run_config(settings, cfg)
    try:
        ok, lines = max_seq.longest(shape, name, settings, budget, chunk=chunk, offload=offload, run=run, gpu=args.gpu)
    except aot.AotError as e:
        raise _Usage(str(e)) from None
    print("\n".join(lines))
    return 0 if ok else EXIT_DOES_NOT_FIT


def _grpo_settings(args, settings: dict[str, Any], cfg: Any | None) -> None:
    """--objective grpo and its flags into the plan's settings (the --config's grpo section by default)."""
    grpo = args.objective == "grpo" or (args.objective is None and settings.get("objective") == "grpo")
    flags = {"--generations": args.generations, "--new-tokens": args.new_tokens, "--prompts": args.prompts}
    if not grpo:
        given = [k for k, v in flags.items() if v is not None]
        if given:
            raise _Usage(f"{', '.join(given)}: only with --objective grpo")
        for key in ("objective", "new_tokens", "rollout_rows"):
            settings.pop(key, None)
        return
    for flag, v in flags.items():
        if v is not None and v < 1:
            raise _Usage(f"{flag} {v}: must be >= 1")
    g = cfg.grpo if cfg is not None and cfg.train.objective == "grpo" else None
    G = args.generations or (g.num_generations if g else 8)
    settings["objective"] = "grpo"
    settings["new_tokens"] = args.new_tokens or (g.max_new_tokens if g else 256)
    if args.prompts is not None or g is None or args.generations is not None:
        prompts = args.prompts or max(1, int(settings["batch"]) // G)
        settings["rollout_rows"] = prompts * G
    settings.setdefault("rollout_rows", int(settings["batch"]))


def _on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def _compile_run_config(settings: dict[str, Any], cfg: Any | None) -> Any:
    """The run config whose step is compiled: the --config's (or the defaults), with the plan's settings."""
    from jqlora import planning as M

    import dataclasses as dc

    from jqlora.config import Config

    cfg = cfg if cfg is not None else Config()  # the defaults, as load_config(None) gives them (no omegaconf needed)
    targets = settings["targets"]
    lora_targets = "all-linear" if tuple(targets) == tuple(M.LINEARS) else tuple(targets)
    batch = int(settings["batch"])  # rows; a preference step takes pairs (chosen and rejected rows)
    if settings.get("objective") == "grpo":
        if batch < 2 or settings["rollout_rows"] % batch:
            raise _Usage(f"--batch {batch}: a GRPO micro-batch holds whole groups of >= 2 completions and divides "
                         f"the rollout's {settings['rollout_rows']} rows (--prompts x --generations)")
        G = batch  # (the config's check only: the compiled shapes are the plan's rows)
        grpo = dc.replace(cfg.grpo, rewards=cfg.grpo.rewards or ("none:none",), max_new_tokens=settings["new_tokens"],
                          num_generations=G)
        cfg = dc.replace(cfg, grpo=grpo, train=dc.replace(
            cfg.train, objective="grpo", batch_size=batch, grad_accum_steps=settings["rollout_rows"] // batch))
    elif cfg.train.objective != "sft":
        if batch % 2:
            raise _Usage(f"--batch {batch}: train.objective={cfg.train.objective} compiles pairs of 2 rows; give an "
                         "even number of rows")
        batch //= 2
    return dc.replace(
        cfg, data=dc.replace(cfg.data, max_length=settings["seq"]),
        train=dc.replace(cfg.train, batch_size=batch, memory=settings.get("memory", "default"),
                         remat="full" if settings.get("memory") == "min" else cfg.train.remat,
                         optimizer_state=settings.get("optimizer_state", cfg.train.optimizer_state),
                         offload_residual=bool(settings.get("offload_residual", cfg.train.offload_residual)),
                         mlp_chunk=int(settings.get("mlp_chunk", cfg.train.mlp_chunk)),
                         grad_accum_steps=cfg.train.grad_accum_steps if settings.get("objective") == "grpo"
                         else int(settings.get("grad_accum", cfg.train.grad_accum_steps))),
        lora=dc.replace(cfg.lora, r=settings["r"], targets=lora_targets, dropout=settings["dropout"]),
        model=dc.replace(cfg.model, dtype=settings["dtype"], quant=settings["quant"],
                         double_quant=settings["double_quant"], block_size=settings["block_size"]))


def _print_compiled(args, shape: ModelConfig, name: str, settings: dict[str, Any], plan: Plan,
                    budget: float | None, cfg: Any | None, auto: bool) -> bool:
    """--compile: the compiler's peak of the run's step beside the analytic plan (per device; a mesh is compiled
    deviceless for ``--gpu``); False when a budget is given and the peak does not fit it."""
    from jqlora import planning as M

    from jqlora.planning import aot

    axes = {a: int(settings[a]) for a in ("data", "fsdp", "tensor")}
    seq_parallel = int(settings.get("seq_parallel", 1))
    on_mesh = any(v != 1 for v in axes.values()) or seq_parallel > 1
    if on_mesh and args.gpu is None:
        raise _Usage("--compile on a mesh (--data / --fsdp / --tensor) compiles deviceless for a named GPU: give --gpu")
    if args.gpu is not None and args.gpu not in aot.GPUS:
        raise _Usage(f"--gpu {args.gpu}: unknown; expected one of {', '.join(aot.GPUS)}")
    run = _compile_run_config(settings, cfg)
    where = args.gpu or "this machine's device"
    if settings.get("objective") == "grpo":
        return _print_compiled_grpo(args, shape, name, settings, run, budget, where)
    remat = settings["remat"]
    if on_mesh:  # the step of the whole mesh: train.batch_size is the global micro-batch
        import dataclasses as dc

        run = dc.replace(run, train=dc.replace(run.train, batch_size=run.train.batch_size * axes["data"] * axes["fsdp"]))
        seq_axis = f" x seq {seq_parallel}" if seq_parallel > 1 else ""  # (named only when it is used)
        where = (f"{math.prod(axes.values()) * seq_parallel} x {args.gpu} (data {axes['data']} x fsdp "
                 f"{axes['fsdp']}{seq_axis} x tensor {axes['tensor']}), per device")
        if auto:
            print(f"remat auto on a mesh: {remat} from the analytic plan (the compiled ranking covers one device)")
    try:
        if on_mesh:
            plan = M.memory_plan(shape, name=name, **{**settings, "remat": remat, "attention": "cudnn"})
            c = aot.compiled_mesh(shape, run, args.gpu, remat, axes["data"], axes["fsdp"], axes["tensor"],
                                  seq_parallel)
            figures = {**c.memory, "peak": c.peak_bytes}
        elif auto:
            remat, peak, tried = M.choose_remat_compiled(shape, run, budget, args.gpu)
            print(f"remat auto (compiled) -> {remat}: the fastest roofline estimate of the compiled step among the "
                  f"policies whose compiled peak fits {M.COMPILED_HEADROOM:.0%} of {budget / 1e9:.1f} GB")
            for line in tried:
                print(f"  {line}")
        if not on_mesh:
            attention = "cudnn" if args.gpu is not None or _on_gpu() else "xla"  # what the compiled step runs
            plan = M.memory_plan(shape, name=name, **{**settings, "remat": remat, "attention": attention})
            figures = aot.compiled_peak(shape, run, args.gpu, remat)
    except aot.AotError as e:
        raise _Usage(str(e)) from None
    peak = figures["peak"]
    print(f"compiled for {where} ({name}, remat={remat}): peak {peak / 1e9:.2f} GB = arguments "
          f"{figures['argument'] / 1e9:.2f} + temporaries {figures['temp'] / 1e9:.2f} + outputs "
          f"{figures['output'] / 1e9:.2f} - aliased {figures['alias'] / 1e9:.2f}; plan {plan.total / 1e9:.2f} GB "
          f"({(plan.total - peak) / peak:+.1%})")
    return _compiled_fits(peak, budget)


def _print_compiled_grpo(args, shape, name: str, settings: dict[str, Any], run: Any, budget: float | None,
                         where: str) -> bool:
    """--compile with --objective grpo: the compiled peaks of the train micro-step and of the rollout (its KV cache
    included) beside the plan's two phases; the run needs the larger."""
    from jqlora import planning as M

    from jqlora.planning import aot, aot_grpo

    if settings["remat"] == "auto":
        raise _Usage("--compile with --objective grpo needs a concrete --remat")
    shapes = aot_grpo.grpo_shapes(run, rows=int(settings["batch"]), rollout_rows=int(settings["rollout_rows"]))
    attention = "cudnn" if args.gpu is not None or _on_gpu() else "xla"
    phases = M.memory_plan(shape, name=name, **{**settings, "attention": attention}).phase_totals()
    try:
        peaks = {"train": aot_grpo.compile_grpo_step(shape, run, args.gpu, shapes=shapes).peak_bytes,
                 "rollout": aot_grpo.compile_rollout(shape, run, args.gpu, shapes=shapes).peak_bytes}
    except aot.AotError as e:
        raise _Usage(str(e)) from None
    for phase, peak in peaks.items():
        print(f"compiled {phase} for {where} ({name}): peak {peak / 1e9:.2f} GB; plan {phases[phase] / 1e9:.2f} GB")
    peak = max(peaks.values())
    return _compiled_fits(peak, budget)


def _compiled_fits(peak: float, budget: float | None) -> bool:
    """Whether a compiled peak fits ``budget`` bytes (True without one), with the verdict printed."""
    from jqlora import planning as M

    if budget is None:
        return True
    verdict = "fits" if peak <= M.COMPILED_HEADROOM * budget else "does NOT fit"
    print(f"{verdict}: compiled peak {peak / 1e9:.2f} GB, {M.COMPILED_HEADROOM:.0%} of {budget / 1e9:.2f} GB = "
          f"{M.COMPILED_HEADROOM * budget / 1e9:.2f} GB usable")
    return verdict == "fits"


if __name__ == "__main__":
    from jqlora.cli import run

    run(main)  # (sys.exit(main()), quiet when a pipe's reader has gone: `... | head`)
