"""Deviceless GPU compile of the preference step (train.objective dpo, orpo; jqlora.planning.aot), checked in the
compiler's own output against the SFT step on the same tokens.

A Llama-shaped model narrowed so that the three compiles stay quick (hidden 512, 2 layers under scan: two, so the
scanned layer loop stays a loop), NF4 + double quantization, r=16 on all seven linears, remat full, one pair of
SEQ-token rows against SFT on the same 2 rows (unpacked: both steps run cuDNN's causal mask).

(a) the DPO step compiles for the H100; its dot FLOPs are SFT's step plus one forward pass over the same 2 rows, and
    that forward pass is the analytic count (the base and LoRA matmuls of one layer body and the LM head); the
    backward dots are SFT's exactly (the reference pass has no gradient), and ORPO (no reference) is SFT's step;
(b) per pass (the step's `jax.named_scope`s "policy" / "reference"): each 4-bit kernel is dequantized once in the
    policy's forward, once in its backward (rematerialized forward included), once in the reference's forward and
    never in a backward of the reference; cuDNN attention: one backward kernel, the policy's.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import jax
import pytest

from jqlora.config import load_config
from jqlora.planning import BUILTIN, aot, linear_shapes

GPU = "h100-sxm"
L, SEQ, R = 2, 256, 16
SHAPE = dataclasses.replace(BUILTIN["llama3-8b"], num_hidden_layers=L, hidden_size=512, intermediate_size=1536,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=2048,
                            sliding_windows=(None,) * L)


def run_config(objective: str, rows: int):
    return load_config("configs/llama3-8b.yaml", [
        "model.path=/not/needed", f"data.max_length={SEQ}", "data.packing=false", f"train.batch_size={rows}",
        f"train.objective={objective}", f"lora.r={R}", "lora.targets=all-linear", "model.quant=nf4",
        "model.double_quant=true"])


def _forward_only() -> str:
    """The SFT loss alone (no gradient: `step.make_loss_fn`, deterministic) on the same 2 rows, compiled the same
    way (the pieces of `aot.compile_step`, not the preference code)."""
    from jax.sharding import SingleDeviceSharding

    from jqlora.lora import SplitModel
    from jqlora.training import optim
    from jqlora.training.step import make_loss_fn

    cfg = run_config("sft", 2)
    split = SplitModel.of(aot.abstract_model(SHAPE, cfg, remat="full"))
    tx, _ = optim.make_optimizer(cfg.train, 1, cfg.lora.plus_ratio)
    lora, _, frozen, batch, _, _ = aot.step_arguments(split, tx, batch=2, seq=SEQ,
                                                      sharding=SingleDeviceSharding(aot.gpu_device(GPU)))
    loss = make_loss_fn(split, packed=False)
    fn = jax.jit(lambda lora, frozen, batch: loss(lora, frozen, batch, None, deterministic=True))
    with aot._traced_for(GPU):
        return fn.trace(lora, frozen, batch).lower().compile().as_text()


@pytest.fixture(scope="module")
def hlo() -> dict[str, str]:
    return {"sft": aot.compiled(SHAPE, run_config("sft", 2), GPU, "full").hlo(),
            "dpo": aot.compiled(SHAPE, run_config("dpo", 1), GPU, "full").hlo(),
            "orpo": aot.compiled(SHAPE, run_config("orpo", 1), GPU, "full").hlo(),
            "forward": _forward_only()}


_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (\([^)]*\)|\S+) ([\w-]+)\((.*)$", re.MULTILINE)


def _instructions(text: str):
    """(name, result type, opcode, rest of the line, op_name) of every HLO instruction."""
    out = []
    for m in _INSTR.finditer(text):
        name = re.search(r'op_name="([^"]*)"', m.group(4))
        out.append((*m.groups(), name.group(1) if name else ""))
    return out


def _dims(result: str) -> list[int]:
    return [int(d) for d in re.match(r"\w+\[([\d,]*)\]", result).group(1).split(",") if d]


def _pass(op_name: str) -> str:
    return "backward" if "transpose(" in op_name else "forward"


def _dot_flops(text: str) -> dict[str, float]:
    """2 · (output elements) · (contracted elements) of every dot, by pass (each computation once: a loop body
    counts once however many times it runs, the same in every compile compared)."""
    ins = _instructions(text)
    shapes = {name: _dims(result) for name, result, *_ in ins if not result.startswith("(")}
    out = collections.Counter()
    for _, result, opcode, rest, op_name in ins:
        if opcode != "dot":
            continue
        lhs = re.match(r"%([\w.-]+)", rest).group(1)
        contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
        k = math.prod(shapes[lhs][int(d)] for d in contracted.split(",") if d)
        out[_pass(op_name)] += 2.0 * math.prod(_dims(result)) * k
    return out


def _analytic_forward_flops() -> float:
    """One layer body and the LM head over T = 2·SEQ tokens: 2·T·in·out per 4-bit kernel, 2·T·r·(in + out) per
    adapter (x·A, then ·B); attention itself is cuDNN's custom call, not a dot."""
    T = 2 * SEQ
    layer = sum(2.0 * T * o * i + 2.0 * T * R * (i + o) for o, i in linear_shapes(SHAPE).values())
    return layer + 2.0 * T * SHAPE.hidden_size * SHAPE.vocab_size


