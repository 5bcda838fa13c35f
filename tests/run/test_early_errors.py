"""A user's mistake in the data or the adapter is one line within seconds (issue 28, items 1, 2 and 4): the CLI says
so before it imports JAX or reads a weight, in a fresh process whose modules afterwards show that (no ``jax`` in
``sys.modules``); a mistyped local path is "no such file", never a Hub lookup; a Hub name on a machine that cannot
reach the Hub is told so before any retry; flags go anywhere among the overrides. The adapter check reads shapes
from the safetensors header alone; peft's own adapters (right model: accepted; a wider model's: refused) are the
oracle of what a valid adapter is."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

# Run a CLI's main in a fresh interpreter; print its exit code and whether JAX was imported, then stderr follows.
_PROBE = ("import sys, importlib; m = importlib.import_module(sys.argv[1]); rc = m.main(sys.argv[2:]); "
          "print(rc, 'jax' in sys.modules, 'safetensors.flax' in sys.modules)")


def _run(cwd: Path, module: str, *args: str, **env: str) -> tuple[int, bool, str]:
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env}
    proc = subprocess.run([sys.executable, "-c", _PROBE, module, *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rc, jax_imported, _ = proc.stdout.split()[-3:]
    return int(rc), jax_imported == "True", proc.stderr.strip()


@pytest.fixture(scope="module")
def work(assets, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("early")
    good = (assets / "train.jsonl").read_text().splitlines()
    (work / "chat.jsonl").write_text("\n".join(good) + "\n")
    (work / "empty.jsonl").write_text("\n\n")
    (work / "bad.jsonl").write_text("\n".join([good[0], good[1], '{"messages": [{"role": "user"', good[2]]) + "\n")
    (work / "nofield.jsonl").write_text("\n".join([good[0], json.dumps({"text": "hello"})]) + "\n")
    (work / "textint.jsonl").write_text(json.dumps({"text": 5}) + "\n")
    (work / "run").mkdir()
    return work


def _train(work: Path, assets: Path, *args: str, **env: str) -> tuple[int, bool, str]:
    return _run(work, "jqlora.train", f"model.path={assets / 'model'}", "output_dir=run", "--no-progress", *args,
                **env)


@pytest.mark.parametrize("value, message", [
    ("chat.jsnol", "data.path=chat.jsnol: no such file or directory"),  # item 1: the typo
    ("data/chat.jsonl", "data.path=data/chat.jsonl: no such file or directory"),
    ("./chat", "data.path=./chat: no such file or directory"),
    ("alpaca", "data.path=alpaca: no such file or directory"),  # a bare word is not a Hub name
    ("empty.jsonl", "empty.jsonl: no records (empty dataset)"),  # item 2
    ("bad.jsonl", "bad.jsonl:3: not valid JSON"),
    ("nofield.jsonl", "nofield.jsonl:2: missing 'messages' (format chat)"),
    ("textint.jsonl", "textint.jsonl:1: 'text' must be a string, got int (format text)"),
])
def test_data_mistake_is_one_line_before_jax(work, assets, value, message):
    rc, jax_imported, err = _train(work, assets, f"data.path={value}", HF_ENDPOINT="http://127.0.0.1:9")
    assert rc == 2 and err.splitlines() == [err] and message in err and not jax_imported, err


@pytest.mark.parametrize("objective, lines, message", [
    ("dpo", [], "no records (empty dataset)"),  # the newcomer trial's empty DPO file: 26 s before, after the weights
    ("dpo", [{"prompt": "a", "chosen": "b"}], "pref.jsonl:1: missing 'rejected'"),
    ("dpo", [{"prompt": "a", "chosen": "b", "rejected": ""}], "pref.jsonl:1: empty completion: 'rejected' is ''"),
    ("kto", [{"prompt": "a", "completion": "b", "label": "yes"}], "pref.jsonl:1: 'label' must be true or false"),
    ("kto", [{"prompt": "a", "chosen": "b", "rejected": " "}], "pref.jsonl:1: empty completion"),  # unpaired
    ("grpo", [{"question": "a"}], "pref.jsonl:1: missing 'prompt' (train.objective=grpo"),
    ("grpo", [{"prompt": [{"role": "robot", "content": "a"}]}], "pref.jsonl:1: prompt[0] must be a message"),
])
def test_preference_and_grpo_data_mistakes_are_one_line_before_jax(work, assets, objective, lines, message):
    """The same early check for the other objectives' records (each reader's own words, without a tokenizer)."""
    (work / "pref.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) or "\n")
    rewards = ["grpo.rewards=[jqlora.training.rewards:exact_match]"] if objective == "grpo" else []
    rc, jax_imported, err = _train(work, assets, f"train.objective={objective}", "data.path=pref.jsonl", *rewards)
    assert rc == 2 and err.splitlines() == [err] and message in err and not jax_imported, err


def test_good_preference_and_prompt_records_pass_the_early_check(tmp_path):
    """The readers' own accepted formats pass: conversational, implicit-prompt and paired-for-KTO records."""
    from jqlora.data.preference import check_preference_records
    from jqlora.data.prompts import check_prompt_records
    from jqlora.data.records import read_records

    msgs = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    rows = [{"prompt": msgs("user", "q"), "chosen": msgs("assistant", "a"), "rejected": msgs("assistant", "b")},
            {"chosen": "the cat sat", "rejected": "the cat ran"}, {"prompt": "q", "chosen": "a", "rejected": "b"}]
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check_preference_records(read_records(str(path)), "paired")
    check_preference_records(read_records(str(path)), "unpaired")
    path.write_text(json.dumps({"prompt": "q", "answer": 3}) + "\n" + json.dumps({"prompt": msgs("user", "q")}))
    check_prompt_records(read_records(str(path)))


