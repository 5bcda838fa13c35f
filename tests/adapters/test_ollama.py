"""The Ollama Modelfile: its TEMPLATE, rendered as Go's text/template renders it, gives the prompt text of the Hugging
Face chat template (rendered by transformers) for a 2-turn conversation, for the ChatML, Llama 3, Gemma and Phi-3
templates as their models ship them; the renderer itself gives, for ChatML and Llama 3, the prompt text Ollama's
documentation shows for those formats (written out here by hand); a template that is none of them, or a variant
that renders differently (Qwen 2.5's default system prompt), gets a Modelfile without TEMPLATE and a one-line note.
"""

import json
import re
import shutil

import pytest
from transformers import AutoTokenizer

from jqlora.adapters.ollama import FAMILIES, render, write_modelfile

TOKENIZER = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer"
TWO_TURNS = [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi! How can I help?"},
             {"role": "user", "content": "What is 2 + 2?"}]
JINJA = {  # the chat templates as the models' tokenizer_config.json ship them
    "chatml": (TOKENIZER / "chat_template.jinja").read_text(),
    "llama3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
              "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
              "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
              "{{ content }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "gemma": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
             "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
             "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | "
             "trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}"
             "{% endif %}",
    "phi3": "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
            "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
            "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
            "{{ eos_token }}{% endif %}",
}
QWEN25 = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
          "'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
          "helpful assistant.<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if message.role != "
          "'system' %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


def _modelfile(tmp_path, template):
    """The Modelfile for ``template`` over the test tokenizer, with a BOS token (Llama 3 / Gemma write it)."""
    tok = tmp_path / "tok"
    shutil.copytree(TOKENIZER, tok)
    (tok / "chat_template.jinja").unlink()
    config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<|endoftext|>"}))
    note = write_modelfile(tmp_path, "model-f16.gguf", template, tok)
    return (tmp_path / "Modelfile").read_text(), note


@pytest.mark.parametrize("family", sorted(JINJA))
def test_modelfile_template_renders_the_hf_chat_template(tmp_path, family):
    text, note = _modelfile(tmp_path, JINJA[family])
    assert note is None and text.startswith("FROM ./model-f16.gguf\n")
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    want = AutoTokenizer.from_pretrained(tmp_path / "tok").apply_chat_template(
        TWO_TURNS, chat_template=JINJA[family], tokenize=False, add_generation_prompt=True)
    bos = "<|endoftext|>" if family in ("llama3", "gemma") else ""  # (llama.cpp adds the BOS token itself)
    assert want.startswith(bos) and render(template, TWO_TURNS) == want[len(bos):]
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert stops[0] == {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>",
                        "phi3": "<|end|>"}[family] and "<|im_end|>" in stops  # (and the tokenizer's EOS)


def test_renderer_gives_ollamas_documented_prompts():
    assert render(FAMILIES["chatml"][1], TWO_TURNS) == (
        "<|im_start|>user\nHello there.<|im_end|>\n<|im_start|>assistant\nHi! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert render(FAMILIES["llama3"][1], TWO_TURNS) == (
        "<|start_header_id|>user<|end_header_id|>\n\nHello there.<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\nHi! How can I help?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "What is 2 + 2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render('{{ range .Messages }}{{ if eq .Role "user" }}U{{ else if eq .Role "system" }}S{{ else }}A'
                  '{{ end }}{{ end }}', [{"role": "system", "content": ""}, *TWO_TURNS]) == "SUAU"


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
     "the chat template is none of llama3, chatml, gemma, phi3; no TEMPLATE written"),
    (QWEN25, "the chat template is a chatml variant that Ollama's chatml template renders differently"),
])
def test_unknown_templates_get_no_template_and_one_line(tmp_path, template, message):
    text, note = _modelfile(tmp_path, template)
    assert message in note and "\n" not in note
    assert "TEMPLATE" not in text and text.splitlines() == ["FROM ./model-f16.gguf", 'PARAMETER stop "<|im_end|>"']
