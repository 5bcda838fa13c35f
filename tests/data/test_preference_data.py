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
