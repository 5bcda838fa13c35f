"""Sharded streaming load, `jqlora.load_model(path, mesh=...)`: on 8 host devices every variable equals the
unsharded load bit for bit and carries the sharding `jqlora.parallel` plans for it, frozen weights take ~1/N per
device; the same for unquantized kernels, jqlora-format and bitsandbytes-4bit checkpoints and peft adapters. The
host-memory reader (`Checkpoint.get_host`) equals safetensors' own and maps nothing into memory.

The multi-device checks need `XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX starts, and other test
files start JAX in this process first, so they run in one subprocess (this file run as a script, `--worker`) whose
JSON the tests below check. Peak host memory of a larger load is measured by `tools/load_memory.py`, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from jqlora import checkpoints

REPO = Path(__file__).resolve().parents[2]
N_DEVICES = 8
MESHES = {"fsdp8": (1, 8, 1), "fsdp4_tensor2": (1, 4, 2)}
# head_dim 18: k/v kernels have 36 blocks of 64, which do not split 8 ways (kept whole under fsdp=8) but split 4
# ways (fsdp only under fsdp=4 × tensor=2); q/o have 72 blocks (split 8 ways, nested scales whole); the MLP kernels
# have 2048 blocks, so their nested scales (blocks of 256 scales) are split too. Every branch of the rules is loaded.
TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 18,
        "intermediate_size": 2048}
NAN_KEY = "model.layers.1.mlp.gate_proj.weight"


# ---------------------------------------------------------------------------------------------------------------
# The subprocess (8 host devices)


def _compare(model, ref, mesh) -> dict:
    """Bitwise value mismatches against ``ref`` and sharding mismatches against the plan for ``mesh``."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from jqlora import parallel
    from jqlora.lora import Frozen

    ref_flat = dict(nnx.to_flat_state(nnx.state(ref)))
    specs, _ = parallel.partition_specs(nnx.state(ref), mesh)  # the plan, from the unsharded model's state
    flat = list(nnx.to_flat_state(nnx.state(model)))
    values, shardings = [], []
    expected_bytes = 0
    for (path, var), spec in zip(flat, specs):
        name = ".".join(map(str, path))
        x, want = var.get_value(), np.asarray(ref_flat[path].get_value())
        got = np.asarray(x)
        if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != want.tobytes():
            values.append(name)
        if not x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim):
            shardings.append(f"{name}: {x.sharding.spec} != planned {spec}")
        if isinstance(var, Frozen):  # every device holds one shard of the planned shape
            expected_bytes += int(np.prod(NamedSharding(mesh, spec).shard_shape(want.shape))) * want.itemsize
    held = parallel.per_device_bytes(nnx.state(model, Frozen))
    total = sum(np.asarray(v.get_value()).nbytes for _, v in nnx.to_flat_state(nnx.state(ref, Frozen)))
    return {"values": values, "shardings": shardings, "n_vars": len(flat), "n_ref_vars": len(ref_flat),
            "graphdef_equal": nnx.graphdef(model) == nnx.graphdef(ref), "frozen_total": total,
            "frozen_per_device": sorted(held.values()), "frozen_expected": expected_bytes,
            "n_devices": len(held), "is_jax": all(isinstance(v.get_value(), jax.Array) for _, v in flat)}


