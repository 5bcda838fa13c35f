"""`python -m jqlora.plan` names (issue 12, defect 9): hub ids, checkpoint directory names and recipe names give
the published shape's plan; --model-config takes the JSON itself; the README's `--config` example works without the
checkpoint on disk."""

import json
from pathlib import Path

import pytest

from jqlora import plan
from jqlora import planning

REPO = Path(__file__).resolve().parents[2]


def _plan(capsys, *args) -> str:
    assert plan.main(list(args)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def _total(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("total per device"))


@pytest.mark.parametrize("name, builtin", [
    ("meta-llama/Meta-Llama-3-8B", "llama3-8b"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama3-8b"),
    ("Meta-Llama-3.1-70B-Instruct", "llama3-70b"),  # a checkpoint directory's name
    ("llama3-70b-fsdp2", "llama3-70b"),  # a recipe's name
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("mistralai/Mistral-7B-v0.1", "mistral-7b"),
])
def test_hub_ids_and_recipe_names_are_the_published_shapes(capsys, name, builtin):
    assert plan.lookup_shape(name)[0] == planning.BUILTIN[builtin]
    assert _total(_plan(capsys, "--model", name, "--seq", "1024")) == \
        _total(_plan(capsys, "--model", builtin, "--seq", "1024"))


def test_every_recipe_has_a_shape():
    for recipe in sorted((REPO / "configs").glob("*.yaml")):
        if not recipe.stem.startswith("demo"):  # (demo, demo-grpo: the embedded demo base, not a published shape)
            assert plan.lookup_shape(recipe.stem) is not None, recipe.name
    v03 = plan.lookup_shape("mistral-7b")  # the mistral recipe's v0.3 differs from v0.1 only in vocab and window
    assert plan.lookup_shape("mistral-7b-instruct-v0.3")[0].vocab_size == 32768 and v03[0].vocab_size == 32000


def test_model_config_json_text_equals_the_file(capsys, tmp_path):
    text = json.dumps(planning.PUBLISHED["qwen2.5-7b"])
    (tmp_path / "config.json").write_text(text)
    assert _total(_plan(capsys, "--model-config", text)) == _total(_plan(capsys, "--model-config", str(tmp_path)))
    assert _total(_plan(capsys, "--model-config", text)) == _total(_plan(capsys, "--model", "qwen2.5-7b"))
    assert plan.main(["--model-config", "{not json"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not valid JSON" in err


def test_readme_config_example_without_the_checkpoint(capsys):
    got = _plan(capsys, "--config", str(REPO / "configs" / "llama3-70b-fsdp2.yaml"),
                "model.path=/models/Meta-Llama-3.1-70B-Instruct")
    assert _total(got) == _total(_plan(capsys, "--model", "llama3-70b", "--fsdp", "2"))
    assert plan.main(["--config", str(REPO / "configs" / "llama3-8b.yaml"), "model.path=/nowhere/my-model"]) == 2
    assert "not a known model name" in capsys.readouterr().err


# -- issue 28, items 4 and 5 ------------------------------------------------------------------------------------------

def test_model_dir_reads_its_config_json(capsys, tmp_path):
    """--model ./dir (a local Hugging Face directory) is the plan of its config.json, as --model-config gives it."""
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(planning.PUBLISHED["gemma2-9b"]))
    got = _total(_plan(capsys, "--model", str(model), "--seq", "1024"))
    assert got == _total(_plan(capsys, "--model-config", str(model / "config.json"), "--seq", "1024"))
    assert got == _total(_plan(capsys, "--model", "gemma2-9b", "--seq", "1024"))
    assert plan.main(["--model", str(tmp_path)]) == 2  # a directory, but no model in it
    assert "a directory without config.json" in capsys.readouterr().err
    assert plan.main(["--model", str(tmp_path / "my-modle")]) == 2  # a mistyped path: not "unknown model name"
    assert capsys.readouterr().err.strip() == f"jqlora.plan: --model {tmp_path / 'my-modle'}: no such directory"


@pytest.mark.parametrize("memory", [80.0, 6.0])
def test_does_not_fit_exits_non_zero(capsys, memory):
    """The verdict follows the plan's own total against 85% of --memory (llama3-8b needs about 7.5 GB at 2048
    tokens: 80 GB fits, 6 GB does not); "does NOT fit" is exit 3, documented in --help, apart from a usage error's 2."""
    rc = plan.main(["--model", "llama3-8b", "--seq", "2048", "--remat", "full", "--memory", str(memory)])
    out = capsys.readouterr().out
    total = float(_total(out).split()[-2])
    fits = total <= planning.HEADROOM * memory
    assert (rc, f"{'fits' if fits else 'does NOT fit'}: {total:.2f} GB planned" in out) == (0 if fits else 3, True)
    assert plan.EXIT_DOES_NOT_FIT == 3 and "3 it does NOT fit" in " ".join(_help().split())


def _help() -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "jqlora.plan", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120).stdout


def test_flags_between_overrides(capsys):
    """item 4: a flag between two overrides of --config is a flag (main: 'unrecognized arguments')."""
    recipe = str(REPO / "configs" / "llama3-70b-fsdp2.yaml")
    mixed = _plan(capsys, "--config", recipe, "model.path=/models/Meta-Llama-3.1-70B-Instruct", "--seq", "1024",
                  "train.batch_size=2")
    ordered = _plan(capsys, "--config", recipe, "--seq", "1024", "model.path=/models/Meta-Llama-3.1-70B-Instruct",
                    "train.batch_size=2")
    assert _total(mixed) == _total(ordered)


def test_hub_id_from_the_local_cache(capsys, tmp_path, monkeypatch):
    """A hub id outside the built-in table is read from the Hugging Face cache's snapshot (its documented layout:
    models--org--name/refs/main names the snapshot holding config.json); nothing is fetched."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(planning.PUBLISHED["phi4-mini"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert _total(_plan(capsys, "--model", "someone/tiny-llama")) == _total(_plan(capsys, "--model", "phi4-mini"))
    assert plan.main(["--model", "someone/not-cached"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_a_preference_config_plans_two_rows_per_pair(capsys):
    """train.objective=dpo with train.batch_size=2 pairs plans the 4 rows of SFT with train.batch_size=4 (the
    batch line of `--config` used to take the pairs as rows)."""
    cfg = str(REPO / "configs" / "llama3-8b.yaml")
    dpo = _plan(capsys, "--config", cfg, "model.path=/m/llama3-8b", "train.objective=dpo", "train.batch_size=2")
    sft = _plan(capsys, "--config", cfg, "model.path=/m/llama3-8b", "train.batch_size=4")
    assert " batch=4/device " in dpo.splitlines()[0] and _total(dpo) == _total(sft), (dpo, sft)
    # --batch counts rows: a preference step compiles pairs, so an odd count is one line, exit 2, nothing compiled
    assert plan.main(["--config", cfg, "model.path=/m/llama3-8b", "train.objective=dpo", "--batch", "3",
                      "--compile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch 3" in err[0] and "pairs of 2 rows" in err[0], err


@pytest.mark.parametrize("dtype, quant, label", [
    ("float32", "nf4", "base weights (4-bit + float32)"),
    ("float16", "nf4", "base weights (4-bit + float16)"),
    ("bfloat16", "fp4", "base weights (4-bit + bfloat16)"),
    ("float32", "none", "base weights (float32)"),
])
def test_the_weights_row_names_the_model_dtype(capsys, dtype, quant, label):
    """The base weights' row says what they are stored in: model.dtype (issue 28: it said bf16 whatever the dtype)."""
    text = _plan(capsys, "--model", "llama3-8b", "--seq", "1024", "--dtype", dtype, "--quant", quant)
    rows = [line for line in text.splitlines() if line.startswith("base weights")]
    assert len(rows) == 1 and rows[0].split("  ")[0] == label, text
    assert f" {dtype}" in text.splitlines()[0]  # (the title's dtype, the same setting)
