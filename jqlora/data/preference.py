"""Preference data (DPO, IPO, ORPO, SimPO, KTO): records -> prompt and completion token ids, as TRL 1.16 makes them.

Formats (TRL's documented preference formats, decided per record):
- standard        {"prompt": str, "chosen": str, "rejected": str}
- conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
- implicit prompt {"chosen": str | [messages], "rejected": same}: no prompt field; the prompt is the shared prefix
                  (TRL's `extract_prompt`: the longest common prefix of characters or messages, a space just before
                  the first difference going to the completions; when one side is a prefix of the other, the prompt
                  stops one element short, as in TRL)
- unpaired (KTO)  {"prompt": str | [messages], "completion": same, "label": bool}. `kind="unpaired"` also takes paired
                  records and unpairs them as TRL's KTOTrainer does: per block of 1000 records, every chosen (label
                  true) and then every rejected (label false), after extracting implicit prompts.

Tokenizing (TRL 1.16 `DPOTrainer` / `KTOTrainer._prepare_dataset`): standard text is tokenized with the tokenizer's
special tokens (so BOS where the tokenizer adds one), and the completion gets the EOS text appended unless it already
ends with it. Conversations go through `apply_chat_template(tokenize=True)`: the prompt with the generation prompt,
prompt + completion as the whole conversation, so the completion's ids are the template's continuation (its
end-of-turn marker included; no EOS is appended). The template is `chat_template` if given, else the tokenizer's,
else jqlora's built-in DEFAULT_CHAT_TEMPLATE (the SFT path's fallback). The prompt's ids are the longest common prefix
of the tokenized prompt and each tokenized prompt + completion (the smaller of chosen's and rejected's), so a token
that merges across the boundary or a template that renders the prompt alone differently moves into the completion.
A record's `tools` / `chat_template_kwargs` fields reach the template, as in TRL. TRL's CPOTrainer (SimPO) and
ORPOTrainer still tokenize the 0.x way (`tokenize_row`): the same ids on standard data, but on conversations they
append an EOS id after the template's text unless it is already the last token (ChatML's text ends in a newline, so
they train `<|im_end|>` twice); jqlora uses the DPO/KTO ids for every objective.

Truncation (TRL 1.16 has no `max_prompt_length`; jqlora keeps it, applied first, as TRL 0.x did):
1. `max_prompt_length`: a longer prompt keeps its last (`keep_end`) or first (`keep_start`) tokens.
2. `max_length` bounds prompt + completion, each sequence of a pair:
   - `keep_start` (TRL 1.16's default): the completions lose their ends (TRL's collator keeps the first max_length
     tokens of each sequence). A prompt of max_length tokens or more leaves no room for the completion: TRL drops such
     an example silently, jqlora raises DataError.
   - `keep_end`: the prompt loses its start, by as much as the longer completion needs, so chosen and rejected share
     one prompt (TRL 1.16's deprecated keep_end cuts each sequence separately; the two agree on the longer sequence,
     and on both when the completions are equally long). A completion of max_length tokens or more leaves no room for
     the prompt: DataError. TRL's KTOTrainer knows only keep_start.

Every bad record is one DataError line "file:line: what is wrong".
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from jqlora.data.errors import DataError
from jqlora.data.records import DEFAULT_CHAT_TEMPLATE, ROLES, read_chat_template, read_records

KINDS = ("paired", "unpaired")
TRUNCATION_MODES = ("keep_end", "keep_start")
_TOKENIZE_CHUNK = 512
UNPAIR_BLOCK = 1000  # TRL's unpair_preference_dataset is a batched datasets.map: default batch size 1000


@dataclasses.dataclass(frozen=True)
class PairIds:
    """A paired preference example (DPO / IPO / ORPO / SimPO): the sequences are prompt + chosen, prompt + rejected."""
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    where: str = ""


@dataclasses.dataclass(frozen=True)
class UnpairedIds:
    """An unpaired example (KTO): the sequence is prompt + completion; label True = desirable."""
    prompt: list[int]
    completion: list[int]
    label: bool
    where: str = ""


def read_preference_examples(path: str, tokenizer, *, kind: str, max_length: int | None,
                             max_prompt_length: int | None, truncation_mode: str = "keep_end", split: str = "train",
                             chat_template: str | None = None, subset: str | None = None
                             ) -> list[PairIds] | list[UnpairedIds]:
    """Every record of a dataset (whatever `read_records` reads) tokenized as `kind` ("paired" or "unpaired")."""
    _check_options(kind, truncation_mode, max_length, max_prompt_length)
    records = read_records(path, split=split, subset=subset)
    template = read_chat_template(chat_template) if chat_template else None
    items = [(r.data, r.where) for r in records]
    if kind == "unpaired" and isinstance(items[0][0], dict) and "chosen" in items[0][0] and "rejected" in items[0][0]:
        items = _unpair(items)
    out: list = []
    for lo in range(0, len(items), _TOKENIZE_CHUNK):
        out += _tokenize(items[lo: lo + _TOKENIZE_CHUNK], tokenizer, kind, max_length, max_prompt_length,
                         truncation_mode, template)
    return out


def check_preference_records(records: list, kind: str) -> None:
    """Every record has the fields of ``kind`` ("paired" / "unpaired"; paired records unpaired for KTO, as
    `read_preference_examples` does), checked without a tokenizer: the fast check before JAX and the weights."""
    items = [(r.data, r.where) for r in records]
    if kind == "unpaired" and isinstance(items[0][0], dict) and "chosen" in items[0][0] and "rejected" in items[0][0]:
        items = _unpair(items)
    for record, where in items:
        if not isinstance(record, dict):
            raise DataError(_at(where, f"expected an object, got {type(record).__name__}"))
        (_paired_fields if kind == "paired" else _unpaired_fields)(record, where)
        if any(isinstance(v, list) for v in (record.get("prompt"), record.get("chosen"), record.get("completion"))):
            _template_kwargs(record, where)


def tokenize_preference_record(record: dict, tokenizer, *, kind: str, max_length: int | None,
                               max_prompt_length: int | None, truncation_mode: str = "keep_end", where: str = "",
                               chat_template: str | None = None) -> PairIds | UnpairedIds:
    """One record's ids (see the module docstring); `where` ("file:line") starts every error message."""
    _check_options(kind, truncation_mode, max_length, max_prompt_length)
    template = read_chat_template(chat_template) if chat_template else None
    return _tokenize([(record, where)], tokenizer, kind, max_length, max_prompt_length, truncation_mode, template)[0]


