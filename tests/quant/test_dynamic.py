"""jqlora.quant.dynamic: bitsandbytes' dynamic 8-bit maps regenerated bit for bit, and blockwise 8-bit codes against
``bitsandbytes.functional`` (CPU): dequantization equal, codes the float64-nearest entries (bitsandbytes' CPU search
is approximate near midpoints: it differs on a small share of codes, never by picking a nearer entry)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bitsandbytes.functional as F

from jqlora import quant


def test_dynamic_maps_are_bitsandbytes():
    for signed in (True, False):
        assert np.array_equal(quant.dynamic_map(signed), F.create_dynamic_map(signed=signed).numpy()), signed
    assert np.array_equal(quant.dynamic_map(True), quant.CODEBOOKS["dynamic8"])


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_8bit_against_bitsandbytes(signed):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 1000)).astype(np.float32)  # 27.3 blocks of 256: a partial last one
    x.reshape(-1)[2048:2304] = 0.0  # an all-zero block
    if not signed:
        x = x * x
    book = quant.dynamic_map(signed)
    codes, absmax = quant.quantize_dynamic(jnp.asarray(x), signed)
    theirs, their_absmax = F.quantize_blockwise(torch.tensor(x), code=torch.tensor(book), blocksize=256)
    codes, theirs = np.asarray(codes), theirs.numpy()
    assert codes.shape == x.shape and codes.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(absmax), their_absmax.absmax.numpy())
    # dequantization: bitsandbytes' own, of our codes
    ours_deq = F.dequantize_blockwise(torch.tensor(codes), their_absmax).numpy()
    np.testing.assert_array_equal(np.asarray(quant.dequantize_dynamic(jnp.asarray(codes), absmax, signed)), ours_deq)
    # codes: the float64-nearest entry to x / absmax
    a = np.repeat(np.asarray(absmax, np.float64), 256)[: x.size]
    scaled = x.reshape(-1).astype(np.float64) / np.where(a > 0, a, 1.0)
    dist = np.abs(scaled[:, None] - book.astype(np.float64)[None, :])
    assert np.array_equal(codes.reshape(-1), dist.argmin(axis=1))
    rows = np.arange(x.size)
    assert np.all(dist[rows, codes.reshape(-1)] <= dist[rows, theirs.reshape(-1)])
    live = x != 0  # (bitsandbytes codes 0 by a neighbouring entry at times, and an all-zero block by any: 0 · absmax)
    differ = np.mean(codes[live] != theirs[live])
    print(f"\nsigned={signed}: {differ:.3%} of codes differ from bitsandbytes' CPU search")
    assert differ <= (0.005 if signed else 0.05)
