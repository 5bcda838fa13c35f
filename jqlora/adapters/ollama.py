"""An Ollama ``Modelfile`` beside the GGUF: ``FROM ./model-TYPE.gguf``, the chat template in Ollama's Go template
syntax, and the stop tokens.

Ollama renders prompts with Go's ``text/template`` over ``.Messages`` (each with ``.Role`` and ``.Content``), not
with the Jinja chat template. A Jinja template cannot be translated in general, so the chat template is matched to
one of the standard families by its markers (ChatML, Llama 3, Gemma, Phi-3) and that family's Ollama template is
written, in the form of Ollama's own library templates (without BOS: llama.cpp adds it). Before it is written it is
*checked*: rendered here (`render`, the subset of Go templates these use) and by transformers (the Jinja template)
on a few conversations (one user turn; user, assistant, user; with a system turn), the two must give the same text,
BOS aside. A template that is none of the families, or renders differently (a default system prompt, a date
header), gets a Modelfile without ``TEMPLATE`` and one line saying so: Ollama then falls back on the GGUF's own
``tokenizer.chat_template``, which it matches against its known templates.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

FAMILIES = {  # family: (marker in the Jinja template, Ollama template, stop tokens)
    "llama3": ("<|start_header_id|>",
               "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               ("<|eot_id|>", "<|start_header_id|>")),
    "chatml": ("<|im_start|>",
               "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n",
               ("<|im_end|>", "<|im_start|>")),
    "gemma": ("<start_of_turn>",
              "{{ range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
              "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
              ("<end_of_turn>",)),
    "phi3": ("<|assistant|>",
             "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
             ("<|end|>", "<|user|>")),
}
PROBES = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there."},
     {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "What is 2 + 2?"}],
]
_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)


def render(template: str, messages: list[dict[str, str]]) -> str:
    """``template`` as Go's text/template renders it over ``.Messages``, for the subset the family templates use:
    ``range .Messages``, ``if eq .Role "x"`` / ``else if`` / ``else``, ``end``, ``.Role``, ``.Content``."""
    tokens, pos = [], 0
    for m in _ACTION.finditer(template):
        tokens += [("text", template[pos:m.start()]), ("action", m.group(1))]
        pos = m.end()
    tokens.append(("text", template[pos:]))

    def block(i: int, scope: dict | None, stop: tuple[str, ...]) -> tuple[str, int, str]:
        out = []
        while i < len(tokens):
            kind, value = tokens[i]
            i += 1
            if kind == "text":
                out.append(value)
            elif value.startswith(("end", "else")) and value.split()[0] in stop:
                return "".join(out), i, value
            elif value == "range .Messages":
                start = i
                for message in messages or [None]:
                    text, i, _ = block(start, message, ("end",))
                    if message is not None:
                        out.append(text)
            elif value.startswith("if "):
                taken, text = False, ""
                cond = value[3:]
                while True:
                    part, i, ended = block(i, scope, ("else", "end"))
                    if not taken and (cond is None or _test(cond, scope)):
                        taken, text = True, part
                    if ended == "end":
                        break
                    cond = ended[8:] if ended.startswith("else if ") else None
                out.append(text)
            elif value in (".Role", ".Content"):
                out.append(scope[value[1:].lower()] if scope else "")
            else:
                raise ValueError(f"unsupported template action {{{{ {value} }}}}")
        return "".join(out), i, ""

    return block(0, None, ())[0]


def _test(cond: str, scope: dict | None) -> bool:
    m = re.fullmatch(r'eq \.Role "([^"]*)"', cond)
    if m is None:
        raise ValueError(f"unsupported template condition {cond!r}")
    return bool(scope) and scope["role"] == m.group(1)


def family_of(chat_template: str | None) -> str | None:
    """The family of a Jinja chat template, by its markers (None when it is none of them)."""
    for family, (marker, _, _) in FAMILIES.items():
        if chat_template and marker in chat_template:
            return family
    return None


def _agrees(family: str, chat_template: str, tokenizer: Any) -> bool:
    """Whether the family's Ollama template renders every probe the Jinja template accepts as it does (BOS aside)."""
    checked = 0
    for messages in PROBES:
        try:
            want = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception:  # (a template that refuses, say, a system turn: nothing to match there)
            continue
        bos = tokenizer.bos_token or ""
        if bos and want.startswith(bos):
            want = want[len(bos):]
        if render(FAMILIES[family][1], messages) != want:
            return False
        checked += 1
    return checked > 0


def write_modelfile(dst: Path, gguf_name: str, chat_template: str | None, tokenizer_dir: Any) -> str | None:
    """Write ``dst/Modelfile`` for ``gguf_name`` (``chat_template``, else the tokenizer's own); returns a one-line
    note when no TEMPLATE could be written."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat_template = chat_template or tokenizer.chat_template
    family = family_of(chat_template)
    lines = [f"FROM ./{gguf_name}"]
    note = None
    stops = []
    if family is not None and _agrees(family, chat_template, tokenizer):
        lines.append(f'TEMPLATE """{FAMILIES[family][1]}"""')
        stops = list(FAMILIES[family][2])
    elif chat_template:
        what = (f"none of {', '.join(FAMILIES)}" if family is None
                else f"a {family} variant that Ollama's {family} template renders differently")
        note = (f"Modelfile: the chat template is {what}; no TEMPLATE written, Ollama falls back on the GGUF's "
                "tokenizer.chat_template")
    else:
        note = "Modelfile: the tokenizer has no chat template; no TEMPLATE written (Ollama sends the prompt as it is)"
    eos = tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    (Path(dst) / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return note
