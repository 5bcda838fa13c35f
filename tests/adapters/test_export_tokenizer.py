"""Exports that downstream tools read: the tokenizer config of merged and adapter exports loads in transformers 4.x
(as 4.57 resolves its class) and 5.x with the same ids and chat template; the adapter directory carries the tokenizer
and the template training used (as TRL saves them); the vLLM lines export prints.

One tiny training run (tests/conftest.py's assets, its tokenizer saved again by transformers 5 so that its config
names ``TokenizersBackend``, the class 4.x and llama.cpp's converter cannot resolve) with data.chat_template=zephyr.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from jqlora.adapters.serving import vllm_notes
from jqlora.adapters.tokenizer_files import make_portable
from jqlora.config import load_config
from jqlora.data import DEFAULT_CHAT_TEMPLATE, Record, encode_records, load_tokenizer
from jqlora.run import Trainer

# Names transformers 4.57.1's AutoTokenizer resolves (models/auto/tokenization_auto.py: TOKENIZER_MAPPING_NAMES and
# PreTrainedTokenizerFast), the part of that list these tests can meet. Not in it: 5.x's TokenizersBackend,
# SentencePieceBackend, PythonBackend.
V4_57_CLASSES = {"PreTrainedTokenizerFast", "LlamaTokenizer", "LlamaTokenizerFast", "Qwen2Tokenizer",
                 "Qwen2TokenizerFast", "GPT2Tokenizer", "GPT2TokenizerFast", "GemmaTokenizerFast"}
TEXT = "What is 7 plus 7? <|im_start|>user\n7 plus 7 is 14.<|im_end|>"
CHAT = [{"role": "user", "content": "Say 3."}, {"role": "assistant", "content": "3"}]


def resolves_in_4_57(tokenizer_class: str) -> bool:
    """transformers 4.57's AutoTokenizer(use_fast=True): ``X`` is tried as ``XFast`` first, then as ``X``."""
    candidates = [tokenizer_class] if tokenizer_class.endswith("Fast") else [tokenizer_class + "Fast", tokenizer_class]
    return any(c in V4_57_CLASSES for c in candidates)


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokrun")
    model = root / "model"
    shutil.copytree(assets / "model", model)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()
    AutoTokenizer.from_pretrained(assets / "model").save_pretrained(model)  # as transformers 5 writes it
    assert json.loads((model / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    out = root / "run"
    cfg = load_config(None, [f"model.path={model}", f"data.path={assets / 'train.jsonl'}", "data.max_length=48",
                             f"output_dir={out}", "model.quant=none", "lora.r=4", "train.max_steps=1",
                             "train.save_every=1", "train.eval_every=0", "train.warmup_steps=0",
                             "data.chat_template=zephyr"])
    assert Trainer(cfg, progress=False).run() == 0
    return {"model": model, "run": out, "cfg": cfg, "root": root}


def export(*args):
    r = subprocess.run([sys.executable, "-m", "jqlora.export", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def test_adapter_carries_the_tokenizer_and_the_template_training_used(run, assets):
    r = export(run["run"], run["root"] / "adapter")
    adapter = run["root"] / "adapter"
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    assert resolves_in_4_57(config["tokenizer_class"]) and config["chat_template"] == DEFAULT_CHAT_TEMPLATE
    assert "is_local" not in config and "local_files_only" not in config
    ours, base = AutoTokenizer.from_pretrained(adapter), AutoTokenizer.from_pretrained(assets / "model")
    assert ours(TEXT)["input_ids"] == base(TEXT)["input_ids"]
    assert ours.chat_template == DEFAULT_CHAT_TEMPLATE != base.chat_template
    # the adapter's tokenizer renders a conversation to exactly the ids training saw
    trained = load_tokenizer(str(run["model"]))
    (ex,), _ = encode_records([Record({"messages": CHAT}, "x")], trained, chat_template="zephyr")
    assert ours.apply_chat_template(CHAT, tokenize=True, return_dict=False) == ex.ids.tolist()
    # vLLM's flags: rank 4 needs --max-lora-rank 8 (vLLM's smallest), no head LoRA, no DoRA warning
    assert "--enable-lora --max-lora-rank 8" in r.stdout and "no LoRA on embed_tokens / lm_head" in r.stdout
    assert "DoRA" not in r.stdout + r.stderr
    if os.environ.get("JQLORA_TRANSFORMERS4_PYTHON"):  # a python with transformers 4.x, where there is one
        _load_with_transformers_4(adapter, ours(TEXT)["input_ids"])


def test_merged_export_tokenizer_reads_in_4x_and_5x(run, assets):
    export(run["run"], run["root"] / "merged", "--merge", "--dtype", "float32")
    merged = run["root"] / "merged"
    config = json.loads((merged / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and resolves_in_4_57(config["tokenizer_class"])
    assert not resolves_in_4_57("TokenizersBackend")  # what the base holds: the failure llama.cpp's converter hit
    assert (merged / "chat_template.jinja").read_text() == config["chat_template"] == DEFAULT_CHAT_TEMPLATE
    ours = AutoTokenizer.from_pretrained(merged)
    assert ours(TEXT)["input_ids"] == AutoTokenizer.from_pretrained(assets / "model")(TEXT)["input_ids"]
    assert ours.chat_template == DEFAULT_CHAT_TEMPLATE
    if os.environ.get("JQLORA_TRANSFORMERS4_PYTHON"):
        _load_with_transformers_4(merged, ours(TEXT)["input_ids"])


def _load_with_transformers_4(path, ids):
    code = ("import json, sys, transformers; from transformers import AutoTokenizer; "
            f"t = AutoTokenizer.from_pretrained({str(path)!r}); "
            f"print(json.dumps([transformers.__version__, t({TEXT!r})['input_ids'], t.chat_template]))")
    r = subprocess.run([os.environ["JQLORA_TRANSFORMERS4_PYTHON"], "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    version, got, template = json.loads(r.stdout.strip().splitlines()[-1])
    assert version.startswith("4.") and got == ids and template == DEFAULT_CHAT_TEMPLATE


def test_make_portable_keeps_model_classes_and_a_directory_template(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    make_portable(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config == {"tokenizer_class": "LlamaTokenizer", "chat_template": "{{ messages }}"}
    assert resolves_in_4_57(config["tokenizer_class"])


def test_vllm_notes_rank_patterns_heads_and_dora():
    config = {"r": 16, "rank_pattern": {"q_proj": 40}, "target_modules": ["q_proj", "lm_head"], "use_dora": True}
    lines = vllm_notes(config, "out")
    assert "--max-lora-rank 64" in lines[0] and "largest rank 40" in lines[0]
    assert "LoRA on lm_head" in lines[1]
    assert lines[-1].startswith("warning: vLLM refuses DoRA") and "--merge" in lines[-1] and len(lines) == 3
    assert "serve --merge instead" in vllm_notes({"r": 1024, "target_modules": []}, "out")[0]
