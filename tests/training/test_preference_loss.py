"""The pure preference objectives against TRL 1.16's own loss code on the same log-probs, in float64.

TRL's DPO / KTO losses live inside `_compute_loss`, which calls the model: it is run here on a stand-in model that
returns given per-token log-probs (and the reference log-probs come in the batch, as with precompute_ref_log_probs),
so the numbers compared are TRL's own arithmetic. CPO (SimPO) and ORPO have their loss as methods of their own."""

from __future__ import annotations

import os
import types
from collections import defaultdict

import jax
import numpy as np
import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import trl  # noqa: E402  (the oracle: imported, never skipped)
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

from jqlora.training import preference as P  # noqa: E402

B, S = 6, 12


class _Accel:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def unwrap_model(self, m):
        return m


class _Model(torch.nn.Module):
    """Returns the given per-token log-probs (per input tensor) as TRL's fused LM head would."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids=None, **kw):
        lp, ml = self.table[id(input_ids)]
        return types.SimpleNamespace(log_probs=lp, mean_logits=ml, entropy=torch.zeros_like(lp),
                                     is_top1=torch.zeros_like(lp, dtype=torch.bool), aux_loss=None)


def _case(seed, rows):
    g = np.random.default_rng(seed)
    prompt = g.integers(1, 5, rows)
    comp = g.integers(1, S - 6, rows)
    mask = np.zeros((rows, S), np.int64)
    for i in range(rows):
        mask[i, prompt[i]:prompt[i] + comp[i]] = 1
    tok = -g.gamma(2.0, 0.6, (rows, S - 1)) * mask[:, 1:]  # per-token log-probs on the completion targets
    ref = -g.gamma(2.0, 0.6, (rows, S - 1)) * mask[:, 1:]
    mean_logits = g.normal(size=(rows, S - 1)) * mask[:, 1:]
    return mask, tok, ref, mean_logits


def _trl_metrics(m):
    return {k: float(np.mean(v)) for k, v in m.items()}


def _fake(cls, **attrs):
    self = cls.__new__(cls)
    torch.nn.Module.__init__(self) if isinstance(self, torch.nn.Module) else None
    base = dict(accelerator=_Accel(), aux_loss_enabled=False, _metrics={"train": defaultdict(list),
                                                                           "eval": defaultdict(list)},
                _total_train_tokens=0, _tp_size=1, precompute_ref_logps=True, ld_alpha=None,
                f_divergence_type="reverse_kl", use_weighting=False, loss_weights=[1.0])
    for k, v in {**base, **attrs}.items():
        object.__setattr__(self, k, v)
    return self


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0),
                                           ("robust", 0.2)])
def test_dpo_equals_trl(loss_type, eps):
    mask, tok, ref, ml = _case(1, 2 * B)
    ids = torch.zeros((2 * B, S), dtype=torch.long)
    model = _Model({id(ids): (torch.tensor(tok), torch.tensor(ml))})
    model.training = True
    ref_logps = torch.tensor(ref.sum(1))
    trainer = _fake(trl.DPOTrainer, model=model, loss_types=[loss_type], beta=0.3, label_smoothing=eps)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.tensor(mask),
              "ref_chosen_logps": ref_logps[:B], "ref_rejected_logps": ref_logps[B:]}
    want = float(trl.DPOTrainer._compute_loss(trainer, model, inputs, False))
    want_m = _trl_metrics(trainer._metrics["train"])

    with jax.enable_x64(True):
        lp, rlp, n = tok.sum(1), ref.sum(1), mask.sum(1).astype(np.float64)
        mls = ml.sum(1)
        obj = P.Objective("dpo", beta=0.3, loss_type=loss_type, label_smoothing=eps)
        got = P.paired_loss(obj, P.PairStats(lp[:B], lp[B:], mls[:B], mls[B:]), P.PairStats(rlp[:B], rlp[B:]),
                            P.PairMasks(n[:B], n[B:], np.ones(B)))
        assert abs(float(got.loss(B)) - want) < 1e-12
        for k, v in got.metrics.items():
            assert abs(float(v) - want_m[k]) < 1e-12, k


def test_cdpo_label_smoothing_equals_trl_cpo_sigmoid():
    """cDPO (sigmoid with ε > 0): TRL 1.16's CPO sigmoid is the same formula on its logits (π_c - π_r there, the
    DPO margin Δ here)."""
    g = np.random.default_rng(2)
    delta = g.normal(size=B) * 5
    cpo = _fake(CPOTrainer, alpha=0.0, loss_type="sigmoid", beta=0.2, label_smoothing=0.15)
    want, _, _ = CPOTrainer.cpo_loss(cpo, torch.tensor(delta), torch.zeros(B,
                                                                                                 dtype=torch.float64))
    with jax.enable_x64(True):
        obj = P.Objective("dpo", beta=0.2, loss_type="sigmoid", label_smoothing=0.15)
        z = np.zeros(B)
        got = P.dpo(obj, P.PairStats(delta, z), P.PairStats(z, z), P.PairMasks(np.ones(B), np.ones(B), np.ones(B)))
        assert abs(float(got.loss(B)) - float(want.mean())) < 1e-12


@pytest.mark.parametrize("alpha,eps", [(0.0, 0.0), (1.0, 0.1)])
def test_simpo_equals_trl_cpo(alpha, eps):
    mask, tok, _, ml = _case(3, 2 * B)
    n = mask.sum(1).astype(np.float64)
    lp = tok.sum(1)
    avg = torch.tensor(lp / n)
    nll_sum, nll_count = -tok[:B].sum(), mask[:B].sum()
    cpo = _fake(CPOTrainer, alpha=0.0, loss_type="simpo", beta=2.0, label_smoothing=eps,
                simpo_gamma=0.7, cpo_alpha=alpha)
    losses, rc, rr = CPOTrainer.cpo_loss(cpo, avg[:B], avg[B:])
    want = float(losses.mean()) + alpha * float(nll_sum / nll_count)  # get_batch_loss_metrics' sum
    with jax.enable_x64(True):
        obj = P.Objective("simpo", beta=2.0, label_smoothing=eps, simpo_gamma=0.7, cpo_alpha=alpha)
        got = P.paired_loss(obj, P.PairStats(lp[:B], lp[B:]), None,
                            P.PairMasks(n[:B], n[B:], np.ones(B), nll_sum, nll_count))
        assert abs(float(got.loss(B)) - want) < 1e-12
        assert abs(float(got.metrics["rewards/chosen"]) - float(rc.mean())) < 1e-12
        assert abs(float(got.metrics["rewards/accuracies"]) - float((rc > rr).double().mean())) < 1e-12
        assert abs(float(got.metrics["rewards/margins"]) - float((rc - rr).mean())) < 1e-12


def test_orpo_equals_trl():
    """(TRL's odds_ratio_loss casts to float32 first: 1e-6 here, float32's resolution on these values.)"""
    mask, tok, _, _ = _case(4, 2 * B)
    tok[0, :] = tok[0, :] * 0.01  # a log-prob near 0 (above -ln 2): the other branch of log(1 - e^x)
    n = mask.sum(1).astype(np.float64)
    lp = tok.sum(1)
    avg = torch.tensor(lp / n)
    nll = 1.7
    orpo = _fake(ORPOTrainer, beta=0.25)
    losses, rc, rr, ratio, odds = ORPOTrainer.odds_ratio_loss(orpo, avg[:B], avg[B:])
    want = nll - float(losses.mean())  # get_batch_loss_metrics: policy_nll_loss - losses.mean()
    with jax.enable_x64(True):
        obj = P.Objective("orpo", beta=0.25)
        got = P.paired_loss(obj, P.PairStats(lp[:B], lp[B:]), None,
                            P.PairMasks(n[:B], n[B:], np.ones(B), np.float64(nll * 10), np.float64(10)))
        assert abs(float(got.loss(B)) - want) < 1e-6
        assert abs(float(got.metrics["log_odds_ratio"]) - float(ratio)) < 1e-6
        assert abs(float(got.metrics["log_odds_chosen"]) - float(odds)) < 1e-6
        assert abs(float(got.metrics["rewards/rejected"]) - float(rr.mean())) < 1e-6
        assert abs(float(got.metrics["nll_loss"]) - nll) < 1e-6


@pytest.mark.parametrize("labels", [[1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
def test_kto_equals_trl(labels):
    mask, tok, ref, ml = _case(5, 2 * B)
    ids, kl_ids = torch.zeros((B, S), dtype=torch.long), torch.ones((B, S), dtype=torch.long)
    model = _Model({id(ids): (torch.tensor(tok[:B]), torch.tensor(ml[:B])),
                    id(kl_ids): (torch.tensor(tok[B:]), torch.tensor(ml[B:]))})
    model.training = True
    trainer = _fake(trl.KTOTrainer, model=model, calculate_KL=True, loss_type="kto", beta=0.4,
                    desirable_weight=1.3, undesirable_weight=0.8)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.tensor(mask[:B]),
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
              "KL_completion_mask": torch.tensor(mask[B:]), "label": torch.tensor(labels, dtype=torch.bool),
              "ref_logps": torch.tensor(ref[:B].sum(1)), "ref_KL_logps": torch.tensor(ref[B:].sum(1))}
    want = float(trl.KTOTrainer._compute_loss(trainer, model, inputs, False))
    want_m = _trl_metrics(trainer._metrics["train"])
    with jax.enable_x64(True):
        obj = P.Objective("kto", beta=0.4, desirable_weight=1.3, undesirable_weight=0.8)
        pol = P.KtoStats(tok[:B].sum(1), tok[B:].sum(1), ml[:B].sum(1))
        rf = P.KtoStats(ref[:B].sum(1), ref[B:].sum(1))
        got = P.kto(obj, pol, rf, P.KtoMasks(np.asarray(labels, np.float64), mask[:B].sum(1) * 1.0, np.ones(B)))
        assert abs(float(got.loss(B)) - want) < 1e-12
        for k, v in got.metrics.items():
            if np.isnan(float(v)):
                assert k not in want_m, k
            else:
                assert abs(float(v) - want_m[k]) < 1e-12, k
        assert {k for k in want_m if k.startswith(("rewards", "logps", "logits", "kl"))} <= set(got.metrics)


def test_padding_rows_do_not_count():
    """A padding pair (valid 0) changes neither the loss sum nor any metric (an invariant)."""
    with jax.enable_x64(True):
        g = np.random.default_rng(6)
        lp, rlp = -g.gamma(2, 1, 2 * B), -g.gamma(2, 1, 2 * B)
        n = np.full(2 * B, 3.0)
        obj = P.Objective("dpo", beta=0.1)
        full = P.dpo(obj, P.PairStats(lp[:B], lp[B:]), P.PairStats(rlp[:B], rlp[B:]), P.PairMasks(n[:B], n[B:],
                                                                                                   np.ones(B)))
        pad = lambda x: np.concatenate([x, [-50.0]])  # noqa: E731
        padded = P.dpo(obj, P.PairStats(pad(lp[:B]), pad(lp[B:])), P.PairStats(pad(rlp[:B]), pad(rlp[B:])),
                       P.PairMasks(pad(n[:B]), pad(n[B:]), np.r_[np.ones(B), 0.0]))
        assert abs(float(full.loss_sum) - float(padded.loss_sum)) < 1e-12
        for k in full.metrics:
            assert abs(float(full.metrics[k]) - float(padded.metrics[k])) < 1e-12, k
