"""The tokenizer files an export carries, written so that transformers 4.x and 5.x and llama.cpp's converter read them.

transformers 5 saves ``"tokenizer_class": "TokenizersBackend"`` (or ``SentencePieceBackend`` / ``PythonBackend``):
classes that exist only in 5.x, so transformers 4.x, and llama.cpp's ``convert_hf_to_gguf.py`` with it, stop at
``Tokenizer class TokenizersBackend does not exist``. With a ``tokenizer.json`` beside it, such a config is rewritten
to name ``PreTrainedTokenizerFast``, which every version resolves and which reads the same ``tokenizer.json`` (5.x
maps it onto ``TokenizersBackend`` itself). Model-specific names (``LlamaTokenizer``, ``Qwen2Tokenizer``, ...) are
kept: 4.x resolves them to their ``...Fast`` twin. The chat template is written twice, as ``chat_template.jinja``
(what 5.x and newer 4.x read first) and inside ``tokenizer_config.json`` (what older readers, llama.cpp's gguf
``SpecialVocab`` among them, read), so every reader sees the one training used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
CONFIG = "tokenizer_config.json"
TEMPLATE = "chat_template.jinja"
# transformers 5's generic backends: no 4.x class has these names
V5_ONLY_CLASSES = ("TokenizersBackend", "SentencePieceBackend", "PythonBackend")
PORTABLE_CLASS = "PreTrainedTokenizerFast"
# keys transformers 5 writes about where the files came from, not about the tokenizer
_LOAD_KEYS = ("is_local", "local_files_only")
log = logging.getLogger("jqlora.export")


def portable_config(config: dict, has_tokenizer_json: bool) -> dict:
    """``tokenizer_config.json`` contents that transformers 4.x and 5.x both load (see the module docstring)."""
    out = {k: v for k, v in config.items() if k not in _LOAD_KEYS}
    cls = out.get("tokenizer_class")
    if cls in V5_ONLY_CLASSES:
        if has_tokenizer_json:
            out["tokenizer_class"] = PORTABLE_CLASS
        else:
            log.warning("tokenizer_config.json: tokenizer_class %s exists only in transformers 5 and there is no "
                        "tokenizer.json to name %s instead; older readers cannot load it", cls, PORTABLE_CLASS)
    return out


def chat_template_of(src: str | os.PathLike) -> str | None:
    """The chat template a tokenizer directory holds (``chat_template.jinja`` first, as transformers 5 reads)."""
    src = Path(src)
    if (src / TEMPLATE).is_file():
        return (src / TEMPLATE).read_text(encoding="utf-8")
    if (src / CONFIG).is_file():
        template = json.loads((src / CONFIG).read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def make_portable(dst: str | os.PathLike, chat_template: str | None = None) -> None:
    """Rewrite ``dst``'s tokenizer config in place for every reader; ``chat_template`` (the one training used)
    replaces the directory's own, else the directory's own is written in both places."""
    dst = Path(dst)
    if not (dst / CONFIG).is_file():
        if chat_template is not None:
            (dst / TEMPLATE).write_text(chat_template, encoding="utf-8")
        return
    template = chat_template if chat_template is not None else chat_template_of(dst)
    config = portable_config(json.loads((dst / CONFIG).read_text(encoding="utf-8")), (dst / "tokenizer.json").is_file())
    if template is not None:
        config["chat_template"] = template
        (dst / TEMPLATE).write_text(template, encoding="utf-8")
    (dst / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike, chat_template: str | None = None) -> list[str]:
    """Copy the tokenizer files of ``src`` to ``dst`` (as TRL saves the tokenizer beside an adapter), portable and
    with ``chat_template``; returns the names written."""
    src, dst = Path(src), Path(dst)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for name in names:
        shutil.copy2(src / name, dst / name)
    make_portable(dst, chat_template)
    if chat_template is not None and TEMPLATE not in names:
        names.append(TEMPLATE)
    return names
