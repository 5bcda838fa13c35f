"""tools/bench.py: the FLOPs formula against a hand count, and the CPU smoke run (jqlora + torch reference rows).

Numbers are checked for sanity and consistency only; no wall-clock thresholds (performance is measured, not asserted).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from jqlora.models.llama import ModelConfig, hf_key_table
from tool_module import load_tool

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tools" / "bench.py"


bench = load_tool("bench")


def test_flops_tiny_by_hand():
    # tiny: D=128, F=256, V=1024, L=2, 4 query heads and 2 KV heads of H=32 -> Nq·H=128, Nkv·H=64
    cfg = ModelConfig.from_hf(bench.hf_config("tiny"))
    per_layer = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 256  # q, k+v, o, gate+up+down
    assert per_layer == 147_456
    n = 2 * per_layer + 1024 * 128  # + lm_head
    assert n == 425_984
    seq = 512
    attention = 2 * (4 * seq * 128 + 8 * seq * 128) // 2  # L · (fwd 4·S·Nq·H + bwd 8·S·Nq·H) / 2 (causal)
    f = bench.flops_per_token(cfg, seq)
    assert f["n_linear"] == n
    assert f["linear"] == 2 * n + 2 * n == 1_703_936
    assert f["attention"] == attention == 786_432
    assert f["total"] == 2_490_368


@pytest.mark.parametrize("model", sorted(bench.MODELS))
def test_flops_count_matches_key_table(model):
    # N counts exactly the linear kernels + lm_head the model loads (biases, norms, embeddings excluded; a tied
    # lm_head is the embedding); of a MoE layer's experts, the top-k a token visits, plus its router
    cfg = ModelConfig.from_hf(bench.hf_config(model))
    head = ("linear", "lm_head", "router") + (("embedding",) if cfg.tie_word_embeddings else ())
    share = {None: 1}
    if cfg.num_experts:
        share = {None: 1, **{e: cfg.num_experts_per_tok / cfg.num_experts for e in range(cfg.num_experts)}}
    n = sum(math.prod(e.shape) * share[e.expert] for e in hf_key_table(cfg) if e.kind in head)
    f = bench.flops_per_token(cfg, 2048)
    assert f["n_linear"] == n
    assert f["attention"] == 6 * cfg.num_hidden_layers * 2048 * cfg.num_attention_heads * cfg.head_dim


def test_published_shapes():
    cfg = ModelConfig.from_hf(bench.hf_config("llama3-8b"))
    # Llama-3-8B has 8.03e9 parameters; linear + lm_head are all but the embedding and norms
    total = bench.flops_per_token(cfg, 1)["n_linear"] + 128256 * 4096 + 65 * 4096
    assert total == 8_030_261_248
    qwen = ModelConfig.from_hf(bench.hf_config("qwen2.5-7b"))
    assert qwen.qkv_bias and qwen.head_dim == 128 and qwen.num_key_value_heads == 4
    assert ModelConfig.from_hf(bench.hf_config("llama3-70b-4layers", layers=2)).num_hidden_layers == 2


def test_bad_model_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--model", "llama9"], capture_output=True, text=True,
                          check=False, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--model 'llama9'" in proc.stderr


def test_smoke_run(tmp_path):
    out = tmp_path / "results.json"
    steps = 3
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--model", "tiny", "--steps", str(steps), "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| tiny | 512 | 1 | full |" in proc.stdout
    assert "unsloth" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["date"] and doc["device"] and doc["versions"]["jax"] and doc["versions"]["torch"]
    assert doc["matmul_peak_flops"] > 0
    rows = {r["impl"]: r for r in doc["rows"]}
    ratio = doc["results"][0]["ref_ms_over_jq_ms"]
    assert ratio == pytest.approx(rows["torch+bnb+peft"]["step_ms_median"] / rows["jqlora"]["step_ms_median"])
    assert set(rows) == {"jqlora", "torch+bnb+peft"}
    expected_tokens = {"jqlora": 512, "torch+bnb+peft": 511}  # torch shifts labels inside the model
    fpt = doc["results"][0]["flops_per_token"]["total"]
    for impl, r in rows.items():
        assert "error" not in r and "skipped" not in r, r
        assert r["config"] == doc["results"][0]["config"]
        assert len(r["step_s"]) == steps and all(t > 0 for t in r["step_s"])
        assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
        assert r["tokens_per_step"] == expected_tokens[impl]
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] * 1e3 / r["step_ms_median"])
        assert r["flops_per_step"] == fpt * 512
        assert 0 < r["mfu"] == pytest.approx(r["achieved_flops"] / doc["matmul_peak_flops"])
        assert r["peak_bytes"] is None  # CPU: no device memory counter
        # random weights of std 0.02: the first loss is close to ln(V)
        assert math.isfinite(r["loss_last"]) and abs(r["loss_first"] - math.log(1024)) < 0.1
