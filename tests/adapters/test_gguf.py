"""GGUF export, read back by an independent reader: transformers' GGUF loader (``from_pretrained(..., gguf_file=)``,
which dequantizes with the gguf package and undoes llama.cpp's q/k row order) on our f16 / q8_0 files gives the
logits of the merged model with its matrices rounded as the format rounds them (float16; Q8_0 blocks), per family;
the tokenizer it rebuilds from the file's metadata gives the same ids as the Hugging Face tokenizer and the same chat
template; refusals are one line.

Tiny random models (tests/tiny.py, vocab 512) with the test tokenizer (tests/fixtures/tokenizer: a byte-level BPE);
for Llama its pre-tokenizer is swapped for Llama 3's split, for Qwen2 / Qwen3 for Qwen 2's split with NFC (what
those models ship). Qwen3 uses head_dim 128: transformers' GGUF loader does not read Qwen3's key length and assumes
Qwen3's 128 (llama.cpp reads ``attention.key_length``).
"""

import json
import shutil

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_export import randomize_adapters
from tiny import make_model, make_moe_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

import jqlora
from jqlora import adapters, export
from jqlora.adapters.errors import ExportError
from jqlora.adapters.gguf import llama3_rope_factors, write_gguf
from jqlora.adapters.gguf_vocab import LLAMA3_SPLIT
from jqlora.adapters.gguf_vocab import QWEN2_SPLIT as OUR_QWEN2_SPLIT
from jqlora.lora import LoraConfig
from jqlora.models.config import RopeConfig

REPO_TOKENIZER = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer"
TEXT = "Hello world, what is 12 plus 30?\n\n<|im_start|>user  it's 42!<|im_end|> café\t ok"
X = np.random.default_rng(0).integers(0, 512, (2, 12)).astype(np.int32)
FAMILIES = {  # family: (make_model overrides, tokenizer split regex, NFC)
    "llama": ({}, _LLAMA3_SPLIT, False),
    "mistral": ({"sliding_window": 12}, None, False),  # X's length: the window is the GGUF's context
    "qwen2": ({}, QWEN2_SPLIT, True),
    "qwen3": ({"head_dim": 128}, QWEN2_SPLIT, True),
}


def _tokenizer(dst, split, nfc):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(REPO_TOKENIZER / name, dst / name)
    if split is not None:
        tj = json.loads((dst / "tokenizer.json").read_text())
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
        if nfc:
            tj["normalizer"] = {"type": "NFC"}
        (dst / "tokenizer.json").write_text(json.dumps(tj))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def merged(request, tmp_path_factory):
    """(family, base dir, jqlora model with random adapters, the merged float32 HF checkpoint)."""
    family = request.param
    overrides, split, nfc = FAMILIES[family]
    root = tmp_path_factory.mktemp(f"gguf_{family}")
    src = make_model(root / "base", family, torch.float32, vocab_size=512, **overrides)
    _tokenizer(src, split, nfc)
    model = jqlora.load_model(src, quant="none", dtype="float32",
                              lora=LoraConfig(r=4, alpha=8, targets="all-linear", rslora=family == "qwen3"))
    randomize_adapters(model)
    hf = adapters.merge_to_hf(model, src, root / "merged", dtype="float32")
    return family, src, model, hf, root


