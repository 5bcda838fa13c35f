"""GRPO (Shao et al., "DeepSeekMath", 2024) and its variants as pure functions, by TRL 1.16's definitions.

Advantages (`advantages`). B = n_prompts · G completions, a group = the G completions of one prompt (adjacent rows).
r_b = Σ_f w_f r_bf ignoring None (NaN; NaN where every function returned None: unscorable). With μ_g, σ_g the
nan-aware mean and Bessel-corrected std of the group's r and σ the batch's,

    A_b = (r_b - μ_g) / (σ_g + 1e-4)   scale_rewards="group" (TRL's default),
          (r_b - μ_g) / (σ + 1e-4)     "batch" (Liu et al., "Part I: Tricks or Traps?", 2025),
          r_b - μ_g                    "none" (Liu et al., "Dr. GRPO", 2025);

an unscorable completion gets A = 0. A group has zero std where σ_g (σ for "batch") is 0 (torch.isclose).

Loss (`grpo_loss`), per completion token t of row b with mask m_bt, policy log-prob ℓ_bt (of z / temperature), old
ℓ°_bt (the sampling-time policy; at the first of μ = num_iterations passes ℓ° = stop_gradient(ℓ)), reference ℓʳ_bt:

    w = exp(ℓ - ℓ°)                        per token (importance_sampling_level="token", TRL's default), or per row
                                           exp(Σ_t m (ℓ - ℓ°) / Σ_t m) ("sequence", GSPO);
    L_bt = -min(w A_b, clip(w, 1 - ε, 1 + ε_high) A_b) + β · KL_bt,
    KL_bt = exp(ℓʳ - ℓ) - (ℓʳ - ℓ) - 1     (Schulman's k3), times w with use_bias_correction_kl (TRL 1.16's default);

(``delta``: w capped at delta in the first term, two-sided clipping, INTELLECT-2), reduced by ``loss_type``:

    grpo     (1/B) Σ_b (Σ_t m L / max(Σ_t m, 1))             a mean of per-sequence means
    bnpo     Σ m L / max(Σ m, 1)                               over the micro-batch's tokens
    dr_grpo  Σ m L / (B · max_completion_length)
    dapo     Σ m L / N,   N = the generation batch's tokens · grad_accum / steps_per_generation (TRL's default)

and ``grad_accum`` divides grpo / bnpo / dr_grpo, as TRL does for its summed micro-gradients. β = 0 needs no
reference pass. The reference is the same model with its adapter off (`adapter_off`: every LoRA B zero, so the
delta vanishes exactly), its log-probs under stop_gradient: no second copy of the weights.

Shape letters: B rows, P prompt slots, C completion tokens, V vocabulary, D hidden, F reward functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora.lora import SplitModel

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
    """The loss's knobs, TRL 1.16's GRPOConfig defaults."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon
    delta: float | None = None
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = True
    max_completion_length: int = 512  # dr_grpo's constant denominator: the rollouts' max_new_tokens
    temperature: float = 1.0  # log-probs are of logits / temperature (temperature 0 = greedy: 1)

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(f"importance_sampling_level {self.importance_sampling_level!r}: expected token or "
                             "sequence")
        if self.beta < 0 or self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(f"need beta, epsilon, epsilon_high >= 0, got {self.beta}, {self.epsilon}, "
                             f"{self.epsilon_high}")

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


# ----------------------------------------------------------------------------------------------------------------
# Advantages and rollout metrics (host side, numpy)


@contextlib.contextmanager
def _quiet():
    """numpy's warnings for all-NaN slices and empty means off (NaN is the intended answer there)."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _nanstd(x: np.ndarray, axis=None) -> np.ndarray:
    """Bessel-corrected std ignoring NaN (NaN with fewer than 2 values), as TRL's ``nanstd``."""
    with _quiet():
        count = np.sum(~np.isnan(x), axis=axis)
        var = np.nanmean((x - np.nanmean(x, axis=axis, keepdims=True)) ** 2, axis=axis)
        return np.where(count > 1, np.sqrt(var * count / np.maximum(count - 1, 1)), np.nan)


