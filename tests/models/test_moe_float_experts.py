"""model.quantize_experts: transformers 5 + bitsandbytes quantizes only nn.Linear, so it leaves the fused 3-D MoE
experts float; jqlora stores them NF4 by default (memory) and keeps them in the model dtype with
quantize_experts=false, which is then transformers + bitsandbytes' model exactly. The plan counts either."""

import math
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny import MOE_CONFIGS, bnb_model, jq_logits, make_moe_model, torch_logits

import jqlora
from jqlora import planning
from jqlora.models import ModelConfig

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
EXPERT_VARS = ("weight", "codes", "absmax", "nested_absmax", "offset")


@pytest.fixture(scope="module", params=list(MOE_CONFIGS))
def fam(request, tmp_path_factory):
    _, path = make_moe_model(tmp_path_factory.mktemp(request.param) / "hf", request.param)
    return request.param, path


def expert_bytes(model) -> int:
    """Bytes of every expert variable the loaded model holds (all layers, all experts)."""
    ex = model.model.layers.mlp.experts
    total = 0
    for name in ("gate_proj", "up_proj", "down_proj"):
        for var in EXPERT_VARS:
            v = getattr(getattr(ex, name), var, None)
            if v is not None:
                a = v.get_value()
                total += a.size * a.dtype.itemsize
    return total


def test_float_experts_equal_transformers_bitsandbytes_and_the_plan_counts_them(fam):
    family, path = fam
    ref = bnb_model(path)  # transformers 5 + bitsandbytes 4-bit: NF4 + DQ attention, float experts
    assert ref.model.layers[0].mlp.experts.gate_up_proj.dtype.is_floating_point
    x = np.random.default_rng(1).integers(0, 128, (2, 20)).astype(np.int32)
    expected = torch_logits(ref, x)
    floats = jqlora.load_model(path, quant="nf4", dtype="float32", quantize_experts=False)
    gate = floats.model.layers.mlp.experts.gate_proj
    assert getattr(gate, "codes", None) is None and gate.weight.get_value().dtype == np.float32
    assert floats.model.layers.self_attn.q_proj.codes is not None  # the attention is still NF4 + DQ
    got = jq_logits(floats, x)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)  # (measured 3e-6: float32 rounding)
    packed = jqlora.load_model(path, quant="nf4", dtype="float32")
    assert packed.model.layers.mlp.experts.gate_proj.nested_absmax is not None
    err = float(np.abs(jq_logits(packed, x) - expected).max())
    # with NF4 experts the difference is the experts' NF4 error (measured 0.92 mixtral, 1.33 qwen3_moe)
    print(f"{family}: |float experts - bnb| {np.abs(got - expected).max():.2e}, |NF4 experts - bnb| {err:.2e}")
    assert err > 1e-2  # (the tiny random router amplifies it: a token may pick another expert)

    # the plan's expert bytes are what the loaded model holds: the exact float size, or each expert's NF4 + DQ
    cfg = ModelConfig.from_hf(path)
    L, E, D, F = cfg.num_hidden_layers, cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    w_float = planning.weight_bytes(cfg, dtype_bytes=4, quantize_experts=False)
    w_nf4 = planning.weight_bytes(cfg, dtype_bytes=4)
    assert w_float["experts"] == expert_bytes(floats) == L * E * 3 * D * F * 4
    assert w_nf4["experts"] == expert_bytes(packed)
    assert w_float["total"] - w_nf4["total"] == w_float["experts"] - w_nf4["experts"]
    assert w_float["quantized"] == w_nf4["quantized"] - w_nf4["experts"]


def test_training_config_loads_float_experts(fam, tmp_path):
    """The run config's key reaches the loader (jqlora.run.model) and a PiSSA start leaves the experts float."""
    from jqlora.config import load_config
    from jqlora.run.model import build_model

    _, path = fam
    cfg = load_config(None, [f"model.path={path}", "model.quantize_experts=false", "lora.init=pissa",
                             f"output_dir={tmp_path / 'run'}"])
    model = build_model(cfg)
    ex = model.model.layers.mlp.experts
    assert getattr(ex.down_proj, "codes", None) is None and ex.down_proj.weight.get_value().dtype == np.float32
    assert model.model.layers.self_attn.o_proj.codes is not None


def _plan(*overrides: str) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-m", "jqlora.plan", "--config", str(REPO / "configs/mixtral-8x7b.yaml"),
                          "--model", "mixtral-8x7b", *overrides], capture_output=True, text=True, cwd=REPO)
    return out.returncode, out.stdout + out.stderr


def test_plan_cli_counts_float_experts_for_mixtral_8x7b():
    """python -m jqlora.plan with model.quantize_experts=false: the base weights grow by exactly the experts' bf16
    size less their NF4 + DQ size (32 layers · 8 experts · 3 kernels of 4096 × 14336, from the published shape)."""
    rc_nf4, nf4 = _plan()
    rc_float, floats = _plan("model.quantize_experts=false")
    assert rc_nf4 == 0 and rc_float == 0, floats
    n = 4096 * 14336  # one expert kernel
    blocks = n // 64
    count = 32 * 8 * 3
    bf16 = count * n * 2
    nf4_dq = count * (n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4)  # codes, 8-bit scales, nested, offset
    row = r"base weights \(4-bit \+ bfloat16\)\s+([\d.]+) GB"
    grew = float(re.search(row, floats).group(1)) - float(re.search(row, nf4).group(1))
    assert abs(grew - (bf16 - nf4_dq) / 1e9) <= 0.011, (grew, floats)
    assert f"the MoE experts stay bfloat16, {bf16 / 1e9:.2f} GB (4-bit: {nf4_dq / 1e9:.2f} GB)" in floats
    assert "quantize_experts" not in nf4
