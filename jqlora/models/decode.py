"""KV-cache decoding for evaluation and for the command line (`python -m jqlora.generate`, in jqlora/generate.py).

A prefill runs the (left-padded) prompts through the model once and writes every layer's rotated keys and values
into a preallocated cache ``k, v [L, B, M, K, H]`` (compute dtype, M = bucketed prompt length + max_new_tokens,
rounded up to a power of two); then one jitted step per token embeds the last token, attends over the cache and
writes its own key/value at slot ``t``. Shapes never change during a generation, so the step compiles once per
(batch, cache length) bucket, not per token.

Slots and positions: row b of the prompt block is left-padded with ``pad[b]`` tokens, so slot s holds position
``s - pad[b]``. A query at slot s attends to slots ``pad[b] <= s' <= s`` and, on a sliding-window layer of width W,
only to ``s - s' < W`` (transformers' ``q_pos - k_pos < W``). RoPE cos/sin come from `rope.rope_tables` on the
new tokens' positions (one table per RoPE; Gemma 3's local layers have their own), so dynamic NTK scaling grows
with the sequence exactly as transformers' cached generation does (keys keep the frequencies they were rotated
with). Soft-capping (Gemma 2) applies to the cached attention and the final logits as in the full forward. The
layers' own submodules (projections with their LoRA adapters and quantized kernels, norms) do all the math; nothing
is copied out of the model.

Sampling follows transformers' warpers in their order: logits / temperature, keep the top k, keep the smallest set
of most likely tokens whose probability reaches top_p (nucleus sampling, Holtzman et al., "The Curious Case of
Neural Text Degeneration", 2020); temperature 0 is greedy (argmax).

Shape letters as in `jqlora.models.llama`, plus M cache slots and T new tokens in one call.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlora.models.attention import NO_WINDOW, attention
from jqlora.models.llama import LlamaForCausalLM, rope_tables, softcap

MIN_BUCKET = 16


def eos_token_ids(path: Any, tokenizer) -> list[int]:
    """The EOS ids generation stops at, as transformers' ``generate`` takes them: the ``eos_token_id`` (one or a
    list) of the model directory's generation_config.json, else the tokenizer's EOS (none for ``path=None``)."""
    ids: list[int] = []
    if path is not None:
        import transformers

        try:
            e = transformers.GenerationConfig.from_pretrained(str(path)).eos_token_id
            ids = [e] if isinstance(e, int) else list(e or [])
        except OSError:  # no generation_config.json
            ids = []
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return ids


def bucket(n: int) -> int:
    """The smallest power of two ≥ ``max(n, MIN_BUCKET)`` (lengths are rounded up so shapes repeat)."""
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return b


def init_cache(model: LlamaForCausalLM, batch: int, max_len: int) -> dict[str, jax.Array]:
    """Zeroed ``{"k", "v"}`` of shape ``[L, B, M, K, H]`` in the model's compute dtype."""
    cfg = model.config
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, model.dtype), "v": jnp.zeros(shape, model.dtype)}


# ----------------------------------------------------------------------------------------------------------------
# The cached forward pass


