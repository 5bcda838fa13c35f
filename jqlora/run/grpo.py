"""The trainer for train.objective=grpo: online RL on prompt-only data (`jqlora.data.prompts`) with reward functions
(`jqlora.training.rewards`), rollouts from jqlora's own sampler (`jqlora.models.sampling`) on the same 4-bit base,
and TRL 1.16's GRPO loss (`jqlora.training.grpo`, stepped by `jqlora.training.grpo_step`).

One loop step is one generation batch: train.grad_accum_steps micro-batches of train.batch_size completions
(batch_size / G prompts each, G = grpo.num_generations), sampled in one call (one compile per prompt / completion
bucket), scored, turned into group advantages over the whole generation batch, then trained on for
grpo.num_iterations (μ) optimizer updates (each k micro-steps; the old log-probs are the pre-update policy's, kept
when μ > 1). So train.max_steps counts generation batches and the schedule spans max_steps · μ updates, as TRL's
steps do with its default steps_per_generation = grad_accum. The KL anchor (grpo.beta > 0) is the adapter-off base
or the starting adapter (grpo.reference=init), its log-probs computed once per generation batch.

Sampling keys are fold_in(rng, step): the rng is in the checkpoint, so a resumed run samples the same completions.
Per step the log line carries TRL's metric names (reward, reward_std, rewards/<f>/mean|std, frac_reward_zero_std,
kl, clip_ratio/*, entropy, completions/*) and generation / training tokens per second apart; every train.log_every
steps the first prompt's group (prompt, completions, rewards, advantages) is one line of completions.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jqlora import parallel
from jqlora.data import BatchIterator
from jqlora.models.decode import bucket
from jqlora.models.sampling import sample_rollouts
from jqlora.run.divergence import DivergenceMonitor
from jqlora.run.metrics import finite_means
from jqlora.run.loop import Trainer
from jqlora.run.model import UserError
from jqlora.training import grpo as G_
from jqlora.training import optim
from jqlora.training import rewards as R
from jqlora.training.grpo_step import make_grpo_train_step
from jqlora.training.preference_step import base_reference

log = logging.getLogger("jqlora.train")

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
COMPLETIONS = "completions.jsonl"


class _NoDivergence(DivergenceMonitor):
    """GRPO's loss sits near 0 and changes sign: "far above its early value" means nothing for it."""

    def update(self, step, loss, window_start, grad_norm=None):
        return None


