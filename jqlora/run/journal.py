"""metrics.jsonl: one JSON record per line, appended whole or not at all.

Each record is one ``os.write`` of its whole line on a descriptor opened with ``O_APPEND``; a write that fails or
is cut short (a full disk) is undone by truncating the file back to its size before the write, so the file holds
only whole records. A line cut by a kill (or by a disk that failed the undo) can only be the last one; the reader
skips it with a warning, and the trainer rewrites the file without it when the run resumes. A damaged line that is
not the last one is the user's edit: one line naming the file and the line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os

log = logging.getLogger("jqlora.rundir")

_FULL = (errno.ENOSPC, errno.EDQUOT)


class JournalError(ValueError):
    """metrics.jsonl cannot be written or read: the message names the file."""


def append(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one line in one write; on failure the file is as it was and `JournalError` says why."""
    data = (json.dumps(record) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise JournalError(f"{path}: cannot be written ({e.strerror or e})") from None
    try:
        before = os.fstat(fd).st_size
        try:
            n = os.write(fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, "No space left on device (short write)")
        except OSError as e:
            try:
                os.ftruncate(fd, before)
            except OSError:
                pass  # (the torn line is skipped on reading)
            why = "no space left on device" if e.errno in _FULL else (e.strerror or str(e))
            raise JournalError(f"{path}: {why} appending a metrics record; the run can be resumed once there "
                               "is room") from None
    finally:
        os.close(fd)


def read(path: str | os.PathLike) -> list[dict]:
    """The records of ``path``; a torn last line is skipped with a warning."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = all(not x.strip() for x in lines[i + 1:])
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            if last:
                log.warning("warning: %s: line %d is cut short (an interrupted write); skipped", path, i + 1)
                break
            raise JournalError(f"{path}: line {i + 1} is not a JSON record ({str(e).splitlines()[0]}); fix or "
                               "remove that line") from None
        records.append(rec)
    return records


def rewrite(path: str | os.PathLike, keep) -> None:
    """Rewrite ``path`` (a temporary file renamed over it) with the records ``keep(record)`` accepts."""
    if not os.path.isfile(path):
        return
    records = [r for r in read(path) if keep(r)]
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, path)
    except OSError as e:  # (the file itself is as it was)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise JournalError(f"{path}: cannot be rewritten ({e.strerror or e})") from None
