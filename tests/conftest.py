"""Shared test setup. The PyTorch reference stack (torch, bitsandbytes, peft) is imported directly, never skipped:
a missing oracle is a failing test. Under CI (CI=true) any skipped test fails the run too."""

import os

# bitsandbytes wraps some CPU reference ops in torch.compile; the eager ops are the reference and compile per shape.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging  # noqa: E402

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
