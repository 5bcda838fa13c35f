"""lora.init on a model, tiny Llama and Qwen2, through jqlora.run.loop.Trainer: PiSSA leaves the float32 model's logits
as transformers computes them and its exported (converted, rank-2r) adapter gives, in peft on the original base, the
trained model's logits; LoftQ's start is closer to the float base than plain NF4's, and its exported adapter on the
saved LoftQ base gives the trained logits in peft; gaussian's export (B randomized) gives our logits in peft with
the adapter_config peft writes for that init; bad combinations are one line, exit 2."""

import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny import make_model

from jqlora import train as T
from jqlora.config import load_config
from jqlora.run import build_model
from jqlora.run import Trainer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def qwen2(assets, tmp_path_factory):
    path = make_model(tmp_path_factory.mktemp("qwen2") / "model", "qwen2", torch.float32, vocab_size=512,
                      hidden_size=64, intermediate_size=128, max_position_embeddings=128)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(assets / "model" / name, path / name)
    return path


def _cfg(model, assets, out, *overrides):
    base = [f"model.path={model}", f"data.path={assets / 'train.jsonl'}", "data.max_length=48", f"output_dir={out}",
            "lora.r=4", "lora.dropout=0", "train.max_steps=2", "train.batch_size=4", "train.grad_accum_steps=1",
            "train.warmup_steps=0", "train.learning_rate=1e-2", "train.eval_every=0", "train.log_every=1"]
    return load_config(None, base + list(overrides))


