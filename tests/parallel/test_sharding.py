"""jqlora.parallel and jqlora.plan: a sharded train step equals the single-device one, FSDP shrinks the per-device
frozen weights ~1/N (measured from the arrays' shards), bad meshes fail naming the axis, partition rules never split
a quantization block, and the analytic memory plan matches the bytes of a real quantized model.

Multi-device checks need `XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX starts, and other test
files start JAX in this process first, so they run in one subprocess (this file run as a script, `--worker`) whose
JSON the tests below check. Everything else runs here, on however many devices this process has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jqlora import planning  # (lazy: JAX starts in each test, after the host device count is set)

REPO = Path(__file__).resolve().parents[2]
N_DEVICES = 8
MESHES = {"fsdp8": (1, 8, 1), "data2_fsdp4": (2, 4, 1), "fsdp4_tensor2": (1, 4, 2)}
TINY = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _tiny_model(quant: str = "nf4", dropout: float = 0.0, seed: int = 0):
    import jax
    from flax import nnx

    from jqlora.lora import LoraConfig, QuantSpec
    from jqlora.models.llama import LlamaForCausalLM, ModelConfig

    model = LlamaForCausalLM(ModelConfig(**TINY), LoraConfig(r=4, alpha=8, dropout=dropout), QuantSpec(quant),
                             "float32", rngs=nnx.Rngs(seed))
    # a non-zero B so the first step moves A too
    for _, m in nnx.iter_modules(model):
        if getattr(m, "lora_b", None) is not None:
            m.lora_b.set_value(0.01 * jax.random.normal(jax.random.PRNGKey(7), m.lora_b.shape, m.lora_b.dtype))
    return model


def _random_tiny_model(dropout: float = 0.0, seed: int = 0):
    """The tiny quantized model with random codes and scales filled in directly: no quantization is compiled
    (building through `quant.quantize` costs ~10 s of XLA compilation, which the subprocess cannot afford)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jqlora.lora import LoraConfig, QuantSpec
    from jqlora.models.llama import LlamaForCausalLM, ModelConfig

    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(ModelConfig(**TINY), LoraConfig(r=4, alpha=8, dropout=dropout),
                                                       QuantSpec("nf4"), "float32", rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if x.dtype == jnp.uint8:
            value = rng.integers(0, 256, x.shape)
        elif name == "offset":
            value = np.full(x.shape, 0.05)
        elif name == "nested_absmax":
            value = np.full(x.shape, 0.02)
        elif name == "lora_a":
            value = rng.uniform(-0.1, 0.1, x.shape)
        elif name == "lora_b":
            value = 0.01 * rng.normal(size=x.shape)
        elif "norm" in str(path):
            value = 1 + 0.1 * rng.normal(size=x.shape)
        else:
            value = 0.02 * rng.normal(size=x.shape)
        return jnp.asarray(value, x.dtype)

    leaves = [fill(p, x) for p, x in jax.tree_util.tree_leaves_with_path(state)]
    return nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(state), leaves))


# ---------------------------------------------------------------------------------------------------------------
# The subprocess (8 host devices)


