"""train.memory=min's quantized embedding and lm_head (jqlora.models.layers.QuantHead, quant.dequantize_rows).

Oracles: (1) the default mode over the *dequantized* tables (the same math on the same values: loss and every LoRA
gradient to float32 noise), and a float64 numpy cross-entropy from the same hidden states; (2) the unquantized
default mode, within the quantization's own error: |ΔL| ≤ 2·mean_t max_v |Δz_tv| + |L(embedding dequantized) − L|,
the first term the cross-entropy's Lipschitz bound in the logits (|∂ℓ/∂z|₁ ≤ 2) for the head's NF4 error Δz = h ΔWᵀ.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny import make_model

from jqlora import quant as q
from jqlora.checkpoints import load_checkpoint
from jqlora.lora import LoraConfig, LoraLinear, SplitModel, quantized_matmul, tiled_quantized_matmul
from jqlora.training import step
from jqlora.training.preference_step import token_logps

V, D = 128, 64
LORA = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"))


def _batch(seed=0, B=2, S=24):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, S)).astype(np.int32)
    return dict(input_ids=jnp.asarray(ids), targets=jnp.asarray(np.roll(ids, -1, axis=1)),
                loss_mask=jnp.asarray((rng.random((B, S)) < 0.8).astype(np.float32)),
                segment_ids=jnp.ones((B, S), jnp.int32), positions=jnp.broadcast_to(jnp.arange(S), (B, S)))


def _nudge(model):
    """Give every zero-initialized adapter matrix a value, so no gradient is trivially zero."""
    for path, v in nnx.iter_graph(model):
        if isinstance(v, nnx.LoRAParam) and path[-1] in ("lora_b", "lora_embedding_a"):
            v.set_value(0.05 * jax.random.normal(jax.random.key(len(path)), v.shape, v.dtype))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = make_model(tmp_path_factory.mktemp("qheads") / "m", "llama", torch.float32)
    kw = dict(dtype="float32", lora=LORA, seed=3, remat="full")
    default = load_checkpoint(path, **kw)
    low = load_checkpoint(path, memory="min", **kw)
    for m in (default, low):
        _nudge(m)
    oracle = load_checkpoint(path, **kw)  # the default mode over the dequantized tables
    _nudge(oracle)
    oracle.model.embed_tokens.weight.set_value(low.model.embed_tokens.table())
    oracle.lm_head.weight.set_value(q.dequantize(low.lm_head.quantized(), jnp.float32))
    embed_only = load_checkpoint(path, **kw)  # only the embedding dequantized (for the head's error bound)
    _nudge(embed_only)
    embed_only.model.embed_tokens.weight.set_value(low.model.embed_tokens.table())
    low.head_block_rows = 48  # 3 blocks of the 128 rows, the last overlapping its predecessor
    tiled = [m for _, m in nnx.iter_modules(low) if isinstance(m, LoraLinear)]
    assert tiled and all(m.tile_bytes and m.layer_index is not None for m in tiled)  # min: every kernel tiled ...
    np.testing.assert_array_equal(np.asarray(tiled[0].layer_index[...]), np.arange(2))  # (read in the stack)
    for m in tiled:
        m.tile_bytes = 4096  # ... here in 2-8 tiles of the tiny model's kernels (float32 [64, 64] = 16 KiB)
    return dict(default=default, low=low, oracle=oracle, embed_only=embed_only)


@pytest.fixture(scope="module")
def grads(models):
    """{name: (LoRA gradients, Σℓ)} on one batch; one compile for the three default-mode models, one for min."""
    batch = _batch()
    shared = step.make_grad_fn(SplitModel.of(models["default"]), ce_chunk=16)
    fns = {"low": jax.jit(step.make_grad_fn(SplitModel.of(models["low"]), ce_chunk=16)), "default": jax.jit(shared)}
    out = {}
    for name, m in models.items():
        split = SplitModel.of(m)
        g, loss = fns.get(name, fns["default"])(split.lora, split.frozen, batch, None, 1.0)
        out[name] = (g, float(loss))
    return out


def test_rows_dequantize_exactly():
    """Invariant: dequantize_rows equals dequantize-then-gather bit for bit (with and without double quant)."""
    w = (0.02 * jax.random.normal(jax.random.key(0), (300, 128))).astype(jnp.bfloat16)
    ids = jnp.asarray([[0, 5, 299], [7, 7, 100]])
    for dq in (True, False):
        t = q.quantize(w, "nf4", block_size=64, double_quant=dq)
        full = np.asarray(q.dequantize(t, jnp.float32))
        np.testing.assert_array_equal(np.asarray(q.dequantize_rows(t, ids, jnp.float32)), full[np.asarray(ids)])


def test_tiled_matmul_equals_the_whole_kernel():
    """Invariant: the tiled 4-bit matmul (row tiles forward, column tiles backward) gives the whole-kernel matmul's
    output and input gradient bit for bit (each element is the same full-length dot product)."""
    t = q.quantize((0.02 * jax.random.normal(jax.random.key(0), (384, 256))).astype(jnp.bfloat16), "nf4")
    x = jax.random.normal(jax.random.key(1), (3, 5, 256)).astype(jnp.bfloat16)
    want = jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.sin(quantized_matmul(x, t, jnp.bfloat16)
                                                                .astype(jnp.float32)))))(x)
    stack = q.stack([q.quantize(jnp.zeros((384, 256), jnp.bfloat16) + 0.01, "nf4"), t])
    for tile in (384 * 256 // 2, 384 * 256 * 2 // 3):  # 4 row / 4 column tiles; 3 row / 4 column tiles
        for kernel, layer in ((t, None), (stack, jnp.int32(1))):  # (the stack of layers, read at layer 1)
            got = jax.jit(jax.value_and_grad(lambda x, tile=tile, k=kernel, at=layer: jnp.sum(jnp.sin(
                tiled_quantized_matmul(x, k, jnp.bfloat16, tile, at).astype(jnp.float32)))))(x)
            assert float(got[0]) == float(want[0])
            np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))


def test_loss_and_grads_equal_the_dequantized_default(models, grads):
    """Oracle (1): min mode (4-bit tables, tiled 4-bit matmuls) == default mode over the dequantized tables (float32
    noise), every LoRA gradient (including the embedding's and lm_head's adapters)."""
    (g_low, l_low), (g_or, l_or) = grads["low"], grads["oracle"]
    np.testing.assert_allclose(l_low, l_or, rtol=2e-6)
    leaves = jax.tree_util.tree_leaves_with_path(g_or)
    assert any("lm_head" in jax.tree_util.keystr(p) for p, _ in leaves)
    assert any("embed_tokens" in jax.tree_util.keystr(p) for p, _ in leaves)
    for (p, a), b in zip(leaves, jax.tree.leaves(g_low)):
        scale = float(jnp.abs(a).max())
        assert scale > 0, jax.tree_util.keystr(p)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5 * scale, err_msg=jax.tree_util.keystr(p))


def test_loss_equals_float64_cross_entropy(models, grads):
    """Oracle: the min model's loss == float64 numpy CE from its own hidden states and the dequantized head (with
    the lm_head adapter folded in), to float32 noise."""
    low, batch = models["low"], _batch()
    loss = grads["low"][1]
    h = np.asarray(low.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"]), np.float64)
    w = np.asarray(q.dequantize(low.lm_head.quantized(), jnp.float32), np.float64)
    a, b = np.asarray(low.lm_head.lora_a[...], np.float64), np.asarray(low.lm_head.lora_b[...], np.float64)
    w = w + low.lm_head.spec.scaling * (a @ b).T
    z = h.reshape(-1, D) @ w.T
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    t = np.asarray(batch["targets"]).reshape(-1)
    ref = np.sum((lse - z[np.arange(len(t)), t]) * np.asarray(batch["loss_mask"]).reshape(-1))
    np.testing.assert_allclose(loss, ref, rtol=1e-6)


def test_within_the_quantization_error_of_the_unquantized_model(models, grads):
    """Oracle (2): |L_min − L_default| ≤ 2·mean_t max_v |h ΔWᵀ| (the head's NF4 error through CE's Lipschitz bound)
    + |L(embedding dequantized) − L_default| (the embedding's error, measured), per trained token."""
    batch = _batch()
    n = float(jnp.sum(batch["loss_mask"]))
    low, default = models["low"], models["default"]
    h = np.asarray(models["embed_only"].hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"]),
                   np.float64).reshape(-1, D)
    dw = (np.asarray(q.dequantize(low.lm_head.quantized(), jnp.float32), np.float64)
          - np.asarray(default.lm_head.weight[...], np.float64))
    m = np.asarray(batch["loss_mask"]).reshape(-1)
    head_bound = 2 * np.sum(np.abs(h @ dw.T).max(-1) * m) / n
    embed_err = abs(grads["embed_only"][1] - grads["default"][1]) / n
    got = abs(grads["low"][1] - grads["default"][1]) / n
    assert 0 < got <= head_bound + embed_err + 1e-6, (got, head_bound, embed_err)


def test_block_stats_equal_the_whole_head(models):
    """Invariant: the QuantHead's blockwise logsumexp / target logit / Σ logits / argmax (3 blocks of 48 rows over
    128, the last overlapping) == the same from the whole dequantized head; so do accuracy and preference log-probs."""
    low = models["low"]
    head, whole = low.ce_head(), low.lm_head_weight()
    assert head.block_rows == 48
    h = 3 * jax.random.normal(jax.random.key(2), (2, 20, D), jnp.float32)
    t = jax.random.randint(jax.random.key(3), (2, 20), 0, V)
    got = jax.jit(step.head_stats)(h.reshape(-1, D), head, t.reshape(-1))
    want = step.head_stats(h.reshape(-1, D), whole, t.reshape(-1))
    for g, w in zip(got[:3], want[:3]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(want[3]))
    mask = jnp.ones((2, 20))
    for a, b in zip(step.chunked_ce_and_correct(h, head, t, mask, 16), step.chunked_ce_and_correct(h, whole, t, mask,
                                                                                                    16)):
        np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    for a, b in zip(token_logps(h, head, t, 16), token_logps(h, whole, t, 16)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_hold_one_quantized_copy(tmp_path):
    """Invariant: with tied embeddings the min mode holds one table, 4-bit: no [V, D] float leaf, and the embedding's
    bytes are exactly one NF4 + DQ tensor of V·D values (computed here from the layout)."""
    path = make_model(tmp_path / "tied", "llama", torch.float32, tie_word_embeddings=True)
    low = load_checkpoint(path, dtype="float32", lora=LoraConfig(r=4, alpha=8), memory="min")
    assert low.lm_head is None
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(low))
    assert not [p for p, x in leaves if tuple(x.shape) in ((V, D), (D, V))]
    blocks = V * D // 64
    expect = V * D // 2 + blocks + 4 * -(-blocks // 256) + 4
    embed = nnx.state(low.model.embed_tokens)
    assert sum(x.nbytes for x in jax.tree.leaves(embed)) == expect
    default = load_checkpoint(path, dtype="float32", lora=LoraConfig(r=4, alpha=8))
    np.testing.assert_allclose(np.asarray(low.ce_head().rows(jnp.int32(0), V)),
                               np.asarray(q.dequantize(q.quantize(default.model.embed_tokens.weight[...], "nf4"),
                                                       jnp.float32)), rtol=0, atol=0)
