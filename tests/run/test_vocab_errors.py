"""A tokenizer or data past the model's vocabulary is one early line, not NaN losses (issue 28's newcomer frictions):
`jqlora.train` (and its --dry-run) refuses a tokenizer whose len(tokenizer), added tokens included, exceeds the
model's vocab_size, and data whose ids reach past it (a tokenizer whose added token sits past the end of its
vocabulary, which the ChatML template emits), naming the tokenizer, its size, the vocab_size, the dataset line and
the fix, before any XLA compilation (JAX's own compile events are the witness: none during the failed start).
The oracle of the sizes is transformers itself (len(tokenizer), the token's id from its own vocabulary)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from jax import monitoring

from conftest import REPO, TOKENIZER_FILES

COMPILES: list[str] = []
monitoring.register_event_duration_secs_listener(
    lambda event, _secs, **_kw: COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration"
    else None)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    src = REPO / "tests" / "fixtures" / "tokenizer"
    big = AutoTokenizer.from_pretrained(src)
    big.add_tokens(["<tool_call>", "</tool_call>"])  # 512 + 2: past the model's vocab_size 512
    big.save_pretrained(root / "big")
    hole = root / "hole"  # 512 tokens, but <|im_start|> has id 600 (a gap in the ids)
    hole.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, hole / name)
    spec = json.loads((src / "tokenizer.json").read_text())
    for token in spec["added_tokens"]:
        if token["content"] == "<|im_start|>":
            token["id"] = 600
    spec["model"]["vocab"]["<|im_start|>"] = 600
    (hole / "tokenizer.json").write_text(json.dumps(spec))
    return {"big": root / "big", "hole": hole}


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _train(assets, tmp_path, monkeypatch, *args, model: Path | None = None) -> int:
    from jqlora.train import main

    monkeypatch.chdir(tmp_path)
    COMPILES.clear()
    return main(["--no-progress", f"model.path={model or assets / 'model'}", f"data.path={assets / 'train.jsonl'}",
                 "data.max_length=48", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                 "train.sample_prompt=null", *args])


@pytest.mark.parametrize("dry, own", [(True, False), (False, False), (True, True)],
                         ids=["dry-run", "train", "dry-run-own-tokenizer"])
def test_a_tokenizer_larger_than_the_vocab_is_one_early_line(assets, tmp_path, capsys, monkeypatch, tokenizers, dry,
                                                              own):
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(tokenizers["big"]))
    vocab = json.loads((assets / "model" / "config.json").read_text())["vocab_size"]
    assert n == vocab + 2
    model = assets / "model"
    if own:  # the model directory's own tokenizer is the larger one: only resizing can help
        model = Path(shutil.copytree(assets / "model", tmp_path / "model"))
        AutoTokenizer.from_pretrained(tokenizers["big"]).save_pretrained(model)
    code = _train(assets, tmp_path, monkeypatch, *([] if own else [f"model.tokenizer_path={tokenizers['big']}"]),
                  *(["--dry-run"] if dry else []), model=model)
    line = _error(capsys)
    assert code == 2
    for needle in (f"tokenizer {model if own else tokenizers['big']}: {n} tokens", f"vocab_size {vocab}", str(model),
                   "resize_token_embeddings"):
        assert needle in line, (needle, line)
    assert ("the model's own tokenizer" in line) is not own, line
    assert COMPILES == []  # (no weight loaded, nothing compiled)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("checkpoint*"))


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "train"])
def test_data_ids_past_the_vocab_name_the_dataset_line(assets, tmp_path, capsys, monkeypatch, tokenizers, dry):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizers["hole"])
    vocab = json.loads((assets / "model" / "config.json").read_text())["vocab_size"]
    assert len(tok) <= vocab and tok.convert_tokens_to_ids("<|im_start|>") == 600  # (the tokenizer check passes)
    code = _train(assets, tmp_path, monkeypatch, f"model.tokenizer_path={tokenizers['hole']}",
                  *(["--dry-run"] if dry else []))
    line = _error(capsys)
    assert code == 2
    for needle in (f"{assets / 'train.jsonl'}:1: token id 600 ('<|im_start|>'", str(tokenizers["hole"]),
                   f"vocab_size {vocab}", "resize_token_embeddings"):
        assert needle in line, (needle, line)
    assert COMPILES == []


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_preference_and_grpo_dry_runs_check_their_ids(assets, tmp_path, capsys, monkeypatch, tokenizers, objective):
    """Their examples hold other fields beside the ids (GRPO's prompt text, the messages): the model's own tokenizer
    passes, the one whose <|im_start|> is id 600 is refused at the first record's line."""
    from jqlora.train import main

    if objective == "dpo":
        data = tmp_path / "prefs.jsonl"
        data.write_text(json.dumps({"prompt": [{"role": "user", "content": "Say hi."}],
                                    "chosen": [{"role": "assistant", "content": "hi"}],
                                    "rejected": [{"role": "assistant", "content": "no"}]}) + "\n")
        args = ["train.objective=dpo", f"data.path={data}"]
    else:
        data = tmp_path / "prompts.jsonl"
        data.write_text(json.dumps({"prompt": [{"role": "user", "content": "The capital of France?"}],
                                    "answer": "The capital of France is Paris.", "capital": "Paris"}) + "\n")
        args = ["--config", str(REPO / "configs" / "demo-grpo.yaml"), f"data.path={data}"]
    monkeypatch.chdir(tmp_path)
    base = ["--dry-run", f"model.path={assets / 'model'}", f"output_dir={tmp_path / 'run'}", *args]
    assert main(base) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([*base, f"model.tokenizer_path={tokenizers['hole']}"]) == 2
    line = _error(capsys)
    assert f"{data}:1: token id 600 ('<|im_start|>'" in line, line