def advantages(rewards: np.ndarray, num_generations: int, scale_rewards: str = "group"):
    """(float32 advantages ``[B]``, bool zero-std ``[B]``) from the weighted total rewards ``[B]`` (NaN: unscorable)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale_rewards!r}: expected one of {', '.join(SCALE_REWARDS)}")
    r = np.asarray(rewards, np.float64)
    G = num_generations
    if r.size % G:
        raise ValueError(f"{r.size} rewards is not a multiple of num_generations={G}")
    with _quiet():
        mean = np.repeat(np.nanmean(r.reshape(-1, G), axis=1), G)
        if scale_rewards == "batch":
            std = np.full_like(r, _nanstd(r) if r.size > 1 else 0.0)
        else:
            std = np.repeat(_nanstd(r.reshape(-1, G), axis=1), G) if G > 1 else np.zeros_like(r)
    adv = r - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    zero_std = np.abs(std) <= 1e-8  # torch.isclose(std, 0): atol 1e-8 (NaN is not close)
    return np.nan_to_num(adv, nan=0.0).astype(np.float32), zero_std


def rollout_metrics(rewards_per_func: np.ndarray, names: Sequence[str], weights: Sequence[float] | None,
                    zero_std: np.ndarray, completion_mask: np.ndarray, truncated: np.ndarray) -> dict[str, float]:
    """TRL's per-step rollout metrics: reward mean / std per function and in total, the share of zero-std groups
    (``frac_reward_zero_std``: of completions, as TRL counts), completion lengths and the share truncated."""
    from jqlora.training.rewards import weighted_total

    rpf = np.asarray(rewards_per_func, np.float64)
    out: dict[str, float] = {}
    with _quiet():
        for j, name in enumerate(names):
            out[f"rewards/{name}/mean"] = float(np.nanmean(rpf[:, j]))
            out[f"rewards/{name}/std"] = float(_nanstd(rpf[:, j]))
        total = weighted_total(rewards_per_func, weights).astype(np.float64)
        out["reward"] = float(np.nanmean(total))
        out["reward_std"] = float(_nanstd(total))
    out["frac_reward_zero_std"] = float(np.mean(zero_std))
    lengths = np.asarray(completion_mask).sum(-1).astype(np.float64)
    trunc = np.asarray(truncated, bool)
    out["completions/mean_length"] = float(lengths.mean())
    out["completions/min_length"] = float(lengths.min())
    out["completions/max_length"] = float(lengths.max())
    out["completions/clipped_ratio"] = float(trunc.mean())
    term = lengths[~trunc] if (~trunc).any() else np.zeros(1)
    out["completions/mean_terminated_length"] = float(term.mean())
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loss (pure, jax)


def grpo_loss(logps_BC: jax.Array, mask_BC: jax.Array, advantages_B: jax.Array, cfg: GRPOLossConfig, *,
              old_logps_BC: jax.Array | None = None, ref_logps_BC: jax.Array | None = None,
              num_items: jax.Array | float | None = None, grad_accum: int = 1,
              steps_per_generation: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of one micro-batch (see the module doc). ``num_items``: the completion tokens of the whole
    generation batch (dapo; default this micro-batch's). Metrics: kl (β > 0), clip_ratio/{low,high,region}_mean,
    clip_ratio/low_min, clip_ratio/high_max (TRL's names)."""
    m = mask_BC.astype(jnp.float32)
    lp = logps_BC.astype(jnp.float32)
    old = jax.lax.stop_gradient(lp) if old_logps_BC is None else old_logps_BC.astype(jnp.float32)
    A = advantages_B.astype(jnp.float32)[:, None]
    B = lp.shape[0]
    n_row = m.sum(-1)
    log_ratio = lp - old
    if cfg.importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * m).sum(-1) / jnp.maximum(n_row, 1.0))[:, None]
    w = jnp.exp(log_w)
    metrics: dict[str, jax.Array] = {}
    if cfg.beta != 0.0:
        if ref_logps_BC is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        d = ref_logps_BC.astype(jnp.float32) - lp
        kl = jnp.exp(d) - d - 1.0
        if cfg.use_bias_correction_kl:
            kl = kl * w
    w_clipped = jnp.clip(w, 1.0 - cfg.epsilon, 1.0 + cfg.eps_high)
    if cfg.delta is not None:
        w = jnp.minimum(w, cfg.delta)
    per_token = -jnp.minimum(w * A, w_clipped * A)
    if cfg.beta != 0.0:
        per_token = per_token + cfg.beta * kl
    masked = per_token * m
    if cfg.loss_type == "grpo":
        loss = jnp.mean(masked.sum(-1) / jnp.maximum(n_row, 1.0)) / grad_accum
    elif cfg.loss_type == "bnpo":
        loss = masked.sum() / jnp.maximum(m.sum(), 1.0) / grad_accum
    elif cfg.loss_type == "dr_grpo":
        loss = masked.sum() / (B * cfg.max_completion_length) / grad_accum
    else:  # dapo
        n = m.sum() if num_items is None else jnp.asarray(num_items, jnp.float32)
        loss = masked.sum() / (jnp.maximum(n, 1.0) * grad_accum / steps_per_generation)

    def global_mean(x):
        if x.shape[1] == 1:
            return jnp.mean(x)
        return (x * m).sum() / jnp.maximum(m.sum(), 1.0)

    def seq_mean(x):
        return x[:, 0] if x.shape[1] == 1 else (x * m).sum(-1) / n_row

    if cfg.beta != 0.0:
        metrics["kl"] = global_mean(kl)
    low = ((w < 1.0 - cfg.epsilon) & (A < 0)).astype(jnp.float32)
    high = ((w > 1.0 + cfg.eps_high) & (A > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    metrics["clip_ratio/low_mean"] = global_mean(low)
    metrics["clip_ratio/high_mean"] = global_mean(high)
    metrics["clip_ratio/region_mean"] = global_mean(region)
    metrics["clip_ratio/low_min"] = jnp.nanmin(seq_mean(low))
    metrics["clip_ratio/high_max"] = jnp.nanmax(seq_mean(high))
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# Over the model: per-token log-probs of the completions, the reference, the loss and its gradient

BATCH_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")


def completion_logps(model: nnx.Module, batch: dict, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """float32 (log-probs ``[B, C]``, entropies ``[B, C]``) of each completion token under softmax(z / temperature),
    z the logits after prompt + the completion before it. Left-padded prompts: positions start at each row's first
    real token, padding is its own segment (RoPE is relative, so this equals TRL's unshifted positions)."""
    prompt_BP, completion_BC = jnp.asarray(batch["prompt_ids"]), jnp.asarray(batch["completion_ids"])
    P, C = prompt_BP.shape[1], completion_BC.shape[1]
    live_BS = jnp.concatenate([jnp.asarray(batch["prompt_mask"]), jnp.asarray(batch["completion_mask"])], 1)
    live_BS = live_BS.astype(jnp.int32)
    pos_BS = jnp.maximum(jnp.cumsum(live_BS, axis=1) - 1, 0)
    ids_BS = jnp.concatenate([prompt_BP, completion_BC], 1)
    h_BSD = model.hidden_states(ids_BS, live_BS, pos_BS, deterministic=True)
    h_BCD = h_BSD[:, P - 1:P + C - 1]
    logits_BCV = jax.lax.dot_general(h_BCD, model.lm_head_weight(), (((2,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
    cap = model.config.final_softcap
    if cap is not None:
        logits_BCV = jnp.tanh(logits_BCV / cap) * cap
    logits_BCV = logits_BCV / (temperature if temperature > 0 else 1.0)
    logp_BCV = jax.nn.log_softmax(logits_BCV, axis=-1)
    logp_BC = jnp.take_along_axis(logp_BCV, completion_BC[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy_BC = -jnp.sum(jnp.exp(logp_BCV) * logp_BCV, axis=-1)
    return logp_BC, entropy_BC


_B_LEAVES = ("lora_b", "lora_embedding_b")


def adapter_off(lora: dict) -> dict:
    """The LoRA params with every B zero (the adapter's delta vanishes: the frozen base, the reference model)."""

    def zero(path, x):
        name = getattr(path[-1], "key", None)
        if name == "magnitude":
            raise ValueError("the adapter-off reference of a DoRA adapter is not implemented (set grpo.beta: 0)")
        return jnp.zeros_like(x) if name in _B_LEAVES else x

    return jax.tree_util.tree_map_with_path(zero, lora)


def make_logps_fn(split: SplitModel, temperature: float = 1.0) -> Callable:
    """jitted logps(lora, frozen, batch) -> float32 ``[B, C]`` (no gradient): the old policy's, or with
    `adapter_off` (lora) the reference's."""

    def logps(lora, frozen, batch):
        model = nnx.merge(split.graphdef, split.to_state(lora), frozen)
        return jax.lax.stop_gradient(completion_logps(model, batch, temperature)[0])

    return jax.jit(logps)


def make_grpo_grad_fn(split: SplitModel, cfg: GRPOLossConfig) -> Callable:
    """grad_fn(lora, frozen, batch) -> (∇_lora loss, (loss, metrics)); not jitted.

    ``batch``: `BATCH_KEYS`, ``advantages`` [B], optional ``old_logps`` [B, C] (μ > 1), ``ref_logps`` [B, C] (else,
    with β > 0, the reference pass runs here, the adapter off under stop_gradient), optional ``num_items``."""

    def objective(lora, frozen, batch):
        model = nnx.merge(split.graphdef, split.to_state(lora), frozen)
        logps, entropy = completion_logps(model, batch, cfg.temperature)
        ref = batch.get("ref_logps")
        if cfg.beta != 0.0 and ref is None:
            ref_model = nnx.merge(split.graphdef, split.to_state(adapter_off(jax.lax.stop_gradient(lora))), frozen)
            ref = jax.lax.stop_gradient(completion_logps(ref_model, batch, cfg.temperature)[0])
        loss, metrics = grpo_loss(logps, jnp.asarray(batch["completion_mask"]), jnp.asarray(batch["advantages"]),
                                  cfg, old_logps_BC=batch.get("old_logps"), ref_logps_BC=ref,
                                  num_items=batch.get("num_items"))
        m = jnp.asarray(batch["completion_mask"], jnp.float32)
        metrics["entropy"] = (entropy * m).sum() / jnp.maximum(m.sum(), 1.0)
        return loss, (loss, metrics)

    def grad_fn(lora, frozen, batch):
        grads, aux = jax.grad(objective, has_aux=True)(lora, frozen, batch)
        return grads, aux

    return grad_fn
