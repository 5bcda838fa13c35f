"""Run a test file's ``--worker`` part in a fresh interpreter with N host CPU devices (JAX fixes the device count at
start), and read back the JSON line it prints last: the 8-device tests' shared fixture body."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_worker(test_file: str, devices: int, timeout: int) -> dict:
    # (the optimization-level flags only make XLA compile faster; both sides of every comparison use them)
    flags = (f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, test_file, "--worker"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
