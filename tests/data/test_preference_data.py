"""jqlora.data.preference against TRL 1.16 as the oracle: the prompt / completion ids of every preference format,
truncation, and one-line errors naming file:line.

The oracle is TRL's own dataset preparation: `DPOTrainer._prepare_dataset` / `KTOTrainer._prepare_dataset` (prompt
extraction, unpairing, EOS, tokenizing, the prompt / completion split, the max_length filter) called with a stand-in
`self` that carries only the attributes those methods read (the tokenizer; KTO's KL switch and weights) and a real
DPOConfig / KTOConfig, then TRL's collators (`DataCollatorForPreference`, `DataCollatorForUnpairedPreference`), which
do the max_length truncation. `test_stand_in_is_the_trainers_path` builds a real DPOTrainer and KTOTrainer on a tiny
model once and checks their processed datasets equal the stand-in's, so the shortcut is TRL's code path.
"""

from __future__ import annotations

import json
import types

import pytest

from jqlora.data.errors import DataError
from jqlora.data.preference import (PairIds, UnpairedIds, read_preference_examples, tokenize_preference_record)

FIXTURE = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer"

STANDARD = [
    {"prompt": "the quick brown", "chosen": " fox jumps over the lazy dog", "rejected": " dog"},
    {"prompt": "hello world,", "chosen": " how are you today?", "rejected": "today?"},
    {"prompt": "add 12 and 30:", "chosen": " the answer is 42", "rejected": " the answer is 41"},
    {"prompt": "what is the capital of france?", "chosen": " paris.", "rejected": " paris<|im_end|>"},
]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers and the TRL oracle


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIXTURE))  # byte-level BPE, ChatML template, EOS <|im_end|>, no BOS


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    """The fixture tokenizer with a BOS that tokenizing adds (as Llama's does) and a Llama-3-style template."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    raw.add_special_tokens(["<s>"])
    bos = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[
        ("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n\n' + m['content'] + '<|im_end|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}")
    out = tmp_path_factory.mktemp("bos_tok")
    fast.save_pretrained(out)
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert loaded("hi")["input_ids"][0] == bos
    return loaded


def _dpo_config(tmp_path, **kw):
    from trl import DPOConfig

    return DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], **kw)


def trl_dpo(rows, tok, tmp_path, *, max_length=None, truncation_mode="keep_start"):
    """TRL's DPO data path: the prepared dataset's rows, and the collator's unpadded chosen / rejected sequences with
    their completion masks (max_length truncation is the collator's)."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    args = _dpo_config(tmp_path, max_length=max_length, truncation_mode=truncation_mode)
    stand_in = types.SimpleNamespace(_tokenizer=tok)
    prepared = DPOTrainer._prepare_dataset(stand_in, Dataset.from_list(rows), tok, args, "train")
    examples = [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in prepared]
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length,
                                        truncation_mode=truncation_mode)
    batch = collate(examples)
    n = len(examples)
    seqs = [(ids[m.bool()].tolist(), cm[m.bool()].tolist()) for ids, m, cm in
            zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])]
    return examples, seqs[:n], seqs[n:]


def _seq(prompt, completion):
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def ours(rows, tok, **kw):
    kw.setdefault("max_length", None)
    kw.setdefault("max_prompt_length", None)
    return [tokenize_preference_record(r, tok, kind="paired", where=f"rows:{i + 1}", **kw) for i, r in enumerate(rows)]


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("which", ["tok", "bos_tok"])
def test_standard_equals_trl(which, request, tmp_path):
    tok = request.getfixturevalue(which)
    examples, _, _ = trl_dpo(STANDARD, tok, tmp_path)
    got = read_preference_examples(_write(tmp_path, STANDARD), tok, kind="paired", max_length=None,
                                   max_prompt_length=None)
    assert all(isinstance(g, PairIds) for g in got)
    assert [(g.prompt, g.chosen, g.rejected) for g in got] == \
        [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]
    assert all(g.chosen[-1] == tok.eos_token_id and g.rejected[-1] == tok.eos_token_id for g in got)
    if which == "bos_tok":
        assert all(g.prompt[0] == tok.bos_token_id for g in got)
    assert got[0].where.endswith("data.jsonl:1")


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


CONVERSATIONAL = [
    {"prompt": _user("what is the capital of france?"), "chosen": _assistant("paris."),
     "rejected": _assistant("london, i think")},
    {"prompt": [{"role": "system", "content": "be brief"}, *_user("add 12 and 30")], "chosen": _assistant("42"),
     "rejected": _assistant("the answer is 41")},
    {"prompt": _user("hello world") + _assistant("hello, how are you?") + _user("the quick brown"),
     "chosen": _assistant("fox jumps over the lazy dog"), "rejected": _assistant("dog")},
]


