"""`jqlora.adapters` against peft itself: exported keys/shapes/config, peft loading our adapters (float32 and
bitsandbytes 4-bit bases), our loading of adapters peft wrote, and the errors for adapters we cannot hold."""

import json
import logging
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import jqlora
from jqlora.lora import LoraConfig, LoraLinear
from jqlora.adapters import AdapterError, load_adapter, load_model_with_adapter, read_adapter_config, save_adapter


def ids(seed=0, shape=(2, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, shape).astype(np.int32)


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x).long()).logits.float().numpy()


def jq_logits(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(x)))


def randomize_lora(model, seed: int = 0, scale: float = 0.2) -> None:
    """Nonzero random A and B everywhere (a fresh adapter has B = 0 and would hide transposes and scalings)."""
    key = jax.random.key(seed)
    for i, (_, m) in enumerate(nnx_modules(model)):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        m.lora_a.set_value(scale * jax.random.normal(ka, m.lora_a.shape, m.lora_a.dtype))
        m.lora_b.set_value(scale * jax.random.normal(kb, m.lora_b.shape, m.lora_b.dtype))


def nnx_modules(model):
    from flax import nnx

    return [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, LoraLinear) and m.lora_a is not None]


def peft_config(**kw) -> peft.LoraConfig:
    return peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **kw)


class PeftLogs:
    """Collects warnings and log records emitted while peft loads an adapter."""

    def __enter__(self):
        self.records: list[str] = []
        self._warn = warnings.catch_warnings(record=True)
        self.warned = self._warn.__enter__()
        warnings.simplefilter("always")
        self.handler = logging.Handler()
        self.handler.emit = lambda r: self.records.append(r.getMessage())
        logging.getLogger().addHandler(self.handler)
        for name in ("peft", "transformers"):
            logging.getLogger(name).addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        for name in ("", "peft", "transformers"):
            logging.getLogger(name).removeHandler(self.handler)
        self._warn.__exit__(*exc)

    def key_complaints(self) -> list[str]:
        msgs = self.records + [str(w.message) for w in self.warned]
        return [m for m in msgs if "missing" in m.lower() or "unexpected" in m.lower()]


FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    return {f: make_model(tmp_path_factory.mktemp(f) / "hf", f, torch.float32) for f in FAMILIES}


# ----------------------------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj", "down_proj")])
def test_export_keys_shapes_config_equal_peft(hf_dirs, tmp_path, targets):
    src = hf_dirs["qwen2"]
    lora = LoraConfig(r=4, alpha=8, targets=targets, rank_pattern={"v_proj": 2}, alpha_pattern={"mlp.down_proj": 3})
    ours = jqlora.load_model(src, quant="none", dtype="float32", lora=lora)
    out = save_adapter(ours, tmp_path / "ad", lora_config=lora, base_model_name_or_path=str(src),
                       card={"data": "tiny.jsonl", "steps": 7, "final_loss": 1.2345})

    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    theirs = peft.get_peft_model(hf, peft_config(r=4, lora_alpha=8, target_modules=list(lora.target_modules),
                                                 rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}))
    want = peft.get_peft_model_state_dict(theirs)
    got = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert (tuple(got[k].shape), got[k].dtype) == (tuple(want[k].shape), want[k].dtype), k
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}

    theirs.save_pretrained(tmp_path / "peft")
    ref = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg) == set(ref) - {"peft_version"}
    for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora",
              "fan_in_fan_out", "inference_mode", "modules_to_save", "init_lora_weights", "layers_to_transform",
              "revision", "base_model_name_or_path"):
        assert cfg[k] == ref[k], k
    assert cfg["target_modules"] == sorted(ref["target_modules"])
    assert cfg["rank_pattern"] == {"self_attn.v_proj": 2}
    assert cfg["alpha_pattern"] == {"mlp.down_proj": 3} if "down_proj" in lora.target_modules else {}
    # peft reads our config back to the same per-module settings
    loaded = peft.LoraConfig.from_pretrained(str(out))
    assert loaded.r == 4 and loaded.lora_alpha == 8 and set(loaded.target_modules) == set(ref["target_modules"])
    card = (out / "README.md").read_text()
    assert f"base_model: {src}" in card and "tiny.jsonl" in card and "7" in card and "1.2345" in card
    # Never overwrite silently; leave no temporary directories behind.
    with pytest.raises(AdapterError, match="not empty"):
        save_adapter(ours, out, lora_config=lora)
    save_adapter(ours, out, lora_config=lora, overwrite=True, card={"steps": 8})
    assert "8" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "peft"]


