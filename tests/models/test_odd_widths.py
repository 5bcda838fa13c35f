"""NF4 + double quantization at kernel widths that are not multiples of 64 (blocks of 64 then straddle rows, and
the last block of a kernel is partial), where bitsandbytes' CPU 4-bit matmul is no oracle: jqlora's 4-bit model
against transformers in float64 with each kernel dequantized by the float64 oracle of the flat-block layout
(tests/tiny.py `nf4_dq_float64`), for one family of each kind."""

import numpy as np
import pytest
import torch
import transformers
from tiny import BASE, FAMILIES, FAMILY_CONFIGS, MOE_CONFIGS, jq_logits, nf4_dq_float64_model

import jqlora

# hidden 80, intermediate 150, head_dim 20: no kernel width is a multiple of 64; [80, 150] and [150, 80] kernels
# hold 12000 values, 187.5 blocks of 64
ODD = {"hidden_size": 80, "intermediate_size": 150, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 20}
EXTRA = {
    "llama": {},
    "gemma2": {},
    "gemma3": {},
    # rotary dims 20 · 0.5 = 10: five LongRoPE factors
    "phi3": {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "short_factor": [1.0, 1.3, 2.1, 3.7, 5.0],
                                 "long_factor": [1.1, 2.5, 6.0, 17.0, 30.0]}},
    "mixtral": {},
}
CONFIGS = {**FAMILIES, **FAMILY_CONFIGS, **MOE_CONFIGS}
SEQ = 20


def make_odd(path, family: str):
    """A tiny random ``family`` model at the odd widths, kernels ~ 1/sqrt(fan-in), norms off neutral, saved."""
    cls, extra = CONFIGS[family]
    config = cls(**{**BASE, **extra, **ODD, **EXTRA[family]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(  # eager experts: grouped_mm needs 16-byte strides
        config, attn_implementation="eager", experts_implementation="eager").float().eval()
    neutral = 0.0 if family.startswith("gemma") else 1.0  # Gemma norms scale by (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(neutral + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", list(EXTRA))
def test_nf4_double_quant_odd_widths_match_float64_oracle(family, tmp_path):
    hf = make_odd(tmp_path / "hf", family)
    x = np.random.default_rng(0).integers(0, 128, (2, SEQ)).astype(np.int32)
    with torch.no_grad():
        plain = hf(torch.from_numpy(x).long()).logits.double().numpy()
        expected = nf4_dq_float64_model(hf)(torch.from_numpy(x).long()).logits.numpy()
    ours = jqlora.load_model(tmp_path / "hf", quant="nf4", double_quant=True, dtype="float32", remat="none")
    got = jq_logits(ours, x)
    assert np.abs(expected - plain).max() > 1e-2  # the quantization matters at this scale
    # (measured ~3e-6; the same model without double quantization is off by >1e-2)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
