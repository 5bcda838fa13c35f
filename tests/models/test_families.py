"""Families beyond Llama (Gemma 2, Gemma 3, Phi-3) against transformers, bitsandbytes and peft, with the training
invariants. Each family's tiny config (tests/tiny.py `FAMILY_CONFIGS`) has windows shorter than the sequences,
soft-caps that bind, for Gemma 3 two RoPEs, for Phi-3 LongRoPE past its original length with partial rotary;
`BINDING` shows each of them changes the output."""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file
from tiny import FAMILY_CONFIGS, bnb_model, jq_logits, make_family_model, randomize_lora, torch_logits
from transformers import AutoModelForCausalLM

import jqlora
from jqlora.training import step
from jqlora.lora import LoraConfig
from jqlora.models import ModelConfig, hf_key_table
from jqlora.adapters import load_model_with_adapter, save_adapter
from jqlora import adapters
from jqlora import checkpoints
from jqlora import planning
from jqlora.models import decode

REPO = Path(__file__).resolve().parents[2]
FAMILIES = list(FAMILY_CONFIGS)
SEQ = 20  # > every tiny window (6)
# family -> ModelConfig changes (from the model's config) that must each change the logits: the feature is active
BINDING = {
    "gemma2": [lambda c: {"attn_softcap": None}, lambda c: {"final_softcap": None},
               lambda c: {"sliding_windows": (None,) * 2}],
    "gemma3": [lambda c: {"rope_local": None}, lambda c: {"sliding_windows": (None,) * 3}],
    "phi3": [lambda c: {"rope": dataclasses.replace(c.rope, long_factor=c.rope.short_factor)},  # past 16 positions
             lambda c: {"sliding_windows": (None,) * 2}],
}
LORA = {
    "gemma2": LoraConfig(r=4, alpha=8, targets="all-linear", rank_pattern={"mlp.down_proj": 2}),
    "gemma3": LoraConfig(r=4, alpha=16, targets=("q_proj", "k_proj", "o_proj", "up_proj"), rslora=True),
    "phi3": LoraConfig(r=4, alpha=8, targets="all-linear", rank_pattern={"mlp.gate_up_proj": 2}),  # fused names
}


def ids(seed=0, shape=(2, SEQ)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, shape).astype(np.int32)












def variant(model, **change):
    """``model``'s weights under its config with ``change``."""
    cfg = dataclasses.replace(model.config, **change)
    abstract = nnx.eval_shape(lambda: type(model)(cfg, model.lora_config, model.quant_spec, model.dtype,
                                                  rngs=nnx.Rngs(0), remat=model.remat))
    return nnx.merge(nnx.graphdef(abstract), nnx.state(model))


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory):
    """(family, transformers float32 model, checkpoint dir)."""
    hf, path = make_family_model(tmp_path_factory.mktemp(request.param) / "hf", request.param)
    return request.param, hf, path


# ----------------------------------------------------------------------------------------------------------------
# Logits


def test_float32_logits_match_transformers(fam):
    family, hf, path = fam
    x = ids()
    expected = torch_logits(hf, x)
    model = jqlora.load_model(path, quant="none", dtype="float32", remat="none")
    got = jq_logits(model, x)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # every family feature in the tiny config is active: switching it off changes the logits
    for change in BINDING[family]:
        change = change(model.config)
        assert np.abs(jq_logits(variant(model, **change), x) - got).max() > 1e-2, change


