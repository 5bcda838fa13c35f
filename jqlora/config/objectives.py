"""The post-training sections of the schema: `preference` (DPO, ORPO, SimPO, KTO) and `grpo`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from jqlora.config.base import GRPO_LOSS_TYPES, GRPO_SCALE_REWARDS, PREFERENCE_LOSS_TYPES, REFERENCES, \
    TRUNCATION_MODES, _check, _one_of


@dataclass(frozen=True)
class PreferenceConfig:
    beta: float = 0.1  # DPO / KTO: the strength of the reference anchor; ORPO: the odds-ratio weight; SimPO: the scale
    loss_type: str = "sigmoid"  # dpo: sigmoid (DPO; cDPO with label_smoothing) | ipo | hinge | robust (TRL's names)
    label_smoothing: float = 0.0  # dpo sigmoid (cDPO) / robust, simpo: the probability a label is flipped, [0, 0.5)
    simpo_gamma: float = 0.5  # simpo: the target reward margin gamma (TRL's CPO simpo_gamma)
    cpo_alpha: float = 0.0  # simpo: weight of the chosen completions' NLL (TRL's CPO cpo_alpha; 0 is SimPO)
    kto_desirable_weight: float = 1.0  # kto: weight of the desirable examples' losses
    kto_undesirable_weight: float = 1.0  # kto: weight of the undesirable examples' losses
    # dpo / kto: base (the adapter-off 4-bit base) | init (the starting adapter, after lora.init_from); docs/guide.md
    reference: str = "base"
    max_prompt_length: Optional[int] = None  # prompt tokens kept (its start is cut first); null: no limit of its own
    truncation_mode: str = "keep_end"  # which end of an overlong prompt is kept: keep_end | keep_start

    def __post_init__(self):
        _check(isinstance(self.beta, (int, float)) and self.beta > 0, "preference.beta", self.beta, "must be > 0")
        _one_of(self.loss_type, "preference.loss_type", PREFERENCE_LOSS_TYPES)
        _check(0.0 <= self.label_smoothing < 0.5, "preference.label_smoothing", self.label_smoothing,
               "must be in [0, 0.5)")
        _check(self.loss_type in ("sigmoid", "robust") or self.label_smoothing == 0, "preference.label_smoothing",
               self.label_smoothing, f"applies to loss_type sigmoid / robust, not {self.loss_type}: set it to 0")
        _check(self.simpo_gamma >= 0, "preference.simpo_gamma", self.simpo_gamma, "must be >= 0")
        _check(self.cpo_alpha >= 0, "preference.cpo_alpha", self.cpo_alpha, "must be >= 0")
        _check(self.kto_desirable_weight > 0, "preference.kto_desirable_weight", self.kto_desirable_weight,
               "must be > 0")
        _check(self.kto_undesirable_weight > 0, "preference.kto_undesirable_weight", self.kto_undesirable_weight,
               "must be > 0")
        _one_of(self.reference, "preference.reference", REFERENCES)
        if self.max_prompt_length is not None:
            _check(self.max_prompt_length >= 1, "preference.max_prompt_length", self.max_prompt_length,
                   "must be >= 1 (or null)")
        _one_of(self.truncation_mode, "preference.truncation_mode", TRUNCATION_MODES)


@dataclass(frozen=True)
class GRPOConfig:
    # reward functions, "package.module:function" or "package.module:factory(k=v)" (TRL's signature); required
    rewards: Any = field(default_factory=list, hash=False)
    reward_weights: Any = field(default=None, hash=False)  # null: 1 for every function; else one number per function
    num_generations: int = 8  # completions sampled per prompt (G); train.batch_size counts completions
    max_new_tokens: int = 256  # completion tokens sampled at most (TRL's max_completion_length)
    temperature: float = 1.0  # sampling temperature (0: greedy); log-probs are of logits / temperature
    top_p: float = 1.0  # nucleus sampling (1: off)
    top_k: int = 0  # top-k sampling (0: off)
    mask_truncated: bool = False  # completions that hit max_new_tokens without a stop token get no loss
    scale_rewards: str = "group"  # advantages divided by the group's reward std | batch | none (Dr. GRPO)
    epsilon: float = 0.2  # clipping of the importance ratio below (1 - epsilon)
    epsilon_high: Optional[float] = None  # clipping above (1 + epsilon_high); null: epsilon (DAPO uses 0.28)
    num_iterations: int = 1  # mu: optimizer updates per generation batch (old log-probs kept when > 1)
    beta: float = 0.0  # weight of the k3 KL to the reference (0: no reference pass)
    loss_type: str = "dapo"  # dapo | grpo | bnpo | dr_grpo (TRL 1.16's definitions)
    # the KL anchor: base (the adapter-off 4-bit base) | init (the starting adapter, after lora.init_from)
    reference: str = "base"

    def __post_init__(self):
        rewards = [self.rewards] if isinstance(self.rewards, str) else self.rewards
        _check(isinstance(rewards, (list, tuple)) and all(isinstance(r, str) and r.strip() for r in rewards),
               "grpo.rewards", self.rewards, "must be a list of 'package.module:function' strings")
        object.__setattr__(self, "rewards", tuple(rewards))
        if self.reward_weights is not None:
            w = self.reward_weights
            ok = isinstance(w, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                      for x in w)
            _check(ok, "grpo.reward_weights", w, "must be null or a list of numbers")
            _check(len(w) == len(rewards), "grpo.reward_weights", list(w),
                   f"must have one weight per reward function ({len(rewards)})")
            object.__setattr__(self, "reward_weights", tuple(float(x) for x in w))
        _check(self.num_generations >= 2, "grpo.num_generations", self.num_generations,
               "must be >= 2 (advantages compare the completions of one prompt)")
        _check(self.max_new_tokens >= 1, "grpo.max_new_tokens", self.max_new_tokens, "must be >= 1")
        _check(self.temperature >= 0, "grpo.temperature", self.temperature, "must be >= 0")
        _check(0 < self.top_p <= 1, "grpo.top_p", self.top_p, "must be in (0, 1]")
        _check(self.top_k >= 0, "grpo.top_k", self.top_k, "must be >= 0 (0: off)")
        _one_of(self.scale_rewards, "grpo.scale_rewards", GRPO_SCALE_REWARDS)
        _check(self.epsilon >= 0, "grpo.epsilon", self.epsilon, "must be >= 0")
        if self.epsilon_high is not None:
            _check(self.epsilon_high >= 0, "grpo.epsilon_high", self.epsilon_high, "must be >= 0 (or null)")
        _check(self.num_iterations >= 1, "grpo.num_iterations", self.num_iterations, "must be >= 1")
        _check(self.beta >= 0, "grpo.beta", self.beta, "must be >= 0")
        _one_of(self.loss_type, "grpo.loss_type", GRPO_LOSS_TYPES)
        _one_of(self.reference, "grpo.reference", REFERENCES)
