"""jqlora.lora against peft (forward, scaling, init) and its own invariants (quantized kernel, merge, dropout,
which variables are trainable)."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from jqlora import quant
from jqlora.lora import Frozen, LoraConfig, LoraLinear, LoraSpec, QuantData, QuantSpec

IN, OUT = 48, 40


def peft_linear(bias: bool, r: int, alpha: float, rslora: bool, seed: int = 0):
    """A torch Linear inside peft's LoRA wrapper (the oracle), and its base weight / bias as numpy."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(IN, OUT, bias=bias))
    pm = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["proj"]))
    layer = pm.base_model.model.proj
    w = layer.base_layer.weight.detach().numpy().copy()
    b = layer.base_layer.bias.detach().numpy().copy() if bias else None
    return pm.eval(), layer, w, b


def ours(w, b, spec, quant_spec=QuantSpec("none"), dtype="float32", seed=0):
    layer = LoraLinear(IN, OUT, lora=spec, quant=quant_spec, use_bias=b is not None, dtype=dtype,
                       rngs=nnx.Rngs(seed))
    if quant_spec.enabled:
        layer.set_quantized(quant.quantize(w, quant_spec.quant, block_size=quant_spec.block_size,
                                           double_quant=quant_spec.double_quant))
    else:
        layer.weight.set_value(jnp.asarray(w, dtype))
    if b is not None:
        layer.bias.set_value(jnp.asarray(b, dtype))
    return layer


def randomize_b(layer, seed=1, scale=0.5):
    rng = np.random.default_rng(seed)
    layer.lora_b.set_value(jnp.asarray(rng.normal(0, scale, layer.lora_b.shape).astype(np.float32)))


def x_input(shape=(2, 5, IN), seed=2):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("r,alpha,rslora", [(8, 16, False), (4, 32, True), (1, 1, False)])
def test_forward_matches_peft(bias, r, alpha, rslora):
    pm, player, w, b = peft_linear(bias, r, alpha, rslora)
    spec = LoraConfig(r=r, alpha=alpha, rslora=rslora, targets=["q_proj"]).for_module("self_attn.q_proj")
    layer = ours(w, b, spec)
    randomize_b(layer)
    assert layer.scaling == pytest.approx(player.scaling["default"], rel=1e-12)
    with torch.no_grad():
        player.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(layer.lora_a[...]).T.copy()))
        player.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(layer.lora_b[...]).T.copy()))
        x = x_input()
        ref = pm(torch.from_numpy(x)).numpy()
        base = player.base_layer(torch.from_numpy(x)).numpy()
    got = np.asarray(layer(jnp.asarray(x)))
    assert np.abs(ref - base).max() > 0.1
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)


def test_init_follows_peft():
    _, player, w, _ = peft_linear(False, 16, 16, False)
    layer = ours(w, None, LoraSpec(16, 16))
    bound = 1 / np.sqrt(IN)  # kaiming_uniform_(a=√5) on [r, in]
    a, peft_a = np.asarray(layer.lora_a[...]), player.lora_A["default"].weight.detach().numpy()
    assert a.shape == peft_a.T.shape == (IN, 16) and layer.lora_b.shape == (16, OUT)
    for m in (a, peft_a):
        assert 0.95 * bound < np.abs(m).max() <= bound
        assert abs(m.std() - bound / np.sqrt(3)) < 0.1 * bound
    assert not np.any(np.asarray(layer.lora_b[...])) and not player.lora_B["default"].weight.detach().any()
    assert layer.lora_a.dtype == layer.lora_b.dtype == jnp.float32


@pytest.mark.parametrize("qspec", [QuantSpec("nf4", True, 64), QuantSpec("fp4", False, 32), QuantSpec("nf4", False, 128)],
                         ids=lambda s: f"{s.quant}-dq{int(s.double_quant)}-{s.block_size}")
def test_quantized_layer_is_the_dequantized_kernel(qspec):
    _, _, w, b = peft_linear(True, 4, 8, False)
    layer = ours(w, b, LoraSpec(4, 8), qspec)
    randomize_b(layer)
    expected = quant.dequantize(quant.quantize(w, qspec.quant, block_size=qspec.block_size,
                                               double_quant=qspec.double_quant))
    assert np.array_equal(np.asarray(layer.kernel()), np.asarray(expected))
    plain = ours(np.asarray(expected), b, LoraSpec(4, 8))
    plain.lora_a.set_value(layer.lora_a[...])
    plain.lora_b.set_value(layer.lora_b[...])
    x = jnp.asarray(x_input())
    np.testing.assert_allclose(layer(x), plain(x), atol=1e-6, rtol=0)
    # frozen data is never a Param; only the adapter is
    assert {k for k, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))} == {("lora_a",), ("lora_b",)}
    names = {k[-1] for k, _ in nnx.to_flat_state(nnx.state(layer, QuantData))}
    assert names == ({"codes", "absmax", "nested_absmax", "offset"} if qspec.double_quant else {"codes", "absmax"})
    assert {k[-1] for k, _ in nnx.to_flat_state(nnx.state(layer, Frozen))} == names | {"bias"}


