"""Where a dataset value points: a local file, a local directory, or a Hugging Face Hub dataset (`classify`).

A value that exists on disk is local. One that does not exist is a Hub name only when it reads as ``org/name`` (two
parts of letters, digits, ``-``, ``_`` and ``.``, no data-file extension, the ``org`` part not a local directory);
anything else that does not exist (an extension such as ``chat.jsnol``, a leading ``.`` / ``/`` / ``~``, a deeper
path, a bare word) is a mistyped path: one "no such file" line at once, no network. Before the Hub is asked,
`hub_reachable` tries one TCP connection to the endpoint (a second or two at most), so an offline machine is told so
at once instead of after minutes of retries. Standard library only (the trainer checks its data before JAX).
"""

from __future__ import annotations

import functools
import os
import re
import socket
from urllib.parse import urlsplit

from jqlora.data.errors import DataError

FILE_TYPES = (".jsonl", ".json", ".ndjson", ".parquet", ".csv", ".tsv")
JSON_TYPES = (".jsonl", ".json", ".ndjson")
# extensions a data file commonly has: a value ending in one is a path, never a Hub name
_FILE_LIKE = FILE_TYPES + (".txt", ".arrow", ".gz", ".zst", ".bz2", ".xz", ".zip", ".tar", ".jsonl.gz", ".yaml",
                           ".yml", ".xlsx", ".pkl", ".pickle", ".feather")
_HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def looks_like_hub_name(value: str) -> bool:
    """``org/name`` as the Hub spells repository ids (and no data-file extension)."""
    parts = value.split("/")
    if len(parts) != 2 or not all(_HUB_PART.match(p) and not p.endswith(".") and ".." not in p for p in parts):
        return False
    return not value.lower().endswith(_FILE_LIKE)


def classify(value: str, what: str = "data.path") -> str:
    """``"file"``, ``"dir"`` or ``"hub"`` for a dataset value; `DataError` (one line) for a path that does not exist."""
    path = os.path.expanduser(str(value))
    if os.path.isfile(path):
        return "file"
    if os.path.isdir(path):
        return "dir"
    if os.path.exists(path):
        raise DataError(f"{what}={value}: not a file or a directory")
    if looks_like_hub_name(value) and not os.path.isdir(value.split("/")[0]):
        return "hub"
    parent = os.path.dirname(os.path.abspath(path))
    where = "" if os.path.isdir(parent) else f" (nor its folder {os.path.dirname(path) or parent})"
    hint = "" if any(c in value for c in "/.~") else "; a Hugging Face Hub dataset is named org/name"
    raise DataError(f"{what}={value}: no such file or directory{where}{hint}")


def offline_by_env() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"


def hub_reachable() -> bool:
    """One TCP connection to the Hub's endpoint (``HF_ENDPOINT``): is there a network path to it at all? (Asked once
    per process and endpoint.)"""
    return _reachable(hub_endpoint())


@functools.cache
def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    url = urlsplit(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # (gaierror: no DNS; refused; unreachable; timeout)
        return False


def maybe_cached(name: str) -> bool:
    """Whether the local caches may hold the Hub dataset ``name``: its folder in the hub cache
    (``datasets--org--name``) or in datasets' own (``org___name``). False only when neither is there."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    data = os.environ.get("HF_DATASETS_CACHE") or os.path.join(home, "datasets")
    org, _, repo = name.partition("/")
    return (os.path.isdir(os.path.join(hub, f"datasets--{org}--{repo}"))
            or os.path.isdir(os.path.join(data, f"{org}___{repo}")))


def offline_error(name: str) -> DataError:
    return DataError(f"{name}: not a local path, and not in the local Hugging Face cache while the Hub is offline or "
                     f"not reachable ({hub_endpoint()}); download it once with network, or give a local file")


def check_hub_name(name: str) -> None:
    """Before datasets is imported: a Hub dataset that cannot be had (no network path, nothing cached) is an error."""
    if (offline_by_env() or not hub_reachable()) and not maybe_cached(name):
        raise offline_error(name)
