"""Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3) in Flax NNX, matching Hugging Face transformers.

Per layer (pre-norm; Touvron et al., "LLaMA", 2023):

    h  = x + o_proj(attn(rope(q_norm(q_proj(n))), rope(k_norm(k_proj(n))), v_proj(n))),   n = RMSNorm(x)
    y  = h + down_proj(silu(gate_proj(m)) * up_proj(m)),                                   m = RMSNorm(h)

Attention is softmax(q kᵀ / √head_dim) v with grouped KV heads (GQA/MQA), causal, restricted to tokens of the same
segment (packed documents never see each other; segment 0 is padding) and, for sliding-window layers, to the last
W tokens. Qwen3 normalizes q and k per head (q_norm / k_norm); Qwen2 has q/k/v biases. RoPE variants are in
`rope.py`, norms / embeddings / MLP in `layers.py`, the remat policies in `stack.py`, checkpoint loading in `hf.py`.

This module holds the family's config mapping (`config_from_dict`), its Hugging Face key table (`key_table`),
and the decoder every family shares (`LlamaForCausalLM`: what other families do differently is a `ModelConfig`
field, e.g. Gemma's sandwich norms). Module and variable names are the Hugging Face ones
(`model.layers.self_attn.q_proj`, ...), so checkpoint conversion and peft export never rename.

Shape letters: B batch, S sequence (T queries), D hidden, N query heads, K key/value heads, H head dim,
F MLP hidden, V vocabulary, L layers, R RoPE tables.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jqlora.lora import LoraConfig, LoraLinear, QuantSpec, compute_dtype
from jqlora.models.config import ModelConfig, RopeConfig, positive_ints, rope_from_dict
from jqlora.models.hf import (  # noqa: F401 - re-exported: the loading API
    HFKey,
    TensorGetter,
    _check_filled,
    checkpoint_pieces,
    from_hf_tensors,
    hf_key_table,
    layer_table,
)
from jqlora.models.layers import MLP, Embed, LMHead, RMSNorm, rms_norm
from jqlora.models.layers import linear as _linear
from jqlora.models.rope import _apply_rope, rope_cos_sin, rope_frequencies, rope_tables  # noqa: F401 - re-exported
from jqlora.models.stack import NO_WINDOW as _NO_WINDOW
from jqlora.models.stack import REMAT_POLICIES, _remat_policy, segment_positions, softcap  # noqa: F401

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# ----------------------------------------------------------------------------------------------------------------
# Config


def config_from_dict(d: dict[str, Any], where: str) -> ModelConfig:
    """The Llama family's ``config.json`` (``d``, read from ``where``) as a `ModelConfig`."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{where}: {what}")

    model_type = d.get("model_type")
    assert model_type in MODEL_TYPES, model_type
    act = d.get("hidden_act", d.get("hidden_activation", "silu"))
    if act != "silu":
        raise bad(f"unsupported hidden_act {act!r}: only 'silu' is implemented")
    if d.get("mlp_bias"):
        raise bad("unsupported mlp_bias=true: only bias-free MLPs are implemented")
    prf = d.get("partial_rotary_factor", (d.get("rope_parameters") or d.get("rope_scaling") or {}).get(
        "partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise bad(f"unsupported partial_rotary_factor {prf!r}: only full rotary embeddings are implemented")
    positive_ints(d, bad, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    n_layers = d["num_hidden_layers"]
    heads = d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    max_pos = int(d.get("max_position_embeddings") or {"llama": 2048, "mistral": 131072}.get(model_type, 32768))

    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    elif model_type == "mistral":
        qkv_bias = o_bias = False
    else:  # llama, qwen3: one flag for all four projections
        qkv_bias = o_bias = bool(d.get("attention_bias", False))

    # Sliding windows: Mistral applies its window on every layer; Qwen2/3 only with use_sliding_window, on the layers
    # `layer_types` marks (by default those from max_window_layers on).
    windows: list[int | None] = [None] * n_layers
    if model_type == "mistral":
        if d.get("sliding_window"):
            windows = [int(d["sliding_window"])] * n_layers
    elif model_type in ("qwen2", "qwen3"):
        if d.get("use_sliding_window") and d.get("sliding_window"):
            layer_types = d.get("layer_types") or [
                "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
                for i in range(n_layers)
            ]
            if len(layer_types) != n_layers:
                raise bad(f"layer_types has {len(layer_types)} entries for {n_layers} layers")
            for i, t in enumerate(layer_types):
                if t not in ("sliding_attention", "full_attention"):
                    raise bad(f"unsupported layer_types[{i}] {t!r}")
            windows = [int(d["sliding_window"]) if t == "sliding_attention" else None for t in layer_types]
    elif d.get("layer_types") and any(t != "full_attention" for t in d["layer_types"]):
        raise bad(f"unsupported layer_types {sorted(set(d['layer_types']))} for model_type {model_type!r}")

    return ModelConfig(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=model_type == "qwen3",
        sliding_windows=tuple(windows),
        max_position_embeddings=max_pos,
        rope=_rope(d, max_pos, bad),
    )




def _rope(d: dict[str, Any], max_pos: int, bad: Callable[[str], ValueError]) -> RopeConfig:
    """Both spellings: transformers 5 ``rope_parameters`` and the older ``rope_scaling`` + top-level ``rope_theta``."""
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise bad("unsupported per-layer-type rope_parameters")
    return rope_from_dict(params, d, max_pos, bad)


# ----------------------------------------------------------------------------------------------------------------
# Modules


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array, scale: float,
           cap: float | None = None) -> jax.Array:
    """softmax(mask(softcap(scale · q kᵀ))) v over grouped KV heads; ``cap`` None is plain attention."""
    if cap is None:
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], scale=scale)
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    logits_BKGTS = softcap(logits_BKGTS, cap)  # before the mask, as transformers does
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH).reshape(B, T, N, H)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, quant: QuantSpec, dtype: Any, lora_dtype: Any,
                 rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(quant=quant, dtype=dtype, lora_dtype=lora_dtype, rngs=rngs)
        self.q_proj = _linear(lora, "self_attn.q_proj", D, N * H, bias=cfg.qkv_bias, **kw)
        self.k_proj = _linear(lora, "self_attn.k_proj", D, K * H, bias=cfg.qkv_bias, **kw)
        self.v_proj = _linear(lora, "self_attn.v_proj", D, K * H, bias=cfg.qkv_bias, **kw)
        self.o_proj = _linear(lora, "self_attn.o_proj", N * H, D, bias=cfg.o_bias, **kw)
        self.q_norm = rms_norm(cfg, H, dtype) if cfg.qk_norm else None
        self.k_norm = rms_norm(cfg, H, dtype) if cfg.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else H**-0.5
        self.softcap = cfg.attn_softcap

    def __call__(self, x_BSD, cos_BSH, sin_BSH, mask_BTS, *, deterministic: bool, keys) -> jax.Array:
        B, S, _ = x_BSD.shape
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
        kw = lambda i: dict(deterministic=deterministic, key=None if keys is None else keys[i])  # noqa: E731
        q_BSNH = self.q_proj(x_BSD, **kw(0)).reshape(B, S, N, H)
        k_BSKH = self.k_proj(x_BSD, **kw(1)).reshape(B, S, K, H)
        v_BSKH = self.v_proj(x_BSD, **kw(2)).reshape(B, S, K, H)
        if self.q_norm is not None:
            q_BSNH, k_BSKH = self.q_norm(q_BSNH), self.k_norm(k_BSKH)
        q_BSNH = _apply_rope(q_BSNH, cos_BSH, sin_BSH)
        k_BSKH = _apply_rope(k_BSKH, cos_BSH, sin_BSH)
        out_BSNH = attend(q_BSNH, k_BSKH, v_BSKH, mask_BTS, self.scale, self.softcap)
        return self.o_proj(out_BSNH.reshape(B, S, N * H), **kw(3))


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks; with ``sandwich_norms`` (Gemma 2/3) the attention and MLP outputs are
    normalized too: h = x + post_attention_layernorm(attn(...)), y = h + post_feedforward_layernorm(mlp(
    pre_feedforward_layernorm(h)))."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, quant: QuantSpec, dtype: Any, lora_dtype: Any,
                 rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.self_attn = Attention(cfg, lora, quant, dtype, lora_dtype, rngs)
        self.mlp = MLP(cfg, lora, quant, dtype, lora_dtype, rngs)
        self.input_layernorm = rms_norm(cfg, D, dtype)
        self.post_attention_layernorm = rms_norm(cfg, D, dtype)
        self.pre_feedforward_layernorm = rms_norm(cfg, D, dtype) if cfg.sandwich_norms else None
        self.post_feedforward_layernorm = rms_norm(cfg, D, dtype) if cfg.sandwich_norms else None

    def add_attention(self, x_BSD: jax.Array, attn_BSD: jax.Array) -> jax.Array:
        """The residual stream after the attention block whose output is ``attn_BSD``."""
        if self.pre_feedforward_layernorm is not None:
            return x_BSD + self.post_attention_layernorm(attn_BSD)
        return x_BSD + attn_BSD

    def add_mlp(self, h_BSD: jax.Array, *, deterministic: bool, keys) -> jax.Array:
        """The residual stream after the MLP block."""
        if self.pre_feedforward_layernorm is not None:
            mlp = self.mlp(self.pre_feedforward_layernorm(h_BSD), deterministic=deterministic, keys=keys)
            return h_BSD + self.post_feedforward_layernorm(mlp)
        return h_BSD + self.mlp(self.post_attention_layernorm(h_BSD), deterministic=deterministic, keys=keys)

    def __call__(self, x_BSD, cos_BSH, sin_BSH, mask_BTS, *, deterministic: bool, key) -> jax.Array:
        keys = None if key is None else jax.random.split(key, 7)
        attn = self.self_attn(self.input_layernorm(x_BSD), cos_BSH, sin_BSH, mask_BTS, deterministic=deterministic,
                              keys=None if keys is None else keys[:4])
        h_BSD = self.add_attention(x_BSD, attn)
        return self.add_mlp(h_BSD, deterministic=deterministic, keys=None if keys is None else keys[4:])


