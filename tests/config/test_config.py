"""jqlora.config: defaults = configs/demo.yaml, YAML <- overrides precedence, round trip, and one-line errors that
name the source (file or command line), the key and the value."""

import dataclasses
from pathlib import Path

import pytest

from jqlora.config import (Config, ConfigError, LoraConfig, config_to_dict, load_config, load_run_config,
                           resume_conflicts, save_config, schema_lines)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def _error(path, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    return msg


def _yaml(tmp_path, text, name="x.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_are_neutral_and_the_demo_is_its_file():
    """Issue 12 defect 1: nothing of the demo leaks into a recipe through the defaults."""
    assert load_config(None, []) == Config()
    flat = str(config_to_dict(Config()))
    assert "assets/demo" not in flat and "capital" not in flat
    cfg = Config()
    assert (cfg.model.path, cfg.data.path, cfg.data.eval_path, cfg.train.sample_prompt) == (None, None, None, None)
    for name in ("llama3-8b", "mistral-7b", "qwen2.5-7b", "llama3-70b-fsdp2", "llama3-70b-fsdp8"):
        recipe = load_run_config(str(CONFIGS / f"{name}.yaml"), ["model.path=m", "data.path=d.jsonl"])
        assert "assets/demo" not in str(config_to_dict(recipe)) and recipe.data.eval_path is None, name
        assert recipe.train.sample_prompt is None
    demo = load_run_config(None, [])  # no file and no model.path: the demo, its assets from the repository
    assert demo == load_run_config(str(CONFIGS / "demo.yaml"), [])
    assert Path(demo.model.path) == REPO / "assets" / "demo" / "model"
    assert Path(demo.data.eval_path) == REPO / "assets" / "demo" / "chat_eval.jsonl"
    assert (demo.model.quant, demo.model.double_quant, demo.train.remat, demo.train.grad_accum_steps) == \
        ("nf4", True, "full", 2)
    mine = load_run_config(None, ["model.path=m", "data.path=d.jsonl"])  # model.path given: not the demo
    assert mine.data.eval_path is None and mine.output_dir == Config().output_dir
    with pytest.raises(ConfigError, match="data.path is not set"):
        load_run_config(None, ["model.path=m"])


@pytest.mark.parametrize("name", ["llama3-8b", "mistral-7b", "qwen2.5-7b"])
def test_recipes_load_with_qlora_hyperparameters(name):
    cfg = load_config(str(CONFIGS / f"{name}.yaml"), [])
    assert (cfg.model.quant, cfg.model.double_quant, cfg.model.dtype) == ("nf4", True, "bfloat16")
    assert (cfg.lora.r, cfg.lora.targets, cfg.data.max_length) == (16, "all-linear", 2048)
    assert cfg.train.learning_rate == pytest.approx(2e-4) and cfg.train.lr_schedule == "cosine"
    assert cfg.train.warmup_steps > 0 and cfg.model.path.startswith("/path/to/")


def test_every_key_in_demo_yaml_is_listed():
    import yaml

    def keys(tree, prefix=""):
        return {k for name, v in tree.items()
                for k in (keys(v, f"{prefix}{name}.") if isinstance(v, dict) else {prefix + name})}

    listed = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    assert keys(listed) == keys(config_to_dict(Config()))


def test_schema_help_lists_every_key_with_default_and_doc():
    lines = schema_lines()
    assert len(lines) == len([k for k in config_to_dict(Config()) for k in
                              (config_to_dict(Config())[k] if isinstance(config_to_dict(Config())[k], dict) else [k])])
    assert "  train.learning_rate = 0.0002  -- peak learning rate" in lines
    assert all(" -- " in ln for ln in lines), [ln for ln in lines if " -- " not in ln]


def test_resume_conflicts_name_the_keys_that_matter():
    a = load_config(None, ["model.path=m", "data.path=d", "lora.r=16"])
    b = load_config(None, ["model.path=m", "data.path=d", "lora.r=8", "train.max_steps=500", "train.eval_every=7",
                           "mesh.fsdp=2"])
    assert resume_conflicts(a, b) == [("lora.r", 16, 8)]


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = _yaml(tmp_path, "train:\n  learning_rate: 3e-4\n  batch_size: 2\nlora:\n  r: 4\n")
    cfg = load_config(path, ["train.batch_size=16", "lora.r=32", "lora.r=64", "output_dir=out"])
    assert cfg.train.learning_rate == pytest.approx(3e-4)  # YAML over default (2e-4 read as a float)
    assert cfg.train.batch_size == 16 and cfg.lora.r == 64  # command line over YAML, last one wins
    assert cfg.output_dir == "out"
    assert cfg.train.grad_accum_steps == Config().train.grad_accum_steps  # untouched default
    assert isinstance(cfg.train.learning_rate, float) and isinstance(cfg.lora.alpha, float)


def test_typed_values_from_the_command_line():
    cfg = load_config(None, ["lora.targets=[q_proj,v_proj]", "train.max_steps=null", "data.packing=true",
                             "lora.alpha=32", "model.max_seq_len=4096"])
    assert cfg.lora.targets == ("q_proj", "v_proj") and cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.train.max_steps is None and cfg.data.packing is True and cfg.lora.alpha == 32.0
    assert load_config(None, ["lora.targets=o_proj"]).lora.targets == ("o_proj",)
    assert len(Config().lora.target_modules) == 7


def test_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.batch_size = 3


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(str(CONFIGS / "llama3-8b.yaml"), ["lora.targets=[q_proj,k_proj]", "data.eval_path=e.jsonl"])
    save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(str(tmp_path / "sub" / "config.yaml"), []) == cfg


def test_unknown_keys_suggest_the_right_one(tmp_path):
    path = _yaml(tmp_path, "train:\n  learnig_rate: 1e-4\n")
    assert _error(path) == f"{path}: unknown key 'train.learnig_rate' (did you mean 'train.learning_rate'?)"
    assert _error(None, ["trian.batch_size=3"]) == \
        "command line: unknown key 'trian.batch_size' (did you mean 'train.batch_size'?)"
    assert _error(None, ["learning_rate=3"]) == \
        "command line: unknown key 'learning_rate' (did you mean 'train.learning_rate'?)"
    assert _error(None, ["lora.lora_alpha=3"]) == \
        "command line: unknown key 'lora.lora_alpha' (did you mean 'lora.alpha'?)"
    assert _error(None, ["zzz=1"]) == "command line: unknown key 'zzz'"


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=four", "train.batch_size='four' is not an integer"),
    ("train.batch_size=2.5", "train.batch_size=2.5 is not an integer"),
    ("train.learning_rate=fast", "train.learning_rate='fast' is not a number"),
    ("data.packing=maybe", "data.packing='maybe' is not a boolean (true/false)"),
    ("lora.dora=3", "lora.dora=3 is not a boolean (true/false)"),  # (omegaconf alone reads 3 as true)
    ("data.packing=1", "data.packing=1 is not a boolean (true/false)"),
    ("output_dir=null", "output_dir=None is not a string"),
    ("train.eval_batches=many", "train.eval_batches='many' is not an integer (or null)"),
])
def test_wrong_types(override, message):
    assert _error(None, [override]) == f"command line: {message}"


