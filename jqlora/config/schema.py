"""The run configuration's schema: frozen dataclasses, one per section, each checking its own values.

The package docstring (`jqlora.config`) says how a run's configuration is assembled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

# the allowed values and the error type live in config.base; they are re-exported here (and by jqlora.config)
from jqlora.config.base import (  # noqa: F401
    BLOCK_SIZES, COMMAND_LINE, DATA_FORMATS, DTYPES, FUSED_MODULES, GRPO_LOSS_TYPES, GRPO_SCALE_REWARDS, HEAD_MODULES,
    LORA_INITS, LORA_MODULES, LR_SCHEDULES, MEMORY_MODES, OBJECTIVES, OPTIMIZER_STATES, OVERLONG, PREFERENCE_LOSS_TYPES,
    QUANT_TYPES, REFERENCES, REMAT_POLICIES, SFT_EVAL_METRICS, TRAIN_ON, TRUNCATION_MODES, ConfigError, _Invalid, _check, _one_of)
from jqlora.config.objectives import GRPOConfig, PreferenceConfig


@dataclass(frozen=True)
class ModelConfig:
    path: Optional[str] = None  # Hugging Face checkpoint directory (config.json, tokenizer, weights); required
    quant: str = "nf4"  # nf4 | fp4 | none: storage of the frozen base weights
    double_quant: bool = True  # quantize the per-block absmax values again (8 bit, blocks of 256)
    block_size: int = 64  # values per quantization block
    # MoE (Mixtral, Qwen3-MoE): store the fused experts 4-bit too (memory); false keeps them in model.dtype, as
    # transformers + bitsandbytes does (exact parity with it, at the experts' full size: see python -m jqlora.plan)
    quantize_experts: bool = True
    dtype: str = "float32"  # compute dtype of activations, LoRA math and the unquantized weights
    tokenizer_path: Optional[str] = None  # defaults to model.path
    max_seq_len: Optional[int] = None  # longest sequence the model may see; defaults to the checkpoint's limit

    def __post_init__(self):
        if self.path is not None:
            _check(bool(self.path), "model.path", self.path, "must name a model directory")
        _one_of(self.quant, "model.quant", QUANT_TYPES)
        _check(self.block_size in BLOCK_SIZES, "model.block_size", self.block_size,
               "must be one of " + ", ".join(map(str, BLOCK_SIZES)))
        _one_of(self.dtype, "model.dtype", DTYPES)
        if self.max_seq_len is not None:
            _check(self.max_seq_len >= 1, "model.max_seq_len", self.max_seq_len, "must be >= 1")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16  # adapter rank
    alpha: float = 32.0  # scaling alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.05  # dropout on the adapter input
    # "all-linear" or a list of module names (q_proj, ..., down_proj; embed_tokens / lm_head by name only)
    targets: Any = "all-linear"
    rslora: bool = False  # rank-stabilized scaling (Kalajdzievski 2023)
    # start the adapters from a peft adapter dir or a jqlora run dir / checkpoint (same ranks); null: fresh adapters
    init_from: Optional[str] = None
    # default (peft's: A uniform, B 0) | gaussian (A ~ N(0, 1/r^2)) | pissa (principal singular vectors; the base
    # becomes the residual) | loftq (alternating quantization and SVD, so 4-bit base + AB ~ W);
    # jqlora/lora/initialize.py
    init: str = "default"
    loftq_iters: int = 1  # LoftQ iterations (lora.init=loftq)
    # PiSSA / LoftQ SVDs: null = exact (float32, numpy, on the host); N = randomized rank-r SVD with N power
    # iterations on the default device (peft's pissa_niter_N; Halko et al. 2011): seconds per 8B kernel, not minutes
    svd_niter: Optional[int] = None
    dora: bool = False  # DoRA: a trained magnitude per output row over the normalized W + s·BA (QDoRA on nf4/fp4)
    plus_ratio: Optional[float] = None  # LoRA+: B (and DoRA magnitudes) learn at plus_ratio x the lr; null/0: off
    # MoE (Mixtral, Qwen3-MoE): also adapt every expert's fused gate_up_proj / down_proj (peft target_parameters);
    # off by default: peft refuses lora.dropout > 0 there (the default is 0.05) and vLLM may not serve it
    # (docs/guide.md)
    experts: bool = False
    # peft's rank_pattern / alpha_pattern: the first key K matching a module's full name as (.*\.)?(K)$ decides, so
    # q_proj / mlp.down_proj name a module kind, model.layers.3.self_attn.q_proj one layer's module
    rank_pattern: Dict[str, Any] = field(default_factory=dict, hash=False)  # {module pattern: rank} (peft's)
    alpha_pattern: Dict[str, Any] = field(default_factory=dict, hash=False)  # {module pattern: alpha} (peft's)
    layers_to_transform: Any = field(default=None, hash=False)  # null (every layer) or the layer indices to adapt

    def __post_init__(self):
        _check(self.r >= 1, "lora.r", self.r, "must be >= 1")
        self._check_patterns()
        _check(not (self.experts and self.layers_to_transform is not None), "lora.layers_to_transform",
               self.layers_to_transform, "cannot be combined with lora.experts=true (the expert adapters are in "
               "every layer)")
        if self.init_from is not None:
            _check(bool(self.init_from), "lora.init_from", self.init_from, "must name a directory (or be null)")
        _one_of(self.init, "lora.init", LORA_INITS)
        _check(self.loftq_iters >= 1, "lora.loftq_iters", self.loftq_iters, "must be >= 1")
        if self.svd_niter is not None:
            _check(self.svd_niter >= 0, "lora.svd_niter", self.svd_niter, "must be >= 0 (or null: the exact SVD)")
        _check(not (self.dora and self.init in ("pissa", "loftq")), "lora.init", self.init,
               "cannot be combined with lora.dora=true (its magnitudes would be taken on the adjusted base)")
        if self.plus_ratio is not None:
            _check(isinstance(self.plus_ratio, (int, float)) and not isinstance(self.plus_ratio, bool)
                   and self.plus_ratio >= 0, "lora.plus_ratio", self.plus_ratio, "must be a number >= 0 (or null: off)")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        if self.experts:  # peft's ParamWrapper (target_parameters) refuses dropout and DoRA
            _check(self.dropout == 0, "lora.dropout", self.dropout, "must be 0 with lora.experts=true (peft "
                   "refuses dropout on the fused expert parameters); set lora.dropout=0 or lora.experts=false")
            _check(not self.dora, "lora.dora", self.dora, "cannot be combined with lora.experts=true (peft refuses "
                   "DoRA on the fused expert parameters)")
            _check(self.init == "default", "lora.init", self.init, "is not implemented for the expert adapters "
                   "(lora.experts=true): use lora.init=default")
        targets = self.targets
        if isinstance(targets, str) and targets != "all-linear":
            targets = [targets]
        if isinstance(targets, (list, tuple)):
            _check(len(targets) > 0, "lora.targets", list(targets), "must not be empty")
            for name in targets:
                _check(name in LORA_MODULES + FUSED_MODULES + HEAD_MODULES, "lora.targets", name,
                       "is not a module name; use 'all-linear' or names among "
                       + ", ".join(LORA_MODULES + FUSED_MODULES + HEAD_MODULES))
            if len(set(targets)) != len(targets):
                raise _Invalid("lora.targets", f"lora.targets={list(targets)!r} names a module twice")
            object.__setattr__(self, "targets", tuple(targets))
            heads = [n for n in targets if n in HEAD_MODULES]
            if heads and self.layers_to_transform is not None:
                raise _Invalid("lora.layers_to_transform", f"lora.layers_to_transform={self.layers_to_transform} with "
                               f"lora.targets {heads}: it selects decoder layers, and embed_tokens / lm_head are "
                               "outside them; drop one of the two")
            if heads and self.dora:
                raise _Invalid("lora.dora", f"lora.dora=true with lora.targets {heads}: DoRA is for the linear "
                               "projections only; drop embed_tokens / lm_head or set lora.dora=false")
            if "lm_head" in targets and self.dropout > 0:
                raise _Invalid("lora.dropout", f"lora.dropout={self.dropout!r} with lm_head in lora.targets: the "
                               "lm_head adapter is folded into the head weight and takes no dropout; "
                               "set lora.dropout=0")
        else:
            _check(targets == "all-linear", "lora.targets", targets,
                   "must be 'all-linear' or a list of module names")

    def _check_patterns(self) -> None:
        import re

        for key, positive in (("rank_pattern", "an integer >= 1"), ("alpha_pattern", "a number > 0")):
            pattern = getattr(self, key)
            _check(isinstance(pattern, dict), f"lora.{key}", pattern, "must be a mapping {module pattern: value}")
            for k, v in pattern.items():
                try:
                    re.compile(str(k))
                except re.error as e:
                    raise _Invalid(f"lora.{key}", f"lora.{key} key {k!r} is not a regular expression ({e})") from None
                number = isinstance(v, (int, float)) and not isinstance(v, bool)
                ok = number and (v >= 1 and float(v).is_integer() if key == "rank_pattern" else v > 0)
                _check(ok, f"lora.{key}", {k: v}, f"must map to {positive}")
            object.__setattr__(self, key, {str(k): (int(v) if key == "rank_pattern" else v)
                                           for k, v in pattern.items()})
        layers = self.layers_to_transform
        if layers is None:
            return
        layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        ok = isinstance(layers, (list, tuple)) and len(layers) > 0 and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        _check(ok, "lora.layers_to_transform", self.layers_to_transform,
               "must be null or a non-empty list of decoder layer indices >= 0")
        object.__setattr__(self, "layers_to_transform", sorted(set(layers)))  # (fields kept out of the hash)

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The module names the adapters go on, with "all-linear" spelled out."""
        return LORA_MODULES if self.targets == "all-linear" else tuple(self.targets)


