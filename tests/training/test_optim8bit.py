"""train.optimizer_state (jqlora.training.optim8bit): the 8-bit AdamW follows bitsandbytes' AdamW8bit (CPU) step by
step, its moments decay as float64 says (the bfloat16 ones too), its state passes the LoRA-only check and survives a
checkpoint (resume = uninterrupted), the plan's adapter row follows the state, and a bad value is a one-line config
error.

Oracles: ``bitsandbytes.optim.AdamW8bit`` on CPU torch tensors, and float64 numpy. bitsandbytes' CPU quantizer
approximates its search near the midpoints between map entries (tests/quant/test_dynamic.py); ours takes the exact
nearest entry (as its CUDA kernel), so codes are compared by where they differ, not byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
import torch

import bitsandbytes as bnb

from jqlora import quant
from jqlora.config import ConfigError, load_config
from jqlora.training import optim
from jqlora.training.optim8bit import Quantized8bit, adamw_lowp
from test_train import interrupt_at

LR, B1, B2, EPS, WD = 1e-2, 0.9, 0.999, 1e-8, 0.01
SHAPES = {"big": (40, 150), "small": (16, 100)}  # 6000 elements (23.4 blocks of 256: a partial last one) and 1600
STEPS = 20


def _grads(rng, step):
    return {k: (rng.normal(size=s) * 0.01 * (1 + step % 3)).astype(np.float32) for k, s in SHAPES.items()}


def _nearest64(x64: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Index of the map entry nearest to each value, in float64."""
    return np.abs(x64[:, None] - book.astype(np.float64)[None, :]).argmin(axis=1)


