"""The oracle: jqlora's preference training equals TRL 1.16's own trainers step for step.

One tiny Llama (hidden 64, 2 layers, vocab 512) quantized to NF4 + double quantization by bitsandbytes and saved
(a *-bnb-4bit checkpoint, so both sides hold the very same 4-bit codes), one peft adapter with random non-zero A and
B (so the first step is not trivial), the same preference records in the same order (TRL's sampler made sequential,
jqlora's data.shuffle=false), 2 pairs per micro-batch and 2 micro-batches per step, AdamW with the same settings, a
constant learning rate. TRL trains the peft model; jqlora starts from the same adapter (lora.init_from) and is fed
the token ids TRL's own tokenization made (until jqlora.data.preference lands). Reference: DPO / KTO given a trained
adapter use a frozen copy of it ("ref", TRL) = preference.reference=init (jqlora); a fresh peft_config adapter in
TRL uses the adapter-off base = preference.reference=base. Compared over 5 steps: the loss (2e-5) and every metric
TRL logs (rewards/*, logps/*, logits/*, nll_loss, log_odds_ratio, kl: 1e-4).
"""

from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import trl  # noqa: E402  (the oracle: imported, never skipped)
import peft  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402

from tiny import bnb_model, make_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH, ACCUM, LR, EPS = 5, 2, 2, 3e-3, 1e-6
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = "red green blue river stone cloud apple tiger seven paper".split()


def _records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        out.append({"prompt": f"Q{i}: say {w}" + " please" * (i % 3),
                    "chosen": f" {w}" + f" {WORDS[(i + 3) % 10]}" * (i % 4),
                    "rejected": " no" + f" {WORDS[(i + 5) % 10]}" * ((i * 7) % 5 + 1)})
    return out


def _unpaired(n: int) -> list[dict]:
    recs = _records(n)
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
            for i, r in enumerate(recs)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref_trl")
    src = make_model(root / "src", "llama", torch.float32, vocab_size=512, hidden_size=64, intermediate_size=128,
                     max_position_embeddings=128)
    bnb = root / "bnb"
    bnb_model(src).save_pretrained(bnb)
    for p in (src, bnb):
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(REPO / "tests" / "fixtures" / "tokenizer" / name, p / name)
    torch.manual_seed(0)
    model = peft.get_peft_model(_base(bnb), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                            target_modules=MODULES))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "adapter")
    (root / "dummy.jsonl").write_text("{}\n")
    return types.SimpleNamespace(root=root, bnb=bnb, adapter=root / "adapter",
                                 tok=transformers.AutoTokenizer.from_pretrained(bnb))


def _base(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").train()


class _Log(transformers.TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def _sequential(cls):
    class Sequential(cls):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return Sequential


def _args(out, **kw):
    return dict(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, adam_epsilon=EPS,
                weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to="none", save_strategy="no",
                use_cpu=True, seed=0, gradient_checkpointing=False, bf16=False, **kw)


def _train_trl(world, cls, cfg_cls, data, fresh_adapter: bool, **cfg):
    base = _base(world.bnb)
    kwargs = {}
    if fresh_adapter:  # peft_config: a new adapter in TRL, its reference the adapter-off base
        model = base
        kwargs["peft_config"] = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=MODULES)
    else:  # a trained adapter: TRL's DPO / KTO keep a frozen copy ("ref") as the reference
        model = peft.PeftModel.from_pretrained(base, world.adapter, is_trainable=True)
    log = _Log()
    trainer = _sequential(cls)(model=model, args=cfg_cls(**_args(world.root / f"trl_{cls.__name__}", **cfg)),
                               train_dataset=Dataset.from_list(data), processing_class=world.tok, callbacks=[log],
                               **kwargs)
    _float32_adapters(trainer.model)
    if fresh_adapter:  # its (random A, zero B) start, which jqlora then loads
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn_like(p))
        trainer.model.save_pretrained(world.root / "fresh_adapter")
    ds = trainer.train_dataset
    trainer.train()
    return log.logs, ds


def _float32_adapters(model):
    """TRL 1.16's DPO / KTO cast a quantized model's trainable adapters to bfloat16 (after copying them, in float32,
    to the "ref" adapter); both sides train float32 adapters here: the policy's back from the float32 copy."""
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            ref = name.replace(".default.", ".ref.")
            has_ref = ref != name and ref in dict(model.named_parameters())
            p.data = model.get_parameter(ref).data.clone() if has_ref else p.data.float()


def _pairs_from_dpo(ds):
    return [types.SimpleNamespace(prompt=r["prompt_ids"], chosen=r["chosen_ids"], rejected=r["rejected_ids"])
            for r in ds]


