"""A training run's config on top of the schema (`jqlora.config`): the demo when nothing is given, the schema with
defaults and docs for `train --help`, and which changes a resumed run may make.

The demo is `configs/demo.yaml`, which `load_run_config` picks when neither a file nor `model.path` is given; its
`assets/demo/...` paths are the repository's, from any directory. Any other run must set its model and data.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from jqlora.config import (COMMAND_LINE, Config, ConfigError, _field_types, _is_section, config_to_dict,
                           load_config)

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
    return [(k, a.get(k), b.get(k)) for k in b if k not in RESUMABLE_KEYS and a.get(k) != b.get(k)]
