"""Hugging Face checkpoints ⇄ jqlora's quantized parameters, streamed one tensor at a time.

Reading (`Checkpoint`): a local model directory with `config.json` and single or sharded safetensors (with
`model.safetensors.index.json`), or PyTorch `pytorch_model*.bin` (torch is imported only then), in bf16/fp16/fp32;
or a bitsandbytes 4-bit checkpoint (`quantization_config.load_in_4bit`), whose NF4/FP4 weights are returned as
`quant.QuantizedTensor` exactly as stored (no dequantize / requantize). `get` returns JAX arrays on the default
device; `get_host` returns numpy arrays read into host memory without a memory map, for the sharded loader
(`jqlora.load_model(..., mesh=)`), which places each tensor's shards on their devices itself.

Writing (`convert`): each tensor is read, quantized if it is a linear weight, and kept only in its quantized form,
so peak host memory stays near the largest single tensor plus the quantized output. Two output formats:
- ``jqlora``: `jqlora.json` (format version, quantization settings, the static fields of every quantized tensor)
  + `model.safetensors` holding `<hf key>.codes|absmax|nested_absmax|offset` for quantized weights and `<hf key>`
  for the rest, + the source `config.json`. Reloading reads arrays, nothing is requantized.
- ``bnb``: a Hugging Face bitsandbytes-4bit checkpoint (config with `quantization_config`, the six tensors per
  linear layer) that `transformers.AutoModelForCausalLM.from_pretrained` loads with bitsandbytes. MoE experts
  (Mixtral, Qwen3-MoE) are written unquantized in ``dtype``, as transformers + bitsandbytes saves them (it quantizes
  only ``nn.Linear``; transformers 5 fuses the experts into 3-D parameters); loading quantizes them.
Tokenizer files and the generation config travel along. Output is written to a temporary directory beside DST and
renamed into place only when complete, so a failed conversion never leaves a DST that looks finished.

Layout: reading is `jqlora.checkpoints.reader`, writing and `load_jqlora` are `jqlora.checkpoints.conversion`; this
module is the CLI
(JAX is imported only after the arguments are parsed, so `--help` is instant) and reaches both by name.
"""

from __future__ import annotations

import argparse
import re
import sys

from jqlora.config.schema import DTYPES




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jqlora.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="Hugging Face model directory (safetensors, .bin, or bitsandbytes 4-bit)")
    ap.add_argument("dst", help="output directory (must not exist or be empty)")
    ap.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"])
    ap.add_argument("--no-double-quant", action="store_true", help="keep float32 block scales")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="dtype of unquantized tensors")
    ap.add_argument("--format", default="jqlora", choices=["jqlora", "bnb"], dest="fmt")
    ap.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 500MB, 5GB (default 2GB)")
    args = ap.parse_intermixed_args(argv)  # (flags anywhere among the arguments)
    from jqlora import compile_cache
    from jqlora.checkpoints import ConvertError, convert  # (after parsing: --help and usage errors need no JAX)

    try:
        shard_bytes = _parse_size(args.max_shard_size)
    except ValueError:
        print(f"error: --max-shard-size {args.max_shard_size!r}: expected a size such as 500MB or 5GB", file=sys.stderr)
        return 2
    compile_cache.enable()
    try:
        dst = convert(
            args.src, args.dst, quant_type=args.quant, double_quant=not args.no_double_quant,
            block_size=args.block_size, dtype=args.dtype, fmt=args.fmt, max_shard_bytes=shard_bytes,
        )
    except (ConvertError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(text)
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


if __name__ == "__main__":
    from jqlora.cli import run

    run(main)  # (sys.exit(main()), quiet when a pipe's reader has gone: `... | head`)
