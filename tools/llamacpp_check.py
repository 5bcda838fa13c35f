"""llama.cpp itself on jqlora's GGUF exports, through llama-cpp-python (built from its sdist, in a venv of its own).

    python tools/llamacpp_check.py --llamacpp-python /path/to/llamacpp-venv/bin/python [--out DIR]

Builds tiny random models (tests/tiny.py, vocab 512) with random adapters and exports them:
- merged, ``--gguf f16`` and ``q8_0``: Llama (the adapter has rank_pattern, alpha_pattern and rsLoRA), Gemma 2,
  Gemma 3 and Phi-3 (windows and soft-caps that bind, Gemma 3's two RoPEs, Phi-3's fused projections, LongRoPE and
  partial rotary);
- the Llama, Gemma 2 and Phi-3 adapters as LoRA GGUFs (``--gguf-adapter``) over the base's f16 GGUF, loaded with
  ``lora_path``;
- the tokenizers: SentencePiece (Llama 2 legacy style, Gemma style) and the byte-level BPE test tokenizer.
llama.cpp greedy-decodes 16 tokens from 3 prompts of 6 token ids and returns the prompts' logits; these are
compared with jqlora's own greedy tokens (`jqlora.models.decode.generate`, float32) and logits, and with
transformers on the merged checkpoint with its matrices rounded as the GGUF type rounds them (for the LoRA file:
peft's adapter on the f16-rounded base). llama.cpp's CPU kernels also round the activations (to f16 for f16
weights, to 8 bits for Q8_0), so its logits differ from those by more than the weights' rounding. Tokenizers:
llama.cpp's ids on texts with special tokens, runs of spaces and byte fallback against the Hugging Face tokenizer's.
Prints one line per check; exits 1 when a token id differs, or a greedy token where jqlora's top two logits are
further apart than twice the file's logit error against jqlora (the format's rounding may flip a near-tie, no more).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[17, 301, 42, 99, 256, 7], [400, 3, 88, 150, 21, 333], [64, 65, 66, 200, 480, 12]]
N_NEW = 16
TEXTS = ["the quick hello  world, 12 345 café ☃ pieces\nof the thing", " the dog", "<s>the dog</s>hello <s> world",
         "<s> hi", "hi\n\n  the"]


def worker(spec_path: str) -> None:
    """Under llama-cpp-python: run every case of the spec, write the results beside it."""
    import llama_cpp
    import numpy as np

    spec = json.loads(Path(spec_path).read_text())
    out = {}
    for case in spec["models"]:
        llm = llama_cpp.Llama(case["gguf"], lora_path=case.get("lora"), n_ctx=64, logits_all=True, n_threads=2,
                              verbose=False)
        tokens, logits = [], []
        for prompt in PROMPTS:
            llm.reset()
            llm.eval(prompt)
            logits.append(np.asarray(llm.scores[:len(prompt)], np.float64).tolist())
            new = []
            for _ in range(case.get("n_new", N_NEW)):
                new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([new[-1]])
            tokens.append(new)
        out[case["name"]] = {"tokens": tokens, "logits": logits}
        del llm
    for case in spec["tokenizers"]:
        llm = llama_cpp.Llama(case["gguf"], vocab_only=True, verbose=False)
        out[case["name"]] = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in case["texts"]]
        del llm
    Path(spec["out"]).write_text(json.dumps(out))


def _rounded_logits(hf_dir, qtype, x):
    """transformers' logits of the merged checkpoint with every matrix rounded as ``qtype`` stores it."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 2:
                w = p.numpy()
                r = (w.astype(np.float16).astype(np.float32) if qtype == "f16" else gguf.dequantize(
                    gguf.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0).reshape(w.shape))
                p.copy_(torch.from_numpy(np.ascontiguousarray(r)))
        return model(torch.from_numpy(x).long()).logits.numpy()


def _models(root: Path):
    """(name, jqlora model, gguf path, lora path or None, reference logits) per case, and the peft oracle."""
    import shutil

    import numpy as np
    import torch
    from peft import PeftModel
    from test_export import randomize_adapters
    from test_gguf import REPO_TOKENIZER
    from tiny import make_family_model
    from transformers import AutoModelForCausalLM

    import jqlora
    from jqlora import adapters
    from jqlora.adapters.gguf import write_gguf
    from jqlora.adapters.gguf_adapter import write_gguf_adapter
    from jqlora.lora import LoraConfig

    x = np.asarray(PROMPTS, np.int32)
    lora = LoraConfig(r=4, alpha=8, rslora=True, targets="all-linear",
                      rank_pattern={"model.layers.1.self_attn.q_proj": 2, "v_proj": 6},
                      alpha_pattern={"model.layers.0.mlp.down_proj": 3, "k_proj": 5})
    families = {"llama": None, "gemma2": {"query_pre_attn_scalar": 16}, "gemma3": {"query_pre_attn_scalar": 16},
                "phi3": {"max_position_embeddings": 512, "original_max_position_embeddings": 256,
                         "sliding_window": None}}  # (Phi-3: llama.cpp's n_ctx, 256, <= the original length)
    for family, overrides in families.items():
        _, src = make_family_model(root / family / "base", family, vocab_size=512, **(overrides or {}))
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(REPO_TOKENIZER / name, src / name)
        model = jqlora.load_model(src, quant="none", dtype="float32",
                                  lora=lora if family == "llama" else LoraConfig(r=4, alpha=8, targets="all-linear"))
        randomize_adapters(model, seed=1, scale=0.2)
        hf = adapters.merge_to_hf(model, src, root / family / "merged", dtype="float32")
        for qtype in ("f16", "q8_0"):
            path = write_gguf(model, src, root / family / qtype, qtype)
            yield f"{family} {qtype}", model, path, None, _rounded_logits(hf, qtype, x)
        if family in ("llama", "gemma2", "phi3"):  # (Phi-3: LoRA on the fused qkv_proj / gate_up_proj)
            base = jqlora.load_model(src, quant="none", dtype="float32")
            base_gguf = write_gguf(base, src, root / family / "base-f16", "f16")
            lora_gguf = write_gguf_adapter(model, root / family / "lora")
            peft_dir = adapters.save_adapter(model, root / family / "peft", base_model_name_or_path=str(src))
            hf_base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            with torch.no_grad():
                for _, p in hf_base.named_parameters():
                    if p.ndim == 2:
                        p.copy_(p.to(torch.float16).float())
                peft = PeftModel.from_pretrained(hf_base, peft_dir).eval()
                want = peft(torch.from_numpy(x).long()).logits.numpy()
            yield f"{family} f16 + LoRA GGUF", model, base_gguf, lora_gguf, want


def _tokenizers(root: Path):
    """(name, gguf, texts, Hugging Face ids) for the tokenizer checks."""
    from test_gguf_spm import _spm_tokenizer, _vocab_gguf
    from transformers import AutoTokenizer

    for style, arch in (("legacy", "llama"), ("legacy", "phi3"), ("gemma", "gemma2"), ("bpe", "llama")):
        d = root / f"tok-{style}-{arch}"
        d.mkdir(parents=True)
        if style == "bpe":
            from test_gguf import REPO_TOKENIZER

            ref = AutoTokenizer.from_pretrained(REPO_TOKENIZER)
            src = REPO_TOKENIZER
            texts = [t.replace("<s>", "<|im_start|>").replace("</s>", "<|im_end|>") for t in TEXTS]
        else:
            src = d / "tok"
            ref = _spm_tokenizer(style, src)
            texts = [t.replace("<s>", "<bos>").replace("</s>", "<eos>") for t in TEXTS] if style == "gemma" else TEXTS
        _vocab_gguf(src, d / "g", arch)
        yield (f"tokenizer {style} ({arch})", str(d / "g" / "vocab.gguf"), texts,
               [ref(t, add_special_tokens=False)["input_ids"] for t in texts])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llamacpp-python", help="the python of a venv with llama-cpp-python (and numpy)")
    ap.add_argument("--out", default=None, help="where the models and files go (default: a temporary directory)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if not args.llamacpp_python:
        ap.error("--llamacpp-python is required")
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "adapters")]
    import jax.numpy as jnp
    import numpy as np

    from jqlora.models import decode

    root = Path(args.out or tempfile.mkdtemp(prefix="llamacpp_check_"))
    root.mkdir(parents=True, exist_ok=True)
    cases, model_of, spec = {}, {}, {"models": [], "tokenizers": [], "out": str(root / "results.json")}
    for name, model, path, lora_path, want in _models(root):
        x = np.asarray(PROMPTS, np.int32)
        greedy = np.asarray(decode.generate(model, x, max_new_tokens=N_NEW, temperature=0.0))
        cases[name] = (greedy, np.asarray(model(jnp.asarray(x))), want)
        model_of[name] = model
        spec["models"].append({"name": name, "gguf": str(path), "lora": str(lora_path) if lora_path else None})
    tokenizers = {}
    for name, path, texts, ids in _tokenizers(root):
        tokenizers[name] = ids
        spec["tokenizers"].append({"name": name, "gguf": path, "texts": texts})
    (root / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run([args.llamacpp_python, __file__, "--worker", str(root / "spec.json")])
    if r.returncode:
        print(f"error: the llama-cpp-python worker failed (exit {r.returncode})", file=sys.stderr)
        return 2
    results = json.loads((root / "results.json").read_text())
    version = subprocess.run([args.llamacpp_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    print(f"llama-cpp-python {version}; {len(PROMPTS)} prompts of {len(PROMPTS[0])} ids, {N_NEW} greedy tokens each")
    ok = True
    for name, (greedy, ours, want) in cases.items():
        got = results[name]
        same = sum(int(np.array_equal(a[:k], b[:k]))
                   for a, b in zip(greedy, got["tokens"]) for k in range(1, N_NEW + 1))
        logits = np.asarray(got["logits"])
        ref = "peft on the f16 base" if "LoRA" in name else f"transformers on the {name.split()[-1]}-rounded merge"
        print(f"{name:22s} greedy: {same}/{len(PROMPTS) * N_NEW} tokens agree (prefix) with jqlora; prompt logits "
              f"max|d| {np.abs(logits - ours).max():.1e} vs jqlora float32, {np.abs(logits - want).max():.1e} vs {ref}")
        err = np.abs(logits - ours).max()
        for prompt, a, b in zip(PROMPTS, greedy, got["tokens"]):  # where they part: how close jqlora's top two were
            k = next((i for i in range(N_NEW) if a[i] != b[i]), None)
            if k is not None:
                top = np.sort(np.asarray(model_of[name](jnp.asarray([list(prompt) + list(a[:k])])))[0, -1])
                margin = top[-1] - top[-2]
                tie = margin < 2 * err  # (a near-tie flipped within the file's own logit error)
                print(f"    parts at token {k}: jqlora's top-two margin there {margin:.1e}"
                      + (f", within the file's logit error ({err:.1e})" if tie else ", NOT a near-tie"))
                ok &= tie
    for name, ids in tokenizers.items():
        same = sum(a == b for a, b in zip(ids, results[name]))
        print(f"{name:22s} {same}/{len(ids)} texts: llama.cpp's ids are the Hugging Face tokenizer's")
        if same != len(ids):
            for a, b in zip(ids, results[name]):
                if a != b:
                    print(f"    hf {a}\n    llama.cpp {b}")
        ok &= same == len(ids)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