SOURCE_KEYS = ("path", "weight", "split", "subset", "format")  # the keys of one data.path / data.eval_path entry


def _check_sources(value: Any, key: str) -> Any:
    """data.path / data.eval_path: a string, or a non-empty list of strings and {path, weight, split, subset,
    format} mappings (weight: data.path only, on every entry or on none); returns it with lists as lists."""
    if value is None or isinstance(value, str):
        return value
    _check(isinstance(value, (list, tuple)) and len(value) > 0, key, value,
           "must be a path, a hub name, or a non-empty list of them ({path, weight, split, subset, format} entries)")
    def need(ok, at, v, requirement):  # (the error names the entry; its source is that of the key)
        if not ok:
            raise _Invalid(key, f"{at}={v!r} {requirement}")

    weighted = []
    for i, entry in enumerate(value):
        at = f"{key}[{i}]"
        entry = {"path": entry} if isinstance(entry, str) else entry
        need(isinstance(entry, dict), at, entry, "must be a path or a mapping {path, weight, split, subset, format}")
        unknown = [k for k in entry if k not in SOURCE_KEYS]
        need(not unknown, at, entry, f"has unknown key(s) {', '.join(map(str, unknown))} (allowed: "
               + ", ".join(k for k in SOURCE_KEYS if key == "data.path" or k != "weight") + ")")
        need(isinstance(entry.get("path"), str) and bool(entry["path"]), f"{at}.path", entry.get("path"),
               "must name a dataset (a file, a dataset directory or a hub name)")
        for name in ("split", "subset"):
            if entry.get(name) is not None:
                need(isinstance(entry[name], str) and bool(entry[name]), f"{at}.{name}", entry[name],
                       "must be a non-empty string")
        if entry.get("format") is not None:
            need(entry["format"] in DATA_FORMATS, f"{at}.format", entry["format"],
                 "must be one of " + ", ".join(DATA_FORMATS))
        if "weight" in entry:
            w = entry["weight"]
            need(key == "data.path", f"{at}.weight", w, "is for data.path only (eval sets are not mixed)")
            need(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 and w != float("inf"),
                   f"{at}.weight", w, "must be a number > 0 (the source's share of the sampled rows)")
        weighted.append("weight" in entry and entry["weight"] is not None)
    if any(weighted) and not all(weighted):
        i = weighted.index(False)
        raise _Invalid(key, f"{key}[{i}] has no weight while {key}[{weighted.index(True)}] has one: give every "
                       "entry a weight (sampled mixing) or none (concatenation)")
    return list(value)


