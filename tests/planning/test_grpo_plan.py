"""The GRPO memory plan (`jqlora.planning.grpo_plan`, `python -m jqlora.plan --objective grpo`): the rollout's KV
cache of prompts × G rows is the exact product L · 2 · K · H · (prompt + new) · prompts·G · dtype bytes (lengths on
the sampler's power-of-two buckets), and the decoder's own cache (`decode.init_cache`, shapes only) for the rows and
slots the sampler uses; the two phases (the rollout, the train step) are planned apart and the total is the larger;
the CLI's flags and errors. (tests/aot/test_aot_grpo.py compares the plan with the compiled programs.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import pytest

from jqlora import plan, planning
from jqlora.config import load_config

REPO = Path(__file__).resolve().parents[2]
L8B = planning.BUILTIN["llama3-8b"]


def _kv_row(p) -> float:
    (row,) = [v for k, v in p.rows.items() if k.startswith("rollout: KV cache")]
    return row


@pytest.mark.parametrize("model, prompt, new, prompts, G, dtype, c", [
    ("llama3-8b", 512, 512, 4, 8, "bfloat16", 2),
    ("llama3-70b", 1024, 1024, 1, 16, "bfloat16", 2),
    ("qwen2.5-7b", 256, 256, 2, 8, "float32", 4),
])
def test_kv_cache_is_the_exact_product(model, prompt, new, prompts, G, dtype, c):
    s = planning.BUILTIN[model]
    p = planning.grpo_plan(s, prompt=prompt, new_tokens=new, rows=G, rollout_rows=prompts * G, dtype=dtype)
    exact = s.num_hidden_layers * 2 * s.num_key_value_heads * s.head_dim * (prompt + new) * prompts * G * c
    assert _kv_row(p) == exact == planning.kv_cache_bytes(s, prompts * G, prompt + new, c)


def test_kv_cache_is_the_decoders_own():
    """At a prompt and completion length off the buckets, the plan counts the cache the sampler allocates:
    `decode.init_cache` for prompts·G rows and bucket(bucket(prompt) + bucket(new)) slots (shapes only)."""
    from jqlora.models.decode import bucket, init_cache
    from jqlora.planning import aot

    shape = dataclasses.replace(L8B, num_hidden_layers=2, sliding_windows=(None,) * 2)
    cfg = load_config(None, ["model.dtype=bfloat16"])
    model = aot.abstract_model(shape, cfg, remat="full", attention="xla")
    rows, prompt, new = 3 * 8, 300, 200
    slots = bucket(bucket(prompt) + bucket(new))
    assert slots == 1024
    cache = jax.eval_shape(lambda: init_cache(model, rows, slots))
    allocated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    p = planning.grpo_plan(shape, prompt=prompt, new_tokens=new, rows=8, rollout_rows=rows)
    assert _kv_row(p) == allocated == 2 * 2 * shape.num_key_value_heads * shape.head_dim * 1024 * rows * 2


def test_phases_are_planned_apart():
    p = planning.grpo_plan(L8B, prompt=512, new_tokens=512, rows=8, rollout_rows=32, attention="cudnn")
    phases = p.phase_totals()
    shared = p.rows["base weights (4-bit + bfloat16)"] + p.rows["LoRA params+grad+acc+AdamW (fp32)"]
    rollout = [k for k in p.rows if k.startswith("rollout:")]
    assert phases["rollout"] == pytest.approx(shared + sum(p.rows[k] for k in rollout), rel=1e-12)
    assert phases["train"] == pytest.approx(sum(p.rows.values()) - sum(p.rows[k] for k in rollout), rel=1e-12)
    assert p.total == max(phases.values()) < sum(p.rows.values())
    # the train phase is the SFT plan at rows × (P + T) tokens with the completions' unchunked logits for its CE
    sft = planning.memory_plan(L8B, seq=1024, batch=8, attention="cudnn")
    logits = next(v for k, v in p.rows.items() if k.startswith("train: completion logits"))
    V, D = L8B.vocab_size, L8B.hidden_size
    assert logits == planning.GRPO_LOGITS * 8 * 512 * V * 4 + 2 * 8 * 1024 * D * 2
    ce = next(v for k, v in sft.rows.items() if k.startswith("cross-entropy"))
    assert phases["train"] == pytest.approx(sft.total - ce + logits, rel=1e-12)


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = plan.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_objective_grpo(capsys):
    rc, out, _ = _run(capsys, "--model", "llama3-8b", "--objective", "grpo", "--generations", "8", "--new-tokens",
                      "512", "--seq", "512", "--batch", "8", "--prompts", "4")
    assert rc == 0
    exact = 32 * 2 * 8 * 128 * 1024 * 32 * 2
    (line,) = [x for x in out.splitlines() if x.startswith("rollout: KV cache")]
    assert "(32 rows x 1024 slots)" in line and line.split()[-2] == f"{exact / 1e9:.2f}", line
    assert "while rollout runs" in out and "while train runs" in out
    # a run config's grpo section: prompts × G = batch_size · grad_accum rows sampled at once
    rc, out2, _ = _run(capsys, "--config", str(REPO / "configs" / "demo-grpo.yaml"))
    assert rc == 0
    demo = load_config(str(REPO / "configs" / "demo-grpo.yaml"), [])
    rows = demo.train.batch_size * demo.train.grad_accum_steps
    assert f"KV cache ({rows} rows x 128 slots)" in out2  # bucket(bucket(64) + bucket(16)) = 128


@pytest.mark.parametrize("args, says", [
    (["--generations", "8"], "--generations: only with --objective grpo"),
    (["--objective", "grpo", "--new-tokens", "0"], "--new-tokens 0: must be >= 1"),
    (["--objective", "grpo", "--compile", "--batch", "1"], "--batch 1: a GRPO micro-batch holds whole groups of >= 2 "
     "completions and divides the rollout's 8 rows (--prompts x --generations)"),
])
def test_cli_grpo_errors_are_one_line(capsys, args, says):
    rc, _, err = _run(capsys, "--model", "llama3-8b", *args)
    assert rc == 2 and err.strip().splitlines() == [f"jqlora.plan: {says}"], err
