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


@pytest.mark.parametrize("which", ["tok", "bos_tok"])
def test_standard_equals_trl_cpo_and_orpo_rows(which, request):
    """TRL's CPOTrainer (SimPO) and ORPOTrainer tokenize with their own tokenize_row (the same code in both): on
    standard data it gives the DPO ids, max_length included (it cuts the completions, keeping the prompt). Their
    conversational rows differ: they append EOS after the template's text, which ends in a newline here."""
    from trl.data_utils import maybe_apply_chat_template
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    tok = request.getfixturevalue(which)
    for trainer in (CPOTrainer, ORPOTrainer):
        for max_length in (1000, 14):
            stand_in = types.SimpleNamespace(processing_class=tok, is_encoder_decoder=False, max_length=max_length)
            stand_in.build_tokenized_answer = lambda p, a, s=stand_in, t=trainer: t.build_tokenized_answer(s, p, a)
            rows = [trainer.tokenize_row(stand_in, dict(maybe_apply_chat_template(r, tok))) for r in STANDARD]
            got = ours(STANDARD, tok, max_length=max_length, truncation_mode="keep_start")
            assert [(g.prompt, g.prompt + g.chosen, g.prompt + g.rejected) for g in got] == \
                [(r["prompt_input_ids"], r["chosen_input_ids"], r["rejected_input_ids"]) for r in rows]
            assert max_length > 100 or any(len(g.prompt + g.chosen) == max_length for g in got)


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


# ---------------------------------------------------------------------------------------------------------------
# Truncation


def test_keep_start_equals_trl_collator_and_filter(tok, tmp_path):
    full, _, _ = trl_dpo(STANDARD, tok, tmp_path)

    def splits(n):  # rows TRL keeps, and whether any of them loses completion tokens
        kept = [e for e in full if len(e["prompt_ids"]) < n]
        cut = any(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) > n for e in kept)
        return 0 < len(kept) < len(full) and cut

    max_length = next(n for n in range(2, 64) if splits(n))
    kept_rows = [r for r, e in zip(STANDARD, full) if len(e["prompt_ids"]) < max_length]
    examples, chosen, rejected = trl_dpo(STANDARD, tok, tmp_path, max_length=max_length)
    assert len(examples) == len(kept_rows)  # TRL dropped the rest
    got = ours(kept_rows, tok, max_length=max_length, truncation_mode="keep_start")
    assert [_seq(g.prompt, g.chosen) for g in got] == chosen
    assert [_seq(g.prompt, g.rejected) for g in got] == rejected
    assert any(len(g.chosen) < len(e["chosen_ids"]) for g, e in zip(got, examples))  # something was cut
    for i, (row, e) in enumerate(zip(STANDARD, full)):
        if len(e["prompt_ids"]) >= max_length:  # what TRL drops silently is a one-line error here
            with pytest.raises(DataError, match=rf"^rows:{i + 1}: the prompt's {len(e['prompt_ids'])} tokens leave "
                                                rf"no room for the completion within max_length={max_length}"):
                tokenize_preference_record(row, tok, kind="paired", max_length=max_length, max_prompt_length=None,
                                           truncation_mode="keep_start", where=f"rows:{i + 1}")


LONG_PROMPTS = [
    {"prompt": "the quick brown fox jumps over the lazy dog. what is the capital of france?", "chosen": " paris.",
     "rejected": " london, i think"},
    {"prompt": "hello world, how are you today? what is the capital of france?", "chosen": " paris.",
     "rejected": " lyon."},  # equally long completions
    {"prompt": "system user assistant instruction: the quick brown", "chosen": " fox jumps", "rejected": " dog"},
]


