"""Issue 7's CPU-verifiable optimizations: the compiled gradient dequantizes every 4-bit kernel exactly once in the
forward pass and once in the backward pass under every remat policy (no policy keeps a dequantized copy of a layer,
and none dequantizes twice), the matmul-saving policies do not recompute the 4-bit matmuls, and `train.remat=auto`
picks the fastest policy whose memory plan fits.

The counts come from the optimized HLO of `jax.jit(grad).lower(...).compile()`: every dequantization is one codebook
lookup (a gather under the name scope `dequantize_codes`) producing one value per kernel element, so the multiset
of their sizes, split by pass (`transpose(jvp(...))` in the op name: the backward pass, rematerialized forward
included), must be the multiset of the layer's kernel sizes once per pass.
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jqlora import plan, planning
from jqlora.planning import aot, remat
from jqlora.training import step
from jqlora.lora import LoraConfig, QuantSpec
from jqlora.models.llama import REMAT_POLICIES, LlamaForCausalLM, ModelConfig

TINY = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
B, S = 2, 16


def _compiled_grad_hlo(remat: str) -> str:
    model = LlamaForCausalLM(ModelConfig(**TINY), LoraConfig(r=4, alpha=8), QuantSpec("nf4"), "float32",
                             rngs=nnx.Rngs(0), remat=remat)
    split = step.SplitModel.of(model)
    batch = dict(input_ids=jnp.zeros((B, S), jnp.int32), targets=jnp.zeros((B, S), jnp.int32),
                 loss_mask=jnp.ones((B, S), jnp.float32), segment_ids=jnp.ones((B, S), jnp.int32),
                 positions=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)))
    grad_fn = step.make_grad_fn(split, 16)
    return jax.jit(grad_fn).lower(split.lora, split.frozen, batch, jax.random.PRNGKey(0), 1.0).compile().as_text()


def _by_pass(hlo: str, pattern: str) -> dict[str, collections.Counter]:
    out = {"forward": collections.Counter(), "backward": collections.Counter()}
    for m in re.finditer(pattern, hlo):
        size, op_name = m.group(1), m.group(2)
        out["backward" if "transpose(" in op_name else "forward"][size] += 1
    return out


def _kernel_sizes() -> collections.Counter:
    from jqlora.planning import linear_shapes

    return collections.Counter(str(o * i) for o, i in linear_shapes(ModelConfig(**TINY)).values())


@pytest.fixture(scope="module")
def hlo() -> dict[str, str]:
    return {policy: _compiled_grad_hlo(policy) for policy in REMAT_POLICIES}


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_one_dequantization_per_kernel_per_pass(hlo, policy):
    lookups = _by_pass(hlo[policy], r"= f32\[(\d+),1\]\S* gather\([^\n]*op_name=\"([^\"]*dequantize_codes[^\"]*)\"")
    kernels = _kernel_sizes()
    assert sum(kernels.values()) == 7
    # the scanned layer body holds one layer: each of its 7 kernels once per pass
    assert lookups["forward"] == kernels, (policy, lookups)
    assert lookups["backward"] == kernels, (policy, lookups)


def test_policies_that_save_matmuls_do_not_recompute_them(hlo):
    """The 4-bit matmul is a custom_vjp (its backward keeps the codes, not the dequantized kernel), which hides its
    dot from dots_saveable; it is saved by name instead. So save_dots runs exactly the backward pass's own dots, like
    no remat, and full recomputes every forward dot of the layer on top (counted in the compiled HLO)."""
    dot = r"= \S+ (dot)\([^\n]*op_name=\"([^\"]*)\""
    dots = {p: sum(_by_pass(hlo[p], dot)["backward"].values()) for p in REMAT_POLICIES}
    fwd = 7 + 7 + 7 + 2  # one layer's forward dots: 7 base matmuls, LoRA A and B of each, attention scores and values
    assert dots["save_dots"] == dots["none"]
    # full recomputes the layer's forward dots, except down_proj's (its output only feeds the residual sum)
    assert dots["full"] == dots["none"] + fwd - 2
    # without attention's batched dots saved: exactly those two are recomputed (scores and values)
    assert dots["save_dots_no_batch"] == dots["none"] + 2


# ---------------------------------------------------------------------------------------------------------------
# train.remat=auto


def test_auto_order_is_fastest_first_and_needs_less_memory_each_step():
    """AUTO_ORDER goes from the least recomputation to the most, and for real shapes each step needs less memory,
    so 'the first that fits' is the fastest that fits."""
    for name in ("llama3-8b", "llama3-70b", "qwen2.5-7b"):
        totals = [planning.memory_plan(planning.BUILTIN[name], seq=2048, remat=p).total for p in planning.AUTO_ORDER]
        assert totals == sorted(totals, reverse=True), (name, totals)


@pytest.mark.parametrize("budget_gb", [8, 12, 16, 24, 40, 48, 80, 141])
def test_choose_remat_picks_the_fastest_that_fits(budget_gb):
    shape = planning.BUILTIN["llama3-8b"]
    chosen, p = planning.choose_remat(shape, budget_gb * 1e9, seq=2048)
    usable = planning.HEADROOM * budget_gb * 1e9
    ms = {f: planning.analytic_step(shape, aot.GPUS["h100-sxm"], seq=2048, remat=f).total_ms
          for f in planning.AUTO_ORDER}
    faster = [f for f in planning.AUTO_ORDER if ms[f] < ms[chosen] - 1e-6]  # (by the analytic step estimate)
    assert all(planning.memory_plan(shape, seq=2048, remat=f).total > usable for f in faster), (chosen, faster)
    assert p.total == planning.memory_plan(shape, seq=2048, remat=chosen).total
    assert p.total <= usable or chosen == "full"


def test_resolve_remat_from_config(monkeypatch):
    from jqlora.config import load_config

    shape = planning.BUILTIN["llama3-8b"]
    cfg = load_config(None, ["train.remat=auto", "data.max_length=2048", "train.batch_size=1",
                             "model.dtype=bfloat16"])
    assert planning.resolve_remat(cfg, shape, budget=80e9)[0] == "none"
    assert planning.resolve_remat(cfg, shape, budget=16e9)[0] == "full"
    monkeypatch.setattr(remat, "device_budget", lambda: None)  # a backend that reports no memory (CPU)
    policy, why = planning.resolve_remat(cfg, shape)
    assert policy == "full" and "does not report its memory" in why
    monkeypatch.setattr(remat, "device_budget", lambda: 80e9)  # the device's own budget when none is given
    assert planning.resolve_remat(cfg, shape)[0] == "none"
    fixed = load_config(None, ["train.remat=save_dots"])
    assert planning.resolve_remat(fixed, shape, budget=1.0)[0] == "save_dots"


def test_plan_cli_remat_auto(capsys):
    assert plan.main(["--model", "llama3-8b", "--remat", "auto", "--memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "remat auto -> none" in out and "fits:" in out
    assert plan.main(["--model", "llama3-8b", "--remat", "auto"]) == 2
    assert "--memory" in capsys.readouterr().err
    assert plan.main(["--model", "llama3-70b", "--memory", "24"]) == 3  # (exit 3: does not fit, for scripts)
    assert "does NOT fit" in capsys.readouterr().out


def test_gradients_with_the_4bit_matmul_rule_equal_autodiff():
    """`lora.quantized_matmul`'s hand-written backward equals autodiff through the dequantized kernel (float32)."""
    from jqlora import quant
    from jqlora.lora import quantized_matmul

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0, 0.02, (48, 64)), jnp.float32)
    t = quant.quantize(w, "nf4", block_size=64, double_quant=True)
    x = jnp.asarray(rng.normal(size=(3, 5, 64)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 5, 48)), jnp.float32)
    ours = jax.grad(lambda x: jnp.sum(quantized_matmul(x, t, jnp.float32) * g))(x)
    dense = quant.dequantize(t, jnp.float32)
    ref = jax.grad(lambda x: jnp.sum(jnp.einsum("bsi,oi->bso", x, dense) * g))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-7)
    ref64 = np.einsum("bso,oi->bsi", np.asarray(g, np.float64), np.asarray(dense, np.float64))
    np.testing.assert_allclose(np.asarray(ours), ref64, rtol=1e-5, atol=1e-6)


def test_plan_of_a_recipe_counts_rows_per_device(capsys):
    """train.batch_size is the global micro-batch; the plan splits it over data × fsdp (8 rows over fsdp=8: 1 each),
    and gives the same bytes as the shape's plan at 1 row per device."""
    import os

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    recipe = os.path.join(repo, "configs", "llama3-70b-fsdp8.yaml")
    assert plan.main(["--config", recipe, "--model", "llama3-70b"]) == 0
    out = capsys.readouterr().out
    assert "batch=1/device" in out and "fsdp=8" in out, out
    ref = planning.memory_plan(planning.BUILTIN["llama3-70b"], seq=2048, batch=1, fsdp=8, remat="full", r=16)
    assert f"{ref.total / 1e9:>9.2f} GB" in out
