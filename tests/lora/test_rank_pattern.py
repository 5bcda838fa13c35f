"""Per-layer LoRA ranks and alphas (rank_pattern / alpha_pattern keys naming one layer's module) and
layers_to_transform, stacked at the largest rank with a frozen mask (`jqlora.lora`), against peft:

- an adapter peft made (its own get_peft_model: ranks and alphas by layer, a layer left out, B random) loads into
  jqlora and gives peft's logits (float32 base 1e-4; bitsandbytes NF4 base 1e-3); our export of it loads in peft with
  peft's own keys and shapes (`get_peft_model_state_dict`) and gives our logits;
- training: 5 steps of jqlora's scanned, padded step equal 5 steps of peft + the transformers Trainer with the same
  per-layer ranks (peft's modules are unstacked, each at its own rank): losses within 2e-5, adapters within 2e-3
  relative (adam_eps 1e-4); the padded entries of A and B and their Adam moments stay exactly 0;
- DoRA over per-layer ranks gives peft's logits, and its merged checkpoint gives ours in transformers;
- a uniform pattern builds the very same model as no pattern (no mask, no per-layer scaling);
- one-line errors: a rank that does not fit its kernel, layers_to_transform naming a missing layer, PiSSA with
  per-layer ranks, DoRA on some layers only (through the trainer's build_model), and an adapter whose module kinds
  use different layers.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from test_lora_variants_a import _batch, _train_ours, _train_theirs
from tiny import bnb_model, jq_logits, make_model, torch_logits
from transformers import AutoModelForCausalLM

import jqlora
from jqlora.lora import LoraConfig, LoraLinear
from jqlora.adapters import AdapterError, adapter_tensors, read_adapter_config, save_adapter
from jqlora import adapters

LAYERS = 3
TARGETS = ["q_proj", "v_proj", "down_proj"]
# peft's keys: one layer's module (full name), a module kind; layer 1 is not transformed
PEFT_KW = dict(r=4, lora_alpha=8, target_modules=TARGETS, layers_to_transform=[0, 2],
               rank_pattern={"model.layers.2.self_attn.q_proj": 8, "model.layers.0.mlp.down_proj": 2},
               alpha_pattern={"model.layers.0.self_attn.v_proj": 3, "down_proj": 12})


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank_pattern")
    return {f: make_model(root / f, f, torch.float32, seed=7, num_hidden_layers=LAYERS) for f in ("llama", "qwen2")}


def ids(seed=0, shape=(2, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, shape).astype(np.int32)


def adapted(model):
    return {".".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, LoraLinear)
            and m.lora_a is not None}


def peft_made(src, out, nf4: bool, rslora: bool = False, seed: int = 0):
    """peft's own adapter with the per-layer patterns, A and B random; returns (dir, the peft model)."""
    torch.manual_seed(seed)
    base = bnb_model(src) if nf4 else AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, use_rslora=rslora,
                                                      **PEFT_KW))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(out)
    return out, model.train() if nf4 else model.eval()  # (train(): bitsandbytes' exact CPU path; no dropout here)


def peft_shapes(model) -> dict:
    sd = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("family,nf4,rslora", [("llama", False, False), ("qwen2", True, True)],
                         ids=["llama-float32", "qwen2-nf4-rslora"])
