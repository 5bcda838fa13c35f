"""The run configuration: dataclasses are the schema, a YAML file picks values, `key.sub=value` overrides win.

    cfg = load_config("configs/llama3-8b.yaml", ["train.learning_rate=1e-4", "lora.targets=[q_proj,v_proj]"])

Precedence, lowest first: the dataclass defaults (neutral: no model, no data, no eval set, no sample prompt), the
YAML file, the command-line overrides in order. The demo is `configs/demo.yaml`, which `load_run_config` picks when
neither a file nor `model.path` is given; its `assets/demo/...` paths are the repository's, from any directory.
Parsing, merging and type conversion are done by omegaconf (structured configs); every user mistake comes out as one
`ConfigError` line naming where the value came from (the file or "command line"), the key, and the value, e.g.

    configs/x.yaml: unknown key 'train.learnig_rate' (did you mean 'train.learning_rate'?)
    command line: train.batch_size='four' is not an integer

The result is a tree of frozen dataclasses (`Config`); `config_to_dict` / `save_config` write it back as YAML that
`load_config` reads again to the same value.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

QUANT_TYPES = ("nf4", "fp4", "none")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = ("bfloat16", "float16", "float32")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # = lora.LINEAR_MODULES
FUSED_MODULES = ("qkv_proj", "gate_up_proj")  # = lora.FUSED_MODULES (Phi-3); also valid lora.targets
DATA_FORMATS = ("auto", "chat", "instruction", "prompt_completion", "text")
TRAIN_ON = ("completion", "all")
OVERLONG = ("truncate", "drop", "error")
LR_SCHEDULES = ("cosine", "linear", "constant")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "offload")  # = models.llama.REMAT_POLICIES

COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line naming the source and the key."""


class _Invalid(ConfigError):
    """A range check failed for `key`; `load_config` prefixes the source (file or command line) of that key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def _check(ok: bool, key: str, value: Any, requirement: str) -> None:
    if not ok:
        raise _Invalid(key, f"{key}={value!r} {requirement}")


def _one_of(value: Any, key: str, choices: tuple) -> None:
    _check(value in choices, key, value, "must be one of " + ", ".join(choices))


@dataclass(frozen=True)
class ModelConfig:
    path: Optional[str] = None  # Hugging Face checkpoint directory (config.json, tokenizer, weights); required
    quant: str = "nf4"  # nf4 | fp4 | none: storage of the frozen base weights
    double_quant: bool = True  # quantize the per-block absmax values again (8 bit, blocks of 256)
    block_size: int = 64  # values per quantization block
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
    targets: Any = "all-linear"  # "all-linear" or a list of module names (q_proj, ..., down_proj)
    rslora: bool = False  # rank-stabilized scaling (Kalajdzievski 2023)

    def __post_init__(self):
        _check(self.r >= 1, "lora.r", self.r, "must be >= 1")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        targets = self.targets
        if isinstance(targets, str) and targets != "all-linear":
            targets = [targets]
        if isinstance(targets, (list, tuple)):
            _check(len(targets) > 0, "lora.targets", list(targets), "must not be empty")
            for name in targets:
                _check(name in LORA_MODULES + FUSED_MODULES, "lora.targets", name,
                       "is not a module name; use 'all-linear' or names among "
                       + ", ".join(LORA_MODULES + FUSED_MODULES))
            if len(set(targets)) != len(targets):
                raise _Invalid("lora.targets", f"lora.targets={list(targets)!r} names a module twice")
            object.__setattr__(self, "targets", tuple(targets))
        else:
            _check(targets == "all-linear", "lora.targets", targets,
                   "must be 'all-linear' or a list of module names")

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The module names the adapters go on, with "all-linear" spelled out."""
        return LORA_MODULES if self.targets == "all-linear" else tuple(self.targets)