def _tokenize(items: list[tuple[dict, str]], tokenizer, kind, max_length, max_prompt_length, truncation_mode,
              chat_template) -> list:
    """Records to ids, the tokenizer called once per chunk: texts as they are (its special tokens added, as TRL's
    `processing_class(text=...)`), conversations rendered and then tokenized without special tokens (which is what
    `apply_chat_template(tokenize=True)`, TRL's call, does)."""
    names = ("chosen", "rejected") if kind == "paired" else ("completion",)
    template = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    eos = tokenizer.eos_token
    texts: dict[bool, list[str]] = {True: [], False: []}  # add_special_tokens -> texts
    plans = []
    for record, where in items:
        if not isinstance(record, dict):
            raise DataError(_at(where, f"expected an object, got {type(record).__name__}"))
        prompt, completions = (_paired_fields if kind == "paired" else _unpaired_fields)(record, where)
        if isinstance(prompt, list):
            kwargs = _template_kwargs(record, where)
            strings = [_render(tokenizer, prompt, template, kwargs, where, generation_prompt=True)]
            strings += [_render(tokenizer, prompt + c, template, kwargs, where) for c in completions]
            special = False
        else:
            if eos:
                completions = [c if c.endswith(eos) else c + eos for c in completions]
            strings = [prompt] + [prompt + c for c in completions]
            special = True
        plans.append((record, where, special, len(texts[special])))
        texts[special] += strings
    ids = {special: tokenizer(batch, add_special_tokens=special)["input_ids"] if batch else []
           for special, batch in texts.items()}
    out = []
    for record, where, special, start in plans:
        prompt_ids, *full_ids = (list(x) for x in ids[special][start: start + 1 + len(names)])
        cut = min(_common_prefix(prompt_ids, f) for f in full_ids)
        prompt_ids, completion_ids = prompt_ids[:cut], [f[cut:] for f in full_ids]
        for name, c in zip(names, completion_ids):
            if not c:
                raise DataError(_at(where, f"'{name}' has no tokens of its own after the prompt"))
        prompt_ids, completion_ids = _truncate(prompt_ids, completion_ids, names, max_length, max_prompt_length,
                                               truncation_mode, where)
        if kind == "paired":
            out.append(PairIds(prompt_ids, completion_ids[0], completion_ids[1], where))
        else:
            out.append(UnpairedIds(prompt_ids, completion_ids[0], bool(record["label"]), where))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Fields