def test_nf4_matches_bitsandbytes_and_bnb_checkpoints_load(fam, tmp_path):
    family, _, path = fam
    ref = bnb_model(path)
    x = ids(1)
    expected = torch_logits(ref, x)
    ours = jqlora.load_model(path, quant="nf4", double_quant=True, dtype="float32")
    w = ref.model.layers[1].mlp.down_proj.weight  # bit-exact codes
    np.testing.assert_array_equal(np.asarray(ours.model.layers.mlp.down_proj.codes.get_value())[1],
                                  w.data.view(torch.uint8).numpy().reshape(-1))
    np.testing.assert_allclose(jq_logits(ours, x), expected, atol=1e-3, rtol=0)
    # a *-bnb-4bit checkpoint saved by transformers loads as is
    ref.save_pretrained(tmp_path / "bnb")
    np.testing.assert_allclose(jq_logits(jqlora.load_model(tmp_path / "bnb", dtype="float32"), x), expected,
                               atol=1e-5, rtol=0)
    # convert, both formats: bnb output loads in transformers with our logits; the jqlora format reloads the same
    out = checkpoints.convert(path, tmp_path / "ours_bnb", fmt="bnb", dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").train()
    np.testing.assert_allclose(torch_logits(theirs, x), jq_logits(ours, x), atol=1e-5, rtol=0)
    jq = jqlora.load_model(checkpoints.convert(path, tmp_path / "jq", dtype="float32"), dtype="float32")
    np.testing.assert_array_equal(jq_logits(jq, x), jq_logits(ours, x))


# ----------------------------------------------------------------------------------------------------------------
# Adapters and export


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_peft_round_trip(fam, tmp_path, quant):
    family, _, path = fam
    lora = LORA[family]
    ours = jqlora.load_model(path, quant=quant, dtype="float32", lora=lora)
    randomize_lora(ours, seed=1)
    out = save_adapter(ours, tmp_path / "ad", lora_config=lora, base_model_name_or_path=str(path))
    # 4-bit base in transformers: our own bnb-format export (the same codes and absmax as ours). bitsandbytes' CPU
    # double quantization approximates the nested 8-bit step for a few blocks (DESIGN.md), which the scaled tiny
    # weights amplify past 1e-3 once an adapter is on; the base against transformers' own quantization is checked
    # in test_nf4_matches_bitsandbytes_and_bnb_checkpoints_load.
    src = checkpoints.convert(path, tmp_path / "bnb", fmt="bnb", dtype="float32") if quant == "nf4" else path

    def base():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
        return model.train() if quant == "nf4" else model.eval()  # train(): bitsandbytes' exact CPU path

    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    made = peft.get_peft_model(base(), peft.LoraConfig(
        task_type="CAUSAL_LM", r=peft_cfg["r"], lora_alpha=peft_cfg["lora_alpha"],
        target_modules=peft_cfg["target_modules"], rank_pattern=peft_cfg["rank_pattern"],
        use_rslora=peft_cfg["use_rslora"]))
    want = peft.get_peft_model_state_dict(made)
    got = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    assert all(tuple(got[k].shape) == tuple(want[k].shape) for k in want)
    plain = base()
    x = ids(2)
    expected = jq_logits(ours, x)
    assert np.abs(expected - torch_logits(plain, x)).max() > 1e-2  # the adapter matters
    theirs = peft.PeftModel.from_pretrained(plain, str(out))
    theirs.train() if quant == "nf4" else theirs.eval()
    np.testing.assert_allclose(torch_logits(theirs, x), expected, atol=1e-4, rtol=0)
    if quant == "none":  # a peft-made adapter imports: peft's own (random) weights give peft's logits here
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if "lora_" in name:
                    p.normal_(std=0.2)
        theirs.save_pretrained(tmp_path / "peft_made")
        back = load_model_with_adapter(path, tmp_path / "peft_made", quant="none", dtype="float32")
        np.testing.assert_allclose(jq_logits(back, x), torch_logits(theirs.eval(), x), atol=1e-4, rtol=0)


def test_merged_export_loads_in_transformers(fam, tmp_path):
    family, _, path = fam
    model = jqlora.load_model(path, quant="nf4", dtype="float32", lora=LORA[family])
    randomize_lora(model, seed=3, scale=0.05)
    out = adapters.merge_to_hf(model, path, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    x = ids(3)
    np.testing.assert_allclose(torch_logits(merged, x), jq_logits(model, x), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family, tmp_path):
    # untied: a tiny random Gemma with tied, √D-scaled embeddings greedily repeats its last prompt token forever
    hf, path = make_family_model(tmp_path / "hf", family, tie_word_embeddings=False)
    model = jqlora.load_model(path, quant="none", dtype="float32")
    prompt = ids(5, (1, 11))  # prompt + 32 new tokens run far past the window of 6
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(prompt).long(), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                          eos_token_id=None, pad_token_id=0, repetition_penalty=1.0, return_dict_in_generate=True,
                          output_logits=True)
    ref_tokens, ref_logits = out.sequences[:, prompt.shape[1]:].numpy(), torch.stack(out.logits, 1).numpy()
    assert len(set(ref_tokens[0].tolist())) > 8
    steps = list(decode.generate_stream(model, prompt, max_new_tokens=32, return_logits=True))
    np.testing.assert_array_equal(np.stack([t for t, _ in steps], 1), ref_tokens)
    np.testing.assert_allclose(np.stack([lg for _, lg in steps], 1), ref_logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Training invariants


def test_training_invariants(fam):
    """packing = separate rows; remat = no remat; two micro-batches = one batch (the gradients of the summed loss
    add up, which is what optax.MultiSteps' accumulation relies on, see step.py)."""
    family, _, path = fam
    model = jqlora.load_model(path, quant="nf4", dtype="float32", lora=LORA[family], remat="none")
    randomize_lora(model, seed=4, scale=0.1)
    a, b = ids(6, (1, 9)), ids(7, (1, 8))
    packed = np.concatenate([a, b, np.zeros((1, 3), np.int32)], axis=1)
    segs = np.array([[1] * 9 + [2] * 8 + [0] * 3], np.int32)
    out = np.asarray(model(jnp.asarray(packed), jnp.asarray(segs)))
    np.testing.assert_allclose(out[:, :9], jq_logits(model, a), atol=5e-5, rtol=0)  # (|logits| up to ~7)
    np.testing.assert_allclose(out[:, 9:17], jq_logits(model, b), atol=5e-5, rtol=0)

    x = ids(8, (4, SEQ))
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:], "loss_mask": (x[:, 1:] % 3 != 0).astype(np.int32),
             "segment_ids": np.ones_like(x[:, :-1]),
             "positions": np.broadcast_to(np.arange(SEQ - 1, dtype=np.int32), (4, SEQ - 1))}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def grads(policy, scan, part=slice(None)):
        model.remat, model.scan_layers = policy, scan
        split = step.SplitModel.of(model)
        fn = jax.jit(step.make_grad_fn(split, ce_chunk=16))
        g, loss = fn(split.lora, split.frozen, {k: v[part] for k, v in batch.items()}, None, 1.0)
        return jax.tree.leaves(g), float(loss)

    ref, ref_loss = grads("none", True)
    for policy, scan in [("full", True)]:  # (every policy, and unrolled, on Llama: tests/test_model.py)
        g, loss = grads(policy, scan)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for u, v in zip(g, ref):  # (float32 sums in another order: a few 1e-6 of the leaf's largest |grad|, ~30)
            np.testing.assert_allclose(u, v, atol=3e-6 * np.abs(v).max(), rtol=1e-5)
    (g1, l1), (g2, l2) = grads("none", True, slice(0, 2)), grads("none", True, slice(2, 4))
    np.testing.assert_allclose(l1 + l2, ref_loss, rtol=1e-5)
    for u, v, w in zip(g1, g2, ref):
        np.testing.assert_allclose(u + v, w, atol=3e-6 * np.abs(w).max(), rtol=1e-5)
    # the loss sees the soft-capped logits (Gemma 2): the chunked CE equals the CE of the model's own logits
    logits = model(batch["input_ids"], batch["segment_ids"], batch["positions"])
    np.testing.assert_allclose(ref_loss, float(step.full_ce_sum(logits, batch["targets"], batch["loss_mask"])),
                               rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Recipes, published shapes, config errors


@pytest.mark.parametrize("recipe,model,budget_gb", [("gemma2-9b", "gemma2-9b", 24), ("phi4-mini", "phi4-mini", 16)])
def test_recipe_fits_its_gpu(recipe, model, budget_gb):
    from jqlora.config import load_config

    cfg = load_config(str(REPO / "configs" / f"{recipe}.yaml"), [])
    assert (cfg.model.quant, cfg.model.double_quant, cfg.lora.targets) == ("nf4", True, "all-linear")
    p = planning.memory_plan(planning.BUILTIN[model], seq=cfg.data.max_length, batch=cfg.train.batch_size, fsdp=1,
                         remat=cfg.train.remat, r=cfg.lora.r)
    assert p.total < budget_gb * 1e9


def test_published_shapes_have_the_published_parameter_counts():

    def params(name):  # every tensor of the checkpoint
        return sum(math.prod(e.shape) for e in hf_key_table(planning.BUILTIN[name]))

    assert round(params("gemma2-9b") / 1e9, 2) == 9.24  # google/gemma-2-9b: 9.24B
    assert round(params("phi3.5-mini") / 1e9, 2) == 3.82  # microsoft/Phi-3.5-mini-instruct: 3.82B
    assert round(params("phi4-mini") / 1e9, 2) == 3.84  # microsoft/Phi-4-mini-instruct: 3.84B
    assert planning.BUILTIN["phi4-mini"].rotary_dim == 96
    g3 = planning.BUILTIN["gemma3-12b"]
    assert g3.sliding_windows.count(None) == 8 and g3.layer_ropes.count(0) == 8  # 5 local : 1 global of 48
    assert (g3.rope.theta, g3.rope.factor, g3.rope_local.theta) == (1e6, 8.0, 1e4)


@pytest.mark.parametrize("change,message", [
    (dict(model_type="gemma"), "unsupported model_type 'gemma': expected one of llama, mistral, qwen2, qwen3, gemma2"),
    (dict(model_type="gemma2", use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(model_type="gemma2", hidden_activation="relu"), "unsupported hidden_activation 'relu'"),
    (dict(model_type="gemma3_text", rope_parameters={"chunked_attention": {"rope_type": "default"}}),
     "rope_parameters layer types"),
    (dict(model_type="phi3", rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "unsupported rope type 'dynamic'"),
    (dict(model_type="phi3", original_max_position_embeddings=16, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}),
     "rope short_factor has 3 entries, expected rotary dims / 2 = 8"),
    (dict(model_type="phi3", partial_rotary_factor=0.1), "partial_rotary_factor 0.1 gives 1 rotary features"),
])
def test_unsupported_config_is_one_clear_line(change, message):
    d = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, **change}
    with pytest.raises(ValueError, match=message) as e:
        ModelConfig.from_hf(d)
    assert "\n" not in str(e.value)


def test_key_table_covers_the_checkpoint_exactly(fam):
    _, _, path = fam
    stored = set(load_file(str(path / "model.safetensors")))
    assert {e.key for e in hf_key_table(ModelConfig.from_hf(path))} == stored
