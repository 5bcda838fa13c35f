"""``train.remat=auto`` by speed: among the policies whose memory fits, the lowest estimated step time
(`jqlora.planning.estimate`). Oracles: a brute force over every policy, and FLOP counts by hand from the shape."""

import dataclasses

import pytest

from jqlora import plan, planning
from jqlora.planning import aot

SHAPE = planning.BUILTIN["llama3-8b"]
H100 = aot.GPUS["h100-sxm"]


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_auto_picks_the_best_estimate_that_fits_llama3_8b_h100(batch, capsys):
    budget = 80e9
    brute = {}
    for p in planning.AUTO_ORDER:
        total = planning.memory_plan(SHAPE, seq=2048, batch=batch, remat=p).total
        ms = planning.analytic_step(SHAPE, H100, seq=2048, batch=batch, remat=p).total_ms
        brute[p] = (total <= planning.HEADROOM * budget, ms, total)
    fitting = {p: v for p, v in brute.items() if v[0]}
    best = min(fitting, key=lambda p: (round(fitting[p][1], 6), fitting[p][2]))
    chosen, got = planning.choose_remat(SHAPE, budget, seq=2048, batch=batch)
    assert chosen == best, (batch, brute)
    assert got.total == brute[best][2]
    # the CLI prints the same choice and one ranking line per policy, those that fit first, fastest first
    assert plan.main(["--model", "llama3-8b", "--seq", "2048", "--batch", str(batch), "--remat", "auto",
                      "--memory", "80", "--gpu", "h100-sxm"]) == 0
    out = capsys.readouterr().out
    assert f"remat auto -> {best} " in out
    ranks = [line.split()[2] for line in out.splitlines() if line.strip().startswith("rank ")]
    assert ranks[0] == best and sorted(ranks) == sorted(planning.AUTO_ORDER)
    assert ranks == sorted(brute, key=lambda p: (not brute[p][0], round(brute[p][1], 6), brute[p][2]))


def test_analytic_recompute_cost_by_hand():
    # full recomputes exactly one forward of the layers: 2·N_l·L·T matmul FLOPs + the attention forward
    # 4·T·S·Nq·H·½ (causal) per layer; none recomputes nothing; save_dots recomputes only cuDNN's fused attention
    # forward (no dot) and the elementwise work
    seq, batch = 2048, 1
    T, L = seq * batch, SHAPE.num_hidden_layers
    n_layer = sum(o * i for o, i in planning.linear_shapes(SHAPE).values())
    assert n_layer == 4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # q, o, k, v, gate, up, down
    est = {p: planning.analytic_step(SHAPE, H100, seq=seq, batch=batch, remat=p).ms for p in planning.AUTO_ORDER}
    att_fwd = 4 * T * seq * 32 * 128 * 0.5 * L
    frozen = lambda p: est[p]["frozen matmuls"] * 1e-3 * H100.bf16_flops  # noqa: E731
    attention = lambda p: est[p]["attention"] * 1e-3 * H100.bf16_flops  # noqa: E731
    assert frozen("full") - frozen("none") == pytest.approx(2 * n_layer * L * T, rel=1e-9)
    assert frozen("save_dots") == pytest.approx(frozen("none"), rel=1e-12)
    assert attention("none") == pytest.approx(3.5 * att_fwd, rel=1e-9)
    assert attention("save_dots") - attention("none") == pytest.approx(att_fwd, rel=1e-9)
    totals = [sum(est[p].values()) for p in planning.AUTO_ORDER]
    assert totals == sorted(totals)  # less recomputation, less time (the order of AUTO_ORDER)


def test_offload_pays_the_host_link():
    # the saved matmul outputs go to the host and back: 2 × the plan's host bytes over the target's link, so the
    # same step is slower over PCIe (H100) than over NVLink-C2C (GH200) by exactly that, and never free
    host = sum(planning.memory_plan(SHAPE, seq=2048, remat="offload").host_rows.values())
    assert host > 1e9
    for name in ("h100-sxm", "gh200"):
        gpu = aot.GPUS[name]
        ms = planning.analytic_step(SHAPE, gpu, seq=2048, remat="offload").ms["host link"]
        assert ms == pytest.approx(2 * host / gpu.host_link_bytes_per_s * 1e3, rel=1e-12)
    pcie = planning.analytic_step(SHAPE, H100, seq=2048, remat="offload")
    c2c = planning.analytic_step(SHAPE, dataclasses.replace(H100, host_link_bytes_per_s=450e9), seq=2048,
                                 remat="offload")
    assert pcie.total_ms - c2c.total_ms == pytest.approx(2 * host * (1 / 64e9 - 1 / 450e9) * 1e3, rel=1e-9)
    # over PCIe, offloading ~11 GB costs more than full's recomputation
    assert pcie.total_ms > planning.analytic_step(SHAPE, H100, seq=2048, remat="full").total_ms


@pytest.mark.parametrize("gpu", sorted(aot.GPUS))
def test_host_link_is_the_target_files_pcie_bandwidth(gpu):
    import re

    text = aot.target_config(gpu)
    assert float(re.search(r"pcie_bandwidth:\s*(\d+)", text).group(1)) == aot.GPUS[gpu].host_link_bytes_per_s
    assert float(re.search(r"memory_bandwidth:\s*(\d+)", text).group(1)) == aot.GPUS[gpu].hbm_bytes_per_s
