"""The decoder every family shares, in Flax NNX: attention block, decoder layer, the scanned layer stack and the
causal-LM head. What a family does differently is a `ModelConfig` field (see `config.py`); the family modules
(`llama.py`, `gemma.py`) only map their configs and own their Hugging Face key tables.

Per layer (pre-norm; Touvron et al., "LLaMA", 2023):

    h = x + o_proj(attn(rope(q_norm(q_proj(n))), rope(k_norm(k_proj(n))), v_proj(n))),   n = input_layernorm(x)
    y = h + down_proj(act(gate_proj(m)) * up_proj(m)),                          m = post_attention_layernorm(h)

and with ``sandwich_norms`` (Gemma 2/3) h = x + post_attention_layernorm(attn(...)), y = h +
post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))). Attention (`attention.py`) is softmax(s(q kᵀ · scale)
+ mask) v over grouped KV heads, scale = head_dim^-½ or the family's (Gemma: query_pre_attn_scalar^-½), s the
identity or soft-capping; causal, within a segment and, on sliding-window layers, within the last W tokens.

Layers are stacked (every layer variable has a leading axis L) and run by `jax.lax.scan` over one layer body wrapped
in `jax.checkpoint` with a named remat policy (`stack.REMAT_POLICIES`), or unrolled. What differs between layers is
scanned with them as stacked per-layer values: the window width (int32 [L]) and which RoPE table the layer uses
(int32 [L] into cos/sin [R, B, S, H]; see gemma.py for why one stack rather than two). Module and variable names are
the Hugging Face ones (`model.layers.self_attn.q_proj`, ...), so checkpoint conversion and peft export never rename.

Shape letters: B batch, S sequence, D hidden, N query heads, K key/value heads, H head dim, V vocabulary, L layers,
R RoPE tables.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jqlora.lora import Frozen, LoraConfig, LoraLinear, QuantData, QuantSpec, compute_dtype, set_layer_values
from jqlora.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from jqlora.models.attention import NO_WINDOW, attention
from jqlora.models.config import ModelConfig
from jqlora.models.layers import (HEAD_BLOCK_ROWS, MLP, NEFTUNE_KEY, Embed, LMHead, QuantHead, heads_spec, linear,
                                  neftune_noise, rms_norm)
from jqlora.models.rope import apply_rope, rope_tables
from jqlora.models.sequence import constrain_tokens, splits, ulysses_attention
from jqlora.models.stack import REMAT_POLICIES, RESIDUAL, _remat_policy, segment_positions, softcap


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, quant: QuantSpec, dtype: Any, lora_dtype: Any,
                 rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(quant=quant, dtype=dtype, lora_dtype=lora_dtype, rngs=rngs, num_layers=cfg.num_hidden_layers)
        if cfg.fused_qkv:  # Phi-3: one kernel, rows q | k | v
            self.qkv_proj = linear(lora, "self_attn.qkv_proj", D, (N + 2 * K) * H, bias=cfg.qkv_bias, **kw)
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            self.qkv_proj = None
            self.q_proj = linear(lora, "self_attn.q_proj", D, N * H, bias=cfg.qkv_bias, **kw)
            self.k_proj = linear(lora, "self_attn.k_proj", D, K * H, bias=cfg.qkv_bias, **kw)
            self.v_proj = linear(lora, "self_attn.v_proj", D, K * H, bias=cfg.qkv_bias, **kw)
        self.o_proj = linear(lora, "self_attn.o_proj", N * H, D, bias=cfg.o_bias, **kw)
        self.q_norm = rms_norm(cfg, H, dtype) if cfg.qk_norm else None
        self.k_norm = rms_norm(cfg, H, dtype) if cfg.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else H**-0.5
        self.softcap = cfg.attn_softcap

    def qkv(self, x_BSD, cos_BSR, sin_BSR, *, deterministic: bool = True, keys=None):
        """Rotated (and normed) queries ``[B, S, N, H]``, keys and values ``[B, S, K, H]``."""
        B, S, _ = x_BSD.shape
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
        kw = lambda i: dict(deterministic=deterministic, key=None if keys is None else keys[i])  # noqa: E731
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x_BSD, **kw(0))
            q_BSNH = qkv[..., :N * H].reshape(B, S, N, H)
            k_BSKH = qkv[..., N * H:(N + K) * H].reshape(B, S, K, H)
            v_BSKH = qkv[..., (N + K) * H:].reshape(B, S, K, H)
        else:
            q_BSNH = self.q_proj(x_BSD, **kw(0)).reshape(B, S, N, H)
            k_BSKH = self.k_proj(x_BSD, **kw(1)).reshape(B, S, K, H)
            v_BSKH = self.v_proj(x_BSD, **kw(2)).reshape(B, S, K, H)
        if self.q_norm is not None:
            q_BSNH, k_BSKH = self.q_norm(q_BSNH), self.k_norm(k_BSKH)
        return apply_rope(q_BSNH, cos_BSR, sin_BSR), apply_rope(k_BSKH, cos_BSR, sin_BSR), v_BSKH

    def __call__(self, x_BSD, cos_BSH, sin_BSH, segment_ids_BS, window, *, implementation: str,
                 deterministic: bool, keys, seq_mesh=None) -> jax.Array:
        B, S, _ = x_BSD.shape
        N, H = self.num_heads, self.head_dim
        kw = lambda i: dict(deterministic=deterministic, key=None if keys is None else keys[i])  # noqa: E731
        q_BSNH, k_BSKH, v_BSKH = self.qkv(x_BSD, cos_BSH, sin_BSH, deterministic=deterministic, keys=keys)
        if seq_mesh is not None:  # tokens split over the mesh's seq axis: Ulysses (sequence.py)
            out_BSNH = ulysses_attention(seq_mesh, q_BSNH, k_BSKH, v_BSKH, scale=self.scale,
                                         segment_ids=segment_ids_BS, window=window, implementation=implementation,
                                         logit_softcap=self.softcap)
        else:
            out_BSNH = attention(q_BSNH, k_BSKH, v_BSKH, scale=self.scale, q_segment_ids=segment_ids_BS,
                                 kv_segment_ids=segment_ids_BS, window=window, implementation=implementation,
                                 logit_softcap=self.softcap)
        return self.o_proj(out_BSNH.reshape(B, S, N * H), **kw(3))


MIN_TILE_BYTES = 16 << 20  # train.memory=min: bytes of a 4-bit kernel dequantized at once (Llama-3-8B's MLP: 7 tiles)


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks; with ``sandwich_norms`` (Gemma 2/3) the attention and MLP outputs are
    normalized too: h = x + post_attention_layernorm(attn(...)), y = h + post_feedforward_layernorm(mlp(
    pre_feedforward_layernorm(h)))."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, quant: QuantSpec, dtype: Any, lora_dtype: Any,
                 rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.self_attn = Attention(cfg, lora, quant, dtype, lora_dtype, rngs)
        if cfg.num_experts:  # Mixtral, Qwen3-MoE: a sparse MLP (moe.py)
            from jqlora.models.moe import MoE

            self.mlp = MoE(cfg, quant, dtype, lora_dtype, rngs, lora)
        else:
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

    def add_mlp(self, h_BSD: jax.Array, *, deterministic: bool, keys, stats_mask_T=None, mlp_chunk: int = 0):
        """The residual stream after the MLP block (and, given ``stats_mask_T``, the MoE's router statistics);
        ``mlp_chunk`` > 0: a dense MLP over chunks of that many tokens (`layers.MLP`)."""
        kw = {"deterministic": deterministic, "keys": keys}
        if stats_mask_T is not None:
            kw["stats_mask_T"] = stats_mask_T
        if mlp_chunk and isinstance(self.mlp, MLP):
            kw["chunk"] = mlp_chunk
        if self.pre_feedforward_layernorm is not None:
            out = self.mlp(self.pre_feedforward_layernorm(h_BSD), **kw)
        else:
            out = self.mlp(self.post_attention_layernorm(h_BSD), **kw)
        mlp, stats = out if stats_mask_T is not None else (out, None)
        if self.pre_feedforward_layernorm is not None:
            mlp = self.post_feedforward_layernorm(mlp)
        return h_BSD + mlp if stats_mask_T is None else (h_BSD + mlp, stats)

    def __call__(self, x_BSD, cos_BSH, sin_BSH, segment_ids_BS, window, *, implementation: str,
                 deterministic: bool, key, stats_mask_T=None, seq_mesh=None, mlp_chunk: int = 0):
        keys = None if key is None else jax.random.split(key, 7)
        attn = self.self_attn(self.input_layernorm(x_BSD), cos_BSH, sin_BSH, segment_ids_BS, window,
                              implementation=implementation, deterministic=deterministic,
                              keys=None if keys is None else keys[:4], seq_mesh=seq_mesh)
        h_BSD = self.add_attention(x_BSD, attn)
        return self.add_mlp(h_BSD, deterministic=deterministic, keys=None if keys is None else keys[4:],
                            stats_mask_T=stats_mask_T, mlp_chunk=mlp_chunk)


class DecoderModel(nnx.Module):
    """``embed_tokens``, stacked ``layers`` (leading axis L on every variable), final ``norm``."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, quant: QuantSpec, dtype: Any, lora_dtype: Any,
                 rngs: nnx.Rngs, head_quant: QuantSpec | None = None):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype, rngs, scale=cfg.embed_scale,
                                  lora=lora.for_module("embed_tokens") if lora is not None else None,
                                  lora_dtype=lora_dtype, quant=head_quant)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(r: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, lora, quant, dtype, lora_dtype, r)

        self.layers = make_layers(rngs)
        set_layer_values(self.layers)  # per-layer LoRA ranks / alphas: each layer's mask and scaling
        self.norm = rms_norm(cfg, cfg.hidden_size, dtype)


