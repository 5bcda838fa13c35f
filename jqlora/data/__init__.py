"""Datasets to training batches: records (jsonl / json / parquet / a hub dataset) -> rendered text -> token ids and
trained-token flags (`records`) -> packed rows -> seeded, resumable batches (`rows`), from one source or several
mixed by weight (`mixture`); the statistics a run shows before it trains (`stats`); where a value points
(`sources`), the checks made before JAX (`checks`) and those against the model's vocabulary (`vocab`). numpy and
the tokenizer only: no JAX."""

from jqlora.data.checks import check_data
from jqlora.data.errors import DataError
from jqlora.data.mixture import Source, build_datasets, data_sources, map_paths, split_records
from jqlora.data.records import (DEFAULT_CHAT_TEMPLATE, FORMATS, ROLES, Record, detect_format, encode_records,
                                 fit_length, load_tokenizer, read_chat_template, read_records, render_chat,
                                 to_messages)
from jqlora.data.rows import (BATCH_KEYS, BatchIterator, Example, Mixture, TokenDataset, epoch_order, eval_batches,
                              pack)
from jqlora.data.vocab import check_ids, check_tokenizer

__all__ = [
    "BATCH_KEYS", "DEFAULT_CHAT_TEMPLATE", "FORMATS", "ROLES", "BatchIterator", "DataError", "Example", "Mixture",
    "Record", "Source", "TokenDataset", "build_datasets", "check_data", "check_ids", "check_tokenizer",
    "data_sources", "detect_format",
    "encode_records", "epoch_order", "eval_batches", "fit_length", "load_tokenizer", "map_paths", "pack", "read_chat_template",
    "read_records", "render_chat", "split_records", "to_messages",
]
