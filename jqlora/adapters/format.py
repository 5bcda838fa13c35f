"""The Hugging Face ``peft`` LoRA adapter format, as jqlora writes (`jqlora.adapters.export`) and reads it
(`jqlora.adapters.load`): file names, key patterns, and the conventions below.

A peft LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with, for every
adapted module ``M`` of layer ``i``, ``base_model.model.model.layers.{i}.M.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]`` (peft may insert the adapter name: ``lora_A.default.weight``). peft computes
``y = x Wᵀ + s · x Aᵀ Bᵀ`` with ``s = alpha / r`` (``alpha / √r`` with rsLoRA); jqlora keeps ``A [in, r]`` and
``B [r, out]`` stacked over layers (leading axis L), so export transposes and un-stacks, import stacks and
transposes. Per-module ``rank_pattern`` / ``alpha_pattern`` are resolved the way peft resolves them (the first
pattern key ``K`` with ``re.match(rf"(.*\\.)?({K})$", module_name)`` on the full name, e.g.
``model.layers.3.self_attn.q_proj``). A module kind whose rank or alpha differs between layers is stacked at its
largest rank with a frozen mask (`jqlora.lora.layer`); export writes each layer's own rank (``rank_pattern`` /
``alpha_pattern`` keys naming that layer's module) and only the adapted layers' keys, with ``layers_to_transform``
when some layers are left out, so peft rebuilds the same modules. DoRA adapters (``use_dora: true``) also hold
``...lora_magnitude_vector`` ``[out]`` per module (`jqlora.lora.dora`), stacked as ``magnitude`` ``[L, O]``.
Adapters on the embedding and the LM head: `jqlora.adapters.heads`; on the MoE experts (peft's ``target_parameters``):
`jqlora.adapters.experts`.

Shape letters: L layers, I in features, O out features, R LoRA rank.
"""

from __future__ import annotations

import re
from typing import Any

from jqlora.adapters.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
SAVE_DTYPES = ("float32", "bfloat16", "float16")
# peft names the LoRA weights of a module ``<module>.lora_A[.<adapter name>].weight``.
KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
MAGNITUDE_RE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?!weight$)(?P<adapter>[^.]+))?(?:\.weight)?$")
LAYER_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<sub>.+)$")
# the embedding's adapter (no ``.weight``), and peft's copy of a base head weight (`jqlora.adapters.heads`)
EMBED_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?$")
BASE_COPY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>model\.embed_tokens|lm_head)\.base_layer\.weight$")


def parse_key(key: str, where: Any) -> tuple[str, str, str | None]:
    """``(module name inside the base model, 'A' | 'B' | 'M', adapter name)`` of a peft LoRA key (M: a DoRA
    ``lora_magnitude_vector``)."""
    m = KEY_RE.match(key) or EMBED_KEY_RE.match(key)
    ab = m["ab"] if m is not None else "M"
    m = m if m is not None else MAGNITUDE_RE.match(key)
    if m is None:
        raise AdapterError(f"{where}: unexpected key {key!r} (not a LoRA lora_A / lora_B weight or DoRA magnitude)")
    module = m["module"]
    if module.startswith(PREFIX):
        module = module[len(PREFIX):]
    return module, ab, m["adapter"]


def num(x: float) -> int | float:
    """``x`` as peft's JSON writes it: an int when it is whole."""
    return int(x) if float(x).is_integer() else float(x)
