"""An exclusive lock on a run directory, so that two trainers never write into one.

`flock` on ``.<name>.lock`` beside ``output_dir`` (advisory, held for the whole run by process 0). It sits beside the
directory, not in it, so it locks the path: a directory that is refused stays exactly as it was, and one moved
aside (train.overwrite) is moved while the lock is held. The file holds the owner's PID, host and start time, which a
refused second trainer prints. The kernel drops a flock when its process dies, kill -9
included, so a dead trainer's lock needs no clean-up: the next run takes it and says whose it was.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time

log = logging.getLogger("jqlora.rundir")



def lock_path(out: str | os.PathLike) -> str:
    """``<parent>/.<name>.lock`` for the run directory ``out``, resolved (`os.path.realpath`): every name of one
    directory (a symlink to it, or through a symlinked parent) has the same lock."""
    out = os.path.realpath(os.fspath(out))
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lock")


class LockError(ValueError):
    """The run directory cannot be locked (it cannot be created or written)."""


class RunLockedError(LockError):
    """Another live trainer holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory: `flock` on `lock_path`, which holds the owner's PID and host.

    The kernel drops a flock when its process dies (kill -9 included), so a lock left by a dead trainer is simply
    taken over (and said so); a live one makes `acquire` raise `RunLockedError` naming the PID and host."""

    def __init__(self, out: str | os.PathLike):
        self.out = os.fspath(out)
        self.path = lock_path(out)
        shown = os.path.normpath(self.out)  # (the lock as the user wrote output_dir: relative stays relative)
        self.shown = os.path.join(os.path.dirname(shown), f".{os.path.basename(shown)}.lock")
        self._file = None  # (a file object: if it is dropped unreleased, closing it drops the lock too)

    def acquire(self) -> None:
        above = os.path.dirname(os.path.abspath(self.out))
        while above and not os.path.lexists(above):  # the nearest existing folder above output_dir
            above = os.path.dirname(above)
        if above and not os.path.isdir(above):
            shown = os.path.relpath(above) if not os.path.isabs(self.out) else above
            raise LockError(f"output_dir {self.out}: {shown} is a file, not a directory; choose another output_dir")
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise LockError(f"output_dir {self.out}: not writable (its lock {self.path}: {e.strerror or e})") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockError(f"{self.path}: cannot lock the run directory ({e.strerror})") from None
            raise RunLockedError(
                f"output_dir {self.out} is in use by another trainer ({_read_owner(self.path)}); "
                "wait for it to finish, stop it, or choose another output_dir") from None
        previous = _read_owner(self.path, raw=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(me))
        f.flush()
        os.fsync(f.fileno())
        self._file = f
        if previous and (previous.get("pid"), previous.get("host")) != (me["pid"], me["host"]):
            log.warning("warning: took over the stale lock of %s (process %s on %s is gone)", self.shown,
                        previous.get("pid"), previous.get("host"))

    def release(self) -> None:
        if self._file is None:
            return
        try:
            self._file.seek(0)
            self._file.truncate()
            self._file.flush()
        finally:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _read_owner(path: str, raw: bool = False):
    try:
        with open(path) as f:
            info = json.loads(f.read() or "null")
    except (OSError, ValueError):
        info = None
    if raw:
        return info if isinstance(info, dict) else None
    if not isinstance(info, dict):
        return "owner unknown"
    return f"PID {info.get('pid')} on host {info.get('host')}, since {info.get('since')}"
