"""`python -m jqlora.train ... --dry-run`: what the run would do, without loading a single weight.

Prints the resolved config, the dataset statistics (rows, trained tokens, truncations, packing efficiency; per
source when data.path or data.eval_path is a list, with each source's share of a mixture's rows), two
rendered training examples with the trained tokens marked [[like this]], the warnings the run would give, what would
happen to output_dir, and the per-device memory plan (`jqlora.plan`) of the model's shape from its config.json.
"""

from __future__ import annotations

import os

from jqlora.data import stats
from jqlora.config import config_to_yaml


class DryRunError(ValueError):
    """A user mistake found by the dry run: one line, exit code 2."""


def _output_dir_line(cfg) -> str:
    from jqlora.config import resume_conflicts
    from jqlora.run.directory import RunDirError, dir_kind, read_saved_config

    out, tc = cfg.output_dir, cfg.train
    kind = dir_kind(out)
    if kind == "empty":
        return f"output_dir {out}: empty, a fresh run"
    if tc.overwrite:
        return f"output_dir {out}: not empty; train.overwrite=true would move it aside and start afresh"
    if kind == "foreign":
        return f"output_dir {out}: not empty and not a jqlora run: the run would be refused"
    if not tc.resume:
        return f"output_dir {out}: holds a run and train.resume=false: the run would be refused"
    try:
        conflicts = resume_conflicts(read_saved_config(out), cfg)
    except RunDirError as e:
        return str(e)
    if conflicts:
        return (f"output_dir {out}: holds a run with another config ({', '.join(k for k, _, _ in conflicts)}): "
                "the run would be refused")
    return f"output_dir {out}: holds this run: it would resume from its latest checkpoint"


def dry_run(cfg, out=print) -> int:
    from jqlora.data import BatchIterator, DataError, build_datasets
    from jqlora.training import optim

    from jqlora.run.model import ensure_demo_model

    ensure_demo_model(cfg.model.path)  # (the demo's tiny base is built on first use, as training would)
    model_json = os.path.join(cfg.model.path, "config.json")
    if not os.path.isfile(model_json):
        raise DryRunError(f"model.path {cfg.model.path}: no config.json (not a Hugging Face checkpoint directory)")
    out("# resolved config")
    out(config_to_yaml(cfg).rstrip())
    if cfg.train.objective == "grpo":
        return _grpo_dry_run(cfg, out)
    if cfg.train.objective != "sft":
        return _preference_dry_run(cfg, out)
    try:
        tokenizer = _tokenizer(cfg)
        train_ds, eval_ds = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
        _check_ids(cfg, tokenizer, train_ds, eval_ds)
    except DataError as e:
        raise DryRunError(str(e).splitlines()[0]) from None
    out("\n# data")
    many = isinstance(cfg.data.path, list)
    out(stats.format_stats(f"train ({len(cfg.data.path)} sources)" if many else f"train ({cfg.data.path})",
                           stats.dataset_stats(train_ds)))
    for line in stats.source_lines(train_ds):
        out(line)
    if eval_ds is not None:
        where = (f"{len(cfg.data.eval_path)} sources" if isinstance(cfg.data.eval_path, list) else cfg.data.eval_path
                 or (f"split {cfg.data.eval_split}" if cfg.data.eval_split
                     else f"{cfg.data.eval_fraction:g} of the training examples"))
        out(stats.format_stats(f"eval ({where})", stats.dataset_stats(eval_ds)))
        for line in stats.source_lines(eval_ds):
            out(line)
    else:
        out("eval: none (set data.eval_path, data.eval_split or data.eval_fraction)")
    batches = BatchIterator(train_ds, cfg.train.batch_size, seed=cfg.train.seed,
                            shuffle=cfg.data.shuffle).batches_per_epoch
    total = optim.total_optimizer_steps(cfg.train, batches)
    out(f"{total} optimizer steps of {cfg.train.batch_size} x {cfg.train.grad_accum_steps} rows "
        f"({total * cfg.train.batch_size * cfg.train.grad_accum_steps / max(len(train_ds), 1):.2f} epochs)")
    for i, ex in enumerate(train_ds.examples[:2]):
        out(f"\n# example {i + 1} ({ex.where}); trained tokens in [[...]]")
        out(stats.render_example(tokenizer, ex))
    out("")
    for line in stats.settings_warnings(cfg, train_ds, total):
        out(line)
    out(_output_dir_line(cfg))
    _plan(cfg, out)
    out("\ndry run: no weights loaded, nothing written")
    return 0


