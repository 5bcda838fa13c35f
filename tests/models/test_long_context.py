"""The long-context savings change nothing but memory: the MLP chunked over the tokens (``mlp_chunk``) equals the
one-pass MLP, and the residual stream offloaded to host memory (``offload_residual``) equals keeping it on the
device, in logits and LoRA gradients, under every remat policy (invariants; a tiny random model, no oracle needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jqlora.lora import LoraConfig, LoraLinear, QuantSpec
from jqlora.models import LlamaForCausalLM, ModelConfig

SHAPE = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def loss_and_grads(model, ids, segs):
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)

    @jax.jit
    def f(lora_state):
        logits = nnx.merge(graphdef, lora_state, rest)(ids, segs)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

    (_, logits), grads = jax.value_and_grad(f, has_aux=True)(lora_state)
    return np.asarray(logits), [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]


@pytest.fixture(scope="module")
def model_and_inputs():
    """A 4-bit model with nonzero LoRA B (so every adapter has a gradient), 2 rows of 13 tokens (26: chunks of 4 or
    7 leave a padded last chunk), the second row packed with two documents."""
    model = LlamaForCausalLM(SHAPE, LoraConfig(r=4, alpha=8), QuantSpec("nf4", True, 64), "float32",
                             rngs=nnx.Rngs(0), remat="none")
    rng = np.random.default_rng(3)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoraLinear) and m.lora_b is not None:
            m.lora_b.set_value(jnp.asarray(rng.normal(0, 0.1, m.lora_b.shape).astype(np.float32)))
    ids = jnp.asarray(rng.integers(0, SHAPE.vocab_size, (2, 13)), jnp.int32)
    segs = jnp.asarray(np.array([[1] * 13, [1] * 6 + [2] * 7], np.int32))
    return model, ids, segs


def run(model, ids, segs, **attrs):
    saved = {k: getattr(model, k) for k in attrs}
    for k, v in attrs.items():
        setattr(model, k, v)
    try:
        return loss_and_grads(model, ids, segs)
    finally:
        for k, v in saved.items():
            setattr(model, k, v)


@pytest.mark.parametrize("remat,chunk", [("none", 7), ("full", 4), ("offload", 7)])
def test_chunked_mlp_equals_one_pass(model_and_inputs, remat, chunk):
    model, ids, segs = model_and_inputs
    ref_logits, ref_grads = run(model, ids, segs, remat=remat)
    logits, grads = run(model, ids, segs, remat=remat, mlp_chunk=chunk)
    # float32: the chunked matmuls sum in another order (|logits| ≈ 0.3, |grads| up to ≈ 0.05)
    assert min(float(np.abs(g).max()) for g in ref_grads) > 1e-4
    np.testing.assert_allclose(logits, ref_logits, atol=2e-6, rtol=0)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=2e-7, rtol=1e-5)


@pytest.mark.parametrize("remat", ["full", "offload"])
def test_offloaded_residual_equals_device_residual(model_and_inputs, remat):
    """Bit for bit: the offload is a copy (that the step really moves it to host memory is checked on the
    deviceless GPU compile, tests/aot/test_aot_max_seq.py)."""
    model, ids, segs = model_and_inputs
    ref_logits, ref_grads = run(model, ids, segs, remat=remat)
    logits, grads = run(model, ids, segs, remat=remat, offload_residual=True, mlp_chunk=0)
    np.testing.assert_array_equal(logits, ref_logits)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_array_equal(g, r)
