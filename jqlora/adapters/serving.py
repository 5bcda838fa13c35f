"""What a server needs to know about an exported adapter: the vLLM flags it needs, and what vLLM refuses.

vLLM sizes its LoRA buffers by ``--max-lora-rank`` (one of a few fixed values, ``VLLM_MAX_LORA_RANKS``) and must be
at least the largest rank of any module (``r`` and every ``rank_pattern`` value). It refuses DoRA, and that refusal
happens inside the engine's worker: the caller sees only ``EngineDeadError`` and every other request dies with it, so
a DoRA adapter is served as a merged model instead (``--merge``).
"""

from __future__ import annotations

from typing import Any, Mapping

VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig: the values --max-lora-rank takes
HEAD_MODULES = ("embed_tokens", "lm_head")


def max_rank(config: Mapping[str, Any]) -> int:
    """The largest rank of any module of a peft ``adapter_config.json``."""
    return max([int(config["r"]), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def vllm_notes(config: Mapping[str, Any], dst: str) -> list[str]:
    """Lines for the user serving the adapter at ``dst`` with vLLM (the last one a warning for DoRA)."""
    r = max_rank(config)
    flag = next((v for v in VLLM_MAX_LORA_RANKS if v >= r), None)
    rank = (f"--max-lora-rank {flag}" if flag is not None else
            f"(rank {r} is above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}: serve --merge instead)")
    lines = [f"vLLM: vllm serve BASE --enable-lora {rank} --lora-modules adapter={dst}  (largest rank {r})"]
    targets = set(config.get("target_modules") or [])
    heads = [m for m in HEAD_MODULES if m in targets]
    lines.append(f"vLLM: LoRA on {' and '.join(heads)}: the base's vLLM model must support LoRA there"
                 if heads else "vLLM: no LoRA on embed_tokens / lm_head")
    if config.get("target_parameters"):
        lines.append("vLLM: LoRA on MoE expert parameters (peft target_parameters): check that this vLLM supports it")
    if config.get("use_dora"):
        lines.append(f"warning: vLLM refuses DoRA adapters and the refusal takes its whole engine down "
                     f"(EngineDeadError); serve a merged model: python -m jqlora.export RUN OUT --merge")
    return lines
