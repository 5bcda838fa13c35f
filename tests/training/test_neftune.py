"""NEFTune (train.neftune_alpha; issue 28, item 8): uniform noise on the embedding outputs, in training only.

Oracle: transformers' own ``neftune_post_forward_hook`` on a torch ``nn.Embedding`` in training mode: its added
noise and jqlora's share the law U(-m, m), m = alpha / sqrt(S·D) with S the tensor's (padded) length and D its width:
the same bound (the largest of 131k draws within 0.1% of m, none beyond), mean 0 and variance m²/3 within 4 standard
errors, and a two-sample Kolmogorov-Smirnov test that cannot tell them apart. Invariants: the model adds exactly that
noise (keyed by the micro-step's key) at the embedding output; evaluation (deterministic) is bit-identical with and
without NEFTune, and a training loss is a function of its key (so a resumed run, which replays the keys, is exact).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jqlora.lora import LoraConfig, QuantSpec
from jqlora.models import layers
from jqlora.models.llama import LlamaForCausalLM, ModelConfig
from jqlora.training import step

TINY = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
ALPHA = 5.0


def _hook_noise(B, S, D, alpha, seed=0):
    import torch
    from transformers.integrations.neftune import neftune_post_forward_hook

    torch.manual_seed(seed)
    emb = torch.nn.Embedding(128, D)
    emb.neftune_noise_alpha = alpha
    emb.register_forward_hook(neftune_post_forward_hook)
    ids = torch.randint(0, 128, (B, S))
    emb.train()
    with torch.no_grad():
        noisy = emb(ids)
        return (noisy - emb.weight[ids]).numpy().astype(np.float64)


@pytest.mark.parametrize("S", [128, 32])
def test_noise_has_the_law_of_transformers_hook(S):
    from scipy import stats

    D = 64
    B = 2 ** 17 // (S * D)  # 131,072 draws
    theirs = _hook_noise(B, S, D, ALPHA)
    ours = np.asarray(layers.neftune_noise(jax.random.PRNGKey(3), (B, S, D), ALPHA, jnp.float32), np.float64)
    m = ALPHA / np.sqrt(S * D)
    for x in (theirs, ours):
        n = x.size
        assert np.abs(x).max() <= m * (1 + 1e-6) and np.abs(x).max() >= m * (1 - 1e-3)
        assert abs(x.mean()) <= 4 * m / np.sqrt(3 * n)
        assert abs((x ** 2).mean() - m ** 2 / 3) <= 4 * m ** 2 * np.sqrt(4 / 45 / n)
    assert stats.ks_2samp(theirs.ravel()[::7], ours.ravel()[::7]).pvalue > 1e-3


@pytest.fixture(scope="module")
def split():
    model = LlamaForCausalLM(ModelConfig(**TINY), LoraConfig(r=4, alpha=8, dropout=0.0), QuantSpec("none"), "float32",
                             rngs=nnx.Rngs(0), remat="none")
    model.init_lora(jax.random.PRNGKey(1))
    return step.SplitModel.of(model)


def _batch(B=2, S=16):
    ids = np.random.default_rng(0).integers(1, 128, (B, S)).astype(np.int32)
    return dict(input_ids=jnp.asarray(ids), targets=jnp.asarray(np.roll(ids, -1, axis=1)),
                loss_mask=jnp.ones((B, S), jnp.float32), segment_ids=jnp.ones((B, S), jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)))


def test_the_model_adds_that_noise_at_the_embedding_output(split, monkeypatch):
    batch, key = _batch(), jax.random.PRNGKey(7)
    model = split.model()
    noisy = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"], deterministic=False,
                                key=key, embed_noise=ALPHA)
    plain_embed = layers.Embed.__call__

    def embed_plus_noise(self, ids_BS):
        h = plain_embed(self, ids_BS)
        return h + layers.neftune_noise(jax.random.fold_in(key, layers.NEFTUNE_KEY), h.shape, ALPHA, h.dtype)

    monkeypatch.setattr(layers.Embed, "__call__", embed_plus_noise)
    by_hand = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"], deterministic=True)
    np.testing.assert_array_equal(np.asarray(noisy), np.asarray(by_hand))


def test_eval_is_unaffected_and_training_depends_on_its_key_only(split):
    batch, key = _batch(), jax.random.PRNGKey(7)
    with_noise = jax.jit(step.make_loss_fn(split, 16, neftune_alpha=ALPHA), static_argnums=4)
    without = jax.jit(step.make_loss_fn(split, 16), static_argnums=4)
    ev = [float(f(split.lora, split.frozen, batch, None, True)[0]) for f in (with_noise, without)]
    assert ev[0] == ev[1]  # bit for bit: evaluation never sees the noise
    train = [float(with_noise(split.lora, split.frozen, batch, k, False)[0]) for k in (key, key, jax.random.PRNGKey(8))]
    plain = float(without(split.lora, split.frozen, batch, key, False)[0])
    assert train[0] == train[1] and train[0] != train[2] and train[0] != plain == ev[1]
