"""Training on a mesh, end to end through `python -m jqlora.train`: every run below must log the losses and export the
adapter of the plain single-device run (float32, 1e-5), however its devices and processes are laid out.

    R1   1 process × 1 device                            steps 1-6                          the reference
    R8   1 process × 8 devices, mesh.fsdp=8              steps 1-3, then stops and saves (run by `worker` below
                                                         through `Trainer`, after `main`'s answers to bad meshes and
                                                         a look at the bytes each device holds)
    R4   1 process × 4 devices, mesh.fsdp=4              resumes R8's checkpoint (saved on another mesh): steps 4-6
    MP   2 processes × 2 devices, mesh.fsdp=4 across     the same as R4, from a copy of R8's checkpoint; the step-6
         both (jax.distributed over loopback, gloo)      checkpoint is written by both processes, the metrics and
                                                         the adapter by process 0 only

Every run is a subprocess, since the device count (`--xla_force_host_platform_device_count`) must be set before JAX
starts. Runs that do not wait for each other run side by side (R1 ‖ R8, then R4 ‖ MP as soon as R8 has saved). Each
process costs 20-30 s of CPU, mostly start-up (imports, quantizing the model, compiling), so the runs are as few as
the checks allow.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from jqlora.run import Trainer

REPO = Path(__file__).resolve().parents[2]
# (the optimization-level flags only make XLA compile faster; every run uses them)
FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
LAUNCH_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS",
               "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
TIMEOUT = 240


def _env(devices: int, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra)
    return env


def _start(args: list[str], env: dict, command: tuple[str, ...] = ("-m", "jqlora.train", "--no-progress")):
    return subprocess.Popen([sys.executable, *command, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(*procs: subprocess.Popen) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process, in order; on a timeout or any error none is left running."""
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            out.append((p.returncode, stdout, stderr))
        return out
    finally:
        _kill(procs)


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multi_process(args: list[str], n: int = 2, devices: int = 2) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{_free_port()}"
    return [_start(args, _env(devices, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(n),
                              JAX_PROCESS_ID=str(i))) for i in range(n)]


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _losses(out: Path) -> list[tuple[int, str, float]]:
    return [(r["step"], k, r[k]) for r in _records(out) for k in ("loss", "eval_loss") if k in r]


