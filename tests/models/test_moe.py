"""Sparse MoE families (Mixtral, Qwen3-MoE) against transformers, bitsandbytes and peft: the router picks the same
experts, the dispatch's compiled matmul FLOPs scale with top-k and not with the number of experts, NF4 experts,
bnb-4bit checkpoints, adapters on attention (on the experts: test_moe_lora.py), generation and the training
invariants."""

import json
from pathlib import Path

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file
from tiny import MOE_CONFIGS, bnb_model, jq_logits, make_moe_model, moe_block_dots, randomize_lora, torch_logits
from transformers import AutoModelForCausalLM

import jqlora
from jqlora.training import step
from jqlora import quant as qmod
from jqlora.lora import LoraConfig
from jqlora.models import ModelConfig, hf_key_table, moe
from jqlora.adapters import load_model_with_adapter, save_adapter
from jqlora import adapters, checkpoints, planning
from jqlora.models import decode

FAMILIES = list(MOE_CONFIGS)
SEQ = 20  # > Mixtral's tiny window (12)
LORA = LoraConfig(r=4, alpha=8, targets="all-linear")  # all-linear = the attention projections (see mixtral.py)


def ids(seed=0, shape=(2, SEQ)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, shape).astype(np.int32)






def layer(model, i: int):
    """Layer ``i`` of the stacked layers as a module of its own."""
    graphdef, state = nnx.split(model.model.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))




@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory):
    """(family, transformers float32 model, checkpoint dir)."""
    hf, path = make_moe_model(tmp_path_factory.mktemp(request.param) / "hf", request.param)
    return request.param, hf, path


# ----------------------------------------------------------------------------------------------------------------
# Router, dispatch, logits


def test_router_experts_and_logits_match_transformers(fam):
    _, hf, path = fam
    model = jqlora.load_model(path, quant="none", dtype="float32", remat="none")
    x = ids()
    expected = torch_logits(hf, x)
    np.testing.assert_allclose(jq_logits(model, x), expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 1.0
    h = torch.randn(2, SEQ, 64)
    for i in range(2):
        block = hf.model.layers[i].mlp
        with torch.no_grad():
            logits, w, e = block.gate(h.reshape(-1, 64))
            want = block(h).numpy()
        ours = layer(model, i).mlp
        our_logits = ours.gate(jnp.asarray(h.numpy().reshape(-1, 64)))
        np.testing.assert_allclose(np.asarray(our_logits), logits.numpy(), atol=1e-5, rtol=0)
        our_w, our_e = moe.route(our_logits, 2, model.config.norm_topk_prob)
        np.testing.assert_array_equal(np.asarray(our_e), e.numpy())  # the same experts, in the same order
        np.testing.assert_allclose(np.asarray(our_w), w.float().numpy(), atol=1e-6, rtol=0)
        assert len(np.unique(e.numpy())) == 4  # every expert is used
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray(h.numpy()))), want, atol=1e-5, rtol=0)


def test_qwen3_moe_unnormalized_top_k_matches_transformers(tmp_path):
    hf, path = make_moe_model(tmp_path / "hf", "qwen3_moe", norm_topk_prob=False)
    model = jqlora.load_model(path, quant="none", dtype="float32", remat="none")
    assert not model.config.norm_topk_prob
    x = ids(1)
    np.testing.assert_allclose(jq_logits(model, x), torch_logits(hf, x), atol=1e-4, rtol=0)


def _dot_flops(E: int, k: int, T: int = 256, D: int = 64, F: int = 128) -> float:
    """FLOPs of every dot in one MoE block's compiled forward HLO."""
    return sum(2.0 * np.prod(out) * np.prod(contracted) for out, contracted in moe_block_dots(E, k, T, D, F))


def test_dispatch_flops_scale_with_top_k_not_experts():
    T, D, F = 256, 64, 128
    dense = lambda E: 3 * 2.0 * T * E * D * F  # every expert on every token
    f4, f16, f16k2 = _dot_flops(4, 1), _dot_flops(16, 1), _dot_flops(16, 2)
    sparse = lambda k: 3 * 2.0 * T * k * D * F  # only the chosen experts
    for flops, k in ((f4, 1), (f16, 1), (f16k2, 2)):
        assert sparse(k) <= flops <= 2.2 * sparse(k), (flops, sparse(k))  # (tile padding: at most ~2x)
    assert f16 < dense(16) / 6
    assert f16 / f4 < 1.2  # 4x the experts: the same work
    assert 1.8 < f16k2 / f16 < 2.2  # 2x top-k: twice the work