@dataclass(frozen=True)
class DataConfig:
    path: Optional[str] = None  # .jsonl / .json / .parquet / .csv file, a local dataset dir, or a hub name; required
    format: str = "auto"  # auto | chat | instruction | prompt_completion | text
    split: str = "train"  # split to read from a dataset directory or hub dataset
    subset: Optional[str] = None  # hub dataset configuration name
    # separate eval data (same format rules); overrides eval_fraction
    eval_path: Optional[str] = None
    eval_split: Optional[str] = None  # split of data.path used for eval (hub/dir datasets), e.g. "test"
    eval_fraction: float = 0.0  # else hold out this fraction of the training examples (split by train.seed)
    max_length: int = 128  # tokens per row (packed or padded)
    packing: bool = False  # pack several examples per row (best-fit decreasing); attention stays per example
    train_on: str = "completion"  # completion: loss on assistant/completion tokens only; all: on every token
    overlong: str = "truncate"  # examples over max_length: truncate (keep the start) | drop | error
    shuffle: bool = True  # reshuffle rows every epoch (seeded by train.seed and the epoch)
    messages_field: str = "messages"  # field holding the chat (format chat)
    text_field: str = "text"  # field holding the text (format text)
    chat_template: Optional[str] = None  # Jinja template (or a path to a .jinja file) replacing the tokenizer's

    def __post_init__(self):
        if self.path is not None:
            _check(bool(self.path), "data.path", self.path, "must name a dataset")
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
    max_grad_norm: float = 1.0  # global-norm gradient clipping; 0 disables
    seed: int = 0  # LoRA init, dropout, data shuffling and the eval split
    # none | full | save_dots | save_dots_no_batch | offload: what the scanned layer body keeps for backward;
    # auto: the fastest of none, save_dots, save_dots_no_batch, full whose memory plan fits the device (jqlora.plan)
    remat: str = "full"
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
    stop_at_step: Optional[int] = None  # save and stop after this step (the schedule still spans max_steps); rerun to go on
    # stop (saving nothing, exporting nothing) when the loss stays far above its early value (jqlora/divergence.py)
    stop_on_divergence: bool = True

    def __post_init__(self):
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        _check(self.grad_accum_steps >= 1, "train.grad_accum_steps", self.grad_accum_steps, "must be >= 1")
        if self.max_steps is not None:
            _check(self.max_steps >= 1, "train.max_steps", self.max_steps, "must be >= 1 (or null to use epochs)")
        _check(self.epochs > 0, "train.epochs", self.epochs, "must be > 0")
        _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "must be > 0")
        _one_of(self.lr_schedule, "train.lr_schedule", LR_SCHEDULES)
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _check(0.0 <= self.adam_b1 < 1.0, "train.adam_b1", self.adam_b1, "must be in [0, 1)")
        _check(0.0 <= self.adam_b2 < 1.0, "train.adam_b2", self.adam_b2, "must be in [0, 1)")
        _check(self.adam_eps > 0, "train.adam_eps", self.adam_eps, "must be > 0")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "must be >= 0 (0 disables)")
        _one_of(self.remat, "train.remat", REMAT_POLICIES + ("auto",))
        _check(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, "must be >= 0 (0: only at the end)")
        if self.eval_batches is not None:
            _check(self.eval_batches >= 1, "train.eval_batches", self.eval_batches, "must be >= 1 (or null: all)")
        if self.eval_batch_size is not None:
            _check(self.eval_batch_size >= 1, "train.eval_batch_size", self.eval_batch_size, "must be >= 1")
        _check(self.save_every >= 0, "train.save_every", self.save_every, "must be >= 0 (0: only at the end)")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        _check(self.eval_samples >= 0, "train.eval_samples", self.eval_samples, "must be >= 0")
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

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            object.__setattr__(self, name, _mesh_size(getattr(self, name), f"mesh.{name}"))
        autos = [n for n in ("data", "fsdp", "tensor") if getattr(self, n) == "auto"]
        if len(autos) > 1:
            raise _Invalid(f"mesh.{autos[-1]}", f"mesh: at most one axis may be 'auto', got "
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
    log: LogConfig = field(default_factory=LogConfig)
    output_dir: str = "runs/run"  # checkpoints, metrics, the resolved config and the exported adapter

    def __post_init__(self):
        _check(bool(self.output_dir), "output_dir", self.output_dir, "must name a directory")
        if self.model.max_seq_len is not None:
            _check(self.data.max_length <= self.model.max_seq_len, "data.max_length", self.data.max_length,
                   f"must be <= model.max_seq_len ({self.model.max_seq_len})")


# ---------------------------------------------------------------------------------------------------------------
# Schema introspection


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _schema_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key (sections and leaves) of the schema, mapped to its annotated type."""
    out: dict[str, Any] = {}
    for name, tp in _field_types(cls).items():
        key = prefix + name
        out[key] = tp
        if _is_section(tp):
            out.update(_schema_keys(tp, key + "."))
    return out


_KEYS = _schema_keys()


def _describe_type(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return _describe_type(inner) + " (or null)"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


# Names users bring from transformers / peft / TRL, mapped to ours for the "did you mean" hint.
_ALIASES = {
    "lr": "train.learning_rate",
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.targets",
    "use_rslora": "lora.rslora",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "per_device_train_batch_size": "train.batch_size",
    "num_train_epochs": "train.epochs",
    "lr_scheduler_type": "train.lr_schedule",
    "gradient_checkpointing": "train.remat",
    "max_seq_length": "data.max_length",
    "dataset_text_field": "data.text_field",
    "bnb_4bit_quant_type": "model.quant",
    "bnb_4bit_use_double_quant": "model.double_quant",
    "bnb_4bit_compute_dtype": "model.dtype",
}


def _unknown_key(key: str, value: Any) -> str:
    while isinstance(value, dict) and len(value) == 1:  # name the full key: 'trian.batch_size', not 'trian'
        name, value = next(iter(value.items()))
        key = f"{key}.{name}"
    alias = _ALIASES.get(key.rsplit(".", 1)[-1])
    if alias:
        return f"unknown key '{key}' (did you mean '{alias}'?)"
    wanted_section = isinstance(value, dict)
    candidates = [k for k in _KEYS if _is_section(_KEYS[k]) == wanted_section]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:  # a misspelled section: compare the last part against every leaf name
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in _KEYS if not _is_section(_KEYS[k])}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{key}'{hint}"


def _check_structure(tree: Any, source: str, prefix: str = "") -> list[str]:
    """Reject unknown keys and sections given scalars (or scalars given mappings); returns the leaf keys set."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values at the top level, got {tree!r:.80}")
    leaves = []
    for name, value in tree.items():
        key = prefix + str(name)
        if key not in _KEYS:
            raise ConfigError(f"{source}: {_unknown_key(key, value)}")
        if _is_section(_KEYS[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' is a section (keys like '{key}.{_first_leaf(key)}'), "
                                  f"not a value; got {value!r:.80}")
            leaves += _check_structure(value, source, key + ".")
        else:
            if isinstance(value, dict):
                raise ConfigError(f"{source}: {key} must be {_describe_type(_KEYS[key])}, not a mapping")
            leaves.append(key)
    return leaves


def _drop_empty_sections(tree: Any, prefix: str = "") -> Any:
    """`lora:` with nothing under it reads as None in YAML; it means "no changes here", not "no section"."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for name, value in tree.items():
        key = prefix + str(name)
        if value is None and key in _KEYS and _is_section(_KEYS[key]):
            continue
        out[name] = _drop_empty_sections(value, key + ".")
    return out


def _first_leaf(section: str) -> str:
    return next(k for k in _KEYS if k.startswith(section + ".")).split(".")[-1]


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _deep_update(into: dict, tree: dict) -> None:
    for name, value in tree.items():
        if isinstance(value, dict) and isinstance(into.get(name), dict):
            _deep_update(into[name], value)
        else:
            into[name] = value


def _merge(base, tree: dict, source_of: dict[str, str] | str):
    try:
        return OmegaConf.merge(base, OmegaConf.create(tree))
    except OmegaConfBaseException as e:
        key = e.full_key or "?"
        source = source_of if isinstance(source_of, str) else source_of.get(key, COMMAND_LINE)
        tp = _KEYS.get(key)
        if tp is not None and not _is_section(tp):
            raise ConfigError(f"{source}: {key}={e.value!r} is not {_describe_type(tp)}") from None
        raise ConfigError(f"{source}: {key}: {str(e).splitlines()[0]}") from None


def _parse_override(item: str) -> dict:
    if not isinstance(item, str) or "=" not in item or item.startswith("="):
        raise ConfigError(f"{COMMAND_LINE}: override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
    key = item.split("=", 1)[0].strip()
    try:
        tree = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{COMMAND_LINE}: cannot parse {item!r}: {str(e).splitlines()[0]}") from None
    if not key or not tree:
        raise ConfigError(f"{COMMAND_LINE}: override {item!r} is not of the form key=value")
    return tree


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path, encoding="utf-8") as f:
            conf = OmegaConf.load(f)  # omegaconf's YAML loader also reads 2e-4 as a float, unlike plain PyYAML
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem})") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    if isinstance(conf, type(OmegaConf.create([]))):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got a list")
    return OmegaConf.to_container(conf) or {}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults (the demo run) <- YAML file at `path` (if any) <- `key.sub=value` overrides, validated."""
    merged = OmegaConf.structured(Config)
    OmegaConf.set_readonly(merged, False)
    source_of: dict[str, str] = {}
    layers: list[tuple[str, dict]] = []
    if path is not None:
        layers.append((str(path), _read_yaml(str(path))))
    layers += [(COMMAND_LINE, _parse_override(item)) for item in overrides]
    combined: dict = {}
    for source, tree in layers:  # later layers win key by key; each leaf remembers where its value came from
        tree = _drop_empty_sections(tree)
        for key in _check_structure(tree, source):
            source_of[key] = source
        _deep_update(combined, tree)
    merged = _merge(merged, combined, source_of)
    try:
        return OmegaConf.to_object(merged)
    except _Invalid as e:
        source = source_of.get(e.key, "default value")
        raise ConfigError(f"{source}: {e.message}") from None
    except OmegaConfBaseException as e:  # interpolation errors (`${...}`) and other late failures
        key = e.full_key or "?"
        raise ConfigError(f"{source_of.get(key, path or COMMAND_LINE)}: {key}: {str(e).splitlines()[0]}") from None


def config_from_dict(tree: dict, source: str = "config") -> Config:
    """A Config from a nested dict (as written by `config_to_dict`), with the same checks as `load_config`."""
    merged = OmegaConf.structured(Config)
    OmegaConf.set_readonly(merged, False)
    tree = _drop_empty_sections(tree)
    _check_structure(tree, source)
    merged = _merge(merged, tree, source)
    try:
        return OmegaConf.to_object(merged)
    except _Invalid as e:
        raise ConfigError(f"{source}: {e.message}") from None


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of builtin types (tuples become lists), ready for YAML or JSON."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(cfg)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config; `load_config(path)` gives `cfg` back."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(config_to_yaml(cfg))



# ---------------------------------------------------------------------------------------------------------------
# The run's config: the demo when nothing is given; the schema for --help; what a resume may change

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEMO_ASSETS = "assets/demo/"
_PATH_KEYS = ("model.path", "model.tokenizer_path", "data.path", "data.eval_path")


def _override_keys(overrides) -> set[str]:
    return {str(item).split("=", 1)[0].strip() for item in overrides if "=" in str(item)}


def is_demo(path: str | os.PathLike | None, overrides=()) -> bool:
    """The demo runs when no config file and no model.path are given, or when the file is configs/demo.yaml."""
    if path is None:
        return "model.path" not in _override_keys(overrides)
    return Path(path).resolve() == DEMO_CONFIG.resolve()


def _demo_paths(cfg: Config) -> Config:
    """The demo's `assets/demo/...` paths taken from the repository (any other path is the user's, kept as given)."""
    def fix(value):
        if isinstance(value, str) and value.startswith(DEMO_ASSETS) and not os.path.isabs(value):
            return str(REPO_ROOT / value)
        return value

    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=fix(cfg.model.path), tokenizer_path=fix(cfg.model.tokenizer_path)),
        data=dataclasses.replace(cfg.data, path=fix(cfg.data.path), eval_path=fix(cfg.data.eval_path),
                                 chat_template=fix(cfg.data.chat_template)))


