"""jqlora.convert: streaming reads of every checkpoint kind, bnb-4bit output that transformers loads, atomic output."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import bitsandbytes.functional as F
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny import make_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from jqlora import checkpoints, quant
from jqlora.checkpoints import WEIGHTS

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def bnb_reference(src: Path, quant_type="nf4", double_quant=True) -> torch.nn.Module:
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg).eval()


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("m") / "tiny", "llama", torch.bfloat16)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_bnb_output_loads_in_transformers_and_equals_its_quantization(tiny_bf16, tmp_path, quant_type, double_quant):
    out = checkpoints.convert(tiny_bf16, tmp_path / "bnb", quant_type=quant_type, double_quant=double_quant, fmt="bnb")
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    # our quantization_config names the checkpoint's dtype as the compute dtype, and transformers 5.25 honours it; the
    # logits below compare both models computing in float32, so that only the quantization can differ
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"
    linears = [m for m in ours.modules() if type(m).__name__ == "Linear4bit"]
    assert len(linears) == 2 * len(LINEARS)
    for m in linears:
        m.compute_dtype = torch.float32
    ref = bnb_reference(tiny_bf16, quant_type, double_quant)
    ckpt = checkpoints.Checkpoint(tiny_bf16)
    for i in range(2):
        for name in LINEARS:
            a = ours.get_submodule(f"model.layers.{i}.{name}").weight
            b = ref.get_submodule(f"model.layers.{i}.{name}").weight
            assert type(a).__name__ == "Params4bit", name
            assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), name  # same 4-bit codes
            # bitsandbytes dequantizes our state to exactly jqlora's values (nested 8-bit codes may differ from
            # bitsandbytes' own approximate CPU step, so its own model is only close, see tests/test_quant.py).
            w = ckpt.get(f"model.layers.{i}.{name}.weight")
            mine = quant.dequantize(quant.quantize(w, quant_type, double_quant=double_quant)).astype(jnp.float32)
            np.testing.assert_array_equal(F.dequantize_4bit(a.data, a.quant_state).float().numpy(), np.asarray(mine))
            torch.testing.assert_close(F.dequantize_4bit(a.data, a.quant_state),
                                       F.dequantize_4bit(b.data, b.quant_state), rtol=0.02, atol=0)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits.float(), ref(x).logits.float(), rtol=0, atol=1e-3)


def test_bnb_checkpoint_is_read_as_stored(tiny_bf16, tmp_path):
    """A *-bnb-4bit checkpoint saved by transformers: its 4-bit weights come back bit for bit, not requantized."""
    ref = bnb_reference(tiny_bf16)
    ref.save_pretrained(tmp_path / "bnb")
    ckpt = checkpoints.Checkpoint(tmp_path / "bnb")
    assert ckpt.bnb is not None
    key = "model.layers.1.mlp.down_proj.weight"
    assert ckpt.is_quantized(key) and key in ckpt.keys()
    assert not any(k.endswith((".absmax", ".quant_map")) or ".quant_state." in k for k in ckpt.keys())
    q = ckpt.get(key)
    w = ref.get_submodule("model.layers.1.mlp.down_proj").weight
    np.testing.assert_array_equal(np.asarray(q.codes), w.data.view(torch.uint8).numpy().reshape(-1))
    theirs = F.dequantize_4bit(w.data, w.quant_state).float().numpy()
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q).astype(jnp.float32)), theirs)
    # Through the jqlora format and back: same arrays.
    out = checkpoints.convert(tmp_path / "bnb", tmp_path / "jq")
    _, meta, get, keys = checkpoints.load_jqlora(out)
    assert set(keys) == set(ckpt.keys())
    np.testing.assert_array_equal(np.asarray(quant.dequantize(get(key)).astype(jnp.float32)), theirs)


def _all_tensors(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path / WEIGHTS), "flax") as f:
        return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}


@pytest.mark.parametrize("kind", ["sharded_safetensors", "bin", "sharded_bin"])
def test_every_checkpoint_kind_converts_to_the_same_output(tiny_bf16, tmp_path, kind):
    save = {"sharded_safetensors": dict(max_shard_size="30KB"), "bin": dict(safe_serialization=False),
            "sharded_bin": dict(safe_serialization=False, max_shard_size="30KB")}[kind]
    src = make_model(tmp_path / kind, "llama", torch.bfloat16, save_kwargs=save)
    files = {p.name for p in src.iterdir()}
    assert ("model.safetensors.index.json" in files) == (kind == "sharded_safetensors")
    assert any(n.endswith(".bin") for n in files) == (kind != "sharded_safetensors")
    a = _all_tensors(checkpoints.convert(tiny_bf16, tmp_path / "a"))
    b = _all_tensors(checkpoints.convert(src, tmp_path / "b"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_jqlora_format_reload_equals_direct_quantization(tiny_bf16, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_bf16, src)
    demo_tokenizer = Path(__file__).resolve().parents[2] / "assets" / "demo" / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo_tokenizer / name, src / name)
    out = checkpoints.convert(src, tmp_path / "jq", quant_type="nf4", block_size=32)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    config, meta, get, keys = checkpoints.load_jqlora(out)
    assert meta["quant"] == "nf4" and meta["block_size"] == 32 and config["model_type"] == "llama"
    src = checkpoints.Checkpoint(tiny_bf16)
    for key in keys:
        got = get(key)
        if key.endswith("_proj.weight"):
            ref = quant.quantize(src.get(key), "nf4", block_size=32)
            assert got.shape == ref.shape and got.dtype == "bfloat16"
            np.testing.assert_array_equal(np.asarray(quant.dequantize(got)), np.asarray(quant.dequantize(ref)))
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(src.get(key)))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jqlora.convert", *args], capture_output=True, text=True)


def test_bad_input_gives_one_line_and_no_partial_output(tiny_bf16, tmp_path):
    def fails(args, message, dst):
        r = run_cli(*args, str(dst))
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, r.stderr
        assert "Traceback" not in r.stderr
        assert not dst.exists() or not any(dst.iterdir())
        assert not list(dst.parent.glob(f".{dst.name}.partial-*"))

    empty = tmp_path / "empty"
    empty.mkdir()
    fails([str(empty)], "config.json: missing", tmp_path / "o1")
    (empty / "config.json").write_text("{}")
    fails([str(empty)], "no model weights", tmp_path / "o2")

    trunc = make_model(tmp_path / "trunc", "llama", torch.bfloat16)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    fails([str(trunc)], "model.safetensors", tmp_path / "o3")

    shard = make_model(tmp_path / "shard", "llama", torch.bfloat16, save_kwargs=dict(max_shard_size="30KB"))
    victim = sorted(shard.glob("model-*.safetensors"))[-1]
    victim.unlink()
    fails([str(shard)], victim.name, tmp_path / "o4")

    nan = make_model(tmp_path / "nan", "llama", torch.float32)
    from safetensors.torch import load_file, save_file
    t = load_file(str(nan / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(t, str(nan / "model.safetensors"), metadata={"format": "pt"})
    fails([str(nan)], "model.layers.1.mlp.up_proj.weight: cannot quantize a tensor with non-finite values", tmp_path / "o5")

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    r = run_cli(str(tiny_bf16), str(existing))
    assert r.returncode != 0 and "already exists" in r.stderr
    assert (existing / "keep.txt").read_text() == "precious"


def test_bin_checkpoint_without_torch_is_a_clear_error(tmp_path):
    src = make_model(tmp_path / "bin", "llama", torch.float32, save_kwargs=dict(safe_serialization=False))
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        from jqlora import convert
        sys.exit(convert.main([{str(src)!r}, {str(tmp_path / 'out')!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "need torch" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_streaming_peak_memory_stays_near_one_tensor(tmp_path):
    """Convert a ~250 MB bf16 checkpoint in a fresh process; peak RSS growth must stay far below the model size."""
    src = make_model(tmp_path / "big", "llama", torch.bfloat16, hidden_size=1024, intermediate_size=4096,
                     num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=7, vocab_size=256)
    model_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    code = textwrap.dedent(f"""
        import json, resource, jax, jax.numpy as jnp
        from jqlora import checkpoints, quant
        # Warm up: compile quantization for the shapes involved, so compilation is not counted.
        for shape in [(1024, 1024), (4096, 1024), (1024, 4096)]:
            quant.quantize(jnp.ones(shape, jnp.bfloat16))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        import psutil; now = psutil.Process().memory_info().rss // 1024
        checkpoints.convert({str(src)!r}, {str(tmp_path / 'out')!r})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"growth_kb": peak - max(base, now)}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth = json.loads(r.stdout.strip().splitlines()[-1])["growth_kb"] * 1024
    out_bytes = (tmp_path / "out" / WEIGHTS).stat().st_size
    largest = 4096 * 1024 * 2
    print(f"model {model_bytes / 2**20:.0f} MiB, output {out_bytes / 2**20:.0f} MiB, RSS growth {growth / 2**20:.0f} MiB")
    assert model_bytes > 200 * 2**20
    assert growth < 0.5 * model_bytes, (growth, model_bytes)
    assert growth < out_bytes + 16 * largest, (growth, out_bytes)


def test_sharded_output_equals_single_file_and_loads(tiny_bf16, tmp_path):
    one = checkpoints.convert(tiny_bf16, tmp_path / "one")
    many = checkpoints.convert(tiny_bf16, tmp_path / "many", max_shard_bytes=20_000)
    shards = sorted(many.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (many / "model.safetensors.index.json").is_file()
    assert not (many / WEIGHTS).exists() and not list(many.glob(".shard-*"))
    _, _, get_one, keys_one = checkpoints.load_jqlora(one)
    _, _, get_many, keys_many = checkpoints.load_jqlora(many)
    assert keys_one == keys_many
    for key in keys_one:
        a, b = get_one(key), get_many(key)
        a = quant.dequantize(a) if isinstance(a, quant.QuantizedTensor) else a
        b = quant.dequantize(b) if isinstance(b, quant.QuantizedTensor) else b
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=key)
    # A sharded --format bnb checkpoint loads in transformers too.
    bnb = checkpoints.convert(tiny_bf16, tmp_path / "bnb", fmt="bnb", max_shard_bytes=20_000)
    assert (bnb / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(bnb)
    assert type(model.model.layers[1].mlp.up_proj.weight).__name__ == "Params4bit"
