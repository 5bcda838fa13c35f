"""What PiSSA / LoftQ runs write so that their adapters are usable outside jqlora (peft's conventions).

Both adjust the base (`jqlora.lora_init`), so an adapter alone, on the original base, would be wrong:

- ``pissa``: at the start of the run the initial adapter (A₀, B₀) is saved to ``OUTPUT_DIR/init_adapter``. The
  exported adapter is converted, as peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does,
  into a plain LoRA on the ORIGINAL base: since ``W_res = W − s B₀A₀``, ``W_res + s B A = W + s [B, −B₀] [A; A₀]``,
  a rank-2r adapter with ``A' = [A; A₀]``, ``B' = [B, −B₀]``, ``r' = 2r`` and ``alpha' = 2 alpha`` (``√2 alpha``
  with rsLoRA) so the scaling stays s. On an unquantized base this is exact; on a 4-bit base the trained model saw
  the quantized residual, so the converted adapter on the original base differs by that quantization error (as any
  QLoRA adapter on its full-precision base does).
- ``loftq``: the base trained on is Q (not W − anything low-rank), so it is saved: ``OUTPUT_DIR/base`` is a plain
  float32 Hugging Face checkpoint holding deq(Q) (written by `jqlora.export.merge_to_hf` with zero adapters), and the
  exported adapter names it as ``base_model_name_or_path``. peft / transformers load it as a base (in float, or
  quantized again with bitsandbytes: re-quantizing deq(Q) gives Q back up to double quantization's rounding).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

INIT_ADAPTER = "init_adapter"
BASE = "base"


def prepare_run(model: Any, cfg: Any, out: str | os.PathLike) -> None:
    """At a run's fresh start: save what its export will need (see the module docstring)."""
    from jqlora import peft

    init, out = cfg.lora.init, Path(out)
    if init == "pissa":
        peft.save_adapter(model, out / INIT_ADAPTER, base_model_name_or_path=str(cfg.model.path), overwrite=True)
    elif init == "loftq":
        from jqlora.merge import merge_to_hf
        from jqlora.step import SplitModel

        split = SplitModel.of(model)
        zero = split.model(jax.tree.map(jnp.zeros_like, split.lora))
        merge_to_hf(zero, cfg.model.path, out / BASE, dtype="float32", overwrite=True)


def base_for_adapter(cfg: Any, run_out: str | os.PathLike, original: str) -> str:
    """The base the exported adapter loads on: the saved LoftQ base, else the original checkpoint."""
    return str(Path(run_out).resolve() / BASE) if cfg.lora.init == "loftq" else original


def save_adapter(model: Any, cfg: Any, run_out: str | os.PathLike, dst: str | os.PathLike, *, lora_config: Any,
                 base: str, dtype: str = "float32", card: Mapping[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """`jqlora.peft.save_adapter`, converted for PiSSA / pointed at the saved base for LoftQ."""
    from jqlora import peft, peft_import
    from jqlora.io import atomic_directory

    base = base_for_adapter(cfg, run_out, base)
    if cfg.lora.init != "pissa":
        return peft.save_adapter(model, dst, lora_config=lora_config, base_model_name_or_path=base, dtype=dtype,
                                 card=card, overwrite=overwrite)
    from safetensors.numpy import save_file

    init_dir = Path(run_out) / INIT_ADAPTER
    if not (init_dir / peft.WEIGHTS_NAME).is_file():
        raise peft.AdapterError(f"{init_dir}: missing (a PiSSA run saves its initial adapter there at its start; "
                                "the export needs it to convert the adapter onto the original base)")
    tensors = peft.adapter_tensors(model)
    initial = peft_import._read_tensors(init_dir / peft.WEIGHTS_NAME)
    config = peft.adapter_config_dict(model, lora_config, base)
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if key not in initial:
            raise peft.AdapterError(f"{init_dir}: no {key} (the initial adapter is of another run?)")
        axis = 0 if ".lora_A." in key else 1
        first = initial[key] if axis == 0 else -initial[key]
        out[key] = np.ascontiguousarray(np.concatenate([value, first], axis=axis))
    factor = math.sqrt(2.0) if config["use_rslora"] else 2.0
    config["r"] *= 2
    config["lora_alpha"] = peft._num(config["lora_alpha"] * factor)
    config["rank_pattern"] = {k: 2 * v for k, v in config["rank_pattern"].items()}
    config["alpha_pattern"] = {k: peft._num(v * factor) for k, v in config["alpha_pattern"].items()}
    if dtype != "float32":
        out = {k: np.asarray(jnp.asarray(v).astype(dtype)) for k, v in out.items()}
    card = {**(card or {}), "init": "PiSSA, converted to a plain rank-2r LoRA on the original base"}
    with atomic_directory(Path(dst), overwrite=overwrite, error=peft.AdapterError,
                          need=sum(int(v.nbytes) for v in out.values())) as tmp:
        save_file(out, str(tmp / peft.WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / peft.CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(peft._model_card(base, card))
    return Path(dst)