@dataclass(frozen=True)
class DataConfig:
    # .jsonl / .json / .parquet / .csv file, a local dataset dir, or a hub name; required. Or a list of them, each a
    # string or {path, weight, split, subset, format}: no weights = the sources concatenated; weights on every entry =
    # each epoch's rows drawn from the sources in those proportions (seeded by train.seed and the epoch)
    path: Any = field(default=None, hash=False)
    format: str = "auto"  # auto | chat | instruction | prompt_completion | text
    split: str = "train"  # split to read from a dataset directory or hub dataset
    subset: Optional[str] = None  # hub dataset configuration name
    # separate eval data (same format rules; a list like data.path's, without weights: the sets are concatenated);
    # overrides eval_fraction
    eval_path: Any = field(default=None, hash=False)
    eval_split: Optional[str] = None  # split of data.path used for eval (hub/dir datasets), e.g. "test"
    eval_fraction: float = 0.0  # else hold out this fraction of the training examples (split by train.seed)
    max_length: int = 128  # tokens per row (packed or padded)
    packing: bool = False  # pack several examples per row (best-fit decreasing); attention stays per example
    # completion: loss on every assistant turn (the completion) only; last_turn: on the last assistant turn of each
    # conversation only; all: on every token
    train_on: str = "completion"
    # with completion / last_turn: also train each trained turn's end-of-turn marker (<|im_end|>, <|eot_id|>, EOS),
    # so the model learns to stop; false: the turn's text only
    train_on_eos: bool = True
    overlong: str = "truncate"  # examples over max_length: truncate (keep the start) | drop | error
    shuffle: bool = True  # reshuffle rows every epoch (seeded by train.seed and the epoch)
    messages_field: str = "messages"  # field holding the chat (format chat)
    text_field: str = "text"  # field holding the text (format text)
    chat_template: Optional[str] = None  # Jinja template, a .jinja file, or zephyr | chatml; replaces the tokenizer's

    def __post_init__(self):
        if isinstance(self.path, str):
            _check(bool(self.path), "data.path", self.path, "must name a dataset")
        object.__setattr__(self, "path", _check_sources(self.path, "data.path"))
        object.__setattr__(self, "eval_path", _check_sources(self.eval_path, "data.eval_path"))
        _one_of(self.format, "data.format", DATA_FORMATS)
        _check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "must be in [0, 1)")
        _check(self.max_length >= 2, "data.max_length", self.max_length, "must be >= 2")
        _one_of(self.train_on, "data.train_on", TRAIN_ON)
        _one_of(self.overlong, "data.overlong", OVERLONG)
        _check(bool(self.messages_field), "data.messages_field", self.messages_field, "must not be empty")
        _check(bool(self.text_field), "data.text_field", self.text_field, "must not be empty")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8  # rows per micro-batch (one forward/backward)
    grad_accum_steps: int = 2  # micro-batches per optimizer step
    max_steps: Optional[int] = None  # optimizer steps; null: train.epochs over the data
    epochs: float = 1.0  # passes over the training rows when max_steps is null
    learning_rate: float = 2e-4  # peak learning rate
    lr_schedule: str = "cosine"  # cosine | linear | constant (after warmup), decaying to min_lr_ratio * peak
    warmup_steps: int = 5  # linear warmup from 0, in optimizer steps (clamped to the run's length)
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of the peak (cosine, linear)
    weight_decay: float = 0.0  # AdamW decoupled weight decay on the LoRA parameters
    adam_b1: float = 0.9  # AdamW first-moment decay
    adam_b2: float = 0.999  # AdamW second-moment decay
    adam_eps: float = 1e-8  # AdamW epsilon
    # auto | float32 | bfloat16 | 8bit: how the AdamW moments of the adapters are stored (8bit: bitsandbytes'
    # blockwise AdamW8bit, absmax per 256; tensors under 4096 elements stay float32); computed in float32 either way;
    # auto: 8bit with train.memory=min, else float32
    optimizer_state: str = "auto"
    max_grad_norm: float = 1.0  # global-norm gradient clipping; 0 disables
    seed: int = 0  # LoRA init, dropout, data shuffling and the eval split
    # none | full | save_dots | save_dots_no_batch | offload: what the scanned layer body keeps for backward;
    # auto: the fastest of none, save_dots, save_dots_no_batch, full whose memory plan fits the device
    # (jqlora.planning.remat)
    remat: str = "full"
    # default | min: min holds the embedding and lm_head 4-bit too (NF4 + double quant, model.block_size; the
    # cross-entropy dequantizes the head a block of vocabulary rows at a time), the AdamW moments 8-bit
    # (train.optimizer_state=auto) and the residual checkpoints in host memory (as train.offload_residual);
    # needs train.remat full or offload
    memory: str = "default"
    # long context: the dense MLP computed over chunks of this many tokens (0: one pass), so its [tokens,
    # intermediate] activations live one chunk at a time (jqlora/models/layers.py)
    mlp_chunk: int = 0
    # long context: the residual stream entering each layer kept in pinned host memory for the backward instead of
    # on the device (needs train.remat other than none; jqlora/models/stack.py)
    offload_residual: bool = False

    @property
    def residual_offloaded(self) -> bool:
        """train.offload_residual, or train.memory=min (which takes every saving)."""
        return self.offload_residual or self.memory == "min"
    log_every: int = 10  # optimizer steps between metric lines
    eval_every: int = 25  # optimizer steps between evaluations; 0: only at the end
    eval_batches: Optional[int] = None  # micro-batches per evaluation; null: the whole eval set
    eval_batch_size: Optional[int] = None  # defaults to train.batch_size
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # most recent checkpoints kept
    resume: bool = True  # continue from the newest checkpoint in output_dir if there is one
    overwrite: bool = False  # start afresh in a non-empty output_dir: the old one is moved aside (never deleted)
    sample_prompt: Optional[str] = None  # greedy reply printed before and after training (null: none)
    eval_samples: int = 0  # at each eval, greedy replies to the first N eval prompts, logged beside the eval loss
    # lm-eval tasks (names, globs or YAML files) scored at each eval, logged as eval_tasks/<task>/<metric>; needs the
    # eval extra (lm-eval) and eval data (python -m jqlora.eval: the same, on a saved run)
    eval_tasks: Any = field(default_factory=list, hash=False)
    eval_tasks_limit: Optional[int] = None  # documents per train.eval_tasks task at each eval (null: all)
    eval_tasks_include_path: Optional[str] = None  # a folder of your own task YAMLs for train.eval_tasks
    stop_at_step: Optional[int] = None  # save and stop after this step (the schedule still spans max_steps); rerun to go on
    # stop (saving nothing, exporting nothing) when the loss stays far above its early value
    # (jqlora/run/divergence.py)
    stop_on_divergence: bool = True
    # with lora.init_from a jqlora run: also continue its optimizer state (Adam moments; the lr schedule is this run's)
    resume_optimizer: bool = False
    router_aux_loss_coef: float = 0.0  # MoE only: loss = CE + coef * load-balancing aux loss (transformers'); 0: off
    # sft (supervised) | dpo | orpo | simpo (paired preferences) | kto (unpaired); settings in the preference section;
    # grpo (online RL on prompts with reward functions; the grpo section)
    objective: str = "sft"
    # NEFTune (Jain et al. 2023; transformers' neftune_noise_alpha): in training only, uniform noise in
    # ±alpha/sqrt(S·D) added to the embedding outputs (S = data.max_length, D = hidden size); null / 0: off
    neftune_alpha: Optional[float] = None
    # stop after this many evaluations in a row without improving train.metric_for_best (transformers'
    # EarlyStoppingCallback; the step-0 evaluation counts); null: off (jqlora/run/best.py)
    early_stopping_patience: Optional[int] = None
    early_stopping_threshold: float = 0.0  # an evaluation improves only if it beats the best by more than this
    # the eval metric that picks the best checkpoint and drives early stopping ("loss" means eval_loss)
    metric_for_best: str = "eval_loss"
    # null: false for a metric ending in "loss", else true, as transformers infers it (eval_perplexity: set false)
    greater_is_better: Optional[bool] = None
    # save a checkpoint at each new best evaluation and never rotate it away (export --best)
    keep_best: bool = False

    def __post_init__(self):
        _one_of(self.objective, "train.objective", OBJECTIVES)
        given = self.metric_for_best
        name = given if given.startswith("eval_") else f"eval_{given}"  # (as transformers names it)
        if self.early_stopping_patience is not None:
            _check(self.early_stopping_patience >= 1, "train.early_stopping_patience", self.early_stopping_patience,
                   "must be >= 1 (or null: off)")
            _check(self.eval_every >= 1, "train.early_stopping_patience", self.early_stopping_patience,
                   "counts evaluations: it needs train.eval_every >= 1 (with 0 the run evaluates only at the end)")
        _check(self.early_stopping_threshold >= 0, "train.early_stopping_threshold", self.early_stopping_threshold,
               "must be >= 0")
        if self.objective == "sft":
            _check(name in SFT_EVAL_METRICS, "train.metric_for_best", given,
                   "names nothing the evaluation logs (it logs " + ", ".join(SFT_EVAL_METRICS) + ")")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        _check(self.grad_accum_steps >= 1, "train.grad_accum_steps", self.grad_accum_steps, "must be >= 1")
        if self.max_steps is not None:
            _check(self.max_steps >= 1, "train.max_steps", self.max_steps, "must be >= 1 (or null to use epochs)")
        _check(self.epochs > 0, "train.epochs", self.epochs, "must be > 0")
        _check(self.router_aux_loss_coef >= 0, "train.router_aux_loss_coef", self.router_aux_loss_coef, "must be >= 0")
        _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "must be > 0")
        _one_of(self.lr_schedule, "train.lr_schedule", LR_SCHEDULES)
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _check(0.0 <= self.adam_b1 < 1.0, "train.adam_b1", self.adam_b1, "must be in [0, 1)")
        _check(0.0 <= self.adam_b2 < 1.0, "train.adam_b2", self.adam_b2, "must be in [0, 1)")
        _check(self.adam_eps > 0, "train.adam_eps", self.adam_eps, "must be > 0")
        _one_of(self.optimizer_state, "train.optimizer_state", ("auto",) + OPTIMIZER_STATES)
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "must be >= 0 (0 disables)")
        _one_of(self.remat, "train.remat", REMAT_POLICIES + ("auto",))
        _one_of(self.memory, "train.memory", MEMORY_MODES)
        if self.memory == "min":
            _check(self.remat in ("full", "offload"), "train.memory", self.memory,
                   f"takes train.remat=full (or offload), not {self.remat}")
            _check(self.objective != "grpo", "train.memory", self.memory,
                   "is not available with train.objective=grpo (its completion log-probs read the whole head): use "
                   "train.memory=default")
        _check(self.mlp_chunk >= 0, "train.mlp_chunk", self.mlp_chunk, "must be >= 0 (tokens per chunk; 0: off)")
        if self.offload_residual:
            _check(self.remat != "none", "train.offload_residual", self.offload_residual, "needs train.remat other "
                   "than none (without remat every activation stays on the device)")
        _check(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, "must be >= 0 (0: only at the end)")
        if self.eval_batches is not None:
            _check(self.eval_batches >= 1, "train.eval_batches", self.eval_batches, "must be >= 1 (or null: all)")
        if self.eval_batch_size is not None:
            _check(self.eval_batch_size >= 1, "train.eval_batch_size", self.eval_batch_size, "must be >= 1")
        _check(self.save_every >= 0, "train.save_every", self.save_every, "must be >= 0 (0: only at the end)")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        _check(self.eval_samples >= 0, "train.eval_samples", self.eval_samples, "must be >= 0")
        if self.neftune_alpha is not None:
            _check(self.neftune_alpha >= 0, "train.neftune_alpha", self.neftune_alpha, "must be >= 0 (or null: off)")
        tasks = self.eval_tasks
        _check(isinstance(tasks, (list, tuple)) and all(isinstance(t, str) and t.strip() for t in tasks),
               "train.eval_tasks", tasks, "must be a list of lm-eval task names")
        if self.eval_tasks_limit is not None:
            _check(self.eval_tasks_limit >= 1, "train.eval_tasks_limit", self.eval_tasks_limit,
                   "must be >= 1 (or null)")
        if self.stop_at_step is not None:
            _check(self.stop_at_step >= 1, "train.stop_at_step", self.stop_at_step, "must be >= 1 (or null)")


