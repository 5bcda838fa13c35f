"""Writing a model's adapters as a peft LoRA adapter directory (`save_adapter`): the tensors peft names and the
``adapter_config.json`` that rebuilds the same modules (the format: `jqlora.adapters.format`).

Shape letters: L layers, I in features, O out features, R LoRA rank.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora.adapters.errors import AdapterError
from jqlora.adapters.experts import check_export, expert_modules, expert_tensors
from jqlora.adapters.format import CONFIG_NAME, PREFIX, SAVE_DTYPES, WEIGHTS_NAME, num
from jqlora.adapters.heads import HEADS, head_modules, head_tensors
from jqlora.checkpoints import atomic_directory
from jqlora.lora import LoraConfig, LoraLinear



def lora_modules(model: nnx.Module) -> list[tuple[str, LoraLinear]]:
    """``(dotted name inside a layer, module)`` for every stacked LoraLinear with an adapter, in model order."""
    out = []
    for path, module in nnx.iter_modules(model):
        if isinstance(module, LoraLinear) and module.lora_a is not None:
            path = tuple(map(str, path))
            if path[:2] != ("model", "layers"):
                raise AdapterError(f"adapter on {'.'.join(path)}: only decoder-layer modules can be exported")
            out.append((".".join(path[2:]), module))
    return out


def _layer_values(m: LoraLinear) -> list[tuple[int, int, float]]:
    """``(layer, r, alpha)`` of every layer a stacked module adapts (a layer left out has rank 0)."""
    spec, L = m.spec, m.lora_a.shape[0]
    ranks = spec.layer_ranks if spec.per_layer else (spec.r,) * L
    alphas = spec.layer_alphas if spec.per_layer else (spec.alpha,) * L
    return [(i, int(ri), float(ai)) for i, (ri, ai) in enumerate(zip(ranks, alphas)) if ri]


def _pattern(name: str, values: list[tuple[int, float]], default: float, same) -> dict[str, int | float]:
    """``rank_pattern`` / ``alpha_pattern`` entries of module kind ``name`` from its ``(layer, value)`` pairs: the
    kind's own key when every adapted layer has one value, else a key per layer (never both, so the first matching
    key is the right one in any order: json sorts them); values ``same`` as the default get none."""
    if len({v for _, v in values}) == 1:
        return {} if same(values[0][1], default) else {name: num(values[0][1])}
    return {f"model.layers.{i}.{name}": num(v) for i, v in values if not same(v, default)}


def adapter_config_dict(model: nnx.Module, lora_config: LoraConfig, base_model_name_or_path: str = "") -> dict:
    """The ``adapter_config.json`` contents for ``model``'s adapters (the keys current peft writes, sorted)."""
    modules = lora_modules(model)
    heads = head_modules(model)
    if not modules and not heads and not expert_modules(model):
        raise AdapterError("the model has no LoRA adapters to export (build it with a LoraConfig)")
    target_parameters = check_export(model, lora_config)
    r, alpha = int(lora_config.r), float(lora_config.alpha)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, int | float] = {}
    for name, m, _, _ in heads:
        if m.spec.r != r:
            rank_pattern[HEADS[name]] = int(m.spec.r)
        if not math.isclose(m.spec.alpha, alpha):
            alpha_pattern[HEADS[name]] = num(m.spec.alpha)
    adapted = {name: _layer_values(m) for name, m in modules}  # per kind: (layer, r, alpha) of its adapted layers
    layer_sets = {name: tuple(i for i, _, _ in on) for name, on in adapted.items()}
    layers_to_transform = None
    if layer_sets:
        sets = set(layer_sets.values())
        if len(sets) > 1:
            detail = "; ".join(f"{n}: {list(v)}" for n, v in layer_sets.items())
            raise AdapterError(f"the module kinds are adapted in different layers ({detail}); peft's "
                               "layers_to_transform holds one set of layers for all of them")
        chosen = sets.pop()
        if len(chosen) < modules[0][1].lora_a.shape[0]:
            layers_to_transform = list(chosen)
    for name, m in modules:
        if m.spec.rslora != bool(lora_config.rslora):
            raise AdapterError(f"{name}: use_rslora={m.spec.rslora} differs from the LoraConfig's {lora_config.rslora}")
        if (m.magnitude is not None) != bool(getattr(lora_config, "dora", False)):
            raise AdapterError(f"{name}: DoRA={m.magnitude is not None} differs from the LoraConfig's "
                               f"{bool(getattr(lora_config, 'dora', False))}")
        on = adapted[name]
        rank_pattern.update(_pattern(name, [(i, ri) for i, ri, _ in on], r, lambda x, y: x == y))
        alpha_pattern.update(_pattern(name, [(i, ai) for i, _, ai in on], alpha, math.isclose))
    cfg = {
        "alora_invocation_tokens": None,
        "alpha_pattern": alpha_pattern,
        "arrow_config": None,
        "astra_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": str(base_model_name_or_path or ""),
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": layers_to_transform,
        "loftq_config": {},
        "lora_alpha": num(alpha),
        "lora_bias": False,
        "lora_dropout": float(lora_config.dropout),
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "qalora_group_size": 16,
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in modules} | {HEADS[h[0]] for h in heads}),
        "target_parameters": target_parameters,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": any(m.magnitude is not None for _, m in modules),
        "use_qalora": False,
        "use_rslora": bool(lora_config.rslora),
        "velora_config": None,
    }
    return cfg


