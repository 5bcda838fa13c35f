"""The CI smoke of tools/fault_battery.py: the kill -9 loops (training, convert, export --merge) once each, the quick
cases (``--only fast``) and, where a tmpfs can be mounted (root), the disk-full case, run as the tool runs them (the
real CLIs in fresh processes on the demo model). Every case must hold: its exit code, one line without a traceback
naming the culprit, older outputs byte-identical, a killed-and-restarted run equal to an uninterrupted one.

The full battery (every group, several kills each) is the tool itself: ``python tools/fault_battery.py``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from fault_edges import FAST  # noqa: E402

KILLS = ("kill_training", "kill_convert", "kill_merge")


def _tmpfs_mounts(where: Path) -> bool:
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        return False
    subprocess.run(["umount", str(where)], check=True)
    return True


def test_kill_loops_once_fast_cases_and_disk_full_all_hold(tmp_path):
    groups = ["kill", "fast"] + (["disk_full"] if _tmpfs_mounts(tmp_path / "probe") else [])
    r = subprocess.run([sys.executable, str(REPO / "tools" / "fault_battery.py"), "--kills", "1", "--only",
                        ",".join(groups), "--workdir", str(tmp_path / "work")],
                       cwd=REPO, capture_output=True, text=True, timeout=1500)
    lines = r.stdout.splitlines()
    cases = [ln for ln in lines if ln.startswith(("held  ", "NOT HELD  "))]
    failed = [ln for ln in cases if ln.startswith("NOT HELD")]
    assert not failed, "\n".join(failed) + "\n" + r.stderr[-3000:]
    # one case per selected group (each of these groups is one case), and the tool's own tally agrees
    expected = len(KILLS) + len(FAST) + ("disk_full" in groups)
    assert len(cases) == expected, r.stdout
    assert re.fullmatch(rf"{expected}/{expected} cases held", lines[-1]), lines[-1:]
    assert r.returncode == 0, r.stderr[-3000:]
