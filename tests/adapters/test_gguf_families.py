"""GGUF export of Gemma 2, Gemma 3 and Phi-3, read back by transformers' GGUF loader: on our f16 / q8_0 files it gives
the merged model's logits with the matrices rounded as the format rounds them (Gemma's norms come back through its
``w - 1``, Phi-3's fused qkv / gate_up through its own split); the keys llama.cpp reads (soft-caps, windows, which
layers slide, the local RoPE base, LongRoPE factors and attention factor, rotary dims) equal the Hugging Face
config's values, the attention factor as transformers' own LongRoPE computes it; what llama.cpp cannot run is refused
in one line.

transformers' GGUF loader maps only a few of these families' keys into its config (no soft-caps, no
query_pre_attn_scalar, no RoPE scaling, no partial rotary), so it is given the merged checkpoint's config and reads
the tensors from the file; llama.cpp itself reads the keys in tools/llamacpp_check.py.
"""

import shutil

import gguf
import numpy as np
import pytest
import torch
from test_export import randomize_adapters
from test_gguf import REPO_TOKENIZER, X, _rounded_logits
from tiny import make_family_model
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import jqlora
from jqlora import adapters
from jqlora.adapters.errors import ExportError
from jqlora.adapters.gguf import write_gguf
from jqlora.lora import LoraConfig

# llama.cpp scales queries by head_dim^-½ (these layer counts are not its 27B), so query_pre_attn_scalar = head_dim
FAMILIES = {"gemma2": {"query_pre_attn_scalar": 16}, "gemma3": {"query_pre_attn_scalar": 16}, "phi3": {}}


def _tokenizer(dst):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(REPO_TOKENIZER / name, dst / name)


def _load(src, **kw):
    model = jqlora.load_model(src, quant="none", dtype="float32",
                              lora=LoraConfig(r=4, alpha=8, targets="all-linear", **kw))
    randomize_adapters(model)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def merged(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"gguf_{family}")
    _, src = make_family_model(root / "base", family, vocab_size=512, **FAMILIES[family])
    _tokenizer(src)
    model = _load(src, rslora=family == "phi3")
    hf = adapters.merge_to_hf(model, src, root / "merged", dtype="float32")
    return family, src, model, hf, root


def _field(reader, key):
    f = reader.fields[key]
    if len(f.data) > 1 or f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i][0].item() for i in f.data]
    return f.parts[-1][0].item()


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_family_gguf_reads_back_as_the_merged_model(merged, qtype):
    family, src, model, hf, root = merged
    path = write_gguf(model, src, root / qtype, qtype)
    config = AutoConfig.from_pretrained(hf)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(torch.from_numpy(X).long()).logits.numpy()
    want = _rounded_logits(hf, qtype)
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)
    ours = np.asarray(model(np.asarray(X)))
    assert 1e-6 < np.abs(got - ours).max() < (2e-2 if qtype == "f16" else 0.2)  # the rounding itself
    reader = gguf.GGUFReader(path)
    arch = {"gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3"}[family]
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
    c = config.to_dict()
    tensors = {t.name: t for t in reader.tensors}
    if family.startswith("gemma"):
        slides = [t == "sliding_attention" for t in c["layer_types"]]
        assert _field(reader, f"{arch}.attention.sliding_window") == c["sliding_window"]
        assert [bool(v) for v in _field(reader, f"{arch}.attention.sliding_window_pattern")] == slides
        assert _field(reader, f"{arch}.context_length") == c["max_position_embeddings"]
        norm = np.array(tensors["blk.0.attn_norm.weight"].data)  # llama.cpp's w = 1 + Hugging Face's
        hf_norm = AutoModelForCausalLM.from_pretrained(hf).model.layers[0].input_layernorm.weight.detach().numpy()
        np.testing.assert_allclose(norm, hf_norm + 1, rtol=1e-6)
    if family == "gemma2":
        assert _field(reader, "gemma2.attn_logit_softcapping") == pytest.approx(c["attn_logit_softcapping"])
        assert _field(reader, "gemma2.final_logit_softcapping") == pytest.approx(c["final_logit_softcapping"])
        assert "output.weight" not in tensors  # tied: llama.cpp's gemma2 reads the embedding
        theta = c["rope_parameters"]["rope_theta"]  # (one RoPE for all layers: the local layers' base is the same)
        assert _field(reader, "gemma2.rope.freq_base") == _field(reader, "gemma2.rope.freq_base_swa") == theta
    if family == "gemma3":
        rp = c["rope_parameters"]
        assert "gemma3.attn_logit_softcapping" not in reader.fields
        assert _field(reader, "gemma3.rope.freq_base") == pytest.approx(rp["full_attention"]["rope_theta"])
        assert _field(reader, "gemma3.rope.freq_base_swa") == pytest.approx(rp["sliding_attention"]["rope_theta"])
        assert _field(reader, "gemma3.rope.scaling.factor") == pytest.approx(rp["full_attention"]["factor"])
        assert bytes(reader.fields["gemma3.rope.scaling.type"].parts[-1]).decode() == "linear"
    if family == "phi3":
        rp = c["rope_parameters"]
        _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
        assert _field(reader, "phi3.rope.dimension_count") == int(c["head_dim"] * rp["partial_rotary_factor"])
        assert _field(reader, "phi3.rope.scaling.attn_factor") == pytest.approx(attention_factor, rel=1e-6)
        assert _field(reader, "phi3.rope.scaling.original_context_length") == c["original_max_position_embeddings"]
        assert _field(reader, "phi3.context_length") == c["sliding_window"]  # llama.cpp runs Phi-3 without one
        np.testing.assert_array_equal(tensors["rope_factors_long.weight"].data, np.float32(rp["long_factor"]))
        np.testing.assert_array_equal(tensors["rope_factors_short.weight"].data, np.float32(rp["short_factor"]))
        assert tensors["blk.0.attn_qkv.weight"].tensor_type.name == qtype.upper()


@pytest.mark.parametrize("family, overrides, message", [
    ("gemma2", {}, "an attention scale 0.204124 .query_pre_attn_scalar. where llama.cpp's gemma2 uses 0.25"),
    ("gemma2", {"query_pre_attn_scalar": 16, "final_logit_softcapping": None},
     "no attention / final soft-capping, which llama.cpp's gemma2 always applies"),
    ("gemma3", {"query_pre_attn_scalar": 16, "attn_logit_softcapping": 5.0},
     "attention soft-capping, which llama.cpp's gemma3 does not apply"),
])
def test_family_refusals_are_one_line(tmp_path, family, overrides, message):
    _, src = make_family_model(tmp_path / "base", family, vocab_size=512, **overrides)
    _tokenizer(src)
    model = jqlora.load_model(src, quant="none", dtype="float32", lora=LoraConfig(r=2, alpha=4))
    with pytest.raises(ExportError, match=f"^GGUF export of this {family}(_text)? model: {message}") as e:
        write_gguf(model, src, tmp_path / "out", "f16")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
