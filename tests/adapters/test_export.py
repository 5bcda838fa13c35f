"""Merged export: transformers loads it as a plain model and reproduces jqlora-with-adapter logits."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny import make_model
from transformers import AutoModelForCausalLM

import jqlora
from jqlora import adapters
from jqlora.lora import LoraConfig, LoraLinear


def randomize_adapters(model, seed: int = 0, scale: float = 0.05) -> None:
    key = jax.random.key(seed)
    for i, (_, m) in enumerate(nnx.iter_modules(model)):
        if isinstance(m, LoraLinear) and m.lora_a is not None:
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            m.lora_a.set_value(scale * jax.random.normal(ka, m.lora_a.shape, m.lora_a.dtype))
            m.lora_b.set_value(scale * jax.random.normal(kb, m.lora_b.shape, m.lora_b.dtype))


def hf_logits(path, x) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        return model(torch.from_numpy(x).long()).logits.numpy()


X = np.random.default_rng(0).integers(0, 128, (2, 16)).astype(np.int32)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_merged_model_matches_jqlora_with_adapter(tmp_path, family, quant):
    src = make_model(tmp_path / "base", family, torch.float32)
    lora = LoraConfig(r=4, alpha=8, targets="all-linear", rslora=(family == "qwen3"))
    model = jqlora.load_model(src, quant=quant, dtype="float32", lora=lora)
    randomize_adapters(model)
    ours = np.asarray(model(jnp.asarray(X)))
    out = adapters.merge_to_hf(model, src, tmp_path / "merged", dtype="float32", max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()  # sharded
    assert (out / "generation_config.json").is_file()
    # float32 base: W + s(AB)ᵀ; 4-bit base: dequantized W + s(AB)ᵀ — either way jqlora's own function.
    np.testing.assert_allclose(hf_logits(out, X), ours, atol=1e-4, rtol=0)


def test_export_cli_merges_a_peft_adapter(tmp_path):
    src = make_model(tmp_path / "base", "llama", torch.float32)
    model = jqlora.load_model(src, quant="none", dtype="float32", lora=LoraConfig(r=4, alpha=16))
    randomize_adapters(model, seed=3)
    adapter = adapters.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(src))
    r = subprocess.run([sys.executable, "-m", "jqlora.export", str(adapter), str(tmp_path / "merged"), "--merge",
                        "--quant", "none", "--dtype", "float32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(hf_logits(tmp_path / "merged", X), np.asarray(model(jnp.asarray(X))), atol=1e-4)
    # A user's mistakes: one line, exit 2, nothing written.
    for args, message in [
        ([str(tmp_path / "nowhere"), str(tmp_path / "o1")], "not a directory"),
        ([str(adapter), str(tmp_path / "o2")], "already a peft adapter; add --merge"),
        ([str(adapter), str(tmp_path / "merged"), "--merge"], "already exists"),
    ]:
        r = subprocess.run([sys.executable, "-m", "jqlora.export", *args], capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_merge_streams_layer_by_layer(tmp_path):
    """Peak RSS growth while merging stays well under the merged model's size."""
    src = make_model(tmp_path / "big", "llama", torch.bfloat16, hidden_size=1024, intermediate_size=4096,
                     num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=6, vocab_size=256)
    code = textwrap.dedent(f"""
        import json, resource
        import jqlora
        from jqlora import adapters
        from jqlora.lora import LoraConfig
        model = jqlora.load_model({str(src)!r}, quant="nf4", dtype="bfloat16", lora=LoraConfig(r=8, alpha=16))
        adapters.merged_tensor(model, __import__("jqlora.models.llama", fromlist=["x"]).hf_key_table(model.config)[5])
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        adapters.merge_to_hf(model, {str(src)!r}, {str(tmp_path / 'merged')!r}, dtype="bfloat16",
                             max_shard_bytes=50_000_000)
        print(json.dumps({{"growth": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    growth = json.loads(r.stdout.strip().splitlines()[-1])["growth"]
    merged = sum(p.stat().st_size for p in (tmp_path / "merged").glob("*.safetensors"))
    print(f"merged {merged / 2**20:.0f} MiB, RSS growth {growth / 2**20:.0f} MiB")
    assert merged > 150 * 2**20
    assert growth < 0.5 * merged, (growth, merged)