def _pairs_from_cpo(ds):
    """CPO / ORPO tokenize prompt + completion whole; the prompt is where the labels are -100."""
    out = []
    for r in ds:
        n = sum(1 for x in r["chosen_labels"] if x == -100)
        m = sum(1 for x in r["rejected_labels"] if x == -100)
        assert n == m and r["chosen_input_ids"][:n] == r["rejected_input_ids"][:m]
        out.append(types.SimpleNamespace(prompt=r["chosen_input_ids"][:n], chosen=r["chosen_input_ids"][n:],
                                         rejected=r["rejected_input_ids"][m:]))
    return out


def _train_jq(world, objective, examples, adapter, *overrides):
    from jqlora.config import load_config
    from jqlora.run import PreferenceTrainer

    out = world.root / f"jq_{objective}_{len(list(world.root.iterdir()))}"
    cfg = load_config(None, [
        f"model.path={world.bnb}", f"data.path={world.root / 'dummy.jsonl'}", f"output_dir={out}",
        f"lora.init_from={adapter}", "lora.r=8", "lora.alpha=16", "lora.dropout=0", "data.max_length=48",
        "data.shuffle=false", f"train.batch_size={BATCH}", f"train.grad_accum_steps={ACCUM}",
        f"train.max_steps={STEPS}", f"train.learning_rate={LR}", "train.lr_schedule=constant", "train.warmup_steps=0",
        f"train.adam_eps={EPS}", "train.weight_decay=0", "train.max_grad_norm=1.0", "train.log_every=1",
        "train.eval_every=0", "log.tensorboard=false", f"train.objective={objective}", *overrides])
    trainer = PreferenceTrainer(cfg, examples=(examples, None), export=False, progress=False)
    assert trainer.run() == 0
    return [r for r in trainer.run_dir.read_metrics() if "loss" in r]


def _compare(theirs, ours, keys):
    assert len(theirs) == len(ours) == STEPS
    worst = {}
    for t, o in zip(theirs, ours):
        assert abs(t["loss"] - o["loss"]) < 2e-5, (t, o)
        worst["loss"] = max(worst.get("loss", 0.0), abs(t["loss"] - o["loss"]))
        for k in keys:
            if k in t:
                assert k in o, k
                assert abs(t[k] - o[k]) < 1e-4, (k, t[k], o[k])
                worst[k] = max(worst.get(k, 0.0), abs(t[k] - o[k]))
    print("max |TRL - jqlora|:", json.dumps(worst))
    return worst


REWARDS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected"]
LOGITS = ["logits/chosen", "logits/rejected"]
N = STEPS * BATCH * ACCUM


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_equals_trl(world, loss_type):
    """sigmoid from a trained adapter (reference=init: the first loss is ln 2); ipo from a fresh one (reference=base)."""
    fresh = loss_type == "ipo"
    theirs, ds = _train_trl(world, trl.DPOTrainer, trl.DPOConfig, _records(N), fresh, beta=0.1,
                            loss_type=[loss_type], max_length=48)
    adapter = world.root / "fresh_adapter" if fresh else world.adapter
    ours = _train_jq(world, "dpo", _pairs_from_dpo(ds), adapter, f"preference.loss_type={loss_type}",
                     f"preference.reference={'base' if fresh else 'init'}")
    if not fresh:
        assert abs(ours[0]["loss"] - np.log(2)) < 1e-6 and abs(theirs[0]["loss"] - np.log(2)) < 1e-6
    _compare(theirs, ours, REWARDS + LOGITS)


def test_simpo_equals_trl_cpo(world):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    theirs, ds = _train_trl(world, CPOTrainer, CPOConfig, _records(N), False, loss_type="simpo", cpo_alpha=0.0,
                            beta=2.0, simpo_gamma=0.5, max_length=48)
    ours = _train_jq(world, "simpo", _pairs_from_cpo(ds), world.adapter, "preference.beta=2.0",
                     "preference.simpo_gamma=0.5")
    _compare(theirs, ours, REWARDS + ["nll_loss"])


def test_orpo_equals_trl(world):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    theirs, ds = _train_trl(world, ORPOTrainer, ORPOConfig, _records(N), False, beta=0.1, max_length=48)
    ours = _train_jq(world, "orpo", _pairs_from_cpo(ds), world.adapter, "preference.beta=0.1")
    _compare(theirs, ours, REWARDS + ["nll_loss", "log_odds_ratio", "log_odds_chosen"])


def test_kto_equals_trl(world):
    theirs, ds = _train_trl(world, trl.KTOTrainer, trl.KTOConfig, _unpaired(N), False, beta=0.1, max_length=48,
                            train_sampling_strategy="sequential")
    ex = [types.SimpleNamespace(prompt=r["prompt_ids"], completion=r["completion_ids"], label=r["label"])
          for r in ds]
    ours = _train_jq(world, "kto", ex, world.adapter, "preference.reference=init")
    _compare(theirs, ours, ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                            "logps/rejected"] + LOGITS)
