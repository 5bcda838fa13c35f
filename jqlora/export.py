"""Export what training produced: a peft adapter, or a merged full Hugging Face checkpoint.

Merging (``--merge``): for every linear layer, W' = dequantize(W) + s · (A B)ᵀ computed in float32 (s = α/r, or
α/√r with rsLoRA), then cast to ``--dtype``; embeddings, norms, biases and ``lm_head`` are written as they are. The
result is a plain checkpoint (no ``quantization_config``) that `transformers.AutoModelForCausalLM` loads. It is
written one layer at a time into safetensors shards (with an index when there are several), so host memory holds
one layer's merged float32 tensors plus one output shard, not the merged model. For a 4-bit base the merged weights
are the dequantized 4-bit weights plus the adapter delta: the checkpoint carries the base's quantization error.

    python -m jqlora.export RUN_DIR DST [--step N | --best] [--merge] [--dtype bfloat16]
    python -m jqlora.export ADAPTER_DIR DST --merge [--base MODEL_DIR] [--quant nf4|none]
    python -m jqlora.export RUN_DIR|ADAPTER_DIR DST --gguf f16|bf16|q8_0|q4_k_m|q5_k_m|q6_k
    python -m jqlora.export RUN_DIR|ADAPTER_DIR DST --gguf-adapter

``--gguf TYPE`` writes the merged model as one GGUF file, ``DST/model-TYPE.gguf``, for llama.cpp / Ollama / LM
Studio (`jqlora.adapters.gguf`: what is supported, and what each type needs), with an Ollama ``DST/Modelfile``
(`jqlora.adapters.ollama`: ``ollama create NAME -f DST/Modelfile``); ``--gguf-adapter`` the adapter as a
llama.cpp LoRA GGUF, ``DST/adapter-f32.gguf``, each module's own scaling folded into B (`jqlora.adapters.gguf_adapter`).

Both carry the tokenizer files and the chat template training used (``data.chat_template``, else the tokenizer's
own), with a tokenizer config that transformers 4.x and 5.x and llama.cpp's converter read
(`jqlora.adapters.tokenizer_files`). An adapter export prints the vLLM flags it needs (`jqlora.adapters.serving`).

Merging is `jqlora.adapters.merge_to_hf`, restoring a run's model `jqlora.run.restore_for_export`; JAX is imported
only after the arguments are parsed, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jqlora.config.schema import DTYPES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jqlora.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a training run directory (or a checkpoint in it), or a peft adapter directory")
    ap.add_argument("dst", help="output directory (must not exist or be empty)")
    ap.add_argument("--merge", action="store_true", help="write a merged full model instead of the adapter")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES),
                    help="dtype of the merged weights (default bfloat16) or of the adapter tensors (default float32)")
    ap.add_argument("--gguf", default=None, metavar="TYPE",
                    help="write the merged model as one GGUF file (and an Ollama Modelfile): f16, bf16, q8_0 "
                         "(q4_k_m, q5_k_m, q6_k need llama.cpp's llama-quantize on PATH)")
    ap.add_argument("--gguf-adapter", action="store_true",
                    help="write the adapter as a llama.cpp LoRA GGUF (llama-cli --lora FILE), on the base's GGUF")
    ap.add_argument("--step", type=int, default=None, help="training step to export (default: the latest)")
    ap.add_argument("--best", action="store_true",
                    help="export the checkpoint of the run's best evaluation (train.metric_for_best, train.keep_best)")
    ap.add_argument("--base", default=None, help="base model directory (default: from the run or the adapter)")
    ap.add_argument("--quant", default=None, choices=["nf4", "fp4", "none"],
                    help="how to load the base for merging (default: as trained)")
    args = ap.parse_intermixed_args(argv)  # (flags anywhere among the arguments)
    # (after parsing: --help and usage errors need no JAX)
    from jqlora import compile_cache
    from jqlora.adapters import ExportError, base_of_adapter, init_state, is_adapter_dir, load_model, merge_to_hf
    from jqlora.adapters.gguf import check_type, write_gguf
    from jqlora.adapters.gguf_adapter import write_gguf_adapter
    from jqlora.adapters.serving import vllm_notes
    from jqlora.adapters.tokenizer_files import chat_template_of, write_tokenizer_files
    from jqlora.checkpoints import hf_source
    from jqlora.data import read_chat_template
    from jqlora.run import best_checkpoint, find_run, restore_for_export

    compile_cache.enable()

    src, notes, best = Path(args.src), [], None
    try:
        if not src.is_dir():
            raise ExportError(f"{src}: not a directory")
        if args.gguf and (args.merge or args.dtype):
            raise ExportError("--gguf writes a merged model in its own TYPE: drop --merge / --dtype")
        if args.gguf_adapter and (args.gguf or args.merge or args.dtype):
            raise ExportError("--gguf-adapter writes the adapter alone, in float32: drop --gguf / --merge / --dtype")
        if args.gguf:
            check_type(args.gguf)  # (before minutes of loading)
        if args.best and (args.step is not None or is_adapter_dir(src)):
            raise ExportError("--best picks a step of a training run directory: drop --step, or give the run")
        best = best_checkpoint(src) if args.best else None
        if best is not None:
            args.step = best.step
        if is_adapter_dir(src):
            if args.step is not None:
                raise ExportError("--step applies to a training run directory, not to an adapter directory")
            if not args.merge and not args.gguf and not args.gguf_adapter:
                raise ExportError(f"{src} is already a peft adapter; add --merge to write a merged model")
            base = base_of_adapter(src, args.base)
            if args.gguf_adapter:  # (the base only carries the adapter here: unquantized unless asked)
                model = load_model(base, adapter=src, quant=args.quant or "none", dtype="float32")
                args.dst = write_gguf_adapter(model, args.dst, name=base.name)
                print(f"wrote {args.dst}")
                return 0
            model = load_model(base, adapter=src, quant=args.quant or "nf4", dtype="float32")
            tokenizer = src if (src / "tokenizer.json").is_file() else base  # (an adapter jqlora wrote carries one)
            if args.gguf:
                args.dst = write_gguf(model, base, args.dst, args.gguf, chat_template=chat_template_of(tokenizer),
                                      tokenizer_path=tokenizer)
            else:
                merge_to_hf(model, base, args.dst, dtype=args.dtype or "bfloat16",
                            chat_template=chat_template_of(src))
        else:
            model, cfg, step = restore_for_export(src, step=args.step, quant=args.quant)
            base = Path(args.base or cfg.model.path)
            tokenizer = Path(cfg.model.tokenizer_path or cfg.model.path)
            # the template training rendered with (`jqlora.data.records`): the configured one, else the tokenizer's
            template = (read_chat_template(cfg.data.chat_template) if cfg.data.chat_template
                        else chat_template_of(tokenizer))
            if args.gguf_adapter:
                args.dst = write_gguf_adapter(model, args.dst, name=base.name, init=cfg.lora.init)
            elif args.gguf:
                args.dst = write_gguf(model, base, args.dst, args.gguf, chat_template=template,
                                      tokenizer_path=tokenizer)
            elif args.merge:
                merge_to_hf(model, base, args.dst, dtype=args.dtype or "bfloat16", chat_template=template)
            else:
                run_dir, _ = find_run(src, args.step)
                card = {"steps": step, "data": cfg.data.path}
                original = hf_source(base)  # the original HF checkpoint, also behind a converted base (as training)
                if original != os.path.abspath(base):
                    card["trained_on"] = f"{os.path.abspath(base)} (jqlora's 4-bit copy of the base)"
                out = init_state.save_adapter(
                    model, cfg, run_dir, args.dst, lora_config=model.lora_config, base=original,
                    dtype=args.dtype or "float32", card=card,
                    side_files=lambda tmp: write_tokenizer_files(tokenizer, tmp, template))
                notes = vllm_notes(json.loads((out / "adapter_config.json").read_text()), str(args.dst))
    except ValueError as e:  # ExportError, DataError, AdapterError, ConvertError, ConfigError: a user's mistake
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}" + (f" from {best}" if best is not None else ""))
    for line in notes:
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)
    return 0


if __name__ == "__main__":
    from jqlora.cli import run

    run(main)  # (sys.exit(main()), quiet when a pipe's reader has gone: `... | head`)