def worker() -> dict:
    import jax
    import jax.numpy as jnp

    from jqlora import parallel
    from jqlora.training import optim
    from jqlora.training import step as T
    from jqlora.config import load_config

    assert jax.device_count() == N_DEVICES, jax.devices()
    cfg = load_config(None, ["train.grad_accum_steps=1", "train.warmup_steps=1", "train.learning_rate=1e-2",
                             "train.max_grad_norm=1.0"]).train
    rng = np.random.default_rng(0)
    B, S = 8, 32
    ids = rng.integers(0, TINY["vocab_size"], (B, S + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": (rng.random((B, S)) < 0.7).astype(np.int32),
             "segment_ids": np.ones((B, S), np.int32), "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))}
    n_tokens = float(batch["loss_mask"].sum())

    import time

    t0 = time.time()
    model = _random_tiny_model(dropout=0.1)  # dropout on: the masks must not depend on the sharding either
    model.remat = os.environ.get("REMAT", "none")  # (remat is tested against no remat in test_train; compiles faster)
    split = T.SplitModel.of(model)

    def run(mesh_shape):
        tx, _ = optim.make_optimizer(cfg, 3)
        lora = jax.tree.map(lambda x: jnp.array(x, copy=True), split.lora)  # the step donates its inputs
        frozen = split.frozen
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        if mesh_shape is not None:
            mesh = parallel.make_mesh(*mesh_shape)
            lora = parallel.shard_tree(lora, mesh)
            frozen = parallel.shard_tree(frozen, mesh)
            b = parallel.shard_batch(b, mesh)
            opt_state = parallel.shard_optimizer_state(tx.init(lora), lora, mesh)
        else:
            dev = jax.devices()[0]
            lora, frozen, b = jax.device_put((lora, frozen, b), dev)
            opt_state = jax.device_put(tx.init(lora), dev)
        step = T.make_train_step(split, tx, ce_chunk=64)
        losses = []
        key = jax.random.PRNGKey(3)
        for i in range(3):
            lora, opt_state, loss_sum = step(lora, opt_state, frozen, b, jax.random.fold_in(key, i),
                                             jnp.float32(1.0 / n_tokens))
            losses.append(float(loss_sum) / n_tokens)
        print(f"mesh {mesh_shape}: {time.time() - t0:.1f} s", file=sys.stderr)
        bytes_frozen = parallel.per_device_bytes(frozen)
        bytes_lora = parallel.per_device_bytes((lora, opt_state))
        out_specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(lora) if hasattr(x.sharding, "spec")})
        return losses, [np.asarray(x) for x in jax.tree.leaves(lora)], bytes_frozen, bytes_lora, out_specs

    init = [np.asarray(x) for x in jax.tree.leaves(split.lora)]
    base_losses, base_lora, base_bytes, base_lbytes, _ = run(None)
    result = {"meshes": {}, "single": {"losses": base_losses}}
    flat = lambda leaves: np.concatenate([x.ravel() for x in leaves]).astype(np.float64)  # noqa: E731
    for name, shape in MESHES.items():
        losses, lora, fb, lb, specs = run(shape)
        diff = flat(lora) - flat(base_lora)
        result["meshes"][name] = {
            "losses": losses, "base_losses": base_losses,
            "lora_rel_diff": float(np.linalg.norm(diff) / np.linalg.norm(flat(base_lora))),
            "lora_max_abs_diff": float(np.abs(diff).max()),
            "lora_update_rel_diff": float(np.linalg.norm(diff) / np.linalg.norm(flat(base_lora) - flat(init))),
            "frozen_bytes_max": max(fb.values()), "frozen_bytes_min": min(fb.values()), "n_devices": len(fb),
            "lora_opt_bytes_max": max(lb.values()), "lora_out_specs": specs,
            "single_frozen_bytes": max(base_bytes.values()), "single_lora_opt_bytes": max(base_lbytes.values())}
    errors = {}
    for shape in ((1, 3, 1), (3, "auto", 1), (1, 4, 1), (1, "auto", "auto"), (1, 0, 1)):
        try:
            parallel.make_mesh(*shape)
            errors[str(shape)] = None
        except ValueError as e:
            errors[str(shape)] = str(e)
    result["errors"] = errors
    from jqlora.models.llama import ModelConfig

    try:
        parallel.check_model_fits(parallel.make_mesh(1, 1, 8), ModelConfig(**TINY))
        result["tensor_error"] = None
    except ValueError as e:
        result["tensor_error"] = str(e)
    try:
        parallel.shard_batch({"input_ids": np.zeros((6, 4), np.int32)}, parallel.make_mesh(1, 8, 1))
        result["batch_error"] = None
    except ValueError as e:
        result["batch_error"] = str(e)
    # assemble_batch builds each row range once (tensor replicas share theirs) and equals shard_batch of it all
    mesh, built = parallel.make_mesh(2, 2, 2), []

    def build(rows):
        built.append((rows[0], len(rows)))
        return {k: v[rows] for k, v in batch.items()}

    got = parallel.assemble_batch(list(range(B)), build, mesh)
    want = parallel.shard_batch(batch, mesh)
    result["assemble"] = {"built": sorted(built), "same": all(
        np.array_equal(np.asarray(got[k]), batch[k]) and got[k].sharding == want[k].sharding for k in batch)}
    return result


