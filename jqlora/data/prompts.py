"""Prompt-only data for online RL (train.objective=grpo), TRL's prompt-only format: each record's ``prompt`` is a
string (tokenized as it is, no special tokens added, as TRL's GRPOTrainer does) or a list of messages (rendered by
the chat template with the generation prompt). Every other column travels with the prompt to the reward functions.
A prompt longer than ``max_prompt_length`` tokens keeps its end (TRL's left truncation). A bad record is one
`DataError` line naming its file:line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jqlora.data.errors import DataError
from jqlora.data.records import read_chat_template, read_records
from jqlora.data.records import ROLES


@dataclasses.dataclass(frozen=True)
class PromptExample:
    ids: list[int]  # the prompt's token ids (rendered)
    prompt: Any  # the record's prompt: a string or a list of messages
    columns: dict  # the record's other columns
    where: str  # file:line
    index: int  # position in the dataset (reward errors name it)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


class PromptDataset:
    """The prompts of a run; ``examples[i]`` is row i (what `jqlora.data.BatchIterator`'s row ids index)."""

    def __init__(self, examples: list[PromptExample]):
        self.examples = examples
        self.stats: dict = {}

    def __len__(self) -> int:
        return len(self.examples)


def _prompt(value: Any, where: str) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty 'prompt'")
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of messages, got "
                        f"{type(value).__name__} {value!r}"[:300])
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: prompt[{i}] must be a message {{'role': one of {', '.join(ROLES)}, "
                            f"'content': a string}}, got {m!r}"[:300])
        out.append({"role": m["role"], "content": m["content"]})
    return out


def check_prompt_records(records: list) -> None:
    """Every record holds a prompt (a string or a list of messages), checked without a tokenizer."""
    for rec in records:
        _prompt_field(rec)


def _prompt_field(rec) -> Any:
    if not isinstance(rec.data, dict) or "prompt" not in rec.data:
        raise DataError(f"{rec.where}: missing 'prompt' (train.objective=grpo reads prompt-only records)")
    return _prompt(rec.data["prompt"], rec.where)


def encode_prompt(prompt: Any, tokenizer, *, chat_template: str | None = None, where: str = "") -> list[int]:
    """The token ids the model continues from (see the module doc)."""
    if isinstance(prompt, str):
        text = prompt
    else:
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: a conversational prompt needs a chat template (the tokenizer has none; set "
                            "data.chat_template)")
        try:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                                 chat_template=chat_template)
        except Exception as e:  # noqa: BLE001 - a template's own error, in one line
            raise DataError(f"{where}: the chat template failed on this prompt ({type(e).__name__}: {e})") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def read_prompts(path: str, tokenizer, *, split: str = "train", subset: str | None = None,
                 chat_template: str | None = None, max_prompt_length: int | None = None) -> PromptDataset:
    """Every record of ``path`` as a `PromptExample` (one-line `DataError` for a bad record)."""
    template = read_chat_template(chat_template) if chat_template else None
    examples = []
    for i, rec in enumerate(read_records(path, split=split, subset=subset)):
        prompt = _prompt_field(rec)
        ids = encode_prompt(prompt, tokenizer, chat_template=template, where=rec.where)
        if not ids:
            raise DataError(f"{rec.where}: the prompt has no tokens")
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids = ids[-max_prompt_length:]
        columns = {k: v for k, v in rec.data.items() if k != "prompt"}
        examples.append(PromptExample(ids, prompt, columns, rec.where, i))
    return PromptDataset(examples)
