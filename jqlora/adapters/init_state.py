"""What PiSSA / LoftQ runs write so that their adapters are usable outside jqlora (peft's conventions).

Both adjust the base (`jqlora.lora.initialize`), so an adapter alone, on the original base, would be wrong:

- ``pissa``: at the start of the run the initial adapter (A₀, B₀) is saved to ``OUTPUT_DIR/init_adapter``. The
  exported adapter is converted, as peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does,
  into a plain LoRA on the ORIGINAL base: since ``W_res = W − s B₀A₀``, ``W_res + s B A = W + s [B, −B₀] [A; A₀]``,
  a rank-2r adapter with ``A' = [A; A₀]``, ``B' = [B, −B₀]``, ``r' = 2r`` and ``alpha' = 2 alpha`` (``√2 alpha``
  with rsLoRA) so the scaling stays s. On an unquantized base this is exact; on a 4-bit base the trained model saw
  the quantized residual, so the converted adapter on the original base differs by that quantization error (as any
  QLoRA adapter on its full-precision base does).
- ``loftq``: the base trained on is Q (not W − anything low-rank), so it is saved: ``OUTPUT_DIR/base`` is a plain
  float32 Hugging Face checkpoint holding deq(Q) (written by `jqlora.adapters.merge_to_hf` with zero adapters), and the
  exported adapter names it as ``base_model_name_or_path``. peft / transformers load it as a base (in float, or
  quantized again with bitsandbytes: re-quantizing deq(Q) gives Q back up to double quantization's rounding).

Both also save the model as it starts, ``OUTPUT_DIR/init_state``: every adjusted base kernel exactly as trained on
(the 4-bit codes and scales, or the float residual) and the initial adapters, with the settings that made them
(``init_state.json``). A resumed run and ``jqlora.export`` load the base normally and take these instead of redoing
the SVDs (an 8B model's LoftQ is many minutes of host SVDs, a 70B's hours), so a resume is also bit-exact on any
machine. Settings that differ (another base, rank, quantization, seed, ...) or a damaged file: recomputed, with a
warning. Its size is the 4-bit base's (about 4.5 GB for an 8B model).

``gaussian`` leaves the base alone: its adapter is a plain LoRA whose ``adapter_config.json`` says
``init_lora_weights: "gaussian"``, as peft writes for that init (peft reads it back, then loads the weights over it).
(LoftQ's keeps ``true``: with peft's own ``"loftq"``, peft would run LoftQ again, on a CUDA device, when it loads
the adapter.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.adapters import export
from jqlora.adapters.errors import AdapterError
from jqlora.adapters.format import CONFIG_NAME, WEIGHTS_NAME, num
from jqlora.adapters.load import read_tensors
from jqlora.adapters.merge import merge_to_hf
from jqlora.checkpoints import WEIGHTS, WEIGHTS_INDEX, ShardWriter, atomic_directory
from jqlora.checkpoints.checksums import verify_checkpoint
from jqlora.lora import LoraLinear, SplitModel

INIT_ADAPTER = "init_adapter"
BASE = "base"
INIT_STATE = "init_state"
INIT_STATE_META = "init_state.json"
_KERNEL_VARS = ("weight", "codes", "absmax", "nested_absmax", "offset", "lora_a", "lora_b", "magnitude")
log = logging.getLogger("jqlora.train")


def prepare_run(model: Any, cfg: Any, out: str | os.PathLike) -> None:
    """At a run's fresh start: save what its export will need (see the module docstring)."""
    init, out = cfg.lora.init, Path(out)
    save_init_state(model, cfg, out)
    if init == "pissa":
        export.save_adapter(model, out / INIT_ADAPTER, base_model_name_or_path=str(cfg.model.path), overwrite=True)
    elif init == "loftq":
        save_base(model, cfg, out)


def save_base(model: Any, cfg: Any, out: str | os.PathLike) -> None:
    """``out/base``: deq(Q) of ``model``'s kernels (its adapters set to zero), with checksums."""
    split = SplitModel.of(model)
    zero = split.model(jax.tree.map(jnp.zeros_like, split.lora))
    merge_to_hf(zero, cfg.model.path, Path(out) / BASE, dtype="float32", overwrite=True, checksums=True)


