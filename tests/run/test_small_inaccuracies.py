"""Issue 28, item 6, through the CLIs: a run on a `convert --format bnb` base, killed with SIGKILL after its second log
window, has every metrics.jsonl record in TensorBoard and a loss.png already (both written at each window), said
"took over the stale lock" with the lock's path as output_dir was given (relative); resumed to the end, its adapter
names the original checkpoint as its base, not the bnb copy (and so does `jqlora.export` of the run). An
output_dir that is a file is one line."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jqlora import convert as C
from jqlora import export as E
from jqlora import train as T

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_runs import _tensorboard_scalars  # noqa: E402  (the event-file reader, TFRecord framing)

ARGS = ["--no-progress", "model.path=base-bnb", "data.path=chat.jsonl", "model.dtype=float32", "data.max_length=48",
        "data.packing=false", "train.batch_size=2", "train.grad_accum_steps=1", "train.remat=none", "train.log_every=1",
        "train.eval_every=2", "train.save_every=1", "train.warmup_steps=0", "data.eval_fraction=0.2",
        "output_dir=run"]


def _cli(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "jqlora.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def killed_then_resumed(assets, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("bnb")
    (work / "chat.jsonl").write_text((assets / "train.jsonl").read_text())
    assert C.main([str(assets / "model"), str(work / "base-bnb"), "--format", "bnb", "--dtype", "float32"]) == 0
    # a dead trainer's lock (no process holds its flock) beside the run directory
    (work / ".run.lock").write_text(json.dumps({"pid": 999999, "host": "gone-host", "since": "yesterday"}))
    proc = _cli(work, *ARGS, "train.max_steps=6")
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("step 3/6"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=300)
    killed = {"rc": proc.returncode, "stderr": "".join(lines),
              "metrics": [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()],
              "tensorboard": _tensorboard_scalars(work / "run" / "tensorboard"),
              "png": (work / "run" / "loss.png").read_bytes() if (work / "run" / "loss.png").exists() else None}
    second = _cli(work, *ARGS, "train.max_steps=4")
    _, err = second.communicate(timeout=600)
    return {"work": work, "killed": killed, "resumed": {"rc": second.returncode, "stderr": err}}


def test_kill_9_loses_no_tensorboard_record_and_leaves_a_plot(killed_then_resumed):
    killed = killed_then_resumed["killed"]
    assert killed["rc"] == -signal.SIGKILL, killed["stderr"][-3000:]
    rows = killed["metrics"]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert {1, 2, 3} <= set(train) and {0, 2} <= set(evals), rows
    tb = killed["tensorboard"]
    assert set(tb["train/loss"]) == set(train) and set(tb["eval/loss"]) == set(evals), (tb, rows)
    for step, loss in train.items():
        np.testing.assert_allclose(tb["train/loss"][step], loss, rtol=1e-6)
    assert killed["png"] is not None and killed["png"].startswith(b"\x89PNG\r\n\x1a\n")


def test_stale_lock_warning_names_the_lock_as_output_dir_was_given(killed_then_resumed):
    err = killed_then_resumed["killed"]["stderr"]
    line = next(x for x in err.splitlines() if "stale lock" in x)
    assert line == "warning: took over the stale lock of .run.lock (process 999999 on gone-host is gone)", line


def test_adapter_on_a_bnb_conversion_names_the_original(killed_then_resumed, assets):
    resumed, work = killed_then_resumed["resumed"], killed_then_resumed["work"]
    assert resumed["rc"] == 0 and "resumed from run at step" in resumed["stderr"], resumed["stderr"][-3000:]
    config = json.loads((work / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((assets / "model").resolve())


def test_export_of_a_run_on_a_bnb_conversion_names_the_original(killed_then_resumed, assets, tmp_path):
    work = killed_then_resumed["work"]
    assert E.main([str(work / "run"), str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((assets / "model").resolve())
    assert "4-bit copy of the base" in (tmp_path / "adapter" / "README.md").read_text()


def test_output_dir_that_is_a_file_is_one_line(assets, tmp_path, capsys, monkeypatch):
    (tmp_path / "chat.jsonl").write_text((assets / "train.jsonl").read_text())
    (tmp_path / "out").write_text("mine")
    monkeypatch.chdir(tmp_path)
    rc = T.main(["--no-progress", f"model.path={assets / 'model'}", "data.path=chat.jsonl", "output_dir=out"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: output_dir out: is a file, not a directory; choose another output_dir", err
    assert (tmp_path / "out").read_text() == "mine"
    # a file above output_dir (the third trial: "not writable (its lock ...: File exists)" before)
    rc = T.main(["--no-progress", f"model.path={assets / 'model'}", "data.path=chat.jsonl", "output_dir=out/sub/run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: output_dir out/sub/run: out is a file, not a directory; choose another output_dir", err
    assert (tmp_path / "out").read_text() == "mine"