def _layer_step(layer, h_BTD, cos_BTH, sin_BTH, k_LBMKH, v_LBMKH, l, start, slot_T, live_BT, live_BS, window,
                implementation):
    """Decoder layer ``l`` over T new tokens: their keys and values written into the stacked cache at layer ``l``,
    slots ``[start, start + T)`` (an in-place update of the loop-carried buffer), then attention over its first S
    slots (S = ``live_BS``'s width: the whole cache, or up to the last new slot when ``start`` is static)."""
    attn = layer.self_attn
    N, H = attn.num_heads, attn.head_dim
    B, T, _ = h_BTD.shape
    q_BTNH, k_BTKH, v_BTKH = attn.qkv(layer.input_layernorm(h_BTD), cos_BTH, sin_BTH)
    zero = jnp.zeros((), jnp.int32)
    at = (l, zero, start, zero, zero)
    k_LBMKH = jax.lax.dynamic_update_slice(k_LBMKH, k_BTKH[None].astype(k_LBMKH.dtype), at)
    v_LBMKH = jax.lax.dynamic_update_slice(v_LBMKH, v_BTKH[None].astype(v_LBMKH.dtype), at)
    S = live_BS.shape[1]
    k_BSKH, v_BSKH = (c[l, :, :S].astype(q_BTNH.dtype) for c in (k_LBMKH, v_LBMKH))
    # left padding is segment 0 and real tokens segment 1: a padding query sees only padding (its output is unused)
    out_BTNH = attention(q_BTNH, k_BSKH, v_BSKH, scale=attn.scale, q_slots=slot_T,
                         kv_slots=jnp.arange(S, dtype=jnp.int32), q_segment_ids=live_BT,
                         kv_segment_ids=live_BS, window=window, implementation=implementation,
                         logit_softcap=attn.softcap)
    h_BTD = layer.add_attention(h_BTD, attn.o_proj(out_BTNH.reshape(B, T, N * H)))
    h_BTD = layer.add_mlp(h_BTD, deterministic=True, keys=None)
    return h_BTD, k_LBMKH, v_LBMKH