def test_peft_adapter_with_layer_patterns_loads_and_exports(hf_dirs, tmp_path, family, nf4, rslora):
    src = hf_dirs[family]
    out, theirs = peft_made(src, tmp_path / "peft", nf4, rslora)
    shapes = peft_shapes(theirs)
    assert shapes["base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"] == (8, 64)  # (peft did it)
    assert not any(".layers.1." in k for k in shapes)
    x = ids(3)
    expected = torch_logits(theirs, x)
    tol = 1e-3 if nf4 else 1e-4

    ours = jqlora.load_model(src, adapter=out, quant="nf4" if nf4 else "none", dtype="float32")
    mods = adapted(ours)
    q = mods["model.layers.self_attn.q_proj"]
    assert q.spec.layer_ranks == (4, 0, 8) and q.lora_a.shape == (LAYERS, 64, 8)
    np.testing.assert_allclose(jq_logits(ours, x), expected, atol=tol, rtol=0)
    if not nf4:  # the mask, not the zeros, makes the padding inert: junk there changes nothing
        before, exported = jq_logits(ours, x), adapter_tensors(ours)
        for i, m in enumerate(mods.values()):
            if m.lora_mask is not None:
                keep = m.lora_mask[...]
                junk = jax.random.normal(jax.random.key(i), m.lora_a.shape)
                m.lora_a.set_value(m.lora_a[...] + junk * (1 - keep[:, None, :]))
                m.lora_b.set_value(m.lora_b[...] + junk.mean() * (1 - keep[:, :, None]))
        np.testing.assert_array_equal(jq_logits(ours, x), before)
        assert all(np.array_equal(v, exported[k]) for k, v in adapter_tensors(ours).items())

    # our export: peft rebuilds the same modules (keys, shapes) and gives our logits
    mine = save_adapter(ours, tmp_path / "ours")
    cfg = json.loads((mine / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [0, 2]
    base = bnb_model(src) if nf4 else AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    back = peft.PeftModel.from_pretrained(base, str(mine))
    back = back.train() if nf4 else back.eval()
    assert peft_shapes(back) == shapes
    np.testing.assert_allclose(torch_logits(back, x), jq_logits(ours, x), atol=tol, rtol=0)


def test_uniform_pattern_builds_the_plain_model(hf_dirs):
    """A by-layer key that repeats r and every layer listed: the plain stacked adapter (no mask, no scaling
    vector, the same variables and values)."""
    src = hf_dirs["llama"]
    plain = jqlora.load_model(src, quant="none", dtype="float32", lora=LoraConfig(r=4, alpha=8, targets=TARGETS))
    same = jqlora.load_model(src, quant="none", dtype="float32", lora=LoraConfig(
        r=4, alpha=8, targets=TARGETS, rank_pattern={"model.layers.1.self_attn.q_proj": 4},
        alpha_pattern={"model.layers.2.mlp.down_proj": 8}, layers_to_transform=[0, 1, 2]))
    a, b = nnx.to_flat_state(nnx.state(plain)), nnx.to_flat_state(nnx.state(same))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (p, va), (_, vb) in zip(a, b):
        np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()), err_msg=str(p))
    assert all(m.lora_mask is None and m.lora_scale is None for m in adapted(same).values())


def test_training_with_layer_ranks_equals_transformers_trainer(hf_dirs, tmp_path):
    src = hf_dirs["llama"]
    start, _ = peft_made(src, tmp_path / "start", nf4=False)  # the same start for both
    model = jqlora.load_model(src, adapter=start, quant="none", dtype="float32", remat="full")  # scanned, padded
    batch, rows = _batch()
    ours_losses, trained, opt_state = _train_ours(model, batch)
    their_losses, their_sd = _train_theirs(src, start, rows, None, tmp_path / "hf")
    np.testing.assert_allclose(ours_losses, their_losses, atol=2e-5, rtol=0)
    assert ours_losses[-1] < ours_losses[0]
    mine = adapter_tensors(trained)
    assert set(mine) == set(their_sd)
    start_sd = load_file(start / "adapter_model.safetensors")
    for key, theirs in their_sd.items():
        rel = np.max(np.abs(mine[key] - theirs)) / np.max(np.abs(theirs))
        assert rel < 2e-3, (key, rel)
        assert not np.array_equal(start_sd[key].numpy(), theirs), key  # it took steps

    # the padded entries (columns of A / rows of B past a layer's rank, all of a layer left out) stay exactly 0,
    # and so do their Adam moments
    adams = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(adams) == 1
    padded = 0
    for path, m in adapted(trained).items():
        mask = np.asarray(m.lora_mask[...]) if m.lora_mask is not None else np.ones(m.lora_a.shape[::2])
        unused_a = np.broadcast_to(mask[:, None, :] == 0, m.lora_a.shape)
        unused_b = np.broadcast_to(mask[:, :, None] == 0, m.lora_b.shape)
        parts = path.split(".")
        for name, unused in (("lora_a", unused_a), ("lora_b", unused_b)):
            tensors = [getattr(m, name)[...]]
            for moments in (adams[0].mu, adams[0].nu):
                node = moments
                for part in parts + [name]:
                    node = node[part]
                tensors.append(node[...] if hasattr(node, "get_value") else node)
            for t in tensors:
                assert np.all(np.asarray(t)[unused] == 0), (path, name)
            padded += int(unused.sum())
    assert padded > 0


