"""The tokenizer of a GGUF file (llama.cpp's ``tokenizer.ggml.*`` metadata), from a Hugging Face ``tokenizer.json``.

A byte-level BPE (GPT-2, Llama 3, Qwen 2/3, Mistral's Tekken-free BPEs) is written as llama.cpp's ``gpt2`` model:
the tokens by id in the byte alphabet, their types (NORMAL; CONTROL for special added tokens, USER_DEFINED for the
others, which llama.cpp matches whole; UNUSED ``[PAD{i}]`` for ids the embedding has and the tokenizer lacks), the
merges, and the pre-tokenizer by llama.cpp's name. llama.cpp does not run the ``tokenizer.json`` pre-tokenizer: it
picks a built-in split regex by that name, so the name is read off the pre-tokenizer itself and a pre-tokenizer
that is none of the known ones is refused (a guessed name would tokenize differently and answer wrong). The special
token ids, BOS / EOS insertion, merges and the chat template go through the gguf package's ``SpecialVocab``.

A SentencePiece BPE (Llama 2, Mistral v0.1, Gemma, Phi-3: ``byte_fallback`` BPE over ``▁``-spelled text) is
written as llama.cpp's ``llama`` model (`jqlora.adapters.gguf_spm`): tokens, scores and types, and whether a space is
prefixed. SentencePiece Unigram vocabularies are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jqlora.adapters.errors import ExportError
from jqlora.adapters.gguf_spm import effective_tokenizer_json, is_sentencepiece, sentencepiece_vocab

# The split regexes of the byte-level pre-tokenizers llama.cpp has built in, by its names (llama-vocab.cpp).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
# token types (gguf.TokenType)
NORMAL, USER_DEFINED, CONTROL, UNUSED = 1, 4, 3, 5


def _byte_level(p: dict, *, regex: bool) -> bool:
    return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", True)
            and bool(p.get("use_regex", True)) == regex)


def pre_tokenizer_name(tj: dict[str, Any], where: str) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json`` (refused when unknown)."""
    pre = tj.get("pre_tokenizer") or {}
    if _byte_level(pre, regex=True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2 and _byte_level(steps[1], regex=False) and steps[0].get("type") == "Split":
        split = steps[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert") and pattern in SPLITS:
            return SPLITS[pattern]
    raise ExportError(f"{where}: a pre-tokenizer llama.cpp has no built-in twin for ({json.dumps(pre)[:120]}); "
                      "GGUF export supports the GPT-2, Llama 3 and Qwen 2 byte-level ones")


def byte_level_vocab(tok_dir: str | Path, n_vocab: int) -> tuple[str, list[str], list[int]]:
    """``(pre-tokenizer name, tokens by id, token types)`` of the byte-level BPE in ``tok_dir``, ``n_vocab`` long."""
    path = Path(tok_dir) / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{tok_dir}: no tokenizer.json (GGUF export reads the fast tokenizer's file)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        kind = "SentencePiece-style " if model.get("type") == "Unigram" else ""
        raise ExportError(f"{path}: a {kind}{model.get('type')} tokenizer; GGUF export writes byte-level BPE and "
                          "SentencePiece BPE (byte_fallback) tokenizers")
    normalizer = tj.get("normalizer")
    pre = pre_tokenizer_name(tj, str(path))
    if normalizer is not None and not (pre == "qwen2" and normalizer.get("type") == "NFC"):
        raise ExportError(f"{path}: normalizer {normalizer.get('type')!r}, which llama.cpp does not apply")
    by_id: dict[int, tuple[str, int]] = {int(i): (t, NORMAL) for t, i in model["vocab"].items()}
    for added in tj.get("added_tokens") or []:
        by_id[int(added["id"])] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if by_id and max(by_id) >= n_vocab:
        raise ExportError(f"{path}: token id {max(by_id)} is outside the model's vocab_size {n_vocab}")
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED))[0] for i in range(n_vocab)]
    types = [by_id.get(i, (None, UNUSED))[1] for i in range(n_vocab)]
    return pre, tokens, types


def add_tokenizer(writer: Any, tok_dir: str | Path, n_vocab: int, chat_template: str | None) -> None:
    """Write the tokenizer of ``tok_dir`` (and ``chat_template``, else the directory's own) into ``writer``."""
    import gguf

    path = Path(tok_dir) / "tokenizer.json"
    if path.is_file() and is_sentencepiece(json.loads(path.read_text(encoding="utf-8"))):
        tj = effective_tokenizer_json(tok_dir, str(path))
        tokens, scores, types, prefix = sentencepiece_vocab(tj, str(path), n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(prefix)
        special = gguf.SpecialVocab(Path(tok_dir), load_merges=False, n_vocab=n_vocab)
        special.add_special_token.setdefault("bos", False)  # (llama.cpp adds BOS to a SentencePiece vocab unless told)
        special.add_special_token.setdefault("eos", False)
    else:
        pre, tokens, types = byte_level_vocab(tok_dir, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(Path(tok_dir), load_merges=True, n_vocab=n_vocab)
        if not special.merges:
            raise ExportError(f"{tok_dir}: the BPE tokenizer lists no merges")
    if chat_template is not None:
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)