def forward_cached(model: LlamaForCausalLM, cache: dict[str, jax.Array], ids_BT: jax.Array, start: int | jax.Array,
                   pad_B: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """float32 logits ``[B, V]`` of the last of T tokens at slots ``[start, start + T)``, and the updated cache.

    ``pad_B`` is each row's number of left-padding slots (slots before it are ignored; positions start after it).
    The layer scan carries the whole stacked cache and writes only the T new slots of each layer into it, so the
    compiled program updates the cache in place (no second cache per call, nor per token step of a loop around it);
    the lm_head runs on the last position only (a prefill's other positions' logits are never needed). A Python int
    ``start`` (a prefill) attends over slots ``[0, start + T)`` only: the later ones are masked anyway (causal), and
    the scores of a prefill over the whole cache would be the rollout's largest temporary.
    """
    cfg = model.config
    T = ids_BT.shape[1]
    S = start + T if isinstance(start, int) else cache["k"].shape[2]  # the slots attended to
    start = jnp.asarray(start, jnp.int32)
    pad_B = jnp.asarray(pad_B, jnp.int32)
    slot_T = start + jnp.arange(T, dtype=jnp.int32)
    slot_S = jnp.arange(S, dtype=jnp.int32)
    pos_BT = jnp.maximum(slot_T[None, :] - pad_B[:, None], 0)
    cos_RBTH, sin_RBTH = rope_tables(cfg, pos_BT, model.dtype)
    live_BT = (slot_T[None, :] >= pad_B[:, None]).astype(jnp.int32)
    live_BS = (slot_S[None, :] >= pad_B[:, None]).astype(jnp.int32)
    windows = jnp.asarray([w if w is not None else NO_WINDOW for w in cfg.sliding_windows], jnp.int32)

    h_BTD = model.model.embed_tokens(jnp.asarray(ids_BT, jnp.int32))
    graphdef, state = nnx.split(model.model.layers)

    def body(carry, xs):
        h, k_LBMKH, v_LBMKH = carry
        layer_state, window, rope, l = xs
        layer = nnx.merge(graphdef, layer_state)
        # XLA attention: T new queries at cache offset ``start`` are not the aligned causal pattern cuDNN's kernel has
        rope = 0 if cos_RBTH.shape[0] == 1 else rope  # one RoPE: a static slice
        return _layer_step(layer, h, cos_RBTH[rope], sin_RBTH[rope], k_LBMKH, v_LBMKH, l, start, slot_T, live_BT,
                           live_BS, window, "xla"), None

    ropes = jnp.asarray(cfg.layer_ropes, jnp.int32)
    layer_L = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
    (h_BTD, k, v), _ = jax.lax.scan(body, (h_BTD, cache["k"], cache["v"]), (state, windows, ropes, layer_L))
    h_BD = model.model.norm(h_BTD[:, -1])
    logits_BV = jax.lax.dot_general(h_BD, model.lm_head_weight(), (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
    return softcap(logits_BV, cfg.final_softcap), {"k": k, "v": v}


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def sample(logits_BV: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
           top_k: jax.Array) -> jax.Array:
    """Next tokens ``[B]`` (int32): argmax when ``temperature <= 0``; ``top_k <= 0`` / ``top_p >= 1`` disable them."""
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    allowed_BV = allowed_tokens(scaled_BV, top_p, top_k)
    masked_BV = jnp.where(allowed_BV, scaled_BV, -jnp.inf)
    sampled_B = jax.random.categorical(key, masked_BV, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled_B, greedy_B)


def allowed_tokens(scaled_BV: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """bool ``[B, V]``: the top-k tokens, then the nucleus of probability ``top_p`` among them (always ≥ 1 token)."""
    V = scaled_BV.shape[-1]
    order_BV = jnp.argsort(-scaled_BV, axis=-1, stable=True)
    sorted_BV = jnp.take_along_axis(scaled_BV, order_BV, axis=-1)
    rank_V = jnp.arange(V, dtype=jnp.int32)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    keep_sorted_BV = rank_V[None, :] < k
    probs_BV = jax.nn.softmax(jnp.where(keep_sorted_BV, sorted_BV, -jnp.inf), axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # probability of the strictly more likely tokens
    keep_sorted_BV = keep_sorted_BV & ((before_BV < top_p) | (rank_V[None, :] == 0))
    allowed_BV = jnp.zeros_like(keep_sorted_BV)
    return jax.vmap(lambda a, o, k: a.at[o].set(k))(allowed_BV, order_BV, keep_sorted_BV)


# ----------------------------------------------------------------------------------------------------------------
# Jitted prefill and step (graphdef static; every other argument traced, so only shapes recompile)


class _Static:
    """A static jit argument hashed once (a GraphDef may hold unhashable config, e.g. LoRA rank patterns)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: Any):
        self.value = value
        self._hash = hash(repr(value))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, _Static) and self._hash == other._hash and self.value == other.value)


def _decode(graphdef, state, cache, ids_BT, start, pad_B, key, temperature, top_p, top_k):
    model = nnx.merge(graphdef.value, state)
    logits_BV, cache = forward_cached(model, cache, ids_BT, start, pad_B)
    token_B = sample(logits_BV, jax.random.fold_in(key, start + ids_BT.shape[1]), temperature, top_p, top_k)
    return token_B, logits_BV, cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _prefill(graphdef, state, cache, ids_BP, pad_B, key, temperature, top_p, top_k):
    """The prompt block ``[B, P]`` at slots ``[0, P)``: compiles once per (B, P, M)."""
    return _decode(graphdef, state, cache, ids_BP, 0, pad_B, key, temperature, top_p, top_k)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _step(graphdef, state, cache, ids_B1, start, pad_B, key, temperature, top_p, top_k):
    """One token per row at slot ``start``: compiles once per (B, M), never per token."""
    return _decode(graphdef, state, cache, ids_B1, start, pad_B, key, temperature, top_p, top_k)


def compile_counts() -> dict[str, int]:
    """How many programs the prefill and step functions have compiled so far (for recompilation checks)."""
    return {"prefill": _prefill._cache_size(), "step": _step._cache_size()}


# ----------------------------------------------------------------------------------------------------------------
# Generation


def _as_prompts(prompt_ids: Any) -> tuple[list[list[int]], bool]:
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        arr = np.asarray(prompt_ids)
        if arr.ndim == 1:
            return [arr.tolist()], True
        if arr.ndim == 2:
            return arr.tolist(), False
        raise ValueError(f"prompt_ids must be 1-D or 2-D, got shape {arr.shape}")
    prompts = list(prompt_ids)
    if prompts and all(isinstance(p, (int, np.integer)) for p in prompts):
        return [[int(p) for p in prompts]], True
    return [[int(t) for t in p] for p in prompts], False


def _eos_set(eos_token_id: int | Sequence[int] | None) -> np.ndarray:
    if eos_token_id is None:
        return np.zeros((0,), np.int32)
    if isinstance(eos_token_id, (int, np.integer)):
        return np.asarray([eos_token_id], np.int32)
    return np.asarray(list(eos_token_id), np.int32)


def generate_stream(
    model: LlamaForCausalLM,
    prompt_ids: Any,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    return_logits: bool = False,
) -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """Yield the next token of every row (``int32 [B]``) as it is decoded; with ``return_logits`` also the float32
    logits ``[B, V]`` it was sampled from.

    ``prompt_ids`` is one prompt (a 1-D sequence) or several (2-D array or list of sequences of different lengths,
    left-padded here). A row that has emitted an EOS token yields ``pad_token_id`` (default: the first EOS id, or 0)
    from then on; the stream ends when every row has, or after ``max_new_tokens``.
    """
    prompts, _ = _as_prompts(prompt_ids)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    V = model.config.vocab_size
    flat = [t for p in prompts for t in p]
    if min(flat) < 0 or max(flat) >= V:
        raise ValueError(f"prompt token ids must be in [0, {V}), got {min(flat)}..{max(flat)}")
    if max_new_tokens == 0:
        return
    eos = _eos_set(eos_token_id)
    pad_id = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.size else 0)

    B = len(prompts)
    P = bucket(max(len(p) for p in prompts))
    M = bucket(P + max_new_tokens)
    ids_BP = np.zeros((B, P), np.int32)
    pad_B = np.zeros((B,), np.int32)
    for b, p in enumerate(prompts):
        pad_B[b] = P - len(p)
        ids_BP[b, pad_B[b]:] = p
    graphdef, state = nnx.split(model)
    graphdef = _Static(graphdef)
    cache = init_cache(model, B, M)
    key = jax.random.key(seed)
    knobs = (jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k))
    pad_B = jnp.asarray(pad_B)

    token_B, logits_BV, cache = _prefill(graphdef, state, cache, jnp.asarray(ids_BP), pad_B, key, *knobs)
    rope = model.config.rope
    longest = max(len(p) for p in prompts)
    # LongRoPE switches from its short to its long factors once the sequence passes the pretrained length; the
    # cached keys were rotated with the short ones, so (as transformers' Phi-3 does) the cache is recomputed once,
    # at the first token past that length
    switch = rope.original_max_position_embeddings if rope.rope_type == "longrope" else None
    fed: list[np.ndarray] = []
    done_B = np.zeros((B,), bool)
    for i in range(max_new_tokens):
        tok = np.asarray(token_B).astype(np.int32)
        tok = np.where(done_B, pad_id, tok)
        done_B |= np.isin(tok, eos)
        yield (tok, np.asarray(logits_BV)) if return_logits else tok
        if done_B.all() or i == max_new_tokens - 1:
            return
        fed.append(tok)
        if switch is not None and longest + i == switch:  # the new token is the first past the pretrained length
            ids_all = np.concatenate([ids_BP, np.stack(fed, axis=1)], axis=1)
            token_B, logits_BV, cache = _prefill(graphdef, state, init_cache(model, B, M), jnp.asarray(ids_all),
                                                 pad_B, key, *knobs)
            continue
        token_B, logits_BV, cache = _step(graphdef, state, cache, jnp.asarray(tok)[:, None], jnp.int32(P + i),
                                          pad_B, key, *knobs)


def generate(model: LlamaForCausalLM, prompt_ids: Any, **kw: Any) -> np.ndarray:
    """The generated tokens (prompt excluded): ``int32 [n]`` for one 1-D prompt, ``[B, n]`` for several.

    Keyword arguments as `generate_stream` (max_new_tokens, temperature, top_p, top_k, eos_token_id, pad_token_id,
    seed); n ≤ max_new_tokens (fewer when every row stopped at EOS).
    """
    _, single = _as_prompts(prompt_ids)
    kw.pop("return_logits", None)
    steps = list(generate_stream(model, prompt_ids, **kw))
    n_rows = len(_as_prompts(prompt_ids)[0])
    out = np.stack(steps, axis=1) if steps else np.zeros((n_rows, 0), np.int32)
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------------------------
# Command line
