"""LoRA initializations beyond peft's default (``lora.init``): gaussian, PiSSA and LoftQ.

Layout: peft's, ``A [r, in]``, ``B [out, r]``, the update ``s · B A`` (s = alpha / r, or alpha / √r with rsLoRA)
added to the base ``W [out, in]``; callers transpose to jqlora's ``A [in, r]`` / ``B [r, out]``.

- ``gaussian``: A ~ N(0, (1/r)²), B = 0 (peft's ``init_lora_weights="gaussian"``): the model is unchanged at step 0.
- ``pissa`` (Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language
  Models", 2024): with ``W = U S Vᵀ`` (float32 SVD), ``A = diag(√(S_r / s)) V_rᵀ``, ``B = U_r diag(√(S_r / s))``, so
  ``s B A`` is the best rank-r part of W, and the base becomes the residual ``W_res = W − s B A``; the model is
  unchanged at step 0 up to rounding (and, on a 4-bit base, W_res is what gets quantized). peft's ``pissa_init``.
- ``loftq`` (Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", 2023): alternate
  ``Q_t = quantize(W − s B_{t-1} A_{t-1})`` (B_0 A_0 = 0) and ``s B_t A_t`` = the best rank-r approximation of
  ``W − deq(Q_t)``, for T iterations; the base becomes Q_T, so ``deq(Q_T) + s B_T A_T ≈ W`` better than
  plain quantization does (iteration 1 already: the residual's best rank-r part is taken off it). peft's
  ``loftq_init``, with two differences: the quantizer is the run's own (NF4 or FP4, with double quantization and
  block size as configured: the Q evaluated is exactly the Q trained on), and A, B are divided by √s so that the
  update the model adds, ``s B A``, is the low-rank term (peft's LoftQ stores ``L R`` unscaled in A and B and so
  assumes s = 1).

Shape letters: O out features, I in features, R rank.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

INITS = ("default", "gaussian", "pissa", "loftq")
log = logging.getLogger("jqlora.train")


class InitError(ValueError):
    """A lora.init that cannot be applied to this base (a 4-bit source, a rank that does not fit): one line."""


def gaussian_a(key: jax.Array, shape: tuple[int, ...], r: int, dtype: Any = np.float32) -> jax.Array:
    """A ~ N(0, (1/r)²) in any layout (peft's gaussian init of ``lora_A``; B stays zero)."""
    return (jax.random.normal(key, shape, np.float32) / r).astype(dtype)


OVERSAMPLE = 8  # extra columns of the randomized SVD's sketch (then truncated to r)


def top_svd(w_OI: np.ndarray, r: int, niter: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The r leading singular triplets ``(U [O, R], S [R], Vᵀ [R, I])`` of ``w`` in float32.

    ``niter=None``: numpy's full SVD, truncated. ``niter=N``: the randomized range finder with N power (subspace)
    iterations, re-orthonormalized each pass (Halko, Martinsson & Tropp, "Finding structure with randomness", 2011,
    Algorithms 4.4 and 5.1; what peft's ``pissa_niter_N`` does through ``torch.svd_lowrank``), on the default JAX
    device: only matmuls and thin QRs of [O, r + 8] matrices, so a GPU does an 8B kernel in well under a second."""
    if niter is None:
        u, s, vh = np.linalg.svd(np.asarray(w_OI, np.float32), full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    k = min(r + OVERSAMPLE, *w_OI.shape)
    u, s, vh = _randomized_svd(jax.numpy.asarray(w_OI, np.float32), k, int(niter))
    return np.asarray(u[:, :r]), np.asarray(s[:r]), np.asarray(vh[:r])


@functools.partial(jax.jit, static_argnums=(1, 2))
def _randomized_svd(w_OI: jax.Array, k: int, niter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    jnp = jax.numpy
    hi = jax.lax.Precision.HIGHEST  # (float32 products on GPUs too, not TF32)
    omega_IK = jax.random.normal(jax.random.key(0), (w_OI.shape[1], k), jnp.float32)
    q_OK, _ = jnp.linalg.qr(jnp.matmul(w_OI, omega_IK, precision=hi))
    for _ in range(niter):
        z_IK, _ = jnp.linalg.qr(jnp.matmul(w_OI.T, q_OK, precision=hi))
        q_OK, _ = jnp.linalg.qr(jnp.matmul(w_OI, z_IK, precision=hi))
    u_KK, s_K, vh_KI = jnp.linalg.svd(jnp.matmul(q_OK.T, w_OI, precision=hi), full_matrices=False)
    return jnp.matmul(q_OK, u_KK, precision=hi), s_K, vh_KI


def pissa(w_OI: np.ndarray, r: int, scaling: float, niter: int | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                                          np.ndarray]:
    """``(A [R, I], B [O, R], W_res [O, I])`` float32, peft's PiSSA: ``W_res + s B A = W`` (SVD: `top_svd`)."""
    w = np.asarray(w_OI, np.float32)
    u, s, vh = top_svd(w, r, niter)
    root = np.sqrt(s[:r] / scaling)
    a = root[:, None] * vh[:r]
    b = u[:, :r] * root[None, :]
    return a, b, w - scaling * (b @ a)


def loftq_steps(
    w_OI: np.ndarray,
    r: int,
    scaling: float,
    quantize: Callable[[np.ndarray], Any],
    dequantize: Callable[[Any], np.ndarray],
    niter: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, Any, float]]:
    """LoftQ's iterations, endlessly: ``(A [R, I], B [O, R], Q, error)`` after each, where ``Q = quantize(...)`` is
    the base to train on (``dequantize(Q) [O, I]`` float32) and ``error`` the Frobenius norm of
    ``W − deq(Q) − s B A`` (float32 arithmetic; the tests recompute it in float64)."""
    w = np.asarray(w_OI, np.float32)
    low = np.zeros_like(w)  # s B A of the previous iteration
    while True:
        qt = quantize(w - low)
        err = w - np.asarray(dequantize(qt), np.float32)
        u, s, vh = top_svd(err, r, niter)
        root = np.sqrt(s[:r] / scaling)
        a = root[:, None] * vh[:r]
        b = u[:, :r] * root[None, :]
        low = scaling * (b @ a)
        yield a, b, qt, float(np.linalg.norm(err - low))


def loftq(w_OI, r, scaling, quantize, dequantize, iters: int = 1, niter: int | None = None
          ) -> tuple[np.ndarray, np.ndarray, Any, float]:
    """``(A, B, Q, error)`` after ``iters`` LoftQ iterations (`loftq_steps`)."""
    if iters < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got {iters}")
    for i, out in enumerate(loftq_steps(w_OI, r, scaling, quantize, dequantize, niter), 1):
        if i == iters:
            return out
    raise AssertionError("unreachable")


def check_rank_fits(r: int, out_features: int, in_features: int, where: str) -> None:
    """PiSSA / LoftQ take r singular vectors: r must not exceed min(out, in)."""
    if r > min(out_features, in_features):
        raise ValueError(f"rank {r} does not fit {where}, a {out_features}x{in_features} kernel (PiSSA / LoftQ take "
                         f"r <= {min(out_features, in_features)} singular vectors)")


def scaling_of(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


# ----------------------------------------------------------------------------------------------------------------
# On a model


def apply(model: Any, init: str, *, seed: int, quant: Any, loftq_iters: int = 1, svd_niter: int | None = None
          ) -> list[str]:
    """Initialize every adapter of ``model`` (loaded with an unquantized base when ``init`` is pissa / loftq) as
    ``init`` says, in place; the base kernels are then adjusted (pissa: the residual; loftq: Q) and, if ``quant``
    (a `jqlora.lora.QuantSpec`) is enabled, quantized, adapted or not. Returns one line per adjusted module kind
    (its mean LoftQ error against plain quantization, for the log)."""
    from flax import nnx

    from jqlora import quant as q
    from jqlora.lora.layer import Frozen, LoraLinear

    if init == "default":
        return []
    modules = sorted(((tuple(map(str, p)), m) for p, m in nnx.iter_modules(model) if isinstance(m, LoraLinear)),
                     key=lambda pm: pm[0])
    if init == "gaussian":
        key = jax.random.key(seed)
        for i, (_, m) in enumerate(modules):
            if m.lora_a is not None:
                if m.spec.per_layer:  # each layer's own rank: N(0, 1/r_l²), unused columns 0
                    r_L1 = np.maximum(np.asarray(m.spec.layer_ranks, np.float32), 1.0)[:, None, None]
                    a = gaussian_a(jax.random.fold_in(key, i), m.lora_a.shape, 1, m.param_dtype) / r_L1
                    m.lora_a.set_value(a.astype(m.param_dtype))
                    m.lora_a.set_value(m.masked_a())
                else:
                    m.lora_a.set_value(gaussian_a(jax.random.fold_in(key, i), m.lora_a.shape, m.spec.r,
                                                  m.param_dtype))
                m.lora_b.set_value(np.zeros(m.lora_b.shape, m.param_dtype))
        return []
    if init not in ("pissa", "loftq"):
        raise ValueError(f"unknown LoRA init {init!r}: expected one of {', '.join(INITS)}")
    for path, m in modules:
        if m.lora_a is not None and m.spec.per_layer:
            raise ValueError(f"{'.'.join(path[2:])} has ranks / alphas that differ between layers (lora.rank_pattern "
                             f"/ alpha_pattern by layer, or lora.layers_to_transform): {init} needs one rank per "
                             "module kind")
        if m.lora_a is not None:
            check_rank_fits(m.spec.r, m.out_features, m.in_features, ".".join(path[2:]) or ".".join(path))

    def quantize(x):
        return q.quantize(np.asarray(x, np.float32).astype(m.dtype), quant.quant, block_size=quant.block_size,
                          double_quant=quant.double_quant)

    def dequantize(t):
        return np.asarray(q.dequantize(t, np.float32))

    notes = []
    for path, m in modules:
        if m.lora_a is None and "experts" in path and not quant.experts:  # (model.quantize_experts=false)
            continue
        w_LOI = np.asarray(m.weight[...], np.float32)
        stacked = w_LOI.ndim == 3
        w_LOI = w_LOI if stacked else w_LOI[None]
        kernels, a_list, b_list, gains = [], [], [], []
        for w in w_LOI:
            if m.lora_a is None:
                kernels.append(quantize(w) if quant.enabled else w)
                continue
            s = m.scaling
            if init == "pissa":
                a, b, res = pissa(w, m.spec.r, s, svd_niter)
                kernels.append(quantize(res) if quant.enabled else res)
            else:
                a, b, qt, err = loftq(w, m.spec.r, s, quantize, dequantize, iters=loftq_iters, niter=svd_niter)
                kernels.append(qt)
                gains.append(err / max(float(np.linalg.norm(w - dequantize(quantize(w)))), 1e-30))
            a_list.append(a.T)
            b_list.append(b.T)
        if quant.enabled:
            t = _stack_quantized(kernels, stacked)
            del m.weight
            m.quant = quant
            m.set_quantized(t)
        else:
            m.weight = Frozen(jax.numpy.asarray(np.stack(kernels) if stacked else kernels[0], m.dtype))
        if m.lora_a is not None:
            m.lora_a.set_value(jax.numpy.asarray(np.stack(a_list) if stacked else a_list[0], m.param_dtype))
            m.lora_b.set_value(jax.numpy.asarray(np.stack(b_list) if stacked else b_list[0], m.param_dtype))
        if gains:
            notes.append(f"{'.'.join(path[2:])}: LoftQ error {np.mean(gains):.3f} of plain {quant.quant}'s")
    return notes


def _stack_quantized(kernels: list, stacked: bool) -> Any:
    """One `quant.QuantizedTensor` whose array fields stack the layers' (or the single kernel's, unstacked)."""
    from jqlora import quant as q

    def stack(field):
        values = [getattr(k, field) for k in kernels]
        if values[0] is None:
            return None
        return jax.numpy.asarray(np.stack([np.asarray(v) for v in values]) if stacked else values[0])

    k0 = kernels[0]
    return q.QuantizedTensor(stack("codes"), stack("absmax"), stack("nested_absmax"), stack("offset"), k0.shape,
                             k0.dtype, k0.block_size, k0.quant_type)
