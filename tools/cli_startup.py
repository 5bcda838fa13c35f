"""Wall time of each CLI's `--help` (and of an argument error), in fresh processes: the issue-12 target is < 1 s.

    python tools/cli_startup.py [--repeat 3]

Prints the best of `--repeat` runs per command. (Timing is measured here, never asserted in a test.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "train --help": ["-m", "jqlora.train", "--help"],
    "train (bad override)": ["-m", "jqlora.train", "train.batch_size=four"],
    "generate --help": ["-m", "jqlora.generate", "--help"],
    "plan --help": ["-m", "jqlora.plan", "--help"],
    "convert --help": ["-m", "jqlora.convert", "--help"],
    "export --help": ["-m", "jqlora.export", "--help"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for name, cmd in COMMANDS.items():
        best, rc = float("inf"), None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            rc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True).returncode
            best = min(best, time.perf_counter() - t0)
        print(f"{name:24s} {best:6.2f} s  (exit {rc}){'' if best < 1.0 else '  over 1 s'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