def base_for_adapter(cfg: Any, run_out: str | os.PathLike, original: str, model: Any = None) -> str:
    """The base the exported adapter loads on: the saved LoftQ base, else the original checkpoint. The LoftQ base is
    verified against its checksums first; a missing or damaged one is written again from ``model`` (its kernels are
    the base trained on), with a warning, or refused in one line when no model is at hand."""
    if cfg.lora.init != "loftq":
        return original
    where = Path(run_out).resolve() / BASE
    why = verify_checkpoint(where) if where.is_dir() else "missing"
    if why is not None:
        if model is None:
            raise AdapterError(f"{where}: not usable ({why}); run the export again to write it anew")
        log.warning("warning: %s: not usable (%s); written again from the run's base", where, why)
        save_base(model, cfg, run_out)
    return str(where)


def save_adapter(model: Any, cfg: Any, run_out: str | os.PathLike, dst: str | os.PathLike, *, lora_config: Any,
                 base: str, dtype: str = "float32", card: Mapping[str, Any] | None = None,
                 overwrite: bool = False, side_files: Callable[[Path], Any] | None = None) -> Path:
    """`jqlora.adapters.save_adapter`, converted for PiSSA / pointed at the saved (and verified) base for LoftQ."""
    base = base_for_adapter(cfg, run_out, base, model)
    if cfg.lora.init != "pissa":
        out = export.save_adapter(model, dst, lora_config=lora_config, base_model_name_or_path=base, dtype=dtype,
                                card=card, overwrite=overwrite, side_files=side_files)
        if cfg.lora.init == "gaussian":  # what peft writes for init_lora_weights="gaussian"
            path = out / CONFIG_NAME
            config = {**json.loads(path.read_text()), "init_lora_weights": "gaussian"}
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)
        return out
    from safetensors.numpy import save_file

    init_dir = Path(run_out) / INIT_ADAPTER
    if not (init_dir / WEIGHTS_NAME).is_file():
        raise AdapterError(f"{init_dir}: missing (a PiSSA run saves its initial adapter there at its start; "
                                "the export needs it to convert the adapter onto the original base)")
    tensors = export.adapter_tensors(model)
    initial = read_tensors(init_dir / WEIGHTS_NAME)
    config = export.adapter_config_dict(model, lora_config, base)
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if key not in initial:
            raise AdapterError(f"{init_dir}: no {key} (the initial adapter is of another run?)")
        axis = 0 if ".lora_A." in key else 1
        first = initial[key] if axis == 0 else -initial[key]
        out[key] = np.ascontiguousarray(np.concatenate([value, first], axis=axis))
    factor = math.sqrt(2.0) if config["use_rslora"] else 2.0
    config["r"] *= 2
    config["lora_alpha"] = num(config["lora_alpha"] * factor)
    config["rank_pattern"] = {k: 2 * v for k, v in config["rank_pattern"].items()}
    config["alpha_pattern"] = {k: num(v * factor) for k, v in config["alpha_pattern"].items()}
    if dtype != "float32":
        out = {k: np.asarray(jnp.asarray(v).astype(dtype)) for k, v in out.items()}
    card = {**(card or {}), "init": "PiSSA, converted to a plain rank-2r LoRA on the original base"}
    with atomic_directory(Path(dst), overwrite=overwrite, error=AdapterError,
                          need=sum(int(v.nbytes) for v in out.values())) as tmp:
        save_file(out, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(export.model_card(base, card))
        if side_files is not None:
            side_files(tmp)
    return Path(dst)


# ----------------------------------------------------------------------------------------------------------------
# The adjusted base and initial adapters, saved once so that resumes and exports do not redo the SVDs


def _fingerprint(cfg: Any) -> dict:
    """The settings that decide the adjusted base and the initial adapters."""
    m, lo = cfg.model, cfg.lora
    return {"model": {k: getattr(m, k) for k in ("path", "quant", "double_quant", "block_size", "dtype")},
            "lora": {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                     ((k, getattr(lo, k)) for k in ("init", "loftq_iters", "svd_niter", "r", "alpha", "rslora",
                                                      "targets", "dora"))},
            "seed": cfg.train.seed}


def _lora_linears(model: Any) -> Iterator[tuple[str, Any]]:
    from flax import nnx

    for path, m in nnx.iter_modules(model):
        if isinstance(m, LoraLinear):
            yield ".".join(map(str, path)), m


def save_init_state(model: Any, cfg: Any, out: str | os.PathLike) -> None:
    """``out/init_state``: the kernels and adapters of every LoraLinear of ``model`` (as it starts), sharded."""
    if jax.process_count() > 1:  # (the arrays are spread over processes; resumes recompute: same numbers)
        return
    with atomic_directory(Path(out) / INIT_STATE, overwrite=True, checksums=True) as tmp:
        writer = ShardWriter(tmp, 1 << 30, {"format": "jqlora-init-state"})
        for name, m in _lora_linears(model):
            writer.add({f"{name}.{v}": np.asarray(getattr(m, v)[...]) for v in _KERNEL_VARS
                        if getattr(m, v, None) is not None})
        writer.finish()
        (tmp / INIT_STATE_META).write_text(json.dumps(_fingerprint(cfg), indent=2, sort_keys=True) + "\n")


def load_init_state(cfg: Any, run_dir: str | os.PathLike, load: Callable[[], Any]) -> Any | None:
    """The model as the run in ``run_dir`` started (``load()`` builds the base, quantized as configured; its kernels
    and adapters are then replaced by the saved ones), or None when nothing usable is saved there."""
    from safetensors import safe_open

    where = Path(run_dir) / INIT_STATE
    if not where.is_dir():
        return None
    why = verify_checkpoint(where)  # (every file, before one number of it is trusted)
    if why is not None:
        log.warning("warning: %s: not usable (%s); lora.init=%s is computed again", where, why, cfg.lora.init)
        return None
    try:
        saved = json.loads((where / INIT_STATE_META).read_text())
    except (OSError, ValueError):
        saved = None
    if saved != json.loads(json.dumps(_fingerprint(cfg))):
        log.warning("warning: %s: saved with other settings; lora.init=%s is computed again", where, cfg.lora.init)
        return None
    model = load()
    try:
        files = [where / WEIGHTS]  # (one shard, or the index's: ShardWriter's layout)
        if (where / WEIGHTS_INDEX).is_file():
            files = sorted({where / f for f in json.loads((where / WEIGHTS_INDEX).read_text())["weight_map"].values()})
        with contextlib.ExitStack() as stack:
            return _fill_init_state(model, [stack.enter_context(safe_open(str(f), framework="flax")) for f in files],
                                    cfg, where)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: the numbers can always be computed again
        log.warning("%s: not usable (%s); lora.init=%s is computed again", where, str(e).splitlines()[0] if str(e)
                    else type(e).__name__, cfg.lora.init)
        return None


def _fill_init_state(model: Any, handles: list, cfg: Any, where: Path) -> Any:
    """``model`` with every LoraLinear kernel and adapter replaced by the saved one (open safetensors ``handles``)."""
    owner = {k: h for h in handles for k in h.keys()}
    todo = [(m, v, f"{name}.{v}") for name, m in _lora_linears(model) for v in _KERNEL_VARS
            if getattr(m, v, None) is not None]
    if {key for _, _, key in todo} != set(owner):
        raise ValueError("it holds other tensors than this model has")
    for m, v, key in todo:
        value, var = owner[key].get_tensor(key), getattr(m, v)
        if tuple(value.shape) != tuple(var.shape) or value.dtype != var[...].dtype:
            raise ValueError(f"{key} is {value.dtype}{list(value.shape)}, the model's {var[...].dtype}"
                             f"{list(var.shape)}")
        var.set_value(value)
    log.info("lora.init=%s: the adjusted base and initial adapters from %s", cfg.lora.init, where)
    return model
