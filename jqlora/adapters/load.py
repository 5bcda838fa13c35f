"""Reading peft LoRA adapters into jqlora models: the adapter config, its weight keys and shapes, the jqlora
`LoraConfig` that holds an adapter (`read_adapter_config`), filling a model's A / B (`load_adapter`), and
`load_model`, a checkpoint with an adapter on it (`jqlora.load_model`). The format
and the conventions are described in `jqlora.adapters.format`.

Shape letters: L layers, I in features, O out features, R LoRA rank.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora.adapters.errors import AdapterError
from jqlora.adapters.experts import EXPERT_MODULES, check_config, expert_modules, expert_updates
from jqlora.adapters.export import lora_modules
from jqlora.adapters.format import (BASE_COPY_RE, CONFIG_NAME, LAYER_RE, PREFIX, WEIGHTS_NAME, WEIGHTS_NAME_BIN, num,
                                    parse_key)
from jqlora.adapters.heads import HEADS, check_base_copy, head_modules, head_specs, head_updates
from jqlora.checkpoints import load_checkpoint, place_lora
from jqlora.lora import ADAPTABLE_MODULES, LoraConfig, LoraSpec, match_pattern

# ----------------------------------------------------------------------------------------------------------------
# Import


def _positive(value, integer: bool) -> bool:
    """A positive, finite number (NaN and Infinity are JSON that Python reads); an integer one for ranks."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        return False
    return float(value).is_integer() if integer else True


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: not a directory (expected a peft adapter directory)")
    if not path.is_file():
        inner = adapter_dir / "adapter"  # (a run directory: its final adapter is there)
        hint = f"; its run's adapter is {inner}" if (inner / CONFIG_NAME).is_file() else ""
        raise AdapterError(f"{path}: missing; {adapter_dir} is not a peft adapter directory{hint}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type {peft_type!r} is not supported; jqlora reads LORA adapters only")
    unsupported = {  # settings jqlora cannot represent: anything but null / false / empty is refused
        "fan_in_fan_out": "fan_in_fan_out=true (Conv1D models)",
        "lora_bias": "LoRA biases (lora_bias=true)",
        "modules_to_save": "modules_to_save (fully trained extra modules)",
        "trainable_token_indices": "trainable_token_indices",
        "layer_replication": "layer_replication",
        "use_qalora": "QA-LoRA (use_qalora=true)",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    }
    for key, what in unsupported.items():
        if cfg.get(key) not in (None, False, [], {}):
            raise AdapterError(f"{path}: {what} is not supported by jqlora ({key}={cfg.get(key)!r})")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={cfg.get('bias')!r} is not supported by jqlora (only 'none')")
    task = cfg.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{path}: task_type {task!r} is not supported; jqlora reads CAUSAL_LM adapters")
    layers = cfg.get("layers_to_transform")
    if layers not in (None, []):
        ok = isinstance(layers, int) or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
        if not ok or isinstance(layers, bool):
            raise AdapterError(f"{path}: layers_to_transform must be a layer index or a list of them, got {layers!r}")
        pattern = cfg.get("layers_pattern")
        if pattern not in (None, "", [], "layers", ["layers"]):
            raise AdapterError(f"{path}: layers_pattern={pattern!r} is not supported by jqlora (its decoder layers "
                               "are model.layers; use null or 'layers')")
    for key, integer in (("r", True), ("lora_alpha", False)):  # (and every value of their patterns)
        pattern = cfg.get("rank_pattern" if integer else "alpha_pattern") or {}
        if not isinstance(pattern, dict):
            raise AdapterError(f"{path}: {'rank_pattern' if integer else 'alpha_pattern'} must be an object")
        for name, value in [(key, cfg.get(key)), *((f"{key} of {k}", v) for k, v in pattern.items())]:
            if not _positive(value, integer):
                raise AdapterError(f"{path}: {name} must be a positive finite {'integer' if integer else 'number'}"
                                   f", got {value!r}")
    if check_config(cfg, path) and (cfg.get("lora_dropout") or cfg.get("use_dora")):  # (peft refuses these too)
        raise AdapterError(f"{path}: expert adapters (target_parameters) with lora_dropout={cfg.get('lora_dropout')}"
                           f" / use_dora={cfg.get('use_dora')}: peft allows neither on target_parameters")
    return cfg