@pytest.fixture(scope="module")
def multi():
    from multidevice import run_worker

    return run_worker(__file__, N_DEVICES, timeout=300)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_step_equals_single_device(multi, mesh):
    """3 AdamW steps (LoRA dropout on) on 8 devices give the single-device losses and adapters (float32, 1e-5).

    The adapters are compared by relative L2 norm over all leaves: summation order differs across devices, and
    Adam's g / sqrt(v) amplifies the last-bit differences of near-zero gradient entries elementwise (~2e-6 absolute
    on entries of size 0.1), which says nothing about the parallel."""
    r = multi["meshes"][mesh]
    np.testing.assert_allclose(r["losses"], r["base_losses"], rtol=1e-5)
    assert len(set(r["base_losses"])) == 3  # the steps really changed the adapters
    assert r["lora_rel_diff"] < 1e-5, r
    assert r["lora_update_rel_diff"] < 1e-4, r  # relative to how far the adapters moved in 3 steps


@pytest.mark.parametrize("mesh, n", [("fsdp8", 8), ("data2_fsdp4", 4), ("fsdp4_tensor2", 8)])
def test_frozen_bytes_shrink_with_fsdp(multi, mesh, n):
    r = multi["meshes"][mesh]
    assert r["n_devices"] == N_DEVICES
    ratio = r["frozen_bytes_max"] / r["single_frozen_bytes"]
    # norms, offsets and nested scales stay replicated: a few percent of the tiny model
    assert 1 / n <= ratio < 1.1 / n, (mesh, ratio)
    assert r["frozen_bytes_max"] == r["frozen_bytes_min"]
    lratio = r["lora_opt_bytes_max"] / r["single_lora_opt_bytes"]
    fsdp = MESHES[mesh][1]
    assert lratio < 1.1 / fsdp, (mesh, lratio)  # adapters + AdamW state split over fsdp


def test_assemble_batch_builds_each_row_range_once(multi):
    """data=2 × fsdp=2 × tensor=2: rows in 4 ranges of 2, each built once, placed as `shard_batch` places them."""
    assert multi["assemble"] == {"built": [[0, 2], [2, 2], [4, 2], [6, 2]], "same": True}, multi["assemble"]


def test_train_step_keeps_lora_sharded(multi):
    specs = multi["meshes"]["fsdp8"]["lora_out_specs"]
    assert any("fsdp" in s for s in specs), specs


def test_bad_mesh_names_axis_and_sizes(multi):
    e = multi["errors"]
    assert "mesh.fsdp=3" in e["(1, 3, 1)"] and "8 devices" in e["(1, 3, 1)"], e
    assert "mesh.data=3" in e["(3, 'auto', 1)"], e
    assert "mesh.fsdp=4" in e["(1, 4, 1)"] and "auto" in e["(1, 4, 1)"], e
    assert "at most one axis" in e["(1, 'auto', 'auto')"], e
    assert "mesh.fsdp=0" in e["(1, 0, 1)"], e
    assert "mesh.tensor=8" in multi["tensor_error"] and "num_attention_heads=4" in multi["tensor_error"]
    assert "6 rows" in multi["batch_error"] and "= 8" in multi["batch_error"]


# ---------------------------------------------------------------------------------------------------------------
# In this process: rules on abstract meshes (no devices needed)


class _FakeMesh:
    """Enough of a Mesh for `partition_specs`: axis sizes only."""

    def __init__(self, data, fsdp, tensor):
        self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}


def _specs(tree, mesh):
    import jax

    from jqlora import parallel
    from jqlora.parallel import rules

    specs, notes = parallel.partition_specs(tree, mesh)
    paths = [tuple(rules._key_name(k) for k in p)
             for p, _ in jax.tree_util.tree_leaves_with_path(tree, is_leaf=rules._is_variable)]
    return dict(zip(paths, specs)), notes


def _flat_shapes(tree):
    import jax

    from jqlora.parallel import rules

    return [(tuple(rules._key_name(k) for k in p), x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=rules._is_variable)]


