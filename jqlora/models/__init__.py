"""Decoder model families and `load_model`, the entry point that turns a checkpoint directory into a model.

`llama.py` covers Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3 by config flags.
"""

from __future__ import annotations

import os
from typing import Any

from jqlora.lora import LoraConfig
from jqlora.models.llama import (
    REMAT_POLICIES,
    HFKey,
    LlamaForCausalLM,
    ModelConfig,
    RopeConfig,
    from_hf_tensors,
    hf_key_table,
)

__all__ = [
    "REMAT_POLICIES", "HFKey", "LlamaForCausalLM", "ModelConfig", "RopeConfig", "from_hf_tensors", "hf_key_table",
    "load_model",
]


def load_model(
    path: str | os.PathLike,
    *,
    quant: str = "nf4",
    double_quant: bool = True,
    block_size: int = 64,
    dtype: Any = "bfloat16",
    adapter: str | os.PathLike | None = None,
    lora: LoraConfig | None = None,
    seed: int = 0,
    remat: str = "full",
) -> LlamaForCausalLM:
    """Load a model from a Hugging Face directory (converted on the fly) or a `python -m jqlora.convert` output.

    A Hugging Face directory may hold safetensors (single or sharded), PyTorch .bin, or a bitsandbytes 4-bit
    checkpoint (whose 4-bit weights are used as stored). A jqlora directory is loaded with the quantization it was
    converted with (``quant``/``double_quant``/``block_size`` are then taken from it). ``lora`` adds fresh adapters
    (peft initialization); ``adapter`` loads a peft LoRA adapter directory (its config sets the LoRA settings).
    The model maps int32 ``input_ids[B, S]`` (optionally ``segment_ids``, ``positions``) to
    float32 logits ``[B, S, V]``.
    """
    from jqlora import convert

    if adapter is not None:
        from jqlora import peft

        if lora is not None:
            raise ValueError("pass either adapter= or lora=, not both: the adapter defines its LoRA settings")
        model = load_model(path, quant=quant, double_quant=double_quant, block_size=block_size, dtype=dtype,
                           lora=peft.read_adapter_config(adapter), seed=seed, remat=remat)
        return peft.load_adapter(model, adapter)
    if convert.is_jqlora_dir(path):
        config, meta, get, _ = convert.load_jqlora(path)
        quant, double_quant, block_size = meta["quant"], meta["double_quant"], meta["block_size"]
        stored = {m["quant_type"] for m in meta["quantized"].values()}
        if stored:
            quant = stored.pop()
            double_quant = all(m["double_quant"] for m in meta["quantized"].values())
            block_size = next(iter(meta["quantized"].values()))["block_size"]
        else:
            quant = "none"
        cfg = ModelConfig.from_hf(config)
        return from_hf_tensors(cfg, get, lora=lora, quant=quant, double_quant=double_quant, block_size=block_size,
                               dtype=dtype, seed=seed, remat=remat)
    with convert.Checkpoint(path) as ckpt:
        try:
            cfg = ModelConfig.from_hf(ckpt.config)
        except ValueError as e:
            raise convert.ConvertError(f"{ckpt.path / 'config.json'}: {e}") from None
        convert.check_checkpoint(ckpt)
        if ckpt.bnb and quant != "none":  # a 4-bit checkpoint keeps its own quantization
            sample = ckpt.get(next(e.key for e in hf_key_table(cfg) if e.kind == "linear"))
            quant, double_quant, block_size = sample.quant_type, sample.double_quant, sample.block_size
        return from_hf_tensors(cfg, ckpt.get, lora=lora, quant=quant, double_quant=double_quant,
                               block_size=block_size, dtype=dtype, seed=seed, remat=remat)
