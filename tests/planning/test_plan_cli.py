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
        if recipe.stem != "demo":
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