# ----------------------------------------------------------------------------------------------------------------
# NF4 + double quantization, bnb-4bit checkpoints, conversion






def bnb_codes(w: torch.Tensor) -> np.ndarray:
    """bitsandbytes.functional's packed NF4 codes of one kernel (blocks of 64)."""
    packed, _ = bnbf.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
    return packed.view(torch.uint8).numpy().reshape(-1)


def bnb_dequantize(t) -> torch.Tensor:
    """One of our quantized kernels dequantized by bitsandbytes.functional from the state we would save for it."""
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in qmod.to_bnb(t, "w").items()}
    state = bnbf.QuantState.from_dict({k[2:]: v for k, v in tensors.items() if k != "w"}, device="cpu")
    return bnbf.dequantize_4bit(tensors["w"].view(torch.uint8), state)


def test_nf4_matches_bitsandbytes_and_bnb_checkpoints_load(fam, tmp_path):
    """transformers + bitsandbytes quantizes only nn.Linear (the attention); the experts are 3-D parameters it leaves
    unquantized. The oracle: transformers + bitsandbytes' 4-bit attention, and as experts our NF4 + DQ state of each
    expert dequantized by bitsandbytes itself, whose codes are bitsandbytes' codes bit for bit. (The scales are not
    requantized by bitsandbytes here: its CPU path approximates the nested 8-bit step, DESIGN.md, which the tiny
    scaled weights amplify past 1e-3 through the router.)"""
    family, hf, path = fam
    ref = bnb_model(path)
    ours = jqlora.load_model(path, quant="nf4", double_quant=True, dtype="float32")
    with torch.no_grad():
        for i, hl in enumerate(ref.model.layers):
            ex, src, mine = hl.mlp.experts, hf.model.layers[i].mlp.experts, layer(ours, i).mlp.experts
            assert ex.gate_up_proj.dtype == torch.float32  # (left unquantized by transformers)
            F = ex.gate_up_proj.shape[1] // 2
            for e in range(ex.gate_up_proj.shape[0]):
                parts = {}
                for name, w in (("gate_proj", src.gate_up_proj[e, :F]), ("up_proj", src.gate_up_proj[e, F:]),
                                ("down_proj", src.down_proj[e])):
                    t = jax.tree.map(lambda a, e=e: a[e], getattr(mine, name).quantized())
                    np.testing.assert_array_equal(np.asarray(t.codes), bnb_codes(w))  # bit-exact expert codes
                    parts[name] = bnb_dequantize(t)
                ex.gate_up_proj[e] = torch.cat([parts["gate_proj"], parts["up_proj"]])
                ex.down_proj[e] = parts["down_proj"]
    x = ids(1)
    expected = torch_logits(ref, x)
    w = ref.model.layers[1].self_attn.o_proj.weight  # and attention codes as transformers quantized them
    np.testing.assert_array_equal(np.asarray(ours.model.layers.self_attn.o_proj.codes.get_value())[1],
                                  w.data.view(torch.uint8).numpy().reshape(-1))
    got = jq_logits(ours, x)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)
    # the router stays unquantized (bitsandbytes leaves it in the compute dtype too)
    assert ours.model.layers.mlp.gate.weight.get_value().dtype == jnp.float32
    # a *-bnb-4bit checkpoint saved by transformers (4-bit attention, float experts) loads as is
    bnb_model(path).save_pretrained(tmp_path / "bnb")
    np.testing.assert_allclose(jq_logits(jqlora.load_model(tmp_path / "bnb", dtype="float32"), x), got,
                               atol=1e-5, rtol=0)
    if family != "mixtral":  # (conversion is the same code for both families; CI time)
        return
    # convert, both formats: the bnb output has transformers' layout and loads there with our attention codes; the
    # jqlora format reloads our model exactly
    out = checkpoints.convert(path, tmp_path / "ours_bnb", fmt="bnb", dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").train()
    reloaded = jqlora.load_model(out, dtype="float32")
    np.testing.assert_allclose(jq_logits(reloaded, x), got, atol=1e-5, rtol=0)
    np.testing.assert_allclose(torch_logits(theirs, x), jq_logits(
        jqlora.load_model(out, quant="none", dtype="float32"), x), atol=1e-4, rtol=0)
    jq = jqlora.load_model(checkpoints.convert(path, tmp_path / "jq", dtype="float32"), dtype="float32")
    np.testing.assert_array_equal(jq_logits(jq, x), got)


# ----------------------------------------------------------------------------------------------------------------
# Adapters (attention), merged export, generation, training invariants


def set_experts(hf_model, ours) -> None:
    """Our (dequantized) expert kernels into transformers' fused ``gate_up_proj`` / ``down_proj``."""
    with torch.no_grad():
        for i, hl in enumerate(hf_model.model.layers):
            mine = layer(ours, i).mlp.experts
            g, u, d = (torch.from_numpy(np.array(m.kernel())) for m in (mine.gate_proj, mine.up_proj, mine.down_proj))
            hl.mlp.experts.gate_up_proj.copy_(torch.cat([g, u], dim=1))
            hl.mlp.experts.down_proj.copy_(d)


@pytest.mark.parametrize("family,quant", [("mixtral", "none"), ("mixtral", "nf4"), ("qwen3_moe", "none")])
def test_peft_round_trip(family, quant, tmp_path_factory, tmp_path):
    """Adapters on the attention (jqlora's all-linear on these models, with lora.experts off): keys and shapes equal
    peft's for the target_modules our adapter_config names, and peft reproduces our logits. (The experts' adapters,
    peft's target_parameters: tests/test_moe_lora.py.) The 4-bit base on Mixtral only: the same attention code as
    Qwen3-MoE's (CI time)."""
    _, path = make_moe_model(tmp_path_factory.mktemp(f"{family}-{quant}") / "hf", family)
    ours = jqlora.load_model(path, quant=quant, dtype="float32", lora=LORA)
    randomize_lora(ours, seed=1)
    out = save_adapter(ours, tmp_path / "ad", lora_config=LORA, base_model_name_or_path=str(path))
    base_dir = path
    if quant == "nf4":  # our own bnb-format export: the attention codes and scales are ours; experts float
        base_dir = checkpoints.convert(path, tmp_path / "bnb", fmt="bnb", dtype="float32")

    def base():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
        return model.train() if quant == "nf4" else model.eval()

    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(peft_cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert peft_cfg["target_parameters"] is None
    made = peft.get_peft_model(base(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                       target_modules=peft_cfg["target_modules"]))
    want = peft.get_peft_model_state_dict(made)
    got = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    assert all(tuple(got[k].shape) == tuple(want[k].shape) for k in want)
    assert {k.split(".")[-3] for k in want} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    x = ids(2)
    expected = jq_logits(ours, x)
    plain = base()
    if quant == "nf4":  # transformers keeps the experts in float: give it ours, dequantized
        set_experts(plain, ours)
    assert np.abs(expected - torch_logits(plain, x)).max() > 1e-2  # the adapter matters
    theirs = peft.PeftModel.from_pretrained(plain, str(out))
    theirs.train() if quant == "nf4" else theirs.eval()
    np.testing.assert_allclose(torch_logits(theirs, x), expected, atol=1e-4, rtol=0)
    if quant == "none":  # a peft-made adapter imports
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if "lora_" in name:
                    p.normal_(std=0.2)
        theirs.save_pretrained(tmp_path / "peft_made")
        back = load_model_with_adapter(path, tmp_path / "peft_made", quant="none", dtype="float32")
        np.testing.assert_allclose(jq_logits(back, x), torch_logits(theirs.eval(), x), atol=1e-4, rtol=0)


def test_merged_export_loads_in_transformers(fam, tmp_path):

    _, _, path = fam
    model = jqlora.load_model(path, quant="nf4", dtype="float32", lora=LORA)
    randomize_lora(model, seed=3, scale=0.05)
    out = adapters.merge_to_hf(model, path, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    x = ids(3)
    np.testing.assert_allclose(torch_logits(merged, x), jq_logits(model, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family, tmp_path):
    hf, path = make_moe_model(tmp_path / "hf", family)
    model = jqlora.load_model(path, quant="none", dtype="float32")
    prompt = ids(11, (1, 11))  # prompt + 32 new tokens run past Mixtral's window of 12
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(prompt).long(), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                          eos_token_id=None, pad_token_id=0, repetition_penalty=1.0, return_dict_in_generate=True,
                          output_logits=True)
    ref_tokens, ref_logits = out.sequences[:, prompt.shape[1]:].numpy(), torch.stack(out.logits, 1).numpy()
    assert len(set(ref_tokens[0].tolist())) > 8
    steps = list(decode.generate_stream(model, prompt, max_new_tokens=32, return_logits=True))
    np.testing.assert_array_equal(np.stack([t for t, _ in steps], 1), ref_tokens)
    np.testing.assert_allclose(np.stack([lg for _, lg in steps], 1), ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,quant", [("mixtral", "none"), ("qwen3_moe", "nf4")])
def test_training_invariants(family, quant, tmp_path):
    """packing = separate rows; remat = no remat; two micro-batches = one batch (the micro-batches have other token
    counts, so other dispatch tiles). Each family once, float or NF4 + double quant experts and attention (CI time:
    not every pair)."""
    _, path = make_moe_model(tmp_path / "hf", family)
    model = jqlora.load_model(path, quant=quant, double_quant=True, dtype="float32", lora=LORA, remat="none")
    if quant == "nf4":  # the experts are 4-bit: the invariants hold through the dequantizing dispatch
        assert model.model.layers.mlp.experts.gate_proj.nested_absmax is not None
    randomize_lora(model, seed=4, scale=0.1)
    a, b = ids(6, (1, 9)), ids(7, (1, 8))
    packed = np.concatenate([a, b, np.zeros((1, 3), np.int32)], axis=1)
    segs = np.array([[1] * 9 + [2] * 8 + [0] * 3], np.int32)
    out = np.asarray(model(jnp.asarray(packed), jnp.asarray(segs)))
    np.testing.assert_allclose(out[:, :9], jq_logits(model, a), atol=5e-5, rtol=0)
    np.testing.assert_allclose(out[:, 9:17], jq_logits(model, b), atol=5e-5, rtol=0)

    x = ids(8, (4, SEQ))
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:], "loss_mask": (x[:, 1:] % 3 != 0).astype(np.int32),
             "segment_ids": np.ones_like(x[:, :-1]),
             "positions": np.broadcast_to(np.arange(SEQ - 1, dtype=np.int32), (4, SEQ - 1))}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def grads(policy, part=slice(None)):
        model.remat = policy
        split = step.SplitModel.of(model)
        fn = jax.jit(step.make_grad_fn(split, ce_chunk=16))
        g, loss = fn(split.lora, split.frozen, {k: v[part] for k, v in batch.items()}, None, 1.0)
        return jax.tree.leaves(g), float(loss)

    # both at once (one compile fewer): two remat micro-batches sum to the big batch without remat
    ref, ref_loss = grads("none")
    (g1, l1), (g2, l2) = grads("full", slice(0, 2)), grads("full", slice(2, 4))
    np.testing.assert_allclose(l1 + l2, ref_loss, rtol=1e-5)
    for u, v, w in zip(g1, g2, ref):
        np.testing.assert_allclose(u + v, w, atol=1e-5, rtol=1e-5)


def test_key_table_covers_the_checkpoint_exactly(fam):
    _, _, path = fam
    stored = set(load_file(str(path / "model.safetensors")))
    assert {e.key for e in hf_key_table(ModelConfig.from_hf(path))} == stored


# ----------------------------------------------------------------------------------------------------------------
# Sharded load, published shapes, recipe, config errors

_SHARDED = r"""
import json, sys
import numpy as np, jax, jax.numpy as jnp
from flax import nnx
import jqlora
from jqlora import parallel
path = sys.argv[1]
ref = jqlora.load_model(path, dtype="float32", lora=jqlora.lora.LoraConfig(r=4, alpha=8))
mesh = parallel.make_mesh(1, 8, 1)
model = jqlora.load_model(path, dtype="float32", lora=jqlora.lora.LoraConfig(r=4, alpha=8), mesh=mesh)
flat = dict(nnx.to_flat_state(nnx.state(ref)))
same, split = True, []
for p, v in nnx.to_flat_state(nnx.state(model)):
    a, b = v.get_value(), flat[p].get_value()
    same &= np.asarray(a).tobytes() == np.asarray(b).tobytes()
    if "experts" in p and not a.sharding.is_fully_replicated:
        split.append(".".join(map(str, p)))
x = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 20)), jnp.int32)
print(json.dumps({"same": bool(same), "split": split, "devices": jax.device_count(),
                  "logits": float(np.abs(np.asarray(model(x)) - np.asarray(ref(x))).max())}))
"""


def test_sharded_load_places_experts_and_equals_the_unsharded_load(tmp_path):
    import os
    import subprocess
    import sys

    _, path = make_moe_model(tmp_path / "hf", "mixtral")  # 128 blocks per expert kernel: 16 per device
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", _SHARDED, str(path)], capture_output=True, text=True, env=env,
                         check=False, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["same"]
    assert any(p.endswith("gate_proj.codes") for p in out["split"]), out["split"]  # experts' blocks are fsdp-split
    assert out["logits"] < 1e-5


def test_published_moe_shapes_and_plan():
    import math

    def params(name):  # every tensor of the checkpoint
        return sum(math.prod(e.shape) for e in hf_key_table(planning.BUILTIN[name]))

    assert params("mixtral-8x7b") == 46_702_792_704  # mistralai/Mixtral-8x7B-v0.1: 46.7B
    assert params("qwen3-30b-a3b") == 30_532_122_624  # Qwen/Qwen3-30B-A3B: 30.5B
    for name in ("mixtral-8x7b", "qwen3-30b-a3b"):
        cfg = planning.BUILTIN[name]
        experts = sum(math.prod(e.shape) for e in hf_key_table(cfg) if e.expert is not None)
        routers = sum(math.prod(e.shape) for e in hf_key_table(cfg) if e.kind == "router")
        w = planning.weight_bytes(cfg)
        # every expert stored 4-bit (exact bytes per expert kernel, up to the nested-scale rounding of the stack)
        assert w["quantized"] >= experts // 2 and w["quantized"] < 0.6 * params(name)
        assert w["norms"] >= 2 * routers  # the routers stay unquantized (bf16)
        # adapters only on attention: r (in + out) of q, k, v, o per layer
        N, K, H, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        assert planning.lora_param_count(cfg, r=16) == cfg.num_hidden_layers * 16 * (
            2 * (D + N * H) + 2 * (D + K * H))


def test_recipe_fits_its_gpu():
    from jqlora.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "mixtral-8x7b.yaml"), [])
    assert (cfg.model.quant, cfg.model.double_quant) == ("nf4", True)
    p = planning.memory_plan(planning.BUILTIN["mixtral-8x7b"], seq=cfg.data.max_length, batch=cfg.train.batch_size,
                         remat=cfg.train.remat, r=cfg.lora.r)
    assert p.total < 80e9  # one 80 GB GPU