def test_dpo_dot_flops_are_sft_plus_one_forward_pass(hlo):
    sft, dpo, fwd = _dot_flops(hlo["sft"]), _dot_flops(hlo["dpo"]), _dot_flops(hlo["forward"])
    assert fwd["backward"] == 0 and fwd["forward"] == pytest.approx(_analytic_forward_flops(), rel=1e-9), fwd
    # the reference pass adds forward dots only, one forward pass's worth; the backward is SFT's
    assert dpo["backward"] == pytest.approx(sft["backward"], rel=1e-9), (dpo, sft)
    assert dpo["forward"] == pytest.approx(sft["forward"] + fwd["forward"], rel=1e-9), (dpo, sft, fwd)
    ratio = sum(dpo.values()) / sum(sft.values())
    assert ratio == pytest.approx(1 + fwd["forward"] / sum(sft.values()), rel=1e-9)
    assert 1.2 < ratio < 1.5, ratio  # (fwd ≈ 1/4 … 1/3 of a remat-full step)


def test_orpo_has_no_reference_pass(hlo):
    orpo, sft = _dot_flops(hlo["orpo"]), _dot_flops(hlo["sft"])
    assert orpo["forward"] == pytest.approx(sft["forward"], rel=1e-9) and orpo["backward"] == pytest.approx(
        sft["backward"], rel=1e-9), (orpo, sft)
    assert {_scope(op) for *_, op in _instructions(hlo["orpo"])} == {"policy", "other"}


def _scope(op_name: str) -> str:
    """The step's named scope of an instruction (``jit(step)/jvp(policy)/while/...``), or "other"."""
    found = re.search(r"[/(](policy|reference)[/)]", op_name)
    return found.group(1) if found else "other"


def test_each_4bit_kernel_dequantized_once_per_pass(hlo):
    kernels = collections.Counter(o * i for o, i in linear_shapes(SHAPE).values())
    assert sum(kernels.values()) == 7
    lookups = collections.defaultdict(collections.Counter)
    for _, result, opcode, _, op_name in _instructions(hlo["dpo"]):
        if opcode == "gather" and "dequantize_codes" in op_name:
            lookups[_scope(op_name), _pass(op_name)][math.prod(_dims(result))] += 1
    assert dict(lookups) == {("policy", "forward"): kernels, ("policy", "backward"): kernels,
                             ("reference", "forward"): kernels}, dict(lookups)


def test_cudnn_attention_backward_only_in_the_policy(hlo):
    calls = collections.Counter()
    for _, _, opcode, rest, op_name in _instructions(hlo["dpo"]):
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        if opcode == "custom-call" and "fmha" in target.group(1):
            calls[_scope(op_name), target.group(1)] += 1
    sft = collections.Counter(re.search(r'custom_call_target="([^"]+)"', rest).group(1)
                              for _, _, opcode, rest, _ in _instructions(hlo["sft"])
                              if opcode == "custom-call" and "fmha" in rest)
    assert calls["reference", "__cudnn$fmhaSoftmax"] == 1, calls
    assert calls["reference", "__cudnn$fmhaSoftmaxBackward"] == 0, calls
    assert calls["policy", "__cudnn$fmhaSoftmaxBackward"] == sft["__cudnn$fmhaSoftmaxBackward"] == 1, (calls, sft)
    assert calls["policy", "__cudnn$fmhaSoftmax"] == sft["__cudnn$fmhaSoftmax"], (calls, sft)
    assert sum(calls.values()) == sum(sft.values()) + 1, (calls, sft)


def test_preference_cost_weights_loop_bodies_by_trip_count(hlo):
    """tools/preference_cost.py --gpu counts each loop body times its trip count: DPO - SFT is then one forward pass
    over every layer (L layer bodies and the head), and the reference adds one attention forward call per layer."""
    from tool_module import load_tool

    tool = load_tool("preference_cost")  # (it imports tools/bench.py)
    (dpo, dpo_calls), (sft, sft_calls) = tool.hlo_dot_flops(hlo["dpo"]), tool.hlo_dot_flops(hlo["sft"])
    head = 2.0 * 2 * SEQ * SHAPE.hidden_size * SHAPE.vocab_size
    assert dpo - sft == pytest.approx(L * (_analytic_forward_flops() - head) + head, rel=1e-9), (dpo, sft)
    assert sft_calls == {"__cudnn$fmhaSoftmax": 2 * L, "__cudnn$fmhaSoftmaxBackward": L}, sft_calls
    assert dpo_calls == {"__cudnn$fmhaSoftmax": 3 * L, "__cudnn$fmhaSoftmaxBackward": L}, dpo_calls