@pytest.fixture(scope="module")
def bnb_run():
    """bitsandbytes' AdamW8bit over STEPS steps: its state and parameters before and after each step."""
    rng = np.random.default_rng(0)
    init = {k: (rng.normal(size=s) * 0.1).astype(np.float32) for k, s in SHAPES.items()}
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    opt = bnb.optim.AdamW8bit(list(tp.values()), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    snap = lambda: {k: {n: t.detach().clone().numpy() for n, t in opt.state[p].items()  # noqa: E731
                        if torch.is_tensor(t) and n not in ("qmap1", "qmap2")} | {"p": p.detach().clone().numpy()}
                    for k, p in tp.items()}
    steps = []
    for t in range(STEPS):
        grads = _grads(rng, t)
        before = snap() if t else None
        for k, p in tp.items():
            p.grad = torch.tensor(grads[k])
        opt.step()
        steps.append((grads, before, snap()))
    return init, steps


def test_8bit_state_layout_is_bitsandbytes(bnb_run):
    _, steps = bnb_run
    ours = adamw_lowp(LR, "8bit", B1, B2, EPS, WD).init({k: jnp.zeros(s) for k, s in SHAPES.items()})[0]
    theirs = steps[-1][2]
    assert isinstance(ours.mu["big"], Quantized8bit) and not isinstance(ours.mu["small"], Quantized8bit)
    for mine, code, absmax in ((ours.mu, "state1", "absmax1"), (ours.nu, "state2", "absmax2")):
        assert mine["big"].codes.dtype == jnp.uint8 and theirs["big"][code].dtype == np.uint8
        assert mine["big"].codes.shape == theirs["big"][code].shape
        assert mine["big"].absmax.shape == theirs["big"][absmax].shape == (24,)
        assert mine["small"].dtype == jnp.float32 and theirs["small"][code].dtype == np.float32


def test_each_8bit_step_is_bitsandbytes(bnb_run):
    """From bitsandbytes' own state and parameters before each step, one of our steps gives its parameters, its
    block absmax values, and the float64-nearest codes of the updated moments; bitsandbytes' codes agree but where
    its CPU search is approximate, and there ours is never the farther entry."""
    _, steps = bnb_run
    tx = adamw_lowp(LR, "8bit", B1, B2, EPS, WD)
    update = jax.jit(tx.update)
    books = {"state1": quant.dynamic_map(True), "state2": quant.dynamic_map(False)}
    worst = {"p": 0.0, "absmax": 0.0, "small": 0.0}
    differ = {"state1": 0, "state2": 0}
    for t, (grads, before, after) in enumerate(steps[1:], start=1):
        big, small = before["big"], before["small"]
        params = {k: jnp.asarray(before[k]["p"]) for k in SHAPES}
        state = tx.init(params)
        state = (state[0]._replace(
            count=jnp.asarray(t, jnp.int32),
            mu={"big": Quantized8bit(jnp.asarray(big["state1"]), jnp.asarray(big["absmax1"])),
                "small": jnp.asarray(small["state1"])},
            nu={"big": Quantized8bit(jnp.asarray(big["state2"]), jnp.asarray(big["absmax2"])),
                "small": jnp.asarray(small["state2"])}), *state[1:])
        u, new = update({k: jnp.asarray(g) for k, g in grads.items()}, state, params)
        got = optax.apply_updates(params, u)
        for k in SHAPES:
            worst["p"] = max(worst["p"], float(np.abs(np.asarray(got[k]) - after[k]["p"]).max()))
        for mine, code in ((new[0].mu["small"], "state1"), (new[0].nu["small"], "state2")):
            worst["small"] = max(worst["small"], float(np.abs(np.asarray(mine) - after["small"][code]).max()))
        g64 = grads["big"].astype(np.float64).reshape(-1)
        for mine, code, absmax, beta, signed in ((new[0].mu["big"], "state1", "absmax1", B1, True),
                                                 (new[0].nu["big"], "state2", "absmax2", B2, False)):
            book = books[code]
            old = (book[big[code].reshape(-1)].astype(np.float64)
                   * np.repeat(big[absmax].astype(np.float64), 256)[: g64.size])
            x64 = beta * old + (1 - beta) * (g64 if signed else g64 * g64)  # the updated moment, float64
            blocks = np.pad(np.abs(x64), (0, 24 * 256 - x64.size)).reshape(24, 256).max(axis=1)
            np.testing.assert_allclose(np.asarray(mine.absmax), blocks, rtol=2e-6)
            np.testing.assert_allclose(after["big"][absmax], blocks, rtol=2e-6)
            rel = np.abs(np.asarray(mine.absmax) / after["big"][absmax] - 1)
            worst["absmax"] = max(worst["absmax"], float(rel.max()))
            scaled = x64 / np.repeat(blocks, 256)[: x64.size]
            ours, theirs = np.asarray(mine.codes).reshape(-1), after["big"][code].reshape(-1)
            exact = _nearest64(scaled, book)
            assert np.mean(ours == exact) >= 0.9995, (t, code, np.mean(ours == exact))
            far_ours, far_theirs = np.abs(scaled - book[ours]), np.abs(scaled - book[theirs])
            assert np.all(far_ours <= far_theirs + 1e-6 * np.abs(scaled)), (t, code)
            differ[code] += int(np.sum(ours != theirs))
    n = (STEPS - 1) * 6000
    print(f"\nper step: params max |diff| {worst['p']:.2e}, absmax max rel diff {worst['absmax']:.2e}, float32 "
          f"moments (small tensor) max |diff| {worst['small']:.2e}; codes that differ from bitsandbytes' CPU search: "
          f"m {differ['state1'] / n:.3%}, v {differ['state2'] / n:.3%}")
    assert worst["p"] <= 1e-6 and worst["small"] <= 1e-8
    assert differ["state1"] / n <= 0.005 and differ["state2"] / n <= 0.06  # measured 0.07% and 3%


def test_20_steps_follow_bitsandbytes(bnb_run):
    """Free-running: our 8-bit AdamW and bitsandbytes' over the same 20 gradients stay within the quantization's
    own spread (the codes where bitsandbytes' CPU search is approximate feed back into later steps)."""
    init, steps = bnb_run
    tx = adamw_lowp(LR, "8bit", B1, B2, EPS, WD)
    params = {k: jnp.asarray(v) for k, v in init.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads, _, _ in steps:
        u, state = update({k: jnp.asarray(g) for k, g in grads.items()}, state, params)
        params = optax.apply_updates(params, u)
    final = steps[-1][2]
    moved = {k: float(np.abs(final[k]["p"] - init[k]).max()) for k in SHAPES}
    diff = {k: float(np.abs(np.asarray(params[k]) - final[k]["p"]).max()) for k in SHAPES}
    m = quant.dequantize_dynamic(state[0].mu["big"].codes, state[0].mu["big"].absmax, True)
    m_bnb = (quant.dynamic_map(True)[final["big"]["state1"]]
             * np.repeat(final["big"]["absmax1"], 256)[:6000].reshape(40, 150))
    m_rel = float(np.abs(np.asarray(m) - m_bnb).max() / np.abs(m_bnb).max())
    print(f"\n20 steps: params max |diff| {diff} (they moved up to {moved}); dequantized m max diff {m_rel:.2%} "
          "of its max")
    assert diff["small"] <= 1e-5 and diff["big"] <= 0.03 * moved["big"] and m_rel <= 0.05


def test_check_state_is_lora_only_takes_8bit_and_bf16_states():
    from jqlora.config import TrainConfig

    params = {"layer": {"lora_a": jnp.zeros((2, 4, 64)), "lora_b": jnp.zeros((2, 64, 4)), "big": jnp.zeros((80, 64))}}
    for state in ("float32", "bfloat16", "8bit"):
        for plus_ratio in (None, 4.0):  # (LoRA+: a multi-transform of three AdamW)
            tx, _ = optim.make_optimizer(TrainConfig(optimizer_state=state, grad_accum_steps=2), 10, plus_ratio)
            opt_state = tx.init(params)
            assert optim.check_state_is_lora_only(opt_state, params) == 9
            leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, Quantized8bit))
            # only "big" (5120 elements) is over 4096
            assert sum(isinstance(x, Quantized8bit) for x in leaves) == (2 if state == "8bit" else 0)
            dtypes = {x.dtype for x in leaves if not isinstance(x, Quantized8bit) and x.shape == (2, 4, 64)}
            assert dtypes == {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16 if state == "bfloat16" else jnp.float32)}
    tx, _ = optim.make_optimizer(TrainConfig(optimizer_state="8bit", grad_accum_steps=2), 10)
    opt_state = tx.init(params)
    stray = dict(opt_state.inner_opt_state[-1][0].mu)
    opt_state = opt_state._replace(inner_opt_state=(*opt_state.inner_opt_state[:-1], (
        opt_state.inner_opt_state[-1][0]._replace(mu={"layer": {**stray["layer"], "extra": jnp.zeros((3, 3))}}),
        *opt_state.inner_opt_state[-1][1:])))
    with pytest.raises(AssertionError, match="non-LoRA"):
        optim.check_state_is_lora_only(opt_state, params)