@pytest.mark.parametrize("which", ["tok", "bos_tok"])
def test_conversational_equals_trl(which, request, tmp_path):
    tok = request.getfixturevalue(which)
    examples, _, _ = trl_dpo(CONVERSATIONAL, tok, tmp_path)
    got = ours(CONVERSATIONAL, tok)
    assert [(g.prompt, g.chosen, g.rejected) for g in got] == \
        [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]
    # the prompt ends with the generation prompt; the completion is the template's continuation, end of turn included
    header = tok("<|im_start|>assistant\n\n" if which == "bos_tok" else "<|im_start|>assistant\n",
                 add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert all(g.prompt[-len(header):] == header and end in g.chosen for g in got)


def test_chat_template_override_equals_trl_with_that_template(tok, tmp_path):
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    other = AutoTokenizer.from_pretrained(str(FIXTURE))
    other.chat_template = template
    examples, _, _ = trl_dpo(CONVERSATIONAL, other, tmp_path)
    path = tmp_path / "template.jinja"
    path.write_text(template)
    got = read_preference_examples(_write(tmp_path, CONVERSATIONAL), tok, kind="paired", max_length=None,
                                   max_prompt_length=None, chat_template=str(path))
    assert [(g.prompt, g.chosen, g.rejected) for g in got] == \
        [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]


IMPLICIT_TEXT = [
    {"chosen": "the quick brown fox jumps", "rejected": "the quick brown dog"},  # the space goes to the completions
    {"chosen": "add 12 and 30: 42", "rejected": "add 12 and 30: 41"},
    {"chosen": "hello world", "rejected": "hello world, how are you?"},  # one a prefix of the other: TRL's rule
]


@pytest.mark.parametrize("which", ["text", "conversational"])
def test_implicit_prompt_equals_trl(which, tok, tmp_path):
    if which == "text":
        rows = IMPLICIT_TEXT
    else:
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CONVERSATIONAL]
    examples, _, _ = trl_dpo(rows, tok, tmp_path)
    got = ours(rows, tok)
    assert [(g.prompt, g.chosen, g.rejected) for g in got] == \
        [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]
    if which == "conversational":  # the shared turns are the prompt: the same ids as the explicit form
        assert got == ours(CONVERSATIONAL, tok)


# ---------------------------------------------------------------------------------------------------------------
# KTO


def trl_kto(rows, tok, tmp_path, *, max_length=None):
    """TRL's KTO data path: prepared rows (prompt_ids, completion_ids, label) and the collator's sequences."""
    from datasets import Dataset
    from trl import KTOConfig
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer

    args = KTOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], max_length=max_length)
    stand_in = types.SimpleNamespace(_tokenizer=tok, calculate_KL=False, desirable_weight=1.0, undesirable_weight=1.0)
    prepared = KTOTrainer._prepare_dataset(stand_in, Dataset.from_list(rows), tok, args, "train")
    examples = [{k: ex[k] for k in ("prompt_ids", "completion_ids", "label")} for ex in prepared]
    batch = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id, max_length=max_length)(examples)
    seqs = [(ids[m.bool()].tolist(), cm[m.bool()].tolist()) for ids, m, cm in
            zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])]
    return examples, seqs


UNPAIRED_TEXT = [
    {"prompt": "the quick brown", "completion": " fox jumps over the lazy dog", "label": True},
    {"prompt": "hello world,", "completion": " today?", "label": False},
    {"prompt": "add 12 and 30:", "completion": " 42<|im_end|>", "label": True},
]
UNPAIRED_CHAT = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                 for r in CONVERSATIONAL for side in ("chosen", "rejected")]


@pytest.mark.parametrize("which", ["text", "conversational", "paired_text", "paired_implicit_chat"])
def test_unpaired_equals_trl_kto(which, tok, tmp_path):
    rows = {"text": UNPAIRED_TEXT, "conversational": UNPAIRED_CHAT, "paired_text": STANDARD,
            "paired_implicit_chat": [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                                     for r in CONVERSATIONAL]}[which]
    examples, _ = trl_kto(rows, tok, tmp_path)
    got = read_preference_examples(_write(tmp_path, rows), tok, kind="unpaired", max_length=None,
                                   max_prompt_length=None)
    assert all(isinstance(g, UnpairedIds) for g in got)
    assert [(g.prompt, g.completion, g.label) for g in got] == \
        [(e["prompt_ids"], e["completion_ids"], e["label"]) for e in examples]
    if which.startswith("paired"):  # unpaired as TRL does: every chosen (desirable), then every rejected
        assert [g.label for g in got] == [True] * len(rows) + [False] * len(rows)


def test_unpairing_blocks_of_1000_equal_trl(tok, tmp_path):
    rows = [{"prompt": f"add {i} and 30:", "chosen": f" {i + 30}", "rejected": " 42"} for i in range(1003)]
    examples, _ = trl_kto(rows, tok, tmp_path)
    got = read_preference_examples(_write(tmp_path, rows), tok, kind="unpaired", max_length=None,
                                   max_prompt_length=None)
    assert [(g.prompt, g.completion, g.label) for g in got] == \
        [(e["prompt_ids"], e["completion_ids"], e["label"]) for e in examples]
    assert [got[i].where.rsplit(":", 1)[1] for i in (0, 999, 1000, 2000, 2003)] == \
        ["1 (chosen)", "1000 (chosen)", "1 (rejected)", "1001 (chosen)", "1001 (rejected)"]
