"""The MoE load-balancing auxiliary loss (train.router_aux_loss_coef) against transformers: jqlora's training
objective and its adapter gradients equal peft-on-Mixtral's ``loss`` with output_router_logits=True (float32, a
padded row), accumulation averages the micro-batches' aux losses as documented in jqlora/training/step.py, the default 0 is
the plain CE, and a nonzero coef on a dense model is one line."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from tiny import make_model, make_moe_model, randomize_lora
from transformers import AutoModelForCausalLM

import jqlora
from jqlora.training import step
from jqlora import train as T
from jqlora.config import TrainConfig
from jqlora.lora import LoraConfig
from jqlora.models import moe
from jqlora.adapters import save_adapter

LORA = LoraConfig(r=4, alpha=8, targets="all-linear")  # the attention projections on Mixtral
COEF = 0.5  # large, so the aux term visibly moves the adapter gradients
B, S = 2, 20




def _inputs():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 128, (B, S)).astype(np.int32)
    attn = np.ones((B, S), np.int32)
    attn[1, 14:] = 0  # a right-padded row: its padding is out of the CE and of the aux statistics
    labels = np.where(attn == 1, x, -100)
    labels[0, 5] = -100  # an ignored label on a real token (still counted by the aux loss, as in transformers)
    # jqlora's batch of the same rows: transformers shifts labels inside the loss
    targets = np.zeros_like(x)
    targets[:, :-1] = np.maximum(labels[:, 1:], 0)
    mask = np.zeros_like(x)
    mask[:, :-1] = labels[:, 1:] != -100
    batch = {"input_ids": x, "targets": targets, "loss_mask": mask, "segment_ids": attn,
             "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))}
    return x, attn, labels, {k: jnp.asarray(v) for k, v in batch.items()}


def _peft_grads(theirs):
    out = {}
    for name, p in theirs.named_parameters():
        if "lora_" in name:
            parts = name.split(".")
            i = int(parts[parts.index("layers") + 1])
            proj, ab = parts[parts.index("layers") + 3], parts[parts.index("layers") + 4]
            out[(i, proj, ab)] = p.grad.numpy().T  # torch [r, in] / [out, r]; ours [in, r] / [r, out]
    return out


def test_aux_loss_and_gradients_match_transformers(tmp_path):
    _, path = make_moe_model(tmp_path / "hf", "mixtral")
    ours = jqlora.load_model(path, quant="none", dtype="float32", lora=LORA)  # scanned layers, remat "full"
    randomize_lora(ours, seed=1, scale=0.1)
    ad = save_adapter(ours, tmp_path / "ad", lora_config=LORA, base_model_name_or_path=str(path))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    base.router_aux_loss_coef = COEF
    theirs = peft.PeftModel.from_pretrained(base, str(ad), is_trainable=True).eval()

    x, attn, labels, batch = _inputs()
    t = {k: torch.from_numpy(v).long() for k, v in (("x", x), ("a", attn), ("l", labels))}
    out = theirs(t["x"], attention_mask=t["a"], labels=t["l"], output_router_logits=True)
    out.loss.backward()
    want_loss, want_aux = float(out.loss.detach()), float(out.aux_loss.detach())
    want_g = _peft_grads(theirs)
    with torch.no_grad():
        plain_loss = float(theirs(t["x"], attention_mask=t["a"], labels=t["l"]).loss)

    split = step.SplitModel.of(ours)
    n = float(jnp.sum(batch["loss_mask"]))
    fn = jax.jit(step.make_grad_fn(split, ce_chunk=16, aux_coef=COEF))
    g, s = fn(split.lora, split.frozen, batch, None, jnp.float32(1.0 / n))
    np.testing.assert_allclose(float(s) / n, want_loss, rtol=1e-5)  # CE + coef · aux, the logged loss

    # the per-layer statistics out of the scan give transformers' aux loss; the router picks count top-k
    _, stats_L2E = ours.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"],
                                    router_stats_mask=batch["segment_ids"])
    np.testing.assert_allclose(float(moe.aux_from_stats(stats_L2E, batch["segment_ids"].reshape(-1), B * S)),
                               want_aux, rtol=1e-5)
    assert np.allclose(np.asarray(stats_L2E[:, 0].sum(-1)), 2 * float(attn.sum()))
    ours.scan_layers = False  # the unrolled stack gathers the same per-layer statistics
    _, unrolled = ours.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"],
                                     router_stats_mask=batch["segment_ids"])
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(stats_L2E), rtol=1e-5, atol=1e-5)
    ours.scan_layers = True

    # default 0: exactly the old path (the plain CE), and transformers' loss without the aux term
    assert TrainConfig().router_aux_loss_coef == 0.0
    g0, s0 = jax.jit(step.make_grad_fn(split, ce_chunk=16))(split.lora, split.frozen, batch, None,
                                                            jnp.float32(1.0 / n))
    ce = step.make_loss_fn(split, ce_chunk=16)(split.lora, split.frozen, batch, None, True)[0]
    np.testing.assert_allclose(float(s0), float(ce), rtol=1e-6)  # (jitted with its gradient vs alone: float32 order)
    np.testing.assert_allclose(float(s0) / n, plain_loss, rtol=1e-5)
    np.testing.assert_allclose(float(s - s0) / n, COEF * want_aux, rtol=1e-4)

    layers = g["model"]["layers"]["self_attn"]
    moved = 0.0
    for (i, proj, ab), want in want_g.items():
        got = np.asarray(layers[proj]["lora_a" if ab == "lora_A" else "lora_b"][i])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        plain = np.asarray(g0["model"]["layers"]["self_attn"][proj]["lora_a" if ab == "lora_A" else "lora_b"][i])
        moved = max(moved, np.abs(got - plain).max() / np.abs(want).max())
    assert len(want_g) == 2 * 4 * ours.config.num_hidden_layers
    assert moved > 1e-2  # the aux term moves the adapters (through the router's inputs), so the check has teeth

    # accumulation (k = 2, grad_scale = k/N): Σ_j Σℓ_j / N = mean CE over both + coef · mean of the two aux losses
    halves = []
    for r in (slice(0, 1), slice(1, 2)):
        with torch.no_grad():
            o = theirs(t["x"][r], attention_mask=t["a"][r], labels=t["l"][r], output_router_logits=True)
        n_r = float(jnp.sum(batch["loss_mask"][r]))
        halves.append(((float(o.loss) - COEF * float(o.aux_loss)) * n_r, float(o.aux_loss)))
    want_acc = sum(h[0] for h in halves) / n + COEF * np.mean([h[1] for h in halves])
    got_acc = sum(float(fn(split.lora, split.frozen, {k: v[r] for k, v in batch.items()}, None,
                           jnp.float32(2.0 / n))[1]) for r in (slice(0, 1), slice(1, 2))) / n
    np.testing.assert_allclose(got_acc, want_acc, rtol=1e-5)


def test_nonzero_coef_on_a_dense_model_is_one_line(tmp_path, capsys):
    path = make_model(tmp_path / "llama")
    dense = jqlora.load_model(path, quant="none", dtype="float32", lora=LORA)
    with pytest.raises(ValueError, match="router_aux_loss_coef: 0.1 needs a model with experts") as e:
        step.make_grad_fn(step.SplitModel.of(dense), aux_coef=0.1)
    assert "\n" not in str(e.value)
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    out = tmp_path / "out"
    capsys.readouterr()  # (the model writer's progress bar)
    assert T.main(["--no-progress", f"model.path={path}", f"data.path={data}", f"output_dir={out}",
                   "train.router_aux_loss_coef=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.router_aux_loss_coef=0.1 needs a model with experts" in err, err
    assert "Traceback" not in err and not any(out.iterdir())  # nothing written but the (released) run lock
    assert T.main(["--no-progress", "train.router_aux_loss_coef=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.router_aux_loss_coef=-1" in err and "must be >= 0" in err, err
