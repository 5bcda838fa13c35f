"""docs/reference.md is generated from the schema (`jqlora.config.reference`): the committed file is current, and it
names every key of the schema, with the default a freshly built config holds, once."""

import re
from pathlib import Path

from jqlora.config import Config, config_to_dict
from jqlora.config.reference import reference_markdown

REPO = Path(__file__).resolve().parents[2]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k in ("model", "lora", "data", "train", "mesh", "preference", "grpo", "log"):
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def test_committed_reference_is_current():
    assert (REPO / "docs" / "reference.md").read_text() == reference_markdown(), \
        "docs/reference.md is out of date: run python tools/make_reference.py"


def test_reference_names_every_key_once_with_its_default():
    import yaml

    rows = re.findall(r"^\| `([\w.]+)` \| `(.*?)` \|", reference_markdown(), re.M)
    keys = [k for k, _ in rows]
    defaults = _flat(config_to_dict(Config()))
    assert sorted(keys) == sorted(defaults) and len(keys) == len(set(keys))
    for key, shown in rows:
        assert yaml.safe_load(shown.replace("\\|", "|")) == defaults[key], key
