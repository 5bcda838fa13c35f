"""`jqlora.load_model` end to end against transformers (float32) and transformers + bitsandbytes 4-bit."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny import make_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import jqlora
from jqlora import checkpoints

FAMILY_CASES = {
    "llama_gqa_llama3rope": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 64})),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", {}),
    "qwen2_bias": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}


def ids(seed=0, shape=(2, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, shape).astype(np.int32)


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x).long()).logits.float().numpy()


def bnb_model(src: Path) -> torch.nn.Module:
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    # train() keeps bitsandbytes on its exact path (dequantize, then a float32 matmul): in eval mode on CPUs with
    # AVX512-BF16 it repacks the weights for a bf16 kernel. The tiny configs have no dropout, so nothing else changes.
    return AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32).train()


@pytest.fixture(scope="module", params=list(FAMILY_CASES))
def family_dir(request, tmp_path_factory) -> Path:
    family, overrides = FAMILY_CASES[request.param]
    return make_model(tmp_path_factory.mktemp(request.param) / "hf", family, torch.float32, **overrides)


def test_float32_parity_direct_and_converted(family_dir, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32).eval()
    x = ids()
    expected = torch_logits(ref, x)
    direct = jqlora.load_model(family_dir, quant="none", dtype="float32")
    np.testing.assert_allclose(np.asarray(direct(jnp.asarray(x))), expected, atol=1e-4, rtol=0)
    out = checkpoints.convert(family_dir, tmp_path / "jq", quant_type="none", dtype="float32")
    converted = jqlora.load_model(out, dtype="float32")
    np.testing.assert_allclose(np.asarray(converted(jnp.asarray(x))), expected, atol=1e-4, rtol=0)


def test_nf4_parity_with_transformers_bitsandbytes(family_dir, tmp_path):
    ref = bnb_model(family_dir)
    x = ids(1)
    expected = torch_logits(ref, x)
    ours = jqlora.load_model(family_dir, quant="nf4", double_quant=True, dtype="float32")
    # Same 4-bit codes as bitsandbytes (checked per layer), logits within 1e-3.
    layer = ours.model.layers.mlp.down_proj
    w = ref.model.layers[1].mlp.down_proj.weight
    np.testing.assert_array_equal(np.asarray(layer.codes.get_value())[1], w.data.view(torch.uint8).numpy().reshape(-1))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, atol=1e-3, rtol=0)
    # A *-bnb-4bit checkpoint saved by transformers loads with logits equal to transformers' own.
    ref.save_pretrained(tmp_path / "bnb")
    saved = jqlora.load_model(tmp_path / "bnb", dtype="float32")
    np.testing.assert_allclose(np.asarray(saved(jnp.asarray(x))), expected, atol=1e-5, rtol=0)
    # jqlora's --format bnb output loads in transformers and gives jqlora's logits on it.
    out = checkpoints.convert(family_dir, tmp_path / "ours_bnb", fmt="bnb", dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).train()
    np.testing.assert_allclose(torch_logits(theirs, x), np.asarray(ours(jnp.asarray(x))), atol=1e-5, rtol=0)
    # And the jqlora format reloads to the very same model.
    jq = jqlora.load_model(checkpoints.convert(family_dir, tmp_path / "jq", dtype="float32"), dtype="float32")
    np.testing.assert_array_equal(np.asarray(jq(jnp.asarray(x))), np.asarray(ours(jnp.asarray(x))))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jqlora.convert", *args], capture_output=True, text=True)


def test_checkpoint_errors_name_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    def broken(name: str, edit) -> Path:
        src = make_model(tmp_path / name, "llama", torch.float32)
        t = load_file(str(src / "model.safetensors"))
        edit(t)
        save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
        return src

    missing = broken("missing", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    shaped = broken("shaped", lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(127, 64)}))
    unknown = make_model(tmp_path / "unknown", "llama", torch.float32)
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    cases = [
        (missing, "missing tensor 'model.layers.1.self_attn.k_proj.weight'"),
        (shaped, "model.layers.0.mlp.up_proj.weight has shape (127, 64), expected (128, 64)"),
        (unknown, "gpt2"),
    ]
    for src, message in cases:
        r = cli(str(src), str(tmp_path / f"out-{src.name}"))
        assert r.returncode != 0 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / f"out-{src.name}").exists()
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            jqlora.load_model(src)