def _rounded_logits(hf_dir, qtype):
    """The merged checkpoint's logits with every matrix rounded as ``qtype`` stores it (vectors stay float32)."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 2:
                w = p.numpy()
                if qtype == "f16":
                    r = w.astype(np.float16).astype(np.float32)
                elif qtype == "bf16":
                    r = p.detach().to(torch.bfloat16).float().numpy()
                else:  # Q8_0: blocks of 32 along a row, as llama.cpp's reference quantizer (gguf.quants) makes them
                    r = gguf.dequantize(gguf.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                        gguf.GGMLQuantizationType.Q8_0).reshape(w.shape)
                p.copy_(torch.from_numpy(np.ascontiguousarray(r)))
        return model(torch.from_numpy(X).long()).logits.numpy()


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_gguf_reads_back_as_the_merged_model(merged, qtype):
    family, src, model, hf, root = merged
    path = write_gguf(model, src, root / qtype, qtype)
    assert path.name == f"model-{qtype}.gguf"
    assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile", path.name]
    modelfile = (path.parent / "Modelfile").read_text()  # (the test tokenizer's ChatML template: test_ollama.py)
    assert modelfile.startswith(f"FROM ./{path.name}\nTEMPLATE \"\"\"{{{{ range .Messages }}}}<|im_start|>")
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(torch.from_numpy(X).long()).logits.numpy()
    want = _rounded_logits(hf, qtype)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    ours = np.asarray(model(jnp.asarray(X)))  # the format's rounding itself: small, and not zero
    err = np.abs(got - ours).max()
    assert 1e-6 < err < (2e-3 if qtype == "f16" else 2e-2), err
    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    context = int(reader.fields[f"{arch}.context_length"].parts[-1][0])
    assert context == (12 if family == "mistral" else 256)  # (tiny.py's max_position_embeddings)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == qtype.upper() and types["output_norm.weight"] == "F32"
    # the tokenizer rebuilt from the file's metadata: same ids, same chat template
    ref = AutoTokenizer.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tok(TEXT)["input_ids"] == ref(TEXT)["input_ids"]
    assert tok.chat_template == ref.chat_template and tok.eos_token == ref.eos_token


def test_split_regexes_are_the_ones_transformers_uses():
    assert LLAMA3_SPLIT == _LLAMA3_SPLIT and OUR_QWEN2_SPLIT == QWEN2_SPLIT


def test_llama3_rope_factors_match_transformers():
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=512, rope_parameters=params)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    default = 1.0 / 10000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64)
    r = RopeConfig(rope_type="llama3", theta=10000.0, factor=8.0, original_max_position_embeddings=64)
    ours = llama3_rope_factors(r, 64)
    assert len(set(ours.round(4))) > 2  # the smooth band is met: not only 1 and 8
    np.testing.assert_allclose(default / ours, scaled.numpy(), rtol=1e-6)


def test_refusals_are_one_line(tmp_path):
    _, src = make_moe_model(tmp_path / "mixtral", "mixtral", vocab_size=512)
    _tokenizer(src, None, False)
    model = jqlora.load_model(src, quant="none", dtype="float32", lora=LoraConfig(r=2, alpha=4))
    with pytest.raises(ExportError, match="^GGUF export of model_type 'mixtral' is not supported"):
        write_gguf(model, src, tmp_path / "o1", "f16")
    if shutil.which("llama-quantize") is None:
        with pytest.raises(ExportError, match="--gguf q4_k_m needs llama.cpp's llama-quantize on PATH"):
            write_gguf(model, src, tmp_path / "o2", "q4_k_m")
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    lo = make_model(tmp_path / "llama", "llama", torch.float32, vocab_size=512)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, lo / name)
    model = jqlora.load_model(lo, quant="none", dtype="float32", lora=LoraConfig(r=2, alpha=4))
    with pytest.raises(ExportError, match="a pre-tokenizer llama.cpp has no built-in twin"):
        write_gguf(model, lo, tmp_path / "o3", "f16")
    tj["model"]["byte_fallback"] = True
    (lo / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ExportError, match="transformers tokenizes with Metaspace prepend_scheme 'always'"):
        write_gguf(model, lo, tmp_path / "o4", "f16")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4"))


def test_cli_writes_gguf_from_an_adapter_bf16_and_refuses_in_one_line(tmp_path, capsys):
    src = make_model(tmp_path / "base", "llama", torch.float32, vocab_size=512)
    _tokenizer(src, None, False)
    model = jqlora.load_model(src, quant="none", dtype="float32", lora=LoraConfig(r=4, alpha=16))
    randomize_adapters(model, seed=3)
    adapter = adapters.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(src))
    assert export.main([str(adapter), str(tmp_path / "g"), "--gguf", "q8_0", "--quant", "none"]) == 0
    assert "model-q8_0.gguf" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model-q8_0.gguf",
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(torch.from_numpy(X).long()).logits.numpy()
    assert np.abs(got - np.asarray(model(jnp.asarray(X)))).max() < 2e-2
    # bf16 (on the same model): the merged model with its matrices rounded to bfloat16
    path = write_gguf(model, src, tmp_path / "b", "bf16")
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(torch.from_numpy(X).long()).logits.numpy()
    hf = adapters.merge_to_hf(model, src, tmp_path / "merged", dtype="float32")
    np.testing.assert_allclose(got, _rounded_logits(hf, "bf16"), atol=2e-5, rtol=0)
    capsys.readouterr()  # (transformers' progress bars)
    for args, message in [(["--gguf", "q3_k"], "--gguf 'q3_k': expected one of f16, bf16, q8_0"),
                          (["--gguf", "f16", "--merge"], "--gguf writes a merged model in its own TYPE")]:
        assert export.main([str(adapter), str(tmp_path / "x"), "--quant", "none", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
