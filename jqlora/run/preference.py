"""The trainer for preference objectives (train.objective dpo, orpo, simpo, kto): SFT's `Trainer` with preference
data, the preference step (`jqlora.training.preference_step`), its reference adapter and TRL-named metrics.

What differs from SFT:
- data: `jqlora.data.preference` reads the records (pairs, or KTO's unpaired examples), `jqlora.data.pairs`
  collates them (chosen and rejected rows in one batch); packing is off, with a one-line note if it was asked for;
- the reference: ``preference.reference=base`` is the adapter-off base (an adapter tree of zeros, built once),
  ``init`` the adapter ``lora.init_from`` loaded, copied before the first step and kept in every checkpoint so that a
  resumed run has the same reference;
- the loss of a step is the mean over its pairs (see `jqlora.training.preference_step`), and each log line carries
  TRL's metrics (``rewards/chosen``, ..., ``logps/*``, ``logits/*``; ORPO ``nll_loss``, ``log_odds_ratio``; KTO
  ``kl``): per micro-batch as TRL computes them, averaged over the micro-batches of the logged steps, as TRL
  averages them over its logging window. Evaluation reports the same, as ``eval_<name>``.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from jqlora import parallel
from jqlora.data import eval_batches
from jqlora.data.pairs import PairDataset
from jqlora.run.divergence import DivergenceMonitor
from jqlora.run.metrics import finite_means
from jqlora.run.loop import Trainer
from jqlora.run.model import UserError
from jqlora.training.preference import Objective
from jqlora.training.preference_step import (base_reference, make_preference_eval_step, make_preference_train_step,
                                             step_keys)

log = logging.getLogger("jqlora.train")

PACKING_NOTE = "note: data.packing=true does not apply to preference data: each pair is padded to data.max_length"


def read_examples(cfg, tokenizer) -> tuple[list, list | None]:
    """(train, eval or None) examples of ``cfg.data`` as `jqlora.data.preference` reads them."""
    from jqlora.data import preference as reader

    d, p = cfg.data, cfg.preference
    kind = "unpaired" if cfg.train.objective == "kto" else "paired"

    def read(path, split):
        return reader.read_preference_examples(path, tokenizer, kind=kind, max_length=d.max_length,
                                               max_prompt_length=p.max_prompt_length,
                                               truncation_mode=p.truncation_mode, split=split,
                                               chat_template=d.chat_template, subset=d.subset)

    train = read(d.path, d.split)
    if d.eval_path is not None or d.eval_split is not None:
        return train, read(d.eval_path or d.path, d.eval_split or d.split)
    if d.eval_fraction > 0:
        order = np.random.default_rng(cfg.train.seed).permutation(len(train))
        n_eval = max(1, int(round(d.eval_fraction * len(train))))
        held = set(order[:n_eval].tolist())
        return [x for i, x in enumerate(train) if i not in held], [train[i] for i in sorted(held)]
    return train, None


class PreferenceTrainer(Trainer):
    """`Trainer` for train.objective dpo / orpo / simpo / kto. ``examples`` = (train, eval or None) token-id
    examples replace reading data.path (tests feed TRL's own tokenization this way)."""

    def __init__(self, cfg, *, examples: tuple | None = None, **kwargs):
        self._given = examples
        super().__init__(cfg, **kwargs)

    def _datasets(self, cfg, tokenizer):
        if cfg.data.packing and self.primary:
            log.warning(PACKING_NOTE)
        train, ev = self._given if self._given is not None else read_examples(cfg, tokenizer)
        if not train:
            raise UserError(f"data.path {cfg.data.path}: no preference examples")
        kind = "unpaired" if cfg.train.objective == "kto" else "paired"
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        make = lambda xs: PairDataset(xs, cfg.data.max_length, pad, kind)  # noqa: E731
        return make(train), (make(ev) if ev else None)

    def _make_steps(self, cfg, ce_chunk: int) -> None:
        self.objective = Objective.from_config(cfg.train.objective, cfg.preference)
        self.keys = step_keys(self.objective)
        self.train_step = make_preference_train_step(self.split, self.tx, self.objective, ce_chunk)
        self.eval_step = make_preference_eval_step(self.split, self.objective, ce_chunk)
        self.ref_lora = self._placed(base_reference(self.split, jax.tree.map(jnp.asarray,
                                                                             parallel.to_host(self.lora))))
        self.monitor = DivergenceMonitor(uniform_loss=None)  # (ln V means nothing for these losses)
        self._window_metrics: list[dict] = []
        self.eval_pref: dict = {}

    def _placed(self, tree):
        return jax.tree.map(lambda x, like: jax.device_put(x, like.sharding), tree, self.lora)

    # -- the reference adapter --------------------------------------------------------------------------------------

    def start_from(self) -> None:
        super().start_from()
        if self.cfg.preference.reference == "init":
            self.ref_lora = jax.tree.map(jnp.copy, self.lora)

    def _ckpt_tree(self) -> dict:
        tree = super()._ckpt_tree()
        if self.cfg.preference.reference == "init":
            tree["ref"] = self.ref_lora
        return tree

    def restore_extra(self, state: dict) -> None:
        if "ref" in state:
            self.ref_lora = state["ref"]

    # -- steps ------------------------------------------------------------------------------------------------------

    def place_batch(self, dataset, rows) -> dict[str, jax.Array]:
        keys = self.keys
        return parallel.assemble_batch(rows, lambda some: {k: v for k, v in dataset.batch(some).items() if k in keys},
                                       self.mesh)

    def one_step(self) -> tuple[float, int, int]:
        """One optimizer step (k micro-steps); returns (the step's loss, completion tokens, input tokens)."""
        k = self.tc.grad_accum_steps
        micro = [self.place_batch(self.train_ds, next(self.iterator)) for _ in range(k)]
        n_pairs = sum(jnp.sum(b["valid"]) for b in micro)
        grad_scale = jnp.float32(k) / jnp.maximum(n_pairs, 1.0)
        total, metrics = jnp.zeros((), jnp.float32), []
        for j, batch in enumerate(micro):
            key = jax.random.fold_in(self.rng, self.step * k + j)
            self.lora, self.opt_state, value, m = self.train_step(self.lora, self.opt_state, self.ref_lora,
                                                                  self.split.frozen, batch, key, grad_scale)
            total = total + value
            metrics.append(m)
        self.step += 1
        rows = slice(0, 1) if self.objective.kind == "kto" else slice(None)  # (not KTO's mismatched rows)
        trained = int(sum(jnp.sum(b["completion_mask"][:, rows]) for b in micro))
        tokens = int(sum(jnp.sum(b["segment_ids"][:, rows] > 0) for b in micro))
        self.trained_tokens += trained
        self._window_metrics.append(finite_means(metrics))
        return float(total) / k, trained, tokens

    def window_metrics(self) -> dict:
        out = finite_means(self._window_metrics)
        self._window_metrics = []
        return out

    # -- evaluation -------------------------------------------------------------------------------------------------

    def evaluate(self) -> float | None:
        if self.eval_ds is None:
            return None
        bs = self.tc.eval_batch_size or self.tc.batch_size
        losses, metrics = [], []
        for rows in eval_batches(parallel.RowIds(len(self.eval_ds)), bs, self.tc.eval_batches):
            loss, m = self.eval_step(self.lora, self.ref_lora, self.split.frozen, self.place_batch(self.eval_ds, rows))
            losses.append(float(loss))
            metrics.append(m)
        self.eval_pref = finite_means(metrics)
        return float(np.mean(losses))

    def eval_metrics(self, loss: float) -> dict:
        return {f"eval_{k}": v for k, v in self.eval_pref.items()}

    def eval_samples(self) -> list[dict]:
        return []  # (replies to the prompts: train.sample_prompt; eval samples are SFT's)


