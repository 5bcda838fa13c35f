"""jqlora.quant against bitsandbytes (codes, scales, dequantized values, serialized state) and float64 math."""

import hashlib
import json
import zlib

import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bitsandbytes.functional import QuantState

from jqlora import quant

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (shape, block size): full blocks, a partial last block, an odd element count, 1-D / 3-D, every block size.
SHAPES = [
    ((64, 128), 64),
    ((33, 77), 32),  # odd n, partial block
    ((7, 9, 11), 64),  # 3-D, odd n
    ((1000,), 4096),  # a single partial block
    ((96, 256), 128),
    ((40, 200), 256),
    ((16, 1024), 512),
    ((8, 3000), 1024),
    ((4, 4096), 2048),
    ((3, 5000), 4096),
]


def sample(dist: str, shape, dtype: str, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if dist == "normal":
        x = rng.standard_normal(shape)
    elif dist == "uniform":
        x = rng.uniform(-3.0, 3.0, shape)
    elif dist == "student_t":  # heavy tails: a few large outliers per block
        x = rng.standard_t(2.0, shape)
    else:
        raise AssertionError(dist)
    return torch.from_numpy(x.astype(np.float32)).to(TORCH_DTYPES[dtype])


def to_jax(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.float().numpy()).astype(jnp.dtype(str(t.dtype).removeprefix("torch.")))


def as_bnb_state(q: quant.QuantizedTensor, storage: str = "uint8") -> tuple[torch.Tensor, QuantState]:
    """Hand jqlora's serialized tensors to bitsandbytes' own deserializer."""
    tensors = quant.to_bnb(q, "weight", quant_storage=storage)
    weight = tensors.pop("weight")
    weight = torch.from_numpy(weight.view(np.uint8)).view(getattr(torch, storage))
    state = QuantState.from_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, device=torch.device("cpu"))
    return weight, state


def bnb_state_tensors(packed: torch.Tensor, state: QuantState) -> dict[str, torch.Tensor]:
    """What transformers' Params4bit saves: the packed weight plus the packed quant state."""
    out = {"weight": packed}
    out.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return out


def test_codebooks_are_bitsandbytes_codebooks():
    assert np.array_equal(quant.CODEBOOKS["nf4"], F.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(quant.CODEBOOKS["fp4"], F.get_4bit_type("fp4", device="cpu").numpy())
    assert np.array_equal(quant.CODEBOOKS["dynamic8"], F.create_dynamic_map(signed=True).numpy())
    digest = hashlib.sha256(quant.CODEBOOKS["dynamic8"].astype("<f4").tobytes()).hexdigest()
    assert digest == "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("dist", ["normal", "uniform", "student_t"])
@pytest.mark.parametrize("shape,block_size", SHAPES)
def test_codes_and_values_equal_bitsandbytes(quant_type, dtype, dist, shape, block_size):
    x = sample(dist, shape, dtype, seed=zlib.crc32(repr((dist, shape, dtype, quant_type)).encode()))
    packed, state = F.quantize_4bit(x, blocksize=block_size, quant_type=quant_type, compress_statistics=False)
    q = quant.quantize(to_jax(x), quant_type, block_size=block_size, double_quant=False)
    assert q.shape == tuple(shape) and q.dtype == dtype
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
    ours = np.asarray(quant.dequantize(q)).astype(np.float32)
    theirs = F.dequantize_4bit(packed, state).float().numpy()
    assert theirs.size == ours.size
    np.testing.assert_array_equal(ours, theirs.reshape(ours.shape))  # (bitsandbytes 0.50.2 returns 1-D as [1, n])


@pytest.mark.parametrize("quant_type,zero_code", [("nf4", 7), ("fp4", 0)])
def test_all_zero_blocks_follow_the_cpu_convention(quant_type, zero_code):
    """Documented convention: an all-zero block stores absmax 0 and the code of 0.0 (bitsandbytes' CPU backend)."""
    x = torch.randn(4, 64)
    x[1] = 0.0
    x[3, :] = -0.0
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    q = quant.quantize(to_jax(x), quant_type, block_size=64, double_quant=False)
    codes = np.asarray(q.codes).reshape(4, 32)
    assert np.all(codes[1] == zero_code * 0x11) and np.all(codes[3] == zero_code * 0x11)
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.absmax)[[1, 3]], [0.0, 0.0])
    assert np.all(np.asarray(quant.dequantize(q))[[1, 3]] == 0.0)


