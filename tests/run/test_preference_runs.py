"""Preference runs end to end on the tiny Llama of the `assets` fixture (NF4 + DQ base, the test tokenizer):
the first DPO loss is ln 2 exactly (a fresh adapter, B = 0: policy = reference; and reference=init after
lora.init_from, while reference=base with that adapter is not), k accumulated micro-batches equal one k-times-larger
batch, a resumed run equals an uninterrupted one (the init reference travels in the checkpoint), and the CLI trains
on a jsonl file, logging TRL's metric names, or refuses bad preference data in one line, writing nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from jqlora.config import load_config
from jqlora.run import PreferenceTrainer

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("compilation_cache")
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _prefs(n: int = 8) -> list[dict]:
    return [{"prompt": f"Say {i}" + " now" * (i % 3), "chosen": f" {i}" + " yes" * (i % 5),
             "rejected": " no" * (1 + (3 * i) % 7)} for i in range(n)]


@pytest.fixture(scope="module")
def pref(assets, tmp_path_factory):
    import peft
    import transformers

    root = tmp_path_factory.mktemp("pref_runs")
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _prefs()))
    base = transformers.AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=MODULES))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(root / "adapter")
    return root


def _cfg(assets, pref, out, *overrides):
    return load_config(None, [
        f"model.path={assets / 'model'}", f"data.path={pref / 'prefs.jsonl'}", "data.max_length=32",
        f"output_dir={out}", "lora.r=4", "lora.alpha=8", "lora.dropout=0", "train.log_every=1", "train.eval_every=0",
        "train.warmup_steps=0", "train.learning_rate=1e-2", "train.objective=dpo", "log.tensorboard=false",
        "data.shuffle=false", *overrides])


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_first_dpo_loss_is_ln2(assets, pref, tmp_path):
    one = ["train.max_steps=1", "train.batch_size=2", "train.grad_accum_steps=2"]
    fresh = PreferenceTrainer(_cfg(assets, pref, tmp_path / "fresh", *one), export=False)
    fresh.maybe_resume()
    assert fresh.one_step()[0] == np.float32(math.log(2))  # exactly: policy and reference are the same numbers
    init = [f"lora.init_from={pref / 'adapter'}"]
    ref_init = PreferenceTrainer(_cfg(assets, pref, tmp_path / "init", *one, *init, "preference.reference=init"),
                                 export=False)
    ref_init.maybe_resume()
    assert ref_init.one_step()[0] == np.float32(math.log(2))
    ref_base = PreferenceTrainer(_cfg(assets, pref, tmp_path / "base", *one, *init), export=False)
    ref_base.maybe_resume()
    assert abs(ref_base.one_step()[0] - math.log(2)) > 1e-3  # the trained adapter is not the base


def test_dora_base_reference_is_the_base(assets, pref, tmp_path):
    """reference=base with DoRA: the reference tree has A = B = 0 and magnitudes ‖W‖, i.e. the base itself, so a
    fresh DoRA adapter (policy = base) starts at ln 2 exactly; any other magnitude would not."""
    cfg = _cfg(assets, pref, tmp_path / "dora", "lora.dora=true", "train.max_steps=1", "train.batch_size=2",
               "train.grad_accum_steps=1")
    t = PreferenceTrainer(cfg, export=False)
    t.maybe_resume()
    mags = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(t.ref_lora) if "magnitude" in str(p)]
    assert mags and all(m.min() > 0 for m in mags)
    assert t.one_step()[0] == np.float32(math.log(2))


def test_accumulation_equals_big_batch(assets, pref, tmp_path):
    common = ["train.max_steps=3", "train.adam_eps=1e-4", "train.max_grad_norm=0.5"]
    big = PreferenceTrainer(_cfg(assets, pref, tmp_path / "big", "train.batch_size=4", "train.grad_accum_steps=1",
                                 *common), export=False)
    small = PreferenceTrainer(_cfg(assets, pref, tmp_path / "small", "train.batch_size=1",
                                   "train.grad_accum_steps=4", *common), export=False)
    lengths = [int(big.train_ds.batch([r])["completion_mask"].sum()) for r in range(4)]
    assert max(lengths) >= 2 * min(lengths), lengths  # uneven pairs
    for t in (big, small):
        t.maybe_resume()
    for _ in range(3):
        lb, nb, _ = big.one_step()
        ls, ns, _ = small.one_step()
        assert nb == ns
        np.testing.assert_allclose(ls, lb, rtol=1e-5)
        mb, ms = big._window_metrics[-1], small._window_metrics[-1]
        for k in ("rewards/margins", "logps/chosen"):  # (means of per-micro-batch means: equal-size micro-batches)
            np.testing.assert_allclose(ms[k], mb[k], rtol=1e-4, atol=1e-6)
    for a, b in zip(_leaves(small.lora), _leaves(big.lora)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(np.abs(x).max() > 0 for x in _leaves(big.lora)[1::2]), "lora_b never moved"


def _records(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_resume_equals_uninterrupted(assets, pref, tmp_path):
    args = ["train.max_steps=4", "train.save_every=2", "train.batch_size=2", "train.grad_accum_steps=2",
            f"lora.init_from={pref / 'adapter'}", "preference.reference=init"]
    straight = PreferenceTrainer(_cfg(assets, pref, tmp_path / "a", *args), export=False)
    assert straight.run() == 0
    first = PreferenceTrainer(_cfg(assets, pref, tmp_path / "b", *args, "train.stop_at_step=2"), export=False)
    assert first.run() == 0 and first.step == 2
    second = PreferenceTrainer(_cfg(assets, pref, tmp_path / "b", *args), export=False)
    assert second.run() == 0 and second.step == 4
    for a, b in zip(_leaves(second.lora), _leaves(straight.lora)):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=0)
    for a, b in zip(_leaves(second.ref_lora), _leaves(straight.ref_lora)):  # the init adapter, from the checkpoint
        np.testing.assert_array_equal(a, b)
    keep = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s",)} for r in rs]  # noqa: E731
    assert keep(_records(tmp_path / "b")) == keep(_records(tmp_path / "a"))


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "jqlora.train", "--no-progress", *args], capture_output=True,
                          text=True, cwd=REPO, env=env)


def test_sharded_equals_one_device(assets, pref, tmp_path):
    """DPO on a 2 x 2 (fsdp x tensor) mesh of 4 host devices = one device: pairs stay whole on a device ([B, 2, S]
    batches sharded by pairs), the reference tree is placed like the adapters."""
    import os

    args = [f"model.path={assets / 'model'}", f"data.path={pref / 'prefs.jsonl'}", "data.max_length=32", "lora.r=4",
            "lora.alpha=8", "lora.dropout=0", "train.objective=dpo", "train.max_steps=2", "train.batch_size=4",
            "train.grad_accum_steps=1", "train.log_every=1", "train.warmup_steps=0", "train.learning_rate=1e-2",
            "log.tensorboard=false", f"lora.init_from={pref / 'adapter'}", "preference.reference=init"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    one = _cli(*args, f"output_dir={tmp_path / 'one'}", "mesh.fsdp=1")
    four = _cli(*args, f"output_dir={tmp_path / 'four'}", "mesh.fsdp=2", "mesh.tensor=2", env=env)
    assert one.returncode == 0 and four.returncode == 0, (one.stderr[-1500:], four.stderr[-1500:])
    a, b = ([x for x in _records(tmp_path / d) if "loss" in x] for d in ("one", "four"))
    assert len(a) == len(b) == 2 and a[1]["loss"] != a[0]["loss"]
    for x, y in zip(a, b):
        for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(x[k])), (k, x[k], y[k])


def test_cli_trains_dpo_with_trl_metric_names(assets, pref, tmp_path):
    out = tmp_path / "cli"
    r = _cli(f"model.path={assets / 'model'}", f"data.path={pref / 'prefs.jsonl'}", f"output_dir={out}",
             "data.max_length=32", "lora.r=4", "train.objective=dpo", "train.max_steps=2", "train.batch_size=2",
             "train.grad_accum_steps=1", "train.log_every=1", "data.packing=true", "log.tensorboard=false",
             f"data.eval_path={pref / 'prefs.jsonl'}", "train.eval_every=0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data.packing=true does not apply to preference data" in r.stderr
    evals = [x for x in _records(out) if "eval_loss" in x]
    assert [x["step"] for x in evals] == [0, 2]  # before training (policy = reference) and at the end
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and evals[0]["eval_rewards/margins"] == 0
    assert np.isfinite(evals[1]["eval_rewards/chosen"]) and evals[1]["eval_logps/rejected"] < 0
    rows = [x for x in _records(out) if "loss" in x]
    assert len(rows) == 2
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected", "logits/chosen", "logits/rejected"):
        assert all(np.isfinite(x[k]) for x in rows), k
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_memory_plan_counts_two_rows_per_pair():
    from jqlora.planning.memory import settings_from_config

    dpo = load_config(None, ["train.objective=dpo", "train.batch_size=3", "data.max_length=64"])
    sft = load_config(None, ["train.batch_size=6", "data.max_length=64"])
    assert settings_from_config(dpo) == settings_from_config(sft)
    assert settings_from_config(dpo)["batch"] == 6


def test_cli_bad_preference_data_is_one_line_nothing_written(assets, pref, tmp_path):
    bad = tmp_path / "bad.jsonl"
    recs = _prefs(3)
    del recs[1]["rejected"]
    bad.write_text("".join(json.dumps(x) + "\n" for x in recs))
    out = tmp_path / "never"
    r = _cli(f"model.path={assets / 'model'}", f"data.path={bad}", f"output_dir={out}", "train.objective=dpo",
             "train.max_steps=1", "lora.r=4")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and f"{bad}:2" in lines[0] and "rejected" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), list(out.rglob("*"))
    dry = _cli("--dry-run", f"model.path={assets / 'model'}", f"data.path={bad}", "train.objective=dpo")
    assert dry.returncode == 2 and f"{bad}:2" in dry.stderr.strip().splitlines()[-1]
    good = _cli("--dry-run", f"model.path={assets / 'model'}", f"data.path={pref / 'prefs.jsonl'}",
                "train.objective=kto")
    assert good.returncode == 0 and ": 16 examples" in good.stdout, good.stderr  # (8 pairs unpaired, as TRL does)
    assert "# memory plan per device" in good.stdout
