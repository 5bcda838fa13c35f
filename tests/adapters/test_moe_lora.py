"""LoRA on the MoE experts (``lora.experts``: peft's ``target_parameters`` on transformers' fused 3-D
``gate_up_proj`` / ``down_proj``) against peft and transformers: exported keys and shapes equal
``get_peft_model_state_dict``'s, peft reproduces our logits (float32 and NF4 bases), a peft-made adapter imports,
one step's adapter gradients equal peft's (torch autograd), the compiled dispatch FLOPs still scale with top-k, and
the merged export equals the adapter."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file
from tiny import jq_logits, make_moe_model, moe_block_dots, torch_logits
from transformers import AutoModelForCausalLM

import jqlora
from jqlora import planning
from jqlora.config import ConfigError, load_config
from jqlora.lora import LoraConfig, LoraLinear, QuantSpec
from jqlora.models import ModelConfig, moe
from jqlora.adapters import load_model_with_adapter, save_adapter
from jqlora.adapters.experts import TARGET_PARAMETERS, to_peft
from jqlora import adapters
from jqlora import checkpoints

SEQ = 20
LORA = LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear", experts=True)
ATTENTION = ["k_proj", "o_proj", "q_proj", "v_proj"]


def ids(seed=0, shape=(2, SEQ)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, shape).astype(np.int32)


def randomize(model, seed: int, scale: float = 0.2) -> None:
    """Nonzero random A and B in every adapter, the experts' included (B = 0 would hide any layout mistake)."""
    key = jax.random.key(seed)
    for i, (_, m) in enumerate(nnx.iter_modules(model)):
        if isinstance(m, (LoraLinear, moe.ExpertLora)) and m.lora_a is not None:
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            m.lora_a.set_value(scale * jax.random.normal(ka, m.lora_a.shape, m.lora_a.dtype))
            m.lora_b.set_value(scale * jax.random.normal(kb, m.lora_b.shape, m.lora_b.dtype))


def zero_expert_b(model) -> None:
    for _, m in nnx.iter_modules(model):
        if isinstance(m, moe.ExpertLora):
            m.lora_b.set_value(jnp.zeros_like(m.lora_b[...]))


def peft_config(**kw) -> peft.LoraConfig:
    return peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=ATTENTION,
                           target_parameters=list(TARGET_PARAMETERS), **kw)


def set_experts(hf_model, ours) -> None:
    """Our (dequantized) expert kernels into transformers' fused ``gate_up_proj`` / ``down_proj``."""
    graphdef, state = nnx.split(ours.model.layers)
    with torch.no_grad():
        for i, hl in enumerate(hf_model.model.layers):
            mine = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)).mlp.experts
            g, u, d = (torch.from_numpy(np.array(m.kernel())) for m in (mine.gate_proj, mine.up_proj, mine.down_proj))
            hl.mlp.experts.gate_up_proj.copy_(torch.cat([g, u], dim=1))
            hl.mlp.experts.down_proj.copy_(d)


