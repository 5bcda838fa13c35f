"""A model cut into its trainable LoRA parameters (a plain nested dict, what the optimizer and checkpoints hold)
and everything else (frozen: the quantized base, norms, embeddings), with the way back (`nnx.split` / `nnx.merge`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx


class NoLoraError(ValueError):
    """The model has no LoRA parameters to train."""


@dataclasses.dataclass
class SplitModel:
    """A model cut into graphdef + LoRA params (pure dict) + frozen state, with the way back."""

    graphdef: Any
    lora: dict
    frozen: Any
    treedef: Any  # of the LoRA nnx.State, whose leaves are in the pure dict's leaf order

    @classmethod
    def of(cls, model: nnx.Module) -> SplitModel:
        graphdef, lora_state, frozen = nnx.split(model, nnx.LoRAParam, ...)
        pure = lora_state.to_pure_dict()
        state_paths = [tuple(getattr(k, "key", getattr(k, "name", k)) for k in p[:-1])
                       for p, _ in jax.tree_util.tree_leaves_with_path(lora_state)]
        pure_paths = [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(pure)]
        assert state_paths == pure_paths, "LoRA state and its pure dict flatten in different orders"
        if not pure_paths:
            raise NoLoraError("the model has no LoRA parameters to train (check lora.targets)")
        return cls(graphdef, pure, frozen, jax.tree.structure(lora_state))

    def to_state(self, lora: dict):
        return jax.tree.unflatten(self.treedef, jax.tree.leaves(lora))

    def model(self, lora: dict | None = None) -> nnx.Module:
        return nnx.merge(self.graphdef, self.to_state(self.lora if lora is None else lora), self.frozen)
