"""The model shape `python -m jqlora.plan` plans for (`jqlora.plan`'s --model and --model-config): a built-in name, a
hub id (built in, or its config.json in the local Hugging Face cache), a recipe's name, a config.json, its
directory, or the JSON itself. Nothing heavy is imported before it is needed, and nothing is fetched."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from jqlora.planning.model_shapes import HUB_IDS, NAMES, PUBLISHED

if TYPE_CHECKING:
    from jqlora.models import ModelConfig


class UsageError(Exception):
    """A mistake in the plan's arguments: one line, exit status 2."""


# Mistral-7B v0.3 (the mistral-7b recipe's checkpoint): v0.1's shape with a 32768 vocabulary and no sliding window
_CLI_SHAPES = {"mistral-7b-v0.3": {
    **{k: v for k, v in PUBLISHED["mistral-7b"].items() if k != "sliding_window"}, "vocab_size": 32768,
    "rope_theta": 1000000.0}}
_CLI_NAMES = {"mistral-7b-v0.3": "Mistral-7B-v0.3"}


def model_config_file(path: str) -> ModelConfig:
    from jqlora.models import ModelConfig

    try:
        return ModelConfig.from_hf(path)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise UsageError(f"{path}: not a usable config.json ({e})") from None


def lookup_shape(name: str) -> tuple[ModelConfig, str] | None:
    """(shape, display name) for a built-in name, a hub id, a checkpoint directory's name or a recipe's name."""
    from jqlora.models import ModelConfig
    from jqlora.planning.memory import BUILTIN

    key = name.strip().rstrip("/").lower()
    if key in BUILTIN:
        return BUILTIN[key], NAMES[key]
    short = {hub.rsplit("/", 1)[-1]: v for hub, v in HUB_IDS.items()}
    found = HUB_IDS.get(key) or short.get(key.rsplit("/", 1)[-1])
    if found is None:
        from jqlora.config import REPO_ROOT

        recipe = REPO_ROOT / "configs" / f"{key}.yaml"
        if recipe.is_file() and key != "demo":
            from jqlora.config import load_config

            path = load_config(str(recipe), []).model.path or ""
            return lookup_shape(os.path.basename(path.rstrip("/"))) if path else None
        return None
    if found in BUILTIN:
        return BUILTIN[found], NAMES[found]
    return ModelConfig.from_hf(_CLI_SHAPES[found]), _CLI_NAMES[found]


def model_json(text: str) -> tuple[ModelConfig, str]:
    """--model-config: a config.json, its directory, or the JSON itself (``'{"model_type": "llama", ...}'``)."""
    from jqlora.models import ModelConfig

    import json

    if text.lstrip().startswith("{"):
        try:
            d = json.loads(text)
        except ValueError as e:
            raise UsageError(f"--model-config: not valid JSON ({e})") from None
        try:
            return ModelConfig.from_hf(d), "model"
        except (ValueError, TypeError, KeyError) as e:
            raise UsageError(f"--model-config: not a usable config ({e})") from None
    path = os.path.join(text, "config.json") if os.path.isdir(text) else text
    if not os.path.isfile(path):
        raise UsageError(f"--model-config {text}: no such file")
    return model_config_file(path), os.path.basename(os.path.dirname(os.path.abspath(path)))


def cached_shape(hub_id: str | None) -> tuple[ModelConfig, str] | None:
    """A hub id's config.json from the local Hugging Face cache (``HF_HUB_CACHE``), when it was downloaded once;
    nothing is fetched."""
    if not hub_id or hub_id.count("/") != 1 or os.path.exists(hub_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(hub_id, "config.json")
    except ValueError:  # (not a valid repo id)
        return None
    if not isinstance(found, str):
        return None
    return model_config_file(found), hub_id.rsplit("/", 1)[-1]
