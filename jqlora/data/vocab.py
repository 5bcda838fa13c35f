"""The tokenizer and the data's token ids checked against the model's vocabulary, before a weight is loaded.

An id at or past the model's ``vocab_size`` has no row in the embedding table: XLA's gather clamps or fills it, and
the loss turns NaN a few steps in, as if the learning rate were too high. So a tokenizer whose ``len(tokenizer)``
(added tokens included) exceeds the model's ``vocab_size`` is refused at once (`check_tokenizer`), and so is any
example holding such an id (`check_ids`: a tokenizer whose added tokens sit past the end of its vocabulary, emitted
by a chat template), named by its dataset line.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from jqlora.data.errors import DataError

# the token-id fields of the examples of every objective: SFT's `Example` and GRPO's `PromptExample` (ids), the
# preference data's `PairIds` (prompt, chosen, rejected) and `UnpairedIds` (prompt, completion); a field of these
# names that does not hold integers is no token ids
ID_FIELDS = ("ids", "prompt", "chosen", "rejected", "completion")

RESIZE = ("resize the model's embeddings to the tokenizer (transformers: "
          "model.resize_token_embeddings(len(tokenizer)), then save_pretrained)")


def _fix(tokenizer_path: str, model_path: str) -> str:
    if str(tokenizer_path) == str(model_path):  # (the model's own tokenizer: only the embeddings can change)
        return RESIZE
    return f"use the model's own tokenizer (unset model.tokenizer_path), or {RESIZE}"


def check_tokenizer(tokenizer, tokenizer_path: str, vocab_size: int, model_path: str) -> None:
    """`DataError` (one line) when ``len(tokenizer)`` exceeds the model's ``vocab_size``."""
    n = len(tokenizer)
    if n > vocab_size:
        raise DataError(f"tokenizer {tokenizer_path}: {n} tokens (len(tokenizer), added tokens included), more than "
                        f"the vocab_size {vocab_size} of model {model_path}: ids from {vocab_size} on have no "
                        f"embedding (NaN losses); {_fix(tokenizer_path, model_path)}")


def check_ids(examples: Iterable, tokenizer, tokenizer_path: str, vocab_size: int, model_path: str) -> None:
    """`DataError` (one line, naming the example's dataset line) for the first example with an id >= ``vocab_size``,
    or a padding id that is."""
    pad = getattr(tokenizer, "pad_token_id", None)
    for ex in examples:
        for name in ID_FIELDS:
            ids = np.asarray(getattr(ex, name, ()))
            if ids.size == 0 or ids.dtype.kind not in "iu":  # (GRPO's `prompt` is the record's text or messages)
                continue
            top = int(ids.max())
            if top >= vocab_size:
                token = tokenizer.convert_ids_to_tokens(top)
                raise DataError(f"{getattr(ex, 'where', '') or 'an example'}: token id {top} ({token!r}, from "
                                f"tokenizer {tokenizer_path}) is past the vocab_size {vocab_size} of model "
                                f"{model_path} (an added token, or one a chat template emits); "
                                f"{_fix(tokenizer_path, model_path)}")
    if pad is not None and int(pad) >= vocab_size:
        raise DataError(f"tokenizer {tokenizer_path}: its pad_token_id {pad} is past the vocab_size {vocab_size} of "
                        f"model {model_path}; {_fix(tokenizer_path, model_path)}")
