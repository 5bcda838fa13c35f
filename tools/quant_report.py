"""Quantization error and storage of NF4 / FP4 / int4-absmax, with and without double quantization.

Prints, for a few matrix sizes of N(0, σ) weights (σ = 0.02, typical of LLM linear layers): MSE and max error of
the dequantized weight against the original (float64), and bytes/bits per parameter from the arrays actually
stored. These are the figures the QLoRA paper reasons with: 4.5 bits/param with float32 block scales (blocks of 64),
≈4.127 with double quantization. Also times quantization of one 4096×14336 bf16 matrix (a Llama-3-8B MLP weight).

    python tools/quant_report.py            # full report
    python tools/quant_report.py --quick    # small sizes only
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jqlora import quant


def int4_absmax(x: np.ndarray, block: int) -> np.ndarray:
    """Symmetric int4 absmax quantization in blocks (levels -7..7), float64; the baseline NF4 is compared with."""
    b = x.reshape(-1, block)
    scale = np.abs(b).max(axis=1, keepdims=True) / 7
    return (np.round(b / np.where(scale == 0, 1, scale)) * scale).reshape(x.shape)


def errors(x64: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    d = np.asarray(y, dtype=np.float64) - x64
    return float(np.mean(d * d)), float(np.max(np.abs(d)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small matrices only, no timing of the large one")
    ap.add_argument("--block-size", type=int, default=64)
    args = ap.parse_args()
    bs = args.block_size
    sizes = [(1024, 1024), (4096, 4096)] if args.quick else [(1024, 1024), (4096, 4096), (4096, 14336)]

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; block size {bs}; weights ~ N(0, 0.02²) in bfloat16\n")
    print(f"{'matrix':>12} {'scheme':>14} {'MSE':>11} {'max err':>10} {'bytes/param':>12} {'bits/param':>11}")
    rng = np.random.default_rng(0)
    for shape in sizes:
        x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02, dtype=jnp.bfloat16)
        x64 = np.asarray(x, dtype=np.float64)
        n = x64.size
        rows = []
        for qt in ("nf4", "fp4"):
            for dq in (False, True):
                q = quant.quantize(x, qt, block_size=bs, double_quant=dq)
                mse, mx = errors(x64, quant.dequantize(q, jnp.float32))
                rows.append((f"{qt}{' + DQ' if dq else ''}", mse, mx, q.nbytes() / n))
        mse, mx = errors(x64, int4_absmax(x64, bs))
        rows.append(("int4 absmax", mse, mx, (n / 2 + 4 * n / bs) / n))
        rows.append(("bf16", 0.0, 0.0, 2.0))
        for name, mse, mx, bpp in rows:
            print(f"{'x'.join(map(str, shape)):>12} {name:>14} {mse:11.3e} {mx:10.3e} {bpp:12.5f} {8 * bpp:11.4f}")
        print()

    print("Overhead of the block scales beyond 4 bits/param (QLoRA paper: 0.5 → 0.127 with double quantization):")
    for dq in (False, True):
        print(f"  double_quant={dq!s:5}: {quant.bits_per_parameter('nf4', bs, dq) - 4:.4f} bits/param")

    if not args.quick:
        x = jax.random.normal(jax.random.key(0), (4096, 14336), jnp.bfloat16)
        for dq in (False, True):
            jax.block_until_ready(quant.quantize(x, "nf4", block_size=bs, double_quant=dq))  # compile
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                jax.block_until_ready(quant.quantize(x, "nf4", block_size=bs, double_quant=dq))
                times.append(time.perf_counter() - t0)
            gb = x.size * 2 / 1e9
            print(f"\nquantize 4096x14336 bf16 nf4 double_quant={dq}: median {np.median(times) * 1e3:.0f} ms "
                  f"({x.size / np.median(times) / 1e6:.0f} M params/s, {gb / np.median(times):.2f} GB/s of bf16), "
                  f"on {jax.device_count()} {jax.devices()[0].platform} device(s), {len(__import__('os').sched_getaffinity(0))} cores")
        deq = jax.jit(quant.dequantize)
        q = quant.quantize(x, "nf4", block_size=bs)
        jax.block_until_ready(deq(q))
        t0 = time.perf_counter()
        for _ in range(5):
            jax.block_until_ready(deq(q))
        print(f"dequantize the same (jitted): {(time.perf_counter() - t0) / 5 * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
