"""The lent GPU machine's image, simulated: `tools/gpu_check.sh --smoke` runs every stage with nothing from an index.

The aot venv is pinned to the image's versions (pyproject's `aot` extra: jax 0.11.2 with the cuda13 plugin,
transformers 5.17.0, on Python 3.12). The image lacks omegaconf (+ antlr4), datasets, bitsandbytes and tensorboardX,
which the aot venv holds (the project's base dependencies, which `pip install -e .` needs for the main job and
tests/aot for its configs): so the script runs in a view of this venv without them, a venv whose site-packages
links every entry of this one except those packages' files. There, with PIP_NO_INDEX=1 and the wheels of
`tools/fetch_wheels.sh` carried:
(a) the carried wheels total at most 64 MiB, the device call's carry limit (their sizes on disk);
(b) every stage wrote its row and each is ok: wheels, env, attention, remat_auto, bench_full, bench_save_dots (and
    the auto choice's bench when it is neither);
(c) the env row is the view's: this venv's jax, and omegaconf, datasets, tensorboardX missing while bitsandbytes,
    carried, is not; the attention rows compare the XLA path with itself (0 error); remat auto chose one of the
    ranked policies; every bench row has jqlora's step time and the reference row says why it did not run.
torch (the image has 2.11 CUDA) is not in the view: PyPI's torch for Python 3.12 is the CUDA build (GBs), so the
PyTorch reference's row says torch is missing, as the script designs for a machine without the reference stack.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MISSING = ("omegaconf", "antlr4-python3-runtime", "datasets", "tensorboardX", "bitsandbytes")  # not on the image
CARRY_LIMIT = 64 * 1024 * 1024


def image_view(root: Path) -> Path:
    """A venv at ``root`` whose site-packages links every entry of this interpreter's except the MISSING packages'."""
    site = Path(sysconfig.get_paths()["purelib"])
    drop = set()
    for name in MISSING:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for f in dist.files or ():
            if f.parts and f.parts[0] != "..":
                drop.add(f.parts[0])
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    (view_site,) = root.glob("lib/python*/site-packages")
    for entry in site.iterdir():
        if entry.name not in drop and not (view_site / entry.name).exists():
            (view_site / entry.name).symlink_to(entry)
    return root / "bin" / "python"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    wheels = tmp / "wheels"
    fetched = subprocess.run(["bash", str(REPO / "tools" / "fetch_wheels.sh"), str(wheels)], capture_output=True,
                             text=True, timeout=300)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    python = image_view(tmp / "image")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "JAX_", "XLA_", "PYTHON"))}
    env.update(PYTHON=str(python), PIP_NO_INDEX="1", OUT=str(tmp / "out"), WHEELS=str(wheels), TMPDIR=str(tmp),
               JAX_COMPILATION_CACHE_DIR=str(tmp / "xla"), JAX_PLATFORMS="cpu")
    run = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--smoke"], env=env, capture_output=True,
                         text=True, timeout=600)  # the acceptance: under 10 minutes on CPU
    rows = [json.loads(line) for line in (tmp / "out" / "gpu_check.jsonl").read_text().splitlines() if line.strip()]
    return {"wheels": sorted(wheels.glob("*.whl")), "rows": rows, "log": run.stdout + run.stderr}


def test_carried_wheels_fit_the_carry_limit(smoke):
    sizes = [w.stat().st_size for w in smoke["wheels"]]
    assert sizes and any(w.name.startswith("bitsandbytes-") for w in smoke["wheels"])
    assert sum(sizes) <= CARRY_LIMIT, sizes


def test_every_stage_wrote_an_ok_row(smoke):
    status = {r["stage"]: r["status"] for r in smoke["rows"] if "status" in r}
    (auto,) = [r["choice"] for r in smoke["rows"] if r["stage"] == "remat_auto_choice"]
    want = ["wheels", "env", "attention", "remat_auto", "bench_full", "bench_save_dots"]
    if auto not in ("full", "save_dots"):
        want.append(f"bench_{auto}")
    assert {s: status.get(s) for s in want} == dict.fromkeys(want, "ok"), smoke["log"][-3000:]


def test_rows_are_the_images(smoke):
    rows = smoke["rows"]
    (env,) = [r for r in rows if r["stage"] == "env_info"]
    assert env["jax"] == md.version("jax") and env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"omegaconf", "datasets", "tensorboardX"} <= set(env["missing"]) and "bitsandbytes" not in env["missing"]
    attention = [r for r in rows if r["stage"] == "attention_case"]
    assert sorted(r["case"] for r in attention) == ["causal", "packed", "window"]
    assert all(r["impl"] == "xla" and r["max_abs_err_vs_xla"] == 0 for r in attention)
    (auto,) = [r for r in rows if r["stage"] == "remat_auto_choice"]
    assert auto["ranking"] and any(auto["choice"] in line for line in auto["ranking"])
    bench = [r for r in rows if r["stage"] == "bench_result"]
    assert {r["remat"] for r in bench} >= {"full", "save_dots"}
    assert all(r["jqlora"]["step_ms_median"] > 0 and "error" not in r["jqlora"] for r in bench)
    (full,) = [r for r in bench if r["remat"] == "full"]
    assert "torch" in full["reference"]["skipped"]  # the reference says why: no torch in the view
