"""Sequence (context) parallelism (`jqlora.models.sequence`, mesh.seq): a tiny 4-bit Llama with its tokens split
over the seq axis of 8 host devices gives the single-device logits, LoRA gradients and eval sums, on packed rows
(several documents a row, positions restarting, trailing padding) and on unpacked ones, with remat full and LoRA
dropout on; `jqlora.train` on a seq mesh logs the single-device losses; a mesh that cannot split the heads is
refused with one line naming mesh.seq and the head counts; the plan divides the token rows by the axis.

Tolerance (float32 throughout): logits 2e-5 absolute (values ~1), gradients 1e-5 relative L2 over all LoRA leaves
(summation order differs: the CE sums per device then over the mesh, the weight gradients reduce over devices).

Like test_sharding.py, the 8-device part runs in one subprocess (this file as a script, `--worker`), since other
test files start JAX in this process first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
N_DEVICES = 8
# 8 query heads, 4 KV heads
TINY = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, head_dim=8)
# (data, fsdp, tensor, seq)
# seq8 repeats each KV head twice; fsdp2_seq2_tensor2 splits the 2 KV heads a tensor shard holds over seq
MESHES = {"seq8": (1, 1, 1, 8), "fsdp2_seq2_tensor2": (1, 2, 2, 2)}
B, S = 4, 32


def _model(dropout: float):
    """The tiny 4-bit model with random codes and scales filled in (no quantization compile)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jqlora.lora import LoraConfig, QuantSpec
    from jqlora.models.llama import LlamaForCausalLM, ModelConfig

    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(ModelConfig(**TINY), LoraConfig(r=4, alpha=8, dropout=dropout),
                                                       QuantSpec("nf4"), "float32", rngs=nnx.Rngs(0), remat="full"))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)

    def fill(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if x.dtype == jnp.uint8:
            value = rng.integers(0, 256, x.shape)
        elif name in ("offset", "nested_absmax"):
            value = np.full(x.shape, 0.05 if name == "offset" else 0.02)
        elif name == "lora_a":
            value = rng.uniform(-0.1, 0.1, x.shape)
        elif name == "lora_b":
            value = 0.02 * rng.normal(size=x.shape)
        elif "norm" in str(path):
            value = 1 + 0.1 * rng.normal(size=x.shape)
        else:
            value = 0.05 * rng.normal(size=x.shape)
        return jnp.asarray(value, x.dtype)

    leaves = [fill(p, x) for p, x in jax.tree_util.tree_leaves_with_path(state)]
    return nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(state), leaves))


def _batches():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, TINY["vocab_size"], (B, S + 1)).astype(np.int32)
    seg = np.zeros((B, S), np.int32)
    pos = np.zeros((B, S), np.int32)
    for b in range(B):  # 1-3 documents a row (boundaries off the 8 shards' edges), then padding
        cuts = np.sort(rng.choice(np.arange(3, S - 2), size=b % 3, replace=False))
        end = S - 3 * b
        start = 0
        for i, stop in enumerate(list(cuts[cuts < end]) + [end]):
            seg[b, start:stop], pos[b, start:stop] = i + 1, np.arange(stop - start)
            start = stop
    mask = ((rng.random((B, S)) < 0.8) & (seg > 0)).astype(np.int32)
    packed = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask, "segment_ids": seg,
              "positions": pos}
    real = np.arange(S)[None] < (S - 3 * np.arange(B))[:, None]  # one document a row, right-padded
    unpacked = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask * real,
                "segment_ids": real.astype(np.int32), "positions": np.broadcast_to(np.arange(S, dtype=np.int32),
                                                                                    (B, S)).copy()}
    return {"packed": packed, "unpacked": unpacked}


