"""DoRA (QDoRA on the NF4 base) and LoRA+ against peft and the transformers Trainer.

- DoRA logits: an adapter exported by jqlora gives peft's logits, and an adapter peft made gives jqlora's, on a
  float32 base (1e-4) and on the bitsandbytes NF4 base (1e-3), for Llama and Qwen2.
- Training: 5 steps of jqlora's jitted step (plain LoRA, LoRA+, DoRA) equal 5 steps of peft + transformers' Trainer
  (LoRA+ through `peft.optimizers.create_loraplus_optimizer`) from the same adapter on the same batch: losses within
  2e-5, adapters within 2e-3 relative. adam_eps is 1e-4 so near-zero gradients do not amplify float32 noise.
- Bad input: an adapter config with use_dora=true but no magnitudes is one AdapterError line.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from tiny import make_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import jqlora
from jqlora.training import optim
from jqlora.training import step as ST
from jqlora.config import TrainConfig
from jqlora.lora import LoraConfig, LoraLinear
from jqlora.adapters import AdapterError, adapter_tensors, read_adapter_config, save_adapter
from jqlora import adapters

FAMILIES = ("llama", "qwen2")
TARGETS = ("q_proj", "v_proj", "down_proj")
LR, WD, EPS, RATIO, STEPS = 2e-3, 0.01, 1e-4, 4.0, 5


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {f: make_model(root / f, f, torch.float32, seed=3) for f in FAMILIES}


def ids(seed=0, shape=(2, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, shape).astype(np.int32)


def adapted(model):
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, LoraLinear) and m.lora_a is not None]


def randomize(model, seed: int, scale: float = 0.2) -> None:
    """Nonzero A and B, and magnitudes off their start by a few percent (a fresh adapter would hide all of it)."""
    key = jax.random.key(seed)
    for i, m in enumerate(adapted(model)):
        ka, kb, km = jax.random.split(jax.random.fold_in(key, i), 3)
        m.lora_a.set_value(scale * jax.random.normal(ka, m.lora_a.shape))
        m.lora_b.set_value(scale * jax.random.normal(kb, m.lora_b.shape))
        if m.magnitude is not None:
            m.magnitude.set_value(m.magnitude[...] * (1 + 0.05 * jax.random.normal(km, m.magnitude.shape)))


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x).long()).logits.float().numpy()


def hf_base(src: Path, nf4: bool):
    if not nf4:
        return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# DoRA logits, both directions


@pytest.mark.parametrize("nf4", [False, True], ids=["float32", "nf4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dora_export_and_import_match_peft(hf_dirs, tmp_path, family, nf4):
    src, quant, tol = hf_dirs[family], ("nf4" if nf4 else "none"), (1e-3 if nf4 else 1e-4)
    x = ids(1)
    # jqlora -> peft
    lora = LoraConfig(r=4, alpha=8, targets=TARGETS, dora=True)
    ours = jqlora.load_model(src, quant=quant, dtype="float32", lora=lora)
    randomize(ours, seed=1)
    out = save_adapter(ours, tmp_path / "ours", lora_config=lora, base_model_name_or_path=str(src))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(hf_base(src, nf4), str(out))
    theirs.train()  # bitsandbytes' exact CPU path (tests/test_load.py); no dropout in these models
    their_keys = set(peft.get_peft_model_state_dict(theirs))
    assert their_keys == set(adapter_tensors(ours))  # ...lora_magnitude_vector keys, as peft names them
    np.testing.assert_allclose(torch_logits(theirs, x), np.asarray(ours(jnp.asarray(x))), atol=tol, rtol=0)

    # peft -> jqlora: peft initializes the magnitudes from its own (dequantized) base; perturb everything
    torch.manual_seed(2)
    made = peft.get_peft_model(hf_base(src, nf4), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["k_proj", "up_proj"],
        use_dora=True))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_" in name:
                p.mul_(1 + 0.05 * torch.randn_like(p)) if "magnitude" in name else p.copy_(0.2 * torch.randn_like(p))
    made.save_pretrained(tmp_path / "theirs")
    mine = jqlora.load_model(src, quant=quant, dtype="float32", adapter=tmp_path / "theirs")
    made.train()
    np.testing.assert_allclose(np.asarray(mine(jnp.asarray(x))), torch_logits(made, x), atol=tol, rtol=0)


def test_use_dora_without_magnitudes_is_one_line(hf_dirs, tmp_path):
    src = hf_dirs["llama"]
    lora = LoraConfig(r=4, alpha=8, targets=("q_proj",), dora=True)
    out = save_adapter(jqlora.load_model(src, quant="none", dtype="float32", lora=lora), tmp_path / "ad",
                       lora_config=lora)
    weights = out / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "magnitude" not in k}, weights)
    with pytest.raises(AdapterError) as e:
        read_adapter_config(out)
    msg = str(e.value)
    assert "\n" not in msg and "use_dora=true" in msg and "model.layers.0.self_attn.q_proj" in msg


# ----------------------------------------------------------------------------------------------------------------
# Training: 5 steps equal to peft + the transformers Trainer


def _batch(seed: int = 5, B: int = 4, S: int = 24):
    """Token rows whose first 6 positions are prompt (no loss); ours shifts targets, HF shifts labels."""
    x = ids(seed, (B, S)).astype(np.int64)
    labels = x.copy()
    labels[:, :6] = -100
    mask = np.zeros((B, S), np.float32)
    mask[:, :-1] = labels[:, 1:] != -100
    targets = np.zeros((B, S), np.int32)
    targets[:, :-1] = x[:, 1:]
    ours = {"input_ids": jnp.asarray(x, jnp.int32), "targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask),
            "segment_ids": jnp.ones((B, S), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))}
    rows = [{"input_ids": torch.from_numpy(x[i]), "labels": torch.from_numpy(labels[i]),
             "attention_mask": torch.ones(S, dtype=torch.long)} for i in range(B)]
    return ours, rows


def _train_ours(model, batch, plus_ratio=None):
    """STEPS steps of jqlora's own train step on one batch: (losses, trained model, optimizer state)."""
    tc = TrainConfig(batch_size=4, grad_accum_steps=1, max_steps=STEPS, learning_rate=LR, lr_schedule="constant",
                     warmup_steps=0, weight_decay=WD, adam_eps=EPS, max_grad_norm=1.0)
    split = ST.SplitModel.of(model)
    tx, _ = optim.make_optimizer(tc, STEPS, plus_ratio)
    step = ST.make_train_step(split, tx)
    lora, opt_state = split.lora, tx.init(split.lora)
    n = float(batch["loss_mask"].sum())
    losses = []
    for _ in range(STEPS):
        lora, opt_state, loss_sum = step(lora, opt_state, split.frozen, batch, jax.random.key(0), 1.0 / n)
        losses.append(float(loss_sum) / n)
    return losses, split.model(lora), opt_state


