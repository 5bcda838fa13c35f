"""Faults, round two (issue 27): a save that fails or never finishes, a lock reached through a symlink, a torn
metrics line, unverified init_state/ and base/, overwrite onto a folder the run reads, export against rotation,
private outputs, and one-line errors at the edges. Each goes through the CLI (or its main) as a user hits it and
checks the exit code, the one line, and that what was there before is byte-identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jqlora.run import journal
from jqlora.run.lock import RunLock, RunLockedError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from fault_edges import SAVE_FAULT  # noqa: E402  (the battery's trainer with a failing / hanging orbax save)



def run_args(assets: Path, out: Path, *more: str) -> list[str]:
    return ["--no-progress", f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}",
            f"output_dir={out}", "data.max_length=48", "lora.r=4", "lora.dropout=0.0", "train.log_every=1",
            "train.eval_every=0", "train.warmup_steps=1", "train.max_steps=3", "train.save_every=1",
            "train.sample_prompt=null", "train.batch_size=2", "train.grad_accum_steps=1", *more]


def env(**kw) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **kw}


def assert_one_line(proc, *needles: str) -> str:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failed_or_stuck_save_exits_in_one_line(assets, tmp_path, mode):
    """The first checkpoint's save fails (or never finishes) inside orbax's thread: the trainer exits within 60 s of
    it (timed from the step's log line, just before the save; the model's loading is not the point), non-zero, with
    one line naming the checkpoint."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", SAVE_FAULT, mode, *run_args(assets, out)], cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=env(JQLORA_SAVE_TIMEOUT_S="3"))
    lines: list[tuple[float, str]] = []  # (when, line), read as they come
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), ln) for ln in p.stderr), daemon=True)
    reader.start()
    try:
        p.wait(timeout=400)  # (the loading may be slow on a busy machine; the bound is from the save on)
        ended = time.monotonic()
        reader.join(10)
    finally:
        p.kill()
    saving = next(t for t, ln in lines if "step 1/" in ln)
    assert ended - saving < 60, ended - saving
    lines = [ln for _, ln in lines]
    proc = subprocess.CompletedProcess(p.args, p.returncode, "", "".join(lines))
    line = assert_one_line(proc, "checkpoint", str(out / "checkpoints" / "1"))
    assert ("did not finish within 3 s" in line) == (mode == "hang"), line
    assert not (out / "checkpoints" / "1").exists()  # (no half checkpoint left to be trusted)


def test_the_lock_holds_through_a_symlinked_name(assets, tmp_path, capsys, monkeypatch):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "parent-link").symlink_to(tmp_path)
    holder = RunLock(real)
    holder.acquire()
    try:
        for other in (tmp_path / "link", tmp_path / "parent-link" / "real"):
            with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
                RunLock(other).acquire()
        # and a trainer started through the link is refused in one line, before writing anything
        from jqlora.train import main

        monkeypatch.chdir(tmp_path)
        assert main(run_args(assets, tmp_path / "link")[1:]) == 2
        err = capsys.readouterr().err
        assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
            ln for ln in err.splitlines() if "is in use by another trainer" in ln], err
        assert os.listdir(real) == []
    finally:
        holder.release()


def test_metrics_records_are_whole_and_a_torn_line_is_skipped(tmp_path, monkeypatch, caplog):
    path = tmp_path / "metrics.jsonl"
    journal.append(path, {"step": 1, "loss": 2.5})
    before = path.read_bytes()
    real_write = os.write

    def short_write(fd, data):  # the disk fills in the middle of the line
        real_write(fd, data[:7])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(journal.JournalError, match="no space left on device"):
        journal.append(path, {"step": 2, "loss": 2.25})
    monkeypatch.setattr(os, "write", real_write)
    assert path.read_bytes() == before  # (the partial record was taken back)
    with open(path, "ab") as f:  # a kill mid-line (no undo possible)
        f.write(b'{"step": 2, "lo')
    assert journal.read(path) == [{"step": 1, "loss": 2.5}]
    assert "line 2 is cut short" in caplog.text
    path.write_bytes(b'{"step": 1}\n{"ste\n{"step": 3}\n')  # a damaged line in the middle is not a torn write
    with pytest.raises(journal.JournalError, match="line 2 is not a JSON record"):
        journal.read(path)


