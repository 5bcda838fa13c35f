"""Deviceless GPU compiles of a GRPO run's two programs (jqlora.planning.aot_grpo), checked against the memory plan
(`jqlora.planning.grpo_plan`) in the compiler's own output.

A Llama-shaped model narrowed so that the two compiles stay quick (hidden 512, 2 layers under scan, vocab 8192),
NF4 + double quantization, bf16, r=16 on all seven linears, remat full; prompts of 256 tokens, 256 new tokens, G = 4:
the train micro-step on 16 completion rows, the rollout of 4 prompts × G = 16 rows (token rows dominate, as at real
shapes; at tiny ones the compiler's per-kernel temporaries do).

(a) the rollout's KV cache is in the compiled program with the planned shape [L, prompts·G, bucket(P + T), K, H]
    (keys and values: the plan's exact bytes), and the rollout's compiled peak lies between its arguments plus the
    cache and the plan's rollout phase;
(a') the cache is held once, updated in place: at a shape where it dominates (16 prompt slots, 1024 new tokens,
    8 KV heads: a 128 MiB cache) the rollout's temporaries are at least the cache and under 1.25 caches (1.07;
    a layer scan that returned a new cache each step held two: 2.05, the bound this replaces). jax 0.11.2, the GPU
    image's (the aot venv's pin), holds 1.50: it lays the cache out differently in the prefill's layer scan and in
    the token loop and transposes K and V between them (an expected failure there until the code avoids it);
(b) the train step keeps the completions' float32 logits [rows, T, V] (GRPO does not chunk its cross-entropy) and
    its compiled peak is within the plan's train phase, the plan at most 1.5x the compiled peak.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import pytest

from jqlora.config import load_config
from jqlora.planning import BUILTIN, aot_grpo, kv_cache_bytes, lora_param_count, memory_plan, settings_from_config

GPU = "h100-sxm"
L, PROMPT, NEW, G, ROWS, PROMPTS = 2, 256, 256, 4, 16, 4
SHAPE = dataclasses.replace(BUILTIN["llama3-8b"], num_hidden_layers=L, hidden_size=512, intermediate_size=1536,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=8192,
                            sliding_windows=(None,) * L)


def run_config():
    return load_config(None, [
        "model.path=/not/needed", f"data.max_length={PROMPT}", "train.objective=grpo", f"train.batch_size={ROWS}",
        f"train.grad_accum_steps={PROMPTS * G // ROWS}", f"grpo.num_generations={G}", f"grpo.max_new_tokens={NEW}",
        "grpo.rewards=[none:none]", "lora.r=16", "lora.alpha=32", "lora.dropout=0", "lora.targets=all-linear",
        "model.quant=nf4", "model.double_quant=true", "model.dtype=bfloat16", "train.remat=full"])


@pytest.fixture(scope="module")
def compiled():
    cfg = run_config()
    shapes = aot_grpo.grpo_shapes(cfg)
    assert (shapes.train_rows, shapes.rollout_rows, shapes.prompt, shapes.completion, shapes.cache_slots) == \
        (ROWS, PROMPTS * G, 256, 256, 512)
    plan = memory_plan(SHAPE, **settings_from_config(cfg), attention="cudnn")
    return {"plan": plan, "shapes": shapes,
            "train": aot_grpo.compile_grpo_step(SHAPE, cfg, GPU, shapes=shapes),
            "rollout": aot_grpo.compile_rollout(SHAPE, cfg, GPU, shapes=shapes)}


def _buffers(hlo: str, dtype: str, dims: tuple[int, ...]) -> int:
    """How many instructions of the HLO make a ``dtype[dims]`` array (any layout)."""
    shape = re.escape(f"{dtype}[{','.join(map(str, dims))}]")
    return len(re.findall(rf"= {shape}(?:\{{[\d,]*\}})? ", hlo))


def _optimizer_bytes() -> int:
    """The adapter's AdamW moments and accumulated gradient (fp32, 12 B/param): resident during a run, but not an
    argument of the rollout program (the plan's shared LoRA row counts them; so does the train step's arguments)."""
    return 12 * lora_param_count(SHAPE, 16)


def test_rollout_holds_the_planned_kv_cache(compiled):
    s, plan, ro = compiled["shapes"], compiled["plan"], compiled["rollout"]
    cache = (L, PROMPTS * G, s.cache_slots, SHAPE.num_key_value_heads, SHAPE.head_dim)
    kv = kv_cache_bytes(SHAPE, PROMPTS * G, s.cache_slots, 2)
    assert kv == L * 2 * SHAPE.num_key_value_heads * SHAPE.head_dim * (PROMPT + NEW) * PROMPTS * G * 2
    (planned,) = [v for k, v in plan.rows.items() if k.startswith("rollout: KV cache")]
    assert planned == kv
    hlo = ro.hlo()
    assert _buffers(hlo, "bf16", cache) >= 2, "the keys and values of the planned cache shape"
    assert ro.peak_bytes >= ro.memory["argument"] + kv
    rollout_phase = plan.phase_totals()["rollout"] - _optimizer_bytes()
    assert ro.peak_bytes <= rollout_phase <= 1.5 * ro.peak_bytes, (ro.peak_bytes, rollout_phase)


@pytest.mark.xfail(tuple(map(int, jax.__version__.split(".")[:2])) < (0, 12), strict=True, reason=(
    "jax 0.11.2 (the GPU image's) lays the cache out {2,4,3,1,0} in the prefill's layer scan and {4,3,2,1,0} in the "
    "token loop, and transposes K and V between the two: temp 1.50 caches (0.12.0.1: 1.07)"))
def test_rollout_updates_the_cache_in_place():
    shape = dataclasses.replace(SHAPE, num_key_value_heads=8)
    cfg = run_config()
    s = aot_grpo.grpo_shapes(cfg, prompt=16, new_tokens=1024)
    assert (s.prompt, s.completion, s.cache_slots) == (16, 1024, 2048)
    kv = kv_cache_bytes(shape, PROMPTS * G, s.cache_slots, 2)
    assert kv == 128 * 2**20
    ro = aot_grpo.compile_rollout(shape, cfg, GPU, shapes=s)
    assert kv <= ro.memory["temp"] < 1.25 * kv, (ro.memory, kv)


def test_train_step_within_the_plan(compiled):
    s, plan, tr = compiled["shapes"], compiled["plan"], compiled["train"]
    hlo = tr.hlo()
    assert _buffers(hlo, "f32", (ROWS, s.completion, SHAPE.vocab_size)) + \
        _buffers(hlo, "f32", (ROWS * s.completion, SHAPE.vocab_size)) >= 1, "the completions' float32 logits"
    train_phase = plan.phase_totals()["train"]
    assert tr.peak_bytes <= train_phase <= 1.5 * tr.peak_bytes, (tr.peak_bytes, train_phase, tr.memory)
    assert tr.memory["alias"] > 0  # the adapter and the optimizer state are donated
