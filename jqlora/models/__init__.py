"""Decoder model families: one decoder, a short module per family, attention, MoE, and KV-cache decoding.

One decoder (`decoder.py`) serves every family; a family module maps its ``config.json`` to `ModelConfig` and owns
its Hugging Face key table: `llama.py` (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3), `gemma.py` (Gemma 2, Gemma 3
text), `phi3.py` (Phi-3, Phi-3.5, Phi-4-mini), `mixtral.py` and `qwen3_moe.py` (sparse MoE, `moe.py`).
`config.FAMILIES` says which module reads which ``model_type``.
`decode.py` generates with a KV cache from the same weights. Loading a checkpoint into a model is
`jqlora.checkpoints` (and `jqlora.load_model`, which adds a peft adapter).
"""

from jqlora.models import moe
from jqlora.models.config import ModelConfig, RopeConfig
from jqlora.models.hf import HFKey, TensorGetter, checkpoint_pieces, check_filled, from_hf_tensors, hf_key_table
from jqlora.models.layers import QuantHead, heads_spec
from jqlora.models.llama import LlamaForCausalLM
from jqlora.models.stack import REMAT_POLICIES

__all__ = [
    "REMAT_POLICIES", "HFKey", "LlamaForCausalLM", "ModelConfig", "QuantHead", "RopeConfig", "TensorGetter",
    "check_filled", "checkpoint_pieces", "from_hf_tensors", "heads_spec", "hf_key_table", "moe",
]
