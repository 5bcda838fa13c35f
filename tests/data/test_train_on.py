"""Per-turn loss masks (issue 28, item 8): data.train_on = completion | last_turn | all and data.train_on_eos.

Oracle: an independent tokenization through the tokenizer's own chat template (tests/fixtures/tokenizer, ChatML,
EOS = <|im_end|>): ``apply_chat_template(tokenize=True)`` of the conversation gives the ids; assistant turn i's
trained tokens run from the end of ``apply_chat_template(messages[:i], add_generation_prompt=True)`` (its header
supplied) to the turn's end-of-turn token, that token included with train_on_eos=true, left out with false (as
axolotl's roles_to_train=[assistant] with train_on_eos turn / none, and only the final turn for last_turn).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from jqlora import data as D
from jqlora.config import load_config

TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer"
CHAT = [
    {"role": "system", "content": "you are terse"},
    {"role": "user", "content": "what is the capital of france?"},
    {"role": "assistant", "content": "paris."},
    {"role": "user", "content": "add 12 and 30"},
    {"role": "assistant", "content": "the answer is 42"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hello world, how are you today?"},
]


@pytest.fixture(scope="module")
def tok():
    return D.load_tokenizer(str(TOKENIZER))


def _ids(tok, messages, generation_prompt=False):
    return list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=False))


def _expected_mask(tok, messages, turns, eos):
    full = _ids(tok, messages)
    mask = np.zeros(len(full), bool)
    for i in turns:
        start = len(_ids(tok, messages[:i], generation_prompt=True))
        end = full.index(tok.eos_token_id, start)  # this turn's <|im_end|>
        mask[start: end + 1 if eos else end] = True
    return full, mask


@pytest.mark.parametrize("train_on, eos", [("completion", True), ("completion", False), ("last_turn", True),
                                           ("last_turn", False)])
def test_trained_tokens_are_the_template_spans_of_the_chosen_turns(tok, tmp_path, train_on, eos):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": CHAT[1:5]}) + "\n")
    cfg = load_config(None, [f"data.path={path}", f"data.train_on={train_on}", f"data.train_on_eos={eos}",
                             "data.max_length=256"])
    train, _ = D.build_datasets(cfg.data, tok)
    for ex, messages in zip(train.examples, (CHAT, CHAT[1:5])):
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        turns = assistant[-1:] if train_on == "last_turn" else assistant
        ids, mask = _expected_mask(tok, messages, turns, eos)
        assert ex.ids.tolist() == ids
        assert np.array_equal(ex.trained, mask), (tok.decode(ex.ids[ex.trained]), tok.decode(np.array(ids)[mask]))
        # and in words: the chosen turns' text, with its end-of-turn marker or without
        wanted = "".join(messages[i]["content"] + ("<|im_end|>" if eos else "") for i in turns)
        assert tok.decode(ex.ids[ex.trained].tolist()) == wanted


def test_last_turn_reaches_the_batch_loss_mask(tok):
    ex_all, _ = D.encode_records([D.Record({"messages": CHAT}, "x")], tok)
    ex_last, _ = D.encode_records([D.Record({"messages": CHAT}, "x")], tok, train_on="last_turn")
    ds = D.TokenDataset(ex_last, 256, packing=False)
    mask = ds.batch([0])["loss_mask"][0]
    n = len(ex_last[0].ids)
    assert np.array_equal(mask[: n - 1], ex_last[0].trained[1:]) and 0 < mask.sum() < ex_all[0].trained.sum()
