"""A user's recipe run through `python -m jqlora.train`, as the README has it (issue 12): it reads nothing of the demo
and evaluates on its own held-out data; its progress shows in a log that is not a terminal; SIGINT stops it with a
checkpoint and exit code 130 and a rerun resumes it; a run into another run's (or a stranger's) directory, or a
resume with a changed config, is one line and changes nothing; and the adapter, trained on a jqlora-converted base
from a relative path, names the original checkpoint, so peft loads it from any directory."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from jqlora.data import stats
from jqlora import train as T
from jqlora.config import load_config
from jqlora.data import build_datasets, load_tokenizer
from jqlora.run import open_run_dir

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "llama3-8b.yaml"
ARGS = ["model.path=base-nf4", "data.path=chat.jsonl", "model.dtype=float32", "data.max_length=48",
        "data.packing=false", "train.batch_size=2", "train.grad_accum_steps=2", "train.max_steps=6",
        "train.log_every=2", "train.eval_every=2", "train.save_every=1", "train.remat=none", "train.eval_samples=1",
        "output_dir=run"]


def _digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _cli(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "jqlora.train", "--config", str(RECIPE), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def work(assets, tmp_path_factory) -> Path:
    """A working directory with the user's data and a jqlora-converted copy of the base, both relative."""
    from jqlora.checkpoints import convert

    work = tmp_path_factory.mktemp("user")
    (work / "chat.jsonl").write_text((assets / "train.jsonl").read_text())
    convert(assets / "model", work / "base-nf4", dtype="float32")
    return work


