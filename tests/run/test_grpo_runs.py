"""GRPO runs end to end on the tiny Llama of the `assets` fixture (NF4 + DQ base, the test tokenizer, G = 2, 6 new
tokens): the CLI trains on prompt-only jsonl and writes TRL's metric names and completions.jsonl, and its adapter
loads in peft; a resumed run equals an uninterrupted one (same completions, same losses); the loop's loss equals
`jqlora.training.grpo.grpo_loss` on the loop's own completions; 2 accumulated micro-batches equal one batch twice
as large given the same completions; a reward function that raises is one line naming it and the prompt index,
exit 2, and the run directory's checkpoint is untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlora.config import load_config
from jqlora.run import GRPOTrainer
from jqlora.training import grpo as G_

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("compilation_cache")

REWARDS = '''
def length_reward(prompts, completions, **kw):
    return [float(len(c)) / 10.0 for c in completions]

def a_reward(prompts, completions, answer, **kw):
    return [None if a is None else float(a in c) for c, a in zip(completions, answer)]

def broken(prompts, completions, **kw):
    if any("3" in p for p in prompts):
        raise ValueError("no threes")
    return [0.0] * len(completions)
'''


@pytest.fixture(scope="module")
def grpo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_runs")
    rows = [{"prompt": f"Say {i}" + " now" * (i % 3), "answer": "a" if i % 2 else None} for i in range(6)]
    rows += [{"prompt": [{"role": "user", "content": f"Count to {i}."}], "answer": "1"} for i in range(2)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "grpo_test_rewards.py").write_text(REWARDS)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def _args(assets, data, out, *overrides):
    return [f"model.path={assets / 'model'}", f"data.path={data / 'prompts.jsonl'}", "data.max_length=32",
            f"output_dir={out}", "lora.r=4", "lora.alpha=8", "lora.dropout=0", "train.log_every=1",
            "train.eval_every=0", "train.warmup_steps=0", "train.learning_rate=5e-2", "train.objective=grpo",
            "log.tensorboard=false", "data.shuffle=false", "train.batch_size=4", "train.grad_accum_steps=1",
            "grpo.num_generations=2", "grpo.max_new_tokens=6", "train.max_steps=3", "train.sample_prompt=null",
            "grpo.rewards=[grpo_test_rewards:length_reward,grpo_test_rewards:a_reward]", *overrides]


def _cfg(assets, data, out, *overrides):
    return load_config(None, _args(assets, data, out, *overrides))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def test_cli_run_metrics_completions_and_peft(assets, grpo_data, tmp_path):
    import peft
    import torch
    import transformers

    out = tmp_path / "run"
    env = {"PYTHONPATH": f"{REPO}:{grpo_data}", "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "jqlora.train", "--no-progress",
                        *_args(assets, grpo_data, out, "grpo.beta=0.05", "train.max_steps=2")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [x for x in _lines(out / "metrics.jsonl") if "loss" in x]
    assert [x["step"] for x in recs] == [1, 2]
    for key in ("reward", "reward_std", "rewards/length_reward/mean", "rewards/a_reward/std", "frac_reward_zero_std",
                "kl", "clip_ratio/region_mean", "completions/mean_length", "completions/min_length",
                "completions/max_length", "completions/clipped_ratio", "generation_tokens_per_s",
                "training_tokens_per_s"):
        assert key in recs[0], key
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the fresh adapter is the base (B = 0)
    assert 1 <= recs[0]["completions/min_length"] <= recs[0]["completions/max_length"] <= 6
    samples = _lines(out / "completions.jsonl")
    assert [s["step"] for s in samples] == [1, 2]
    s = samples[0]
    assert len(s["completions"]) == 2 and s["rewards"]["length_reward"] == pytest.approx([len(c) / 10 for c in s["completions"]])
    # the exported adapter loads in peft and changes the base's logits as jqlora's trained adapter does
    base = transformers.AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, out / "adapter")
    sd = peft.get_peft_model_state_dict(model)
    assert sd and any(float(v.abs().max()) > 0 for k, v in sd.items() if "lora_B" in k)  # trained B is not zero


def test_resume_equals_uninterrupted(assets, grpo_data, tmp_path):
    full = GRPOTrainer(_cfg(assets, grpo_data, tmp_path / "full", "train.max_steps=2"), export=False)
    assert full.run() == 0
    part = _cfg(assets, grpo_data, tmp_path / "part", "train.max_steps=2", "train.stop_at_step=1",
                "train.save_every=1")
    assert GRPOTrainer(part, export=False).run() == 0
    rest = GRPOTrainer(_cfg(assets, grpo_data, tmp_path / "part", "train.max_steps=2", "train.save_every=1"),
                       export=False)
    assert rest.run() == 0
    a, b = _lines(tmp_path / "full" / "completions.jsonl"), _lines(tmp_path / "part" / "completions.jsonl")
    assert [x["completions"] for x in a] == [x["completions"] for x in b] and len(a) == 2
    la = [x["loss"] for x in _lines(tmp_path / "full" / "metrics.jsonl") if "loss" in x]
    lb = [x["loss"] for x in _lines(tmp_path / "part" / "metrics.jsonl") if "loss" in x]
    assert la == lb and len(la) == 2
    for x, y in zip(_leaves(full.lora), _leaves(rest.lora)):
        np.testing.assert_array_equal(x, y)


def _pure_loss(trainer, lora, examples, ro, adv, loss_cfg):
    """grpo_loss over the whole generation batch at once (no accumulation), from `completion_logps`."""
    mask = ro.completion_mask * (~ro.truncated[:, None] if trainer.g.mask_truncated else 1)
    batch = {"prompt_ids": ro.prompt_ids, "prompt_mask": ro.prompt_mask, "completion_ids": ro.completion_ids,
             "completion_mask": mask}
    model = trainer.split.model(lora)
    logps, _ = G_.completion_logps(model, batch, loss_cfg.temperature)
    return float(G_.grpo_loss(logps, jnp.asarray(mask), jnp.asarray(adv), loss_cfg)[0])


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_loop_loss_is_the_pure_loss_and_accumulation_is_a_big_batch(assets, grpo_data, tmp_path, loss_type):
    one = GRPOTrainer(_cfg(assets, grpo_data, tmp_path / "one", "train.max_steps=1", f"grpo.loss_type={loss_type}",
                           "train.batch_size=8", "train.grad_accum_steps=1"), export=False)
    one.maybe_resume()
    lora0 = jax.tree.map(jnp.copy, one.lora)
    loss_one = one.one_step()[0]
    examples, ro, adv, _ = one.last_rollout
    # the invariant: the loop's loss = the pure loss of training/grpo.py on the loop's completions
    assert loss_one == pytest.approx(_pure_loss(one, lora0, examples, ro, adv, one.loss_cfg), rel=1e-5, abs=1e-7)
    # accumulation: 2 micro-batches of 4 completions, fed the same rollout, make the same loss and update
    two = GRPOTrainer(_cfg(assets, grpo_data, tmp_path / "two", "train.max_steps=1", f"grpo.loss_type={loss_type}",
                           "train.batch_size=4", "train.grad_accum_steps=2"), export=False)
    two.maybe_resume()
    two.rollout = lambda exs, key: ro  # the same completions
    loss_two = two.one_step()[0]
    assert loss_two == pytest.approx(loss_one, rel=1e-5, abs=1e-7)
    for x, y in zip(_leaves(one.lora), _leaves(two.lora)):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6)
    assert max(float(np.abs(x - y).max()) for x, y in zip(_leaves(one.lora), _leaves(lora0))) > 1e-4  # it moved
    if loss_type != "dapo":
        return
    # mu = 2: the first update's old log-probs are the policy's own (ratio 1), so its loss is mu = 1's; the second
    # update starts from the first's adapter, with the kept old log-probs
    mu = GRPOTrainer(_cfg(assets, grpo_data, tmp_path / "mu", "train.max_steps=1", "grpo.num_iterations=2",
                          "train.batch_size=8", "train.grad_accum_steps=1"), export=False)
    mu.maybe_resume()
    mu.rollout = lambda exs, key: ro
    mu.one_step()
    first, second = mu.last_rollout[3]
    assert first == pytest.approx(loss_one, rel=1e-5, abs=1e-7)
    assert second != first


def test_raising_reward_is_one_line(assets, grpo_data, tmp_path):
    """Step 1's prompts (rows 0, 1) score; step 2's (rows 2, 3) raise at "Say 3": one line naming the function and
    prompt index 3, exit 2, and step 1's checkpoint and metrics stay as they were."""
    from jqlora.run.directory import read_metrics

    out = tmp_path / "bad"
    env = {"PYTHONPATH": f"{REPO}:{grpo_data}", "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "jqlora.train", "--no-progress",
                        *_args(assets, grpo_data, out, "grpo.rewards=[grpo_test_rewards:broken]",
                               "train.save_every=1")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "reward function broken raised ValueError: no threes (prompt index 3)" in err[0], err
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    assert [x["step"] for x in read_metrics(out / "metrics.jsonl") if "loss" in x] == [1]
    assert [x["step"] for x in _lines(out / "completions.jsonl")] == [1]


def test_dry_run_reads_prompts_and_loads_rewards(assets, grpo_data, tmp_path, capsys):
    from jqlora.run import DryRunError, dry_run

    assert dry_run(_cfg(assets, grpo_data, tmp_path / "dry")) == 0
    assert "# 8 prompts" in capsys.readouterr().out
    with pytest.raises(DryRunError, match="reward 'nope:x': cannot import module 'nope'"):
        dry_run(_cfg(assets, grpo_data, tmp_path / "dry", "grpo.rewards=[nope:x]"))


def test_exported_adapter_gives_our_logits_in_peft(assets, grpo_data, tmp_path):
    """A GRPO run's exported adapter (float32 base, quant none: no quantization error between the stacks) loaded by
    peft on the transformers model gives the trained jqlora model's logits; the adapter moved the logits off the
    base's."""
    import peft
    import torch
    import transformers

    trainer = GRPOTrainer(_cfg(assets, grpo_data, tmp_path / "run", "model.quant=none", "model.dtype=float32",
                               "train.max_steps=2"))
    assert trainer.run() == 0
    x = np.random.default_rng(0).integers(0, 512, (2, 12)).astype(np.int32)
    ours = np.asarray(trainer.split.model(trainer.lora)(jnp.asarray(x)))
    base = transformers.AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32)
    with torch.no_grad():
        before = base(torch.from_numpy(x).long()).logits.numpy()
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
        after = theirs(torch.from_numpy(x).long()).logits.numpy()
    np.testing.assert_allclose(after, ours, atol=1e-4, rtol=0)
    assert np.abs(after - before).max() > 1e-2  # (trained: not the base's logits)