def _train_theirs(src, adapter_dir, rows, plus_ratio, out_dir):
    from transformers import Trainer, TrainingArguments

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32),
                                           str(adapter_dir), is_trainable=True)
    losses = []

    class Recording(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, **kw)
            losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    args = TrainingArguments(output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=len(rows),
                             learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=WD,
                             adam_epsilon=EPS, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, remove_unused_columns=False, seed=0,
                             disable_tqdm=True)
    optimizers = (None, None)
    if plus_ratio:
        from peft.optimizers import create_loraplus_optimizer

        optimizers = (create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=plus_ratio,
                                                loraplus_weight_decay=WD, eps=EPS, betas=(0.9, 0.999)), None)
    Recording(model=model, args=args, train_dataset=rows, optimizers=optimizers).train()
    sd = peft.get_peft_model_state_dict(model, save_embedding_layers=False)  # (no full copy of the embedding)
    return losses, {k: v.detach().float().numpy() for k, v in sd.items()}


@pytest.mark.parametrize("variant,family", [("lora", "llama"), ("dora+loraplus", "llama"),
                                            ("loraplus+embed", "qwen2")])
def test_training_equals_transformers_trainer(hf_dirs, tmp_path, variant, family):
    """Plain LoRA; DoRA under LoRA+ (the magnitudes train with B, as peft's groupB); LoRA+ with an embedding adapter
    (peft's third group, loraplus_lr_embedding). The test file's CI budget allows three of these."""
    src = hf_dirs[family]
    targets = TARGETS + (("embed_tokens",) if "embed" in variant else ())
    lora = LoraConfig(r=4, alpha=8, targets=targets, dora="dora" in variant)
    plus = RATIO if "loraplus" in variant else None
    model = jqlora.load_model(src, quant="none", dtype="float32", lora=lora, remat="none")
    randomize(model, seed=6, scale=0.05)  # B != 0, so A has gradients from the first step
    start = save_adapter(model, tmp_path / "start", lora_config=lora)
    ours_batch, rows = _batch()
    ours_losses, trained, _ = _train_ours(model, ours_batch, plus)
    their_losses, their_sd = _train_theirs(src, start, rows, plus, tmp_path / "hf")
    assert len(their_losses) == STEPS
    np.testing.assert_allclose(ours_losses, their_losses, atol=2e-5, rtol=0)
    assert ours_losses[-1] < ours_losses[0]  # it trained
    mine = adapter_tensors(trained)
    assert set(mine) == set(their_sd)
    start_sd = load_file(start / "adapter_model.safetensors")
    moved = 0
    for key, theirs in their_sd.items():
        rel = np.max(np.abs(mine[key] - theirs)) / np.max(np.abs(theirs))
        assert rel < 2e-3, (key, rel)
        moved += not np.array_equal(start_sd[key].numpy(), theirs)
    assert moved == len(their_sd)  # every tensor (A, B, magnitudes) took steps