def test_rules_never_split_a_block():
    from jax.sharding import PartitionSpec as P

    from jqlora.training import step as T

    split = T.SplitModel.of(_tiny_model())
    specs, notes = _specs(split.frozen, _FakeMesh(1, 8, 1))
    q = ("model", "layers", "self_attn", "q_proj")
    assert specs[q + ("codes",)] == P(None, "fsdp") and specs[q + ("absmax",)] == P(None, "fsdp")
    assert specs[q + ("nested_absmax",)] == P() and specs[q + ("offset",)] == P()  # 64 blocks < 8 × 256
    assert specs[("model", "embed_tokens", "weight")] == P("fsdp")
    assert specs[("model", "norm", "weight")] == P()
    assert specs[("model", "layers", "input_layernorm", "weight")] == P()
    # fsdp=4 × tensor=2: the flat axis over both; k_proj has 32 blocks: 32 / 8 = 4 whole blocks per shard
    specs, _ = _specs(split.frozen, _FakeMesh(1, 4, 2))
    assert specs[("model", "layers", "self_attn", "k_proj", "codes")] == P(None, ("fsdp", "tensor"))
    # 64 blocks over 128 shards cannot be whole blocks: replicated, and said so
    specs, notes = _specs(split.frozen, _FakeMesh(1, 128, 1))
    assert specs[q + ("codes",)] == P() and specs[q + ("absmax",)] == P()
    assert any("q_proj" in n and "never splits a block" in n for n in notes), notes
    # every sharded code array: each shard is whole blocks and lines up with its absmax shard
    for fs, tp in ((1, 1), (2, 1), (8, 1), (4, 2), (16, 1), (32, 1)):
        specs, _ = _specs(split.frozen, _FakeMesh(1, fs, tp))
        for path, spec in specs.items():
            if path[-1] == "codes" and spec != P():
                n_shards = fs * tp if spec[-1] == ("fsdp", "tensor") else {"fsdp": fs, "tensor": tp}[spec[-1]]
                shapes = {p[-1]: x.shape for p, x in _flat_shapes(split.frozen) if p[:-1] == path[:-1]}
                c, nb = shapes["codes"][-1], shapes["absmax"][-1]
                assert nb % n_shards == 0 and (2 * c // n_shards) % (2 * c // nb) == 0, (path, spec)
                assert specs[path[:-1] + ("absmax",)] == spec


def test_rules_partial_block_replicates():
    """A kernel whose size is not a multiple of the block size has a partial last block: never split."""
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    tree = {"m": {"x_proj": {"codes": jnp.zeros((2, 50), jnp.uint8), "absmax": jnp.zeros((2, 2), jnp.uint8)}}}
    specs, notes = _specs(tree, _FakeMesh(1, 2, 1))
    assert specs[("m", "x_proj", "codes")] == P() and "partial last block" in notes[0]


def test_rules_unquantized_and_lora():
    from jax.sharding import PartitionSpec as P

    from jqlora.training import step as T

    split = T.SplitModel.of(_tiny_model(quant="none"))
    specs, _ = _specs(split.frozen, _FakeMesh(1, 4, 2))
    assert specs[("model", "layers", "self_attn", "q_proj", "weight")] == P(None, "tensor", "fsdp")  # column
    assert specs[("model", "layers", "mlp", "down_proj", "weight")] == P(None, "fsdp", "tensor")  # row
    assert specs[("lm_head", "weight")] == P(("fsdp", "tensor"))
    lspecs, _ = _specs(split.lora, _FakeMesh(1, 4, 2))
    assert lspecs[("model", "layers", "mlp", "down_proj", "lora_a")] == P(None, "fsdp")  # [L, I=128, R]
    assert lspecs[("model", "layers", "mlp", "down_proj", "lora_b")] == P(None, None, "fsdp")  # [L, R, O=64]
    # a single-device mesh shards nothing
    specs, notes = _specs(split.frozen, _FakeMesh(1, 1, 1))
    assert all(s == P() for s in specs.values()) and not notes


def test_shard_on_this_process_devices():
    """On whatever devices this process has (1 on CPU): placing and measuring work and give identical values."""
    import jax

    from jqlora import parallel
    from jqlora.training import step as T

    split = T.SplitModel.of(_tiny_model())
    mesh = parallel.make_mesh(1, "auto", 1)
    placed = parallel.shard_model_state(split, mesh)
    assert isinstance(placed, T.SplitModel) and placed.graphdef is split.graphdef
    for a, b in zip(jax.tree.leaves(placed.frozen), jax.tree.leaves(split.frozen)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    total = sum(x.nbytes for x in jax.tree.leaves(split.frozen))
    per = parallel.per_device_bytes(placed.frozen)
    assert max(per.values()) >= total // jax.device_count() and sum(per.values()) >= total
    with pytest.raises(ValueError, match=r"mesh\.fsdp=\d+: .* does not divide the \d+ devices"):
        parallel.make_mesh(1, jax.device_count() + 1, "auto") if jax.device_count() > 1 else \
            parallel.resolve_mesh_shape(1, 3, 1, n_devices=8)


def test_distributed_env(monkeypatch):
    from jqlora import parallel

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS",
                "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.distributed_env() is None
    assert parallel.initialize_distributed() is False  # nothing to join: jax.distributed is not touched
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert parallel.distributed_env() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel.distributed_env() == {}  # JAX reads SLURM itself
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert parallel.distributed_env() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                                          "process_id": 1}
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one'"):
        parallel.distributed_env()


def test_mesh_config_section():
    from jqlora.config import ConfigError, load_config

    cfg = load_config(None, [])
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, "auto", 1)
    cfg = load_config(None, ["mesh.fsdp=4", "mesh.data=auto"])
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == ("auto", 4, 1)
    for bad, msg in (("mesh.fsdp=0", "mesh.fsdp=0"), ("mesh.tensor=two", "mesh.tensor='two'"),
                     ("mesh.flsdp=2", "mesh.fsdp")):
        with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="at most one"):
        load_config(None, ["mesh.data=auto"])


