"""`--gguf-adapter`: the LoRA GGUF, read back with gguf.GGUFReader and applied as llama.cpp applies it
(``alpha / r · B A`` with the file's one alpha and each tensor's own rank, q / k rows back in Hugging Face order by
transformers' own GGUF reverse permutation), is peft's delta (its scaling and weights, float64) of every module, for
an adapter with per-layer ranks, patterned alphas and rsLoRA; a file written with the file-level scaling alone (what
llama.cpp's converter does) is not; DoRA is refused in one line with the pointer to --gguf."""

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from test_export import randomize_adapters
from tiny import make_model
from transformers import AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

import jqlora
from jqlora import adapters, export
from jqlora.adapters.errors import ExportError
from jqlora.adapters.gguf_adapter import write_gguf_adapter
from jqlora.lora import LoraConfig

LORA = LoraConfig(r=4, alpha=8, rslora=True, targets="all-linear",
                  rank_pattern={"model.layers.1.self_attn.q_proj": 2, "v_proj": 6},
                  alpha_pattern={"model.layers.0.mlp.down_proj": 3, "k_proj": 5})


def _read(path):
    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    kind = bytes(reader.fields["adapter.type"].parts[-1]).decode()
    return alpha, kind, {t.name: np.array(t.data, dtype=np.float64) for t in reader.tensors}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_gguf_is_peft_delta_for_every_module(tmp_path, capsys, family):
    src = make_model(tmp_path / "base", family, torch.float32)
    model = jqlora.load_model(src, quant="none", dtype="float32", lora=LORA)
    randomize_adapters(model, seed=1, scale=0.2)
    adapter = adapters.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(src))
    assert export.main([str(adapter), str(tmp_path / "g"), "--gguf-adapter"]) == 0
    alpha, kind, tensors = _read(tmp_path / "g" / "adapter-f32.gguf")
    assert kind == "lora" and alpha == LORA.alpha
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, adapter)
    cfg = hf.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.upper()], cfg.num_hidden_layers)
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": cfg.num_attention_heads,
                                             "num_key_value_heads": cfg.num_key_value_heads})
    seen, naive_err = set(), 0.0
    for module_name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        a64, b64 = (getattr(module, f"lora_{x}")["default"].weight.detach().double().numpy() for x in "AB")
        want = module.scaling["default"] * (b64 @ a64)  # peft's delta (its scaling_m, its weights) in float64
        np.testing.assert_allclose(module.get_delta_weight("default").double().numpy(), want, atol=1e-6)
        base = names.get_name(module_name + ".weight", try_suffixes=(".weight",))
        a, b = tensors[f"{base}.lora_a"], tensors[f"{base}.lora_b"]
        r = a.shape[0]
        got = alpha / r * (b @ a)  # llama.cpp: the file's alpha over this tensor's rank
        if family == "llama" and module_name.endswith(("q_proj", "k_proj")):
            got = unpermute.process(got.astype(np.float32), base).weights.astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=module_name)
        assert r == module.r["default"]
        seen.add(base)
        # what one alpha / r per file gives without the folding: wrong wherever the scaling differs from alpha / r
        naive = alpha / r * (b64 @ a64)
        naive_err = max(naive_err, float(np.abs(naive - want).max()))
    assert {k.rsplit(".", 1)[0] for k in tensors} == seen and len(seen) == 7 * cfg.num_hidden_layers
    assert naive_err > 1e-2


def test_dora_is_refused_in_one_line(tmp_path):
    src = make_model(tmp_path / "base", "llama", torch.float32)
    model = jqlora.load_model(src, quant="none", dtype="float32", lora=LoraConfig(r=2, alpha=4, dora=True))
    with pytest.raises(ExportError, match=r"^--gguf-adapter: llama.cpp has no DoRA .*with --gguf instead$"):
        write_gguf_adapter(model, tmp_path / "g")
    assert not (tmp_path / "g").exists()
