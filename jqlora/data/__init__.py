"""Datasets to training batches: records (jsonl / json / parquet / a hub dataset) -> rendered text -> token ids and
trained-token flags (`records`) -> packed rows -> seeded, resumable batches (`rows`), and the statistics a run
shows before it trains (`stats`); where a value points (`sources`) and the checks made before JAX
(`checks`). numpy and the tokenizer only: no JAX."""

from jqlora.data.checks import check_data
from jqlora.data.errors import DataError
from jqlora.data.records import (DEFAULT_CHAT_TEMPLATE, FORMATS, ROLES, Record, build_datasets, detect_format,
                                 encode_records, fit_length, load_tokenizer, read_chat_template, read_records,
                                 render_chat, split_records, to_messages)
from jqlora.data.rows import BATCH_KEYS, BatchIterator, Example, TokenDataset, epoch_order, eval_batches, pack

__all__ = [
    "BATCH_KEYS", "DEFAULT_CHAT_TEMPLATE", "FORMATS", "ROLES", "BatchIterator", "DataError", "Example", "Record",
    "TokenDataset", "build_datasets", "check_data", "detect_format", "encode_records", "epoch_order", "eval_batches",
    "fit_length", "load_tokenizer", "pack", "read_chat_template", "read_records", "render_chat", "split_records",
    "to_messages",
]
