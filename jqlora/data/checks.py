"""A run's data checked before anything slow (JAX, the tokenizer, the weights): `check_data`.

What needs no tokenizer is checked here, in the same words the full read uses later, for every source of
data.path and data.eval_path (one, or each entry of a list, named data.path[i]): the path (`sources.classify`:
a mistyped local path is "no such file", not a Hub lookup), JSON / JSON-lines files read whole (the first bad line
as file:line, an empty file), parquet files by their footer (readable, rows), the format from the first record and
every record's fields for it (`to_messages`), and a chat template file. A Hub dataset is checked to be reachable or
cached (`sources.check_hub_name`); its records and those of dataset directories are left to the full read (they
need `datasets`).
"""

from __future__ import annotations

import os

from jqlora.data import sources
from jqlora.data.errors import DataError
from jqlora.data.mixture import data_sources
from jqlora.data.preference import check_preference_records
from jqlora.data.prompts import check_prompt_records
from jqlora.data.records import FORMATS, Record, detect_format, read_chat_template, read_records, to_messages


def check_data(data_cfg, objective: str = "sft") -> None:
    """Raise `DataError` (one line) for the first problem of ``data_cfg``'s local files (a `DataConfig`), their
    records checked for ``objective``'s fields (train.objective: SFT's formats, the preference pairs, KTO's
    unpaired records, GRPO's prompts)."""
    if data_cfg.chat_template:
        read_chat_template(data_cfg.chat_template)
    for source in data_sources(data_cfg, "path") + data_sources(data_cfg, "eval_path"):
        what, path = source.what, source.path
        kind = sources.classify(path, what)
        path = os.path.expanduser(str(path))
        lower = path.lower()
        if kind == "file" and lower.endswith(sources.JSON_TYPES):
            records = read_records(path, what=what)
            if objective == "sft":
                check_records(records, data_cfg, source.format)
            elif objective == "grpo":
                check_prompt_records(records)
            else:
                check_preference_records(records, "unpaired" if objective == "kto" else "paired")
        elif kind == "file" and lower.endswith(".parquet"):
            _check_parquet(path)
        elif kind == "file" and not lower.endswith(sources.FILE_TYPES):
            read_records(path, what=what)  # (its "unsupported file type" line)
        elif kind == "hub":
            sources.check_hub_name(str(path))


def check_records(records: list[Record], data_cfg, fmt: str | None = None) -> str:
    """Every record has the fields of the data's format (``fmt``, else data.format; auto: the first record's);
    returns the format."""
    fmt = fmt or data_cfg.format
    if fmt == "auto":
        fmt = detect_format(records[0], messages_field=data_cfg.messages_field, text_field=data_cfg.text_field)
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r} (one of auto, {', '.join(FORMATS)})")
    for r in records:
        if fmt != "text":
            to_messages(r, fmt, messages_field=data_cfg.messages_field)
        elif not isinstance(r.data.get(data_cfg.text_field), str):
            value = r.data.get(data_cfg.text_field)
            got = "missing" if value is None else type(value).__name__
            raise DataError(f"{r.where}: '{data_cfg.text_field}' must be a string, got {got} (format text)")
    return fmt


def _check_parquet(path: str) -> None:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # (the full read will say what is missing)
        return
    try:
        rows = pq.read_metadata(path).num_rows
    except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid, OSError, ...: a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    if rows == 0:
        raise DataError(f"{path}: no records (empty dataset)")