@pytest.fixture(scope="module")
def interrupted_then_resumed(work) -> dict:
    """The recipe run, stopped by SIGINT after its first log line, then run again to the end (stderr is a pipe)."""
    proc = _cli(work, *ARGS)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("step 2/6"):
            proc.send_signal(signal.SIGINT)
            break
    rest_out, rest_err = proc.communicate(timeout=600)
    first = {"rc": proc.returncode, "stderr": "".join(lines) + rest_err}
    # The second run as a user starts it on a cluster: `nohup python -m jqlora.train ... > log 2>&1`, no terminal.
    log = work / "nohup.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as f:
        rc = subprocess.run(["nohup", sys.executable, "-m", "jqlora.train", "--config", str(RECIPE), *ARGS], cwd=work,
                            env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode
    err = log.read_text()
    return {"first": first, "second": {"rc": rc, "stderr": err, "stdout": err}}


def test_recipe_run_logs_resumes_and_reads_nothing_of_the_demo(work, interrupted_then_resumed):
    first, second = interrupted_then_resumed["first"], interrupted_then_resumed["second"]
    # defect 8: SIGINT exits 130 (with a checkpoint); defect 4: progress lines in a log that is not a terminal
    assert first["rc"] == 130 and "SIGINT: stopped at step" in first["stderr"], first["stderr"][-3000:]
    line = re.compile(r"^step 2/6 loss \d+\.\d{4} lr \S+ grad_norm \d+\.\d{3} tok/s \d+ trained_tokens \d+ eta \S+$",
                      re.M)
    assert line.search(first["stderr"]), first["stderr"][-3000:]
    evals = re.compile(r"^eval step 2: loss \d+\.\d{4}, perplexity \S+, token accuracy [01]\.\d{4}$", re.M)
    assert evals.search(first["stderr"]), first["stderr"][-3000:]
    assert "warning: train.warmup_steps=30 >= the run's 6 optimizer steps" in first["stderr"]
    assert second["rc"] == 0 and "resumed from run at step" in second["stderr"], second["stderr"][-3000:]
    assert re.search(r"^step 6/6 loss", second["stderr"], re.M)
    # defect 1: nothing of the demo; the recipe's own eval_fraction holds out the user's data
    saved = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert "assets/demo" not in json.dumps(saved) and "assets/demo" not in first["stderr"] + second["stderr"]
    assert saved["data"]["eval_path"] is None and saved["data"]["eval_fraction"] == 0.02
    assert saved["train"]["sample_prompt"] is None
    assert saved["model"]["path"] == str(work / "base-nf4")  # absolute: the run dir names it from anywhere
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == [2, 4, 6] and [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4, 6]
    tokens = [r["trained_tokens"] for r in rows if "loss" in r]  # cumulative over the run, resume included
    assert 0 < tokens[0] < tokens[1] < tokens[2]
    for r in rows:
        if "eval_loss" in r:
            np.testing.assert_allclose(r["eval_perplexity"], np.exp(r["eval_loss"]), rtol=1e-12)
            assert 0.0 <= r["eval_accuracy"] <= 1.0
    samples = [r["eval_samples"] for r in rows if "eval_loss" in r]
    assert all(len(x) == 1 and x[0]["prompt"].startswith("user") and "reply" in x[0] for x in samples), samples
    # TensorBoard: the same numbers as metrics.jsonl, once per step across the two sessions
    tb = _tensorboard_scalars(work / "run" / "tensorboard")
    assert sorted(tb["train/loss"]) == [2, 4, 6] and sorted(tb["eval/loss"]) == [0, 2, 4, 6]
    for r in rows:
        for key, tag in (("loss", "train/loss"), ("eval_loss", "eval/loss"), ("grad_norm", "train/grad_norm")):
            if key in r:
                np.testing.assert_allclose(tb[tag][r["step"]], r[key], rtol=1e-6)


def _tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the event files (TFRecord framing: length, crc, Event proto, crc), later files winning."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data, at = f.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_dry_run_shows_the_user_data_and_writes_nothing(work):
    proc = _cli(work, *ARGS[:-1], "output_dir=never", "--dry-run")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "eval (0.02 of the training examples): 1 rows" in out and "train (" in out and "11 rows" in out, out
    assert "[[" in out and "]]" in out  # a rendered example with its trained tokens marked
    assert "total per device" in out and "assets/demo" not in out
    assert not (work / "never").exists()


def _main(capsys, work, monkeypatch, *args):
    monkeypatch.chdir(work)
    rc = T.main(["--no-progress", "--config", str(RECIPE), *args])
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("change, message", [
    ("train.resume=false", "train.resume=false would mix two runs"),  # defect 2
    ("lora.r=8", "cannot resume with a changed config: lora.r 16 -> 8"),  # defect 3
    ("data.path=base-nf4/config.json", "data.path"),
])
def test_foreign_or_changed_run_is_one_line_and_changes_nothing(work, interrupted_then_resumed, capsys, monkeypatch,
                                                                change, message):
    before = _digest(work / "run")
    rc, err = _main(capsys, work, monkeypatch, *ARGS, change)
    assert rc == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert _digest(work / "run") == before


def test_a_directory_that_is_not_a_run_is_refused_or_moved_aside(work, capsys, monkeypatch, tmp_path):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    rc, err = _main(capsys, work, monkeypatch, *ARGS[:-1], f"output_dir={stranger}")
    assert rc == 2 and len(err.splitlines()) == 1 and "not a jqlora run" in err, err
    assert _digest(stranger) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    cfg = load_config(None, ["model.path=m", "data.path=d", f"output_dir={stranger}", "train.overwrite=true"])
    run_dir, note = open_run_dir(cfg)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("stranger.old-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine" and str(aside[0]) in note
    assert os.listdir(stranger) == [] and run_dir.out == str(stranger)


def test_adapter_on_a_converted_base_loads_in_peft_from_anywhere(work, interrupted_then_resumed, assets, tmp_path,
                                                                 monkeypatch):
    """defect 5: base_model_name_or_path is the original checkpoint, not the relative path of its 4-bit copy."""
    from peft import AutoPeftModelForCausalLM

    from jqlora import load_model

    adapter = work / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((assets / "model").resolve())
    assert f"It needs the base model `{(assets / 'model').resolve()}`" in (adapter / "README.md").read_text()
    x = np.random.default_rng(0).integers(0, 512, (2, 10)).astype(np.int32)
    # oracle: jqlora's float32 model of the original HF base with this adapter
    ours = np.asarray(load_model(str(assets / "model"), quant="none", dtype="float32", adapter=str(adapter))(
        jnp.asarray(x)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.from_numpy(x).long()).logits.numpy()
    np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)


def test_quiet_wrong_settings_warn(assets):
    """defect 8: warmup past the run, less than one epoch of a small dataset, every row truncated."""
    tok = load_tokenizer(str(assets / "model"))
    cfg = load_config(None, [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}",
                             "data.max_length=15", "train.max_steps=2", "train.warmup_steps=2", "train.batch_size=2",
                             "train.grad_accum_steps=1"])
    train_ds, _ = build_datasets(cfg.data, tok)
    lines = stats.settings_warnings(cfg, train_ds, 2)
    assert len(lines) == 3, lines
    assert "warmup_steps=2 >= the run's 2" in lines[0]
    assert f"sees 4 of the {len(train_ds)} training rows" in lines[1]
    assert f"every one of the {len(train_ds.examples)} training examples is cut" in lines[2]
    ok = load_config(None, [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}",
                            "data.max_length=48", "train.max_steps=20", "train.warmup_steps=2"])
    train_ds, _ = build_datasets(ok.data, tok)
    assert stats.settings_warnings(ok, train_ds, 20) == []


def test_help_lists_the_config_schema():
    proc = subprocess.run([sys.executable, "-m", "jqlora.train", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "jax" not in proc.stderr
    for key in ("model.path = null", "train.learning_rate = 0.0002  -- peak learning rate", "train.overwrite = false",
                "data.eval_fraction = 0.0"):
        assert key in proc.stdout, proc.stdout


def test_wandb_asked_for_without_the_package_is_one_line(work, capsys, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    rc, err = _main(capsys, work, monkeypatch, *ARGS[:-1], "log.wandb=true", f"output_dir={tmp_path / 'w'}")
    assert rc == 2 and len(err.splitlines()) == 1 and "log.wandb=true needs the wandb package" in err, err
