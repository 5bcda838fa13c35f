"""The configuration reference (``docs/reference.md``), generated from the schema so that it cannot drift: every key
with its default, its one-line doc (the comment beside the field in `jqlora.config.schema`) and whether a resumed run
may change it. ``python tools/make_reference.py`` writes the file; ``tests/config/test_reference.py`` checks that the
committed one is current."""

from __future__ import annotations

import dataclasses

from jqlora.config.load import RESUMABLE_KEYS, _field_docs, _field_types, _is_section, _shown_default
from jqlora.config.schema import Config

SECTIONS = {
    "model": "The base checkpoint and how its frozen weights are stored.",
    "lora": "Which modules get adapters, their shape, and where they start.",
    "data": "The training (and evaluation) data and how it becomes rows.",
    "train": "The optimizer, the schedule, the loop's cadences, checkpoints and stopping.",
    "preference": "Preference optimization (train.objective dpo, orpo, simpo, kto): the loss and its reference.",
    "grpo": "GRPO (train.objective grpo): rollouts, rewards, the clipped loss and its KL anchor.",
    "mesh": "The device mesh; its sizes multiply to the device count (docs/guide.md, \"Multi-GPU and multi-node\").",
    "log": "Where the metrics go besides `metrics.jsonl` and the log.",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(cls: type, prefix: str, fields: list[dataclasses.Field]) -> list[str]:
    docs = _field_docs(cls)
    rows = []
    for f in fields:
        key = prefix + f.name
        resumable = "yes" if key in RESUMABLE_KEYS else ""
        rows.append(f"| `{key}` | `{_cell(_shown_default(f))}` | {_cell(docs.get(f.name, ''))} | {resumable} |")
    return rows


def reference_markdown() -> str:
    """``docs/reference.md``'s text."""
    head = ["| key | default | what it does | a resume may change it |", "|---|---|---|---|"]
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from jqlora/config/schema.py by `python tools/make_reference.py`; do not edit by hand. -->",
        "",
        "Set keys in a YAML file (`python -m jqlora.train --config FILE`) or on the command line as `key.sub=value`;",
        "the command line wins. An unknown or mistyped key fails with its name. `configs/demo.yaml` lists every key.",
        "A resumed run (same `output_dir`) may change only the keys marked in the last column; any other change is",
        "refused and named.",
    ]
    types = _field_types(Config)
    top = []
    for f in dataclasses.fields(Config):
        tp = types[f.name]
        if not _is_section(tp):
            top.append(f)
            continue
        out += ["", f"## `{f.name}`", "", SECTIONS[f.name], "", *head, *_rows(tp, f.name + ".", dataclasses.fields(tp))]
    out += ["", "## Top level", "", *head, *_rows(Config, "", top)]
    return "\n".join(out) + "\n"