def load_run_config(path: str | os.PathLike | None = None, overrides=()) -> Config:
    """The config of a training run: `load_config`, but the demo (configs/demo.yaml) when `is_demo`, and an error
    when the model or the data is not set."""
    demo = is_demo(path, overrides)
    cfg = load_config(DEMO_CONFIG if demo and path is None else path, overrides)
    if demo:
        return _demo_paths(cfg)
    source = str(path) if path is not None else COMMAND_LINE
    for key, value in (("model.path", cfg.model.path), ("data.path", cfg.data.path)):
        if value is None:
            raise ConfigError(f"{source}: {key} is not set (give {key}=..., or no arguments at all for the demo)")
    return cfg


def demo_config(overrides=()) -> Config:
    """configs/demo.yaml with its asset paths in the repository (for tools and tests)."""
    return _demo_paths(load_config(DEMO_CONFIG, list(overrides)))


def _field_docs(cls: type) -> dict[str, str]:
    """The one-line comment after each field of a schema dataclass (its documentation)."""
    import inspect
    import re

    docs, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
            continue
        m = re.match(r"\s+(\w+): [^=]+=.*?(?:#\s*(.*))?$", line)
        if m and not stripped.startswith("def "):
            docs[m.group(1)] = " ".join(pending + ([m.group(2)] if m.group(2) else []))
        pending = []
    return docs