def adapter_tensors(model: nnx.Module, dtype: str = "float32") -> dict[str, np.ndarray]:
    """peft's state dict of ``model``'s adapters: ``lora_A.weight [R, I]`` and ``lora_B.weight [O, R]`` per layer."""
    if dtype not in SAVE_DTYPES:
        raise AdapterError(f"unsupported adapter dtype {dtype!r}: expected one of {', '.join(SAVE_DTYPES)}")
    out: dict[str, np.ndarray] = {}
    for name, m in lora_modules(model):
        mag_LO = None if m.magnitude is None else np.asarray(m.magnitude[...].astype(jnp.float32))
        for i in range(m.lora_a.shape[0]):
            a_IR, b_RO, _ = m.layer_adapter(i)  # (a per-layer adapter: this layer's rank; none if not adapted)
            if a_IR.shape[-1] == 0:
                continue
            stem = f"{PREFIX}model.layers.{i}.{name}"
            out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a_IR.T)
            out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b_RO.T)
            if mag_LO is not None:
                out[f"{stem}.lora_magnitude_vector"] = np.ascontiguousarray(mag_LO[i])
    out.update(head_tensors(model))
    out.update(expert_tensors(model))
    return out


def model_card(base: str, card: Mapping[str, Any] | None) -> str:
    card = dict(card or {})
    lines = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["library_name: peft", "pipeline_tag: text-generation", "tags:"]
    if base:
        lines.append(f"- base_model:adapter:{base}")
    lines += ["- lora", "- qlora", "- jqlora", "- transformers", "---", "",
              f"# LoRA adapter{' for ' + base if base else ''}", "",
              "A LoRA adapter trained with jqlora (JAX QLoRA) in the peft format."]
    if base:
        lines += [f"It needs the base model `{base}`: `peft.AutoPeftModelForCausalLM.from_pretrained(this_dir)`",
                  "loads that base and the adapter, or `peft.PeftModel.from_pretrained(base_model, this_dir)`", ""]
    else:
        lines += ["Load it with `peft.PeftModel.from_pretrained(base_model, this_dir)`.", ""]
    rows = [("Base model", base or card.pop("base_model", None))]
    for label, key in (("Data", "data"), ("Steps", "steps"), ("Final loss", "final_loss")):
        rows.append((label, card.pop(key, None)))
    rows += [(str(k).replace("_", " ").capitalize(), v) for k, v in card.items()]
    for label, value in rows:
        if value is not None and value != "":
            if isinstance(value, float):
                value = f"{value:.4f}"
            lines.append(f"- **{label}:** {value}")
    return "\n".join(lines) + "\n"


def save_adapter(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    lora_config: LoraConfig | None = None,
    base_model_name_or_path: str = "",
    dtype: str = "float32",
    card: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    side_files: Callable[[Path], Any] | None = None,
) -> Path:
    """Write ``model``'s adapters as a peft LoRA adapter directory; returns its path.

    The directory is written to a temporary sibling and renamed into place, so a reader never sees half an adapter.
    An existing non-empty ``out_dir`` is an error unless ``overwrite``. ``card`` fills the README model card
    (``data``, ``steps``, ``final_loss`` and any other key: value rows). ``side_files(tmp)`` adds more files
    (the tokenizer: `jqlora.adapters.tokenizer_files`) inside the same atomic write.
    """
    from safetensors.numpy import save_file

    lora_config = lora_config if lora_config is not None else getattr(model, "lora_config", None)
    if lora_config is None:
        raise AdapterError("save_adapter needs the LoraConfig the model was built with (lora_config=...)")
    out = Path(out_dir)
    config = adapter_config_dict(model, lora_config, base_model_name_or_path)
    tensors = adapter_tensors(model, dtype)
    if dtype != "float32":  # numpy has no bfloat16 of its own; ml_dtypes (a JAX dependency) provides it
        tensors = {k: np.asarray(jnp.asarray(v).astype(dtype)) for k, v in tensors.items()}
    need = sum(int(v.nbytes) for v in tensors.values())
    with atomic_directory(out, overwrite=overwrite, error=AdapterError, need=need) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(str(base_model_name_or_path or ""), card))
        if side_files is not None:
            side_files(tmp)
    return out
