"""Checksums of a checkpoint directory: written last, verified before a restore.

``<step>/CHECKSUMS`` is JSON ``{"algorithm": "sha256", "files": {relative path: {"size", "sha256"}}}`` over every
other file of the checkpoint. It is written atomically (temporary file, fsync, rename) once every other file is
complete, so its presence means the save finished, and a match of every size and digest means nothing was lost or
altered since (a deleted manifest, a truncated array file, a cut JSON, flipped bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHECKSUMS = "CHECKSUMS"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(step_dir: Path) -> None:
    """Write ``step_dir/CHECKSUMS`` (size and sha256 of every other file), atomically, as the last file."""
    entries = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
               for p in _files(step_dir)}
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    with open(tmp, "w") as f:
        json.dump({"algorithm": "sha256", "files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / CHECKSUMS)


def verify_checkpoint(step_dir: Path) -> str | None:
    """None if every file listed in ``step_dir/CHECKSUMS`` is there with its size and sha256, else why not."""
    listing = step_dir / CHECKSUMS
    if not listing.is_file():
        return f"no {CHECKSUMS} file: the save did not finish"
    try:
        files = json.loads(listing.read_text())["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{CHECKSUMS} is unreadable"
    for name, want in files.items():
        p = step_dir / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want.get("size"):
            return f"{name} has {size} bytes, {want.get('size')} were written"
        if _sha256(p) != want.get("sha256"):
            return f"{name} does not match its checksum (corrupted)"
    extra = [str(p.relative_to(step_dir)) for p in _files(step_dir) if str(p.relative_to(step_dir)) not in files]
    if extra:
        return f"{extra[0]} was not part of the saved checkpoint"
    return None
