"""Peak host memory of `jqlora.convert` on a synthetic checkpoint (default ≈2 GB of bf16 Llama-shaped weights).

Writes a random Llama-architecture checkpoint (sharded safetensors, written one shard at a time) to a temporary
directory, then converts it in a fresh process and reports peak RSS growth during the conversion against the
checkpoint size, the largest tensor and the quantized output.

    python tools/convert_memory.py                 # ≈2 GB: hidden 2048, 12 layers, vocab 32000
    python tools/convert_memory.py --layers 2      # smaller
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from load_memory import write_checkpoint  # (tools/ is this script's directory: the same synthetic checkpoint)

MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    import jax.numpy as jnp
    from jqlora import quant
    from jqlora import checkpoints
    src, dst, shapes, shard = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    for shape in shapes:  # compile first so compilation is not counted
        quant.quantize(jnp.ones(shape, jnp.bfloat16))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    checkpoints.convert(src, dst, max_shard_bytes=shard)
    print(json.dumps({"base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "seconds": time.perf_counter() - t0}))
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=2000, help="output shard size (convert's --max-shard-size)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        total, largest = write_checkpoint(src, args.hidden, args.intermediate, args.layers, args.vocab)
        shapes = [[args.hidden, args.hidden], [args.intermediate, args.hidden], [args.hidden, args.intermediate]]
        r = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(dst), json.dumps(shapes),
                            str(args.shard_mb * 10**6)],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        out = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
        growth = (m["peak_kb"] - m["base_kb"]) * 1024
        mib = 2**20
        print(f"output shards of {args.shard_mb} MB: {len(list(dst.glob('*.safetensors')))} file(s)")
        print(f"checkpoint {total / mib:.0f} MiB bf16 ({args.layers} layers, hidden {args.hidden}); "
              f"largest tensor {largest / mib:.0f} MiB; output {out / mib:.0f} MiB")
        print(f"peak RSS growth during conversion: {growth / mib:.0f} MiB "
              f"= {growth / total:.2f}x the checkpoint, {growth / (largest + min(out, args.shard_mb * 10**6)):.2f}x "
              f"(largest tensor + one output shard); {m['seconds']:.1f} s")


if __name__ == "__main__":
    main()
