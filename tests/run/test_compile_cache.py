"""The CLIs' persistent compilation cache (jqlora/compile_cache.py): where it goes, that a second `jqlora.generate`
run reads its programs from it (JAX's own cache-hit events, counted in the subprocess), and that a folder that
cannot be written costs one warning line, never the run."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jaxlib

import jqlora
from jqlora import compile_cache

REPO = Path(__file__).resolve().parents[2]
# generate's CLI in a fresh process, reporting JAX's persistent-cache events (hits, and programs compiled with the
# cache in use) on its last stderr line
RUN = """
import sys
from jax import monitoring
seen = {"hits": 0, "requests": 0}
def count(event, **_):
    if event == "/jax/compilation_cache/cache_hits":
        seen["hits"] += 1
    elif event == "/jax/compilation_cache/compile_requests_use_cache":
        seen["requests"] += 1
monitoring.register_event_listener(count)
from jqlora import generate
code = generate.main(sys.argv[1:])
print("CACHE", seen["hits"], seen["requests"], file=sys.stderr)
sys.exit(code)
"""


def _generate(model: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, int, int]:
    args = ["--model", str(model), "--prompt", "hello there", "--raw", "--max-new-tokens", "3", "--quant", "nf4",
            "--dtype", "float32"]
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    r = subprocess.run([sys.executable, "-c", RUN, *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1].split()
    assert last[0] == "CACHE", r.stderr[-2000:]
    return r, int(last[1]), int(last[2])


def test_cache_folder_is_keyed_by_versions(monkeypatch, tmp_path):
    monkeypatch.setenv("JQLORA_CACHE_DIR", str(tmp_path / "c"))
    assert compile_cache.cache_dir() == str(tmp_path / "c" / "xla" / (
        f"jqlora-{jqlora.__version__}-jax-{jax.__version__}-jaxlib-{jaxlib.__version__}"))
    monkeypatch.delenv("JQLORA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.base_dir() == str(tmp_path / "xdg" / "jqlora")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.base_dir() == str(tmp_path / "home" / ".cache" / "jqlora")
    before = jax.config.jax_compilation_cache_dir
    for off in ("0", "false", "off"):
        monkeypatch.setenv("JQLORA_COMPILATION_CACHE", off)
        assert compile_cache.enable() is None and jax.config.jax_compilation_cache_dir == before


def test_unwritable_folder_warns_once_and_stays_off(monkeypatch, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("JQLORA_CACHE_DIR", str(tmp_path / "a-file" / "cache"))  # (a file as a folder: even for root)
    monkeypatch.setenv("JQLORA_COMPILATION_CACHE", "1")
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)  # (JAX's own setting would take precedence)
    try:
        assert compile_cache.enable() is None
        assert jax.config.jax_compilation_cache_dir is None  # (left off)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: compilation cache off") and "a-file" in err


def test_second_cli_run_hits_the_cache(assets, tmp_path):
    cache = tmp_path / "cache"
    on = {"JQLORA_COMPILATION_CACHE": "1", "JQLORA_CACHE_DIR": str(cache)}
    first, hits1, requests1 = _generate(assets / "model", on)
    folder = Path(compile_cache.cache_dir().replace(compile_cache.base_dir(), str(cache)))
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    assert hits1 == 0 and requests1 > 0 and entries  # a cold cache: every program compiled, some written
    second, hits2, requests2 = _generate(assets / "model", on)
    assert hits2 >= len([p for p in entries if p.name.endswith("-cache")]) > 0  # every written program read back
    assert second.stdout == first.stdout  # the same tokens from the cached programs
    # an unwritable folder: one warning line, and the run goes on
    (tmp_path / "a-file").write_text("")
    third, hits3, _ = _generate(assets / "model", {"JQLORA_COMPILATION_CACHE": "1",
                                                   "JQLORA_CACHE_DIR": str(tmp_path / "a-file")})
    assert hits3 == 0 and third.stdout == first.stdout
    assert [ln for ln in third.stderr.splitlines() if "warning" in ln.lower()] == [third.stderr.splitlines()[0]]
