"""A run directory written before the package moved into wings resumes after it, and the resumed run equals an
uninterrupted one of today's code.

``tests/fixtures/flat_layout_run`` was written by ``python -m jqlora.train`` at commit d96db11 (the flat layout) on
the demo model and data with the overrides below plus ``train.stop_at_step=2``: its ``config.yaml``,
``metrics.jsonl`` and the orbax checkpoint of step 2 are as that run left them, except the absolute paths of the
demo assets, which the test points at this checkout.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "flat_layout_run"
ARGS = ["lora.r=2", "train.batch_size=2", "train.grad_accum_steps=1", "data.max_length=48", "train.max_steps=4",
        "train.save_every=0", "train.keep_checkpoints=1", "train.eval_every=0", "data.eval_path=null",
        "train.sample_prompt=null", "train.eval_samples=0", "log.tensorboard=false", "train.log_every=1"]


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jqlora.train", "--no-progress", *ARGS, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_a_run_from_the_flat_layout_resumes_and_equals_an_uninterrupted_one(tmp_path):
    old, straight = tmp_path / "old", tmp_path / "straight"
    shutil.copytree(FIXTURE, old)
    saved = yaml.safe_load((old / "config.yaml").read_text())
    saved["model"]["path"] = str(REPO / "assets" / "demo" / "model")
    saved["data"]["path"] = str(REPO / "assets" / "demo" / "chat.jsonl")
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    before = losses(old)
    assert sorted(before) == [1, 2]

    resumed = train(f"output_dir={old}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr, resumed.stderr
    assert train(f"output_dir={straight}").returncode == 0

    # the steps the old code ran are the steps today's code runs, and the resumed steps equal the uninterrupted ones
    want = losses(straight)
    got = losses(old)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    # Steps 1-2 of the fixture were computed on another machine, whose XLA CPU code rounds float32 sums differently
    # (1.2e-7 in one adapter element on an AMD EPYC with AVX-512): the tolerance is 1e-6. A resume that got anything
    # wrong (data position, optimizer state, schedule) moves the adapter by about one Adam step, lr = 2e-3.
    np.testing.assert_allclose([got[s] for s in (1, 2)], [want[s] for s in (1, 2)], rtol=1e-6)
    np.testing.assert_allclose([got[s] for s in (3, 4)], [want[s] for s in (3, 4)], rtol=1e-6)
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(old / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-6, err_msg=k)
