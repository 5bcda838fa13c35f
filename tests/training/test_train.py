"""jqlora.train / jqlora.training.optim invariants: chunked cross-entropy equals the full-logits one, k accumulated
micro-batches equal one k-times-larger batch (also with very uneven trained-token counts), every remat policy gives
the no-remat gradients, a resumed run equals an uninterrupted one, only LoRA leaves have optimizer state, and user
mistakes are one stderr line with exit code 2.

A tiny random Llama (tests/tiny.py) with the test tokenizer (tests/fixtures/tokenizer, vocab 512) and a small chat set built here.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jqlora.training import optim
from jqlora.run import restore_for_export
from jqlora.training import step as ST
from jqlora import train as T
from jqlora.config import load_config
from jqlora.run import Trainer

REPO = Path(__file__).resolve().parents[2]


# Trainers built from the same config compile the same step: reuse it (resume builds three).
pytestmark = pytest.mark.usefixtures("compilation_cache")


def _cfg(assets, out, *overrides):
    base = [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}",
            f"data.eval_path={assets / 'eval.jsonl'}", "data.max_length=48", f"output_dir={out}",
            "lora.r=4", "train.log_every=1", "train.eval_every=0", "train.warmup_steps=1", "train.learning_rate=1e-2"]
    return load_config(None, base + list(overrides))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [7, 16, 1000])
def test_chunked_ce_equals_full_logits(chunk):
    rng = np.random.default_rng(0)
    B, S, D, V = 2, 24, 16, 50
    h = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(V, D)) * 0.3, jnp.float32)
    t = jnp.asarray(rng.integers(0, V, size=(B, S)), jnp.int32)
    m = jnp.asarray(rng.random((B, S)) < 0.6, jnp.float32)
    logits = jnp.einsum("bsd,vd->bsv", h, w)
    full, g_full = jax.value_and_grad(lambda h: ST.full_ce_sum(jnp.einsum("bsd,vd->bsv", h, w), t, m))(h)
    chunked, g_chunk = jax.value_and_grad(lambda h: ST.chunked_ce_sum(h, w, t, m, chunk))(h)
    # float64 oracle on the host
    lg = np.asarray(logits, np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    oracle = float(((lse - np.take_along_axis(lg, np.asarray(t)[..., None], -1)[..., 0]) * np.asarray(m)).sum())
    np.testing.assert_allclose(float(chunked), oracle, rtol=1e-6)
    np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_chunk), np.asarray(g_full), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk", [7, 1000])
def test_chunked_eval_loss_and_token_accuracy(chunk):
    """Eval's one pass: the loss equals chunked_ce_sum and the right-token count a float64 argmax."""
    rng = np.random.default_rng(1)
    B, S, D, V = 2, 24, 16, 50
    h = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(V, D)) * 0.3, jnp.float32)
    lg = np.einsum("bsd,vd->bsv", np.asarray(h, np.float64), np.asarray(w, np.float64))
    t = np.where(rng.random((B, S)) < 0.5, lg.argmax(-1), rng.integers(0, V, (B, S)))  # about half right
    m = (rng.random((B, S)) < 0.7).astype(np.float32)
    loss, right = ST.chunked_ce_and_correct(h, w, jnp.asarray(t, jnp.int32), jnp.asarray(m), chunk)
    np.testing.assert_allclose(float(loss), float(ST.chunked_ce_sum(h, w, jnp.asarray(t), jnp.asarray(m), chunk)),
                               rtol=1e-6)
    oracle = float(((lg.argmax(-1) == t) * m).sum())
    assert float(right) == oracle and 0 < oracle < m.sum()
    # with a final soft-cap (Gemma 2) the eval loss is the capped one, as in training: float64 oracle
    cap = 0.5  # (logits here reach about ±3: the cap binds)
    capped = cap * np.tanh(lg / cap)
    lse = np.log(np.exp(capped - capped.max(-1, keepdims=True)).sum(-1)) + capped.max(-1)
    want = float(((lse - np.take_along_axis(capped, t[..., None], -1)[..., 0]) * m).sum())
    loss, _ = ST.chunked_ce_and_correct(h, w, jnp.asarray(t, jnp.int32), jnp.asarray(m), chunk, logit_cap=cap)
    train = ST.chunked_ce_sum(h, w, jnp.asarray(t, jnp.int32), jnp.asarray(m), chunk, logit_cap=cap)
    np.testing.assert_allclose([float(loss), float(train)], [want, want], rtol=1e-5)
    uncapped = float(ST.chunked_ce_sum(h, w, jnp.asarray(t, jnp.int32), jnp.asarray(m), chunk))
    assert abs(float(loss) - uncapped) > 1.0  # the cap changes the loss: this case tests something


