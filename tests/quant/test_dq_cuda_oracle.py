"""Double quantization against bitsandbytes' CUDA rule, emulated in numpy (`dq_cuda_oracle`): the emulation agrees with
bitsandbytes' CPU kernel wherever that kernel picks the nearest code (and the CPU kernel's disagreement rate is
measured), and jqlora's nested 8-bit scale codes equal the emulation's in every block."""

import zlib

import bitsandbytes.functional as F
import dq_cuda_oracle as cuda
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jqlora import quant
from jqlora.quant import blockwise

DYN = F.create_dynamic_map(signed=True).numpy()  # bitsandbytes' own map (= jqlora's codebook, test_quant.py)


def weight(kind: str, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Kernels shaped like real ones: normal (std 0.02, Llama's init), heavy-tailed (Student t, 3 degrees of
    freedom) and nn.Linear's uniform init with log-normal row scales (outlier channels, as trained kernels have)."""
    rng = np.random.default_rng(zlib.crc32(repr((kind, shape)).encode()))
    if kind == "normal":
        w = 0.02 * rng.standard_normal(shape)
    elif kind == "student_t":
        w = 0.02 * rng.standard_t(3, shape)
    else:
        w = rng.uniform(-1, 1, shape) / np.sqrt(shape[1]) * np.exp(0.5 * rng.standard_normal(shape[0]))[:, None]
    return torch.from_numpy(w.astype(np.float32)).to(dtype)


# (24576 blocks: 96 whole nested blocks; 15625 and 180224 + 2: a partial last one; a bigger real-ish kernel)
TENSORS = [("normal", (1024, 1536)), ("student_t", (1024, 1536)), ("rows", (1000, 1000)), ("rows", (2048, 5632)),
           ("student_t", (64, 2 * 64 * 1000 + 3))]


def test_emulated_search_is_the_nearest_code_but_on_float32_midpoints():
    """dQuantize<0>'s binary search picks the nearest entry of the map; where a value is within one float32 ulp of the
    midpoint of two entries, it may pick either (its midpoint is rounded to float32, ties go to the even index)."""
    rng = np.random.default_rng(0)
    mids64 = (DYN[:-1].astype(np.float64) + DYN[1:]) / 2
    mids = mids64.astype(np.float32)
    x = np.concatenate([rng.uniform(-1, 1, 100_000), np.linspace(-1, 1, 40_001), DYN, mids,
                        np.nextafter(mids, 2), np.nextafter(mids, -2)]).astype(np.float32)
    got, nearest = cuda.dquantize(x, DYN), cuda.nearest_float64(x, DYN)
    off = got != nearest
    assert off[:140_001].mean() < 1e-3  # (uniform and evenly spaced values: rarely on a midpoint)
    gap = np.abs(x[off].astype(np.float64)[:, None] - mids64[None, :]).min(axis=1)
    assert np.all(gap <= np.spacing(np.float32(1))), gap.max()  # only on (a float32 step from) a midpoint
    assert np.all(np.abs(got[off].astype(int) - nearest[off]) == 1)  # and then the other neighbour
    assert np.array_equal(cuda.dquantize(DYN, DYN), np.arange(256))  # every entry codes to itself


def test_jqlora_cuda_thresholds_equal_the_emulated_search_on_every_midpoint():
    """jqlora's nearest-code thresholds for the nested codes (`quant.blockwise`) against the emulated kernel, on each
    midpoint of the map, one float32 step either side of it, and each entry."""
    mids = ((DYN[:-1] + DYN[1:]) * np.float32(0.5)).astype(np.float32)
    x = np.concatenate([mids, np.nextafter(mids, 2), np.nextafter(mids, -2), DYN, np.nextafter(DYN, 2),
                        np.nextafter(DYN, -2)]).astype(np.float32)
    x = x[np.abs(x) <= 1]
    ours = np.asarray(blockwise._nearest(jnp.asarray(x), blockwise._thresholds_cuda("dynamic8")))
    np.testing.assert_array_equal(ours, cuda.dquantize(x, DYN))


@pytest.mark.parametrize("kind,shape", TENSORS)
def test_emulation_agrees_with_bitsandbytes_cpu_where_the_cpu_kernel_is_exact(kind, shape):
    w = weight(kind, shape)
    _, plain = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    _, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    absmax = plain.absmax.numpy()  # the 4-bit step's float32 scales (the same kernel in both calls)
    codes, nested = cuda.double_quantize(absmax, state.offset.numpy(), DYN)  # given bitsandbytes' own mean
    np.testing.assert_array_equal(nested, state.state2.absmax.numpy())  # the nested scales, bit for bit
    cpu = state.absmax.numpy()
    # the values the kernel codes (float32, as the CUDA kernel forms them), and the nearest code of each
    v = (absmax - state.offset.numpy()).astype(np.float32)
    x = v * np.repeat(np.float32(1) / nested, 256)[: v.size]
    exact = cpu == cuda.nearest_float64(x, DYN)
    np.testing.assert_array_equal(codes[exact], cpu[exact])  # wherever the CPU kernel is exact, the same code
    differ = codes != cpu
    print(f"{kind}{shape}: CPU kernel differs from the CUDA rule in {differ.sum()} of {differ.size} "
          f"nested codes ({differ.mean():.3%})")
    # measured: 0.28% normal, 0.34% / 0.33% Student t, 0.19% / 0.11% uniform rows (the issue: 0.21% on Gemma 3
    # 270M); > 0: the comparison met the CPU kernel's approximation (else it proved nothing about it)
    assert 0 < differ.mean() < 0.005
    if differ.any():  # where they differ, the CPU's code is the farther one
        book = DYN.astype(np.float64)
        d_cuda = np.abs(x[differ].astype(np.float64) - book[codes[differ]])
        d_cpu = np.abs(x[differ].astype(np.float64) - book[cpu[differ]])
        assert np.all(d_cuda <= d_cpu)


@pytest.mark.parametrize("kind,shape,dtype", [(k, s, torch.bfloat16) for k, s in TENSORS] + [
    (*TENSORS[2], torch.float16), (*TENSORS[2], torch.float32)])
def test_jqlora_nested_codes_equal_the_cuda_rule_in_every_block(kind, shape, dtype):
    w = weight(kind, shape, dtype)
    x = jnp.asarray(w.float().numpy()).astype(str(dtype).removeprefix("torch."))
    q = quant.quantize(x, "nf4", double_quant=True)
    absmax = np.asarray(quant.quantize(x, "nf4", double_quant=False).absmax)  # = bitsandbytes' (test_quant.py)
    codes, nested = cuda.double_quantize(absmax, np.asarray(q.offset), DYN)  # given jqlora's mean
    np.testing.assert_array_equal(np.asarray(q.absmax), codes)
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), nested)
    # and the scales bitsandbytes reads back from them are the CUDA rule's: D[q] · m + c, in float32
    again = (DYN[codes] * np.repeat(nested, 256)[: codes.size]).astype(np.float32) + np.float32(q.offset)
    np.testing.assert_array_equal(np.asarray(quant.block_absmax(q)), again)