def _mesh_size(value: Any, key: str) -> Any:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key, value,
           "must be a positive integer or 'auto'")
    return value


@dataclass(frozen=True)
class MeshConfig:
    data: Any = 1  # data-parallel axis: batch split, weights replicated (int or "auto")
    fsdp: Any = "auto"  # fully-sharded data parallel: batch and weights/adapters/optimizer state split
    tensor: Any = 1  # tensor parallel: kernels split inside a layer (must divide the heads and the MLP width)
    seq: int = 1  # sequence (context) parallel: every row's tokens split over seq devices (Ulysses attention)

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            object.__setattr__(self, name, _mesh_size(getattr(self, name), f"mesh.{name}"))
        seq = _mesh_size(self.seq, "mesh.seq")
        _check(seq != "auto", "mesh.seq", self.seq, "must be a positive integer (the heads must divide by it)")
        object.__setattr__(self, "seq", seq)
        autos = [n for n in ("data", "fsdp", "tensor") if getattr(self, n) == "auto"]
        if len(autos) > 1:
            raise _Invalid(f"mesh.{autos[-1]}", "mesh: at most one axis may be 'auto', got "
                           + ", ".join(f"mesh.{n}=auto" for n in autos))


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = True  # TensorBoard event files in output_dir/tensorboard (tensorboardX)
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`; WANDB_MODE=offline: no network)
    wandb_project: Optional[str] = None  # W&B project; null: jqlora


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    log: LogConfig = field(default_factory=LogConfig)
    output_dir: str = "runs/run"  # checkpoints, metrics, the resolved config and the exported adapter

    def __post_init__(self):
        _check(bool(self.output_dir), "output_dir", self.output_dir, "must name a directory")
        if self.lora.init == "loftq":
            _check(self.model.quant != "none", "lora.init", self.lora.init, "needs a quantized base (model.quant nf4 "
                   "or fp4): LoftQ fits the adapters to the quantization error; on an unquantized base use pissa")
        if self.lora.init in ("pissa", "loftq") and self.lora.init_from is not None:
            _check(False, "lora.init", self.lora.init, f"and lora.init_from={self.lora.init_from} exclude each other "
                   "(the adapters come from init_from)")
        pref, objective = self.preference, self.train.objective
        if pref.reference == "init":
            _check(self.lora.init_from is not None, "preference.reference", pref.reference,
                   "needs lora.init_from (the starting adapter is the reference); without it use reference=base")
        if objective in ("orpo", "simpo") and pref.reference != "base":
            _check(False, "preference.reference", pref.reference, f"does not apply to train.objective={objective} "
                   "(it has no reference model)")
        if pref.max_prompt_length is not None and objective != "sft":
            _check(pref.max_prompt_length < self.data.max_length, "preference.max_prompt_length",
                   pref.max_prompt_length, f"must be < data.max_length ({self.data.max_length}): leave room for "
                   "the completion")
        for key in ("path", "eval_path"):
            if isinstance(getattr(self.data, key), list) and objective != "sft":
                _check(False, f"data.{key}", getattr(self.data, key), "may be a list (several datasets) with "
                       f"train.objective=sft only, not {objective}")
        if self.train.neftune_alpha and objective != "sft":
            _check(False, "train.neftune_alpha", self.train.neftune_alpha, "applies to train.objective=sft only, "
                   f"not {objective} (set it to null)")
        if objective == "grpo":
            g = self.grpo
            _check(len(g.rewards) > 0, "grpo.rewards", list(g.rewards), "must name at least one reward function "
                   "with train.objective=grpo")
            _check(self.train.batch_size % g.num_generations == 0, "train.batch_size", self.train.batch_size,
                   f"must be a multiple of grpo.num_generations ({g.num_generations}): it counts completions")
            if g.reference == "init":
                _check(self.lora.init_from is not None, "grpo.reference", g.reference,
                       "needs lora.init_from (the starting adapter is the reference); without it use reference=base")
        tc, d = self.train, self.data
        if tc.early_stopping_patience is not None or tc.keep_best:
            key = "train.keep_best" if tc.early_stopping_patience is None else "train.early_stopping_patience"
            _check(objective != "grpo", key, getattr(tc, key[6:]), "needs an evaluation pass, and "
                   "train.objective=grpo has none")
            _check(d.eval_path is not None or d.eval_split is not None or d.eval_fraction > 0, key,
                   getattr(tc, key[6:]), "needs eval data: set data.eval_path, data.eval_split or data.eval_fraction")
        if objective == "kto":
            _check(self.train.batch_size >= 2, "train.batch_size", self.train.batch_size, "must be >= 2 with "
                   "train.objective=kto (its KL estimate pairs each prompt with another example's completion)")
        if self.model.max_seq_len is not None:
            _check(self.data.max_length <= self.model.max_seq_len, "data.max_length", self.data.max_length,
                   f"must be <= model.max_seq_len ({self.model.max_seq_len})")