# ----------------------------------------------------------------------------------------------------------------
# peft loads our adapters


ROUND_TRIP = {  # family -> LoraConfig
    "llama": LoraConfig(r=4, alpha=8, targets="all-linear"),
    "mistral": LoraConfig(r=4, alpha=16, targets=("q_proj", "v_proj"), rslora=True),
    "qwen2": LoraConfig(r=4, alpha=8, targets="all-linear", rank_pattern={"mlp.down_proj": 2},
                        alpha_pattern={"self_attn.k_proj": 3}),
    "qwen3": LoraConfig(r=2, alpha=4, targets=("k_proj", "o_proj", "gate_proj", "up_proj"), rslora=True,
                        rank_pattern={"o_proj": 3}),
}


def peft_from_ours(base: torch.nn.Module, adapter: Path) -> tuple[torch.nn.Module, list[str]]:
    with PeftLogs() as logs:
        model = peft.PeftModel.from_pretrained(base, str(adapter))
    return model, logs.key_complaints()


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_our_adapter_float32(hf_dirs, tmp_path, family):
    src, lora = hf_dirs[family], ROUND_TRIP[family]
    ours = jqlora.load_model(src, quant="none", dtype="float32", lora=lora)
    randomize_lora(ours, seed=1)
    out = save_adapter(ours, tmp_path / "ad", lora_config=lora, base_model_name_or_path=str(src))
    x = ids(2)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    base = torch_logits(hf, x)
    theirs, complaints = peft_from_ours(hf, out)
    assert complaints == []
    expected = jq_logits(ours, x)
    assert np.abs(expected - base).max() > 1e-2  # the adapter really changes the output
    np.testing.assert_allclose(torch_logits(theirs.eval(), x), expected, atol=1e-4, rtol=0)
    # ... and jqlora reads its own export back to the same model
    again = load_model_with_adapter(src, out, quant="none", dtype="float32")
    np.testing.assert_array_equal(jq_logits(again, x), expected)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_peft_loads_our_adapter_on_bnb_4bit(hf_dirs, tmp_path, family):
    src, lora = hf_dirs[family], ROUND_TRIP[family]
    ours = jqlora.load_model(src, quant="nf4", double_quant=True, dtype="float32", lora=lora)
    randomize_lora(ours, seed=2)
    out = save_adapter(ours, tmp_path / "ad", lora_config=lora, base_model_name_or_path=str(src))
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb, dtype=torch.float32)
    theirs, complaints = peft_from_ours(base, out)
    assert complaints == []
    theirs.train()  # bitsandbytes' exact CPU path (see tests/test_load.py); the tiny models have no dropout
    x = ids(3)
    np.testing.assert_allclose(torch_logits(theirs, x), jq_logits(ours, x), atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# We load adapters peft wrote


def peft_adapter(src: Path, out: Path, cfg: peft.LoraConfig, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(out)
    return out, model.eval()


def test_we_load_peft_adapter(hf_dirs, tmp_path):
    src = hf_dirs["qwen3"]
    cfg = peft_config(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=True,
                      rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 5})
    out, theirs = peft_adapter(src, tmp_path / "ad", cfg)
    x = ids(4)
    expected = torch_logits(theirs, x)

    lora = read_adapter_config(out)
    assert lora.target_modules == ("q_proj", "k_proj", "down_proj") and lora.rslora
    specs = {name.split(".")[-1]: spec for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")
             if (spec := lora.for_module(name))}
    assert {k: (s.r, s.alpha) for k, s in specs.items()} == {"q_proj": (4, 8), "k_proj": (2, 8), "down_proj": (4, 5)}
    ours = load_model_with_adapter(src, out, quant="none", dtype="float32")
    np.testing.assert_allclose(jq_logits(ours, x), expected, atol=1e-4, rtol=0)

    # Keys that carry the adapter name (".default"), as some tools write them, load the same.
    named = tmp_path / "named"
    named.mkdir()
    (named / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
    t = load_file(str(out / "adapter_model.safetensors"))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in t.items()},
              str(named / "adapter_model.safetensors"), metadata={"format": "pt"})
    fresh = jqlora.load_model(src, quant="none", dtype="float32", lora=read_adapter_config(named))
    np.testing.assert_allclose(jq_logits(load_adapter(fresh, named), x), expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Errors


def edit_adapter(src: Path, dst: Path, config=None, tensors=None) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(config(cfg) if config else cfg))
    t = load_file(str(src / "adapter_model.safetensors"))
    save_file(tensors(t) if tensors else t, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def test_bad_adapters_raise_one_line_errors(hf_dirs, tmp_path):
    src = hf_dirs["llama"]
    good, _ = peft_adapter(src, tmp_path / "good", peft_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def drop(t):
        t.pop(key)
        return t

    (tmp_path / "empty").mkdir()
    cases = {
        "no_config": (tmp_path / "empty", "adapter_config.json: missing"),
        "prompt": (edit_adapter(good, tmp_path / "prompt", config=lambda c: {**c, "peft_type": "PROMPT_TUNING"}),
                   "peft_type 'PROMPT_TUNING' is not supported"),
        "dora": (edit_adapter(good, tmp_path / "dora", config=lambda c: {**c, "use_dora": True}),
                 "says use_dora=true but model.layers.0.self_attn.q_proj has no DoRA magnitude"),
        "gpt2": (edit_adapter(good, tmp_path / "gpt2", tensors=lambda t: {
            k.replace("model.layers.", "transformer.h.").replace("self_attn.q_proj", "attn.c_attn"): v
            for k, v in t.items()}), "unexpected key 'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight'"),
        "missing": (edit_adapter(good, tmp_path / "missing", tensors=drop), f"missing key '{key}'"),
        "kinds_in_other_layers": (edit_adapter(good, tmp_path / "per_layer", tensors=lambda t: {
            k: v for k, v in t.items() if "layers.1.self_attn.q_proj" not in k}),
            r"self_attn.q_proj is adapted in layers \[0\] but not in \[1\]"),
    }
    for name, (adapter, message) in cases.items():
        with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            load_model_with_adapter(src, adapter, quant="none", dtype="float32")
        assert "\n" not in str(e.value), name

    # A model built for other targets: unexpected keys (adapter has more) or missing keys (model has more).
    small = jqlora.load_model(src, quant="none", dtype="float32", lora=LoraConfig(r=4, alpha=8, targets=("q_proj",)))
    with pytest.raises(AdapterError, match=r"unexpected key '.*v_proj\.lora_[AB]\.weight'"):
        load_adapter(small, good)
    wide = jqlora.load_model(src, quant="none", dtype="float32", lora=LoraConfig(r=4, alpha=8))
    with pytest.raises(AdapterError, match=r"missing key '.*(proj)\.lora_A\.weight' \(the model adapts"):
        load_adapter(wide, good)
    # An adapter for a wider base: the shape error names the key, the expected and the actual shape.
    other = make_model(tmp_path / "other", "llama", torch.float32, intermediate_size=96, hidden_size=32)
    with pytest.raises(AdapterError, match=r"q_proj\.lora_A\.weight has shape \(4, 64\), expected \(4, 32\)"):
        load_model_with_adapter(other, good, quant="none", dtype="float32")
    # Alpha that does not match the model's scaling
    scaled = jqlora.load_model(src, quant="none", dtype="float32",
                               lora=LoraConfig(r=4, alpha=16, targets=("q_proj", "v_proj")))
    with pytest.raises(AdapterError, match="LoRA scaling 2 in the adapter"):
        load_adapter(scaled, good)
