"""Datasets to training rows: records -> rendered text -> token ids + trained-token flags -> packed rows -> batches.

Formats (`data.format`, or `auto`: chosen from the first record's fields):
- chat               {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}, any number of turns
- prompt_completion  {"prompt": str, "completion": str}; the prompt may also be a list of messages (then the
                     completion is the assistant's reply, a string, or a list of messages)
- instruction        Alpaca: {"instruction": str, "input": str (optional), "output": str}
- text               {"text": str}: plain text, every token trained, BOS (if the tokenizer adds one) + text + EOS

Every format but `text` is rendered as a conversation through a chat template: `data.chat_template` (Jinja text, a
.jinja file, or a built-in name: `zephyr`, DEFAULT_CHAT_TEMPLATE, whose end of turn is the tokenizer's EOS, or
`chatml`), else the tokenizer's own. A tokenizer without one (a base model's) is an error naming data.chat_template,
as in TRL: a template chosen silently would leave the run with a prompt format nothing outside it knows. prompt/completion and Alpaca rows become one user turn (Alpaca:
instruction + blank line + input) and one assistant turn, so a model trained on any format answers the same
chat-formatted prompts that `jqlora.generate` sends.

Loss masks (`data.train_on`): `completion` trains exactly the tokens of every assistant turn — its content and the
template's end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `</s>`) — and nothing else: not the system/user turns,
not the assistant header (`<|im_start|>assistant\\n`, which the generation prompt supplies at inference), not the
whitespace a template puts after the end-of-turn marker. The spans are found by rendering prefixes of the
conversation: turn i's trained text is render(messages[:i+1]) minus render(messages[:i], add_generation_prompt) with
trailing whitespace stripped, where each is a prefix of the full rendering. Templates that rewrite earlier turns as
the conversation grows (Mistral's system prompt in the last user turn) are handled by finding the turn's content
plus end-of-turn text, as rendered when it is the last turn, in the full text, in order. The full text is tokenized once (as `apply_chat_template(tokenize=True)` would) and a token is
trained when its character span overlaps a trained span. `all` trains every token.

`last_turn` trains the last assistant turn's span only (axolotl's roles_to_train=[assistant] with only the
final turn), and `data.train_on_eos=false` leaves each turn's end-of-turn text out of its span (the span ends with
the turn's content). Rows, batches and the batch contract: `jqlora.data.rows`; a run's datasets from its config
(one or several sources): `jqlora.data.mixture`.

Examples over max_length follow `data.overlong`: truncate (keep the first max_length tokens; an example left with no
trained target is dropped), drop, or error. A dataset left with no trainable example is an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from jqlora.data import sources
from jqlora.data.errors import DataError
from jqlora.data.rows import Example

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FORMATS = ("chat", "instruction", "prompt_completion", "text")

# Zephyr-style: "<|user|>\n...EOS\n<|assistant|>\n...EOS\n". Only needs the tokenizer's EOS (and BOS when it has one),
# so it works for base-model tokenizers that ship no template; generation stops at EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_CHAT_TEMPLATES = {"zephyr": DEFAULT_CHAT_TEMPLATE, "chatml": CHATML_TEMPLATE}

_TOKENIZE_CHUNK = 512


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path: str, chat_template: str | None = None):
    """`AutoTokenizer.from_pretrained(path)`, with an optional template override (Jinja text or a file path)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    return tokenizer


def read_chat_template(template: str) -> str:
    """A template given as text, as the path of a file holding it (.jinja, .j2, .txt or any existing file), or as a
    built-in name (BUILTIN_CHAT_TEMPLATES)."""
    if template in BUILTIN_CHAT_TEMPLATES and not os.path.isfile(template):
        return BUILTIN_CHAT_TEMPLATES[template]
    if "{" not in template and (os.path.isfile(template) or template.endswith((".jinja", ".j2"))):
        if not os.path.isfile(template):
            raise DataError(f"{template}: chat template file not found")
        with open(template, encoding="utf-8") as f:
            return f.read()
    return template


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Reading records


@dataclasses.dataclass(frozen=True)
class Record:
    data: dict
    where: str  # "file:line" for JSON lines, "name: row i" (0-based) otherwise