def test_auto_state_is_8bit_under_memory_min_only():
    """train.optimizer_state=auto (the default): train.memory=min takes the 8-bit moments with its other savings,
    the default mode float32; the plan counts what the optimizer holds."""
    from jqlora.config import TrainConfig
    from jqlora.plan import lookup_shape
    from jqlora.planning.memory import lora_row, memory_plan

    params = {"big": jnp.zeros((80, 64))}
    for memory, quantized in (("default", 0), ("min", 2)):
        tc = TrainConfig(memory=memory, remat="full")
        assert tc.optimizer_state == "auto"
        leaves = jax.tree.leaves(optim.make_optimizer(tc, 10)[0].init(params),
                                 is_leaf=lambda x: isinstance(x, Quantized8bit))
        assert sum(isinstance(x, Quantized8bit) for x in leaves) == quantized, memory
    shape, _ = lookup_shape("llama3-8b")
    assert lora_row("8bit", accumulates=False) in memory_plan(shape, seq=2048, memory="min", grad_accum=1).rows
    assert lora_row("8bit") in memory_plan(shape, seq=2048, memory="min", grad_accum=2).rows
    assert lora_row("float32") in memory_plan(shape, seq=2048).rows


def test_min_mode_without_accumulation_equals_multisteps_without_its_accumulator():
    """train.memory=min at grad_accum_steps 1 drops MultiSteps' float32 accumulator (`optim.single_step`): the same
    parameters as MultiSteps(every_k_schedule=1) over 5 steps to float32 rounding (MultiSteps divides its running
    mean: 1 ulp on 0.06% of the elements), 2 state leaves per parameter, not 3."""
    from jqlora.config import TrainConfig

    params = {"a": jnp.ones((8, 64)), "big": jnp.ones((80, 64))}
    common = dict(optimizer_state="float32", grad_accum_steps=1, warmup_steps=0, adam_eps=1e-6)
    txs = {m: optim.make_optimizer(TrainConfig(memory=m, remat="full", **common), 10)[0] for m in ("default", "min")}
    assert isinstance(txs["default"], optax.MultiSteps) and not isinstance(txs["min"], optax.MultiSteps)
    out = {}
    for mode, tx in txs.items():
        p, state = params, tx.init(params)
        for step in range(5):
            g = jax.tree.map(lambda x, s=step: jax.random.normal(jax.random.key(s), x.shape), p)
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        out[mode] = (p, state)
    for k in params:
        np.testing.assert_allclose(np.asarray(out["min"][0][k]), np.asarray(out["default"][0][k]), rtol=3e-7, atol=0)
    assert optim.check_state_is_lora_only(out["min"][1], params) == 4
    assert optim.check_state_is_lora_only(out["default"][1], params) == 6
    assert float(optim.last_grad_norm(out["min"][1])) == pytest.approx(float(optim.last_grad_norm(out["default"][1])),
                                                                       rel=1e-6)


