"""What every fault case shares: running the CLIs in fresh processes, recording a case, the one-line check."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo"
RESULTS: list[tuple[str, bool, str]] = []


def case(name: str):
    def wrap(fn):
        def run(*a, **k):
            try:
                why = fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - a case that breaks is a case that did not hold
                why = f"{type(e).__name__}: {e}"
            RESULTS.append((name, why is None, why or ""))
            print(f"{'held' if why is None else 'NOT HELD'}  {name}" + (f"  ({why})" if why else ""), flush=True)
        return run
    return wrap


def cli(module: str, *args, timeout: int = 900, cwd: Path = REPO, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", f"jqlora.{module}", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def popen(module: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"jqlora.{module}", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_error(proc: subprocess.CompletedProcess, *needles: str) -> str | None:
    """None if ``proc`` failed with exactly one 'error:' line holding every needle and no traceback."""
    if proc.returncode == 0:
        return "exit 0"
    if "Traceback" in proc.stderr:
        return "traceback: " + proc.stderr.strip().splitlines()[-1]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    if len(errors) != 1:
        return f"{len(errors)} error lines"
    missing = [n for n in needles if n not in errors[0]]
    return f"{missing} not in {errors[0]!r}" if missing else None


def poisoned_copy(model: Path, dst: Path, key: str, index: tuple[int, int]) -> Path:
    """A copy of ``model`` at ``dst`` with one NaN in tensor ``key`` at ``index`` (read through torch: the demo model
    is bfloat16, which numpy has no type for)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(model, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[key] = tensors[key].clone()
    tensors[key][index] = float("nan")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
