"""jqlora.training.grpo's invariants (TRL itself is the oracle in test_grpo_trl.py): the adapter-off reference is the
base model loaded without LoRA, the reference pass inside the gradient equals the precomputed one, and bad settings
are one clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlora.lora import LoraConfig, SplitModel
from jqlora.models import sampling
from jqlora.training import grpo
import jqlora
from tiny import make_family_model, randomize_lora


def load(path, **kw):
    return jqlora.load_model(path, quant="none", dtype="float32", remat="none", **kw)


def token_ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, n).astype(np.int32)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    _, path = make_family_model(tmp_path_factory.mktemp("grpo") / "hf", "qwen2", seed=2)
    model = load(path, lora=LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "up_proj")))
    randomize_lora(model, seed=3, scale=0.3)
    prompts = [token_ids(6, seed=1), token_ids(4, seed=2)]
    r = sampling.sample_rollouts(model, prompts, num_generations=3, max_new_tokens=8, key=jax.random.key(1),
                                 stop_ids=(5, 50, 90))
    batch = {k: jnp.asarray(getattr(r, k)) for k in grpo.BATCH_KEYS}
    batch["advantages"] = jnp.asarray(np.linspace(-1, 1, 6), jnp.float32)
    return path, SplitModel.of(model), batch


def test_adapter_off_is_the_base_model(case):
    path, split, batch = case
    base = load(path)  # no LoRA at all
    want, _ = grpo.completion_logps(base, batch)
    got = grpo.make_logps_fn(split)(grpo.adapter_off(split.lora), split.frozen, batch)
    on = grpo.make_logps_fn(split)(split.lora, split.frozen, batch)
    m = np.asarray(batch["completion_mask"], bool)
    np.testing.assert_allclose(np.asarray(got)[m], np.asarray(want)[m], atol=1e-5, rtol=0)
    assert np.abs(np.asarray(on)[m] - np.asarray(want)[m]).max() > 1e-2  # the adapter matters


def test_reference_pass_inside_equals_precomputed(case):
    _, split, batch = case
    cfg = grpo.GRPOLossConfig(loss_type="grpo", beta=0.1)
    fn = jax.jit(grpo.make_grpo_grad_fn(split, cfg))
    g_in, (loss_in, m_in) = fn(split.lora, split.frozen, batch)
    ref = grpo.make_logps_fn(split)(grpo.adapter_off(split.lora), split.frozen, batch)
    g_pre, (loss_pre, m_pre) = fn(split.lora, split.frozen, {**batch, "ref_logps": ref})
    np.testing.assert_allclose(float(loss_in), float(loss_pre), rtol=1e-6)
    assert float(m_in["kl"]) > 1e-3 and abs(float(m_in["kl"]) - float(m_pre["kl"])) < 1e-6
    for a, b in zip(jax.tree.leaves(g_in), jax.tree.leaves(g_pre)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kw,words", [
    (dict(loss_type="ppo"), "loss_type 'ppo': expected one of grpo, bnpo, dr_grpo, dapo"),
    (dict(importance_sampling_level="row"), "importance_sampling_level 'row'"),
    (dict(beta=-1.0), "need beta, epsilon, epsilon_high >= 0"),
])
def test_bad_settings(kw, words):
    with pytest.raises(ValueError, match=words):
        grpo.GRPOLossConfig(**kw)


def test_bad_inputs():
    with pytest.raises(ValueError, match="scale_rewards 'groups'"):
        grpo.advantages(np.zeros(4), 2, "groups")
    with pytest.raises(ValueError, match="5 rewards is not a multiple of num_generations=2"):
        grpo.advantages(np.zeros(5), 2)
    with pytest.raises(ValueError, match="DoRA"):
        grpo.adapter_off({"layer": {"lora_a": jnp.ones(2), "lora_b": jnp.ones(2), "magnitude": jnp.ones(2)}})