def test_keep_end_equals_trl_on_the_longer_sequence(tok, tmp_path):
    full, _, _ = trl_dpo(LONG_PROMPTS, tok, tmp_path)
    longest = [max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in full]
    max_length = max(longest) + 2  # the prompt loses its start in every pair, the completions fit
    assert all(len(e["prompt_ids"]) + n > max_length for e, n in zip(full, longest))
    with pytest.warns(FutureWarning):  # deprecated in TRL 1.16, kept for the prompt's end
        examples, chosen, rejected = trl_dpo(LONG_PROMPTS, tok, tmp_path, max_length=max_length,
                                             truncation_mode="keep_end")
    got = ours(LONG_PROMPTS, tok, max_length=max_length, truncation_mode="keep_end")
    equal_lengths = 0
    for g, e, c, r in zip(got, full, chosen, rejected):
        assert (g.chosen, g.rejected) == (e["chosen_ids"], e["rejected_ids"])  # completions whole
        mine = {"c": _seq(g.prompt, g.chosen), "r": _seq(g.prompt, g.rejected)}
        longer, shorter = ("c", "r") if len(g.chosen) >= len(g.rejected) else ("r", "c")
        theirs = {"c": c, "r": r}
        assert mine[longer] == theirs[longer]
        # the shorter shares the longer one's prompt: a suffix of TRL's, which keeps more prompt for it
        n = len(mine[shorter][0])
        assert (mine[shorter][0], mine[shorter][1]) == (theirs[shorter][0][-n:], theirs[shorter][1][-n:])
        equal_lengths += len(g.chosen) == len(g.rejected)
        if len(g.chosen) == len(g.rejected):
            assert mine[shorter] == theirs[shorter]
    assert equal_lengths >= 1
    row = {"prompt": "hello", "chosen": " the quick brown fox jumps over the lazy dog", "rejected": " dog"}
    with pytest.raises(DataError, match=r"^rows:1: 'chosen' has \d+ tokens, which leaves no room for the prompt "
                                        r"within max_length=4"):
        ours([row], tok, max_length=4, truncation_mode="keep_end")


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_max_prompt_length_cuts_the_prompt_first(mode, tok, tmp_path):
    """TRL 1.16 has no max_prompt_length: the prompt is cut first (the rule of TRL 0.x, keep_end keeps its end), then
    TRL 1.16's collator applies max_length to what is left."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    full, _, _ = trl_dpo(STANDARD, tok, tmp_path)
    max_prompt_length, max_length = 5, 9
    cut = [dict(e, prompt_ids=e["prompt_ids"][-max_prompt_length:] if mode == "keep_end"
                else e["prompt_ids"][:max_prompt_length]) for e in full]
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length,
                                      truncation_mode="keep_start")(cut)
    seqs = [(ids[m.bool()].tolist(), cm[m.bool()].tolist()) for ids, m, cm in
            zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])]
    only_prompt = ours(STANDARD, tok, max_prompt_length=max_prompt_length, truncation_mode=mode)
    assert [(g.prompt, g.chosen, g.rejected) for g in only_prompt] == \
        [(c["prompt_ids"], c["chosen_ids"], c["rejected_ids"]) for c in cut]
    if mode == "keep_start":
        got = ours(STANDARD, tok, max_prompt_length=max_prompt_length, max_length=max_length, truncation_mode=mode)
        assert [_seq(g.prompt, g.chosen) for g in got] + [_seq(g.prompt, g.rejected) for g in got] == seqs
    else:  # keep_end: the completions are whole, and the cut prompt already leaves room for them
        got = ours(STANDARD, tok, max_prompt_length=max_prompt_length, max_length=64, truncation_mode=mode)
        assert got == only_prompt


def test_unpaired_max_length_equals_trl_kto(tok, tmp_path):
    full, _ = trl_kto(UNPAIRED_TEXT, tok, tmp_path)
    max_length = sorted(len(e["prompt_ids"]) for e in full)[-1]  # the longest prompt is dropped by TRL
    kept = [r for r, e in zip(UNPAIRED_TEXT, full) if len(e["prompt_ids"]) < max_length]
    examples, seqs = trl_kto(UNPAIRED_TEXT, tok, tmp_path, max_length=max_length)
    assert 0 < len(examples) == len(kept) < len(UNPAIRED_TEXT)
    got = [tokenize_preference_record(r, tok, kind="unpaired", max_length=max_length, max_prompt_length=None,
                                      truncation_mode="keep_start") for r in kept]
    assert [_seq(g.prompt, g.completion) for g in got] == seqs
    assert [g.label for g in got] == [e["label"] for e in examples]


# ---------------------------------------------------------------------------------------------------------------
# Bad records: one line naming file:line


GOOD = {"prompt": "hello world,", "chosen": " how are you?", "rejected": " today?"}
GOOD_UNPAIRED = {"prompt": "hello world,", "completion": " how are you?", "label": True}
BAD = [
    ("paired", {"prompt": "a", "rejected": " b"}, "missing 'chosen'"),
    ("paired", {"prompt": "a", "chosen": " b", "rejected": None}, "missing 'rejected'"),
    ("paired", {"prompt": 3, "chosen": " b", "rejected": " c"},
     "'prompt' must be a string or a list of messages, got int"),
    ("paired", {"prompt": "a", "chosen": {"text": "b"}, "rejected": " c"}, "'chosen' must be a string or a list"),
    ("paired", {"prompt": "a", "chosen": "", "rejected": " c"}, "empty completion: 'chosen' is ''"),
    ("paired", {"prompt": "a", "chosen": " b", "rejected": "  "}, "empty completion: 'rejected' is '  '"),
    ("paired", {"prompt": _user("a"), "chosen": [], "rejected": _assistant("c")}, "empty completion: 'chosen' is an "
                                                                                 "empty list"),
    ("paired", {"prompt": _user("a"), "chosen": _assistant(""), "rejected": _assistant("c")},
     "empty completion: every message of 'chosen' has empty content"),
    ("paired", {"prompt": "a", "chosen": _assistant("b"), "rejected": _assistant("c")},
     "prompt text but chosen/rejected a list of messages"),
    ("paired", {"prompt": [{"role": "robot", "content": "a"}], "chosen": _assistant("b"), "rejected": _assistant("c")},
     "prompt[0]: role 'robot' is not one of system, user, assistant"),
    ("paired", {"prompt": [{"role": "user", "content": 5}], "chosen": _assistant("b"), "rejected": _assistant("c")},
     "prompt[0]: 'content' must be a string, got int"),
    ("paired", {"chosen": "abc", "rejected": "xyz"}, "share no prefix to take as the prompt"),
    ("paired", {"prompt": "the quick brown fox jumps over the lazy dog", "chosen": " yes", "rejected": " no"},
     "leave no room for the completion within max_length=12"),
    ("paired", {"prompt": "a", "completion": " b", "label": True}, "missing 'chosen'"),
    ("unpaired", {"prompt": "a", "completion": " b", "label": "yes"}, "'label' must be true or false, got str 'yes'"),
    ("unpaired", {"prompt": "a", "completion": " b", "label": 1}, "'label' must be true or false, got int 1"),
    ("unpaired", {"prompt": "a", "completion": " b"}, "missing 'label'"),
    ("unpaired", {"prompt": "a", "completion": "", "label": False}, "empty completion: 'completion' is ''"),
    ("paired", "[1, 2]", "expected a JSON object, got list"),
    ("paired", '{"prompt": "a", "chosen": " b",', "not valid JSON"),
]


@pytest.mark.parametrize("kind,row,message", BAD, ids=[f"{i}-{b[2][:30]}" for i, b in enumerate(BAD)])
def test_bad_record_is_one_line_naming_file_and_line(kind, row, message, tok, tmp_path):
    good = GOOD if kind == "paired" else GOOD_UNPAIRED
    path = _write(tmp_path, [good, good, row, good])
    with pytest.raises(DataError) as err:
        read_preference_examples(path, tok, kind=kind, max_length=12 if "max_length=12" in message else None,
                                 max_prompt_length=None, truncation_mode="keep_start")
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}:3: ") and message in text, text


def test_empty_file_and_bad_options(tok, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=rf"^{path}: no records"):
        read_preference_examples(str(path), tok, kind="paired", max_length=None, max_prompt_length=None)
    good = _write(tmp_path, [GOOD])
    for kw, message in [({"kind": "pairs"}, "unknown preference data kind 'pairs'"),
                        ({"truncation_mode": "middle"}, "unknown truncation_mode 'middle'"),
                        ({"max_length": 0}, "max_length must be a positive integer")]:
        with pytest.raises(DataError, match=message):
            read_preference_examples(good, tok, **{"kind": "paired", "max_length": None, "max_prompt_length": None,
                                                   **kw})


def test_stand_in_is_the_trainers_path(tok, tmp_path):
    """A real DPOTrainer and KTOTrainer on a tiny model: their processed train datasets equal the stand-in's."""
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOTrainer, KTOConfig, KTOTrainer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    dpo = DPOTrainer(model=transformers.LlamaForCausalLM(config), ref_model=transformers.LlamaForCausalLM(config),
                     args=_dpo_config(tmp_path, max_length=None), processing_class=tok,
                     train_dataset=Dataset.from_list(CONVERSATIONAL))
    examples, _, _ = trl_dpo(CONVERSATIONAL, tok, tmp_path)
    assert [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in dpo.train_dataset] == examples
    kto = KTOTrainer(model=transformers.LlamaForCausalLM(config), ref_model=transformers.LlamaForCausalLM(config),
                     processing_class=tok,
                     args=KTOConfig(output_dir=str(tmp_path / "kto"), use_cpu=True, bf16=False, report_to=[],
                                    max_length=None), train_dataset=Dataset.from_list(UNPAIRED_TEXT))
    examples, _ = trl_kto(UNPAIRED_TEXT, tok, tmp_path)
    assert [{k: ex[k] for k in ("prompt_ids", "completion_ids", "label")} for ex in kto.train_dataset] == examples
