"""Sequence (context) parallelism: every row's tokens split over the mesh's ``seq`` axis, so n devices hold n× the
context (Jacobs et al., "DeepSpeed Ulysses", 2023).

Everything in a layer but attention acts on each token alone (norms, the MLP, the LoRA linears, RoPE at the token's
own global position from the batch's ``positions``), so it runs on the device's S/n tokens as it is. Attention
needs every key of the row: around it, one all-to-all over the seq axis swaps the sequence split for a head split,

    q [B, S/n, N, H] ──all-to-all──▶ [B, S, N/n, H]    (k, v likewise over the K KV heads)
    attention over the whole row for N/n heads, per device, with the usual kernel (cuDNN flash or XLA)
    out [B, S, N/n, H] ──all-to-all──▶ [B, S/n, N, H]

so the attention itself is the single-device one, exact: causality, packed segments (the row's segment ids are
whole on every device) and sliding windows need nothing new. Why not ring attention: it splits the softmax over
key blocks and combines partial statistics, which the cuDNN kernel's packed-segment layout does not expose, and
with a causal mask its devices idle unevenly; Ulysses moves 4 activations per layer (q, k, v, out: O(S·N·H / n)
bytes a device) and keeps the kernel as it is. Its bound: n must divide the query heads, and the KV heads a device
holds must split over n or be repeated up to n (Llama-3: 8 KV heads, seq up to 8 without repeats).

The cross-entropy runs on the device's own tokens too (`token_sum`: a chunked loss per shard, summed over the
mesh), so the [B·S, D] hidden states are never gathered; the loss stays the sum over every trained token of the
global batch, normalized by the global count as before.

Axis names are the mesh's (`jqlora.parallel.mesh.AXES`; models/ does not import parallel/): rows over ("data",
"fsdp"), tokens over "seq", heads over "tensor". Shape letters as in attention.py; b = B / (data · fsdp) rows a device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jqlora.models.attention import attention

ROWS = ("data", "fsdp")
SEQ = "seq"
HEADS = "tensor"


def seq_size(mesh: Any) -> int:
    return int(dict(mesh.shape).get(SEQ, 1)) if mesh is not None else 1


def _axes(mesh, names):
    present = tuple(a for a in names if a in mesh.shape)
    return present if len(present) != 1 else present[0]


def _rows(mesh):
    return _axes(mesh, ROWS)


def _heads(mesh):
    return HEADS if HEADS in mesh.shape and mesh.shape[HEADS] > 1 else None


def constrain_tokens(mesh, x: jax.Array) -> jax.Array:
    """``x`` [B, S, ...] placed rows over data × fsdp and tokens over seq (the layout of the whole stack)."""
    spec = P(_rows(mesh), SEQ, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def splits(mesh, B: int, S: int) -> bool:
    """Whether ``B`` rows of ``S`` tokens split over the mesh (rows over data × fsdp, tokens over seq > 1); rows that
    do not (an evaluation harness's odd batch) run unsplit, placed by the compiler as without the seq axis."""
    n = seq_size(mesh)
    rows = int(np.prod([mesh.shape[a] for a in ROWS if a in mesh.shape])) if n > 1 else 1
    return n > 1 and S % n == 0 and B % rows == 0


def check_tokens(mesh, S: int) -> None:
    n = seq_size(mesh)
    if S % n:
        raise ValueError(f"a row of {S} tokens does not split over mesh.seq={n} (data.max_length must divide by it)")


def ulysses_attention(mesh, q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, scale: float,
                      segment_ids: jax.Array | None = None, window: int | jax.Array | None = None,
                      implementation: str = "xla", logit_softcap: float | None = None) -> jax.Array:
    """`attention.attention` (aligned causal queries and keys, the training case) with the tokens split over the
    mesh's seq axis: all-to-all to a head split, the single-device attention per device, all-to-all back."""
    n = seq_size(mesh)
    t = mesh.shape[HEADS] if _heads(mesh) else 1
    N, K = q_BTNH.shape[2], k_BSKH.shape[2]
    if N % (n * t) or K % t or ((K // t) % n and n % (K // t)):
        raise ValueError(f"mesh.seq={n} cannot split num_attention_heads={N} / num_key_value_heads={K} "
                         f"(tensor={t})")
    check_tokens(mesh, q_BTNH.shape[1])
    repeat = n // (K // t) if (K // t) % n else 1  # KV heads per device fewer than n: each repeated to n
    rows, heads = _rows(mesh), _heads(mesh)
    qkv_spec = P(rows, SEQ, heads, None)
    seg_spec = P(rows, None)  # the whole row's segment ids on every device (int32: B·S·4 bytes)
    traced_window = window is not None and not isinstance(window, int)

    def local(q, k, v, seg, win):
        if repeat > 1:
            k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
        # [b, S/n, h, H] → [b, S, h/n, H]: head chunk j to device j, sequence blocks concatenated in device order
        to_heads = lambda x: jax.lax.all_to_all(x, SEQ, split_axis=2, concat_axis=1, tiled=True)  # noqa: E731
        out = attention(to_heads(q), to_heads(k), to_heads(v), scale=scale, q_segment_ids=seg, kv_segment_ids=seg,
                        window=win if traced_window else window, implementation=implementation,
                        logit_softcap=logit_softcap)
        return jax.lax.all_to_all(out, SEQ, split_axis=1, concat_axis=2, tiled=True)

    win = jnp.asarray(window, jnp.int32) if traced_window else jnp.zeros((), jnp.int32)
    seg = segment_ids if segment_ids is not None else jnp.zeros(q_BTNH.shape[:2], jnp.int32)
    fn = local if segment_ids is not None else (lambda q, k, v, _s, w: local(q, k, v, None, w))
    # check_vma=False: every axis of size > 1 is mapped in q/k/v and out (no replicated cotangents to sum), and the
    # kernels inside (cuDNN's custom call) need no varying-axes typing
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, P()),
                         out_specs=qkv_spec, check_vma=False)(q_BTNH, k_BSKH, v_BSKH, seg, win)


def token_sum(mesh, fn: Callable[..., jax.Array], h_BSD: jax.Array, replicated: jax.Array,
              *per_token_BS: jax.Array) -> jax.Array:
    """Σ over devices of ``fn(h, replicated, *per_token)`` on each device's own tokens: ``h_BSD`` and each
    ``per_token_BS`` split rows over data × fsdp and tokens over seq, ``replicated`` (the lm_head) whole; a sum
    over tokens (the chunked cross-entropy) is then the single-device sum, without gathering ``h``."""
    rows = _rows(mesh)
    split = tuple(a for a in ROWS + (SEQ,) if a in mesh.shape)

    def local(h, w, *xs):
        return jax.lax.psum(fn(h, w, *xs), split)

    in_specs = (P(rows, SEQ, None), P()) + tuple(P(rows, SEQ) for _ in per_token_BS)
    # check_vma=False: ``fn``'s own scans start from invariant carries; shard_map's transpose still psums the
    # replicated input's cotangent and divides the unmapped output's over its replicas (the tests check the grads)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(),
                         check_vma=False)(h_BSD, replicated, *per_token_BS)