def worker() -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jqlora import parallel
    from jqlora.training import step as T

    assert jax.device_count() == N_DEVICES, jax.devices()
    batches = _batches()
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)  # noqa

    def run(mesh_shape):
        model = _model(dropout=0.1)  # dropout on: its masks must not depend on the placement either
        mesh = None
        if mesh_shape is not None:
            d, f, t, s = mesh_shape
            mesh = parallel.make_mesh(d, f, t, seq=s)
            parallel.check_model_fits(mesh, model.config, B, B, seq_len=S)
            model.seq_mesh = mesh
        split = T.SplitModel.of(model)
        if mesh is None:
            place = lambda x: jax.device_put(x, jax.devices()[0])  # noqa: E731
            lora, frozen = place(split.lora), place(split.frozen)
            put = lambda b: {k: place(jnp.asarray(v)) for k, v in b.items()}  # noqa: E731
        else:
            lora, frozen = parallel.shard_tree(split.lora, mesh), parallel.shard_tree(split.frozen, mesh)
            put = lambda b: parallel.shard_batch(b, mesh)  # noqa: E731
        grad_fns = {kind: T.make_grad_fn(split, ce_chunk=16, packed=kind == "packed") for kind in batches}
        eval_fn = T.make_eval_stats_step(split, ce_chunk=16)
        key = jax.random.PRNGKey(5)

        @jax.jit
        def forward_backward(lo, fr, bs):  # one compile for all of it (inner jits inline)
            res = {}
            for kind, b in bs.items():
                model = nnx.merge(split.graphdef, split.to_state(lo), fr)
                res[f"logits_{kind}"] = model(b["input_ids"], b["segment_ids"] if kind == "packed" else None,
                                              b["positions"])
                res[f"grads_{kind}"], res[f"loss_sum_{kind}"] = grad_fns[kind](lo, fr, b, key, jnp.float32(1.0))
            b = bs["packed"]
            res["eval"] = eval_fn(lo, fr, b)
            res["hidden"] = nnx.merge(split.graphdef, split.to_state(lo), fr).hidden_states(
                b["input_ids"], b["segment_ids"], b["positions"])
            # rows that do not split (3 rows of 30 tokens: an evaluation harness's batch) run unsplit, the same
            res["logits_odd"] = nnx.merge(split.graphdef, split.to_state(lo), fr)(b["input_ids"][:3, :30])
            return res

        res = forward_backward(lora, frozen, {kind: put(batch) for kind, batch in batches.items()})
        out = {k: np.asarray(v) if k.startswith("logits") else flat(v) if k.startswith("grads") else v
               for k, v in res.items() if k not in ("eval", "hidden")}
        out["eval"] = [float(x) for x in res["eval"]]
        out["hidden_spec"] = str(getattr(res["hidden"].sharding, "spec", None))
        out["hidden_shard"] = list(res["hidden"].addressable_shards[0].data.shape)
        return out

    base = run(None)
    result = {}
    for name, shape in MESHES.items():
        got = run(shape)
        r = {"hidden_spec": got["hidden_spec"], "hidden_shard": got["hidden_shard"], "eval": got["eval"],
             "base_eval": base["eval"]}
        r["logits_odd_max_abs"] = float(np.abs(got["logits_odd"] - base["logits_odd"]).max())
        for kind in ("packed", "unpacked"):
            r[f"logits_{kind}_max_abs"] = float(np.abs(got[f"logits_{kind}"] - base[f"logits_{kind}"]).max())
            g, g0 = got[f"grads_{kind}"], base[f"grads_{kind}"]
            r[f"grads_{kind}_rel"] = float(np.linalg.norm(g - g0) / np.linalg.norm(g0))
            r[f"loss_sum_{kind}"] = float(got[f"loss_sum_{kind}"])
            r[f"base_loss_sum_{kind}"] = float(base[f"loss_sum_{kind}"])
        result[name] = r
    # what a device holds: the compiled gradient step's temporaries for one row of 2048 tokens (XLA attention)
    long = {"input_ids": np.zeros((1, 2048), np.int32), "targets": np.zeros((1, 2048), np.int32),
            "loss_mask": np.ones((1, 2048), np.float32), "segment_ids": np.ones((1, 2048), np.int32),
            "positions": np.arange(2048, dtype=np.int32)[None]}
    result["temp_bytes"] = {}
    for seq in (1, 8):
        model = _model(dropout=0.0)
        mesh = parallel.make_mesh(1, 1, 1, seq=seq) if seq > 1 else None
        model.seq_mesh = mesh
        split = T.SplitModel.of(model)
        args = ((parallel.shard_tree(split.lora, mesh), parallel.shard_tree(split.frozen, mesh),
                 parallel.shard_batch(long, mesh)) if mesh else
                jax.device_put((split.lora, split.frozen, long), jax.devices()[0]))
        compiled = jax.jit(T.make_grad_fn(split, ce_chunk=256)).lower(*args, jax.random.PRNGKey(0),
                                                                        jnp.float32(1.0)).compile()
        result["temp_bytes"][seq] = int(compiled.memory_analysis().temp_size_in_bytes)
        result.setdefault("frozen_bytes", {})[seq] = max(parallel.per_device_bytes((args[0], args[1])).values())
    # meshes the heads cannot split: refused naming mesh.seq and the head counts
    from jqlora.models.llama import ModelConfig

    errors = {}
    for heads, kv, mesh_shape in ((8, 4, (1, 1, 1, 8)), (6, 2, (1, 2, 1, 4)), (12, 6, (1, 2, 1, 4))):
        try:
            cfg_ = ModelConfig(**{**TINY, "num_attention_heads": heads, "num_key_value_heads": kv})
            d, f, t, s = mesh_shape
            parallel.check_model_fits(parallel.make_mesh(d, f, t, seq=s), cfg_, B, None, seq_len=S)
            errors[f"{heads}/{kv}"] = None
        except ValueError as e:
            errors[f"{heads}/{kv}"] = str(e)
    try:
        parallel.check_model_fits(parallel.make_mesh(1, 1, 1, seq=8), ModelConfig(**TINY), B, None, seq_len=36)
        errors["length"] = None
    except ValueError as e:
        errors["length"] = str(e)
    result["errors"] = errors
    return result


@pytest.fixture(scope="module")
def multi():
    from multidevice import run_worker

    return run_worker(__file__, N_DEVICES, timeout=600)


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("kind", ["packed", "unpacked"])
def test_logits_and_lora_grads_equal_one_device(multi, mesh, kind):
    r = multi[mesh]
    assert r[f"logits_{kind}_max_abs"] < 2e-5, r
    assert r[f"grads_{kind}_rel"] < 1e-5, r
    np.testing.assert_allclose(r[f"loss_sum_{kind}"], r[f"base_loss_sum_{kind}"], rtol=1e-6)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_eval_step_and_unsplit_rows_equal_one_device(multi, mesh):
    """The eval step's loss sum, token count and hits; rows that cannot split run unsplit with the same logits.
    (A whole train step on a seq mesh: `test_train_cli_on_seq_mesh_equals_one_device`.)"""
    r = multi[mesh]
    np.testing.assert_allclose(r["eval"], r["base_eval"], rtol=1e-6)
    assert r["logits_odd_max_abs"] < 2e-5, r


@pytest.mark.parametrize("mesh", list(MESHES))
def test_hidden_states_split_over_seq(multi, mesh):
    """Each device holds S / seq tokens of its rows: the memory the axis is for."""
    r = multi[mesh]
    d, f, t, s = MESHES[mesh]
    assert "seq" in r["hidden_spec"], r["hidden_spec"]
    assert r["hidden_shard"] == [B // (d * f), S // s, TINY["hidden_size"]], r


def test_a_device_holds_an_eighth_of_the_row(multi):
    """seq=8: the compiled gradient step's temporaries per device are 1/8 of one device's for the same 2048-token row
    (activations, attention's scores for 1/8 of the heads, the CE's hidden states): 8 devices hold 8× the context.
    (measured: 1/8.0)"""
    t = multi["temp_bytes"]
    assert t["8"] <= 1.1 * t["1"] / 8, t
    # the weights and adapters too: the seq axis is one more FSDP axis for them (norms and scales stay whole)
    w = multi["frozen_bytes"]
    assert w["1"] / 8 <= w["8"] < 1.15 * w["1"] / 8, w


def test_bad_seq_mesh_names_heads(multi):
    e = multi["errors"]
    assert e["8/4"] is None  # seq 8 over 4 KV heads: repeated
    assert "mesh.seq=4" in e["6/2"] and "num_attention_heads=6" in e["6/2"], e
    assert "mesh.seq=4" in e["12/6"] and "num_key_value_heads=6" in e["12/6"], e
    assert "mesh.seq=8" in e["length"] and "data.max_length=36" in e["length"], e


def test_mesh_seq_config_key():
    from jqlora.config import ConfigError, load_config

    assert load_config(None, []).mesh.seq == 1
    assert load_config(None, ["mesh.seq=4"]).mesh.seq == 4
    for bad in ("mesh.seq=0", "mesh.seq=auto", "mesh.seq=two"):
        with pytest.raises(ConfigError, match=r"mesh\.seq"):
            load_config(None, [bad])


def test_seq_heads_rule():
    """The rule without devices: N divisible by seq · tensor; the device's K / tensor KV heads split or repeat."""
    from jqlora.parallel.mesh import check_seq_heads

    for seq, tensor, n, k in ((8, 1, 32, 8), (8, 1, 64, 8), (4, 2, 32, 8), (8, 1, 8, 1), (2, 1, 2, 2)):
        check_seq_heads(seq, tensor, n, k)  # Llama-3 8B / 70B, MQA
    for seq, tensor, n, k in ((8, 1, 12, 4), (3, 1, 12, 4), (4, 2, 24, 6)):
        with pytest.raises(ValueError, match=rf"mesh\.seq={seq}.*num_(attention|key_value)_heads"):
            check_seq_heads(seq, tensor, n, k)


def test_train_cli_on_seq_mesh_equals_one_device(assets, tmp_path):
    """`jqlora.train` with mesh.seq=2 × mesh.fsdp=2 on 4 host devices (packed rows of 64 tokens, 32 a device): the
    logged losses of one device, and a max_length the seq axis cannot split is one line before loading."""
    args = [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}", "data.max_length=64",
            "model.dtype=float32", "lora.r=4", "lora.alpha=8", "lora.dropout=0", "train.max_steps=2",
            "train.batch_size=2", "train.grad_accum_steps=1", "train.log_every=1", "train.warmup_steps=0",
            "train.learning_rate=1e-2", "log.tensorboard=false", "train.eval_every=0"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")

    def start(*extra, env=None):
        return subprocess.Popen([sys.executable, "-m", "jqlora.train", "--no-progress", *args, *extra], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start(f"output_dir={tmp_path / 'one'}", "mesh.fsdp=1"),  # (side by side: 2 cores)
             start(f"output_dir={tmp_path / 'four'}", "mesh.fsdp=2", "mesh.seq=2", env=env),
             start(f"output_dir={tmp_path / 'bad'}", "mesh.fsdp=2", "mesh.seq=2", "data.max_length=63", env=env)]
    (_, e1), (_, e4), (_, bad_err) = (p.communicate(timeout=600) for p in procs)
    assert procs[0].returncode == 0 and procs[1].returncode == 0, (e1[-1500:], e4[-1500:])
    a, b = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "four"))
    a, b = [x["loss"] for x in a if "loss" in x], [x["loss"] for x in b if "loss" in x]
    assert len(a) == len(b) == 2 and a[0] != a[1]
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert procs[2].returncode != 0 and len(bad_err.strip().splitlines()) == 1, bad_err[-1500:]
    assert "mesh.seq=2" in bad_err and "data.max_length=63" in bad_err, bad_err
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_plan_divides_token_rows_by_seq_parallel():
    """The plan of 8 × 2048 tokens split over seq 8 holds 2048 tokens' rows a device (residuals, CE hidden, the
    layer's token activations; attention with cuDNN: statistics linear in S, heads / 8), and the weights of fsdp 8."""
    from jqlora import planning

    shape = planning.BUILTIN["llama3-8b"]
    one = planning.memory_plan(shape, seq=2048, remat="full", attention="cudnn")
    split = planning.memory_plan(shape, seq=8 * 2048, remat="full", attention="cudnn", seq_parallel=8)
    fsdp8 = planning.memory_plan(shape, seq=2048, remat="full", attention="cudnn", fsdp=8)
    for row in ("residual stream checkpoints", "cross-entropy chunk + final hidden"):
        assert split.rows[row] == pytest.approx(one.rows[row]), row
    for row in (planning.weights_row("bfloat16"), "LoRA params+grad+acc+AdamW (fp32)",
                "gathered layer (fsdp prefetch, x2)"):
        assert split.rows[row] == pytest.approx(fsdp8.rows[row]), row
    # the working set: token activations as one device's, cuDNN's float32 statistics B·64·(N/8)·(8S)·4 the same
    assert split.rows["layer working set (recomputed)"] == pytest.approx(one.rows["layer working set (recomputed)"])
    assert "seq-parallel=8" in split.title


def test_plan_cli_seq_parallel():
    ok = subprocess.run([sys.executable, "-m", "jqlora.plan", "--model", "llama3-8b", "--seq", "16384",
                         "--seq-parallel", "8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "seq-parallel=8" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "jqlora.plan", "--model", "llama3-8b", "--seq-parallel", "3"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "mesh.seq=3" in bad.stderr and "num_attention_heads=32" in bad.stderr, bad.stderr


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(REPO))
    print(json.dumps(worker()))
