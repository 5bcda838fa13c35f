"""jqlora.models.llama against transformers (float32 logits), peft (adapters), and its own invariants
(packing, remat, scan vs unrolled, quantized storage, config and checkpoint errors)."""

import copy
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from jqlora import quant
from jqlora.lora import Frozen, LoraConfig, LoraLinear, QuantData
from jqlora.models.llama import REMAT_POLICIES, ModelConfig, from_hf_tensors, hf_key_table

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, rms_norm_eps=1e-6)
CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}
# (id, model_type, config overrides, sequence length)
CASES = [
    ("llama-gqa-llama3rope", "llama", dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8)), 24),
    ("llama-mqa-tied-bias", "llama", dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
                                          rope_parameters=dict(rope_type="default", rope_theta=500.0)), 20),
    ("llama-linear", "llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)), 20),
    ("llama-dynamic-beyond-max", "llama", dict(max_position_embeddings=16, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0)), 28),
    ("llama-yarn", "llama", dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)), 24),
    ("mistral-sliding", "mistral", dict(sliding_window=6, head_dim=16), 20),
    ("qwen2-bias-sliding", "qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1), 20),
    ("qwen3-qknorm-headdim-tied", "qwen3", dict(head_dim=32, tie_word_embeddings=True), 20),
]


def make_hf(model_type: str, overrides: dict, seed: int = 0):
    """A tiny random transformers model (weights scaled up so that every term matters), saved as safetensors."""
    kw = {**TINY, **overrides}
    cfg = CONFIG_CLASSES[model_type](**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
    path = tempfile.mkdtemp(prefix=f"jqlora-{model_type}-")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def load(path: str, **kw):
    tensors = load_file(os.path.join(path, "model.safetensors"))
    kw = {"quant": "none", "dtype": "float32", **kw}
    return from_hf_tensors(ModelConfig.from_hf(path), tensors.__getitem__, **kw)


@nnx.jit
def forward(model, ids, segs=None):
    return model(ids, segs)


def token_ids(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, seq)).astype(np.int32)


@pytest.fixture(scope="module")
def llama():
    return make_hf("llama", CASES[0][2])


# ----------------------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("model_type,overrides,seq", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_logits_match_transformers(model_type, overrides, seq):
    hf, path = make_hf(model_type, overrides)
    ids = token_ids(2, seq)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.numpy()
    got = np.asarray(forward(load(path, remat="none"), jnp.asarray(ids)))
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # logits large enough for the comparison to mean something
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rope", [
    dict(rope_type="linear", factor=4.0),
    dict(rope_type="dynamic", factor=2.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=16),
], ids=lambda r: r["rope_type"])
def test_old_rope_scaling_spelling_reads_the_same(rope):
    new = {"model_type": "llama", **TINY, "max_position_embeddings": 64,
           "rope_parameters": {**rope, "rope_theta": 5000.0}}
    old = {"model_type": "llama", **TINY, "max_position_embeddings": 64, "rope_theta": 5000.0,
           "rope_scaling": {("type" if k == "rope_type" else k): v for k, v in rope.items()}}
    assert ModelConfig.from_hf(old) == ModelConfig.from_hf(new)
    assert ModelConfig.from_hf(new).rope.theta == 5000.0


def test_config_reads_what_transformers_reads(tmp_path):
    """Qwen2 sliding layers from max_window_layers; GQA defaults; head_dim default."""
    cfg = transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=7, max_window_layers=1)
    cfg.save_pretrained(tmp_path)
    ours = ModelConfig.from_hf(tmp_path)
    assert ours.sliding_windows == tuple(7 if t == "sliding_attention" else None for t in cfg.layer_types)
    assert ours.sliding_windows == (None, 7)
    assert (ours.qkv_bias, ours.o_bias, ours.head_dim) == (True, False, 16)
    d = {"model_type": "mistral", **TINY}
    del d["num_key_value_heads"]
    assert ModelConfig.from_hf(d).num_key_value_heads == TINY["num_attention_heads"]


# ----------------------------------------------------------------------------------------------------------------
# Adapters


