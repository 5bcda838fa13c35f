"""Time to the first training step and to the first generated token, cold (an empty compilation cache) and warm
(the second run, reading the programs the first one wrote), in fresh processes on the embedded demo.

    python tools/first_step.py [--steps 3] [--max-new-tokens 24] [--repeat 1] [--cache-dir DIR]

`python -m jqlora.train` runs the demo for ``--steps`` steps; its "first step done" line is timed from the process'
spawn (and the trainer's own figure, from the CLI's start, is shown too). `python -m jqlora.generate` answers the
demo's question; its first output byte is the first token. Each command gets its own cache folder
(`JQLORA_CACHE_DIR`), so a cold run is really cold. The load average is printed: on a shared machine it is most of
the variance. (Timing is measured here, never asserted in a test.)
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_STEP = re.compile(r"first step done ([\d.]+) s after start")


def _run(cmd: list[str], env: dict[str, str], marker) -> tuple[float | None, float, str, int]:
    """(seconds from spawn to the first output ``marker`` accepts, total seconds, that output, exit status)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    seen, buf, found = None, {"out": b"", "err": b""}, ""
    open_streams = 2
    while open_streams:
        for key, _ in sel.select():
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            buf[key.data] += chunk
            if seen is None:
                hit = marker(key.data, buf[key.data].decode("utf-8", "replace"))
                if hit is not None:
                    seen, found = time.perf_counter() - t0, hit
    rc = proc.wait()
    total = time.perf_counter() - t0
    if rc != 0:
        sys.stderr.write(buf["err"].decode("utf-8", "replace")[-3000:])
    return seen, total, found, rc


def _train_marker(stream: str, text: str) -> str | None:
    m = FIRST_STEP.search(text) if stream == "err" else None
    return m[1] if m else None


def _token_marker(stream: str, text: str) -> str | None:
    return "" if stream == "out" and text.strip() else None


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="training steps of the demo run")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=1, help="warm runs after the cold one (the best is shown)")
    ap.add_argument("--cache-dir", help="the folder for the caches (default: a temporary one, removed after)")
    args = ap.parse_args(argv)
    print(f"{os.cpu_count()} CPUs; load average {_load()} (1, 5, 15 min)")
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                "JQLORA_COMPILATION_CACHE": "1"}
    base_env.pop("JAX_COMPILATION_CACHE_DIR", None)
    with tempfile.TemporaryDirectory(prefix="jqlora-first-step-") as tmp:
        root = Path(args.cache_dir or tmp)
        jobs = {
            "train (first step)": (lambda i: ["-m", "jqlora.train", f"train.max_steps={args.steps}",
                                              f"output_dir={Path(tmp) / f'run{i}'}", "--no-progress"], _train_marker),
            "generate (first token)": (lambda i: ["-m", "jqlora.generate", "--model", str(REPO / "assets/demo/model"),
                                                  "--prompt", "What is the capital of France?", "--max-new-tokens",
                                                  str(args.max_new_tokens)], _token_marker),
        }
        for name, (cmd, marker) in jobs.items():
            env = {**base_env, "JQLORA_CACHE_DIR": str(root / name.split()[0])}
            for i in range(1 + args.repeat):
                first, total, inner, rc = _run(cmd(i), env, marker)
                label = "cold" if i == 0 else "warm"
                shown = f"{first:6.1f} s" if first is not None else "   n/a  "
                extra = f" (trainer's own figure {inner} s)" if inner else ""
                print(f"{name:24s} {label}: {shown} from spawn, {total:6.1f} s in all{extra}  (exit {rc}, "
                      f"load {_load()})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