def _preference_dry_run(cfg, out) -> int:
    """The preference objectives' dry run: the examples read, the first one's ids decoded, the memory plan."""
    from jqlora.data import DataError
    from jqlora.run.preference import read_examples

    try:
        tokenizer = _tokenizer(cfg)
        train, ev = read_examples(cfg, tokenizer)
        _check_ids(cfg, tokenizer, train, ev)
    except DataError as e:
        raise DryRunError(str(e).splitlines()[0]) from None
    kind = "examples" if cfg.train.objective == "kto" else "pairs"
    out(f"\n# data\ntrain ({cfg.data.path}): {len(train)} {kind}; eval: {len(ev) if ev else 'none'}")
    if train:
        ex = train[0]
        out(f"\n# example 1 ({getattr(ex, 'where', '')})\nprompt: {tokenizer.decode(list(ex.prompt))!r}")
        for name in ("chosen", "rejected", "completion"):
            if hasattr(ex, name):
                out(f"{name}: {tokenizer.decode(list(getattr(ex, name)))!r}")
    if cfg.data.packing:
        out("note: data.packing=true does not apply to preference data: each pair is padded to data.max_length")
    out(_output_dir_line(cfg))
    _plan(cfg, out)
    out("(a preference step: 2 rows per pair; the reference forward pass adds about 1% temporary memory)")
    out("\ndry run: no weights loaded, nothing written")
    return 0


def _shape(cfg):
    """The model's shape from its config.json (one-line `DryRunError` for an unusable one)."""
    from jqlora.models import ModelConfig

    model_json = os.path.join(cfg.model.path, "config.json")
    try:
        return ModelConfig.from_hf(model_json)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise DryRunError(f"{model_json}: not a usable config.json ({str(e).splitlines()[0]})") from None


def _tokenizer(cfg):
    """The run's tokenizer, refused when it has more tokens than the model's vocab_size (`jqlora.data.vocab`)."""
    from jqlora.data import check_tokenizer, load_tokenizer

    where = cfg.model.tokenizer_path or cfg.model.path
    tokenizer = load_tokenizer(where)
    check_tokenizer(tokenizer, where, _shape(cfg).vocab_size, cfg.model.path)
    return tokenizer


def _check_ids(cfg, tokenizer, *datasets) -> None:
    """Every example's ids within the model's vocab_size (a list of examples, or a dataset with ``examples``)."""
    from jqlora.data import check_ids

    vocab = _shape(cfg).vocab_size
    for ds in datasets:
        if ds is not None:
            check_ids(getattr(ds, "examples", ds), tokenizer, cfg.model.tokenizer_path or cfg.model.path, vocab,
                      cfg.model.path)


def _plan(cfg, out) -> None:
    from jqlora.planning.memory import memory_plan, settings_from_config

    out("\n# memory plan per device (python -m jqlora.plan)")
    shape = _shape(cfg)
    axes = {n: 1 if getattr(cfg.mesh, n) == "auto" else int(getattr(cfg.mesh, n)) for n in ("data", "fsdp", "tensor")}
    remat = "full" if cfg.train.remat == "auto" else cfg.train.remat
    p = memory_plan(shape, name=os.path.basename(os.path.abspath(cfg.model.path)), remat=remat,
                         **settings_from_config(cfg, axes))
    out(p.table())
    if cfg.train.remat == "auto":
        out("(train.remat=auto picks on the device; shown: full)")


def _grpo_dry_run(cfg, out) -> int:
    """GRPO's dry run: the prompts read (one-line data errors), the first one's ids decoded, the rewards loaded."""
    from jqlora.data import DataError
    from jqlora.data.prompts import read_prompts
    from jqlora.training.rewards import RewardError, load_reward

    try:
        tokenizer = _tokenizer(cfg)
        ds = read_prompts(cfg.data.path, tokenizer, split=cfg.data.split, subset=cfg.data.subset,
                          chat_template=cfg.data.chat_template, max_prompt_length=cfg.data.max_length)
        _check_ids(cfg, tokenizer, ds)
        for spec in cfg.grpo.rewards:
            load_reward(spec)
    except (DataError, RewardError) as e:
        raise DryRunError(str(e)) from None
    out(f"# {len(ds)} prompts; the first, as the model sees it:")
    out(tokenizer.decode(ds.examples[0].ids))
    out(f"# rewards: {', '.join(cfg.grpo.rewards)}")
    return 0
