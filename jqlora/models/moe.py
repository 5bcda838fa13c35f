"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): a frozen router and grouped expert dispatch.

Per token x (Shazeer et al., "Outrageously Large Neural Networks", 2017; Jiang et al., "Mixtral of Experts", 2024):

    p = softmax(x Gᵀ)  (float32)                     G: the router ``gate.weight`` [E, D], frozen, never quantized
    (w, e) = top_k(p)  (k = num_experts_per_tok)      renormalized w / Σ w when ``norm_topk_prob`` (Mixtral: always,
                                                       which equals a softmax over the top-k logits)
    y = Σ_j w_j · down_e_j(silu(gate_e_j(x)) * up_e_j(x))

The experts are frozen `LoraLinear` kernels stacked on an expert axis (variables [L, E, ...] under the layer
stack), NF4-quantized like every other linear when quantization is on, each expert's [O, I] kernel quantized on its
own (the blocks bitsandbytes would make for that expert's matrix). The router stays frozen.

Expert adapters (``LoraConfig.experts``), as peft 0.21 adapts transformers' fused 3-D expert parameters
(``target_parameters``, one ``ParamWrapper`` per parameter): per expert e, one LoRA on the fused
``gate_up_proj`` [2F, D] (A shared by gate and up, B over both halves, gate first) and one on ``down_proj`` [D, F]:

    [g | u] = x (W_gu,e)ᵀ + s · (x A_gu,e) B_gu,e          A_gu,e [D, r], B_gu,e [r, 2F]
    y       = h (W_d,e)ᵀ  + s · (h A_d,e) B_d,e,  h = act(g) * u    A_d,e [F, r], B_d,e [r, D]

with s = alpha / r (alpha / √r with rsLoRA), A uniform and B zero at init (peft's init: the fresh adapter leaves the
model unchanged), no dropout and no DoRA (peft refuses both there). ``ExpertLora`` holds them as ``lora_a`` [E, I, r]
/ ``lora_b`` [E, r, O] (``nnx.LoRAParam``, [L, E, ...] under the stack); `jqlora.adapters.experts` maps them to peft's
keys. The adapter terms are computed on the gathered tiles only (each tile gathers its expert's A and B), so their
FLOPs also scale with top-k: 2 · N · R · r · (D + 2F + F + D).

Dispatch (capacity-free, no token is dropped, no expert runs on a token that did not pick it):
the T·k token slots are sorted by expert (stable argsort); each expert's run of slots is padded up to whole tiles
of ``t = ceil(T·k / E)`` rows, so at most ``n = ceil(T·k / t) + E`` tiles hold every slot, each tile belonging to
one expert. The tiles' kernels are gathered (from the 4-bit codes when quantized, then dequantized: only the
gathered tiles' experts are ever dequantized) and each matmul is one batched dot over tiles,
[n, t, D] · [n, D, F]. Its FLOPs are 2 · n · t · D · F ≤ 2 · (T·k + E·t) · D · F ≈ 4 · T·k · D · F: proportional to
top-k, independent of the number of experts (the dense alternative is 2 · T · E · D · F). Outputs go back to their
slots by the inverse permutation and are summed over the k slots of each token with the router weights.
`jax.lax.ragged_dot` would express the same grouping without padding, but XLA's CPU backend expands it into a dense
matmul over every expert (E times the FLOPs), so the tiles are used everywhere.

Shape letters: T tokens (B·S), E experts, K top-k, D hidden, F expert hidden, N tiles, R rows per tile.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jqlora import quant as q
from jqlora.lora import Frozen, LoraConfig, LoraLinear, LoraSpec, QuantSpec, lora_a_init
from jqlora.models.config import ModelConfig
from jqlora.models.layers import ACTIVATIONS


def route(logits_TE: jax.Array, k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """float32 router weights [T, K] and expert ids int32 [T, K] (highest probability first), as transformers."""
    probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    w_TK, e_TK = jax.lax.top_k(probs_TE, k)
    if norm_topk_prob:
        w_TK = w_TK / jnp.sum(w_TK, axis=-1, keepdims=True)
    return w_TK, e_TK.astype(jnp.int32)


def load_balancing_loss(logits_LTE: jax.Array, k: int, mask_T: jax.Array | None = None) -> jax.Array:
    """Switch-Transformer auxiliary loss as transformers computes it over all layers at once:
    E · Σ_e f_e · P_e with f_e the fraction of (layer, token) slots routed to e (top-k counted) and P_e the mean
    router probability of e, both over every layer's (unmasked) tokens. (The train step gets the same from the
    per-layer `router_stats`, which is all that leaves the scanned layer stack.)"""
    stats_L2E = jax.vmap(lambda lg: router_stats(lg, k, mask_T))(logits_LTE)
    return aux_from_stats(stats_L2E, mask_T, logits_LTE.shape[1])


def router_stats(logits_TE: jax.Array, k: int, mask_T: jax.Array | None = None) -> jax.Array:
    """One layer's load-balancing statistics float32 [2, E]: (top-k picks of each expert, Σ router probabilities of
    each expert) over the unmasked tokens. Summed over layers they give `aux_from_stats` = `load_balancing_loss`."""
    E = logits_TE.shape[-1]
    probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    _, e_TK = jax.lax.top_k(probs_TE, k)
    m_T = jnp.ones(logits_TE.shape[0], jnp.float32) if mask_T is None else mask_T.astype(jnp.float32)
    counts_E = jnp.sum(jax.nn.one_hot(e_TK, E, dtype=jnp.float32) * m_T[:, None, None], axis=(0, 1))
    return jnp.stack([counts_E, jnp.sum(probs_TE * m_T[:, None], axis=0)])


def aux_from_stats(stats_L2E: jax.Array, mask_T: jax.Array | None, tokens: int) -> jax.Array:
    """transformers' load-balancing loss from the per-layer `router_stats` [L, 2, E] of ``tokens`` tokens
    (``mask_T`` the same mask): E · Σ_e (picks_e / rows) · (Σ p_e / rows), rows = L · unmasked tokens."""
    L, _, E = stats_L2E.shape
    n = jnp.float32(tokens) if mask_T is None else jnp.sum(mask_T.astype(jnp.float32))
    rows = L * n
    total_2E = jnp.sum(stats_L2E, axis=0)
    return E * jnp.sum((total_2E[0] / rows) * (total_2E[1] / rows))


def tile_rows(tokens: int, k: int, experts: int) -> tuple[int, int]:
    """(rows per tile, number of tiles) for ``tokens`` · ``k`` slots over ``experts`` (see the module docstring)."""
    slots = tokens * k
    rows = max(1, -(-slots // experts))
    return rows, -(-slots // rows) + experts


def _take(kernel: LoraLinear, e_N: jax.Array) -> jax.Array:
    """The [N, O, I] kernels of experts ``e_N`` in the compute dtype (dequantizing only those)."""
    if kernel.quant.enabled:
        t = kernel.quantized()
        picked = jax.tree_util.tree_map(lambda a: jnp.take(a, e_N, axis=0), t)
        return q.dequantize(picked, kernel.dtype)
    return jnp.take(kernel.weight[...], e_N, axis=0).astype(kernel.dtype)


def _tile_dot(x_NRI: jax.Array, w_NOI: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x_NRI, w_NOI, (((2,), (2,)), ((0,), (0,))))


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        E, D = cfg.num_experts, cfg.hidden_size
        self.weight = Frozen((0.02 * jax.random.normal(rngs.params(), (E, D), jnp.float32)).astype(dtype))

    def __call__(self, x_TD: jax.Array) -> jax.Array:
        """Router logits [T, E] in the compute dtype (as transformers' ``F.linear``)."""
        return jax.lax.dot_general(x_TD, self.weight[...].astype(x_TD.dtype), (((1,), (1,)), ((), ())))


class ExpertLora(nnx.Module):
    """One LoRA per expert over a fused expert parameter [E, O, I]: ``lora_a`` [E, I, r], ``lora_b`` [E, r, O]."""

    def __init__(self, experts: int, in_features: int, out_features: int, spec: LoraSpec, param_dtype: Any,
                 rngs: nnx.Rngs):
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.param_dtype = jnp.dtype(param_dtype)
        self.lora_a = nnx.LoRAParam(lora_a_init(rngs.params(), (experts, in_features, spec.r), in_features,
                                                param_dtype))
        self.lora_b = nnx.LoRAParam(jnp.zeros((experts, spec.r, out_features), self.param_dtype))

    @property
    def scaling(self) -> float:
        return self.spec.scaling

    def reset_lora(self, key: jax.Array) -> None:
        """A uniform, B zero (peft's init), keeping shapes and any stacked axes."""
        self.lora_a.set_value(lora_a_init(key, self.lora_a.shape, self.in_features, self.param_dtype))
        self.lora_b.set_value(jnp.zeros(self.lora_b.shape, self.param_dtype))

    def delta(self, x_NRI: jax.Array, e_N: jax.Array) -> jax.Array:
        """s · (x A_e) B_e [N, R, O] for tiles ``x_NRI`` of experts ``e_N`` (gathering only those A / B)."""
        a_NIr = jnp.take(self.lora_a[...], e_N, axis=0).astype(x_NRI.dtype)
        b_NrO = jnp.take(self.lora_b[...], e_N, axis=0).astype(x_NRI.dtype)
        h_NRr = jax.lax.dot_general(x_NRI, a_NIr, (((2,), (1,)), ((0,), (0,))))
        y_NRO = jax.lax.dot_general(h_NRr, b_NrO, (((2,), (1,)), ((0,), (0,))))
        return y_NRO * jnp.asarray(self.scaling, x_NRI.dtype)

    def merged_delta(self) -> jax.Array:
        """float32 s · (A_e B_e)ᵀ [..., E, O, I]: what merging adds to each expert's kernel."""
        d = jnp.matmul(self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32))
        return self.scaling * jnp.swapaxes(d, -1, -2)


def expert_spec(lora: LoraConfig | None) -> LoraSpec | None:
    """The expert adapters' settings (``lora.r`` / ``lora.alpha``), or None when ``lora.experts`` is off."""
    if lora is None or not getattr(lora, "experts", False):
        return None
    return LoraSpec(r=int(lora.r), alpha=float(lora.alpha), rslora=bool(lora.rslora))


class Experts(nnx.Module):
    """``gate_proj``, ``up_proj`` [E, F, D] and ``down_proj`` [E, D, F] (frozen), and with ``lora`` the expert
    adapters ``gate_up_lora`` (over the fused [2F, D]) and ``down_lora``."""

    def __init__(self, cfg: ModelConfig, quant: QuantSpec, dtype: Any, lora_dtype: Any, rngs: nnx.Rngs,
                 lora: LoraSpec | None = None):
        D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        if not quant.experts:  # kept in the compute dtype, as transformers + bitsandbytes keeps fused experts
            quant = QuantSpec("none")

        @nnx.split_rngs(splits=cfg.num_experts)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r: nnx.Rngs):
            kw = dict(quant=quant, dtype=dtype, param_dtype=lora_dtype, rngs=r)
            return LoraLinear(D, F, **kw), LoraLinear(D, F, **kw), LoraLinear(F, D, **kw)

        self.gate_proj, self.up_proj, self.down_proj = make(rngs)
        if lora is not None:
            self.gate_up_lora = ExpertLora(E, D, 2 * F, lora, lora_dtype, rngs)
            self.down_lora = ExpertLora(E, F, D, lora, lora_dtype, rngs)
        else:
            self.gate_up_lora = self.down_lora = None


class MoE(nnx.Module):
    """The sparse MLP block: ``gate`` (router) and ``experts``."""

    def __init__(self, cfg: ModelConfig, quant: QuantSpec, dtype: Any, lora_dtype: Any, rngs: nnx.Rngs,
                 lora: LoraConfig | None = None):
        self.gate = Router(cfg, dtype, rngs)
        self.experts = Experts(cfg, quant, dtype, lora_dtype, rngs, expert_spec(lora))
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.norm_topk_prob, self.weights_f32 = cfg.norm_topk_prob, cfg.router_weights_f32
        self.act = cfg.hidden_act
        self.dtype = dtype

    def __call__(self, x_BSD: jax.Array, *, deterministic: bool = True, keys=None, stats_mask_T=None):
        """y [B, S, D]; with ``stats_mask_T`` (float [B·S], 1 = a real token) also this layer's `router_stats`."""
        del deterministic, keys  # (expert adapters take no dropout)
        B, S, D = x_BSD.shape
        E, K = self.num_experts, self.top_k
        x_TD = x_BSD.reshape(B * S, D).astype(self.dtype)
        T = x_TD.shape[0]
        logits_TE = self.gate(x_TD)
        w_TK, e_TK = route(logits_TE, K, self.norm_topk_prob)

        # sort the T·K slots by expert and give each expert whole tiles of R rows
        R, N = tile_rows(T, K, E)
        e_S = e_TK.reshape(-1)
        order_S = jnp.argsort(e_S, stable=True)
        e_sorted_S = e_S[order_S]
        count_E = jnp.bincount(e_S, length=E).astype(jnp.int32)
        tiles_E = -(-count_E // R)
        tile_end_E = jnp.cumsum(tiles_E)
        slot_start_E = jnp.cumsum(count_E) - count_E
        rank_S = jnp.arange(T * K, dtype=jnp.int32) - slot_start_E[e_sorted_S]
        row_S = (tile_end_E - tiles_E)[e_sorted_S] * R + rank_S  # each sorted slot's row among the N·R
        tile_expert_N = jnp.minimum(jnp.searchsorted(tile_end_E, jnp.arange(N), side="right"), E - 1)

        x_NRD = jnp.zeros((N * R, D), x_TD.dtype).at[row_S].set(x_TD[order_S // K]).reshape(N, R, D)
        ex = self.experts
        gate_NRF = _tile_dot(x_NRD, _take(ex.gate_proj, tile_expert_N))
        up_NRF = _tile_dot(x_NRD, _take(ex.up_proj, tile_expert_N))
        if ex.gate_up_lora is not None:
            F = gate_NRF.shape[-1]
            d_NR2F = ex.gate_up_lora.delta(x_NRD, tile_expert_N)
            gate_NRF, up_NRF = gate_NRF + d_NR2F[..., :F], up_NRF + d_NR2F[..., F:]
        h_NRF = ACTIVATIONS[self.act](gate_NRF) * up_NRF
        y_NRD = _tile_dot(h_NRF, _take(ex.down_proj, tile_expert_N))
        if ex.down_lora is not None:
            y_NRD = y_NRD + ex.down_lora.delta(h_NRF, tile_expert_N)
        y_sorted_SD = y_NRD.reshape(N * R, D)[row_S]
        y_TKD = jnp.zeros_like(y_sorted_SD).at[order_S].set(y_sorted_SD).reshape(T, K, D)
        if self.weights_f32:  # Mixtral: float32 products, rounded once per slot
            y_TKD = (y_TKD.astype(jnp.float32) * w_TK[..., None]).astype(self.dtype)
        else:  # Qwen3-MoE: the weights rounded to the compute dtype first
            y_TKD = y_TKD * w_TK.astype(self.dtype)[..., None]
        y_BSD = jnp.sum(y_TKD, axis=1).reshape(B, S, D)
        if stats_mask_T is None:
            return y_BSD
        return y_BSD, router_stats(logits_TE, K, stats_mask_T)