def _weights_file(adapter_dir: Path) -> Path:
    for name in (WEIGHTS_NAME, WEIGHTS_NAME_BIN):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise AdapterError(f"{adapter_dir / WEIGHTS_NAME}: missing (no adapter weights in {adapter_dir})")


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of an adapter weights file as float32 numpy arrays."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            out = {}
            with safe_open(str(path), framework="flax") as f:
                for k in f.keys():
                    out[k] = np.asarray(f.get_tensor(k).astype(jnp.float32))
            return out
        import torch  # a legacy .bin adapter

        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        return {k: v.detach().float().numpy() for k, v in sd.items()}
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file: say which
        raise AdapterError(f"{path}: cannot read adapter weights ({type(e).__name__}: {e})") from None


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the adapter's LoRA tensors (peft's copies of base embedding / head weights left out)."""
    return {k: v for k, v in _read_all_shapes(path).items() if not BASE_COPY_RE.match(k)}


def _read_all_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001
            raise AdapterError(f"{path}: cannot read adapter weights ({type(e).__name__}: {e})") from None
    return {k: tuple(v.shape) for k, v in read_tensors(path).items()}


def _adapted_modules(adapter_dir: Path, cfg: dict) -> dict[str, dict[int, tuple[int, float]]]:
    """``{name inside a layer: {layer: (r, alpha)}}`` from the weight keys (ranks from A's shape)."""
    path = _weights_file(adapter_dir)
    shapes = _read_shapes(path)
    adapters = {parse_key(k, path)[2] for k in shapes}
    if len(adapters) > 1:
        raise AdapterError(f"{path}: holds several adapters {sorted(map(str, adapters))}; jqlora loads one")
    found: dict[str, dict[int, tuple[int, float]]] = {}
    magnitudes = {parse_key(k, path)[0] for k in shapes if parse_key(k, path)[1] == "M"}
    for key, shape in shapes.items():
        module, ab, _ = parse_key(key, path)
        if ab != "A" or module in HEADS:
            continue
        m = LAYER_RE.match(module)
        if m is not None and m["sub"] in EXPERT_MODULES:  # (jqlora.adapters.experts)
            if not check_config(cfg, path):
                raise AdapterError(f"{path}: {key} is an expert adapter but the adapter config has no "
                                   "target_parameters")
            continue
        if bool(cfg.get("use_dora")) and module not in magnitudes:
            raise AdapterError(f"{path}: the adapter config says use_dora=true but {module} has no DoRA magnitude "
                               f"(no {PREFIX}{module}.lora_magnitude_vector)")
        m = LAYER_RE.match(module)
        if m is None or m["sub"] not in {f"{p}.{n}" for p, ns in _PARENTS.items() for n in ns}:
            raise AdapterError(f"{path}: unexpected key {key!r}: no such adaptable module in a supported model "
                               f"(an adapter for another architecture?)")
        if len(shape) != 2:
            raise AdapterError(f"{path}: {key} has shape {shape}, expected [r, in]")
        r = int(shape[0])
        alpha = float(match_pattern(cfg.get("alpha_pattern"), module, cfg["lora_alpha"]))
        found.setdefault(m["sub"], {})[int(m["layer"])] = (r, alpha)
    if not found and not head_specs(shapes, cfg, path) and not check_config(cfg, path):
        raise AdapterError(f"{path}: no LoRA weights in the adapter")
    return found


_PARENTS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"),
            "mlp": ("gate_proj", "up_proj", "down_proj", "gate_up_proj")}
