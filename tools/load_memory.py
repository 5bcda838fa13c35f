"""Peak host memory of the sharded streaming load, `jqlora.load_model(path, mesh=...)`, on fake CPU devices.

Writes a random Llama-architecture bf16 checkpoint (sharded safetensors, one file per layer, generated and written
one tensor group at a time with numpy, no torch) to a temporary directory, then loads it in a fresh process onto
``--devices`` host devices (`XLA_FLAGS=--xla_force_host_platform_device_count`) with a ("data", "fsdp", "tensor")
mesh, and reports the peak RSS increase during the load.

On host devices the devices' memory is the process's memory, so the loaded model itself (every device's shards,
replicated arrays once per device) counts against RSS. The bound checked is

    peak RSS increase  <=  1.5 x (largest checkpoint tensor)  +  (bytes the devices hold after loading)

i.e. besides the loaded shards the load needs about one tensor in flight. The baseline is the RSS after JAX has
started and a warm-up load of a one-layer checkpoint with the same kernel shapes has compiled the quantization
programs; the peak is `VmHWM` after resetting it (`/proc/self/clear_refs`) at that baseline, so the warm-up's own
peak does not count. `--unsharded` also measures `load_model` without a mesh (on one device) for comparison.

    python tools/load_memory.py                            # ≈670 MB: hidden 2048, 4 layers, vocab 32000, fsdp=8
    python tools/load_memory.py --mesh 1,4,2 --unsharded   # fsdp=4 × tensor=2, and the mesh-less load
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_checkpoint(path: Path, hidden: int, inter: int, layers: int, vocab: int, head_dim: int = 128,
                     seed: int = 0) -> tuple[int, int]:
    """A random bf16 Llama checkpoint at ``path`` (one safetensors file per layer); returns (total, largest) bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    heads = hidden // head_dim
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "vocab_size": vocab, "head_dim": head_dim, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
              "hidden_act": "silu", "torch_dtype": "bfloat16"}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    def ones(n):
        return np.ones(n, ml_dtypes.bfloat16)

    groups = [lambda: {"model.embed_tokens.weight": w(vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append(lambda p=p: {
            p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(hidden, hidden),
            p + "self_attn.v_proj.weight": w(hidden, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": ones(hidden), p + "post_attention_layernorm.weight": ones(hidden),
        })
    groups.append(lambda: {"model.norm.weight": ones(hidden), "lm_head.weight": w(vocab, hidden)})
    weight_map, total, largest = {}, 0, 0
    for n, make in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = make()
        save_file(shard, str(path / name), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = name
            total += v.nbytes
            largest = max(largest, v.nbytes)
        del shard
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total, largest


MEASURE = textwrap.dedent("""
    import gc, json, sys, time

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    import jax
    from flax import nnx
    import jqlora
    from jqlora import parallel

    src, warm, mesh_shape, lora_rank = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    mesh = parallel.make_mesh(*mesh_shape) if mesh_shape else None
    lora = None
    if lora_rank:
        from jqlora.lora import LoraConfig
        lora = LoraConfig(r=lora_rank, alpha=2 * lora_rank)
    import threading
    peaks = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for k in peaks:
                peaks[k] = max(peaks[k], status(k))
            time.sleep(0.002)

    model = jqlora.load_model(warm, mesh=mesh, lora=lora)  # compiles quantization for these kernel shapes
    del model
    gc.collect()
    base = status("VmRSS")
    base_parts = {k: status(k) for k in peaks}
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    model = jqlora.load_model(src, mesh=mesh, lora=lora)
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    peak = status("VmHWM")
    held = parallel.per_device_bytes(nnx.state(model))
    print(json.dumps({"base": base, "peak": peak, "after": status("VmRSS"), "seconds": seconds,
                      "anon_increase": peaks["RssAnon"] - base_parts["RssAnon"],
                      "file_increase": peaks["RssFile"] - base_parts["RssFile"],
                      "device_bytes": sum(held.values()), "max_device_bytes": max(held.values()),
                      "min_device_bytes": min(held.values()), "n_devices": len(held)}))
""")


def measure(src: Path, warm: Path, mesh: tuple[int, int, int] | None, devices: int, lora_rank: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(warm), json.dumps(mesh), str(lora_rank)],
                       capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if r.returncode:
        sys.exit(r.stderr[-4000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(name: str, m: dict, total: int, largest: int) -> bool:
    mib = 2**20
    growth = m["peak"] - m["base"]
    bound = 1.5 * largest + m["device_bytes"]
    ok = growth <= bound
    print(f"{name}: devices hold {m['device_bytes'] / mib:.0f} MiB in all ({m['n_devices']} devices, "
          f"{m['min_device_bytes'] / mib:.1f}-{m['max_device_bytes'] / mib:.1f} MiB each); "
          f"baseline RSS {m['base'] / mib:.0f} MiB, after load {m['after'] / mib:.0f} MiB")
    print(f"  peak RSS increase {growth / mib:.0f} MiB = {growth / total:.2f}x the checkpoint; bound 1.5 x largest "
          f"+ device bytes = {bound / mib:.0f} MiB -> {growth / bound:.2f} of it ({'within' if ok else 'OVER'}); "
          f"increase - device bytes = {(growth - m['device_bytes']) / largest:.2f} x largest tensor; "
          f"{m['seconds']:.1f} s")
    print(f"  sampled every 2 ms: peak anonymous memory +{m['anon_increase'] / mib:.0f} MiB, "
          f"file-backed (memory-mapped checkpoint pages) +{m['file_increase'] / mib:.0f} MiB")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor sizes (product = --devices)")
    ap.add_argument("--lora-rank", type=int, default=0, help="also add LoRA adapters of this rank (0: none)")
    ap.add_argument("--unsharded", action="store_true", help="also measure load_model without a mesh")
    args = ap.parse_args()
    mesh = tuple(int(s) for s in args.mesh.split(","))
    if len(mesh) != 3 or int(np.prod(mesh)) != args.devices:
        print(f"error: --mesh {args.mesh!r} must be three sizes multiplying to --devices={args.devices}",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        src, warm = Path(tmp) / "src", Path(tmp) / "warm"
        total, largest = write_checkpoint(src, args.hidden, args.intermediate, args.layers, args.vocab)
        write_checkpoint(warm, args.hidden, args.intermediate, 1, 256)
        mib = 2**20
        print(f"checkpoint {total / mib:.0f} MiB bf16 ({args.layers} layers, hidden {args.hidden}, intermediate "
              f"{args.intermediate}, vocab {args.vocab}); largest tensor {largest / mib:.0f} MiB")
        ok = report(f"mesh data,fsdp,tensor={args.mesh}", measure(src, warm, mesh, args.devices, args.lora_rank),
                    total, largest)
        if args.unsharded:
            report("no mesh (one device)", measure(src, warm, None, args.devices, args.lora_rank), total, largest)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