def _hf_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x).long()).logits.numpy()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pissa_and_loftq(assets, qwen2, tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = assets / "model" if family == "llama" else qwen2
    x = np.random.default_rng(0).integers(0, 512, (2, 12)).astype(np.int32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = _hf_logits(hf, x)

    # PiSSA on a float32 base: unchanged at step 0; the exported adapter is peft's conversion onto the original base
    cfg = _cfg(path, assets, tmp_path / "pissa", "model.quant=none", "lora.init=pissa")
    start = build_model(cfg)
    np.testing.assert_allclose(np.asarray(start(jnp.asarray(x))), want, atol=1e-4, rtol=0)
    trainer = Trainer(cfg, progress=False)
    assert trainer.run() == 0
    got = np.asarray(trainer.split.model(trainer.lora)(jnp.asarray(x)))
    assert np.abs(got - want).max() > 1e-3  # (it trained)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "pissa" / "adapter").eval()
    assert peft_model.peft_config["default"].r == 8
    np.testing.assert_allclose(_hf_logits(peft_model, x), got, atol=1e-4, rtol=0)

    # LoftQ on NF4 + DQ: nearer the float base than plain NF4 at step 0; the adapter loads on the saved base
    plain = build_model(_cfg(path, assets, tmp_path / "x"))
    cfg = _cfg(path, assets, tmp_path / "loftq", "lora.init=loftq", "lora.loftq_iters=2")
    loftq = build_model(cfg)
    err_plain = np.abs(np.asarray(plain(jnp.asarray(x))) - want).max()
    err_loftq = np.abs(np.asarray(loftq(jnp.asarray(x))) - want).max()
    assert err_loftq < err_plain, (err_loftq, err_plain)
    trainer = Trainer(cfg, progress=False)
    assert trainer.run() == 0
    got = np.asarray(trainer.split.model(trainer.lora)(jnp.asarray(x)))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "loftq" / "base", dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "loftq" / "adapter").eval()
    np.testing.assert_allclose(_hf_logits(peft_model, x), got, atol=1e-3, rtol=0)


@pytest.mark.parametrize("extra, expect", [
    ("lora.init=loftq model.quant=none", "lora.init='loftq' needs a quantized base"),
    ("lora.init=pissa lora.r=80", "lora.init=pissa: rank 80 does not fit mlp.down_proj, a 64x128 kernel"),
    ("lora.init=gauss", "lora.init='gauss' must be one of default, gaussian, pissa, loftq"),
])
def test_bad_init_is_one_line(assets, tmp_path, capsys, extra, expect):
    args = [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}", f"output_dir={tmp_path / 'o'}",
            "train.max_steps=1"]
    assert T.main(["--no-progress", *args, *extra.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and "Traceback" not in err, err


def test_loftq_resume_and_export_take_the_saved_start(assets, tmp_path, monkeypatch):
    """resume = uninterrupted, with the SVDs switched off after the start: the resumed run and the export read the
    adjusted base and initial adapters the run's start saved (init_state) instead of computing LoftQ again."""
    from jqlora.lora import initialize as lora_init
    from jqlora.run import restore_for_export

    x = jnp.asarray(np.random.default_rng(1).integers(0, 512, (2, 12)).astype(np.int32))
    args = ("lora.init=loftq", "lora.loftq_iters=2", "train.max_steps=3")
    whole = Trainer(_cfg(assets / "model", assets, tmp_path / "whole", *args), progress=False)
    assert whole.run() == 0
    want = np.asarray(whole.split.model(whole.lora)(x))

    first = Trainer(_cfg(assets / "model", assets, tmp_path / "run", *args, "train.stop_at_step=1"), progress=False)
    assert first.run() == 0 and first.step == 1
    assert (tmp_path / "run" / "init_state" / "init_state.json").is_file()

    def no_svds(*a, **k):
        raise AssertionError("lora.init computed again")

    monkeypatch.setattr(lora_init, "apply", no_svds)
    resumed = Trainer(_cfg(assets / "model", assets, tmp_path / "run", *args), progress=False)
    assert resumed.run() == 0 and resumed.step == 3
    got = np.asarray(resumed.split.model(resumed.lora)(x))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert np.abs(got - np.asarray(build_model(_cfg(assets / "model", assets, tmp_path / "x"))(x))).max() > 1e-3
    exported, _, step = restore_for_export(tmp_path / "run")
    assert step == 3
    np.testing.assert_allclose(np.asarray(exported(x)), want, atol=1e-6, rtol=0)

    # other settings in the same directory: not used (computed again, here refused by the patch)
    with pytest.raises(AssertionError, match="computed again"):
        build_model(_cfg(assets / "model", assets, tmp_path / "run", "lora.init=loftq", "lora.loftq_iters=1"),
                    run_dir=str(tmp_path / "run"))


def test_gaussian_export_is_peft_gaussian(assets, tmp_path):
    """lora.init=gaussian: peft's law at the start (A ~ N(0, 1/r²), B = 0); with B then randomized (so the adapter is
    not a no-op) the exported adapter gives our logits in peft, and its adapter_config is what peft writes for a
    gaussian LoRA of these settings."""
    import json

    from flax import nnx
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from jqlora.adapters import init_state
    from jqlora.lora import LoraLinear

    path = assets / "model"
    cfg = _cfg(path, assets, tmp_path / "run", "model.quant=none", "lora.init=gaussian", "lora.alpha=8")
    model = build_model(cfg)
    a = np.concatenate([np.asarray(m.lora_a.get_value()).ravel() for _, m in nnx.iter_modules(model)
                        if isinstance(m, LoraLinear) and m.lora_a is not None])
    assert abs(a.std() * cfg.lora.r - 1) < 0.05 and abs(a.mean()) < 0.01, (a.std(), a.mean())
    g = np.random.default_rng(0)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoraLinear) and m.lora_a is not None:
            assert not np.any(np.asarray(m.lora_b.get_value()))
            m.lora_b.set_value(jnp.asarray(0.3 * g.standard_normal(m.lora_b.shape), m.lora_b.dtype))
    out = init_state.save_adapter(model, cfg, tmp_path / "run", tmp_path / "adapter", lora_config=model.lora_config,
                                  base=str(path))
    x = np.random.default_rng(1).integers(0, 512, (2, 12)).astype(np.int32)
    got = np.asarray(model(jnp.asarray(x)))

    def hf():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    assert np.abs(got - _hf_logits(hf(), x)).max() > 1e-2  # the adapter matters
    theirs = PeftModel.from_pretrained(hf(), out).eval()
    np.testing.assert_allclose(_hf_logits(theirs, x), got, atol=1e-4, rtol=0)
    ours = json.loads((out / "adapter_config.json").read_text())
    ref_model = get_peft_model(hf(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="gaussian",
                                                target_modules=ours["target_modules"], task_type="CAUSAL_LM"))
    ref_model.save_pretrained(tmp_path / "peft")
    ref = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours) == set(ref) - {"peft_version"}
    assert ours["init_lora_weights"] == "gaussian"
    assert {k: v for k, v in ours.items() if k != "target_modules"} == {
        k: v for k, v in ref.items() if k not in ("target_modules", "peft_version")}
    assert ours["target_modules"] == sorted(ref["target_modules"])