def schema_lines(cls: type = Config, prefix: str = "") -> list[str]:
    """Every leaf key of the schema with its default and its one-line doc, for `train --help`."""
    docs = _field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if _is_section(tp):
            lines += schema_lines(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
        shown = shown.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"  {prefix + f.name} = {shown}" + (f"  -- {docs[f.name]}" if docs.get(f.name) else ""))
    return lines


# Keys a resumed run may change: cadences, the run's length (and so the schedule's end), evaluation, sampling,
# checkpoint retention, the mesh (checkpoints restore onto any mesh) and the remat policy (same math).
RESUMABLE_KEYS = frozenset({
    "train.max_steps", "train.epochs", "train.stop_at_step", "train.log_every", "train.eval_every",
    "train.eval_batches", "train.eval_batch_size", "train.save_every", "train.keep_checkpoints", "train.resume",
    "train.overwrite", "train.sample_prompt", "train.remat", "data.eval_path", "data.eval_split",
    "mesh.data", "mesh.fsdp", "mesh.tensor", "log.tensorboard", "log.wandb", "log.wandb_project",
    "train.eval_samples", "output_dir",  # (a run directory that was moved or copied is still that run)
    "train.stop_on_divergence",
})


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resume_conflicts(saved: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of every change that makes resuming `saved`'s checkpoints as `new` impossible."""
    a, b = _flat(config_to_dict(saved)), _flat(config_to_dict(new))
    # (a key the saved config lacks was added by a later jqlora: its default cannot have changed the checkpoints)
    return [(k, a.get(k), b.get(k)) for k in b if k not in RESUMABLE_KEYS and k in a and a.get(k) != b.get(k)]