def read_records(path: str, *, split: str = "train", subset: str | None = None,
                 what: str = "data.path") -> list[Record]:
    """Every record of a local file (.jsonl/.json/.parquet/.csv), a local dataset directory, or a hub dataset
    (`jqlora.data.sources` tells which; ``what`` names the setting in the error of a path that does not exist)."""
    path = os.path.expanduser(str(path))
    lower = path.lower()
    kind = sources.classify(path, what)
    if kind == "file" and lower.endswith(sources.JSON_TYPES):
        records = _read_json_file(path)
    elif kind == "file" and lower.endswith((".parquet", ".csv", ".tsv")):
        builder = "parquet" if lower.endswith(".parquet") else "csv"
        kwargs = {"delimiter": "\t"} if lower.endswith(".tsv") else {}
        records = _from_datasets(path, "train", lambda ds: ds.load_dataset(builder, data_files=path, split="train",
                                                                             **kwargs))
    elif kind == "file":
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json, .parquet or .csv)")
    elif kind == "dir":
        records = _from_datasets(path, split, lambda ds: ds.load_dataset(path, subset, split=split))
    else:  # a hub dataset name such as "tatsu-lab/alpaca"
        offline = _go_offline_if_unreachable()
        records = _from_datasets(path, split, lambda ds: ds.load_dataset(path, subset, split=split))
        if offline:
            log.warning("%s: the Hugging Face Hub (%s) is not reachable: read from the local cache", path,
                        sources.hub_endpoint())
    if not records:
        raise DataError(f"{path}: no records (empty dataset)")
    return records


def _go_offline_if_unreachable() -> bool:
    """No network path to the Hub: datasets is told to use its cache (no retries), before it is imported."""
    if sources.offline_by_env() or sources.hub_reachable():
        return False
    for name in ("datasets.config", "huggingface_hub.constants"):  # (imported already: they read the variable then)
        if name in sys.modules:
            sys.modules[name].HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    return True