class LlamaModel(nnx.Module):
    """``embed_tokens``, stacked ``layers`` (leading axis L on every variable), final ``norm``."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, quant: QuantSpec, dtype: Any, lora_dtype: Any,
                 rngs: nnx.Rngs):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype, rngs, scale=cfg.embed_scale)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(r: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, lora, quant, dtype, lora_dtype, r)

        self.layers = make_layers(rngs)
        self.norm = rms_norm(cfg, cfg.hidden_size, dtype)


class LlamaForCausalLM(nnx.Module):
    """Causal LM: ``model`` (embed_tokens, layers, norm) and ``lm_head`` (None with tied embeddings).

    ``remat`` (one of `REMAT_POLICIES`) and ``scan_layers`` are plain attributes that may be changed between calls.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        lora: LoraConfig | None = None,
        quant: QuantSpec | None = None,
        dtype: Any = "bfloat16",
        *,
        rngs: nnx.Rngs,
        lora_dtype: Any = "float32",
        remat: str = "full",
        scan_layers: bool = True,
    ):
        quant = quant if quant is not None else QuantSpec()
        dtype = compute_dtype(dtype)
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
        self.config = cfg
        self.lora_config = lora
        self.quant_spec = quant
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = scan_layers
        self.model = LlamaModel(cfg, lora, quant, dtype, jnp.dtype(lora_dtype), rngs)
        self.lm_head = None if cfg.tie_word_embeddings else LMHead(cfg.vocab_size, cfg.hidden_size, dtype, rngs)

    def lm_head_weight(self) -> jax.Array:
        """``[V, D]`` in the compute dtype (the embedding matrix when tied)."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return head.weight[...]

    def hidden_states(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states ``[B, S, D]`` in the compute dtype."""
        cfg = self.config
        ids_BS = jnp.asarray(input_ids, jnp.int32)
        B, S = ids_BS.shape
        if positions is None:
            positions = (segment_positions(jnp.asarray(segment_ids)) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)))
        pos_BS = jnp.asarray(positions, jnp.int32)
        cos_RBSH, sin_RBSH = rope_tables(cfg, pos_BS, self.dtype)
        t = jnp.arange(S, dtype=jnp.int32)
        mask_BTS = jnp.broadcast_to(t[:, None] >= t[None, :], (B, S, S))
        if segment_ids is not None:
            seg_BS = jnp.asarray(segment_ids)
            mask_BTS = mask_BTS & (seg_BS[:, :, None] == seg_BS[:, None, :])
        windows = [w if w is not None else _NO_WINDOW for w in cfg.sliding_windows]
        windowed = any(w < S for w in windows)
        distance_TS = t[:, None] - t[None, :]

        h_BSD = self.model.embed_tokens(ids_BS)
        graphdef, state = nnx.split(self.model.layers)
        use_dropout = not deterministic and self.lora_config is not None and self.lora_config.dropout > 0
        if use_dropout and key is None:
            raise ValueError("LoRA dropout needs a PRNG key (key=...) when deterministic=False")
        keys = jax.random.split(key, cfg.num_hidden_layers) if use_dropout else None

        def body(h, xs):
            layer_state, window, rope, layer_key = xs
            layer = nnx.merge(graphdef, layer_state)
            mask = mask_BTS & (distance_TS < window) if windowed else mask_BTS
            return layer(h, cos_RBSH[rope], sin_RBSH[rope], mask, deterministic=not use_dropout, key=layer_key), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_remat_policy(self.remat), prevent_cse=not self.scan_layers)
        xs = (state, jnp.asarray(windows, jnp.int32), jnp.asarray(cfg.layer_ropes, jnp.int32), keys)
        if self.scan_layers:
            h_BSD, _ = jax.lax.scan(body, h_BSD, xs)
        else:
            for i in range(cfg.num_hidden_layers):
                h_BSD, _ = body(h_BSD, jax.tree_util.tree_map(lambda x, i=i: x[i], xs))
        return self.model.norm(h_BSD)

    def __call__(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """float32 logits ``[B, S, V]``; ``segment_ids`` (0 = padding) keep packed documents apart."""
        h_BSD = self.hidden_states(input_ids, segment_ids, positions, deterministic=deterministic, key=key)
        w_VD = self.lm_head_weight()
        logits = jax.lax.dot_general(h_BSD, w_VD, (((2,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return softcap(logits, self.config.final_softcap)

    def init_lora(self, key: jax.Array) -> None:
        """(Re)initialize every adapter as peft does (A uniform, B zero); deterministic in ``key``."""
        for i, (_, module) in enumerate(sorted(nnx.iter_modules(self), key=lambda pm: tuple(map(str, pm[0])))):
            if isinstance(module, LoraLinear):
                module.reset_lora(jax.random.fold_in(key, i))


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face keys


def key_table(cfg: ModelConfig) -> list[HFKey]:
    """Every tensor a Llama-family checkpoint of ``cfg`` must provide, in checkpoint order."""
    return layer_table(cfg, attention_keys(cfg) + mlp_keys(cfg, "post_attention_layernorm.weight"))


def attention_keys(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(suffix, HF shape, kind) of the input norm and the attention block of one layer."""
    D = cfg.hidden_size
    NH, KH, H = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.head_dim
    per_layer: list[tuple[str, tuple[int, ...], str]] = [
        ("input_layernorm.weight", (D,), "norm"),
        ("self_attn.q_proj.weight", (NH, D), "linear"),
        ("self_attn.k_proj.weight", (KH, D), "linear"),
        ("self_attn.v_proj.weight", (KH, D), "linear"),
        ("self_attn.o_proj.weight", (D, NH), "linear"),
    ]
    if cfg.qkv_bias:
        per_layer += [("self_attn.q_proj.bias", (NH,), "bias"), ("self_attn.k_proj.bias", (KH,), "bias"),
                      ("self_attn.v_proj.bias", (KH,), "bias")]
    if cfg.o_bias:
        per_layer.append(("self_attn.o_proj.bias", (D,), "bias"))
    if cfg.qk_norm:
        per_layer += [("self_attn.q_norm.weight", (H,), "norm"), ("self_attn.k_norm.weight", (H,), "norm")]
    return per_layer


def mlp_keys(cfg: ModelConfig, *norms: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(suffix, HF shape, kind) of the ``norms`` (D each) and the gated MLP of one layer."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    return [(norm, (D,), "norm") for norm in norms] + [
        ("mlp.gate_proj.weight", (F, D), "linear"),
        ("mlp.up_proj.weight", (F, D), "linear"),
        ("mlp.down_proj.weight", (D, F), "linear"),
    ]