def test_lora_with_zero_b_equals_base(llama):
    _, path = llama
    ids = jnp.asarray(token_ids(2, 16))
    base = forward(load(path), ids)
    adapted = load(path, lora=LoraConfig(r=4, alpha=8))
    assert np.array_equal(np.asarray(forward(adapted, ids)), np.asarray(base))


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft(llama, rslora):
    hf, path = llama
    lcfg = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj", "gate_proj"), rslora=rslora,
                      rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3.0})
    model = load(path, lora=lcfg)
    rng = np.random.default_rng(1)
    for _, m in nnx.iter_modules(model):  # nonzero B
        if isinstance(m, LoraLinear) and m.lora_b is not None:
            m.lora_b.set_value(jnp.asarray(rng.normal(0, 0.3, m.lora_b.shape).astype(np.float32)))
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(lcfg.targets), use_rslora=rslora,
                           rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3.0})
    pm = peft.get_peft_model(copy.deepcopy(hf), pcfg).eval()
    state = {}
    for i in range(TINY["num_hidden_layers"]):
        for mod, sub in [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj"), ("mlp", "gate_proj")]:
            layer = getattr(getattr(model.model.layers, mod), sub)
            prefix = f"base_model.model.model.layers.{i}.{mod}.{sub}"
            state[f"{prefix}.lora_A.default.weight"] = torch.from_numpy(np.asarray(layer.lora_a[...][i]).T.copy())
            state[f"{prefix}.lora_B.default.weight"] = torch.from_numpy(np.asarray(layer.lora_b[...][i]).T.copy())
    missing = pm.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    ids = token_ids(2, 16)
    with torch.no_grad():
        ref = pm(torch.from_numpy(ids).long()).logits.numpy()
        base = hf(torch.from_numpy(ids).long()).logits.numpy()
    got = np.asarray(forward(model, jnp.asarray(ids)))
    assert np.abs(ref - base).max() > 0.1  # the adapter changes the output
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_only_lora_params_are_params(llama):
    _, path = llama
    model = load(path, lora=LoraConfig(r=4), quant="nf4", dtype="float32")
    lora_state = nnx.state(model, nnx.LoRAParam)
    param_state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(param_state)
    names = {path[-1] for path, _ in flat}
    assert names == {"lora_a", "lora_b"}
    assert len(flat) == len(nnx.to_flat_state(lora_state)) == 2 * 7  # A and B on 7 stacked modules
    L, D, F, r = TINY["num_hidden_layers"], TINY["hidden_size"], TINY["intermediate_size"], 4
    kv = TINY["num_key_value_heads"] * 16
    per_layer = r * ((D + D) + 2 * (D + kv) + (D + D) + 2 * (D + F) + (F + D))
    assert sum(x.size for x in jax.tree_util.tree_leaves(lora_state)) == L * per_layer
    n_quant = len(nnx.to_flat_state(nnx.state(model, QuantData)))
    assert n_quant == 7 * 4  # codes, absmax, nested_absmax, offset per kernel
    assert all(not isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(nnx.state(model, Frozen)))


# ----------------------------------------------------------------------------------------------------------------
# Packing, remat, scan


def test_packed_segments_equal_separate_runs(llama):
    _, path = llama
    model = load(path)
    a, b = token_ids(1, 9, seed=1), token_ids(1, 11, seed=2)
    packed = np.concatenate([a, b, np.zeros((1, 4), np.int32)], axis=1)  # two documents and padding
    segs = np.array([[1] * 9 + [2] * 11 + [0] * 4], np.int32)
    out = np.asarray(forward(model, jnp.asarray(packed), jnp.asarray(segs)))
    alone_a = np.asarray(forward(model, jnp.asarray(a)))
    alone_b = np.asarray(forward(model, jnp.asarray(b)))
    np.testing.assert_allclose(out[:, :9], alone_a, atol=2e-5, rtol=0)
    np.testing.assert_allclose(out[:, 9:20], alone_b, atol=2e-5, rtol=0)
    assert np.all(np.isfinite(out))


def _loss_and_grads(model, ids, segs):
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)

    @jax.jit
    def f(lora_state):
        m = nnx.merge(graphdef, lora_state, rest)
        logits = m(ids, segs)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

    (_, logits), grads = jax.value_and_grad(f, has_aux=True)(lora_state)
    return logits, grads


@pytest.fixture(scope="module")
def remat_reference(llama):
    """A LoRA model with nonzero B, its inputs, and its plain-scan (no remat) logits and LoRA gradients."""
    _, path = llama
    model = load(path, lora=LoraConfig(r=4, alpha=8), remat="none")
    rng = np.random.default_rng(3)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoraLinear) and m.lora_b is not None:
            m.lora_b.set_value(jnp.asarray(rng.normal(0, 0.1, m.lora_b.shape).astype(np.float32)))
    ids = jnp.asarray(token_ids(2, 12))
    segs = jnp.asarray(np.array([[1] * 12, [1] * 5 + [2] * 7], np.int32))
    logits, grads = _loss_and_grads(model, ids, segs)
    assert min(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)) > 1e-3
    return model, ids, segs, logits, grads


@pytest.mark.parametrize("policy,scan", [(p, True) for p in REMAT_POLICIES if p != "none"]
                         + [("none", False), ("full", False)])
def test_remat_and_unrolled_equal_plain_scan(remat_reference, policy, scan):
    model, ids, segs, ref_logits, ref_grads = remat_reference
    model.remat, model.scan_layers = policy, scan
    try:
        logits, grads = _loss_and_grads(model, ids, segs)
    finally:
        model.remat, model.scan_layers = "none", True
    # float32 rounding only: XLA fuses a rematerialized or unrolled body differently (|logits| ≈ 4, |grads| ≈ 0.6)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(ref_grads)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-6, rtol=0)