# every linear module of one layout: an adapter on all of them was made with "all-linear"
_ALL_LINEAR = ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
               {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"})


def read_adapter_config(adapter_dir: str | os.PathLike, *, dropout: float | None = None) -> LoraConfig:
    """The jqlora `LoraConfig` that builds a model able to hold the peft adapter in ``adapter_dir``.

    Targets and per-module ranks come from the adapter's weights (so subsets and ``rank_pattern`` are honoured);
    alpha from ``lora_alpha`` / ``alpha_pattern`` as peft resolves them. Ranks and alphas may differ between layers
    (the result's ``rank_pattern`` / ``alpha_pattern`` keys then name one layer's module, as peft's may) and layers may
    be left out (``layers_to_transform``), but every module kind must be adapted in the same layers (peft's
    layers_to_transform is one set for all), else `AdapterError`.
    """
    adapter_dir = Path(adapter_dir)
    cfg = _read_config(adapter_dir)
    found = _adapted_modules(adapter_dir, cfg)
    layers = sorted({i for per_layer in found.values() for i in per_layer})
    for name, per_layer in sorted(found.items()):
        missing = [i for i in layers if i not in per_layer]
        if missing:
            raise AdapterError(f"{adapter_dir}: {name} is adapted in layers {sorted(per_layer)} but not in {missing} "
                               "while other modules are; jqlora (like peft's layers_to_transform) adapts every "
                               "module kind in the same layers")
    heads = head_specs(_read_shapes(_weights_file(adapter_dir)), cfg, _weights_file(adapter_dir))
    ranks = [r for per_layer in found.values() for r, _ in per_layer.values()] + [r for r, _ in heads.values()]
    if not ranks:  # (expert adapters alone: jqlora's LoraConfig names at least one target module)
        raise AdapterError(f"{adapter_dir}: expert adapters (target_parameters) without any target_modules are not "
                           "supported; jqlora adapts the experts together with linear modules")
    r = Counter(ranks).most_common(1)[0][0]
    experts = check_config(cfg, adapter_dir / CONFIG_NAME)
    r = int(cfg["r"]) if int(cfg["r"]) in ranks or experts or not ranks else r  # (expert adapters: the config's r)
    alpha = float(cfg["lora_alpha"])
    specs: dict[str, tuple[int, float]] = {}  # module kinds with one rank and alpha
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, int | float] = {}
    for name, per_layer in sorted(found.items()):
        if len(set(per_layer.values())) == 1:
            specs[name] = next(iter(per_layer.values()))
            continue
        # per layer: a key per layer that differs from r / alpha (keys name one module, so any order is right)
        specs[name] = (r, alpha)  # (for the targets below)
        rank_pattern.update({f"model.layers.{i}.{name}": ri for i, (ri, _) in sorted(per_layer.items()) if ri != r})
        alpha_pattern.update({f"model.layers.{i}.{name}": num(ai) for i, (_, ai) in sorted(per_layer.items())
                              if not math.isclose(ai, alpha)})
    # layers_to_transform: as the adapter config says, or when the adapted layers have gaps
    chosen = cfg.get("layers_to_transform") not in (None, []) or layers != list(range(len(layers)))
    if chosen and experts:
        raise AdapterError(f"{adapter_dir}: expert adapters (target_parameters) next to layers_to_transform={layers}: "
                           "jqlora adapts the experts in every layer")
    if chosen and heads:
        raise AdapterError(f"{adapter_dir}: adapters on {sorted(HEADS[h] for h in heads)} next to layers_to_transform"
                           f"={layers}: jqlora's layers_to_transform leaves the embedding and head alone")
    targets = tuple(n for n in ADAPTABLE_MODULES if any(name.endswith("." + n) for name in specs))
    if heads:  # named targets (all-linear never covers embed_tokens / lm_head)
        specs.update(heads)
        targets = tuple(n for n in ADAPTABLE_MODULES if any(name.endswith("." + n) for name in specs)) + tuple(heads)
    return LoraConfig(
        r=r,
        alpha=alpha,
        dropout=float(cfg.get("lora_dropout") or 0.0) if dropout is None else dropout,
        targets="all-linear" if set(targets) in _ALL_LINEAR else targets,  # (never with heads: they are in it)
        rslora=bool(cfg.get("use_rslora", False)),
        dora=bool(cfg.get("use_dora", False)),
        experts=experts,
        rank_pattern={**{name: s[0] for name, s in specs.items() if s[0] != r}, **rank_pattern},
        alpha_pattern={**{name: num(s[1]) for name, s in specs.items() if not math.isclose(s[1], alpha)},
                       **alpha_pattern},
        layers_to_transform=tuple(layers) if chosen and layers else None,
    )