def _at(where: str, message: str) -> str:
    return f"{where}: {message}" if where else message


def _check_options(kind, truncation_mode, max_length, max_prompt_length) -> None:
    if kind not in KINDS:
        raise DataError(f"unknown preference data kind {kind!r} (one of {', '.join(KINDS)})")
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"unknown truncation_mode {truncation_mode!r} (one of {', '.join(TRUNCATION_MODES)})")
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"{name} must be a positive integer or None, got {value!r}")


def _value(record: dict, name: str, where: str, *, prompt: bool = False):
    """A prompt or completion: a string or a validated list of messages."""
    if record.get(name) is None:
        raise DataError(_at(where, f"missing '{name}'"))
    value = record[name]
    if isinstance(value, str):
        if not prompt and not value.strip():
            raise DataError(_at(where, f"empty completion: '{name}' is {value!r}"))
        return value
    if not isinstance(value, (list, tuple)):
        raise DataError(_at(where, f"'{name}' must be a string or a list of messages, got {type(value).__name__}"))
    if not value:
        raise DataError(_at(where, f"empty {'prompt' if prompt else 'completion'}: '{name}' is an empty list"))
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(_at(where, f"{name}[{i}] must be an object with 'role' and 'content', got "
                                       f"{type(m).__name__}"))
        if m.get("role") not in ROLES:
            raise DataError(_at(where, f"{name}[{i}]: role {m.get('role')!r} is not one of {', '.join(ROLES)}"))
        if not isinstance(m.get("content"), str):
            raise DataError(_at(where, f"{name}[{i}]: 'content' must be a string, got "
                                       f"{type(m.get('content')).__name__}"))
        out.append(dict(m))
    if not prompt and not any(m["content"].strip() for m in out):
        raise DataError(_at(where, f"empty completion: every message of '{name}' has empty content"))
    return out


def _same_kind(where: str, values: dict) -> None:
    lists = [name for name, v in values.items() if isinstance(v, list)]
    if lists and len(lists) < len(values):
        strings = [name for name in values if name not in lists]
        raise DataError(_at(where, f"{'/'.join(strings)} text but {'/'.join(lists)} a list of messages: use one "
                                   "format (all strings or all conversations)"))