def test_dropout_needs_a_key(llama):
    _, path = llama
    model = load(path, lora=LoraConfig(r=4, dropout=0.5))
    with pytest.raises(ValueError, match="PRNG key"):
        model(jnp.asarray(token_ids(1, 8)), deterministic=False)


# ----------------------------------------------------------------------------------------------------------------
# Quantized storage


@pytest.mark.parametrize("qtype,dq,block", [("nf4", True, 64), ("fp4", False, 32)])
def test_quantized_kernels_and_logits(llama, qtype, dq, block):
    _, path = llama
    tensors = load_file(os.path.join(path, "model.safetensors"))
    cfg = ModelConfig.from_hf(path)
    model = from_hf_tensors(cfg, tensors.__getitem__, quant=qtype, double_quant=dq, block_size=block,
                            dtype="float32")
    deq = {}
    for e in hf_key_table(cfg):
        if e.kind == "linear":
            layer = model
            for part in e.path:
                layer = getattr(layer, part)
            expected = quant.dequantize(quant.quantize(tensors[e.key], qtype, block_size=block, double_quant=dq))
            assert np.array_equal(np.asarray(layer.kernel()[e.layer]), np.asarray(expected)), e.key
            assert layer.quant_dtype == "float32"
            deq[e.key] = np.asarray(expected)
    # The quantized model computes what an unquantized model of the dequantized weights computes.
    ref = from_hf_tensors(cfg, lambda k: deq.get(k, tensors[k]), quant="none", dtype="float32")
    ids = jnp.asarray(token_ids(2, 12))
    np.testing.assert_allclose(forward(model, ids), forward(ref, ids), atol=1e-5, rtol=0)


def test_prequantized_tensors_are_used_as_is(llama):
    _, path = llama
    tensors = load_file(os.path.join(path, "model.safetensors"))
    cfg = ModelConfig.from_hf(path)
    pre = {k: quant.quantize(v.astype(np.float16)) if k.endswith("proj.weight") else v for k, v in tensors.items()}
    model = from_hf_tensors(cfg, pre.__getitem__, quant="nf4", dtype="float32")
    qp = model.model.layers.self_attn.q_proj
    assert qp.quant_dtype == "float16"
    for i in range(cfg.num_hidden_layers):
        src = pre[f"model.layers.{i}.self_attn.q_proj.weight"]
        assert np.array_equal(np.asarray(qp.codes[...][i]), np.asarray(src.codes))
        assert np.array_equal(np.asarray(qp.absmax[...][i]), np.asarray(src.absmax))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*block_size"):
        from_hf_tensors(cfg, pre.__getitem__, quant="nf4", block_size=128, dtype="float32")


# ----------------------------------------------------------------------------------------------------------------
# Errors at the boundary


@pytest.mark.parametrize("change,message", [
    (dict(model_type="gpt2"), "'gpt2'"),
    # longrope is supported (Phi-3 brought it); factor lists must have one entry per rotary frequency
    (dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1], long_factor=[1])),
     "short_factor has 1 entries"),
    (dict(rope_scaling=dict(type="su", factor=2.0)), "'su'"),
    (dict(hidden_act="gelu"), "'gelu'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_unsupported_config_names_the_setting(change, message):
    d = {"model_type": "llama", **TINY, **change}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(d)


def test_config_error_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **TINY}))
    with pytest.raises(ValueError, match=r"config\.json.*'bert'"):
        ModelConfig.from_hf(tmp_path)


def test_bad_checkpoint_tensors_name_the_key(llama):
    _, path = llama
    tensors = load_file(os.path.join(path, "model.safetensors"))
    cfg = ModelConfig.from_hf(path)
    key = "model.layers.1.mlp.up_proj.weight"
    bad = dict(tensors)
    bad[key] = bad[key][:, :-1]
    with pytest.raises(ValueError, match=rf"{key}.*\(96, 63\).*\(96, 64\)"):
        from_hf_tensors(cfg, bad.__getitem__, quant="nf4")
    del bad[key]
    with pytest.raises(ValueError, match=rf"missing tensor '{key}'"):
        from_hf_tensors(cfg, bad.__getitem__, quant="none")
    bad = dict(tensors)
    bad["model.norm.weight"] = bad["model.norm.weight"][None]
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(1, 64\).*\(64,\)"):
        from_hf_tensors(cfg, bad.__getitem__, quant="none")


def test_key_table_covers_the_checkpoint_exactly():
    for _, model_type, overrides, _ in CASES:
        _, path = make_hf(model_type, overrides)
        tensors = load_file(os.path.join(path, "model.safetensors"))
        table = hf_key_table(ModelConfig.from_hf(path))
        assert sorted(e.key for e in table) == sorted(tensors), model_type
        for e in table:
            assert tuple(tensors[e.key].shape) == e.shape, e.key
