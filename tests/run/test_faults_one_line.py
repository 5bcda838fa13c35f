"""Faults, round two (issue 27), the small ones: each is one line naming the culprit and a non-zero exit, never a
traceback: a NaN in a weight that is not quantized, a dataset that is not UTF-8, absurd adapter configs, a malicious
.bin; and the divergence monitor's verdict on a dead model and on the final windows of a run."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jqlora.run.divergence import DivergenceMonitor

REPO = Path(__file__).resolve().parents[2]


def _one_error(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def test_nan_in_the_embedding_is_named(assets, tmp_path, capsys, monkeypatch):
    from safetensors.numpy import load_file, save_file

    from jqlora.train import main

    path = tmp_path / "model"
    shutil.copytree(assets / "model", path)
    tensors = load_file(str(path / "model.safetensors"))
    key = "model.embed_tokens.weight"
    tensors[key] = tensors[key].copy()
    tensors[key][7, 3] = float("nan")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.chdir(tmp_path)
    code = main(["--no-progress", f"model.path={path}", f"data.path={assets / 'train.jsonl'}", "data.max_length=48",
                 f"output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.sample_prompt=null"])
    assert code == 2
    _one_error(capsys.readouterr().err, str(path / "model.safetensors"), key, "1 NaN/Inf")


def test_a_dataset_that_is_not_utf8_is_one_line_with_file_and_line(tmp_path):
    from jqlora.data import DataError
    from jqlora.data.records import read_records

    path = tmp_path / "chat.jsonl"
    good = json.dumps({"text": "fine"}).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + b'{"text": "caf\xe9 au lait"}\n')  # (latin-1 é)
    with pytest.raises(DataError) as e:
        read_records(str(path))
    assert str(e.value) == f"{path}:3: not valid UTF-8 (byte 0xe9 at column 14); save the file as UTF-8"


@pytest.mark.parametrize("key,value", [("r", "Infinity"), ("r", "NaN"), ("r", "4.5"), ("lora_alpha", "Infinity"),
                                       ("lora_alpha", "NaN"), ("alpha_pattern", '{"q_proj": NaN}')])
def test_absurd_adapter_configs_are_one_line(tmp_path, key, value):
    from jqlora.adapters import AdapterError, read_adapter_config

    d = tmp_path / "adapter"
    d.mkdir()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    text = json.dumps({**config, key: "@"}).replace('"@"', value)
    (d / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterError) as e:
        read_adapter_config(d)
    line = str(e.value)
    assert "\n" not in line and "adapter_config.json" in line and "positive finite" in line, line
    assert (key if key != "alpha_pattern" else "lora_alpha of q_proj") in line, line


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_malicious_bin_is_one_short_line(assets, tmp_path, capsys, monkeypatch):
    import torch

    from jqlora.convert import main

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(assets / "model" / "config.json", model / "config.json")
    torch.save({"model.embed_tokens.weight": _Evil()}, model / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    assert main([str(model), str(tmp_path / "out")]) != 0
    line = _one_error(capsys.readouterr().err, "pytorch_model.bin", "refused", "posix.system")
    assert "weights_only=False" not in line and len(line.replace(str(model), "")) < 300, line  # (the path aside)
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "out").exists()


def test_the_codebooks_are_found_from_any_working_directory(tmp_path):
    """From a folder that holds a checkout named jqlora (so ``jqlora`` there is a namespace package over it) the
    codebooks still load, and NF4's equals bitsandbytes' table."""
    (tmp_path / "jqlora").symlink_to(REPO)
    code = ("import numpy as np, bitsandbytes.functional as F; from jqlora.quant import blockwise as b;"
            "books = b._load_codebooks(); want = F.get_4bit_type('nf4', device='cpu').numpy();"
            "print(float(np.abs(books['nf4'] - want).max()))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip().splitlines()[-1]) == 0.0


def test_a_dead_model_at_ln_v_is_conclusive_in_one_window_and_the_end_is_judged():
    ln_v = math.log(512)
    m = DivergenceMonitor(uniform_loss=ln_v)
    assert m.update(1, 6.3, 0, grad_norm=4.0) is None  # (the early window)
    assert m.update(2, ln_v, 1, grad_norm=0.0) is not None  # ln V with nothing left to learn: dead, at once
    m = DivergenceMonitor(uniform_loss=ln_v)
    assert "gradient norm of exactly 0" in m.update(1, ln_v + 1e-5, 0, grad_norm=0.0)  # (even in the first window)
    m = DivergenceMonitor(uniform_loss=ln_v)
    m.update(1, 6.3, 0, grad_norm=4.0)
    assert m.update(2, ln_v, 1, grad_norm=0.5) is None  # at ln V but still learning: one window is not enough,
    assert m.finish() is None  # ... nor is it at the end (a random model's loss is near ln V too)
    assert m.update(3, 25.0, 2, grad_norm=0.5) is None  # far above the early loss: 2 windows of 3
    assert "final 2 log window(s), since step 1" in m.finish()  # ... and the run ends there: not all well
    m.update(4, 5.0, 3, grad_norm=3.0)
    assert m.finish() is None  # (back to normal before the end)


def test_a_run_that_collapses_in_a_few_steps_does_not_end_all_well(assets, tmp_path):
    """lr 1e4: the loss sits at ln V with a gradient norm of exactly 0 by step 3; that window alone stops the run
    (exit 1, the last good checkpoint named, nothing exported), long before 3 windows could."""
    out = tmp_path / "run"
    args = [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}", f"output_dir={out}",
            "data.max_length=48", "lora.r=4", "train.max_steps=6", "train.save_every=1", "train.sample_prompt=null",
            "train.batch_size=2", "train.grad_accum_steps=1", "train.log_every=1", "train.eval_every=0",
            "train.learning_rate=1e4", "train.warmup_steps=0"]
    r = subprocess.run([sys.executable, "-m", "jqlora.train", "--no-progress", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1, r.stderr
    _one_error(r.stderr, "gradient norm of exactly 0", "last good checkpoint")
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) < 6 and not (out / "adapter").exists()