def _paired_fields(record: dict, where: str) -> tuple[Any, list]:
    chosen = _value(record, "chosen", where)
    rejected = _value(record, "rejected", where)
    if record.get("prompt") is None:  # implicit prompt
        _same_kind(where, {"chosen": chosen, "rejected": rejected})
        return _extract_prompt(chosen, rejected, where)
    prompt = _value(record, "prompt", where, prompt=True)
    _same_kind(where, {"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return prompt, [chosen, rejected]


def _unpaired_fields(record: dict, where: str) -> tuple[Any, list]:
    for name in ("prompt", "completion", "label"):
        if record.get(name) is None:
            hint = " (a paired record: read the dataset with kind='unpaired' to unpair it)" \
                if name != "prompt" and "chosen" in record else ""
            raise DataError(_at(where, f"missing '{name}'{hint}"))
    label = record["label"]
    if not isinstance(label, (bool, np.bool_)):  # JSON true/false; a numpy bool from a table
        raise DataError(_at(where, f"'label' must be true or false, got {type(label).__name__} {label!r}"))
    prompt = _value(record, "prompt", where, prompt=True)
    completion = _value(record, "completion", where)
    _same_kind(where, {"prompt": prompt, "completion": completion})
    return prompt, [completion]


def _extract_prompt(chosen, rejected, where: str) -> tuple[Any, list]:
    """TRL's extract_prompt: the shared prefix (characters or messages) is the prompt."""
    n = min(len(chosen), len(rejected))
    idx = n - 1  # TRL's loop variable when no element differs
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    if idx <= 0:
        raise DataError(_at(where, "no 'prompt' and 'chosen' and 'rejected' share no prefix to take as the prompt"))
    prompt, chosen, rejected = chosen[:idx], chosen[idx:], rejected[idx:]
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, list) and not any(m["content"].strip() for m in value):
            raise DataError(_at(where, f"empty completion: '{name}' holds nothing after the shared prompt"))
    return prompt, [chosen, rejected]


def _unpair(items: list[tuple[dict, str]]) -> list[tuple[dict, str]]:
    """TRL's unpair_preference_dataset in blocks of UNPAIR_BLOCK: a block's chosen (label true), then its rejected."""
    out = []
    for lo in range(0, len(items), UNPAIR_BLOCK):
        block = items[lo: lo + UNPAIR_BLOCK]
        pairs = []
        for data, where in block:
            if not isinstance(data, dict):
                raise DataError(_at(where, f"expected an object, got {type(data).__name__}"))
            prompt, (chosen, rejected) = _paired_fields(data, where)
            pairs.append((data, where, prompt, chosen, rejected))
        for side, label in ((3, True), (4, False)):
            for p in pairs:
                data, where, prompt = p[0], p[1], p[2]
                row = {k: v for k, v in data.items() if k not in ("prompt", "chosen", "rejected")}
                row.update(prompt=prompt, completion=p[side], label=label)
                out.append((row, f"{where} ({'chosen' if label else 'rejected'})"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tokens


def _template_kwargs(record: dict, where: str) -> dict:
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(_at(where, f"'tools' is not valid JSON ({e.msg})")) from None
    extra = record.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise DataError(_at(where, f"'chat_template_kwargs' must be an object, got {type(extra).__name__}"))
    return {"tools": tools, **extra}


def _render(tokenizer, messages: list[dict], template: str, kwargs: dict, where: str, *,
            generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt, **kwargs)
    except Exception as e:  # jinja2 TemplateError, raise_exception(...) in the template, ...
        raise DataError(_at(where, f"the chat template rejects this conversation ({str(e).splitlines()[0]})")) \
            from None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _truncate(prompt: list[int], completions: list[list[int]], names, max_length, max_prompt_length, mode,
              where) -> tuple[list[int], list[list[int]]]:
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:] if mode == "keep_end" else prompt[:max_prompt_length]
    if max_length is None:
        return prompt, completions
    if mode == "keep_start":
        if len(prompt) >= max_length:
            raise DataError(_at(where, f"the prompt's {len(prompt)} tokens leave no room for the completion within "
                                       f"max_length={max_length} (raise the max length or set max_prompt_length)"))
        room = max_length - len(prompt)
        return prompt, [c[:room] for c in completions]
    longest = max(range(len(completions)), key=lambda i: len(completions[i]))
    over = len(prompt) + len(completions[longest]) - max_length
    if over > 0:
        if over >= len(prompt):
            raise DataError(_at(where, f"'{names[longest]}' has {len(completions[longest])} tokens, which leaves no "
                                       f"room for the prompt within max_length={max_length} (truncation_mode="
                                       "keep_end keeps every completion token)"))
        prompt = prompt[over:]
    return prompt, completions
