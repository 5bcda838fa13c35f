"""Export what training produced: a peft adapter, or a merged full Hugging Face checkpoint.

Merging (``--merge``): for every linear layer, W' = dequantize(W) + s · (A B)ᵀ computed in float32 (s = α/r, or
α/√r with rsLoRA), then cast to ``--dtype``; embeddings, norms, biases and ``lm_head`` are written as they are. The
result is a plain checkpoint (no ``quantization_config``) that `transformers.AutoModelForCausalLM` loads. It is
written one layer at a time into safetensors shards (with an index when there are several), so host memory holds
one layer's merged float32 tensors plus one output shard, not the merged model. For a 4-bit base the merged weights
are the dequantized 4-bit weights plus the adapter delta: the checkpoint carries the base's quantization error.

    python -m jqlora.export RUN_DIR DST [--step N] [--merge] [--dtype bfloat16]
    python -m jqlora.export ADAPTER_DIR DST --merge [--base MODEL_DIR] [--quant nf4|none]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jqlora import dora, quant
from jqlora.io import ShardWriter, atomic_directory, copy_side_files
from jqlora.lora import LoraLinear
from jqlora.rundir import find_run


class ExportError(ValueError):
    """A problem with what is being exported or where; the message names the file or directory."""


def _module_at(model: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        model = getattr(model, part)
    return model


def _layer_slice(tree: Any, layer: int | tuple[int, ...] | None) -> Any:
    """``tree`` at stacked index ``layer`` (a layer, or (layer, expert) for MoE experts; None: as it is)."""
    if layer is None or layer == ():
        return tree
    return jax.tree_util.tree_map(lambda a: a[layer], tree)


def merged_tensor(model: Any, entry: Any) -> np.ndarray:
    """float32 Hugging Face tensor for one key-table ``entry``: linear kernels merged with their adapter."""
    module = _module_at(model, entry.path)
    i = getattr(entry, "index", entry.layer)
    if entry.kind == "linear":
        assert isinstance(module, LoraLinear)
        if module.quant.enabled:
            w = quant.dequantize(_layer_slice(module.quantized(), i), jnp.float32)
        else:
            w = _layer_slice(module.weight[...], i).astype(jnp.float32)
        if module.lora_a is not None:
            a = _layer_slice(module.lora_a[...], i).astype(jnp.float32)
            b = _layer_slice(module.lora_b[...], i).astype(jnp.float32)
            if module.magnitude is not None:  # DoRA: (m / ‖W + s BA‖) · (W + s BA)
                w = dora.merged_kernel(_layer_slice(module.magnitude[...], i), w, a, b, module.scaling)
            else:
                w = w + module.scaling * (a @ b).T
        return np.asarray(w)
    if entry.name == "weight" and getattr(module, "spec", None) is not None:  # an adapted embedding / LM head
        if module is model.model.embed_tokens:
            if model.lm_head is None:
                raise ExportError("cannot merge an embed_tokens adapter into a model with tied embeddings (the "
                                  "merged embedding would change the output head too); export the adapter instead")
            s = module.spec.scaling
            a = module.lora_embedding_a[...].astype(jnp.float32)
            return np.asarray(module.weight[...].astype(jnp.float32) + s * (a @ module.lora_embedding_b[...]))
        a, b = module.lora_a[...].astype(jnp.float32), module.lora_b[...].astype(jnp.float32)
        return np.asarray(module.weight[...].astype(jnp.float32) + module.spec.scaling * (a @ b).T)
    value = getattr(module, entry.name)[...]
    return np.asarray(_layer_slice(value, i).astype(jnp.float32))


def merge_to_hf(
    model: Any,
    base_path: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (base + adapters) as a plain Hugging Face checkpoint; ``base_path`` supplies config/tokenizer."""
    from jqlora.convert import read_config
    from jqlora.models.llama import hf_key_table

    if dtype not in quant.DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(quant.DTYPES)}")
    config = dict(read_config(base_path))
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    table = hf_key_table(model.config)
    out_dtype = jnp.dtype(dtype)
    need = sum(int(np.prod(entry.shape)) for entry in table) * out_dtype.itemsize
    with atomic_directory(dst, overwrite=overwrite, error=ExportError, need=need) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, {"format": "pt"})
        for entry in tqdm(table, desc="merging", unit="tensor", disable=None, dynamic_ncols=True):
            value = merged_tensor(model, entry)
            if value.shape != tuple(entry.shape):
                raise AssertionError(f"{entry.key}: merged shape {value.shape}, expected {entry.shape}")
            writer.add({entry.key: np.asarray(jnp.asarray(value).astype(out_dtype))})
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_side_files(base_path, tmp)
    return Path(dst)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _base_of_adapter(adapter: Path, base: str | None) -> Path:
    if base:
        return Path(base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    name = cfg.get("base_model_name_or_path") or ""
    if not name or not Path(name).is_dir():
        raise ExportError(
            f"{adapter / 'adapter_config.json'}: base_model_name_or_path {name!r} is not a local directory; "
            "pass --base MODEL_DIR"
        )
    return Path(name)



def restore_for_export(src: str | os.PathLike, *, step: int | None = None, quant: str | None = None):
    """(model with the adapter of ``step`` (default latest), config, step) from a run dir or a checkpoint in it."""
    import dataclasses

    from jqlora import optim
    from jqlora.config import load_config
    from jqlora.loop import build_model
    from jqlora.rundir import RunDir
    from jqlora.step import SplitModel

    src, step = find_run(src, step)
    cfg = load_config(str(src / "config.yaml"), [])
    if quant is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quant=quant))
    run = RunDir(src, create=False)
    steps = run.steps()
    if not steps:
        raise ExportError(f"{run.checkpoints}: no complete checkpoint to export")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ExportError(f"{run.checkpoints}: no checkpoint for step {step} (have {', '.join(map(str, steps))})")
    why = run.verify(step)
    if why is not None:
        raise ExportError(f"{run.step_dir(step)}: not usable ({why})")
    meta = run.restore_meta(step)
    model = build_model(cfg)
    split = SplitModel.of(model)
    tx, _ = optim.make_optimizer(cfg.train, int(meta["total_steps"]), cfg.lora.plus_ratio)
    opt_leaves = jax.tree.leaves(tx.init(split.lora))
    tree = {"lora": split.lora, "opt": {f"{i:05d}": x for i, x in enumerate(opt_leaves)},
            "rng": jax.random.PRNGKey(0)}
    state, _ = run.restore(step, tree)
    return split.model(state["lora"]), cfg, step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jqlora.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a training run directory (or a checkpoint in it), or a peft adapter directory")
    ap.add_argument("dst", help="output directory (must not exist or be empty)")
    ap.add_argument("--merge", action="store_true", help="write a merged full model instead of the adapter")
    ap.add_argument("--dtype", default=None, choices=list(quant.DTYPES),
                    help="dtype of the merged weights (default bfloat16) or of the adapter tensors (default float32)")
    ap.add_argument("--step", type=int, default=None, help="training step to export (default: the latest)")
    ap.add_argument("--base", default=None, help="base model directory (default: from the run or the adapter)")
    ap.add_argument("--quant", default=None, choices=["nf4", "fp4", "none"],
                    help="how to load the base for merging (default: as trained)")
    args = ap.parse_args(argv)
    src = Path(args.src)
    try:
        if not src.is_dir():
            raise ExportError(f"{src}: not a directory")
        if _is_adapter_dir(src):
            if args.step is not None:
                raise ExportError("--step applies to a training run directory, not to an adapter directory")
            if not args.merge:
                raise ExportError(f"{src} is already a peft adapter; add --merge to write a merged model")
            import jqlora

            base = _base_of_adapter(src, args.base)
            model = jqlora.load_model(base, adapter=src, quant=args.quant or "nf4", dtype="float32")
            merge_to_hf(model, base, args.dst, dtype=args.dtype or "bfloat16")
        else:
            model, cfg, step = restore_for_export(src, step=args.step, quant=args.quant)
            base = Path(args.base or cfg.model.path)
            if args.merge:
                merge_to_hf(model, base, args.dst, dtype=args.dtype or "bfloat16")
            else:
                from jqlora import init_export

                run_dir, _ = find_run(src, args.step)
                init_export.save_adapter(model, cfg, run_dir, args.dst, lora_config=model.lora_config,
                                         base=str(base), dtype=args.dtype or "float32",
                                         card={"steps": step, "data": cfg.data.path})
    except ValueError as e:  # ExportError, AdapterError, ConvertError, ConfigError: a user's mistake
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