def _from_datasets(name: str, split: str, load) -> list[Record]:
    import datasets

    try:
        ds = load(datasets)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError, ...)
        if sources.offline_by_env() and sources.looks_like_hub_name(name) and not os.path.exists(name):
            raise sources.offline_error(name) from None
        raise DataError(f"{name}: cannot load split '{split}' ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    return [Record(dict(row), f"{name}: row {i}") for i, row in enumerate(ds)]


def _read_json_file(path: str) -> list[Record]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # (the line and column of the first byte that is not UTF-8)
        lineno = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col}); save the "
                        "file as UTF-8") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # (as a text-mode open reads it)
    if path.lower().endswith(".json") and text.lstrip().startswith("["):  # a JSON array of records
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        out = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path}: record {i}: expected a JSON object, got {type(row).__name__}")
            out.append(Record(row, f"{path}: record {i}"))
        return out
    out = []  # JSON lines
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        out.append(Record(row, f"{path}:{lineno}"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Formats


def detect_format(record: Record, *, messages_field: str = "messages", text_field: str = "text") -> str:
    keys = set(record.data)
    if messages_field in keys:
        return "chat"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "instruction"
    if text_field in keys:
        return "text"
    raise DataError(
        f"{record.where}: cannot tell the format from the fields {sorted(keys)}: expected '{messages_field}' (chat), "
        f"'prompt'+'completion', 'instruction'+'output' or '{text_field}' (text); set data.format and the field names")


def _field(record: Record, name: str, fmt: str) -> Any:
    if name not in record.data or record.data[name] is None:
        raise DataError(f"{record.where}: missing '{name}' (format {fmt})")
    return record.data[name]


def _string(record: Record, name: str, fmt: str, *, optional: bool = False) -> str:
    if optional and record.data.get(name) is None:
        return ""
    value = _field(record, name, fmt)
    if not isinstance(value, str):
        raise DataError(f"{record.where}: '{name}' must be a string, got {type(value).__name__} (format {fmt})")
    return value


def _messages(record: Record, value: Any, name: str, fmt: str) -> list[dict]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{record.where}: '{name}' must be a non-empty list of {{role, content}} (format {fmt})")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{record.where}: {name}[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{record.where}: {name}[{i}]: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{record.where}: {name}[{i}]: 'content' must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def to_messages(record: Record, fmt: str, *, messages_field: str = "messages") -> list[dict]:
    """The conversation a chat / prompt_completion / instruction record stands for, validated."""
    if fmt == "chat":
        return _messages(record, _field(record, messages_field, fmt), messages_field, fmt)
    if fmt == "prompt_completion":
        prompt, completion = _field(record, "prompt", fmt), _field(record, "completion", fmt)
        if isinstance(prompt, str):
            prompt_msgs = [{"role": "user", "content": prompt}]
        else:
            prompt_msgs = _messages(record, prompt, "prompt", fmt)
        if isinstance(completion, str):
            completion_msgs = [{"role": "assistant", "content": completion}]
        else:
            completion_msgs = _messages(record, completion, "completion", fmt)
        return prompt_msgs + completion_msgs
    if fmt == "instruction":
        instruction = _string(record, "instruction", fmt)
        extra = _string(record, "input", fmt, optional=True)
        output = _string(record, "output", fmt)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    raise ValueError(f"not a conversation format: {fmt}")


# ---------------------------------------------------------------------------------------------------------------
# Rendering and tokenizing


def render_chat(messages: list[dict], tokenizer, *, chat_template: str | None = None, train_on: str = "completion",
                where: str = "", train_on_eos: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans [start, end) that carry loss (``train_on``: completion,
    last_turn or all; ``train_on_eos=False`` leaves each turn's end-of-turn text out of its span)."""
    template = chat_template or tokenizer.chat_template
    if not template:
        raise DataError(f"{where}: the tokenizer has no chat template; set data.chat_template to a Jinja file or a "
                        f"built-in name ({', '.join(BUILTIN_CHAT_TEMPLATES)})")

    def render(msgs, generation_prompt=False) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja2 TemplateError, raise_exception(...) in the template, ...
            raise DataError(f"{where}: the chat template rejects this conversation ({str(e).splitlines()[0]})") \
                from None

    full = render(messages)
    if train_on == "all":
        return full, [(0, len(full))]
    spans, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(messages[:i], generation_prompt=True) if i else _empty_head(render)
        upto = render(messages[: i + 1])
        if upto.startswith(head) and full.startswith(upto):
            start, end = len(head), len(upto.rstrip())
            k = (start if not m["content"] else upto.rfind(m["content"], start, end)) if not train_on_eos else -1
            if not train_on_eos and k < 0:
                raise DataError(f"{where}: cannot find assistant turn {i}'s text in the chat template's rendering, "
                                "so not its end-of-turn marker either; use data.train_on_eos=true")
            end = k + len(m["content"]) if not train_on_eos else end
        else:
            # Not prefix-stable (Mistral moves the system prompt into the last user turn, Qwen3 drops earlier
            # reasoning): find this turn's content and end-of-turn text, as rendered last, in the full text.
            k = upto.rfind(m["content"])
            piece = m["content"] + upto[k + len(m["content"]):].rstrip() if k >= 0 else None
            start = full.find(piece, pos) if piece else -1
            if start < 0:
                raise DataError(f"{where}: cannot locate assistant turn {i} in the chat template's rendering (the "
                                "template changes earlier turns as the conversation grows); set data.chat_template "
                                "or use data.train_on=all")
            pos, end = start + len(piece), start + (len(piece) if train_on_eos else len(m["content"]))
        if end > start:
            spans.append((start, end))
            pos = max(pos, end)
    if not spans:
        raise DataError(f"{where}: no assistant message, nothing to train on with data.train_on={train_on}")
    return full, spans[-1:] if train_on == "last_turn" else spans


def _empty_head(render) -> str:
    try:  # a conversation opening with the assistant: the header alone, if the template can render no messages
        return render([], generation_prompt=True)
    except DataError:
        return ""


def _tokenize_spans(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]):
    """Token ids and per-token trained flags: a token is trained when its characters overlap a trained span."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
            off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            starts, ends = off[:, 0], np.maximum(off[:, 1], off[:, 0] + 1)  # zero-width tokens occupy their start
            trained = np.zeros(len(ids), dtype=bool)
            for s, e in sp:
                trained |= (starts < e) & (ends > s)
            yield np.asarray(ids, dtype=np.int32), trained
        return
    for text, sp in zip(texts, spans):  # slow tokenizers: tokenize the pieces between span boundaries separately
        cuts = sorted({0, len(text), *[c for s in sp for c in s]})
        ids, trained = [], []
        for a, b in zip(cuts[:-1], cuts[1:]):
            piece = tokenizer.encode(text[a:b], add_special_tokens=False)
            inside = any(s <= a and b <= e for s, e in sp)
            ids += piece
            trained += [inside] * len(piece)
        yield np.asarray(ids, dtype=np.int32), np.asarray(trained, dtype=bool)


def encode_records(records: Sequence[Record], tokenizer, *, fmt: str = "auto", train_on: str = "completion",
                   messages_field: str = "messages", text_field: str = "text", chat_template: str | None = None,
                   train_on_eos: bool = True) -> tuple[list[Example], str]:
    """Tokenize records (all of one format) into Examples, untruncated; returns them and the format used."""
    if not records:
        raise DataError("no records")
    if fmt == "auto":
        fmt = detect_format(records[0], messages_field=messages_field, text_field=text_field)
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r} (one of auto, {', '.join(FORMATS)})")
    if chat_template:
        chat_template = read_chat_template(chat_template)
    out: list[Example] = []
    for lo in range(0, len(records), _TOKENIZE_CHUNK):
        chunk = records[lo: lo + _TOKENIZE_CHUNK]
        if fmt == "text":
            texts = [_string(r, text_field, fmt) for r in chunk]
            enc = tokenizer(texts, add_special_tokens=True)["input_ids"]
            eos = tokenizer.eos_token_id
            for r, ids in zip(chunk, enc):
                if eos is not None and (not ids or ids[-1] != eos):
                    ids = list(ids) + [eos]
                ids = np.asarray(ids, dtype=np.int32)
                out.append(Example(ids, np.ones(len(ids), dtype=bool), r.where))
            continue
        texts, spans = [], []
        for r in chunk:
            msgs = to_messages(r, fmt, messages_field=messages_field)
            text, sp = render_chat(msgs, tokenizer, chat_template=chat_template, train_on=train_on, where=r.where,
                                   train_on_eos=train_on_eos)
            texts.append(text)
            spans.append(sp)
        for r, (ids, trained) in zip(chunk, _tokenize_spans(tokenizer, texts, spans)):
            out.append(Example(ids, trained, r.where))
    return out, fmt


def fit_length(examples: Iterable[Example], max_length: int, overlong: str = "truncate", *,
               name: str = "dataset", stats: dict | None = None) -> list[Example]:
    """Apply the overlong policy; drop examples with no trained target. Raises if none is left.

    ``stats``, when given, receives the counts: examples, truncated, dropped_long, dropped_empty."""
    kept, dropped_long, dropped_empty, total, truncated = [], 0, 0, 0, 0
    for ex in examples:
        total += 1
        if len(ex.ids) > max_length:
            if overlong == "error":
                raise DataError(f"{ex.where}: {len(ex.ids)} tokens, more than data.max_length={max_length} "
                                "(set data.overlong=truncate or drop)")
            if overlong == "drop":
                dropped_long += 1
                continue
            ex = Example(ex.ids[:max_length], ex.trained[:max_length], ex.where)
            truncated += 1
        if not ex.trained[1:].any():  # the first token is never a target
            dropped_empty += 1
            continue
        kept.append(ex)
    if stats is not None:
        stats.update(examples=total, truncated=truncated, dropped_long=dropped_long, dropped_empty=dropped_empty)
    if total == 0:
        raise DataError(f"{name}: no examples")
    if not kept:
        raise DataError(f"{name}: none of the {total} examples has a trained token within data.max_length="
                        f"{max_length} ({dropped_long} over the limit dropped, {dropped_empty} left with nothing to "
                        "train on); raise data.max_length or check data.train_on")
    if dropped_long or dropped_empty:
        log.warning("%s: dropped %d of %d examples (%d over data.max_length=%d, %d with no trained token left)",
                    name, dropped_long + dropped_empty, total, dropped_long, max_length, dropped_empty)
    return kept
