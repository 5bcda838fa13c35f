"""Faults, round two (issue 27): a save that fails or never finishes, a lock reached through a symlink, a torn
metrics line, unverified init_state/ and base/, overwrite onto a folder the run reads, export against rotation,
private outputs, and one-line errors at the edges. Each goes through the CLI (or its main) as a user hits it and
checks the exit code, the one line, and that what was there before is byte-identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jqlora.run import journal
from jqlora.run.lock import RunLock, RunLockedError

REPO = Path(__file__).resolve().parents[2]

# A trainer whose orbax save fails (raise) or never finishes (hang), from inside orbax's background thread.
_SAVE_FAULT = """
import asyncio, sys
from orbax.checkpoint._src.path import atomicity
mode = sys.argv.pop(1)
async def finalize(self, *a, **k):
    if mode == "hang":
        await asyncio.sleep(3600)
    raise FileNotFoundError(2, "No such file or directory", str(self.get()))
atomicity.AtomicRenameTemporaryPath.finalize = finalize
from jqlora.train import main
sys.exit(main(sys.argv[1:]))
"""


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
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _SAVE_FAULT, mode, *run_args(assets, out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env(JQLORA_SAVE_TIMEOUT_S="3"))
    took = time.monotonic() - t0
    assert took < 60, took
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