@pytest.mark.parametrize("change,message", [
    (dict(model_type="qwen3_moe", moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
          mlp_only_layers=[1]), "unsupported dense MLP layers"),
    (dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=5),
     "num_experts_per_tok 5 must be in \\[1, num_experts 4\\]"),
    (dict(model_type="mixtral", num_local_experts=4), "num_experts_per_tok must be a positive integer"),
])
def test_unsupported_moe_config_is_one_clear_line(change, message):
    d = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, **change}
    with pytest.raises(ValueError, match=message) as e:
        ModelConfig.from_hf(d)
    assert "\n" not in str(e.value)


def test_load_balancing_loss_matches_transformers(fam):
    """`moe.load_balancing_loss` on transformers' own router logits equals its ``aux_loss`` (with and without a
    padding mask). (Its use in the train step, train.router_aux_loss_coef: tests/test_moe_aux.py.)"""
    _, hf, _ = fam
    x = torch.from_numpy(ids(9)).long()
    mask = torch.ones_like(x)
    mask[1, 15:] = 0
    losses = []
    for m in (None, mask):
        with torch.no_grad():
            out = hf(x, attention_mask=m, output_router_logits=True)
        logits = jnp.asarray(np.stack([r.float().numpy() for r in out.router_logits]))  # [L, T, E]
        got = moe.load_balancing_loss(logits, 2, None if m is None else jnp.asarray(m.numpy().reshape(-1)))
        np.testing.assert_allclose(float(got), float(out.aux_loss), rtol=1e-6)
        losses.append(float(got))
    assert abs(losses[0] - losses[1]) > 1e-4  # the mask matters