def nearest_dynamic_code_float64(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Reference: index of the dynamic-map entry nearest to value/scale in float64, ties to the lower entry."""
    book = quant.CODEBOOKS["dynamic8"].astype(np.float64)
    dist = np.abs(values[:, None] / scale[:, None] - book[None, :])
    return np.argmin(dist, axis=1)  # argmin returns the first (lower) index on ties; the map is sorted


DQ_SHAPES = [((256, 256), 64), ((300, 1000), 64), ((129, 130), 32), ((64, 4096), 128), ((5, 777), 64)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape,block_size", DQ_SHAPES)
def test_double_quant_state_read_by_bitsandbytes(quant_type, dtype, shape, block_size):
    x = sample("normal", shape, dtype, seed=sum(shape))
    q = quant.quantize(to_jax(x), quant_type, block_size=block_size, double_quant=True)
    weight, state = as_bnb_state(q)
    theirs = F.dequantize_4bit(weight, state)
    assert theirs.dtype == TORCH_DTYPES[dtype] and tuple(theirs.shape) == tuple(shape)
    ours = quant.dequantize(q)
    assert ours.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), theirs.float().numpy())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_nested_codes_agree_with_bitsandbytes_and_are_exact(quant_type, dist):
    x = sample(dist, (1024, 1536), "bfloat16", seed=7)  # 24576 blocks → 96 nested blocks
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=True)
    q = quant.quantize(to_jax(x), quant_type, block_size=64, double_quant=True)
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    ours = np.asarray(q.absmax)
    agree = np.mean(ours == state.absmax.numpy())
    assert agree >= 0.995, f"nested 8-bit codes agree with bitsandbytes on {agree:.4%} of blocks"
    # The offset is the mean of the first-level absmax (float32 means may differ in the last bit).
    np.testing.assert_allclose(float(q.offset), float(state.offset), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.nested_absmax), state.state2.absmax.numpy(), rtol=1e-6)

    # Exact nearest against float64: recompute the first-level absmax from the data, centre it with our offset.
    absmax = np.abs(x.float().numpy().reshape(-1, 64)).max(axis=1).astype(np.float64)
    centered = (absmax.astype(np.float32) - np.float32(q.offset)).astype(np.float64)
    scale = np.repeat(np.asarray(q.nested_absmax, dtype=np.float64), 256)[: centered.size]
    ref = nearest_dynamic_code_float64(centered, scale)
    mismatch = ours != ref
    if mismatch.any():  # only allowed where the two candidates are equidistant to float32 rounding
        book = quant.CODEBOOKS["dynamic8"].astype(np.float64)
        v = centered[mismatch] / scale[mismatch]
        gap = np.abs(np.abs(v - book[ours[mismatch]]) - np.abs(v - book[ref[mismatch]]))
        assert np.all(gap <= 2 * np.finfo(np.float32).eps), gap.max()
    assert mismatch.mean() < 1e-4


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float16", "float32", "int8"])
def test_reads_bitsandbytes_serialized_state(quant_type, double_quant, storage):
    x = sample("normal", (192, 320), "bfloat16", seed=3)
    packed, state = F.quantize_4bit(
        x, blocksize=64, quant_type=quant_type, compress_statistics=double_quant,
        quant_storage=getattr(torch, storage),
    )
    tensors = bnb_state_tensors(packed, state)
    # The six (or four without double quantization) tensors transformers writes for a 4-bit weight.
    expected = {"weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{quant_type}"}
    if double_quant:
        expected |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(tensors) == expected
    q = quant.from_bnb(tensors, "weight")
    assert q.double_quant == double_quant and q.shape == (192, 320) and q.dtype == "bfloat16"
    theirs = F.dequantize_4bit(packed, state).float().numpy()
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q).astype(jnp.float32)), theirs)


@pytest.mark.parametrize("storage", ["bfloat16", "float16", "float32", "int8"])
def test_written_quant_storage_views_read_by_bitsandbytes(storage):
    x = sample("normal", (64, 192), "float16", seed=4)
    q = quant.quantize(to_jax(x), "nf4")
    weight, state = as_bnb_state(q, storage)
    assert weight.dtype == getattr(torch, storage)
    theirs = F.dequantize_4bit(weight, state).float().numpy()
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q).astype(jnp.float32)), theirs)
    again = quant.from_bnb(quant.to_bnb(q, quant_storage=storage))
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(q.codes))


def test_serialized_quant_state_json_matches_bitsandbytes():
    x = sample("normal", (128, 64), "bfloat16")
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = json.loads(bytes(bnb_state_tensors(packed, state)["weight.quant_state.bitsandbytes__nf4"].numpy()))
    ours = json.loads(bytes(quant.to_bnb(quant.quantize(to_jax(x)))["weight.quant_state.bitsandbytes__nf4"]))
    assert set(ours) == set(theirs)
    for key in ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype"):
        assert ours[key] == theirs[key], key


def mse_int4_absmax(x: np.ndarray, block: int) -> float:
    """Symmetric int4 absmax quantization (levels -7..7 · absmax/7), float64."""
    blocks = x.reshape(-1, block)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 7
    return float(np.mean((np.round(blocks / scale) * scale - blocks) ** 2))


def test_nf4_has_lowest_error_on_normal_data():
    x = np.random.default_rng(11).standard_normal((512, 1024))
    xf = jnp.asarray(x, dtype=jnp.float32)
    err = {
        t: float(np.mean((np.asarray(quant.dequantize(quant.quantize(xf, t, double_quant=False))) - x) ** 2))
        for t in ("nf4", "fp4")
    }
    int4 = mse_int4_absmax(x.astype(np.float32).astype(np.float64), 64)
    assert err["nf4"] < err["fp4"], err
    assert err["nf4"] < int4, (err, int4)
    # Double quantization barely changes the error (the paper: no degradation).
    dq = float(np.mean((np.asarray(quant.dequantize(quant.quantize(xf, "nf4"))) - x) ** 2))
    assert abs(dq - err["nf4"]) / err["nf4"] < 0.01


def test_jit_and_stacked_layers():
    xs = [jax.random.normal(jax.random.key(i), (48, 100), jnp.bfloat16) for i in range(3)]
    eager = [quant.quantize(x, "nf4", block_size=32) for x in xs]
    traced = [jax.jit(lambda x: quant.quantize(x, "nf4", block_size=32))(x) for x in xs]
    for a, b in zip(eager, traced):
        for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    stacked = quant.stack(eager)
    assert stacked.batch_shape == (3,)
    out = jax.jit(quant.dequantize)(stacked)
    assert out.shape == (3, 48, 100) and out.dtype == jnp.bfloat16
    for i, q in enumerate(eager):
        np.testing.assert_array_equal(np.asarray(out[i]), np.asarray(quant.dequantize(q)))
    # Scanning over the stack slices one layer's tensor per step.
    _, per_layer = jax.lax.scan(lambda c, q: (c, quant.dequantize(q, jnp.float32)), 0, stacked)
    np.testing.assert_array_equal(np.asarray(per_layer.astype(jnp.bfloat16)), np.asarray(out))


def test_bits_per_parameter_matches_storage():
    x = jnp.zeros((4096, 4096), jnp.bfloat16) + 1
    for dq, expected in ((False, 4.5), (True, 4 + 8 / 64 + 32 / (64 * 256))):
        q = quant.quantize(x, "nf4", double_quant=dq)
        bits = 8 * q.nbytes() / x.size
        assert abs(bits - quant.bits_per_parameter("nf4", 64, dq)) < 1e-6 + 32 / x.size
        assert abs(quant.bits_per_parameter("nf4", 64, dq) - expected) < 1e-12
    assert abs(quant.bits_per_parameter("nf4", 64, True) - 4.127) < 1e-3


@pytest.mark.parametrize(
    "make,kwargs,message",
    [
        (lambda: np.array([[1.0, np.nan], [0.5, 2.0]], np.float32), {}, "non-finite.*NaN/Inf.*index \\(0, 1\\)"),
        (lambda: np.array([1.0, np.inf, -np.inf], np.float32), {}, "2 NaN/Inf"),
        (lambda: np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32) * np.where(
            np.arange(128 * 64).reshape(128, 64) == 517, np.nan, 1).astype(np.float32), {}, "1 NaN/Inf of 8192.*index \\(8, 5\\)"),
        (lambda: np.zeros((0, 64), np.float32), {}, "empty tensor"),
        (lambda: np.ones((4, 64), np.float32), {"block_size": 48}, "block size 48"),
        (lambda: np.ones((4, 64), np.float32), {"quant_type": "int4"}, "quant type 'int4'"),
        (lambda: np.ones((4, 64), np.int32), {}, "dtype 'int32'"),
        (lambda: np.ones((4, 64), np.float64), {}, "dtype 'float64'"),
    ],
)
def test_bad_input_raises_value_error(make, kwargs, message):
    with pytest.raises(ValueError, match=message):
        quant.quantize(make(), **kwargs)


def test_bad_serialized_state_raises_value_error():
    q = quant.quantize(jnp.ones((64, 64), jnp.float32))
    good = quant.to_bnb(q, "model.layers.0.mlp.up_proj.weight")
    p = "model.layers.0.mlp.up_proj.weight"
    cases = [
        ({k: v for k, v in good.items() if k != f"{p}.absmax"}, "missing tensor .*absmax"),
        ({**good, f"{p}.absmax": good[f"{p}.absmax"][:-1]}, "absmax: 63 values, expected 64"),
        ({**good, p: good[p][:-1]}, "2047 packed bytes, expected 2048"),
        ({**good, f"{p}.quant_map": quant.CODEBOOKS["fp4"]}, "quant_map: differs"),
        ({**good, f"{p}.quant_state.bitsandbytes__nf4": np.frombuffer(b"{bad", np.uint8)}, "not a JSON quant state"),
    ]
    for tensors, message in cases:
        with pytest.raises(ValueError, match=message):
            quant.from_bnb(tensors, p, where="model.safetensors")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("partial", [False, True])
def test_ties_on_midpoints_go_to_the_lower_code(quant_type, partial):
    """Values exactly on a float32 midpoint between two codebook entries: bitsandbytes picks the lower entry."""
    book = np.sort(quant.CODEBOOKS[quant_type])
    mids = (book[:-1] + book[1:]) / np.float32(2)
    near = mids[mids != 0]  # one float32 step from 0 would be a subnormal, which XLA flushes (see jqlora.quant)
    row = np.concatenate([[1.0], mids, -mids, np.nextafter(near, 2), np.nextafter(near, -2)]).astype(np.float32)
    x = np.resize(row, 64 * 3 + (37 if partial else 0))  # absmax 1 in every block: the scaled value is x itself
    packed, _ = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type=quant_type)
    q = quant.quantize(x, quant_type, block_size=64, double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))


def test_non_finite_blocks_dequantize_to_nan_under_jit():
    """Under jit the NaN check cannot raise; the bad block must then come back as NaN, never as plausible values."""
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    x[2, 7] = np.nan
    for dq in (False, True):
        q = jax.jit(lambda a: quant.quantize(a, "nf4", double_quant=dq))(x)
        y = np.asarray(quant.dequantize(q))
        assert np.isnan(y[2]).all()
        if not dq:  # without double quantization the other blocks are untouched
            assert np.isfinite(y[[0, 1, 3]]).all()
