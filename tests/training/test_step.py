"""jqlora.training.step: the unpacked step (no segment ids in attention) equals the packed one on right-padded rows."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora.training import step
from jqlora.lora import LoraConfig, QuantSpec
from jqlora.models.llama import LlamaForCausalLM, ModelConfig

TINY = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def test_unpacked_step_equals_segment_masked_step():
    """Invariant: with one example per row followed by padding (segment 0, no loss), dropping the segment mask
    changes neither the loss nor the LoRA gradient."""
    model = LlamaForCausalLM(ModelConfig(**TINY), LoraConfig(r=4, alpha=8), QuantSpec("none"), "float32",
                             rngs=nnx.Rngs(0), remat="none")
    model.init_lora(jax.random.PRNGKey(1))
    for path, v in nnx.iter_graph(model):  # B = 0 at init: give the adapters a value so their gradient is not trivial
        if isinstance(v, nnx.LoRAParam) and path[-1] == "lora_b":
            v.value = 0.01 * jax.random.normal(jax.random.PRNGKey(len(path)), v.value.shape)
    split = step.SplitModel.of(model)
    B, S = 3, 24
    lengths = np.array([24, 17, 5])
    rng = np.random.default_rng(0)
    live = np.arange(S)[None] < lengths[:, None]
    ids = np.where(live, rng.integers(1, 128, (B, S)), 0).astype(np.int32)
    batch = dict(input_ids=jnp.asarray(ids), targets=jnp.asarray(np.roll(ids, -1, axis=1)),
                 loss_mask=jnp.asarray((np.arange(S)[None] < lengths[:, None] - 1).astype(np.float32)),
                 segment_ids=jnp.asarray(live.astype(np.int32)),
                 positions=jnp.asarray(np.where(live, np.arange(S)[None], 0).astype(np.int32)))
    out = {}
    for packed in (True, False):
        grad_fn = step.make_grad_fn(split, 16, packed=packed)
        out[packed] = jax.jit(grad_fn)(split.lora, split.frozen, batch, jax.random.PRNGKey(0), 1.0)
    (g1, l1), (g0, l0) = out[True], out[False]
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g1)) > 0
