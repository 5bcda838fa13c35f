"""The scanned layer stack's shared pieces: remat policies for the layer body and per-token positions of packed
rows.

Layers are stacked (every layer variable has a leading axis L) and run by `jax.lax.scan` over one layer body wrapped
in `jax.checkpoint` with a named remat policy (`REMAT_POLICIES`), or unrolled.

With ``offload_residual`` the residual stream entering each layer (named `RESIDUAL` inside the body) is saved in
pinned host memory instead of on the device: under scan that is the [L, B, S, D] stack of layer inputs, the one
activation that grows with the depth, and the backward brings back one layer's slice at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqlora.lora import FROZEN_MATMUL

REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "offload")
RESIDUAL = "layer_residual"  # checkpoint name of the residual stream entering a scanned layer body


def _remat_policy(name: str, offload_residual: bool = False):
    """The `jax.checkpoint` policy of the layer body; with ``offload_residual`` (and a pinned host memory) the
    `RESIDUAL` input is offloaded to the host, everything else as ``name`` says."""
    base = _base_policy(name)
    if not offload_residual or not _has_pinned_host():
        return base
    residual = jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[RESIDUAL], offload_src="device",
        offload_dst="pinned_host")

    def policy(prim, *args, **params):
        if prim.name == "name" and params.get("name") == RESIDUAL:
            return residual(prim, *args, **params)
        return base(prim, *args, **params)

    return policy


def _base_policy(name: str):
    cp = jax.checkpoint_policies
    frozen = cp.save_only_these_names(FROZEN_MATMUL)  # the 4-bit matmuls: a dot inside a custom_vjp, named
    if name == "full":
        return cp.nothing_saveable
    if name == "save_dots":
        return cp.save_from_both_policies(cp.dots_saveable, frozen)
    if name == "save_dots_no_batch" or (name == "offload" and not _has_pinned_host()):
        # offload with nowhere to offload to keeps the dots on the device instead
        return cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable, frozen)
    if name == "offload":
        dots = cp.offload_dot_with_no_batch_dims("device", "pinned_host")
        names = cp.save_and_offload_only_these_names(names_which_can_be_saved=[], names_which_can_be_offloaded=[
            FROZEN_MATMUL], offload_src="device", offload_dst="pinned_host")

        def offload(prim, *args, **params):  # a checkpoint name decides by its name, every other op as a dot
            return (names if prim.name == "name" else dots)(prim, *args, **params)

        return offload
    raise ValueError(f"unknown remat policy {name!r}: expected one of {', '.join(REMAT_POLICIES)}")


def _has_pinned_host() -> bool:
    try:
        return any(m.kind == "pinned_host" for m in jax.devices()[0].addressable_memories())
    except Exception:  # noqa: BLE001 - a backend without memory spaces
        return False


def segment_positions(segment_ids_BS: jax.Array) -> jax.Array:
    """Positions restarting at 0 at the start of every run of equal segment ids."""
    S = segment_ids_BS.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), segment_ids_BS.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BS[..., :1], bool), segment_ids_BS[..., 1:] != segment_ids_BS[..., :-1]], axis=-1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=idx.ndim - 1)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap · tanh(x / cap)`` (Gemma 2's logit soft-capping), or ``x`` when ``cap`` is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap
