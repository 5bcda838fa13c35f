"""Build the demo's tiny base model, deterministically and offline.

    python tools/make_demo_model.py [--out assets/demo/model]

writes config.json, generation_config.json and model.safetensors (bfloat16, about 1.3 MB) next to the demo
tokenizer: a 4-layer Llama (hidden 128, MLP 256, 4 query / 2 key-value heads, vocab 512 = the demo tokenizer's),
randomly initialized as transformers initializes Llama (normal(0, 0.02) matrices, unit norms; lm_head with
std 1/√hidden, see below) from numpy seed 0.
No torch needed: `python -m jqlora.train` calls `build` when the weights are missing, so the demo runs on a fresh
clone installed with plain `pip install -e .`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "demo" / "model"
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


def _special_ids(out: Path) -> dict:
    """bos/eos/pad ids from the demo tokenizer next to the weights (when present)."""
    path = out / "tokenizer.json"
    if not path.is_file():
        return {}
    vocab = {t["content"]: t["id"] for t in json.loads(path.read_text()).get("added_tokens", [])}
    ids = {}
    if "<|im_end|>" in vocab:
        ids["eos_token_id"] = vocab["<|im_end|>"]
    if "<|endoftext|>" in vocab:
        ids["pad_token_id"] = vocab["<|endoftext|>"]
        ids["bos_token_id"] = vocab["<|endoftext|>"]
    return ids


def build(out: str | os.PathLike = DEFAULT_OUT) -> Path:
    """Write the demo model into ``out`` (kept: any tokenizer files already there); returns ``out``."""
    import jax.numpy as jnp
    import numpy as np
    import transformers

    from jqlora.io import save_safetensors
    from jqlora.models.llama import ModelConfig, hf_key_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**ARCH, **_special_ids(out))
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    rng = np.random.default_rng(SEED)
    tensors = {}
    for entry in hf_key_table(ModelConfig.from_hf(config.to_dict())):  # every tensor the model needs, in order
        if entry.kind == "norm":
            value = np.ones(entry.shape, np.float32)
        else:
            # A frozen random lm_head at transformers' std 0.02 caps every logit near 0.02·hidden ≈ 2.6 (the final
            # RMSNorm fixes |h| = √hidden), which no adapter can lift; a trained head has a larger norm. 1/√hidden
            # gives the demo room to learn (logits up to ≈ √hidden).
            std = ARCH["hidden_size"] ** -0.5 if entry.kind == "lm_head" else config.initializer_range
            value = rng.normal(0.0, std, entry.shape).astype(np.float32)
        tensors[entry.key] = jnp.asarray(value, jnp.bfloat16)
    tmp = out / ".building"
    tmp.mkdir(exist_ok=True)
    save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(tmp)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(tmp)
    for f in tmp.iterdir():  # move into place file by file; the tokenizer files stay
        os.replace(f, out / f.name)
    tmp.rmdir()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args()
    out = build(args.out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 1e6:.2f} MB of weights)")


if __name__ == "__main__":
    main()
