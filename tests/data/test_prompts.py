"""Prompt-only records (train.objective=grpo): the ids are TRL's (`trl.data_utils.maybe_apply_chat_template`, then
the tokenizer without special tokens, as GRPOTrainer tokenizes), other columns are kept, an overlong prompt keeps its
end, and every bad record is one DataError line naming file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from jqlora.data import DataError
from jqlora.data.prompts import read_prompts

TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_ids_are_trls(tok, tmp_path):
    from trl.data_utils import maybe_apply_chat_template

    rows = [{"prompt": "Say 3 now", "answer": "3"},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to 2."}],
             "answer": "1 2", "extra": [1, 2]}]
    ds = read_prompts(_write(tmp_path / "p.jsonl", rows), tok)
    for row, ex in zip(rows, ds.examples):
        text = maybe_apply_chat_template({"prompt": row["prompt"]}, tok)["prompt"]
        assert ex.ids == tok(text, add_special_tokens=False)["input_ids"]
        assert ex.columns == {k: v for k, v in row.items() if k != "prompt"}
    assert [ex.conversational for ex in ds.examples] == [False, True]
    short = read_prompts(str(tmp_path / "p.jsonl"), tok, max_prompt_length=3)
    assert short.examples[1].ids == ds.examples[1].ids[-3:]


@pytest.mark.parametrize("bad, message", [
    ({"question": "hi"}, "p.jsonl:2: missing 'prompt'"),
    ({"prompt": "  "}, "p.jsonl:2: empty 'prompt'"),
    ({"prompt": 3}, "p.jsonl:2: 'prompt' must be a string or a non-empty list of messages"),
    ({"prompt": [{"role": "robot", "content": "x"}]}, "p.jsonl:2: prompt[0] must be a message"),
])
def test_bad_record_is_one_line(tok, tmp_path, bad, message):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "fine"}, bad])
    with pytest.raises(DataError) as e:
        read_prompts(path, tok)
    assert message in str(e.value) and "\n" not in str(e.value)