def test_schedule_warmup_and_decay():
    cfg = load_config(None, ["train.warmup_steps=100", "train.max_steps=10", "train.lr_schedule=linear"]).train
    sched = optim.make_schedule(cfg, 10)  # warmup capped at the run's length
    assert float(sched(0)) == 0.0 and abs(float(sched(10)) - cfg.learning_rate) < 1e-9
    cfg = load_config(None, ["train.warmup_steps=2", "train.min_lr_ratio=0.1"]).train
    sched = optim.make_schedule(cfg, 12)
    lr = cfg.learning_rate
    np.testing.assert_allclose([float(sched(s)) for s in (1, 2, 12)], [lr / 2, lr, lr / 10], rtol=1e-5)


def test_accumulation_equals_big_batch(assets, tmp_path):
    # adam_eps well above the gradient noise: with 1e-8 Adam turns float32 summation order into ~5e-4 relative
    # differences of near-zero entries (the two runs add the same terms in another order)
    common = ["lora.dropout=0.0", "data.shuffle=false", "train.max_steps=3", "train.max_grad_norm=0.5",
              "train.adam_eps=1e-4"]
    big = Trainer(_cfg(assets, tmp_path / "big", "train.batch_size=4", "train.grad_accum_steps=1", *common),
                    export=False)
    small = Trainer(_cfg(assets, tmp_path / "small", "train.batch_size=1", "train.grad_accum_steps=4", *common),
                      export=False)
    counts = [big.train_ds.batch([r])["loss_mask"].sum() for r in range(4)]
    assert max(counts) > 3 * min(counts), counts  # the micro-batches really are uneven
    for _ in range(3):
        lb, nb, _ = big.one_step()
        ls, ns, _ = small.one_step()
        assert nb == ns
        np.testing.assert_allclose(ls, lb, rtol=1e-5)
    for a, b in zip(_leaves(small.lora), _leaves(big.lora)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(np.abs(x).max() > 0 for x in _leaves(big.lora)[1::2]), "lora_b never moved"


def test_remat_policies_same_gradients(assets, tmp_path):
    trainer = Trainer(_cfg(assets, tmp_path / "remat", "train.remat=none"), export=False)
    model = trainer.model
    key = jax.random.PRNGKey(1)
    lora = jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.fold_in(key, x.size), x.shape, x.dtype),
                        trainer.lora)
    batch = ST.step_batch(trainer.train_ds.batch([0, 1]))
    grads = {}
    for policy in ("none", "full", "save_dots", "offload"):
        model.remat = policy
        split = ST.SplitModel.of(model)
        fn = jax.jit(ST.make_grad_fn(split, ce_chunk=16))
        grads[policy], _ = fn(lora, split.frozen, batch, jax.random.PRNGKey(2), jnp.float32(1.0 / 50))
    ref = np.concatenate([x.ravel() for x in _leaves(grads["none"])])
    assert np.abs(ref).max() > 0
    for policy in ("full", "save_dots", "offload"):
        got = np.concatenate([x.ravel() for x in _leaves(grads[policy])])
        # float32 rounding differs with the recomputation order: compare in units of the largest gradient
        err = np.abs(got - ref).max() / np.abs(ref).max()
        print(policy, err)
        assert err < 5e-6, (policy, err)


def interrupt_at(trainer, step: int) -> None:
    """A SIGINT arriving during ``step``: the trainer stops after it as its signal handler makes it."""
    one_step = trainer.one_step

    def interrupted():
        out = one_step()
        if trainer.step == step:
            trainer._stop_signal = 2
        return out

    trainer.one_step = interrupted


def test_optimizer_state_is_lora_only(assets, tmp_path):
    trainer = Trainer(_cfg(assets, tmp_path / "opt"), export=False)
    n_lora = len(jax.tree.leaves(trainer.lora))
    assert n_lora == 2 * 7  # lora_a and lora_b of the 7 stacked linear modules
    assert trainer.opt_leaves == 3 * n_lora  # accumulated gradient, Adam mu and nu
    frozen_shapes = {np.shape(x) for x in jax.tree.leaves(trainer.split.frozen)}
    lora_elems = sum(x.size for x in jax.tree.leaves(trainer.lora))
    opt_elems = sum(np.size(x) for x in jax.tree.leaves(trainer.opt_state) if np.ndim(x) > 0)
    assert opt_elems == 3 * lora_elems
    assert (512, 64) in frozen_shapes  # the embedding is frozen, and in no optimizer state
    assert all(np.shape(x) != (512, 64) for x in jax.tree.leaves(trainer.opt_state))