def base_model(base_dir, ours, quant: str):
    """transformers' model of ``base_dir`` (a bnb-format export for NF4, its experts set to ours, dequantized:
    transformers quantizes nn.Linear modules only); train() for bitsandbytes' exact CPU path (no dropout here)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    if quant == "nf4":
        set_experts(model, ours)
    return model.train() if quant == "nf4" else model.eval()


def check_export(ours, path, base_dir, quant, out) -> np.ndarray:
    """Keys and shapes equal peft's own state dict for target_modules + target_parameters, and peft's model on the
    HF base reproduces our logits (1e-4 float32; 1e-3 on the NF4 base, transformers + bitsandbytes). Returns the
    logits."""
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == TARGET_PARAMETERS and cfg["target_modules"] == ATTENTION
    assert cfg["lora_dropout"] == 0.0 and not cfg["use_dora"]
    want = peft.get_peft_model_state_dict(peft.get_peft_model(base_model(base_dir, ours, quant), peft_config()))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    assert all(tuple(got[k].shape) == tuple(want[k].shape) for k in want)
    assert any(".mlp.experts.base_layer.lora_A" in k for k in want)
    x = ids(2)
    expected = jq_logits(ours, x)
    theirs = peft.PeftModel.from_pretrained(base_model(base_dir, ours, quant), str(out))
    theirs.train() if quant == "nf4" else theirs.eval()
    np.testing.assert_allclose(torch_logits(theirs, x), expected, atol=1e-4 if quant == "none" else 1e-3, rtol=0)
    return expected


def test_export_and_gradients_equal_peft(tmp_path):
    """Mixtral, float32 base: the export equals peft's (`check_export`), and one batch's mean next-token
    cross-entropy gives every expert adapter the gradient peft's model gets from torch autograd."""
    hf, path = make_moe_model(tmp_path / "hf", "mixtral")
    ours = jqlora.load_model(path, quant="none", dtype="float32", lora=LORA, remat="none")
    randomize(ours, seed=1, scale=0.1)
    out = save_adapter(ours, tmp_path / "ad", lora_config=LORA, base_model_name_or_path=str(path))
    check_export(ours, path, path, "none", out)

    theirs = peft.PeftModel.from_pretrained(hf, str(out), is_trainable=True).eval()
    x = ids(4)
    logits = theirs(torch.from_numpy(x).long()).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             torch.from_numpy(x[:, 1:]).long().reshape(-1))
    loss.backward()
    torch_grads = {n.replace(".default", ""): p.grad.numpy() for n, p in theirs.named_parameters()
                   if "experts" in n and p.grad is not None}

    graphdef, lora_state, rest = nnx.split(ours, nnx.LoRAParam, ...)

    def loss_fn(s):
        lg = nnx.merge(graphdef, s, rest)(jnp.asarray(x))
        logp = jax.nn.log_softmax(lg[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(x[:, 1:])[..., None], axis=-1))

    our_loss, grads = jax.value_and_grad(loss_fn)(lora_state)
    np.testing.assert_allclose(float(our_loss), loss.item(), atol=1e-5, rtol=0)
    experts = grads["model"]["layers"]["mlp"]["experts"]
    checked = 0
    for name, module in (("gate_up_lora", "mlp.experts.base_layer"), ("down_lora", "mlp.experts")):
        ga, gb = (np.asarray(experts[name][n][...]) for n in ("lora_a", "lora_b"))
        for i in range(ga.shape[0]):
            A, B = to_peft(ga[i], gb[i])
            stem = f"base_model.model.model.layers.{i}.{module}"
            for got, key in ((A, f"{stem}.lora_A.weight"), (B, f"{stem}.lora_B.weight")):
                want = torch_grads[key]
                assert np.abs(want).max() > 1e-4  # the expert adapters do receive gradients
                np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=1e-3)
                checked += 1
    assert checked == 8


def test_nf4_export_and_merge_equal_peft_and_transformers(tmp_path):
    """Qwen3-MoE, NF4 + DQ base: peft on transformers + bitsandbytes reproduces our logits (1e-3), and the merged
    export (expert deltas included) loads in transformers and equals the adapter's logits."""
    _, path = make_moe_model(tmp_path / "hf", "qwen3_moe")
    ours = jqlora.load_model(path, quant="nf4", dtype="float32", lora=LORA, remat="none")
    randomize(ours, seed=3, scale=0.1)
    out = save_adapter(ours, tmp_path / "ad", lora_config=LORA, base_model_name_or_path=str(path))
    bnb_dir = checkpoints.convert(path, tmp_path / "bnb", fmt="bnb", dtype="float32")
    expected = check_export(ours, path, bnb_dir, "nf4", out)
    merged_dir = adapters.merge_to_hf(ours, path, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, attn_implementation="eager")
    np.testing.assert_allclose(torch_logits(merged.eval(), ids(2)), expected, atol=1e-4, rtol=0)
    zero_expert_b(ours)
    assert np.abs(jq_logits(ours, ids(2)) - expected).max() > 1e-2  # the expert adapters matter


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_peft_made_adapter_imports(family, tmp_path):
    """peft's own adapter (target_modules + target_parameters, random B) imports, gives peft's logits and is
    written back tensor for tensor."""
    hf, path = make_moe_model(tmp_path / "hf", family)
    made = peft.get_peft_model(hf, peft_config())
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.2)
    made.save_pretrained(tmp_path / "peft_made")
    ours = load_model_with_adapter(path, tmp_path / "peft_made", quant="none", dtype="float32")
    assert ours.lora_config.experts and ours.lora_config.dropout == 0
    x = ids(3)
    np.testing.assert_allclose(jq_logits(ours, x), torch_logits(made.eval(), x), atol=1e-4, rtol=0)
    again = load_file(str(save_adapter(ours, tmp_path / "back") / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "peft_made" / "adapter_model.safetensors"))
    assert sorted(again) == sorted(theirs)
    for k in theirs:
        np.testing.assert_allclose(again[k].numpy(), theirs[k].numpy(), atol=1e-6, rtol=0)