def test_sharded_equals_one_device(assets, grpo_data, tmp_path):
    """GRPO on a 2 x 2 (fsdp x tensor) mesh of 4 host devices = one device: the same completions (the sampler runs
    on the sharded model), rewards and losses for 2 steps."""
    import os

    args = [a for a in _args(assets, grpo_data, tmp_path, "train.max_steps=2", "grpo.beta=0.05")
            if not a.startswith("output_dir=")]
    env = {"PYTHONPATH": f"{REPO}:{grpo_data}", "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    runs = {}
    for name, extra, flags in (("one", ["mesh.fsdp=1"], {}),
                               ("four", ["mesh.fsdp=2", "mesh.tensor=2"],
                                {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})):
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "jqlora.train", "--no-progress", *args, f"output_dir={out}",
                            *extra], capture_output=True, text=True, env={**env, **flags}, timeout=600, cwd=REPO)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = ([x for x in _lines(out / "metrics.jsonl") if "loss" in x], _lines(out / "completions.jsonl"))
    (a, ca), (b, cb) = runs["one"], runs["four"]
    assert [x["completions"] for x in ca] == [x["completions"] for x in cb] and len(ca) == 2
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for k in ("loss", "reward", "kl", "completions/mean_length"):
            assert abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(x[k])), (k, x[k], y[k])
    assert os.path.isdir(tmp_path / "four" / "adapter")