class CausalLM(nnx.Module):
    """Causal LM: ``model`` (embed_tokens, layers, norm) and ``lm_head`` (None with tied embeddings).

    ``remat`` (one of `REMAT_POLICIES`), ``scan_layers`` and ``attention`` (one of `ATTENTION_IMPLEMENTATIONS`:
    ``"auto"`` is cuDNN flash attention on a GPU backend, XLA elsewhere) are plain attributes that may be changed
    between calls; so is ``seq_mesh``: a mesh with a ``seq`` axis of size > 1 splits every row's tokens over it
    (sequence parallelism, `sequence.py`), None (the default) leaves the placement to the inputs; so are
    ``mlp_chunk`` (tokens per chunk of the dense MLP, 0 = one pass; `layers.MLP`) and ``offload_residual`` (the
    residual stream entering each layer saved in pinned host memory; `stack.RESIDUAL`). ``memory`` is
    train.memory: ``min`` stores the embedding and lm_head tables 4-bit (`layers.QuantHead`; one table when tied)
    and dequantizes each 4-bit kernel `MIN_TILE_BYTES` at a time (`lora.tiled_quantized_matmul`).
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
        attention: str = "auto",
        memory: str = "default",
    ):
        quant = quant if quant is not None else QuantSpec()
        head_quant = heads_spec(memory, quant.quant, quant.block_size)
        dtype = compute_dtype(dtype)
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {attention!r}: expected one of "
                             f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
        self.config = cfg
        self.lora_config = lora
        self.quant_spec = quant
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = scan_layers
        self.attention = attention
        self.seq_mesh = None
        self.mlp_chunk = 0
        self.offload_residual = False
        self.memory = memory
        self.head_quant = head_quant
        self.head_block_rows = HEAD_BLOCK_ROWS  # (a plain attribute: vocabulary rows a quantized head reads at once)
        self.model = DecoderModel(cfg, lora, quant, dtype, jnp.dtype(lora_dtype), rngs, head_quant)
        # train.memory=min on a dense model: the layer scan leaves the 4-bit kernels stacked and each tiled matmul
        # reads its layer's tiles at layer_index (`hidden_states`), so no layer's codes are copied out first
        self.hoist_kernels = memory == "min" and quant.enabled and not cfg.num_experts
        if memory == "min":
            for _, module in nnx.iter_modules(self.model.layers):
                if isinstance(module, LoraLinear):
                    module.tile_bytes = MIN_TILE_BYTES
                    if self.hoist_kernels:
                        module.layer_index = Frozen(jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32))
        head_lora = lora.for_module("lm_head") if lora is not None else None
        if head_lora is not None and cfg.tie_word_embeddings:
            raise ValueError("lora.targets: lm_head cannot be adapted in a model with tied embeddings "
                             "(tie_word_embeddings=true); adapt embed_tokens, or leave lm_head out")
        self.lm_head = None if cfg.tie_word_embeddings else LMHead(cfg.vocab_size, cfg.hidden_size, dtype, rngs,
                                                                   lora=head_lora, lora_dtype=lora_dtype,
                                                                   quant=head_quant)

    def lm_head_weight(self) -> jax.Array:
        """``[V, D]`` in the compute dtype (the embedding matrix when tied; dequantized whole when quantized)."""
        if self.lm_head is None:
            return self.model.embed_tokens.table()
        return self.lm_head.head_weight()

    def set_layer_indices(self) -> None:
        """Fill every tiled kernel's ``layer_index`` (0 … L-1; after an abstract build and loading)."""
        for _, module in nnx.iter_modules(self.model.layers):
            if isinstance(module, LoraLinear) and module.layer_index is not None:
                module.layer_index.set_value(jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32))

    def ce_head(self) -> jax.Array | QuantHead:
        """The head as the chunked cross-entropy reads it: `lm_head_weight`, or with quantized tables a `QuantHead`
        read a block of vocabulary rows at a time."""
        if self.lm_head is not None:
            return self.lm_head.ce_head(self.head_block_rows)
        t = self.model.embed_tokens.quantized()
        return self.lm_head_weight() if t is None else QuantHead(t, self.dtype, block_rows=self.head_block_rows)

    def hidden_states(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
        key: jax.Array | None = None,
        router_stats_mask: jax.Array | None = None,
        embed_noise: float = 0.0,
    ):
        """Final-norm hidden states ``[B, S, D]`` in the compute dtype.

        ``embed_noise`` = alpha > 0 with ``deterministic=False``: NEFTune's noise on the embedding outputs
        (`layers.neftune_noise`, keyed by ``fold_in(key, NEFTUNE_KEY)``; the dropout keys are those without it).

        With ``router_stats_mask`` ([B, S], 1 = a real token; MoE models only) it returns (hidden states, the
        per-layer router statistics float32 [L, 2, E] of `moe.router_stats`) for the load-balancing loss. They
        leave the scanned stack as the scan's per-layer output: 2·E floats a layer, the cheapest form (the router
        logits themselves would be [L, B·S, E]; the loss is a product of two sums over layers and tokens, so
        those sums are all it needs), and remat recomputes nothing extra for them."""
        cfg = self.config
        want_stats = router_stats_mask is not None
        if want_stats and not cfg.num_experts:
            raise ValueError("router statistics need a model with experts (num_experts = 0: a dense MLP)")
        stats_mask_T = (jnp.asarray(router_stats_mask, jnp.float32).reshape(-1) if want_stats else None)
        ids_BS = jnp.asarray(input_ids, jnp.int32)
        B, S = ids_BS.shape
        if positions is None:
            positions = (segment_positions(jnp.asarray(segment_ids)) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)))
        pos_BS = jnp.asarray(positions, jnp.int32)
        seq_mesh = self.seq_mesh if splits(self.seq_mesh, B, S) else None
        if seq_mesh is not None:  # every token-wise op below on the device's own tokens (global positions)
            ids_BS, pos_BS = constrain_tokens(seq_mesh, ids_BS), constrain_tokens(seq_mesh, pos_BS)
        cos_RBSH, sin_RBSH = rope_tables(cfg, pos_BS, self.dtype)
        seg_BS = None if segment_ids is None else jnp.asarray(segment_ids)
        windows = [w if w is not None else NO_WINDOW for w in cfg.sliding_windows]
        windowed = any(w < S for w in windows)
        # one window shared by every layer is a static int (cuDNN's window length must be), else it is scanned over
        shared_window = windows[0] if len(set(windows)) == 1 else None

        h_BSD = self.model.embed_tokens(ids_BS)
        if embed_noise and not deterministic:
            if key is None:
                raise ValueError("NEFTune (embed_noise > 0) needs a PRNG key (key=...) when deterministic=False")
            h_BSD = h_BSD + neftune_noise(jax.random.fold_in(key, NEFTUNE_KEY), h_BSD.shape, embed_noise, h_BSD.dtype)
        if seq_mesh is not None:
            h_BSD = constrain_tokens(seq_mesh, h_BSD)
        if self.hoist_kernels:  # the 4-bit kernels stay stacked, outside the scanned state (see __init__)
            graphdef, kernels, state = nnx.split(self.model.layers, QuantData, ...)
        else:
            graphdef, state = nnx.split(self.model.layers)
        use_dropout = not deterministic and self.lora_config is not None and self.lora_config.dropout > 0
        if use_dropout and key is None:
            raise ValueError("LoRA dropout needs a PRNG key (key=...) when deterministic=False")
        keys = jax.random.split(key, cfg.num_hidden_layers) if use_dropout else None

        def body(h, xs):
            layer_state, window, rope, layer_key = xs
            if offload:
                h = checkpoint_name(h, RESIDUAL)
            parts = (kernels, layer_state) if self.hoist_kernels else (layer_state,)
            layer = nnx.merge(graphdef, *parts)
            if cos_RBSH.shape[0] == 1:  # one RoPE: a static slice, no per-layer selection
                rope = 0
            w = (window if shared_window is None else shared_window) if windowed else None
            out = layer(h, cos_RBSH[rope], sin_RBSH[rope], seg_BS, w, implementation=self.attention,
                        deterministic=not use_dropout, key=layer_key, stats_mask_T=stats_mask_T, seq_mesh=seq_mesh,
                        mlp_chunk=self.mlp_chunk)
            return out if want_stats else (out, None)

        offload = self.offload_residual and self.remat != "none"
        if self.remat != "none":
            body = jax.checkpoint(body, policy=_remat_policy(self.remat, offload), prevent_cse=not self.scan_layers)
        xs = (state, jnp.asarray(windows, jnp.int32), jnp.asarray(cfg.layer_ropes, jnp.int32), keys)
        if self.scan_layers:
            h_BSD, stats_L2E = jax.lax.scan(body, h_BSD, xs)
        else:
            per_layer = []
            for i in range(cfg.num_hidden_layers):
                h_BSD, st = body(h_BSD, jax.tree_util.tree_map(lambda x, i=i: x[i], xs))
                per_layer.append(st)
            stats_L2E = jnp.stack(per_layer) if want_stats else None
        h_BSD = self.model.norm(h_BSD)
        return (h_BSD, stats_L2E) if want_stats else h_BSD

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
        from jqlora.models.moe import ExpertLora

        for i, (_, module) in enumerate(sorted(nnx.iter_modules(self), key=lambda pm: tuple(map(str, pm[0])))):
            if isinstance(module, (LoraLinear, ExpertLora)):
                module.reset_lora(jax.random.fold_in(key, i))
        # the embedding / head adapters after (keys apart, so the layers' adapters start as they always did)
        for j, head in enumerate((self.model.embed_tokens, self.lm_head)):
            if head is not None:
                head.reset_lora(jax.random.fold_in(key, 1_000_000 + j))


LlamaModel = DecoderModel  # the names these had when Llama was the only family
LlamaForCausalLM = CausalLM