class GRPOTrainer(Trainer):
    """`Trainer` for train.objective=grpo (see the module doc)."""

    def _datasets(self, cfg, tokenizer):
        from jqlora.data.prompts import read_prompts

        if cfg.data.eval_path is not None or cfg.data.eval_fraction > 0 or cfg.data.eval_split is not None:
            log.warning("note: train.objective=grpo has no evaluation pass: data.eval_* is ignored")
        ds = read_prompts(cfg.data.path, tokenizer, split=cfg.data.split, subset=cfg.data.subset,
                          chat_template=cfg.data.chat_template, max_prompt_length=cfg.data.max_length)
        return ds, None

    def _make_iterator(self, cfg) -> BatchIterator:
        n = self.tc.batch_size // cfg.grpo.num_generations  # prompts per micro-batch
        if len(self.train_ds) < n:
            raise UserError(f"data.path {cfg.data.path}: {len(self.train_ds)} prompts make no micro-batch of {n} "
                            f"(train.batch_size / grpo.num_generations)")
        return BatchIterator(parallel.RowIds(len(self.train_ds)), n, seed=self.tc.seed, shuffle=cfg.data.shuffle,
                             drop_last=True)

    def _make_optimizer(self, cfg):
        return optim.make_optimizer(self.tc, self.total_steps * cfg.grpo.num_iterations, cfg.lora.plus_ratio)

    def _make_steps(self, cfg, ce_chunk: int) -> None:
        g = self.g = cfg.grpo
        if jax.process_count() > 1:
            raise UserError("train.objective=grpo runs on one process for now (rollouts are single-process)")
        try:
            self.reward_fns = [R.load_reward(s) for s in g.rewards]
        except R.RewardError as e:
            raise UserError(f"grpo.rewards: {e}") from None
        self.reward_names = [R.reward_name(f) for f in self.reward_fns]
        self.loss_cfg = G_.GRPOLossConfig(loss_type=g.loss_type, beta=g.beta, epsilon=g.epsilon,
                                          epsilon_high=g.epsilon_high, max_completion_length=g.max_new_tokens,
                                          temperature=g.temperature)
        k = self.tc.grad_accum_steps
        self.train_step = make_grpo_train_step(self.split, self.tx, self.loss_cfg, k)
        self.logps_fn = G_.make_logps_fn(self.split, g.temperature)
        self.eval_step = None
        self.ref_lora = None
        if g.beta > 0:
            host = jax.tree.map(jnp.asarray, parallel.to_host(self.lora))
            self.ref_lora = jax.tree.map(lambda x, like: jax.device_put(x, like.sharding),
                                         base_reference(self.split, host), self.lora)
        tok = self.tokenizer
        eos = tok.eos_token_id
        stops = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        vocab = tok.get_vocab()
        stops |= {vocab[t] for t in END_OF_TURN if t in vocab}
        self.stop_ids = sorted(int(s) for s in stops)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (eos if isinstance(eos, int) else 0)
        self.monitor = _NoDivergence(uniform_loss=None)
        self._window_metrics: list[dict] = []
        self._sample: dict | None = None
        self.completions_path = os.path.join(self.out, COMPLETIONS)

    # -- the reference and the checkpoint --------------------------------------------------------------------------

    def start_from(self) -> None:
        super().start_from()
        if self.g.beta > 0 and self.g.reference == "init":
            self.ref_lora = jax.tree.map(jnp.copy, self.lora)

    def _ckpt_tree(self) -> dict:
        tree = super()._ckpt_tree()
        if self.g.beta > 0 and self.g.reference == "init":
            tree["ref"] = self.ref_lora
        return tree

    def restore_extra(self, state: dict) -> None:
        if "ref" in state:
            self.ref_lora = state["ref"]

    def maybe_resume(self) -> bool:
        resumed = super().maybe_resume()
        if self.primary and os.path.isfile(self.completions_path):  # (lines after the checkpoint are written again)
            with open(self.completions_path) as f:
                keep = [ln for ln in f if ln.strip() and resumed and json.loads(ln).get("step", 0) <= self.step]
            with open(self.completions_path, "w") as f:
                f.writelines(keep)
        return resumed

    # -- one step ---------------------------------------------------------------------------------------------------

    def rollout(self, examples, key):
        """The generation batch's rollouts (numpy) of ``examples`` (PromptExample), G each."""
        g = self.g
        return sample_rollouts(self.split.model(self.lora), [e.ids for e in examples], num_generations=g.num_generations,
                               max_new_tokens=g.max_new_tokens, key=key, temperature=g.temperature, top_p=g.top_p,
                               top_k=g.top_k, stop_ids=self.stop_ids, pad_id=self.pad_id)

    def score(self, examples, ro) -> tuple[np.ndarray, list, list]:
        """(rewards [B, F], prompts, completions) of a rollout, by the reward functions (one line if one raises)."""
        G = self.g.num_generations
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in ro.completions()]
        prompts = [e.prompt for e in examples for _ in range(G)]
        completions = [[{"role": "assistant", "content": t}] if examples[b // G].conversational else t
                       for b, t in enumerate(texts)]
        names = sorted({k for e in examples for k in e.columns})
        columns = {k: [e.columns.get(k) for e in examples for _ in range(G)] for k in names}
        columns["completion_ids"] = ro.completions()
        try:
            rpf = R.compute_rewards(self.reward_fns, prompts, completions, columns, names=self.reward_names,
                                    prompt_index=[e.index for e in examples for _ in range(G)])
        except R.RewardError as e:
            raise UserError(f"step {self.step + 1}: {e}") from None
        return rpf, prompts, completions

    def micro_batches(self, ro, adv: np.ndarray) -> list[dict]:
        """The k micro-batches of the generation batch (completions padded to a bucket so shapes repeat)."""
        k = self.tc.grad_accum_steps
        mask = ro.completion_mask.astype(np.int32)
        if self.g.mask_truncated:
            mask = mask * (~ro.truncated)[:, None].astype(np.int32)
        C = bucket(mask.shape[1])
        pad = lambda x, v: np.pad(x, ((0, 0), (0, C - x.shape[1])), constant_values=v)  # noqa: E731
        full = {"prompt_ids": ro.prompt_ids, "prompt_mask": ro.prompt_mask,
                "completion_ids": pad(ro.completion_ids, self.pad_id), "completion_mask": pad(mask, 0),
                "advantages": adv}
        n_items = np.float32(max(mask.sum(), 1))
        rows = ro.prompt_ids.shape[0] // k
        out = []
        for j in range(k):
            mb = {name: jnp.asarray(x[j * rows:(j + 1) * rows]) for name, x in full.items()}
            mb["num_items"] = jnp.asarray(n_items)
            if self.g.num_iterations > 1:
                mb["old_logps"] = self.logps_fn(self.lora, self.split.frozen, mb)
            if self.ref_lora is not None:
                mb["ref_logps"] = self.logps_fn(self.ref_lora, self.split.frozen, mb)
            out.append(mb)
        return out

    def one_step(self) -> tuple[float, int, int]:
        """One generation batch and its μ optimizer updates; returns (the mean over the updates of the step's loss,
        completion tokens trained, input tokens)."""
        g, k = self.g, self.tc.grad_accum_steps
        examples = [self.train_ds.examples[i] for _ in range(k) for i in next(self.iterator)]
        t0 = time.perf_counter()
        ro = self.rollout(examples, jax.random.fold_in(self.rng, self.step))
        gen_s = time.perf_counter() - t0
        rpf, prompts, completions = self.score(examples, ro)
        total = R.weighted_total(rpf, g.reward_weights)
        adv, zero_std = G_.advantages(total, g.num_generations, g.scale_rewards)
        t1 = time.perf_counter()
        micro = self.micro_batches(ro, adv)
        losses, metrics = [], []
        for _ in range(g.num_iterations):
            step_loss = jnp.zeros((), jnp.float32)
            for mb in micro:
                self.lora, self.opt_state, loss, m = self.train_step(self.lora, self.opt_state, self.split.frozen, mb)
                step_loss = step_loss + loss
                metrics.append(m)
            losses.append(step_loss)
        losses = [float(x) for x in losses]  # (waits for the device)
        train_s = time.perf_counter() - t1
        self.step += 1
        trained = int(sum(int(jnp.sum(mb["completion_mask"])) for mb in micro))
        tokens = int(ro.prompt_mask.sum() + ro.completion_mask.sum())
        self.trained_tokens += trained * g.num_iterations
        rec = {**G_.rollout_metrics(rpf, self.reward_names, g.reward_weights, zero_std, ro.completion_mask,
                                    ro.truncated),
               **finite_means(metrics),
               "generation_tokens_per_s": float(ro.completion_mask.sum()) / max(gen_s, 1e-9),
               "training_tokens_per_s": tokens * g.num_iterations / max(train_s, 1e-9)}
        self._window_metrics.append(rec)
        G = g.num_generations
        self._sample = {"step": self.step, "prompt": prompts[0], "completions": completions[:G],
                        "rewards": {n: [None if np.isnan(x) else float(x) for x in rpf[:G, j]]
                                    for j, n in enumerate(self.reward_names)},
                        "reward": [None if np.isnan(x) else float(x) for x in total[:G]],
                        "advantages": [float(x) for x in adv[:G]], "truncated": [bool(x) for x in ro.truncated[:G]]}
        self.last_rollout = (examples, ro, adv, losses)  # (tests compare the loop's loss with the pure loss)
        return float(np.mean(losses)), trained, tokens

    def window_metrics(self) -> dict:
        out = finite_means(self._window_metrics)
        self._window_metrics = []
        if self.primary and self._sample is not None:
            with open(self.completions_path, "a") as f:  # one write per line, as metrics.jsonl
                f.write(json.dumps(self._sample) + "\n")
        return out

    def evaluate(self):
        return None

    def eval_samples(self) -> list[dict]:
        return []