def load_adapter(model: nnx.Module, adapter_dir: str | os.PathLike) -> nnx.Module:
    """Fill ``model``'s LoRA A/B from the peft adapter in ``adapter_dir`` (in place; returns ``model``).

    ``model`` must be built with ``read_adapter_config(adapter_dir)`` (or an equivalent LoraConfig): every adapted
    module of the adapter must exist in the model with the same rank and scaling, and every adapter of the model
    must be in the file. Missing or unexpected keys and shapes that do not fit raise `AdapterError` naming the key.
    """
    adapter_dir = Path(adapter_dir)
    cfg = _read_config(adapter_dir)
    path = _weights_file(adapter_dir)
    tensors = read_tensors(path)
    by_module: dict[tuple[str, str], tuple[str, np.ndarray]] = {}
    adapters = set()
    for key, value in list(tensors.items()):
        copy = BASE_COPY_RE.match(key)
        if copy is not None:  # peft's full copy of a base weight: must be the base model's own
            check_base_copy(model, copy, key, value, path)
            continue
        module, ab, adapter = parse_key(key, path)
        adapters.add(adapter)
        by_module[(module, ab)] = (key, value)
    if len(adapters) > 1:
        raise AdapterError(f"{path}: holds several adapters {sorted(map(str, adapters))}; jqlora loads one")
    suffix = "" if adapters == {None} else f".{adapters.pop()}"
    rslora = bool(cfg.get("use_rslora", False))
    modules = lora_modules(model)
    if not modules and not head_modules(model) and not expert_modules(model):
        raise AdapterError(f"{adapter_dir}: the model has no LoRA adapters to fill; build it with "
                           "lora=jqlora.adapters.read_adapter_config(adapter_dir)")
    dora = bool(cfg.get("use_dora", False))
    if any((m.magnitude is not None) != dora for _, m in modules):
        raise AdapterError(f"{adapter_dir}: the adapter has use_dora={dora} but the model was built with "
                           f"dora={not dora}; build it with lora=jqlora.adapters.read_adapter_config(adapter_dir)")
    used: set[tuple[str, str]] = set()
    updates = []
    for name, m in modules:
        L = m.lora_a.shape[0]
        R, I, O = m.spec.r, m.in_features, m.out_features
        a_LIR = np.zeros((L, I, R), np.float32)  # (a per-layer adapter: layer i fills its first r_i columns)
        b_LRO = np.zeros((L, R, O), np.float32)
        mag_LO = np.zeros((L, O), np.float32) if dora else None
        for i in range(L):
            r = m.spec.layer_ranks[i] if m.spec.per_layer else R
            if r == 0:  # a layer this adapter leaves out: its keys, if any, are unexpected below
                continue
            module = f"model.layers.{i}.{name}"
            parts = [("A", (r, I), a_LIR), ("B", (O, r), b_LRO)] + ([("M", (O,), mag_LO)] if dora else [])
            for ab, expected, buf in parts:
                key = (f"{PREFIX}{module}.lora_magnitude_vector" if ab == "M"
                       else f"{PREFIX}{module}.lora_{ab}{suffix}.weight")
                if (module, ab) not in by_module:
                    raise AdapterError(f"{path}: missing key {key!r} (the model adapts {name} with r={r})")
                key, value = by_module[(module, ab)]
                if tuple(value.shape) != expected:
                    raise AdapterError(f"{path}: {key} has shape {tuple(value.shape)}, expected {expected}")
                if ab == "A":
                    buf[i, :, :r] = value.T
                elif ab == "B":
                    buf[i, :r] = value.T
                else:
                    buf[i] = value
                used.add((module, ab))
            alpha = float(match_pattern(cfg.get("alpha_pattern"), module, cfg["lora_alpha"]))
            scaling = LoraSpec(r=r, alpha=alpha, rslora=rslora).scaling
            ours = m.spec.layer_scalings()[i] if m.spec.per_layer else m.spec.scaling
            if not math.isclose(scaling, ours, rel_tol=1e-6):
                raise AdapterError(f"{adapter_dir}: {module} has LoRA scaling {scaling:g} in the adapter "
                                   f"(alpha={num(alpha)}, r={r}, rslora={rslora}) but {ours:g} in the model; "
                                   "build the model with lora=jqlora.adapters.read_adapter_config(adapter_dir)")
        updates.append((m, a_LIR, b_LRO, mag_LO))
    head_values = head_updates(model, by_module, suffix, cfg, path, adapter_dir, used)
    if check_config(cfg, path) != bool(expert_modules(model)):
        raise AdapterError(f"{adapter_dir}: the adapter has {'' if check_config(cfg, path) else 'no '}expert "
                           "adapters (target_parameters) but the model was built with lora.experts="
                           f"{bool(expert_modules(model))}; build it with "
                           "lora=jqlora.adapters.read_adapter_config(...)")
    head_values += expert_updates(model, by_module, suffix, cfg, path, used)
    unexpected = sorted(by_module[k][0] for k in by_module if k not in used)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise AdapterError(f"{path}: unexpected key {unexpected[0]!r}{more}: the model has no adapter there; build "
                           "it with lora=jqlora.adapters.read_adapter_config(adapter_dir)")
    for m, a_LIR, b_LRO, mag_LO in updates:
        m.lora_a.set_value(jnp.asarray(a_LIR, m.lora_a.dtype))
        m.lora_b.set_value(jnp.asarray(b_LRO, m.lora_b.dtype))
        if mag_LO is not None:
            m.magnitude.set_value(jnp.asarray(mag_LO, m.magnitude.dtype))
    for var, value in head_values:
        var.set_value(jnp.asarray(value, var.dtype))
    return model


