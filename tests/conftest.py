"""Shared test setup. The PyTorch reference stack (torch, bitsandbytes, peft) is imported directly, never skipped:
a missing oracle is a failing test. Under CI (CI=true) any skipped test fails the run too."""

import os

# bitsandbytes wraps some CPU reference ops in torch.compile; the eager ops are the reference and compile per shape.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the CLIs' persistent compilation cache (jqlora/compile_cache.py) stays out of the user's home under tests (and of
# their in-process runs); tests of it turn it on with a folder of their own
os.environ.setdefault("JQLORA_COMPILATION_CACHE", "0")

import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and session.exitstatus == 0:
        reporter.write_line(f"CI: {skipped} skipped test(s) count as not run; failing the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _chat(user: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A tiny random Llama with the test tokenizer (tests/fixtures/tokenizer: a byte-level BPE of vocab 512, ChatML; the
    demo's tokenizer before the demo's data changed, kept so the tests' token counts stay what they were) and a small
    chat set for training runs."""
    import torch
    from tiny import make_model

    root = tmp_path_factory.mktemp("train")
    model = make_model(root / "model", "llama", torch.float32, vocab_size=512, hidden_size=64, intermediate_size=128,
                       max_position_embeddings=128)
    for name in TOKENIZER_FILES:
        shutil.copy(REPO / "tests" / "fixtures" / "tokenizer" / name, model / name)
    # Rows with very different numbers of trained tokens: one-word answers next to long ones.
    rows = []
    for i in range(12):
        if i % 3 == 0:
            rows.append(_chat(f"Say {i}.", f"{i}"))
        elif i % 3 == 1:
            rows.append(_chat("Reverse the word river.", "revir " * (3 + i)))
        else:
            rows.append(_chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}."))
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    (root / "eval.jsonl").write_text("\n".join(rows[:3]) + "\n")
    return root


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent XLA compilation cache for one test module, so trainers that compile the same step reuse it."""
    import jax

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)
