"""Loading and writing run configurations: YAML + overrides merged by omegaconf, one-line errors, the schema's
help text, the demo's paths, and which keys a resume may change."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from jqlora.config.schema import COMMAND_LINE, Config, ConfigError, _Invalid


def _omegaconf():
    """omegaconf and its base error, imported on first use: the core (models, the train step, tools/bench.py,
    `python -m jqlora.plan` without --config) imports and runs where omegaconf is not installed (the lent GPU image)."""
    try:
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:
        raise ConfigError("reading a run config needs omegaconf, which is not installed here "
                          "(pip install omegaconf)") from None
    return OmegaConf, OmegaConfBaseException

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
            if isinstance(value, dict) and typing.get_origin(_KEYS[key]) is not dict:  # (a mapping-valued leaf)
                raise ConfigError(f"{source}: {key} must be {_describe_type(_KEYS[key])}, not a mapping")
            if _KEYS[key] in (bool, typing.Optional[bool]) and not isinstance(value, bool) and value is not None:
                # (omegaconf would read 3, 0.5 or "on" as a boolean: say what is wanted instead)
                raise ConfigError(f"{source}: {key}={value!r} is not {_describe_type(_KEYS[key])}")
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
    OmegaConf, OmegaConfBaseException = _omegaconf()
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
    OmegaConf, OmegaConfBaseException = _omegaconf()
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
    OmegaConf, OmegaConfBaseException = _omegaconf()
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
    OmegaConf, OmegaConfBaseException = _omegaconf()
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
    OmegaConf, OmegaConfBaseException = _omegaconf()
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

REPO_ROOT = Path(__file__).resolve().parents[2]
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


def _shown_default(f: dataclasses.Field) -> str:
    """A field's default as YAML writes it (``null``, ``true``, ``[q_proj, v_proj]``, ``{}``)."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
    return shown.removesuffix("\n...").removesuffix("...").strip()


def schema_lines(cls: type = Config, prefix: str = "") -> list[str]:
    """Every leaf key of the schema with its default and its one-line doc, for `train --help`."""
    docs = _field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if _is_section(tp):
            lines += schema_lines(tp, prefix + f.name + ".")
            continue
        shown = _shown_default(f)
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
    "train.early_stopping_patience", "train.early_stopping_threshold", "train.keep_best",  # (the count goes on)
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