def load_model(
    path: str | os.PathLike,
    *,
    quant: str = "nf4",
    double_quant: bool = True,
    block_size: int = 64,
    dtype: Any = "bfloat16",
    adapter: str | os.PathLike | None = None,
    lora: LoraConfig | None = None,
    seed: int = 0,
    remat: str = "full",
    mesh: Any = None,
    quantize_experts: bool = True,
) -> nnx.Module:
    """Load a model from a Hugging Face directory (converted on the fly) or a `python -m jqlora.convert` output.

    A Hugging Face directory may hold safetensors (single or sharded), PyTorch .bin, or a bitsandbytes 4-bit
    checkpoint (whose 4-bit weights are used as stored). A jqlora directory is loaded with the quantization it was
    converted with (``quant``/``double_quant``/``block_size`` are then taken from it). ``lora`` adds fresh adapters
    (peft initialization); ``adapter`` loads a peft LoRA adapter directory (its config sets the LoRA settings).
    ``quantize_experts`` False keeps the fused MoE experts in ``dtype`` (transformers + bitsandbytes' choice).
    The model maps int32 ``input_ids[B, S]`` (optionally ``segment_ids``, ``positions``) to
    float32 logits ``[B, S, V]``.

    ``mesh`` (a ("data", "fsdp", "tensor") mesh, `jqlora.parallel.make_mesh`): every variable is placed on the mesh
    by `jqlora.parallel`'s partition rules while loading, one tensor at a time, so no device and no host ever holds
    the whole model unquantized (see the module docstring); the values equal the unsharded load's bit for bit.
    """
    kw = dict(quant=quant, double_quant=double_quant, block_size=block_size, dtype=dtype, seed=seed, remat=remat,
              mesh=mesh, quantize_experts=quantize_experts)
    if adapter is None:
        return load_checkpoint(path, lora=lora, **kw)
    if lora is not None:
        raise ValueError("pass either adapter= or lora=, not both: the adapter defines its LoRA settings")
    model = load_adapter(load_checkpoint(path, lora=read_adapter_config(adapter), **kw), adapter)
    return model if mesh is None else place_lora(model, mesh)


def load_model_with_adapter(path: str | os.PathLike, adapter_dir: str | os.PathLike, **kw: Any) -> nnx.Module:
    """`load_model(path, adapter=adapter_dir, ...)`: ranks and targets come from the adapter."""
    return load_model(path, adapter=adapter_dir, **kw)