def test_a_torn_metrics_line_then_the_run_resumes(assets, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jqlora.train", *run_args(assets, out)]
    first = subprocess.run([*cmd, "train.stop_at_step=2"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300, env=env())
    assert first.returncode == 0, first.stderr
    with open(out / "metrics.jsonl", "ab") as f:  # what a disk full or a kill mid-append leaves
        f.write(b'{"step": 3, "loss": 1.2')
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env())
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _cfg(assets: Path, out: Path, *more: str):
    from jqlora.config import load_config

    return load_config(None, [a for a in run_args(assets, out, *more) if a != "--no-progress"])


def _flip(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - n, len(data)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_init_state_or_base_is_recomputed_with_a_warning(assets, tmp_path, caplog):
    """LoftQ: init_state/ and base/ carry checksums; 64 flipped bytes in either are never used: the init is computed
    again (the model equals a fresh one) and base/ is written again at export (byte-equal to the clean one)."""
    import jax.numpy as jnp
    import numpy as np

    from jqlora.checkpoints.checksums import verify_checkpoint
    from jqlora.run import Trainer, build_model

    args = ("lora.init=loftq", "lora.loftq_iters=1", "train.max_steps=2")
    out = tmp_path / "run"
    out.mkdir()  # what a kill during the first try's init_state/ left: the run's own, so this start goes ahead
    leftover = out / f".init_state.partial-{os.uname().nodename}-{2**22 + 12345}-abc"
    leftover.mkdir()
    trainer = Trainer(_cfg(assets, out, *args, "train.stop_at_step=1"), progress=False, export=False)
    assert trainer.run() == 0
    assert not leftover.exists()
    for d in ("init_state", "base"):
        assert verify_checkpoint(out / d) is None, d
    clean_base = {p.name: p.read_bytes() for p in (out / "base").iterdir()}
    _flip(out / "init_state" / "model.safetensors")
    x = jnp.asarray(np.random.default_rng(0).integers(0, 512, (1, 9)).astype(np.int32))
    cfg = _cfg(assets, out, *args)
    with caplog.at_level("WARNING"):
        resumed = build_model(cfg, run_dir=str(out))
    assert "does not match its checksum" in caplog.text and "computed again" in caplog.text, caplog.text
    np.testing.assert_array_equal(np.asarray(resumed(x)), np.asarray(build_model(cfg)(x)))  # (= a fresh init)

    # base/ (what the exported adapter names as its base): damaged, then written again from the run's kernels
    _flip(out / "base" / "model.safetensors")
    caplog.clear()
    from jqlora.adapters import init_state
    from jqlora.lora import LoraConfig

    with caplog.at_level("WARNING"):
        init_state.save_adapter(resumed, cfg, out, tmp_path / "adapter", lora_config=LoraConfig.from_config(cfg.lora),
                                base=str(assets / "model"))
    assert "base: not usable" in caplog.text, caplog.text
    assert {p.name: p.read_bytes() for p in (out / "base").iterdir()} == clean_base
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (out / "base").resolve())


def test_a_kill_while_the_run_start_is_written_does_not_brick_the_directory(assets, tmp_path):
    """What a kill during init_state/ or base/ leaves (the complete init_state and the partial folder of a dead
    writer) is the run's own: the same command starts the run, and the leftover is removed."""
    from jqlora.run.directory import dir_kind

    out = tmp_path / "run"
    out.mkdir()
    dead = f".base.partial-{os.uname().nodename}-{2**22 + 12345}-abc"  # (a PID above the kernel's limit: dead)
    (out / dead).mkdir()
    (out / dead / "model.safetensors").write_bytes(b"half")
    (out / "init_state").mkdir()
    (out / "init_state" / "init_state.json").write_text("{}")
    (out / "init_state" / "CHECKSUMS").write_text("{}")
    assert dir_kind(out) == "empty"
    (out / "data.csv").write_text("a,b\n")  # a stranger's file: still foreign
    assert dir_kind(out) == "foreign"
    (out / "data.csv").unlink()
    (out / "init_state" / "CHECKSUMS").unlink()  # (a folder named init_state without our marks is not ours)
    assert dir_kind(out) == "foreign"


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["model", "data"])
def test_overwrite_never_moves_a_folder_the_run_reads(assets, tmp_path, capsys, monkeypatch, target):
    import shutil

    from jqlora.train import main

    model, data = tmp_path / "own" / "model", tmp_path / "own" / "data"
    shutil.copytree(assets / "model", model)
    data.mkdir()
    shutil.copy(assets / "train.jsonl", data / "train.jsonl")
    (data / "unrelated.csv").write_text("a,b\n1,2\n")
    out = model if target == "model" else data
    before = {"model": _tree(model), "data": _tree(data)}
    monkeypatch.chdir(tmp_path)
    args = run_args(assets, out, "train.overwrite=true")[1:]
    args = [f"model.path={model}" if a.startswith("model.path=") else f"data.path={data / 'train.jsonl'}"
            if a.startswith("data.path=") else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    key = "model.path" if target == "model" else "data.path"
    assert len(errors) == 1 and key in errors[0] and "nothing was moved" in errors[0], err
    assert {"model": _tree(model), "data": _tree(data)} == before
    siblings = sorted(p.name for p in (tmp_path / "own").iterdir() if not p.name.endswith(".lock"))
    assert siblings == ["data", "model"]  # (no <name>.old-<time>; the lock beside it is the run lock's)


def test_export_holds_its_checkpoint_against_rotation(assets, tmp_path, monkeypatch):
    """The checkpoint an export takes is held (hard links) before it is verified and read: the trainer's rotation
    removing the original right after does not break the export, which equals one of an untouched copy."""
    import shutil

    import jax
    import numpy as np

    from jqlora.adapters import ExportError
    from jqlora.lora import SplitModel
    from jqlora.run import restore

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "jqlora.train", *run_args(assets, out, "train.max_steps=2")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env())
    assert r.returncode == 0, r.stderr
    untouched = tmp_path / "untouched"
    shutil.copytree(out, untouched)
    link = restore._link_tree

    def hold_then_rotate(src, dst):
        link(src, dst)
        shutil.rmtree(src)  # (what train.keep_checkpoints does to the oldest, at any moment)

    monkeypatch.setattr(restore, "_link_tree", hold_then_rotate)
    model, _, step = restore.restore_for_export(out)
    assert step == 2 and not (out / "checkpoints" / "2").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".export-hold-")]  # (the hold is given back)
    monkeypatch.setattr(restore, "_link_tree", link)
    want, _, _ = restore.restore_for_export(untouched)
    got_leaves, want_leaves = (jax.tree.leaves(SplitModel.of(m).lora) for m in (model, want))
    assert len(got_leaves) == len(want_leaves) > 0
    for a, b in zip(got_leaves, want_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def rotated_before(src, dst):
        shutil.rmtree(src)
        link(src, dst)

    monkeypatch.setattr(restore, "_link_tree", rotated_before)
    with pytest.raises(ExportError, match="removed while the export was taking it"):
        restore.restore_for_export(out, step=1)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_honour_the_umask(tmp_path, mask):
    """atomic_directory (adapters, merged and converted models) gives what plain mkdir / open would: 0777 / 0666 less
    the umask, not mkdtemp's / mkstemp's private 0700 / 0600."""
    import stat
    import tempfile

    from jqlora.checkpoints import atomic_directory

    old = os.umask(mask)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "a.json").write_text("{}")
            fd, name = tempfile.mkstemp(dir=tmp)  # (a writer that goes through mkstemp: 0600)
            os.close(fd)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "out", *(tmp_path / "out").rglob("*")]}
    assert modes.pop("out") == modes.pop("out/sub") == 0o777 & ~mask
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_loss_png_that_cannot_be_written_is_one_warning_and_the_run_goes_on(tmp_path, caplog):
    # a full disk at loss.png (here: its temporary name taken by a folder, so the write fails) must not end the run
    # with a traceback before the checkpoint's own disk-full check can say its one line
    from jqlora.run import RunDir

    for step, loss in ((1, 2.0), (2, 1.5)):
        journal.append(str(tmp_path / "metrics.jsonl"), {"step": step, "loss": loss})
    run = RunDir(tmp_path, create=False)
    run.plot()
    before = (tmp_path / "loss.png").read_bytes()
    (tmp_path / "loss.png.tmp").mkdir()
    with caplog.at_level("WARNING"):
        run.plot()
        run.plot()
    assert (tmp_path / "loss.png").read_bytes() == before
    warned = [r.getMessage() for r in caplog.records if "loss.png" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("warning:"), warned
