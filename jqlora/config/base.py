"""The schema's shared pieces: the allowed values, the one-line config error and the range checks."""

from __future__ import annotations

from typing import Any


QUANT_TYPES = ("nf4", "fp4", "none")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = ("bfloat16", "float16", "float32")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # = lora.LINEAR_MODULES
FUSED_MODULES = ("qkv_proj", "gate_up_proj")  # = lora.FUSED_MODULES (Phi-3); also valid lora.targets
HEAD_MODULES = ("embed_tokens", "lm_head")  # = lora.HEAD_MODULES; valid lora.targets, never part of all-linear
DATA_FORMATS = ("auto", "chat", "instruction", "prompt_completion", "text")
TRAIN_ON = ("completion", "last_turn", "all")
LORA_INITS = ("default", "gaussian", "pissa", "loftq")  # = lora_init.INITS
OVERLONG = ("truncate", "drop", "error")
LR_SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZER_STATES = ("float32", "bfloat16", "8bit")  # = training.optim8bit.STATE_DTYPES
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "offload")  # = models.llama.REMAT_POLICIES
MEMORY_MODES = ("default", "min")  # train.memory; = jqlora.plan --mode
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto", "grpo")  # = training.preference.OBJECTIVES + grpo
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # = training.grpo.LOSS_TYPES
GRPO_SCALE_REWARDS = ("group", "batch", "none")  # = training.grpo.SCALE_REWARDS
PREFERENCE_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")  # = training.preference.LOSS_TYPES
REFERENCES = ("base", "init")
TRUNCATION_MODES = ("keep_end", "keep_start")
SFT_EVAL_METRICS = ("eval_loss", "eval_perplexity", "eval_accuracy")  # = what run.loop.Trainer's evaluation logs

COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line naming the source and the key."""


class _Invalid(ConfigError):
    """A range check failed for `key`; `load_config` prefixes the source (file or command line) of that key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def _check(ok: bool, key: str, value: Any, requirement: str) -> None:
    if not ok:
        raise _Invalid(key, f"{key}={value!r} {requirement}")


def _one_of(value: Any, key: str, choices: tuple) -> None:
    _check(value in choices, key, value, "must be one of " + ", ".join(choices))
