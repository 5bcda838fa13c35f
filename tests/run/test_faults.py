"""Faults lose nothing and say one line: corrupt checkpoints, two trainers on one run, a full disk, NaN weights,
divergence, leftovers of interrupted writes. Each case goes through the CLI as a user hits it and checks the exit
code, that there is no traceback, the one line naming the culprit, and that older checkpoints and outputs are
byte-identical before and after."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from jqlora.run.divergence import DivergenceMonitor
from jqlora.checkpoints import io

REPO = Path(__file__).resolve().parents[2]


def cli(module: str, *args, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"jqlora.{module}", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def train(*args, **kw) -> subprocess.CompletedProcess:
    return cli("train", "--no-progress", *args, **kw)


def digest(path: Path) -> dict[str, str]:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr lines that are neither progress bars nor library chatter."""
    return [ln for ln in proc.stderr.splitlines() if ln.startswith(("error:", "warning:"))]


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int | None = None) -> str:
    assert proc.returncode != 0 if code is None else proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def run_args(assets):
    return [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}",
            f"data.eval_path={assets / 'eval.jsonl'}", "data.max_length=48", "lora.r=4", "lora.dropout=0.0",
            "train.log_every=1", "train.eval_every=0", "train.warmup_steps=1", "train.learning_rate=1e-2",
            "train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=10", "train.sample_prompt=null",
            "train.grad_accum_steps=1", "train.batch_size=2"]


@pytest.fixture(scope="module")
def three_checkpoints(run_args, tmp_path_factory):
    """A run stopped after step 3 (checkpoints 1, 2, 3), and the same run uninterrupted (for the final losses)."""
    root = tmp_path_factory.mktemp("faults")
    stopped = root / "stopped"
    r = train(*run_args, f"output_dir={stopped}", "train.stop_at_step=3")
    assert r.returncode == 0, r.stderr
    straight = root / "straight"
    r = train(*run_args, f"output_dir={straight}", "train.keep_checkpoints=2")
    assert r.returncode == 0, r.stderr
    return stopped, straight


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def _array_file(step_dir: Path) -> Path:
    """The largest file of the checkpoint's array store."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "ocdbt" not in p.name
             and not p.name.startswith("_")]
    return max(files, key=lambda p: p.stat().st_size)


def _delete_manifest(d: Path) -> None:
    (d / "state" / "manifest.ocdbt").unlink()


def _truncate_array(d: Path) -> None:
    f = _array_file(d)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _cut_meta(d: Path) -> None:
    f = d / "meta" / "metadata"
    f.write_text(f.read_text()[:10])


def _flip_bytes(d: Path) -> None:
    f = _array_file(d)
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_delete_manifest, _truncate_array, _cut_meta, _flip_bytes],
                         ids=["manifest-deleted", "array-truncated", "meta-cut", "bytes-flipped"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(three_checkpoints, run_args, tmp_path, corrupt):
    stopped, straight = three_checkpoints
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    corrupt(out / "checkpoints" / "3")
    bad_before = digest(out / "checkpoints" / "3")
    older = {s: digest(out / "checkpoints" / str(s)) for s in (1, 2)}
    r = train(*run_args, f"output_dir={out}")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    warnings = [ln for ln in error_lines(r) if "checkpoints/3" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning:"), r.stderr
    assert "moved to" in warnings[0] and "checkpoints.bad" in warnings[0], warnings[0]
    # nothing lost: the bad checkpoint is kept as it was, the older ones are untouched
    (kept,) = (out / "checkpoints.bad").iterdir()
    assert digest(kept) == bad_before
    assert {s: digest(out / "checkpoints" / str(s)) for s in (1, 2)} == older
    # the run went on from step 2, exactly as the uninterrupted run
    assert "resumed" in r.stderr and "at step 2" in r.stderr, r.stderr
    want, got = _losses(straight), _losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])


def test_rotation_keeps_verified_checkpoints(three_checkpoints):
    """keep_checkpoints=2 (the uninterrupted run): after each verified save only the newest two remain, each with
    its checksums; a checkpoint of the stopped run lists every one of its files."""
    from jqlora.run import RunDir
    from jqlora.run.checksums import CHECKSUMS

    stopped, straight = three_checkpoints
    run = RunDir(straight, create=False)
    assert run.steps() == [3, 4]
    assert all(run.verify(s) is None for s in (3, 4))
    step_dir = stopped / "checkpoints" / "3"
    listed = set(json.loads((step_dir / CHECKSUMS).read_text())["files"])
    assert listed == {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()} - {CHECKSUMS}


# ----------------------------------------------------------------------------------------------------------------
# Two trainers on one run directory


def _wait_for(predicate, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.2)


def test_second_trainer_is_refused_and_a_stale_lock_is_taken_over(run_args, tmp_path):
    out = tmp_path / "shared"
    long = [*run_args, "train.max_steps=100000", "train.save_every=1", "train.keep_checkpoints=2"]
    first = subprocess.Popen([sys.executable, "-m", "jqlora.train", "--no-progress", *long, f"output_dir={out}"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from jqlora.run import RunDir

        _wait_for(lambda: RunDir(out, create=False).latest_step() is not None)  # stepping, a checkpoint saved
        second = train(*long, f"output_dir={out}")
        line = assert_one_line_error(second, "in use by another trainer", f"PID {first.pid}",
                                     socket.gethostname(), code=2)
        assert str(out) in line
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the lock file still names the dead process
        first.communicate()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert steps == sorted(set(steps)), steps  # one writer: no step logged twice
    from jqlora.run.lock import lock_path

    assert json.loads(Path(lock_path(out)).read_text())["pid"] == first.pid
    latest = RunDir(out, create=False).latest_step()
    assert latest is not None
    third = train(*long, f"output_dir={out}", f"train.stop_at_step={latest + 1}")
    assert third.returncode == 0, third.stderr
    assert "took over the stale lock" in third.stderr and str(first.pid) in third.stderr, third.stderr
    assert f"stopped at step {latest + 1}" in third.stderr, third.stderr


# ----------------------------------------------------------------------------------------------------------------
# A full disk


@contextlib.contextmanager
def small_filesystem(path: Path, mib: int):
    """A ``mib``-MiB tmpfs at ``path``, or (where mounting is not allowed) None: the caller simulates ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, leave: int) -> None:
    """Fill the file system of ``path`` until about ``leave`` bytes are free."""
    free = shutil.disk_usage(path).free
    with open(path / "filler", "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        todo = max(0, free - leave)
        while todo > 0:
            n = min(len(chunk), todo)
            try:
                f.write(chunk[:n])
            except OSError:
                break
            todo -= n


def _simulate_full_disk(monkeypatch, free: int = 4096) -> None:
    """The fallback where no file system can be mounted: the disk reports ``free`` bytes free and every write of
    safetensors or orbax fails with ENOSPC at the write call."""
    import shutil as _shutil

    usage = _shutil.disk_usage
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: usage(p)._replace(free=free))

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    import safetensors.numpy
    import safetensors.flax

    monkeypatch.setattr(safetensors.numpy, "save_file", enospc)
    monkeypatch.setattr(safetensors.flax, "save_file", enospc)


