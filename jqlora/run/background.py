"""Waiting on orbax's background save threads, with a bound.

Orbax writes a checkpoint in threads of its own (not daemons) and `wait_until_finished` joins them without a time
limit. A save that fails or never finishes must not keep the trainer alive: the wait here runs in a daemon thread
joined for at most ``JQLORA_SAVE_TIMEOUT_S`` seconds (default 600), the library's thread tracebacks are kept out of
the user's terminal while it runs (the caller reports one line), and a process whose save threads are stuck can
leave through `exit_now` instead of being held at interpreter shutdown by threads that will never end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

ENV_TIMEOUT = "JQLORA_SAVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0

_stuck: list[threading.Thread] = []  # the waits that timed out (their threads may still be running)


class SaveTimeout(TimeoutError):
    """A background save did not finish within the bound."""


def timeout_s() -> float:
    try:
        return max(float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)), 0.1)
    except ValueError:
        return DEFAULT_TIMEOUT_S


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:  # (kept for debugging, one line, without the traceback)
            logging.getLogger("jqlora.rundir").debug("orbax: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def quiet_orbax():
    """Drop orbax's (absl's) error records and their tracebacks while a save runs; the caller reports in one line."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax")]
    f = _Quiet()
    for lg in loggers:
        lg.addFilter(f)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(f)


def bounded(fn, what: str, timeout: float | None = None):
    """``fn()`` in a daemon thread, joined for at most ``timeout`` seconds (default `timeout_s`); its exception is
    raised here. Raises `SaveTimeout` naming ``what`` when it is still running then."""
    timeout = timeout_s() if timeout is None else timeout
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e

    t = threading.Thread(target=target, name=f"jqlora-wait {what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        _stuck.append(t)
        raise SaveTimeout(f"{what} did not finish within {timeout:g} s (set {ENV_TIMEOUT} to wait longer)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def stuck() -> bool:
    """Whether a bounded wait timed out, or a save thread (not a daemon) is still alive: the interpreter would wait
    for it forever at exit."""
    if any(t.is_alive() for t in _stuck):
        return True
    return any(t.is_alive() and not t.daemon and t is not threading.main_thread() and _is_orbax(t)
               for t in threading.enumerate())


def _is_orbax(t: threading.Thread) -> bool:
    target = getattr(t, "_target", None)
    module = getattr(target, "__module__", "") or ""
    return module.startswith("orbax") or "save_finalize" in t.name or type(t).__module__.startswith("orbax")


def exit_now(line: str, code: int) -> None:
    """Print ``line``, flush, and end the process with ``code`` without joining threads that never end (the run's
    lock is a flock, which the kernel drops)."""
    print(line, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)