def _losses(out):
    rows = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows]


def test_resume_equals_uninterrupted(assets, tmp_path):
    args = ["train.max_steps=6", "train.save_every=3", "train.batch_size=2", "train.grad_accum_steps=2",
            "lora.dropout=0.1"]
    straight = Trainer(_cfg(assets, tmp_path / "a", *args), export=False)
    assert straight.run() == 0

    first = Trainer(_cfg(assets, tmp_path / "b", *args), export=False)
    interrupt_at(first, 3)
    assert first.run() == 130  # stopped by SIGINT: 128 + 2, as a shell reports it
    assert first.run_dir.latest_step() == 3
    assert max(s for s, _, _ in _losses(tmp_path / "b")) == 3

    second = Trainer(_cfg(assets, tmp_path / "b", *args), export=False)
    assert second.run() == 0
    for a, b in zip(_leaves(second.lora), _leaves(straight.lora)):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=0)
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    assert (tmp_path / "b" / "loss.png").is_file()


def test_nan_loss_stops_and_keeps_last_checkpoint(assets, tmp_path, capsys):
    trainer = Trainer(_cfg(assets, tmp_path / "nan", "train.max_steps=4", "train.save_every=1"), export=False)
    one_step = trainer.one_step

    def poisoned():
        loss, n, t = one_step()
        return (float("nan"), n, t) if trainer.step == 3 else (loss, n, t)

    trainer.one_step = poisoned
    assert trainer.run() == 1
    # the loss of step 3 is the loss of the state saved after step 2: that checkpoint is moved aside (kept as it
    # was), and step 1 is named as the last good one
    assert trainer.run_dir.latest_step() == 1
    (moved,) = (tmp_path / "nan" / "checkpoints.bad").iterdir()
    assert moved.name.startswith("2-")
    from jqlora.run.checksums import verify_checkpoint

    assert verify_checkpoint(moved) is None  # every file as it was saved
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "last good checkpoint: step 1" in err


@pytest.mark.parametrize("override, expect", [
    ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
    ("model.path=/nonexistent/model data.path=x.jsonl", "/nonexistent/model"),
    ("output_dir=/proc/jqlora-not-writable", "not writable"),
])
def test_user_mistake_is_one_line_exit_2(override, expect, capsys):
    assert T.main(["--no-progress", *override.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and "Traceback" not in err, err


def test_cli_bad_config_subprocess(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learnig_rate: 1e-4\n")
    proc = subprocess.run([sys.executable, "-m", "jqlora.train", "--config", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.learnig_rate" in lines[0], proc.stderr


def test_export_from_a_run_directory(assets, tmp_path):
    """`python -m jqlora.export RUN_DIR` writes the adapter of the latest (or --step N) checkpoint, which peft loads
    to the restored model's logits; `--merge` writes a plain model transformers loads to the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = _cfg(assets, out, "model.quant=none", "train.max_steps=3", "train.save_every=2", "train.keep_checkpoints=5")
    assert Trainer(cfg, progress=False).run() == 0
    x = np.random.default_rng(0).integers(0, 512, (2, 10)).astype(np.int32)

    def export(*args):
        r = subprocess.run([sys.executable, "-m", "jqlora.export", *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    logits = {}
    for step in (2, 3):
        model, _, got = restore_for_export(out, step=step)
        assert got == step
        logits[step] = np.asarray(model(jnp.asarray(x)))
    assert np.abs(logits[2] - logits[3]).max() > 1e-4  # the two checkpoints hold different adapters
    export(out, tmp_path / "latest")
    export(out / "checkpoints" / "2", tmp_path / "step2")
    for name, step in (("latest", 3), ("step2", 2)):
        base = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(base, tmp_path / name).eval()
        with torch.no_grad():
            got = peft_model(torch.from_numpy(x).long()).logits.numpy()
        np.testing.assert_allclose(got, logits[step], atol=1e-4, rtol=0)
    export(out, tmp_path / "merged", "--merge", "--dtype", "float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.from_numpy(x).long()).logits.numpy(), logits[3], atol=1e-4, rtol=0)
    r = subprocess.run([sys.executable, "-m", "jqlora.export", str(out), str(tmp_path / "x"), "--step", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no checkpoint for step 1 (have 2, 3)" in r.stderr, r.stderr
