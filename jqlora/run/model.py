"""From a run config to the model it trains: the checks that need only the checkpoint's config.json (before minutes
of loading), the LoRA settings of the run, loading (streamed into shards on a multi-device mesh) and the adapters'
initialization (`jqlora.lora.initialize`). The trainer (`jqlora.run.loop`) and the export (`jqlora.run.restore`)
build through here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jqlora.adapters.init_state import load_init_state
from jqlora.checkpoints import Checkpoint, ConvertError, is_jqlora_dir, load_checkpoint
from jqlora.config import REPO_ROOT
from jqlora.lora import LoraConfig, LoraError, QuantSpec, initialize
from jqlora.lora.initialize import InitError
from jqlora.models import ModelConfig
from jqlora.planning.remat import resolve_remat

log = logging.getLogger("jqlora.train")

DEMO_MODEL = "assets/demo/model"


class UserError(ValueError):
    """A user mistake found by the trainer (missing model, unwritable output_dir, ...): one line, exit code 2."""


def _has_weights(path: str) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin")))


def ensure_demo_model(path: str) -> None:
    """The demo's base weights are committed (pretrained by tools/make_demo_model.py); say how to get them back."""
    demo = (REPO_ROOT / DEMO_MODEL).resolve()
    if Path(path).resolve() == demo and not _has_weights(path):
        raise UserError(f"{path}: the demo's base model is missing (restore it with `git checkout -- {DEMO_MODEL}`, "
                        "or rebuild it with `python tools/make_demo_model.py`, which needs torch)")


def build_model(cfg, check: Callable[[Any], None] | None = None, mesh=None, run_dir: str | None = None):
    """The quantized base model with fresh adapters, as the config says; ``check(ModelConfig)`` runs before loading.
    ``run_dir``: the run directory whose start PiSSA / LoftQ saved (`jqlora.adapters.init_state`), for resumes and
    exports.

    With a ``mesh`` of several devices in a single process, every tensor is loaded straight into its shards
    (`load_checkpoint(mesh=)`); otherwise the model is loaded on the default device (and placed by the caller).
    ``train.remat=auto`` is resolved here, from the memory plan of the model's shape on this mesh."""
    path = cfg.model.path
    if not os.path.isdir(path):
        raise UserError(f"model.path {path}: no such directory")
    ensure_demo_model(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"model.path {path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        shape = ModelConfig.from_hf(path)
        if "lm_head" in cfg.lora.target_modules and shape.tie_word_embeddings:
            raise UserError(f"lora.targets: lm_head cannot be adapted in {path}: its embeddings are tied "
                            "(tie_word_embeddings=true); adapt embed_tokens, or leave lm_head out")
        if cfg.train.memory == "min" and shape.hidden_size % cfg.model.block_size:
            raise UserError(f"train.memory=min: {path} has hidden size {shape.hidden_size}, not a multiple of "
                            f"model.block_size={cfg.model.block_size} (the 4-bit embedding's rows must be whole "
                            "blocks); pick a block size dividing it, or train.memory=default")
        if cfg.train.router_aux_loss_coef and not shape.num_experts:
            raise UserError(f"train.router_aux_loss_coef={cfg.train.router_aux_loss_coef} needs a model with experts "
                            f"(Mixtral, Qwen3-MoE); {path} has a dense MLP: set it to 0")
        if check is not None:
            try:
                check(shape)
            except ValueError as e:
                raise UserError(str(e).splitlines()[0]) from None
        # (the plan's axes: data, fsdp, tensor; a seq axis splits the tokens, not the weights)
        axes = {k: int(v) for k, v in mesh.shape.items() if k != "seq"} if mesh is not None else None
        remat, why = resolve_remat(cfg, shape, axes)
        if cfg.train.remat == "auto":
            log.info(why)
        streamed = mesh is not None and mesh.size > 1 and jax.process_count() == 1
        try:
            model = load_initialized(cfg, lambda quant, **kw: load_checkpoint(
                path, quant=quant, double_quant=cfg.model.double_quant, block_size=cfg.model.block_size,
                dtype=cfg.model.dtype, lora=LoraConfig.from_config(cfg.lora), seed=cfg.train.seed, remat=remat,
                mesh=mesh if streamed and kw.get("streamed", True) else None,
                quantize_experts=cfg.model.quantize_experts, memory=cfg.train.memory), run_dir=run_dir)
            model.mlp_chunk, model.offload_residual = cfg.train.mlp_chunk, cfg.train.residual_offloaded
            return model
        except (InitError, LoraError) as e:
            raise UserError(str(e).splitlines()[0]) from None
    except (ConvertError, FileNotFoundError) as e:
        raise UserError(str(e).splitlines()[0]) from None


def load_initialized(cfg: Any, load: Callable[..., Any], run_dir: Any = None) -> Any:
    """The model of a run config with its adapters initialized as ``cfg.lora.init`` says. ``load(quant, streamed=)``
    loads the base (`jqlora.checkpoints.load_checkpoint` with the run's other settings); PiSSA / LoftQ load it
    unquantized and unstreamed (the SVDs need the full-precision kernels), then quantize the adjusted base
    (`jqlora.lora.initialize.apply`), unless ``run_dir`` (a run directory being resumed or exported) holds what its
    start saved (`jqlora.adapters.init_state`)."""
    init, path = cfg.lora.init, cfg.model.path
    if init not in ("pissa", "loftq"):
        model = load(cfg.model.quant)
    else:
        bnb = False
        if not is_jqlora_dir(path):
            with Checkpoint(path) as ckpt:
                bnb = bool(ckpt.bnb)
        if bnb or is_jqlora_dir(path):
            raise InitError(f"lora.init={init}: model.path {path} is a 4-bit checkpoint (bitsandbytes, or jqlora's "
                            f"converted copy); {init} needs the full-precision Hugging Face checkpoint")
        if run_dir is not None:
            model = load_init_state(cfg, run_dir, lambda: load(cfg.model.quant, streamed=False))
            if model is not None:
                return model
        model = load("none", streamed=False)
    if init == "default":
        return model
    t0 = time.perf_counter()
    try:
        notes = initialize.apply(model, init, seed=cfg.train.seed, loftq_iters=cfg.lora.loftq_iters,
                                 svd_niter=cfg.lora.svd_niter,
                                 quant=QuantSpec(cfg.model.quant, cfg.model.double_quant, cfg.model.block_size,
                                                 cfg.model.quantize_experts))
    except ValueError as e:
        raise InitError(f"lora.init={init}: {str(e).splitlines()[0]}") from None
    log.info("lora.init=%s in %.1f s%s", init, time.perf_counter() - t0, "".join("; " + n for n in notes))
    return model