def test_disk_full_during_checkpoint_convert_and_export(run_args, three_checkpoints, assets, tmp_path, capsys,
                                                        monkeypatch):
    """Through each CLI (in this process, so the fallback can simulate the disk): a full disk is one line naming
    what was being written with the space needed and free; the earlier checkpoints are byte-identical, and no
    partial output is left."""
    from jqlora import convert, export, train as train_cli

    stopped, _ = three_checkpoints
    disk = tmp_path / "disk"
    with small_filesystem(disk, 64) as mounted:
        out = disk / "run"
        shutil.copytree(stopped, out)
        if mounted:
            fill(disk, leave=64 << 10)  # 64 KiB: less than one checkpoint of LoRA + AdamW state
        else:
            _simulate_full_disk(monkeypatch)
        before = digest(out / "checkpoints")
        # the trainer resumes from step 3 and cannot save step 4
        rc = train_cli.main(["--no-progress", *run_args, f"output_dir={out}"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        line = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(line) == 1 and "checkpoint" in line[0] and "free" in line[0] and "needs" in line[0], err
        assert digest(out / "checkpoints") == before
        assert not (out / "adapter").exists()

        for argv, what in (([str(assets / "model"), str(disk / "converted")], convert.main),
                           ([str(out), str(disk / "adapter")], export.main),
                           ([str(out), str(disk / "merged"), "--merge"], export.main)):
            rc = what(argv)
            err = capsys.readouterr().err
            assert rc == 2 and "Traceback" not in err, err
            line = [ln for ln in err.splitlines() if ln.startswith("error:")]
            assert len(line) == 1 and "free" in line[0] and Path(argv[1]).name in line[0], err
            assert not any(p.name.startswith(f".{Path(argv[1]).name}.") or p.name == Path(argv[1]).name
                           for p in disk.iterdir()), list(disk.iterdir())
        assert digest(out / "checkpoints") == before


def test_disk_full_at_the_write_call(assets, tmp_path, capsys, monkeypatch):
    """The free-space estimate passes but the disk fills during the write (another writer, a quota): the write's
    own ENOSPC, from safetensors, becomes the same one line, and nothing half-written is left."""
    from jqlora import convert

    monkeypatch.setattr(io, "check_free_space", lambda *a, **k: None)
    disk = tmp_path / "disk2"
    with small_filesystem(disk, 8) as mounted:
        if mounted:
            fill(disk, leave=16 << 10)
        else:
            _simulate_full_disk(monkeypatch)
        rc = convert.main([str(assets / "model"), str(disk / "converted")])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        line = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(line) == 1 and "no space left on device" in line[0] and "converted" in line[0], err
        assert [p.name for p in disk.iterdir()] == (["filler"] if mounted else [])


# ----------------------------------------------------------------------------------------------------------------
# NaN in a base weight


@pytest.fixture(scope="module")
def nan_model(assets, tmp_path_factory):
    """The test model with one NaN in a linear kernel that gets quantized."""
    path = tmp_path_factory.mktemp("nan") / "model"
    shutil.copytree(assets / "model", path)
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key] = tensors[key].copy()
    tensors[key][3, 5] = float("nan")
    save_file(tensors, str(f), metadata={"format": "pt"})
    return path, key


def test_nan_in_a_quantized_weight_is_one_line_on_every_path(nan_model, assets, run_args, tmp_path):
    from jqlora import load_model, adapters
    from jqlora.lora import LoraConfig

    path, key = nan_model
    adapter = tmp_path / "adapter"
    model = load_model(assets / "model", lora=LoraConfig(r=4, alpha=8), quant="none", dtype="float32")
    adapters.save_adapter(model, adapter, base_model_name_or_path=str(assets / "model"))
    args = [a for a in run_args if not a.startswith("model.path=")]
    runs = {
        "train": train(*args, f"model.path={path}", f"output_dir={tmp_path / 'run'}"),
        "convert": cli("convert", path, tmp_path / "converted"),
        "generate": cli("generate", "--model", path, "--prompt", "hi", "--max-new-tokens", "2"),
        "export": cli("export", adapter, tmp_path / "merged", "--merge", "--base", path),
    }
    for name, r in runs.items():
        line = assert_one_line_error(r, "model.safetensors", key, "NaN", code=2)
        assert str(path) in line, (name, line)
    assert not (tmp_path / "converted").exists() and not (tmp_path / "merged").exists()


# ----------------------------------------------------------------------------------------------------------------
# Divergence


def test_divergence_monitor_tells_divergence_from_a_spike():
    m = DivergenceMonitor(factor=3.0, patience=3)
    losses = [2.0, 1.5, 7.0, 1.4, 7.0, 8.0, 1.3]  # single spikes and a streak of two: noise
    assert [m.update(i + 1, x, i) for i, x in enumerate(losses)] == [None] * len(losses)
    assert not m.suspect
    got = [m.update(10 + i, x, 9 + i) for i, x in enumerate([6.5, 9.0, 20.0])]
    assert got[:2] == [None, None] and m.suspect and "since step 9" in got[2] and "3 log windows" in got[2]
    assert m.update(20, float("nan"), 19) == "the loss is nan"
    # a collapse to uniform predictions (overflowed activations): not higher than a random model's early loss
    m = DivergenceMonitor(factor=3.0, patience=3, uniform_loss=6.2383)
    assert m.update(1, 6.2650, 0) is None and m.update(2, 6.0600, 1) is None  # a random start is not uniform
    got = [m.update(3 + i, 6.2383, 2 + i) for i in range(3)]
    assert got[:2] == [None, None] and "uniform distribution" in got[2] and "since step 2" in got[2]
    # a gradient-norm explosion with a loss that does not (yet) show it
    m = DivergenceMonitor(factor=3.0, patience=3)
    assert m.update(1, 2.0, 0, grad_norm=0.5) is None and m.update(2, 1.9, 1, grad_norm=40.0) is None  # 80x: fine
    got = [m.update(3 + i, 1.9, 2 + i, grad_norm=g) for i, g in enumerate([60.0, 1e3, float("nan")])]
    assert got[:2] == [None, None] and "gradient norm" in got[2] and "since step 2" in got[2]


def test_a_diverging_run_stops_and_names_the_last_good_checkpoint(run_args, tmp_path):
    """lr=1e4 (a typo for 1e-4): the run stops with exit 1 and one line naming the last good checkpoint, which is
    one saved before the loss went bad (later ones are moved aside, not deleted); nothing is exported."""
    import re

    from jqlora.run import RunDir

    out = tmp_path / "div"
    r = train(*[a for a in run_args if "learning_rate" not in a], "train.learning_rate=1e4", "train.max_steps=40",
              "train.warmup_steps=2", f"output_dir={out}")
    line = assert_one_line_error(r, "last good checkpoint", code=1)
    assert "diverged" in line or "loss is nan" in line or "loss is inf" in line, line
    assert not (out / "adapter").exists()
    m = re.search(r"last good checkpoint: step (\d+)", line)
    assert m, line
    good = int(m.group(1))
    run = RunDir(out, create=False)
    assert run.steps()[-1] == good and run.verify(good) is None
    # the state of checkpoint `good` gave the (finite, early-like) loss logged at step good + 1
    losses = _losses(out)
    assert losses[good + 1] < 3 * losses[1], (good, losses)


# ----------------------------------------------------------------------------------------------------------------
# Leftovers of interrupted writes


def test_leftovers_of_an_interrupted_convert_are_cleaned_and_said(assets, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    gone = tmp_path / f".converted.partial-{host}-{dead.pid}-abc123"
    live = tmp_path / f".converted.partial-{host}-{os.getpid()}-def456"  # a convert still running: left alone
    for d in (gone, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    r = cli("convert", assets / "model", tmp_path / "converted")
    assert r.returncode == 0, r.stderr
    assert not gone.exists() and live.exists()
    assert "removed 1 leftover" in r.stderr and gone.name in r.stderr, r.stderr
    assert (tmp_path / "converted" / "model.safetensors").is_file()
