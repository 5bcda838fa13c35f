"""jqlora.data: which tokens carry loss (decoded and compared with the assistant text), the batch contract, packing,
truncation, deterministic shuffling, resume, eval split, and one-line errors naming file and line.

Tokenizers are built offline: a byte-level BPE trained on a few sentences, wrapped in PreTrainedTokenizerFast,
saved and reloaded through AutoTokenizer, with a ChatML template, a Llama-3-style template, or none (built-in).
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from jqlora import data as D
from jqlora.config import demo_config, load_config
from tool_module import load_tool

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3 shape: BOS, a default system turn when none is given, headers, <|eot_id|> ends a turn, no trailing text.
LLAMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>' }}{% endif %}"
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + "
    "'<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "none": "</s>"}
CORPUS = [
    "the quick brown fox jumps over the lazy dog", "what is the capital of france? paris.",
    "hello world, how are you today?", "add 12 and 30: the answer is 42", "system user assistant instruction",
]


def _make_tokenizer(out_dir, template):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if template:
        fast.chat_template = template
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {name: _make_tokenizer(root / name, tpl) for name, tpl in
            [("chatml", CHATML), ("llama3", LLAMA3), ("none", None)]}


@pytest.fixture(scope="module")
def tok(toks):
    return toks["chatml"]


def _trained_runs(tokenizer, ex):
    """Decoded text of each maximal run of trained tokens."""
    runs, cur = [], []
    for t, flag in zip(ex.ids, ex.trained):
        if flag:
            cur.append(int(t))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


def _encode(tokenizer, rows, **kw):
    records = [D.Record(r, f"mem:{i + 1}") for i, r in enumerate(rows)]
    examples, fmt = D.encode_records(records, tokenizer, **kw)
    return examples, fmt


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CHAT = {"messages": [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "hello, how are you?"},
    {"role": "user", "content": "what is the capital of france?"},
    {"role": "assistant", "content": "paris."},
    {"role": "user", "content": "add 12 and 30"},
    {"role": "assistant", "content": "the answer is 42"},
]}


@pytest.mark.parametrize("template", ["chatml", "llama3", "none"])
def test_chat_loss_on_every_assistant_turn_and_nothing_else(toks, template):
    tokenizer = toks[template]
    builtin = "zephyr" if template == "none" else None  # (a tokenizer without a template needs one named)
    (ex,), fmt = _encode(tokenizer, [CHAT], chat_template=builtin)
    assert fmt == "chat"
    assistant = [m["content"] for m in CHAT["messages"] if m["role"] == "assistant"]
    assert _trained_runs(tokenizer, ex) == [a + END[template] for a in assistant]
    # the untrained tokens are exactly the rest of the rendering, and the rendering is apply_chat_template's
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False,
                                         chat_template=tokenizer.chat_template or D.DEFAULT_CHAT_TEMPLATE)
    assert tokenizer.decode(ex.ids) == full
    assert ex.ids.tolist() == tokenizer(full, add_special_tokens=False)["input_ids"]


def test_chat_train_on_all(tok):
    (ex,), _ = _encode(tok, [CHAT], train_on="all")
    assert ex.trained.all()
    ds = D.TokenDataset([ex], 256, packing=False)
    row = ds.row(0)
    n = len(ex.ids)
    np.testing.assert_array_equal(row["loss_mask"][: n - 1], 1.0)
    assert row["loss_mask"][n - 1:].sum() == 0


def test_prompt_completion_and_conversational_prompt(tok):
    rows = [{"prompt": "what is the capital of france?", "completion": "paris."},
            {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
             "completion": "hello world"}]
    (a, b), fmt = _encode(tok, rows)
    assert fmt == "prompt_completion"
    assert _trained_runs(tok, a) == ["paris.<|im_end|>"]
    assert tok.decode(a.ids) == "<|im_start|>user\nwhat is the capital of france?<|im_end|>\n" \
                                "<|im_start|>assistant\nparis.<|im_end|>\n"
    assert _trained_runs(tok, b) == ["hello world<|im_end|>"]


def test_alpaca_instruction_with_and_without_input(toks):
    tokenizer = toks["none"]
    rows = [{"instruction": "add the numbers", "input": "12 and 30", "output": "42"},
            {"instruction": "say hello", "input": "", "output": "hello world"}]
    (a, b), fmt = _encode(tokenizer, rows, chat_template="zephyr")
    assert fmt == "instruction"
    assert _trained_runs(tokenizer, a) == ["42</s>"]
    assert tokenizer.decode(a.ids) == "<s><|user|>\nadd the numbers\n\n12 and 30</s>\n<|assistant|>\n42</s>\n"
    assert _trained_runs(tokenizer, b) == ["hello world</s>"]
    assert "say hello</s>" in tokenizer.decode(b.ids)


def test_text_format_trains_every_token_and_ends_with_eos(tok):
    (ex,), fmt = _encode(tok, [{"text": "the quick brown fox"}])
    assert fmt == "text"
    assert ex.trained.all() and ex.ids[-1] == tok.eos_token_id
    assert tok.decode(ex.ids[:-1]) == "the quick brown fox"


def test_batch_contract_single_rows(tok):
    examples, _ = _encode(tok, [CHAT, {"messages": CHAT["messages"][:3]}])
    S = 200
    ds = D.TokenDataset(examples, S, packing=False, pad_id=tok.pad_token_id)
    batch = ds.batch([0, 1, None])
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "input_ids": ((3, S), np.int32), "targets": ((3, S), np.int32), "loss_mask": ((3, S), np.float32),
        "segment_ids": ((3, S), np.int32), "positions": ((3, S), np.int32)}
    for b, ex in enumerate(examples):
        n = len(ex.ids)
        np.testing.assert_array_equal(batch["input_ids"][b, :n], ex.ids)
        np.testing.assert_array_equal(batch["input_ids"][b, n:], tok.pad_token_id)
        np.testing.assert_array_equal(batch["targets"][b, : n - 1], ex.ids[1:])
        np.testing.assert_array_equal(batch["loss_mask"][b, : n - 1], ex.trained[1:])
        assert batch["loss_mask"][b, n - 1:].sum() == 0 and batch["targets"][b, n - 1:].sum() == 0
        np.testing.assert_array_equal(batch["segment_ids"][b], (np.arange(S) < n).astype(np.int32))
        np.testing.assert_array_equal(batch["positions"][b, :n], np.arange(n))
    assert not batch["loss_mask"][2].any() and not batch["segment_ids"][2].any()  # the padding row
    # the trained targets decode to the assistant turns
    m = batch["loss_mask"][0] > 0
    assert tok.decode(batch["targets"][0][m]) == "".join(
        x["content"] + "<|im_end|>" for x in CHAT["messages"] if x["role"] == "assistant")


def _random_chats(n, seed=0):
    rng = np.random.default_rng(seed)
    words = " ".join(CORPUS).split()
    out = []
    for i in range(n):
        msgs = []
        for _ in range(int(rng.integers(1, 4))):
            msgs.append({"role": "user", "content": " ".join(rng.choice(words, int(rng.integers(1, 8))))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choice(words, int(rng.integers(1, 8))))})
        out.append({"messages": msgs, "id": i})
    return out


def test_packing_segments_positions_and_masks(tok):
    examples, _ = _encode(tok, _random_chats(40))
    S = 128
    ds = D.TokenDataset(examples, S, packing=True, pad_id=tok.pad_token_id)
    assert len(ds) < len(examples)  # several examples share a row
    assert sorted(i for row in ds.rows for i in row) == list(range(len(examples)))  # each exactly once
    batch = ds.batch(range(len(ds)))
    total_trained = 0
    for r, members in enumerate(ds.rows):
        at = 0
        for k, i in enumerate(members, start=1):
            ex = examples[i]
            n = len(ex.ids)
            sl = slice(at, at + n)
            np.testing.assert_array_equal(batch["segment_ids"][r, sl], k)
            np.testing.assert_array_equal(batch["positions"][r, sl], np.arange(n))
            np.testing.assert_array_equal(batch["input_ids"][r, sl], ex.ids)
            np.testing.assert_array_equal(batch["targets"][r, at: at + n - 1], ex.ids[1:])
            np.testing.assert_array_equal(batch["loss_mask"][r, at: at + n - 1], ex.trained[1:])
            # the last token of a segment does not predict the first token of the next one
            assert batch["loss_mask"][r, at + n - 1] == 0 and batch["targets"][r, at + n - 1] == 0
            at += n
        assert at <= S
        assert not batch["segment_ids"][r, at:].any() and not batch["loss_mask"][r, at:].any()
        total_trained += batch["loss_mask"][r].sum()
    assert total_trained == ds.num_trained_tokens == sum(int(e.trained[1:].sum()) for e in examples)


def test_pack_is_best_fit_and_never_overflows():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 100, size=300).tolist()
    rows = D.pack(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    assert len(rows) <= int(np.ceil(sum(lengths) / 100)) + 5  # near the lower bound
    assert rows == D.pack(lengths, 100)


def test_truncation_and_overlong_policies(tok, tmp_path):
    long_answer = " ".join(["the quick brown fox"] * 40)
    rows = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": long_answer}]},
            {"messages": [{"role": "user", "content": long_answer}, {"role": "assistant", "content": "paris."}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world"}]}]
    examples, _ = _encode(tok, rows)
    L = 40
    assert len(examples[0].ids) > L and len(examples[1].ids) > L and len(examples[2].ids) <= L
    kept = D.fit_length(examples, L)
    # row 0 truncated (keeps its first L tokens, still trained), row 1 dropped (its answer is past L), row 2 whole
    assert [e.where for e in kept] == ["mem:1", "mem:3"]
    np.testing.assert_array_equal(kept[0].ids, examples[0].ids[:L])
    np.testing.assert_array_equal(kept[0].trained, examples[0].trained[:L])
    assert [e.where for e in D.fit_length(examples, L, "drop")] == ["mem:3"]
    with pytest.raises(D.DataError, match=r"^mem:1: \d+ tokens, more than data.max_length=40"):
        D.fit_length(examples, L, "error")
    with pytest.raises(D.DataError, match="none of the 1 examples has a trained token"):
        D.fit_length(examples[1:2], L)


def _dataset(tok, n=23, S=96, packing=False):
    examples, _ = _encode(tok, _random_chats(n, seed=3))
    return D.TokenDataset(examples, S, packing=packing, pad_id=tok.pad_token_id)


def _first_ids(batch):
    return [tuple(r) for r in batch["input_ids"][:, :12].tolist()]


def test_shuffle_is_deterministic_per_seed_and_epoch(tok):
    ds = _dataset(tok)
    a = D.epoch_order(len(ds), seed=7, epoch=0)
    np.testing.assert_array_equal(a, D.epoch_order(len(ds), seed=7, epoch=0))
    assert sorted(a) == list(range(len(ds)))
    assert not np.array_equal(a, D.epoch_order(len(ds), seed=8, epoch=0))
    assert not np.array_equal(a, D.epoch_order(len(ds), seed=7, epoch=1))
    np.testing.assert_array_equal(D.epoch_order(len(ds), 7, 0, shuffle=False), np.arange(len(ds)))
    it1, it2 = D.BatchIterator(ds, 4, seed=7), D.BatchIterator(ds, 4, seed=7)
    for _ in range(10):
        b1, b2 = next(it1), next(it2)
        for k in D.BATCH_KEYS:
            np.testing.assert_array_equal(b1[k], b2[k])


def test_epoch_covers_every_row_once_with_padded_tail(tok):
    ds = _dataset(tok, n=23)
    it = D.BatchIterator(ds, 5, seed=1, epochs=2)
    batches = list(it)
    assert len(batches) == 2 * it.batches_per_epoch == 2 * 5
    real = [r for b in batches[:5] for r in b["input_ids"].tolist() if any(x != tok.pad_token_id for x in r)]
    assert len(real) == 23
    assert sorted(map(tuple, real)) == sorted(map(tuple, ds.batch(range(23))["input_ids"].tolist()))
    assert batches[4]["segment_ids"][3:].sum() == 0  # 23 = 4*5 + 3: two padding rows close the epoch
    dropped = list(D.BatchIterator(ds, 5, seed=1, epochs=2, drop_last=True))
    assert len(dropped) == 8 and all(b["segment_ids"].any(axis=1).all() for b in dropped)


@pytest.mark.parametrize("packing,drop_last", [(False, False), (True, False), (False, True)])
def test_resume_gives_the_remaining_batches_across_epochs(tok, packing, drop_last):
    ds = _dataset(tok, n=23, packing=packing)
    full = D.BatchIterator(ds, 4, seed=5, drop_last=drop_last)
    expected = [next(full) for _ in range(3 * full.batches_per_epoch)]
    for k in (0, 1, full.batches_per_epoch - 1, full.batches_per_epoch, full.batches_per_epoch + 2):
        it = D.BatchIterator(ds, 4, seed=5, drop_last=drop_last)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.state()))
        resumed = D.BatchIterator(ds, 4, seed=999, drop_last=drop_last)  # the saved seed wins
        resumed.restore(state)
        for want in expected[k:]:
            got = next(resumed)
            for key in D.BATCH_KEYS:
                np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(D.DataError, match="cannot resume"):
        D.BatchIterator(_dataset(tok, n=10), 4).restore(state)


def test_eval_split_is_deterministic_and_disjoint(tok):
    records = [D.Record({"i": i}, f"f:{i + 1}") for i in range(50)]
    tr, ev = D.split_records(records, 0.2, seed=3)
    assert len(ev) == 10 and len(tr) == 40
    assert sorted(r.data["i"] for r in tr + ev) == list(range(50))
    tr2, ev2 = D.split_records(records, 0.2, seed=3)
    assert [r.where for r in ev2] == [r.where for r in ev]
    assert [r.where for r in D.split_records(records, 0.2, seed=4)[1]] != [r.where for r in ev]
    assert D.split_records(records, 0.0, seed=3) == (records, [])


def test_build_datasets_from_config(tok, tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", _random_chats(30))
    eval_path = _write_jsonl(tmp_path / "eval.jsonl", _random_chats(5, seed=9))
    cfg = load_config(None, [f"data.path={path}", "data.eval_path=null", "data.eval_fraction=0.1",
                             "data.max_length=64", "data.packing=true"])
    train, evals = D.build_datasets(cfg.data, tok, seed=0)
    assert len(train.examples) == 27 and len(evals.examples) == 3
    batches = list(D.eval_batches(evals, 2))
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 3
    cfg = load_config(None, [f"data.path={path}", f"data.eval_path={eval_path}", "data.eval_fraction=0.5"])
    train, evals = D.build_datasets(cfg.data, tok, seed=0)
    assert len(train.examples) == 30 and len(evals.examples) == 5  # eval_path wins over eval_fraction
    assert train.max_length == cfg.data.max_length and len(train) == 30


def test_parquet_and_csv_through_datasets(tok, tmp_path):
    import datasets

    rows = [{"prompt": "hello", "completion": "world"}, {"prompt": "capital of france?", "completion": "paris."}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    for name in ("d.parquet", "d.csv"):
        records = D.read_records(str(tmp_path / name))
        assert [r.data for r in records] == rows
        assert records[1].where.endswith(f"{name}: row 1")
        examples, fmt = D.encode_records(records, tok)
        assert fmt == "prompt_completion" and _trained_runs(tok, examples[1]) == ["paris.<|im_end|>"]


def test_json_array_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))
    assert [r.data["text"] for r in D.read_records(str(p))] == ["a", "b"]


def test_chat_template_override_from_file(tmp_path, toks):
    (tmp_path / "t.jinja").write_text(LLAMA3)
    tok_dir = tmp_path / "tok"
    toks["none"].save_pretrained(tok_dir)
    tokenizer = D.load_tokenizer(str(tok_dir), chat_template=str(tmp_path / "t.jinja"))
    (ex,), _ = _encode(tokenizer, [CHAT])
    assert _trained_runs(tokenizer, ex)[-1] == "the answer is 42<|eot_id|>"
    (ex,), _ = _encode(toks["none"], [CHAT], chat_template=str(tmp_path / "t.jinja"))
    assert _trained_runs(toks["none"], ex)[0] == "hello, how are you?<|eot_id|>"


def test_missing_chat_template_is_an_error_unless_one_is_named(toks):
    with pytest.raises(D.DataError, match=r"^mem:1: the tokenizer has no chat template; set data.chat_template") as e:
        _encode(toks["none"], [CHAT])
    assert "\n" not in str(e.value)
    _encode(toks["none"], [{"text": "no template needed"}])  # plain text renders no conversation
    (ex,), _ = _encode(toks["none"], [CHAT], chat_template="chatml")  # the built-in ChatML: the template above
    assert ex.ids.tolist() == toks["chatml"].apply_chat_template(CHAT["messages"], tokenize=True, return_dict=False)


# --- errors: one line naming the file and line ---------------------------------------------------------------


def _error(tok, tmp_path, lines, **cfg):
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(lines) + "\n")
    overrides = [f"data.path={p}"] + [f"data.{k}={v}" for k, v in cfg.items()]
    with pytest.raises(D.DataError) as e:
        D.build_datasets(load_config(None, overrides).data, tok)
    msg = str(e.value)
    assert "\n" not in msg
    return msg.replace(str(p), "train.jsonl")


def test_errors_name_file_and_line(tok, tmp_path):
    good = json.dumps({"messages": CHAT["messages"][:3]})
    assert _error(tok, tmp_path, [good, '{"messages": [}']).startswith("train.jsonl:2: not valid JSON (")
    assert _error(tok, tmp_path, [good, good, json.dumps({"text": "x"})]) == \
        "train.jsonl:3: missing 'messages' (format chat)"
    assert _error(tok, tmp_path, [json.dumps({"instruction": "x"})], format="instruction") == \
        "train.jsonl:1: missing 'output' (format instruction)"
    bad_role = json.dumps({"messages": [{"role": "bot", "content": "x"}]})
    assert _error(tok, tmp_path, [good, bad_role]) == \
        "train.jsonl:2: messages[0]: role 'bot' is not one of system, user, assistant"
    no_answer = json.dumps({"messages": [{"role": "user", "content": "x"}]})
    assert _error(tok, tmp_path, [no_answer]).startswith("train.jsonl:1: no assistant message")
    assert _error(tok, tmp_path, ["[1, 2]"]) == "train.jsonl:1: expected a JSON object, got list"
    assert _error(tok, tmp_path, [json.dumps({"foo": 1})]).startswith(
        "train.jsonl:1: cannot tell the format from the fields ['foo']")
    assert _error(tok, tmp_path, ["", "  "]) == "train.jsonl: no records (empty dataset)"
    assert "tokens, more than data.max_length=8" in _error(tok, tmp_path, [good], max_length=8, overlong="error")
    assert _error(tok, tmp_path, [good], max_length=8).startswith("train.jsonl: none of the 1 examples")


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(D.DataError, match="no such file"):
        D.read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(D.DataError, match="unsupported file type"):
        D.read_records(str(tmp_path / "x.txt"))


# Mistral v0.3 shape: BOS once, the system prompt is prepended to the LAST user turn, [INST] ... [/INST] answer</s>.
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set msgs = messages[1:] %}"
    "{% else %}{% set msgs = messages %}{% endif %}{{ bos_token }}"
    "{% set last_user = namespace(i=-1) %}{% for m in msgs %}{% if m['role'] == 'user' %}"
    "{% set last_user.i = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if sys is defined and loop.index0 == last_user.i %}{{ sys + '\n\n' }}{% endif %}"
    "{{ m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def test_template_that_moves_the_system_prompt_is_handled(tok):
    (ex,), _ = _encode(tok, [CHAT], chat_template=MISTRAL)
    text = tok.decode(ex.ids)
    assert text.startswith("<s>[INST] hello world [/INST] hello, how are you?</s>[INST] what")
    assert "[INST] be brief\n\nadd 12 and 30 [/INST]" in text
    runs = [r.strip() for r in _trained_runs(tok, ex)]
    assert runs == [m["content"] + "</s>" for m in CHAT["messages"] if m["role"] == "assistant"]


def test_template_that_rewrites_earlier_turns_is_rejected(tok):
    unstable = ("{% for m in messages %}{{ m['role'] + ': ' }}{% if loop.last %}{{ m['content'] }}"
                "{% else %}{{ m['content'] | upper }}{% endif %}{{ '</s>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(D.DataError, match="mem:1: cannot locate assistant turn 2 in the chat template's rendering"):
        _encode(tok, [CHAT], chat_template=unstable)


def test_template_errors_are_data_errors(tok):
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}" + CHATML
    with pytest.raises(D.DataError, match="mem:1: the chat template rejects this conversation .*must start with"):
        _encode(tok, [CHAT], chat_template=strict)


# --- the demo assets ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_demo_assets_are_what_the_script_builds(tmp_path):
    tool = load_tool("make_demo_assets")
    tool.main(["--out", str(tmp_path)])
    cfg = demo_config()
    tokenizer = D.load_tokenizer(str(tmp_path / "model"))
    data = dataclasses.replace(cfg.data, path=str(tmp_path / "chat.jsonl"), eval_path=str(tmp_path / "chat_eval.jsonl"))
    train, evals = D.build_datasets(data, tokenizer, seed=cfg.train.seed)
    assert (len(train), len(evals)) == (400, 40)
    assert max(len(e.ids) for e in train.examples) <= cfg.data.max_length  # nothing truncated in the demo
    ex = train.examples[0]
    assert _trained_runs(tokenizer, ex) == [m["content"] + "<|im_end|>" for m in
                                            json.loads((tmp_path / "chat.jsonl").read_text().splitlines()[0])
                                            ["messages"] if m["role"] == "assistant"]
    committed = REPO / "assets" / "demo"
    # The held-out countries' facts are in the pretraining text and in no training chat.
    chats = (tmp_path / "chat.jsonl").read_text()
    pretrain = (tmp_path / "pretrain.txt").read_text()
    for country in tool.HELD_OUT:
        assert country not in chats and tool.answer(country) in pretrain, country
    # The GRPO demo's phrasings are none of the pretraining text's (its questions are the base's to learn).
    grpo = [json.loads(line) for line in (tmp_path / "grpo_prompts.jsonl").read_text().splitlines()]
    assert len(grpo) == len(tool.CAPITALS) * len(tool.GRPO_FORMS)
    for row in grpo:
        assert row["prompt"] not in pretrain and row["answer"] in pretrain and row["capital"] in row["answer"], row
    for name in ("pretrain.txt", "chat.jsonl", "chat_eval.jsonl", "grpo_prompts.jsonl", "model/tokenizer.json",
                 "model/tokenizer_config.json", "model/chat_template.jinja"):
        if (committed / name).exists():
            assert (committed / name).read_bytes() == (tmp_path / name).read_bytes(), name
