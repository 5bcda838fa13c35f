"""Pretrain the demo's tiny base model on `assets/demo/pretrain.txt`, deterministically and offline.

    python tools/make_demo_model.py [--assets assets/demo] [--steps 600]

A 4-layer Llama (hidden 128, MLP 256, 4 query / 2 key-value heads, vocab 512 = the demo tokenizer's), initialized
as transformers initializes Llama (torch seed 0), then trained on every parameter with AdamW on the pretraining text
(one line per document, `<|endoftext|>` before each) until it knows every capital in it. It has never seen a chat
template: the demo's QLoRA run teaches it the chat format on 24 countries, and its held-out questions ask about the
other 8, whose facts it knows only from this pretraining.

The weights (bfloat16, about 1.4 MB) are committed in assets/demo/model/, so the demo needs neither this script nor
torch; rerun it (it needs torch and transformers) only when the demo's data or architecture change. It prints the
final loss and the greedy answers of the base model to plain-text questions, as a check.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "demo"
SEED = 0
ARCH = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def pretrain(assets: Path = ASSETS, steps: int = 600, batch: int = 32, lr: float = 3e-3) -> Path:
    import torch
    import transformers

    out = assets / "model"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    lines = (assets / "pretrain.txt").read_text(encoding="utf-8").splitlines()
    docs = [[tok.pad_token_id] + tok(line, add_special_tokens=False)["input_ids"] for line in lines]
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    config = transformers.LlamaConfig(**ARCH, bos_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    rng = random.Random(SEED)
    width = max(len(d) for d in docs)
    for step in range(steps):
        rows = [rng.choice(docs) for _ in range(batch)]
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        labels = torch.tensor([r[1:] + [-100] * (width - len(r) + 1) for r in rows])
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()
    for q in ("What is the capital of France?", "Which city is the capital of Japan?"):
        ids = torch.tensor([[tok.pad_token_id] + tok(q, add_special_tokens=False)["input_ids"]])
        gen = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        print(f"  {q} ->{tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)}")
    model.config.architectures = ["LlamaForCausalLM"]
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", default=str(ASSETS))
    p.add_argument("--steps", type=int, default=600)
    args = p.parse_args()
    out = pretrain(Path(args.assets), args.steps)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 1e6:.2f} MB of weights)")


if __name__ == "__main__":
    main()
