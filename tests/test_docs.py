"""The docs say only what runs: the README's test command is the one `.ci/run` runs; every `python -m jqlora.X` and
`python tools/X.py` command in the README and docs/ names a command that exists, with flags its `--help` lists and
config keys the schema has; every file the docs name and every link between them exists."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from jqlora.config import Config, config_to_dict

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = ("model", "lora", "data", "train", "mesh", "log")


def _commands(text: str) -> list[str]:
    """Commands in ```bash blocks (continuation lines joined, comments cut) and in `inline code`."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        out += [line.split(" #")[0].strip() for line in joined.splitlines()]
    out += re.findall(r"`(python (?:-m jqlora\.|tools/)[^`]*)`", text)
    found = []
    for line in out:
        m = re.search(r"python3? (-m jqlora\.[a-z_]+(?=\s|$)|tools/[\w-]+\.py)(.*)$", line)
        if m:
            found.append((m.group(1), m.group(2)))
    return found


COMMANDS = sorted({(doc.name, *c) for doc in DOCS for c in _commands(doc.read_text())})


@functools.cache
def _help(program: str) -> str:
    args = ["-m", program[3:]] if program.startswith("-m ") else [str(REPO / program)]
    r = subprocess.run([sys.executable, *args, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{program} --help: {r.stderr[-2000:]}"
    return r.stdout


def _schema_keys() -> set[str]:
    tree = config_to_dict(Config())
    return {f"{s}.{k}" for s in SECTIONS for k in tree[s]} | {k for k in tree if k not in SECTIONS}


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    # (.ci/run names its venvs .ci-venv*, and finds a Python 3.12 that pyenv may not have selected)
    ci = (REPO / ".ci" / "run").read_text().replace(".ci-venv", ".venv").replace('"${PY312[@]}"', "python3.12")
    lines = [x for x in re.findall(r"```bash\n(.*?)```", readme, re.S)[1].splitlines() if "pytest" in x]
    assert len(lines) == 2
    for line in lines:
        assert line in ci, line


def test_the_docs_name_commands():
    programs = {p for _, p, _ in COMMANDS}
    assert {"-m jqlora.train", "-m jqlora.convert", "-m jqlora.export", "-m jqlora.generate",
            "-m jqlora.plan"} <= programs


@pytest.mark.parametrize("doc,program,args", COMMANDS)
def test_documented_command_runs_with_those_flags(doc, program, args):
    helptext = _help(program)
    words = shlex.split(args.replace("'{", "'").replace("}'", "'").replace("...", ""), posix=True)
    for flag in (w.split("=")[0] for w in words if w.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helptext), f"{doc}: {program} has no {flag}"
    if program == "-m jqlora.train" or (program == "-m jqlora.plan" and "--config" in words):
        keys = _schema_keys()
        for w in words:
            key = w.split("=", 1)[0]
            if "=" in w and not w.startswith("-") and (key.split(".")[0] in SECTIONS or key in keys):
                assert key in keys, f"{doc}: {program} {w}: no config key {key}"


PATH_RE = re.compile(r"`((?:jqlora|tests|tools|configs|assets|docs)/[\w./-]*)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_files_and_links_exist(doc):
    text = doc.read_text()
    for path in PATH_RE.findall(text):
        if "<" in path or "*" in path:
            continue
        assert (REPO / path.rstrip("/")).exists(), f"{doc.name} names {path}, which does not exist"
    for link in re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", text):
        assert (doc.parent / link).is_file(), f"{doc.name} links to {link}, which does not exist"