def test_gradients_reach_only_the_adapter():
    _, _, w, b = peft_linear(True, 4, 8, False)
    layer = ours(w, b, LoraSpec(4, 8), QuantSpec("nf4"))
    randomize_b(layer)
    x = jnp.asarray(x_input())

    @nnx.grad(argnums=nnx.DiffState(0, nnx.LoRAParam))
    def grads(m):
        return jnp.sum(m(x) ** 2)

    g = grads(layer)
    assert {k for k, _ in nnx.to_flat_state(g)} == {("lora_a",), ("lora_b",)}
    # dL/dB = s (xA)ᵀ (2y), summed over batch and sequence
    y = np.asarray(layer(x), np.float64)
    xa = np.asarray(x, np.float64) @ np.asarray(layer.lora_a[...], np.float64)
    expected_b = layer.scaling * np.einsum("bsr,bso->ro", xa, 2 * y)
    np.testing.assert_allclose(np.asarray(g["lora_b"][...]), expected_b, rtol=1e-4, atol=1e-4)


def test_merged_kernel_gives_the_same_output():
    _, _, w, b = peft_linear(True, 8, 16, False)
    layer = ours(w, b, LoraSpec(8, 16))
    randomize_b(layer)
    x = x_input()
    merged = np.asarray(layer.merged_kernel())
    np.testing.assert_allclose(x @ merged.T + b, np.asarray(layer(jnp.asarray(x))), atol=2e-5, rtol=0)


def test_bfloat16_compute():
    _, _, w, b = peft_linear(True, 8, 16, False)
    ref = ours(w, b, LoraSpec(8, 16))
    randomize_b(ref)
    layer = ours(w, b, LoraSpec(8, 16), dtype="bfloat16")
    layer.lora_a.set_value(ref.lora_a[...])
    layer.lora_b.set_value(ref.lora_b[...])
    x = jnp.asarray(x_input())
    y = layer(x)
    assert y.dtype == jnp.bfloat16 and layer.lora_a.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref(x)), atol=0.05, rtol=0.02)


def test_dropout_on_the_lora_input_only():
    _, _, w, _ = peft_linear(False, 8, 16, False)
    layer = ours(w, None, LoraSpec(8, 16, dropout=0.25))
    x = jnp.asarray(x_input((4, 64, IN)))
    with pytest.raises(ValueError, match="PRNG key"):
        layer(x, deterministic=False)
    # B = 0: dropout cannot touch the base path
    np.testing.assert_array_equal(layer(x, deterministic=False, key=jax.random.key(0)), layer(x))
    randomize_b(layer)
    det = np.asarray(layer(x))
    runs = np.stack([np.asarray(layer(x, deterministic=False, key=jax.random.key(i))) for i in range(64)])
    base = np.asarray(x) @ w.T
    assert np.abs(runs[0] - det).max() > 0.1  # dropout acts
    # inverted dropout keeps the expectation of the LoRA term
    delta_mean, delta_det = runs.mean(0) - base, det - base
    assert np.abs(delta_mean - delta_det).mean() < 0.1 * np.abs(delta_det).mean()


def test_config_resolves_modules_and_checks_values():
    cfg = LoraConfig(r=8, alpha=16, targets=["q_proj", "down_proj"], rank_pattern={"down_proj": 2},
                     alpha_pattern={"self_attn.q_proj": 4})
    assert cfg.for_module("self_attn.q_proj") == LoraSpec(8, 4.0)
    assert cfg.for_module("mlp.down_proj") == LoraSpec(2, 16.0)
    assert cfg.for_module("self_attn.k_proj") is None
    assert LoraConfig().target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert LoraSpec(16, 32, rslora=True).scaling == pytest.approx(8.0)
    assert LoraSpec(16, 32).scaling == 2.0
    with pytest.raises(ValueError, match="score"):
        LoraConfig(targets=["q_proj", "score"])
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="'int8'"):
        QuantSpec("int8")
    with pytest.raises(ValueError, match="block size 100"):
        QuantSpec("nf4", block_size=100)