# ---------------------------------------------------------------------------------------------------------------
# The memory plan


def test_plan_weight_bytes_equal_a_quantized_model():
    import jax
    from jqlora.training import step as T
    from jqlora.models.llama import ModelConfig

    split = T.SplitModel.of(_tiny_model())
    got = planning.weight_bytes(ModelConfig(**TINY), quant="nf4", double_quant=True,
                            block_size=64, dtype_bytes=4)
    real = sum(int(x.nbytes) for x in jax.tree.leaves(split.frozen))
    assert got["total"] == real, (got, real)
    quant_real = sum(int(x.nbytes) for p, x in jax.tree_util.tree_leaves_with_path(split.frozen)
                     if any(getattr(k, "key", None) in ("codes", "absmax", "nested_absmax", "offset") for k in p))
    assert got["quantized"] == quant_real
    lora_real = sum(int(x.nbytes) for x in jax.tree.leaves(split.lora))
    assert planning.lora_param_count(ModelConfig(**TINY), r=4) * 4 == lora_real


def test_plan_70b_fsdp2():

    p = planning.memory_plan(planning.BUILTIN["llama3-70b"], seq=2048, batch=1, fsdp=2, remat="full")
    total_weights = p.total_weight_bytes
    assert 35e9 <= total_weights <= 40e9, total_weights
    assert abs(p.rows["base weights (4-bit + bfloat16)"] - total_weights / 2) / total_weights < 0.01
    assert p.total < 80e9  # fits an 80 GB GPU per device
    p8 = planning.memory_plan(planning.BUILTIN["llama3-8b"], seq=2048, batch=1, fsdp=1, remat="full")
    assert 5e9 < p8.rows["base weights (4-bit + bfloat16)"] < 7e9
    none = planning.memory_plan(planning.BUILTIN["llama3-8b"], seq=2048, batch=1, fsdp=1, remat="none")
    dots = planning.memory_plan(planning.BUILTIN["llama3-8b"], seq=2048, batch=1, fsdp=1, remat="save_dots")
    assert p8.total < dots.total < none.total


@pytest.mark.parametrize("name, fsdp", [("llama3-70b-fsdp2", 2), ("llama3-70b-fsdp8", 8)])
def test_70b_recipes_fit_80gb(name, fsdp):
    """The 70B recipes: their mesh is the named FSDP size, 1 row per device, and the plan for them (the published
    Llama-3-70B shapes) leaves room on an 80 GB GPU, also for the whole 4-bit model the loader puts on the first
    device before splitting it."""
    from jqlora.config import load_config

    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"), [])
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, fsdp, 1)
    assert cfg.train.batch_size == fsdp and cfg.data.max_length == 2048
    p = planning.memory_plan(planning.BUILTIN["llama3-70b"], seq=cfg.data.max_length, batch=cfg.train.batch_size // fsdp,
                         fsdp=fsdp, remat=cfg.train.remat, r=cfg.lora.r, dtype=cfg.model.dtype)
    assert p.total < 70e9, p.total
    assert p.total_weight_bytes + p.rows["base weights (4-bit + bfloat16)"] < 70e9  # loading: whole model + its shard


def test_plan_cli(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", **{k: v for k, v in TINY.items() if k != "model_type"}}))
    r = subprocess.run([sys.executable, "-m", "jqlora.plan", "--model", "llama3-70b", "--seq", "2048", "--fsdp", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "total per device" in r.stdout and "fsdp=2" in r.stdout
    r = subprocess.run([sys.executable, "-m", "jqlora.plan", "--model-config", str(cfg), "--seq", "64"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "jqlora.plan", "--model", "llama9"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "llama9" in r.stderr, r.stderr


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(REPO))
    print(json.dumps(worker()))
