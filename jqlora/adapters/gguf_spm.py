"""A SentencePiece BPE ``tokenizer.json`` (Llama 2, Mistral v0.1, Gemma, Phi-3) as llama.cpp's ``llama`` tokenizer.

llama.cpp's SentencePiece tokenizer (``llm_tokenizer_spm``) starts from the UTF-8 characters of the text (spaces
spelled ``▁``), repeatedly merges the adjacent pair whose concatenation is a token with the highest *score* (the
leftmost on ties), and spells what is left in byte tokens ``<0xXX>``. Hugging Face's BPE merges the adjacent pair
of lowest *rank* in its merge list. A ``tokenizer.json`` converted from SentencePiece lists a merge for every pair
of tokens whose concatenation is a token, ordered by the merged token's score, so the two agree when each token's
score is minus the rank of its first merge: that is what is written. Two checks make sure the file is such a
list (otherwise the vocabulary is refused in one line): the merges that make one token are adjacent in rank, and no
token that a pair of tokens spells is missing from the merges (llama.cpp would make it where Hugging Face does not).

Token types: ``<0xXX>`` BYTE, special added tokens CONTROL, other added tokens USER_DEFINED (matched whole), NORMAL
otherwise, UNUSED ``[PAD{i}]`` for ids the embedding has and the tokenizer lacks.

The space prefix: llama.cpp prefixes a space at the start of the text and after every special / added token, even
where the text already starts with one (``add_space_prefix``): exactly what a ``Prepend("▁")`` normalizer does; a
``Replace(" ", "▁")`` normalizer alone (Gemma) or a ``Metaspace`` with ``prepend_scheme`` ``never`` prefixes
nothing (``add_space_prefix`` false). A ``Metaspace`` with ``always`` (no prefix before a leading space) or
``first`` (none after special tokens) has no llama.cpp twin and is refused. What is read is the tokenizer training
used, as transformers builds it (`effective_tokenizer_json`), not the file: transformers 5 rebuilds a
``LlamaTokenizer`` as ``Metaspace`` ``first`` (``legacy`` false) or ``always`` whatever its ``tokenizer.json`` says.
"""

from __future__ import annotations

import json
from typing import Any

from jqlora.adapters.errors import ExportError

NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 3, 4, 5, 6  # gguf.TokenType
SPACE = "▁"


def effective_tokenizer_json(tok_dir: Any, where: str) -> dict[str, Any]:
    """The ``tokenizer.json`` of the tokenizer transformers builds from ``tok_dir`` (what training tokenized with)."""
    from transformers import AutoTokenizer

    backend = getattr(AutoTokenizer.from_pretrained(tok_dir), "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{where}: transformers loads no fast tokenizer from it")
    return json.loads(backend.to_str())


def is_sentencepiece(tj: dict[str, Any]) -> bool:
    """Whether ``tj`` (a parsed ``tokenizer.json``) is a SentencePiece-style BPE (byte fallback, ``▁`` spaces)."""
    model = tj.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _replace_space(n: dict | None) -> bool:
    return bool(n) and n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == " " \
        and n.get("content") == SPACE


def space_prefix(tj: dict[str, Any], where: str) -> bool:
    """Whether llama.cpp must prefix a space (``add_space_prefix``), from the normalizer / pre-tokenizer of ``tj``."""
    norm, pre = tj.get("normalizer"), tj.get("pre_tokenizer")
    steps = norm.get("normalizers") if norm and norm.get("type") == "Sequence" else None
    if pre is None and steps and len(steps) == 2 and steps[0].get("type") == "Prepend" \
            and steps[0].get("prepend") == SPACE and _replace_space(steps[1]):
        return True
    gemma_split = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
    if _replace_space(norm) and (pre is None or pre == gemma_split):
        return False
    if norm is None and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE \
            and not pre.get("split", True) and pre.get("prepend_scheme") == "never":
        return False
    scheme = (pre or {}).get("prepend_scheme") if (pre or {}).get("type") == "Metaspace" else None
    if norm is None and scheme in ("always", "first"):
        what = "none after special tokens" if scheme == "first" else "none before a leading space"
        raise ExportError(f"{where}: transformers tokenizes with Metaspace prepend_scheme {scheme!r} ({what}), "
                          "which llama.cpp's SentencePiece tokenizer cannot (it prefixes a space at the start and "
                          "after every special token)")
    raise ExportError(f"{where}: a SentencePiece normalizer / pre-tokenizer llama.cpp has no twin for "
                      f"({json.dumps(norm)[:80]} / {json.dumps(pre)[:80]})")


def merge_scores(vocab: dict[str, int], merges: list, where: str, whole: set[str] = frozenset()) -> dict[str, float]:
    """Each merged token's score, minus the rank of its first merge (checked to be a SentencePiece merge list;
    ``whole``: the added tokens, which both tokenizers match whole before merging)."""
    first: dict[str, int] = {}
    last = None
    for rank, m in enumerate(merges):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        token = left + right
        if token not in vocab:
            raise ExportError(f"{where}: merge {rank} ({left!r} {right!r}) makes {token!r}, which is not a token")
        if token in first and token != last:
            raise ExportError(f"{where}: the merges that make {token!r} are not adjacent in rank (at {first[token]} "
                              f"and {rank}): not a SentencePiece merge list, llama.cpp would merge in another order")
        first.setdefault(token, rank)
        last = token
    for token in vocab:
        if token not in first and len(token) > 1 and token not in whole and not _is_byte(token):
            for i in range(1, len(token)):
                if token[:i] in vocab and token[i:] in vocab:
                    raise ExportError(f"{where}: no merge makes token {token!r}, which llama.cpp would make from "
                                      f"{token[:i]!r} + {token[i:]!r}")
    return {t: -float(r) for t, r in first.items()}


def _is_byte(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def sentencepiece_vocab(tj: dict[str, Any], where: str, n_vocab: int
                        ) -> tuple[list[str], list[float], list[int], bool]:
    """``(tokens, scores, types, add_space_prefix)`` by id, ``n_vocab`` long, of the SentencePiece BPE ``tj``."""
    model = tj["model"]
    prefix = space_prefix(tj, where)
    vocab = {str(t): int(i) for t, i in model["vocab"].items()}
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise ExportError(f"{where}: byte_fallback without the byte token <0x{missing[0]:02X}>")
    added_tokens = tj.get("added_tokens") or []
    scores_by_token = merge_scores(vocab, model.get("merges") or [], where, {a["content"] for a in added_tokens})
    by_id: dict[int, tuple[str, float, int]] = {}
    for token, i in vocab.items():
        kind = BYTE if _is_byte(token) else NORMAL
        by_id[i] = (token, scores_by_token.get(token, 0.0), kind)
    for added in added_tokens:
        i, token = int(added["id"]), added["content"]
        if i in by_id and by_id[i][0] != token:
            raise ExportError(f"{where}: added token {token!r} reuses id {i} of {by_id[i][0]!r}")
        kind = CONTROL if added.get("special") else USER_DEFINED
        by_id[i] = (token, 0.0, kind)
    if by_id and max(by_id) >= n_vocab:
        raise ExportError(f"{where}: token id {max(by_id)} is outside the model's vocab_size {n_vocab}")
    rows = [by_id.get(i, (f"[PAD{i}]", 0.0, UNUSED)) for i in range(n_vocab)]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], prefix