# ----------------------------------------------------------------------------------------------------------------
# embed_tokens / lm_head as LoRA targets (peft's lora.Embedding and lora.Linear on the head)


@pytest.mark.parametrize("family,tied,nf4", [("llama", False, False), ("qwen2", True, True)],
                         ids=["llama-float32", "qwen2-tied-nf4"])
def test_embed_and_lm_head_adapters_match_peft(tmp_path, family, tied, nf4):
    src = make_model(tmp_path / "base", family, torch.float32, seed=7, tie_word_embeddings=tied)
    quant, tol = ("nf4", 1e-3) if nf4 else ("none", 1e-4)
    targets = ("embed_tokens", "v_proj") + (() if tied else ("lm_head",))
    x = ids(8)
    # jqlora -> peft
    lora = LoraConfig(r=4, alpha=8, targets=targets, rank_pattern={"embed_tokens": 2})
    ours = jqlora.load_model(src, quant=quant, dtype="float32", lora=lora)
    randomize(ours, seed=9)
    emb = ours.model.embed_tokens
    emb.lora_embedding_a.set_value(0.3 * jax.random.normal(jax.random.key(1), emb.lora_embedding_a.shape))
    if not tied:
        ours.lm_head.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(2), ours.lm_head.lora_b.shape))
    out = save_adapter(ours, tmp_path / "ours", lora_config=lora)
    theirs = peft.PeftModel.from_pretrained(hf_base(src, nf4), str(out))
    theirs.train()
    assert set(peft.get_peft_model_state_dict(theirs, save_embedding_layers=False)) == set(adapter_tensors(ours))
    np.testing.assert_allclose(torch_logits(theirs, x), np.asarray(ours(jnp.asarray(x))), atol=tol, rtol=0)
    # peft -> jqlora
    torch.manual_seed(3)
    made = peft.get_peft_model(hf_base(src, nf4), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=12, lora_dropout=0.0, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    made.save_pretrained(tmp_path / "theirs")
    mine = jqlora.load_model(src, quant=quant, dtype="float32", adapter=tmp_path / "theirs")
    made.train()
    np.testing.assert_allclose(np.asarray(mine(jnp.asarray(x))), torch_logits(made, x), atol=tol, rtol=0)


def test_lm_head_target_on_tied_embeddings_is_one_line(tmp_path):
    from jqlora.config import load_config
    from jqlora.run import UserError, build_model

    src = make_model(tmp_path / "tied", "qwen2", torch.float32, tie_word_embeddings=True)
    cfg = load_config(None, [f"model.path={src}", "lora.targets=[q_proj,lm_head]", "lora.dropout=0"])
    with pytest.raises(UserError) as e:
        build_model(cfg)
    assert "\n" not in str(e.value) and "lm_head" in str(e.value) and "tie_word_embeddings" in str(e.value)


@pytest.mark.parametrize("override,key", [(["lora.targets=[lm_head]"], "lora.dropout"),
                                          (["lora.targets=[embed_tokens]", "lora.dora=true"], "lora.dora")])
def test_head_target_settings_refused_in_config(override, key):
    from jqlora.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert "\n" not in str(e.value) and key in str(e.value)


def test_merge_of_dora_and_head_adapters_equals_the_adapter(hf_dirs, tmp_path):
    """The merged checkpoint (DoRA kernels, embedding and head deltas folded in) gives jqlora-with-adapter's logits
    in transformers, as a plain model."""

    src = hf_dirs["llama"]
    lora = LoraConfig(r=4, alpha=8, targets=("q_proj", "down_proj", "embed_tokens", "lm_head"))
    dora = LoraConfig(r=4, alpha=8, targets=("k_proj", "up_proj"), dora=True)
    x = ids(11)
    for name, cfg in (("heads", lora), ("dora", dora)):
        model = jqlora.load_model(src, quant="nf4", dtype="float32", lora=cfg)
        randomize(model, seed=12)
        if name == "heads":
            emb = model.model.embed_tokens
            emb.lora_embedding_a.set_value(0.3 * jax.random.normal(jax.random.key(3), emb.lora_embedding_a.shape))
            model.lm_head.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(4), model.lm_head.lora_b.shape))
        out = adapters.merge_to_hf(model, src, tmp_path / name, dtype="float32")
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        np.testing.assert_allclose(torch_logits(merged, x), np.asarray(model(jnp.asarray(x))), atol=1e-4, rtol=0)