def test_dora_with_layer_ranks_and_its_merge_match_peft(hf_dirs, tmp_path):
    """DoRA over per-layer ranks and alphas: peft's adapter gives peft's logits in jqlora, and the merged checkpoint
    (each layer merged at its own rank and scaling) gives jqlora's in transformers."""

    src = hf_dirs["llama"]
    torch.manual_seed(1)
    made = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True,
        rank_pattern={"model.layers.2.self_attn.q_proj": 8}, alpha_pattern={"model.layers.0.mlp.down_proj": 3}))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
            elif "magnitude" in name:
                p.mul_(1 + 0.05 * torch.randn_like(p))
    made.save_pretrained(tmp_path / "dora")
    x = ids(5)
    ours = jqlora.load_model(src, adapter=tmp_path / "dora", quant="none", dtype="float32")
    assert adapted(ours)["model.layers.self_attn.q_proj"].spec.layer_ranks == (4, 4, 8)
    np.testing.assert_allclose(jq_logits(ours, x), torch_logits(made.eval(), x), atol=1e-4, rtol=0)
    merged = AutoModelForCausalLM.from_pretrained(adapters.merge_to_hf(ours, src, tmp_path / "merged", dtype="float32"),
                                                  dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(merged, x), jq_logits(ours, x), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# One-line errors


@pytest.mark.parametrize("override,expected", [
    (["lora.rank_pattern={model.layers.1.self_attn.k_proj: 40}"],
     "lora.rank_pattern: rank 40 does not fit model.layers.1.self_attn.k_proj, a 32x64 kernel"),
    (["lora.layers_to_transform=[0, 3]"], "lora.layers_to_transform names layer(s) [3], but the model has 3 layers"),
    (["lora.init=pissa", "model.quant=none", "lora.rank_pattern={model.layers.0.self_attn.q_proj: 2}"],
     "lora.init=pissa: self_attn.q_proj has ranks / alphas that differ between layers"),
    (["lora.dora=true", "lora.layers_to_transform=[1]"],
     "lora.dora=true with self_attn.q_proj adapted in some layers only"),
], ids=["rank-does-not-fit", "missing-layer", "pissa", "dora-on-some-layers"])
def test_bad_layer_patterns_are_one_line(hf_dirs, override, expected):
    from jqlora.config import load_config
    from jqlora.run import UserError, build_model

    cfg = load_config(None, [f"model.path={hf_dirs['llama']}", "lora.r=4", "lora.targets=[q_proj,k_proj]"] + override)
    with pytest.raises(UserError) as e:
        build_model(cfg)
    assert "\n" not in str(e.value) and expected in str(e.value), str(e.value)


def test_adapter_whose_modules_use_different_layers_is_one_line(hf_dirs, tmp_path):
    """peft can adapt one kind in layers peft's layers_to_transform would not (exact names in target_modules);
    jqlora's layers_to_transform is one set for every kind."""
    src = hf_dirs["llama"]
    out, _ = peft_made(src, tmp_path / "ok", nf4=False)
    t = load_file(str(out / "adapter_model.safetensors"))
    t = {k: v for k, v in t.items() if "layers.2.self_attn.v_proj" not in k}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
    save_file(t, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterError) as e:
        read_adapter_config(bad)
    assert "\n" not in str(e.value)
    assert "self_attn.v_proj is adapted in layers [0] but not in [2]" in str(e.value)