def worker(tmp: Path) -> dict:
    import jax
    from flax import nnx
    from safetensors.numpy import load_file, save_file

    import jqlora
    from jqlora import adapters, parallel
    from jqlora.lora import LoraConfig

    assert jax.device_count() == N_DEVICES, jax.devices()
    t0 = time.time()

    def lap(what):
        print(f"{what}: {time.time() - t0:.1f} s", file=sys.stderr)

    src = tmp / "hf"
    out: dict = {"files": len(list(src.glob("*.safetensors")))}
    lora = LoraConfig(r=4, alpha=8)
    meshes = {name: parallel.make_mesh(*shape) for name, shape in MESHES.items()}

    ref = jqlora.load_model(src, lora=lora)
    lap("unsharded load")
    embed = load_file(str(src / json.loads((src / "model.safetensors.index.json").read_text())[
        "weight_map"]["model.embed_tokens.weight"]))["model.embed_tokens.weight"]
    for name, mesh in meshes.items():
        model = jqlora.load_model(src, lora=lora, mesh=mesh)
        out[name] = _compare(model, ref, mesh)
        got = np.asarray(model.model.embed_tokens.weight.get_value())
        out[name]["embed_equals_file"] = got.dtype == embed.dtype and got.tobytes() == embed.tobytes()
        lap(f"sharded load {name}")
    del model

    mesh = meshes["fsdp4_tensor2"]
    out["unquantized"] = _compare(jqlora.load_model(src, quant="none", lora=lora, mesh=mesh),
                                  jqlora.load_model(src, quant="none", lora=lora), mesh)
    lap("unquantized")
    jq = checkpoints.convert(src, tmp / "jq")
    out["jqlora_format"] = _compare(jqlora.load_model(jq, lora=lora, mesh=mesh), jqlora.load_model(jq, lora=lora),
                                    mesh)
    lap("jqlora format")
    bnb = checkpoints.convert(src, tmp / "bnb", fmt="bnb")
    out["bnb_format"] = _compare(jqlora.load_model(bnb, mesh=meshes["fsdp8"]), jqlora.load_model(bnb),
                                 meshes["fsdp8"])
    lap("bnb format")

    # a peft adapter with non-trivial A and B
    rng = np.random.default_rng(1)
    for _, m in nnx.iter_modules(ref):
        if getattr(m, "lora_b", None) is not None:
            m.lora_b.set_value(rng.normal(size=m.lora_b.shape).astype(np.float32))
    adapter = adapters.save_adapter(ref, tmp / "adapter", lora_config=lora)
    out["adapter"] = _compare(jqlora.load_model(src, adapter=adapter, mesh=mesh), jqlora.load_model(src, adapter=adapter),
                              mesh)
    lap("adapter")

    # a non-finite value in a kernel that is quantized shard by shard: the error names the key
    bad = tmp / "nan"
    bad.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = index["weight_map"][NAN_KEY]
    tensors = load_file(str(src / shard))
    w = tensors[NAN_KEY].copy()
    w[5, 7] = np.nan
    tensors[NAN_KEY] = w
    save_file(tensors, str(bad / shard), metadata={"format": "pt"})
    try:
        jqlora.load_model(bad, mesh=meshes["fsdp8"])
        out["nan_error"] = None
    except ValueError as e:
        out["nan_error"] = str(e)
    lap("non-finite")
    return out


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    import torch
    from tiny import make_model

    tmp = tmp_path_factory.mktemp("sharded_load")
    make_model(tmp / "hf", "llama", torch.bfloat16, save_kwargs={"max_shard_size": "100KB"}, **TINY)
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, "--worker", str(tmp)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    print(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_same(result: dict) -> None:
    assert result["n_vars"] == result["n_ref_vars"] and result["is_jax"]
    assert result["values"] == [], f"differ from the unsharded load: {result['values']}"
    assert result["shardings"] == [], "\n".join(result["shardings"])
    assert result["graphdef_equal"]  # same structure and static fields (quant_dtype, shapes, ...)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_load_equals_unsharded_bitwise_with_planned_shardings(multi, mesh):
    assert multi["files"] >= 3  # a multi-file checkpoint
    _assert_same(multi[mesh])
    assert multi[mesh]["embed_equals_file"]  # and the checkpoint's own tensor, as safetensors reads it


@pytest.mark.parametrize("mesh", list(MESHES))
def test_frozen_bytes_per_device_about_one_nth(multi, mesh):
    r = multi[mesh]
    per_device = r["frozen_per_device"]
    assert r["n_devices"] == N_DEVICES and len(set(per_device)) == 1, per_device
    # exactly what the plan implies (each array's bytes over its number of distinct shards) ...
    assert per_device[0] == r["frozen_expected"], (per_device[0], r["frozen_expected"])
    # ... which is ~1/N of the whole: only norms, offsets, small nested scales (and under fsdp=8 the k/v kernels,
    # whose 36 blocks do not split 8 ways) are kept whole
    assert per_device[0] < 1.15 * r["frozen_total"] / N_DEVICES, (per_device[0], r["frozen_total"])


@pytest.mark.parametrize("case", ["unquantized", "jqlora_format", "bnb_format", "adapter"])
def test_other_checkpoints_and_adapters_load_sharded_bitwise(multi, case):
    _assert_same(multi[case])


def test_nonfinite_kernel_error_names_the_key(multi):
    msg = multi["nan_error"]
    assert msg is not None and NAN_KEY in msg and "non-finite" in msg, msg


# ---------------------------------------------------------------------------------------------------------------
# In this process


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def test_host_reader_equals_safetensors_and_maps_nothing(tmp_path):
    import ml_dtypes
    from safetensors import safe_open
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {"a.bf16": rng.normal(size=(1024, 4096)).astype(ml_dtypes.bfloat16),
               "b.f32": rng.normal(size=(2048, 1024)).astype(np.float32),
               "c.f16": rng.normal(size=(3, 5)).astype(np.float16), "d.i64": np.arange(7), "e.scalar": np.float32(2)}
    (tmp_path / "config.json").write_text("{}")
    save_file({k: np.asarray(v) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, "model.safetensors")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    size = (tmp_path / "model.safetensors").stat().st_size
    with checkpoints.Checkpoint(tmp_path) as ckpt:
        before = _status("RssFile") if Path("/proc/self/status").exists() else None
        got = {k: ckpt.get_host(k) for k in sorted(tensors)}
        if before is not None:  # a memory map would leave the file's pages resident (counted in RssFile)
            assert _status("RssFile") - before < 0.25 * size, (_status("RssFile") - before, size)
        with pytest.raises(checkpoints.ConvertError, match="missing tensor"):
            ckpt.get_host("nope")
    f = safe_open(str(tmp_path / "model.safetensors"), framework="numpy")
    for k in tensors:
        want = f.get_tensor(k)
        assert got[k].dtype == want.dtype and got[k].shape == want.shape and got[k].tobytes() == want.tobytes(), k
    # a truncated file is an error naming the file and the key
    data = (tmp_path / "model.safetensors").read_bytes()
    header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with checkpoints.Checkpoint(tmp_path) as ckpt, pytest.raises(checkpoints.ConvertError, match=f"truncated.*{last}"):
        ckpt.get_host(last)


def test_mesh_must_be_a_mesh(tmp_path):
    import jqlora

    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        jqlora.load_model(tmp_path, mesh=(1, 8, 1))


if __name__ == "__main__" and "--worker" in sys.argv:
    result = worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
    print(json.dumps(result))