@pytest.mark.parametrize("override,message", [
    ("model.quant=int8", "model.quant='int8' must be one of nf4, fp4, none"),
    ("model.dtype=bf16", "model.dtype='bf16' must be one of bfloat16, float16, float32"),
    ("model.block_size=48", "model.block_size=48 must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096"),
    ("lora.r=0", "lora.r=0 must be >= 1"),
    ("lora.dropout=1.0", "lora.dropout=1.0 must be in [0, 1)"),
    ("lora.targets=[q_proj,qkv]", "lora.targets='qkv' is not a module name"),
    ("lora.targets=[]", "lora.targets=[] must not be empty"),
    ("data.format=sharegpt", "data.format='sharegpt' must be one of auto, chat, instruction, prompt_completion, text"),
    ("data.train_on=prompt", "data.train_on='prompt' must be one of completion, last_turn, all"),
    ("data.eval_fraction=1.0", "data.eval_fraction=1.0 must be in [0, 1)"),
    ("data.max_length=1", "data.max_length=1 must be >= 2"),
    ("train.learning_rate=0", "train.learning_rate=0.0 must be > 0"),
    ("train.lr_schedule=step", "train.lr_schedule='step' must be one of cosine, linear, constant"),
    ("train.remat=some", "train.remat='some' must be one of none, full, save_dots, save_dots_no_batch, offload, auto"),
    ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
    ("train.warmup_steps=-1", "train.warmup_steps=-1 must be >= 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be >= 1"),
])
def test_bad_values_name_the_key(override, message):
    assert _error(None, [override]).startswith(f"command line: {message}")


