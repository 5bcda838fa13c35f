"""Every ``python -m jqlora.<cli>`` piped into a reader that stops early (``| head -3``) ends quietly (issue 28): no
BrokenPipeError traceback, nothing on stderr, exit 141 (128 + SIGPIPE, what a shell reports) or 0 (the output fit
in the pipe before the reader left). Deterministic: the CLI writes into a pipe whose reading end is already closed,
so its first write to stdout (or the flush at exit) meets the closed pipe; plus the issue's own shell pipeline."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _closed_pipe_run(*args: str) -> subprocess.CompletedProcess:
    read, write = os.pipe()
    os.close(read)  # (the reader is gone before the first line)
    try:
        return subprocess.run([sys.executable, *args], stdout=write, stderr=subprocess.PIPE, text=True, env=ENV,
                              cwd=REPO, timeout=300)
    finally:
        os.close(write)


CLIS = ("train", "convert", "export", "generate", "eval", "plan")


def test_every_cli_ends_through_the_shared_helper():
    """Each CLI's ``if __name__ == "__main__":`` block is `jqlora.cli.run(main)` (one helper, not six copies), so what
    the runs below show for plan, train and convert holds for export, generate and eval too."""
    for cli in CLIS:
        tree = ast.parse((REPO / "jqlora" / f"{cli}.py").read_text())
        blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert len(blocks) == 1, cli
        body = ast.unparse(blocks[0])
        assert "from jqlora.cli import run" in body and "run(main)" in body and "sys.exit" not in body, (cli, body)


@pytest.mark.parametrize("cli", CLIS)
def test_help_into_a_closed_pipe_is_quiet(cli):
    proc = _closed_pipe_run("-m", f"jqlora.{cli}", "--help")  # (argparse itself ignores the failed write)
    assert proc.stderr == "" and proc.returncode in (0, 141), (proc.returncode, proc.stderr[-2000:])


def test_a_conversion_into_a_closed_pipe_is_quiet(tmp_path):
    proc = _closed_pipe_run("-m", "jqlora.convert", str(REPO / "assets" / "demo" / "model"), str(tmp_path / "dst"))
    assert proc.stderr == "" and proc.returncode == 141, (proc.returncode, proc.stderr[-2000:])
    assert (tmp_path / "dst" / "jqlora.json").is_file()  # (the work was done: only the last line went nowhere)


def test_a_plan_into_a_closed_pipe_is_quiet():
    proc = _closed_pipe_run("-m", "jqlora.plan", "--model", "llama3-8b")
    assert proc.stderr == "" and proc.returncode == 141, (proc.returncode, proc.stderr[-2000:])


def test_plan_piped_into_head_as_the_issue_did():
    proc = subprocess.run(f"set -o pipefail; {sys.executable} -m jqlora.plan --model llama3-8b | head -3",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=300)
    assert proc.stderr == "" and proc.returncode in (0, 141), (proc.returncode, proc.stderr[-2000:])
    assert len(proc.stdout.splitlines()) == 3 and proc.stdout.startswith("Llama-3-8B: "), proc.stdout


def test_a_dry_run_into_a_closed_pipe_is_quiet(tmp_path):
    proc = _closed_pipe_run("-m", "jqlora.train", "--dry-run", f"output_dir={tmp_path / 'run'}")  # (the demo)
    assert proc.stderr == "" and proc.returncode == 141, (proc.returncode, proc.stderr[-2000:])
