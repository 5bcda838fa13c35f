"""Deviceless GPU compiles of the real train step (jqlora.planning.aot), checked in the compiler's own output.

These run in the Python 3.12 venv with jax[cuda13] that `.ci/run` makes (no GPU needed). The model is
Llama-3-8B-shaped with 2 layers under scan (two, so the scanned layer loop stays a loop: with one layer XLA inlines
it and merges the forward and backward passes), batch 1, seq 512, NF4 + double quantization, r=16 on all linears.

(a) cuDNN fused attention custom calls in the forward and backward pass, with cuDNN's own masks (no dense bias):
    causal for unpacked rows, the packed layout for packed rows, and the sliding window as cuDNN's window length.
(c) every 4-bit kernel of the layer is dequantized exactly once in the forward pass and once in the backward pass
    (rematerialized forward included) in the GPU HLO.
(d) `train.remat=auto` never picks a policy whose compiled peak exceeds the budget, and picks the fastest that fits.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import pytest

from jqlora import plan
from jqlora.planning import aot
from jqlora.config import load_config
from jqlora.planning import AUTO_ORDER, BUILTIN, linear_shapes
from jqlora import planning
from jqlora.planning.estimate import estimate as hlo_estimate

GPU = "h100-sxm"
L, SEQ, WINDOW = 2, 512, 128
SHAPE = dataclasses.replace(BUILTIN["llama3-8b"], num_hidden_layers=L, sliding_windows=(None,) * L)
CASES = {
    "plain": (SHAPE, ["data.packing=false"]),
    "packed": (SHAPE, ["data.packing=true"]),
    "window": (dataclasses.replace(SHAPE, sliding_windows=(WINDOW,) * L), ["data.packing=true"]),
}


def run_config(*overrides: str):
    return load_config("configs/llama3-8b.yaml", ["model.path=/not/needed", f"data.max_length={SEQ}",
                                                  "train.batch_size=1", *overrides])


@pytest.fixture(scope="module")
def hlo() -> dict[str, str]:
    out = {}
    for case, (shape, overrides) in CASES.items():
        out[case] = aot.compiled(shape, run_config(*overrides), GPU, "full").hlo()
    return out


_INSTR = re.compile(r"^\s*(?:ROOT )?%\S+ = (\([^)]*\)|\S+) ([\w-]+)\((.*)$", re.MULTILINE)


def _instructions(text: str):
    """(result type, opcode, rest of the line) of every HLO instruction."""
    return [m.groups() for m in _INSTR.finditer(text)]


def _attention_calls(text: str) -> list[tuple[str, dict, str]]:
    """(target, backend config fields, op_name) of every cuDNN attention custom call."""
    calls = []
    for _, opcode, rest in _instructions(text):
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        if opcode != "custom-call" or "fmha" not in target.group(1):
            continue
        fields = dict(re.findall(r'"(mask_type|sliding_window_length|fmha_scale)":\s*"?([\w.\-]+)"?', rest))
        op_name = re.search(r'op_name="([^"]*)"', rest).group(1)
        calls.append((target.group(1), fields, op_name))
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_cudnn_fused_attention_forward_and_backward(hlo, case):
    calls = _attention_calls(hlo[case])
    targets = collections.Counter(t for t, _, _ in calls)
    # one forward kernel per scanned body pass (forward, rematerialized forward) and one backward kernel
    assert targets["__cudnn$fmhaSoftmaxBackward"] == 1, targets
    assert targets["__cudnn$fmhaSoftmax"] >= 1, targets
    assert set(targets) == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}, targets  # no dense bias/mask
    assert any("transpose(" not in name for t, _, name in calls if not t.endswith("Backward"))  # in the forward
    want_mask = "CAUSAL" if case == "plain" else "PADDING_CAUSAL"
    for target, config, _ in calls:
        assert config["mask_type"] == want_mask, (target, config)
        assert int(config.get("sliding_window_length", 0) or 0) == (WINDOW if case == "window" else 0), config
        assert float(config["fmha_scale"]) == pytest.approx(SHAPE.head_dim ** -0.5)
    # no [S, S] attention scores anywhere in the step
    scores = re.compile(rf"\[(?:\d+,)+{SEQ},{SEQ}\]")
    assert not [t for t, _, _ in _instructions(hlo[case]) if scores.search(t)]


def _dequantizations(text: str) -> dict[str, collections.Counter]:
    """Kernel sizes of every codebook lookup (a gather in the `dequantize_codes` scope), split by pass."""
    out = {"forward": collections.Counter(), "backward": collections.Counter()}
    for result, opcode, rest in _instructions(text):
        name = re.search(r'op_name="([^"]*)"', rest)
        if opcode != "gather" or not name or "dequantize_codes" not in name.group(1):
            continue
        n = 1
        for d in re.match(r"\w+\[([\d,]*)\]", result).group(1).split(","):
            n *= int(d)
        out["backward" if "transpose(" in name.group(1) else "forward"][n] += 1
    return out


def test_each_4bit_kernel_dequantized_once_per_pass(hlo):
    kernels = collections.Counter(o * i for o, i in linear_shapes(SHAPE).values())
    assert sum(kernels.values()) == 7
    lookups = _dequantizations(hlo["packed"])
    assert lookups["forward"] == kernels, lookups
    assert lookups["backward"] == kernels, lookups


@pytest.fixture(scope="module")
def peaks() -> dict[str, int]:
    cfg = run_config("data.packing=true", "train.remat=auto")  # the "packed" case: its full compile is reused
    return {p: aot.compiled_peak(SHAPE, cfg, GPU, p)["peak"] for p in AUTO_ORDER}


def test_remat_auto_never_picks_a_policy_over_budget(peaks):
    cfg = run_config("data.packing=true", "train.remat=auto")
    assert peaks["full"] < peaks["save_dots_no_batch"] < peaks["none"]  # the compiler sees remat save memory
    h = planning.COMPILED_HEADROOM
    budgets = sorted({p / h for p in peaks.values()} | {p / h * 0.99 for p in peaks.values()} | {p / h * 1.01
                                                                                                for p in peaks.values()})
    # the roofline of each compiled step, parsed here from its HLO (not the step's memo)
    est = {p: hlo_estimate(aot.compiled(SHAPE, cfg, GPU, p).hlo(), aot.GPUS[GPU], tokens=SEQ, model_flops=1.0,
                           lora_rank=cfg.lora.r, vocab=SHAPE.vocab_size).total_ms for p in AUTO_ORDER}
    for budget in budgets:
        chosen, why = planning.resolve_remat(cfg, SHAPE, budget=budget, gpu=GPU)
        fitting = [p for p in AUTO_ORDER if peaks[p] <= h * budget]
        if fitting:
            assert peaks[chosen] <= h * budget, (budget, chosen, why)
            # the fastest that fits (brute force over the candidates)
            best = min(fitting, key=lambda p: (round(est[p], 6), peaks[p]))
            assert chosen == best, (budget, chosen, est)
        else:
            assert chosen == "full", why
        assert "compiled peak" in why


def test_plan_compile_names_an_unknown_gpu(capsys):
    """A user mistake: one line naming the option and the value, exit 2, nothing compiled."""
    assert plan.main(["--model", "llama3-8b", "--compile", "--gpu", "h999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpu h999" in err[0] and "h100-sxm" in err[0], err


# ----------------------------------------------------------------------------------------------------------------
# (e) A Mixtral-shaped MoE step with the load-balancing loss (train.router_aux_loss_coef > 0): it compiles for the
#     GPU, the router statistics leave the scanned layers (the aux loss is in the step), and the dot FLOPs follow
#     the sparse dispatch's tiles (models/moe.py): they grow with top-k, not with the number of experts.

MOE_T, MOE_D, MOE_F = 512, 256, 512


def _moe_shape(experts: int, k: int):
    return dataclasses.replace(BUILTIN["mixtral-8x7b"], num_hidden_layers=L, hidden_size=MOE_D,
                               intermediate_size=MOE_F, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                               vocab_size=512, sliding_windows=(None,) * L, num_experts=experts,
                               num_experts_per_tok=k)


def _dot_flops(text: str) -> float:
    """2 · (output elements) · (contracted elements) summed over every dot of the HLO (each computation once: a
    loop body counts once however many times it runs, the same in both compiles compared)."""
    shapes = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.-]+) = \w+\[([\d,]*)\]", text, re.MULTILINE):
        shapes[m.group(1)] = [int(d) for d in m.group(2).split(",") if d]
    total = 0.0
    for m in re.finditer(r"^\s*(?:ROOT )?%[\w.-]+ = \w+\[([\d,]*)\]\S* dot\(%([\w.-]+), %[\w.-]+\)"
                         r".*?lhs_contracting_dims=\{([\d,]*)\}", text, re.MULTILINE):
        out = math.prod(int(d) for d in m.group(1).split(",") if d)
        lhs = shapes[m.group(2)]
        total += 2.0 * out * math.prod(lhs[int(d)] for d in m.group(3).split(",") if d)
    return total


def _tile_rows(experts: int, k: int) -> int:
    """Rows of the dispatch's tiles (models/moe.py): t = ceil(T·k / E) rows in n = ceil(T·k / t) + E tiles."""
    t = -(-MOE_T * k // experts)
    return t * (-(-MOE_T * k // t) + experts)


def test_moe_step_with_aux_loss_compiles_and_dot_flops_scale_with_top_k():
    """E=4, k=1 against E=8, k=2 (two compiles, CI time; tests/test_moe.py varies each alone on CPU): the tiles add
    T·k rows when k doubles, whatever E; doubling E on the dense path (every expert on every token) would add T·E."""
    flops = {}
    for experts, k in ((4, 1), (8, 2)):
        cfg = load_config("configs/mixtral-8x7b.yaml", ["model.path=/not/needed", f"data.max_length={MOE_T}",
                                                        "train.batch_size=1", "train.router_aux_loss_coef=0.02",
                                                        "train.remat=none"])
        text = aot.compile_step(_moe_shape(experts, k), cfg, GPU).hlo()
        # the per-layer router statistics [L, 2, E] (fraction routed, mean probability) out of the layer scan:
        # only a step with the aux loss has them
        assert f"f32[{L},2,{experts}]" in text
        flops[experts, k] = _dot_flops(text)
    rows = _tile_rows(8, 2) - _tile_rows(4, 1)
    assert rows == 2 * MOE_T  # (slots padded per expert to whole tiles: 2 · T · k rows at both points)
    # per added row: the tiles' gate, up and down matmuls forward and their input gradients backward (the experts
    # are frozen: no weight gradients), 6 · 2 · D · F; the rest of the step is the same up to the [D, E] router
    sparse = 6 * 2.0 * rows * MOE_D * MOE_F
    dense = 6 * 2.0 * MOE_T * (8 - 4) * MOE_D * MOE_F
    assert dense == 2 * sparse
    assert flops[8, 2] - flops[4, 1] == pytest.approx(sparse, rel=5e-3), flops
