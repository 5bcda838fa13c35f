"""jqlora.lora.initialize: PiSSA equals peft's pissa_init (adapter product and residual base), gaussian has peft's law,
and LoftQ's error ‖W − (deq(Q) + s B A)‖, recomputed in float64, falls with every iteration and is below plain
NF4's (with double quantization, the run's quantizer) from iteration 1 on."""

import itertools

import numpy as np
import pytest
import torch

from jqlora.lora import initialize as LI
from jqlora import quant as q


def _weight(O=128, I=256, seed=0):
    """A kernel with a low-rank part and a few outliers, as trained LLM kernels have."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(O, I)) * 0.02 + rng.normal(size=(O, 4)) @ rng.normal(size=(4, I)) * 0.01
    w[rng.random((O, I)) < 0.002] *= 20
    return w.astype(np.float32)


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_equals_peft(rslora):
    from peft import LoraConfig, get_peft_model

    w = _weight(96, 64)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(w))
    r, alpha = 8, 16
    pm = get_peft_model(net, LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights="pissa",
                                        use_rslora=rslora))
    layer = pm.base_model.model[0]
    a_p = layer.lora_A["default"].weight.detach().double().numpy()
    b_p = layer.lora_B["default"].weight.detach().double().numpy()
    res_p = layer.base_layer.weight.detach().double().numpy()
    s = LI.scaling_of(r, alpha, rslora)
    assert s == pytest.approx(layer.scaling["default"])
    a, b, res = LI.pissa(w, r, s)
    np.testing.assert_allclose(b @ a, b_p @ a_p, atol=2e-6, rtol=0)  # (the product: SVD signs are arbitrary)
    np.testing.assert_allclose(res, res_p, atol=2e-6, rtol=0)
    np.testing.assert_allclose(res.astype(np.float64) + s * (b.astype(np.float64) @ a), w, atol=2e-6, rtol=0)


def test_gaussian_law():
    import jax

    a = np.asarray(LI.gaussian_a(jax.random.key(0), (256, 8), r=8))
    # peft: nn.init.normal_(lora_A, std=1/r); 2048 draws: the sample std within 5% of 1/8, mean near 0
    assert abs(a.std() - 1 / 8) < 0.05 / 8 and abs(a.mean()) < 4 / 8 / np.sqrt(a.size)


@pytest.mark.parametrize("double_quant", [True, False])
def test_loftq_error_falls_and_beats_nf4(double_quant):
    w = _weight()
    w64 = w.astype(np.float64)
    quantize = lambda x: q.quantize(x, "nf4", block_size=64, double_quant=double_quant)
    dequantize = lambda t: np.asarray(q.dequantize(t, np.float32))
    plain = np.linalg.norm(w64 - dequantize(quantize(w)))
    r, s = 8, 2.0
    errors = []
    for (a, b, qt, reported), _ in zip(LI.loftq_steps(w, r, s, quantize, dequantize), range(5)):
        err = np.linalg.norm(w64 - dequantize(qt) - s * (b.astype(np.float64) @ a.astype(np.float64)))
        np.testing.assert_allclose(reported, err, rtol=1e-5)
        errors.append(err)
    assert errors[0] < 0.9 * plain, (errors[0], plain)
    assert all(later < earlier for earlier, later in itertools.pairwise(errors)), errors


def test_rank_that_does_not_fit():
    with pytest.raises(ValueError, match="rank 80 does not fit q_proj, a 96x64 kernel"):
        LI.check_rank_fits(80, 96, 64, "q_proj")


@pytest.mark.parametrize("shape", [(128, 256), (256, 96)])
def test_randomized_svd_is_near_optimal(shape):
    """lora.svd_niter: the randomized rank-r SVD against float64's exact one (Eckart–Young: the truncated SVD is the
    best rank-r approximation). With 4 power iterations its error is within 0.2% of the optimum; its singular values
    within 1% of the leading ones; PiSSA with it still splits W exactly (W_res + s B A = W) and LoftQ still beats
    plain NF4 from iteration 1."""
    w = _weight(*shape, seed=3)
    w64 = w.astype(np.float64)
    r = 8
    u64, s64, vh64 = np.linalg.svd(w64, full_matrices=False)
    best = np.linalg.norm(w64 - (u64[:, :r] * s64[:r]) @ vh64[:r])
    errors = {}
    for niter in (0, 1, 4):
        u, s, vh = LI.top_svd(w, r, niter)
        assert u.shape == (shape[0], r) and s.shape == (r,) and vh.shape == (r, shape[1])
        np.testing.assert_allclose(u.T.astype(np.float64) @ u, np.eye(r), atol=1e-5)  # orthonormal columns
        errors[niter] = np.linalg.norm(w64 - (u.astype(np.float64) * s) @ vh) / best
    assert errors[4] < 1.002 and errors[0] > errors[1] > errors[4], errors
    np.testing.assert_allclose(LI.top_svd(w, r, 4)[1], s64[:r], rtol=1e-2)
    sc = 2.0
    a, b, res = LI.pissa(w, r, sc, niter=4)
    np.testing.assert_allclose(res.astype(np.float64) + sc * (b.astype(np.float64) @ a), w, atol=2e-6, rtol=0)
    quantize = lambda x: q.quantize(x, "nf4", block_size=64, double_quant=True)
    dequantize = lambda t: np.asarray(q.dequantize(t, np.float32))
    _, _, _, err = LI.loftq(w, r, sc, quantize, dequantize, iters=1, niter=4)
    assert err < 0.9 * np.linalg.norm(w64 - dequantize(quantize(w)))