def test_dora_with_an_adjusted_base_is_one_line():
    assert _error(None, ["lora.dora=true", "lora.init=loftq"]).startswith(
        "command line: lora.init='loftq' cannot be combined with lora.dora=true")


def test_errors_name_the_file_a_bad_value_came_from(tmp_path):
    path = _yaml(tmp_path, "lora:\n  r: 0\ntrain:\n  batch_size: four\n")
    assert _error(path, ["lora.r=4"]) == f"{path}: train.batch_size='four' is not an integer"
    assert _error(path, ["train.batch_size=4"]) == f"{path}: lora.r=0 must be >= 1"
    assert load_config(path, ["train.batch_size=4", "lora.r=4"]).lora.r == 4  # fixed on the command line
    cross = _yaml(tmp_path, "data:\n  max_length: 4096\n", "y.yaml")
    assert _error(cross, ["model.max_seq_len=2048"]) == \
        f"{cross}: data.max_length=4096 must be <= model.max_seq_len (2048)"


def test_structure_errors(tmp_path):
    assert _error(None, ["train=5"]).startswith("command line: 'train' is a section")
    assert _error(_yaml(tmp_path, "model:\n  path:\n    x: 1\n")) == \
        f"{tmp_path / 'x.yaml'}: model.path must be a string (or null), not a mapping"
    assert _error(None, ["batch_size"]).startswith("command line: override 'batch_size' is not of the form key=value")
    bad = _yaml(tmp_path, "train:\n  batch_size: [1, 2\n", "bad.yaml")
    assert _error(bad).startswith(f"{bad}:3: invalid YAML (")
    assert _error(_yaml(tmp_path, "- 1\n- 2\n", "list.yaml")).endswith("expected a mapping of keys to values at the "
                                                                      "top level, got a list")
    assert _error(str(tmp_path / "missing.yaml")) == f"{tmp_path / 'missing.yaml'}: no such config file"
    assert load_config(_yaml(tmp_path, "lora:\n", "empty.yaml"), []) == Config()


def test_sections_validate_when_built_in_code():
    with pytest.raises(ConfigError, match=r"lora.r=0 must be >= 1"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="train.batch_size=-1"):
        dataclasses.replace(Config().train, batch_size=-1)


def test_config_choices_match_the_model():
    """config.py imports nothing heavy, so its copies of the model's choices are pinned here."""
    from jqlora import config
    from jqlora.lora import LINEAR_MODULES
    from jqlora.models.llama import REMAT_POLICIES

    assert config.REMAT_POLICIES == REMAT_POLICIES
    assert tuple(config.LORA_MODULES) == LINEAR_MODULES


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_validates(path):
    """Every shipped recipe loads, round-trips, and its mesh can be laid: the fixed axis sizes give a device count
    whose batch rows divide over data × fsdp (what the trainer checks before loading the model)."""
    from jqlora import parallel

    cfg = load_config(str(path), [])
    assert load_config(str(path), ["output_dir=elsewhere"]).train == cfg.train
    sizes = [v for v in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) if v != "auto"]
    devices = 1
    for v in sizes:
        devices *= v
    data, fsdp, _ = parallel.resolve_mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)
    for rows in (cfg.train.batch_size, cfg.train.eval_batch_size or cfg.train.batch_size):
        assert rows % (data * fsdp) == 0, (path.name, rows, data, fsdp)