def test_eval_path_is_named_and_dry_run_checks_first(work, assets):
    rc, jax_imported, err = _train(work, assets, "data.path=chat.jsonl", "data.eval_path=evl.jsonl", "--dry-run")
    assert rc == 2 and err == "error: data.eval_path=evl.jsonl: no such file or directory" and not jax_imported, err


def test_flags_go_anywhere_among_the_overrides(work, assets):
    """item 4: the issue's command, `--dry-run` between two overrides, reaches the data check (not argparse). (The
    issue's `model.path=m` is a real model here: a missing model.path is named before the data.)"""
    rc, jax_imported, err = _run(work, "jqlora.train", f"model.path={assets / 'model'}", "--dry-run",
                                 "data.path=chat.jsnol", "output_dir=run")
    assert rc == 2 and err == "error: data.path=chat.jsnol: no such file or directory" and not jax_imported, err


def test_hub_name_offline_is_one_line_without_retries(work, assets, tmp_path):
    """item 1: an org/name value is a Hub dataset; with the Hub not reachable (an endpoint that refuses), datasets is
    put offline before it retries, and the dataset is not in the (empty) cache: one line that says so."""
    rc, _, err = _train(work, assets, "data.path=someone/no-such-dataset", "--dry-run",
                        HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    assert rc == 2 and err.splitlines() == [err], err
    assert "someone/no-such-dataset: not a local path, and not in the local Hugging Face cache" in err, err
    assert "Retry" not in err


def test_hub_name_with_a_cache_folder_goes_offline_before_retrying(tmp_path):
    """The full read (past the early check: a cache folder for the name exists, so it may hold the data): the Hub not
    reachable, datasets is put offline before its first request, and fails at once in the same one line."""
    (tmp_path / "hf" / "hub" / "datasets--someone--partly-cached").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    code = ("from jqlora.data import DataError, check_data, read_records\n"
            "from jqlora.config import load_config\n"
            "check_data(load_config(None, ['model.path=m', 'data.path=someone/partly-cached']).data)\n"
            "try:\n    read_records('someone/partly-cached')\nexcept DataError as e:\n    print(e)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    said = "someone/partly-cached: not a local path, and not in the local Hugging Face cache"
    assert proc.returncode == 0 and said in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "Retry" not in proc.stderr and "Couldn't reach" not in proc.stdout + proc.stderr, proc.stderr[-3000:]


# -- generate: the adapter checked from its config and safetensors header -------------------------------------------

def _peft_adapter(model_dir: Path, out: Path) -> Path:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(assets, tmp_path_factory) -> dict[str, Path]:
    from tiny import make_family_model, make_model

    root = tmp_path_factory.mktemp("adapters")
    wide = make_model(root / "wide", "llama", vocab_size=512, hidden_size=96, intermediate_size=128)
    _, phi3 = make_family_model(root / "phi3", "phi3")
    _, gemma3 = make_family_model(root / "gemma3", "gemma3")
    out = {"ok": _peft_adapter(assets / "model", root / "ok"), "wide": _peft_adapter(wide, root / "wide-adapter"),
           "phi3-model": phi3, "phi3": _peft_adapter(phi3, root / "phi3-adapter"),
           "gemma3-model": gemma3, "gemma3": _peft_adapter(gemma3, root / "gemma3-adapter")}
    (root / "notpeft").mkdir()
    (root / "notpeft" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    out["notpeft"] = root / "notpeft"
    return out


def test_peft_adapters_of_the_right_model_pass_the_header_check(assets, adapters):
    from jqlora.generate import check_adapter

    check_adapter(str(assets / "model"), str(adapters["ok"]))
    check_adapter(str(adapters["phi3-model"]), str(adapters["phi3"]))  # fused qkv_proj / gate_up_proj
    check_adapter(str(adapters["gemma3-model"]), str(adapters["gemma3"]))  # head_dim apart from hidden / heads


@pytest.mark.parametrize("which, message", [
    ("wide", "has shape (96, 4), expected (64, 4)"),  # a 96-wide model's adapter on the 64-wide base
    ("phi3", "has no gate_up_proj"),  # another architecture's (fused) linears
    ("notpeft", "peft_type 'IA3' is not supported"),
])
def test_generate_refuses_a_wrong_adapter_before_jax(assets, adapters, tmp_path, which, message):
    rc, jax_imported, err = _run(tmp_path, "jqlora.generate", "--model", str(assets / "model"), "--adapter",
                                 str(adapters[which]), "--prompt", "hi")
    assert rc == 2 and err.splitlines() == [err] and message in err and not jax_imported, err


def test_a_run_directory_given_as_adapter_points_to_its_adapter(assets, adapters, tmp_path):
    """The third newcomer trial's `generate --adapter runs/demo`: the line names the run's own adapter directory
    (for generate's early check and for jqlora.adapters' loader alike)."""
    import shutil

    from jqlora.adapters.errors import AdapterError
    from jqlora.adapters.load import _read_config
    from jqlora.generate import UsageError, check_adapter

    run = tmp_path / "run"
    shutil.copytree(adapters["ok"], run / "adapter")
    with pytest.raises(UsageError) as e:
        check_adapter(str(assets / "model"), str(run))
    assert str(e.value).endswith(f"is not a peft adapter directory; its run's adapter is {run / 'adapter'}")
    with pytest.raises(AdapterError, match="its run's adapter is"):
        _read_config(run)
    with pytest.raises(UsageError) as e:  # no hint where there is no adapter inside
        check_adapter(str(assets / "model"), str(tmp_path))
    assert str(e.value).endswith("is not a peft adapter directory")


@pytest.mark.parametrize("key,value", [("r", "Infinity"), ("r", "4.5"), ("lora_alpha", "Infinity"),
                                       ("lora_alpha", "NaN"), ("lora_alpha", "0")])
def test_generate_names_an_absurd_rank_or_alpha_before_the_weights(assets, tmp_path, key, value):
    # an adapter_config.json alone (no weights yet): its own mistake is named first, not the missing weights
    from jqlora.generate import UsageError, check_adapter

    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
           key: "@"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg).replace('"@"', value))
    with pytest.raises(UsageError, match=rf"adapter_config.json: {key} must be a positive finite"):
        check_adapter(str(assets / "model"), str(tmp_path))
