"""Adapters that peft's own PiSSA and LoftQ made import into jqlora with peft's logits (float32 bases): PiSSA
converted to a plain rank-2r LoRA on the original base (``path_initial_model_for_weight_conversion``) and PiSSA as
trained, rank r on the residual base peft leaves behind; LoftQ (4-bit) on the adjusted base the user saves, in float
and re-quantized to NF4 as a QLoRA run loads it. (jqlora's own lora.init=pissa / loftq:
tests/test_lora_init_model.py.)"""

import contextlib

import bitsandbytes as bnb
import numpy as np
import peft
import pytest
import torch
from tiny import jq_logits, make_family_model, torch_logits
from transformers import AutoModelForCausalLM

from jqlora.adapters import load_model_with_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ids(seed=0, shape=(2, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, shape).astype(np.int32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The checkpoint dir of a tiny float32 Qwen2 (attention biases too) with scaled weights."""
    _, path = make_family_model(tmp_path_factory.mktemp("qwen2") / "hf", "qwen2")
    return path


def fresh(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def train_a_little(model, seed: int) -> None:
    """Move every A and B off its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_peft_pissa_adapters_import(base, tmp_path):
    model = peft.get_peft_model(fresh(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                               init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "pissa_init")  # (A0, B0) before training: what the conversion subtracts
    train_a_little(model, seed=1)
    x = ids()
    want = torch_logits(model.eval(), x)
    assert np.abs(want - torch_logits(fresh(base), x)).max() > 1e-2  # the trained adapter matters
    # converted: a plain LoRA of rank 2r on the original base
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init"))
    ours = load_model_with_adapter(base, tmp_path / "converted", quant="none", dtype="float32")
    assert ours.model.layers.self_attn.q_proj.spec.r == 8
    got = jq_logits(ours, x)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # as trained: rank r on the residual base W - s B0 A0 that peft left in the model
    model.save_pretrained(tmp_path / "adapter")
    model.unload().save_pretrained(tmp_path / "residual")
    ours = load_model_with_adapter(tmp_path / "residual", tmp_path / "adapter", quant="none", dtype="float32")
    assert ours.model.layers.self_attn.q_proj.spec.r == 4
    np.testing.assert_allclose(jq_logits(ours, x), want, atol=1e-4, rtol=0)


@contextlib.contextmanager
def cuda_on_cpu(monkeypatch):
    """peft 0.21's `loftq_init` computes on a hard-coded "cuda" (or "xpu") device; run it on the CPU instead (the same
    code and bitsandbytes' CPU 4-bit quantization)."""

    def on_cpu(to):
        def patched(self, *args, **kw):
            args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
            if isinstance(kw.get("device"), str) and kw["device"].startswith("cuda"):
                kw["device"] = "cpu"
            return to(self, *args, **kw)
        return patched

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "to", on_cpu(torch.Tensor.to))
        m.setattr(bnb.nn.Params4bit, "to", on_cpu(bnb.nn.Params4bit.to))
        yield


def test_peft_loftq_adapter_imports(base, tmp_path, monkeypatch):
    with cuda_on_cpu(monkeypatch):
        model = peft.get_peft_model(fresh(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="loftq",
            loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=1)))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    blocks = q.base_layer.weight.detach().reshape(-1, 64)
    assert max(len(torch.unique(b)) for b in blocks) <= 16  # LoftQ ran: the base is dequantized NF4
    assert q.lora_B["default"].weight.abs().max() > 0  # and the adapter holds the residual's low-rank part
    train_a_little(model, seed=2)
    x = ids(1)
    want = torch_logits(model.eval(), x)
    model.save_pretrained(tmp_path / "adapter")
    model.unload().save_pretrained(tmp_path / "loftq_base")  # the adjusted base: dequantized NF4 (no double quant)
    got = jq_logits(load_model_with_adapter(tmp_path / "loftq_base", tmp_path / "adapter", quant="none",
                                            dtype="float32"), x)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # the adjusted base re-quantized to NF4 (blocks of 64, no double quant: LoftQ's own) is the same base
    nf4 = load_model_with_adapter(tmp_path / "loftq_base", tmp_path / "adapter", quant="nf4", double_quant=False,
                                  dtype="float32")
    np.testing.assert_allclose(jq_logits(nf4, x), want, atol=1e-4, rtol=0)