def _adapter(out: Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _rel_diff(a: dict, b: dict) -> float:
    """Relative L2 distance over all adapter tensors (elementwise, Adam's g/√v amplifies last-bit differences of
    near-zero gradients; see tests/test_sharding.py)."""
    assert a.keys() == b.keys()
    x = np.concatenate([a[k].ravel() for k in sorted(a)]).astype(np.float64)
    y = np.concatenate([b[k].ravel() for k in sorted(a)]).astype(np.float64)
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def _check_same_run(got: Path, ref: Path, rtol: float = 1e-5) -> None:
    a, b = _losses(got), _losses(ref)
    assert [x[:2] for x in a] == [x[:2] for x in b], (a, b)  # the same lines: none missing, none twice
    np.testing.assert_allclose([x[2] for x in a], [x[2] for x in b], rtol=rtol)
    assert _rel_diff(_adapter(got), _adapter(ref)) < rtol


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    # 20 rows with very different numbers of trained tokens: micro-batches of 8 straddle epochs and hold padding rows
    rows = (assets / "train.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join((rows * 2)[:20]) + "\n")
    base = [f"model.path={assets / 'model'}", f"data.path={root / 'train.jsonl'}",
            f"data.eval_path={assets / 'eval.jsonl'}", "data.max_length=48", "lora.r=4", "lora.dropout=0.1",
            "train.batch_size=8", "train.grad_accum_steps=2", "train.max_steps=6", "train.warmup_steps=0",
            "train.learning_rate=1e-2", "train.log_every=1", "train.eval_every=3", "train.save_every=3",
            "train.keep_checkpoints=5", "train.sample_prompt=null", "train.remat=none"]
    out = {name: root / name for name in ("R1", "R8", "R4", "MP")}

    r1 = _start([*base, f"output_dir={out['R1']}"], _env(1))
    r8 = _start([*base, f"output_dir={out['R8']}", "mesh.fsdp=8", "train.stop_at_step=3"], _env(8),
                command=(__file__, "--worker"))
    started = [r1, r8]
    try:
        (rc, stdout, err), = _wait(r8)
        assert rc == 0, ("R8", err[-3000:])
        shutil.copytree(out["R8"], out["R4"])
        shutil.copytree(out["R8"], out["MP"])
        started += _multi_process([*base, f"output_dir={out['MP']}", "mesh.fsdp=4"])
        started.append(_start([*base, f"output_dir={out['R4']}", "mesh.fsdp=4"], _env(4)))
        (rc1, _, err1), *mp_results, (rc4, _, err4) = _wait(r1, *started[2:])
    finally:
        _kill(started)  # (nothing left running if an assertion failed)
    assert rc1 == 0, ("R1", err1[-3000:])
    assert rc4 == 0, ("R4", err4[-3000:])
    for i, (rc, _, err) in enumerate(mp_results):
        assert rc == 0, (f"MP process {i}", err[-3000:])
        (out["MP"] / f"stderr-{i}").write_text(err)
    return {**out, "worker": json.loads(stdout.strip().splitlines()[-1])}


def test_resume_on_another_mesh_equals_single_device(runs):
    """fsdp=8 for 3 steps, saved; a fresh process on 4 devices (fsdp=4) restores it and trains 3 more: the losses,
    held-out losses and final adapter of one uninterrupted single-device run."""
    assert sorted(int(p.name) for p in (runs["R8"] / "checkpoints").iterdir() if p.name.isdigit()) == [3]
    _check_same_run(runs["R4"], runs["R1"])
    assert len({loss for _, kind, loss in _losses(runs["R1"]) if kind == "loss"}) == 6  # the adapters did move


def test_two_processes_equal_one(runs):
    """Two jax.distributed processes (2 devices each, fsdp=4 across both) resuming R8's step-3 checkpoint: the losses
    and adapter of the single process on 4 devices doing the same (R4), and of the single-device run (R1)."""
    mp = runs["MP"]
    for i in range(2):
        err = (mp / f"stderr-{i}").read_text()
        assert f"process {i} of 2, 2 local / 4 global devices" in err, err[-2000:]
        assert "resumed from" in err and "at step 3" in err, err[-2000:]
    _check_same_run(mp, runs["R4"])
    _check_same_run(mp, runs["R1"])
    assert sorted(int(p.name) for p in (mp / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    assert (mp / "loss.png").is_file() and (mp / "config.yaml").is_file()


def test_export_from_a_multi_process_checkpoint(runs):
    """`python -m jqlora.export`'s restore reads the step-6 checkpoint that both processes wrote (each its own shards)
    onto this process's single device: it holds exactly the adapter that process 0 exported."""
    from jqlora import adapters
    from jqlora.run import restore_for_export

    model, _, step = restore_for_export(runs["MP"], quant="none")  # (the base weights play no part here)
    assert step == 6
    got, want = adapters.adapter_tensors(model), _adapter(runs["MP"])
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_mistakes_on_8_devices_are_one_line_exit_2(runs):
    """`python -m jqlora.train` (its `main`) on 8 devices: a mesh that does not fit the devices, the model or the batch
    is one line on stderr naming the axis and the sizes, exit code 2, before the model is loaded."""
    errors = runs["worker"]["errors"]
    for override, expect in (
            ("mesh.fsdp=3", "error: mesh.fsdp=3: data=1 × fsdp=3 × tensor=1 = 3 does not divide the 8 devices"),
            ("mesh.fsdp=1 mesh.tensor=8", "error: mesh.tensor=8 does not divide the model's num_attention_heads=4"),
            ("train.batch_size=6", "error: train.batch_size=6 is not divisible by mesh data × fsdp = 1 × 8 = 8"),
            ("train.eval_batch_size=4", "error: train.eval_batch_size=4 is not divisible by mesh data × fsdp")):
        rc, err = errors[override]
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith(expect), (override, err)


def test_no_unsharded_copy_stays_on_the_first_device(runs):
    """After the trainer placed the model with fsdp=8, every device holds the same bytes (1/8 of the sharded arrays
    plus the replicated ones): the loaded, unsharded model does not linger on device 0."""
    live, frozen = runs["worker"]["live"], runs["worker"]["frozen"]
    assert len(live) == 8 and len(set(live.values())) == 1, live
    assert live["0"] < frozen / 4, (live, frozen)


def test_bad_launch_environment_is_one_line_exit_2(monkeypatch, capsys):
    """A multi-process launch described wrongly by the environment stops before JAX starts, in one line."""
    from jqlora import train as T

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    assert T.main(["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: environment variable JAX_PROCESS_ID='first' is not an integer", err


def worker(args: list[str]) -> dict:
    """R8 (python tests/test_distributed.py --worker OVERRIDES, on 8 devices): `main`'s answer to mistakes, the bytes
    on each device after placement, then the run itself."""
    import contextlib
    import gc
    import io

    import jax

    from jqlora import train as T
    from jqlora.config import load_config

    errors = {}
    for override in ("mesh.fsdp=3", "mesh.fsdp=1 mesh.tensor=8", "train.batch_size=6", "train.eval_batch_size=4"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = T.main(["--no-progress", *args, *override.split()])
        errors[override] = (rc, err.getvalue())
    trainer = Trainer(load_config(None, args), progress=False)
    gc.collect()
    live: dict[str, int] = {}
    for x in jax.live_arrays():
        for shard in x.addressable_shards:
            live[str(shard.device.id)] = live.get(str(shard.device.id), 0) + int(shard.data.nbytes)
    frozen = sum(int(x.nbytes) for x in jax.tree.leaves(trainer.split.frozen))
    assert trainer.run() == 0
    return {"errors": errors, "live": live, "frozen": frozen}


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(REPO))
    print(json.dumps(worker(sys.argv[sys.argv.index("--worker") + 1:])))
