"""Which modules get LoRA adapters and with which settings: `LoraConfig` (peft's names: targets, r, alpha, dropout,
rsLoRA, DoRA, ``rank_pattern`` / ``alpha_pattern`` by module kind or by layer, ``layers_to_transform``) resolved into
one `LoraSpec` per module (per stacked module kind: per-layer ranks / alphas where they differ; see `jqlora.lora` for
how those are stored, `jqlora.lora.layer`). Everything here is reachable from `jqlora.lora` too.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_MODULES = ("qkv_proj", "gate_up_proj")  # Phi-3's fused projections (what peft names them)
ADAPTABLE_MODULES = LINEAR_MODULES + FUSED_MODULES  # "all-linear" adapts whichever of these a model has
HEAD_MODULES = ("embed_tokens", "lm_head")  # also targetable by name (never by "all-linear", as in peft)


class LoraError(ValueError):
    """LoRA settings that do not fit the model (a rank pattern, layers_to_transform): one line naming the setting."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The resolved LoRA settings of one module."""

    r: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False  # DoRA magnitudes (jqlora.lora.dora)
    # per-layer ranks / alphas of a stacked module kind that differs between layers (0: layer not adapted); r is
    # then their maximum (the stored width) and alpha that of a layer with rank r
    layer_ranks: tuple[int, ...] | None = None
    layer_alphas: tuple[float, ...] | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    @property
    def per_layer(self) -> bool:
        return self.layer_ranks is not None

    @property
    def masked(self) -> bool:
        """Per-layer ranks that differ (or a layer left out): the adapter needs its rank mask."""
        return self.per_layer and len(set(self.layer_ranks)) > 1

    def layer_scalings(self) -> tuple[float, ...]:
        """s_l of every layer (0 where the layer is not adapted)."""
        return tuple(0.0 if r == 0 else (a / math.sqrt(r) if self.rslora else a / r)
                     for r, a in zip(self.layer_ranks, self.layer_alphas))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which linear modules get adapters, and their rank / alpha / dropout (peft's names and defaults where shared).

    ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``alpha`` per module, like peft: the first key K with
    ``re.match(rf"(.*\\.)?({K})$", name)`` on the module's full name (``model.layers.3.self_attn.q_proj``) decides, so
    ``q_proj`` / ``self_attn.q_proj`` name a module kind and ``model.layers.3.self_attn.q_proj`` one layer's module.
    ``layers_to_transform`` (layer indices; None: all) adapts those layers only, like peft's. A module kind whose
    rank differs between layers is padded to its largest rank with a frozen mask (see the module docstring).
    """

    r: int = 16
    alpha: float = 16
    dropout: float = 0.0
    targets: str | Sequence[str] = "all-linear"
    rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    dora: bool = False  # DoRA (jqlora.lora.dora): a trained magnitude per output row of every adapted module
    experts: bool = False  # MoE models: also adapt the experts' fused gate_up_proj / down_proj (jqlora.models.moe)
    layers_to_transform: Sequence[int] | None = None  # adapt these layers only (peft's layers_to_transform)

    def __post_init__(self):
        if isinstance(self.targets, str) and self.targets != "all-linear":
            object.__setattr__(self, "targets", (self.targets,))
        if not isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(self.targets))
            unknown = [t for t in self.targets if t not in ADAPTABLE_MODULES + HEAD_MODULES]
            if unknown:
                raise ValueError(f"unknown LoRA target module(s) {unknown}: expected 'all-linear' or names among "
                                 f"{ADAPTABLE_MODULES + HEAD_MODULES}")
            if not self.targets:
                raise ValueError("LoRA targets is empty: name at least one module or use 'all-linear'")
        if not (isinstance(self.r, int) and self.r > 0):
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        for key, value in self.rank_pattern.items():
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        if self.experts and (self.dropout > 0 or self.dora):  # (peft's ParamWrapper refuses both)
            raise ValueError(f"LoRA on the MoE experts takes no {'DoRA' if self.dora else 'dropout'} (peft refuses "
                             f"it on target_parameters): set dropout=0 and dora=False, or experts=False")
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            layers = [layers] if isinstance(layers, int) else list(layers)
            if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
                raise ValueError(f"lora.layers_to_transform must be a non-empty list of layer indices >= 0, got "
                                 f"{self.layers_to_transform!r}")
            object.__setattr__(self, "layers_to_transform", tuple(sorted(set(layers))))
            heads = [t for t in self.target_modules if t in HEAD_MODULES]
            if heads:
                raise ValueError(f"lora.layers_to_transform with lora.targets {heads}: layers_to_transform selects "
                                 "decoder layers, embed_tokens / lm_head are outside them; drop one of the two")
            if self.experts:
                raise ValueError("lora.layers_to_transform with lora.experts=true: the expert adapters are in every "
                                 "layer (at lora.r / lora.alpha); drop one of the two")

    @classmethod
    def from_config(cls, section: Any) -> LoraConfig:
        """The LoRA settings of a run config's ``lora`` section (`jqlora.config.LoraConfig`)."""
        return cls(r=section.r, alpha=section.alpha, dropout=section.dropout, targets=section.targets,
                   rslora=section.rslora, dora=section.dora, experts=section.experts,
                   rank_pattern=dict(section.rank_pattern), alpha_pattern=dict(section.alpha_pattern),
                   layers_to_transform=section.layers_to_transform)

    @property
    def target_modules(self) -> tuple[str, ...]:
        return LINEAR_MODULES if self.targets == "all-linear" else tuple(self.targets)

    def for_module(self, name: str, num_layers: int | None = None) -> LoraSpec | None:
        """The settings for the module ``name`` (a decoder-layer module like ``self_attn.q_proj`` when
        ``num_layers`` is given, its ``num_layers`` stacked copies resolved one by one as ``model.layers.{i}.NAME``;
        else e.g. ``embed_tokens``), or None if it gets no adapter. A module kind whose rank or alpha differs
        between layers (or that some layers leave out) gets a spec with ``layer_ranks`` / ``layer_alphas``."""
        short = name.rsplit(".", 1)[-1]
        fused = self.targets == "all-linear" and short in FUSED_MODULES  # (a Phi-3 layout's linear modules)
        if short not in self.target_modules and not fused:
            return None
        common = dict(dropout=float(self.dropout), rslora=bool(self.rslora), dora=bool(self.dora))
        if num_layers is None:
            return LoraSpec(r=int(match_pattern(self.rank_pattern, name, self.r)),
                            alpha=float(match_pattern(self.alpha_pattern, name, self.alpha)), **common)
        self.check_layers(num_layers)
        chosen = self.layers_to_transform
        ranks, alphas = [], []
        for i in range(num_layers):
            full = f"model.layers.{i}.{name}"
            on = chosen is None or i in chosen
            ranks.append(int(match_pattern(self.rank_pattern, full, self.r)) if on else 0)
            alphas.append(float(match_pattern(self.alpha_pattern, full, self.alpha)) if on else 0.0)
        if not any(ranks):
            return None
        if len(set(ranks)) == 1 and len(set(alphas)) == 1:  # uniform: the plain stacked adapter
            return LoraSpec(r=ranks[0], alpha=alphas[0], **common)
        top = ranks.index(max(ranks))
        if self.dora and 0 in ranks:
            raise LoraError(f"lora.dora=true with {name} adapted in some layers only (lora.layers_to_transform): "
                            "DoRA magnitudes would train in the other layers too; adapt every layer or drop DoRA")
        return LoraSpec(r=ranks[top], alpha=alphas[top], layer_ranks=tuple(ranks), layer_alphas=tuple(alphas),
                        **common)

    def check_layers(self, num_layers: int) -> None:
        """`LoraError` if ``layers_to_transform`` names a layer the model does not have."""
        bad = [i for i in self.layers_to_transform or () if i >= num_layers]
        if bad:
            raise LoraError(f"lora.layers_to_transform names layer(s) {bad}, but the model has {num_layers} layers "
                            f"(0..{num_layers - 1})")


def match_pattern(pattern: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """peft's rule (``get_pattern_key``): the first key K with ``re.match(rf"(.*\\.)?({K})$", name)`` decides."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def check_rank_fits(spec: LoraSpec | None, name: str, in_features: int, out_features: int, default_r: int) -> None:
    """`LoraError` if a rank that a rank pattern set (one that is not ``default_r``, the config's r) exceeds
    ``min(in, out)`` of the kernel it adapts: a rank the kernel cannot use, most likely a pattern meant for another
    module. (A uniform r above it stays allowed, as in peft; PiSSA / LoftQ check theirs.)"""
    if spec is None:
        return
    ranks = spec.layer_ranks if spec.per_layer else (spec.r,)
    for i, r in enumerate(ranks):
        if r != default_r and r > min(in_features, out_features):
            where = f"model.layers.{i}.{name}" if spec.per_layer else name
            raise LoraError(f"lora.rank_pattern: rank {r} does not fit {where}, a {out_features}x{in_features} "
                            f"kernel: its rank is at most {min(in_features, out_features)}")