def test_bad_optimizer_state_is_one_line():
    from jqlora.config.base import OPTIMIZER_STATES
    from jqlora.training.optim8bit import STATE_DTYPES

    assert OPTIMIZER_STATES == STATE_DTYPES
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.optimizer_state=int4"])
    msg = str(e.value)
    assert "\n" not in msg and "train.optimizer_state='int4' must be one of auto, float32, bfloat16, 8bit" in msg, msg


def test_plan_row_follows_the_state():
    from jqlora.plan import lookup_shape
    from jqlora.planning.memory import lora_param_count, lora_row, memory_plan

    shape, _ = lookup_shape("llama3-8b")
    n = lora_param_count(shape, 16)
    for state, per_param in (("float32", 20), ("bfloat16", 16), ("8bit", 14 + 8 / 256)):
        rows = memory_plan(shape, seq=2048, optimizer_state=state).rows
        assert rows[lora_row(state)] == pytest.approx(per_param * n), state


@pytest.mark.usefixtures("compilation_cache")
@pytest.mark.parametrize("state", ["8bit", "bfloat16"])
def test_resume_with_low_precision_state_equals_uninterrupted(assets, tmp_path, state):
    """A run stopped after step 3 and resumed from its checkpoint (8-bit / bfloat16 moments saved and restored by
    orbax; the stochastic rounding's bits follow the restored step count) ends where the uninterrupted run ends: the
    same adapters, optimizer state and loss at every step."""
    import json
    from pathlib import Path

    from jqlora.run import Trainer

    def cfg(out):
        return load_config(None, [
            f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}", "data.max_length=48",
            f"output_dir={out}", "lora.r=32", "train.log_every=1", "train.eval_every=0", "train.warmup_steps=1",
            "train.learning_rate=1e-2", "train.max_steps=6", "train.save_every=3", "train.batch_size=2",
            "train.grad_accum_steps=2", f"train.optimizer_state={state}"])

    def losses(out):
        rows = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss")) for r in rows]

    straight = Trainer(cfg(tmp_path / "a"), export=False)
    assert straight.run() == 0
    leaves = jax.tree.leaves(straight.opt_state, is_leaf=lambda x: isinstance(x, Quantized8bit))
    # 8bit: both moments of 12 of the 14 adapter leaves in 8 bits (r=32; k/v_proj's B [2, 32, 32] are under 4096)
    assert sum(isinstance(x, Quantized8bit) for x in leaves) == (2 * 12 if state == "8bit" else 0)
    if state == "bfloat16":
        assert sum(getattr(x, "dtype", None) == jnp.bfloat16 for x in leaves) == 2 * 14

    first = Trainer(cfg(tmp_path / "b"), export=False)
    interrupt_at(first, 3)  # a SIGINT arriving during step 3
    assert first.run() == 130 and first.run_dir.latest_step() == 3
    second = Trainer(cfg(tmp_path / "b"), export=False)
    assert second.run() == 0
    for a, b in zip(jax.tree.leaves(second.lora), jax.tree.leaves(straight.lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(second.opt_state), jax.tree.leaves(straight.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


@pytest.mark.parametrize("state", ["bfloat16", "8bit"])
def test_second_moment_decays_as_float64(state):
    """After one gradient of 1 and 499 of 0, v is (1 - β2) β2^499 and m (1 - β1) β1^499 (float64) on average: the
    bfloat16 state rounds stochastically (round-to-nearest would leave v at 1 - β2 forever), the 8-bit one decays
    through its block absmax."""
    from jqlora.training.optim8bit import scale_by_adam_lowp

    tx = scale_by_adam_lowp(state, B1, B2, EPS)
    params = {"w": jnp.zeros((64, 64))}
    st = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(500):
        _, st = update({"w": jnp.full((64, 64), 1.0 if t == 0 else 0.0)}, st, params)
    load = (lambda q, signed: np.asarray(quant.dequantize_dynamic(q.codes, q.absmax, signed))) if state == "8bit" \
        else (lambda x, _: np.asarray(x, np.float64))
    v, m = load(st.nu["w"], False), load(st.mu["w"], True)
    np.testing.assert_allclose(v.mean(), (1 - B2) * B2 ** 499, rtol=0.01)
    np.testing.assert_allclose(m.mean(), (1 - B1) * B1 ** 499, rtol=0.02)