def _adapter_dot_flops(E: int, k: int, r: int, T: int = 128, D: int = 64, F: int = 128) -> float:
    """FLOPs of the adapter dots (those with the rank r among their output or contracted dims; r matches no other
    dim) in one MoE block's compiled forward HLO."""
    dots = moe_block_dots(E, k, T, D, F, LoraConfig(r=r, alpha=8, experts=True))
    return sum(2.0 * np.prod(out) * np.prod(c) for out, c in dots if r in out or r in c)


def test_expert_lora_flops_scale_with_top_k_not_experts():
    T, D, F, r = 128, 64, 128, 3
    sparse = lambda k: 2.0 * T * k * r * (D + 2 * F + F + D)  # the adapter dots on the chosen experts only
    dense = lambda E: 2.0 * T * E * r * (D + 2 * F + F + D)
    f4, f16, f16k2 = (_adapter_dot_flops(E, k, r) for E, k in ((4, 1), (16, 1), (16, 2)))
    for flops, k in ((f4, 1), (f16, 1), (f16k2, 2)):
        assert sparse(k) <= flops <= 2.2 * sparse(k), (flops, sparse(k))  # (tile padding: at most ~2x)
    assert f16 < dense(16) / 6
    assert f16 / f4 < 1.2  # 4x the experts: the same adapter work
    assert 1.8 < f16k2 / f16 < 2.2  # 2x top-k: twice the work


def test_plan_counts_expert_adapters_and_config_errors():
    cfg = ModelConfig(model_type="mixtral", vocab_size=8, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                      num_experts_per_tok=2)
    from jqlora.models.decoder import CausalLM

    for experts in (False, True):
        lora = LoraConfig(r=4, alpha=8, experts=experts)
        model = nnx.eval_shape(lambda lora=lora: CausalLM(cfg, lora=lora, quant=QuantSpec("none"), rngs=nnx.Rngs(0)))
        n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
        assert planning.lora_param_count(cfg, 4, planning.LINEARS, experts) == n
    for override, key in (("lora.dropout=0.05", "lora.dropout"), ("lora.dora=true", "lora.dora"),
                          ("lora.init=pissa", "lora.init")):
        args = ["lora.experts=true", override] + (["lora.dropout=0"] if key != "lora.dropout" else [])
        with pytest.raises(ConfigError, match=re.escape(key)) as e:
            load_config(None, args)
        assert "\n" not in str(e.value) and "experts" in str(e.value)


def test_unsupported_expert_adapters_are_one_clear_line(tmp_path):
    """peft's own all-linear on a MoE model also adapts the router (``mlp.gate.weight``), which jqlora keeps frozen;
    expert adapters with dropout are what peft refuses too."""
    from jqlora.adapters import AdapterError, read_adapter_config

    hf, _ = make_moe_model(tmp_path / "hf", "qwen3_moe", num_hidden_layers=1)
    made = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    assert "gate.weight" in made.peft_config["default"].target_parameters
    made.save_pretrained(tmp_path / "all_linear")
    with pytest.raises(AdapterError, match=r"adapts the MoE router \(gate\.weight") as e:
        read_adapter_config(tmp_path / "all_linear")
    assert "\n" not in str(e.value) and "adapter_config.json" in str(e.value)
    cfg_path = tmp_path / "all_linear" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(target_parameters=list(TARGET_PARAMETERS), lora_dropout=0.1)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="lora_dropout=0.1"):
        read_adapter_config(tmp_path / "all_linear")
