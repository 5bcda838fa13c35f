"""An analytic per-device memory plan (the math behind `python -m jqlora.plan`) for a QLoRA run: will it fit, and where do the bytes go?

    python -m jqlora.plan --model llama3-70b --seq 2048 --batch 1 --fsdp 2 --remat full
    python -m jqlora.plan --model-config path/to/config.json --seq 2048 --batch 1
    python -m jqlora.plan --config configs/llama3-8b.yaml [key.sub=value ...] [--devices 8]

Rows (bytes per device; B = rows per device, S = sequence, T = B·S tokens, D hidden, F MLP width, N/K query/KV heads
of size H, L layers, V vocabulary, r LoRA rank, c = bytes of the compute dtype, P = fsdp × seq × tensor):

    base weights        exact storage of the frozen model: per linear kernel of n values ceil(n/2) code bytes +
                        n/block absmax (1 byte with double quantization, else 4) + ceil(blocks/256)·4 nested scales
                        + 4 offset bytes (≈ 4.127 bits/param at block 64), each MoE expert's kernel on its own;
                        embeddings / lm_head / norms (and the experts with model.quantize_experts=false) in the
                        compute dtype; split over P (norms replicated), as `jqlora.parallel` places them
    gathered layer      FSDP only: one layer's 4-bit kernels all-gathered, twice (the next layer is prefetched)
    LoRA + AdamW        fp32 adapters + gradient + accumulated gradient (optax.MultiSteps) + 2 moments = 20 B/param
                        (train.optimizer_state bfloat16: 16; 8bit: 14 + 8/256),
                        split over fsdp
    residual stream     every remat policy but none: the scanned layer input, L · T·D·c (in host memory with
                        train.offload_residual)
    saved matmuls       save_dots: every dot output of every layer (base, LoRA A and B; with XLA attention also its
                        scores and values, a cuDNN attention call is no dot);
                        save_dots_no_batch: the same without attention's (batched) dots; offload: those of
                        save_dots_no_batch in pinned host memory (a host row, not in the device total)
    layer working set   one layer recomputed for its backward: activations T·(6D + 2NH + 2KH + 3F)·c, attention
                        scores and probabilities B·N·S²·(2c) with XLA attention, or cuDNN flash attention's float32
                        softmax statistics B·64·N·S·4 (its packed layout has room for 64 segments a row), and the layer's
                        kernels dequantized to c (the 3F term for one chunk of train.mlp_chunk tokens when set);
                        with remat none every layer keeps its activations (× L) but not its dequantized kernels
                        (the 4-bit matmul's backward dequantizes again, `lora.quantized_matmul`)
    cross-entropy       one chunk of 1024 tokens of float32 logits and their gradient, 2 · 1024·V·4, plus the final
                        hidden states and their gradient 2·T·D·c

``memory="min"`` (train.memory=min): the embedding and lm_head tables are 4-bit too, ``quantized_bytes(V·D)`` each
(one when tied) in the base weights row, and the cross-entropy holds one block of R = min(4096, V) vocabulary rows
at a time: 2 · 1024·R·4 logits and their gradient plus the block's rows dequantized (and their recomputation), 2·R·D·c.
Its 4-bit matmuls dequantize 16 MiB tiles (`lora.tiled_quantized_matmul`): the layer working set holds the layer's
4-bit kernels (the copy the layer scan slices out) and two tiles instead of the layer's kernels in the compute dtype.

Not counted: XLA's temporary buffers and fragmentation, the CUDA context (~0.5 GB), the batch itself.
The tensor axis divides the per-layer working set and saved matmuls (heads and MLP are split), not the residuals.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jqlora.lora import ADAPTABLE_MODULES as LINEARS
from jqlora.models import ModelConfig, hf_key_table
from jqlora.planning.model_shapes import PUBLISHED
from jqlora.training.optim8bit import resolve_state, state_bytes_per_parameter

NESTED = 256
CE_CHUNK = 1024
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
REMATS = ("none", "full", "save_dots", "save_dots_no_batch", "offload")  # = jqlora.config.REMAT_POLICIES
MEMORY_MODES = ("default", "min")  # = jqlora.config.MEMORY_MODES (train.memory)
HEAD_BLOCK_ROWS = 4096  # = jqlora.models.layers.HEAD_BLOCK_ROWS
MIN_TILE_BYTES = 16 << 20  # = jqlora.models.decoder.MIN_TILE_BYTES
WEIGHTS_ROW = "base weights"  # the row's label starts so: `weights_row` adds what the weights are stored in


def weights_row(dtype: str, quant: str = "nf4") -> str:
    """The plan's row of the base weights, labelled with their storage: 4-bit kernels (unless quant=none) and the
    rest (embeddings, norms, lm_head) in model.dtype."""
    return f"{WEIGHTS_ROW} ({dtype})" if quant == "none" else f"{WEIGHTS_ROW} (4-bit + {dtype})"
HEADROOM = 0.85  # share of a device's memory the plan may fill: XLA temporaries, fragmentation, CUDA context


BUILTIN: dict[str, ModelConfig] = {k: ModelConfig.from_hf(v) for k, v in PUBLISHED.items()}


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """[out, in] of each linear kernel of one layer, from the model's own HF key table; MoE experts as
    ``experts.<name>`` [E · out, in] (all experts of the layer, which carry no adapter)."""
    shapes = {}
    for e in hf_key_table(cfg):
        if e.kind == "linear" and e.layer == 0 and e.expert in (None, 0):
            if e.expert is None:
                shapes[e.path[-1]] = e.shape
            else:
                shapes[f"experts.{e.path[-1]}"] = (cfg.num_experts * e.shape[0], e.shape[1])
    return shapes


def quantized_bytes(n: int, block_size: int = 64, double_quant: bool = True) -> int:
    """Exact storage of one 4-bit tensor of n values: codes, absmax, nested absmax and offset."""
    blocks = -(-n // block_size)
    if double_quant:
        return -(-n // 2) + blocks + 4 * -(-blocks // NESTED) + 4
    return -(-n // 2) + 4 * blocks


def weight_bytes(shape: ModelConfig, *, quant: str = "nf4", double_quant: bool = True, block_size: int = 64,
                 dtype_bytes: int = 2, quantize_experts: bool = True, quantized_heads: bool = False) -> dict[str, int]:
    """Bytes of the whole frozen model: {'quantized', 'unquantized', 'norms', 'per_layer_quantized', 'experts',
    'heads', 'total'}; 'experts' (in either of the first two) is every MoE expert kernel, quantized one expert at a
    time or, with ``quantize_experts`` False, in the compute dtype; 'heads' the embedding and lm_head tables, 4-bit
    with ``quantized_heads`` (train.memory=min: NF4 + double quant at ``block_size``), else in the compute dtype."""
    L, D, V = shape.num_hidden_layers, shape.hidden_size, shape.vocab_size
    per_layer = float_layer = experts = 0
    for name, (O, I) in linear_shapes(shape).items():
        is_expert = name.startswith("experts.")
        if quant == "none" or (is_expert and not quantize_experts):
            n_bytes = O * I * dtype_bytes
            float_layer += n_bytes
        else:
            E = shape.num_experts if is_expert else 1  # (each expert's [O, I] quantized on its own, moe.py)
            n_bytes = E * quantized_bytes(O * I // E, block_size, double_quant)
            per_layer += n_bytes
        experts += n_bytes if is_expert else 0
    biases = (shape.num_attention_heads + 2 * shape.num_key_value_heads) * shape.head_dim if shape.qkv_bias else 0
    router = shape.num_experts * D  # MoE: the router stays unquantized
    norms = L * (2 * D + (2 * shape.head_dim if shape.qk_norm else 0) + biases + router) + D
    tables = 1 if shape.tie_word_embeddings else 2
    heads = tables * (quantized_bytes(V * D, block_size, True) if quantized_heads else V * D * dtype_bytes)
    quantized = L * per_layer + (heads if quantized_heads else 0)
    unquantized = norms * dtype_bytes + L * float_layer + (0 if quantized_heads else heads)
    return {"quantized": quantized, "unquantized": unquantized, "norms": norms * dtype_bytes,
            "per_layer_quantized": per_layer, "experts": L * experts, "heads": heads, "total": quantized + unquantized}


def lora_param_count(shape: ModelConfig, r: int = 16, targets: tuple[str, ...] = LINEARS,
                     experts: bool = False) -> int:
    """Adapter parameters of ``targets`` (and, with ``experts`` on a MoE model, every expert's LoRA on the fused
    gate_up_proj [2F, D] and down_proj [D, F]: E · r · (D + 2F + F + D) per layer, `jqlora.models.moe`)."""
    n = sum(r * (O + I) for name, (O, I) in linear_shapes(shape).items() if name in targets)
    if experts and shape.num_experts:
        D, F = shape.hidden_size, shape.intermediate_size
        n += shape.num_experts * r * (D + 2 * F + F + D)
    return shape.num_hidden_layers * n


@dataclasses.dataclass
class Plan:
    title: str
    rows: dict[str, float]
    total_weight_bytes: int
    notes: list[str]
    host_rows: dict[str, float] = dataclasses.field(default_factory=dict)  # pinned host memory, not on the device
    # rows held by one phase of a step only (GRPO: "train", "rollout"), never alive together; all other rows are shared
    phases: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def phase_totals(self) -> dict[str, float]:
        """Bytes per device while each phase runs (the shared rows and that phase's own)."""
        own = {r for rows in self.phases.values() for r in rows}
        shared = sum(v for k, v in self.rows.items() if k not in own)
        return {p: float(shared + sum(self.rows[r] for r in rows)) for p, rows in self.phases.items()}

    @property
    def total(self) -> float:
        if self.phases:
            return max(self.phase_totals().values())
        return float(sum(self.rows.values()))

    def table(self) -> str:
        width = max(len(k) for k in list(self.rows) + ["total per device"])
        lines = [self.title, "-" * (width + 14)]
        for k, v in self.rows.items():
            lines.append(f"{k:<{width}}  {v / 1e9:>9.2f} GB")
        lines.append("-" * (width + 14))
        for p, v in self.phase_totals().items():
            lines.append(f"{'while ' + p + ' runs':<{width}}  {v / 1e9:>9.2f} GB")
        lines.append(f"{'total per device':<{width}}  {self.total / 1e9:>9.2f} GB")
        for k, v in self.host_rows.items():
            lines.append(f"{k + ' (host)':<{width}}  {v / 1e9:>9.2f} GB")
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def memory_plan(shape: ModelConfig, *, seq: int, batch: int = 1, data: int = 1, fsdp: int = 1, tensor: int = 1,
                remat: str = "full", r: int = 16, targets: tuple[str, ...] = LINEARS, quant: str = "nf4",
                double_quant: bool = True, block_size: int = 64, dtype: str = "bfloat16",
                ce_chunk: int = CE_CHUNK, name: str = "model", attention: str = "xla",
                dropout: float = 0.0, experts: bool = False, quantize_experts: bool = True, objective: str = "sft",
                new_tokens: int = 0, rollout_rows: int = 0, optimizer_state: str = "auto",
                seq_parallel: int = 1, memory: str = "default", mlp_chunk: int = 0,
                offload_residual: bool = False, grad_accum: int = 2) -> Plan:
    """Bytes per device; ``batch`` is rows per device (each device of the data × fsdp axes sees its own rows).
    ``seq_parallel`` = mesh.seq: every row's tokens split over that many devices (Ulysses: the attention of a device
    covers the whole row for N / seq_parallel heads), so every activation row divides by it, and the weights,
    adapters and optimizer state are split over it as over fsdp (`jqlora.parallel.rules`).
    ``objective="grpo"``: `grpo_plan` (``seq`` the prompt tokens, ``batch`` completion rows per micro-step).
    ``memory`` is train.memory (`MEMORY_MODES`; min: see the module docstring)."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory mode {memory!r}: expected one of {', '.join(MEMORY_MODES)}")
    if memory == "min" and objective == "grpo":
        raise ValueError("memory mode min is not available with objective grpo (train.memory=min)")
    optimizer_state = resolve_state(optimizer_state, memory)
    offload_residual = offload_residual or memory == "min"  # (min takes every saving)
    if objective == "grpo":
        return grpo_plan(shape, prompt=seq, new_tokens=new_tokens, rows=batch, rollout_rows=rollout_rows,
                         data=data, fsdp=fsdp, tensor=tensor, remat=remat, r=r, targets=targets, quant=quant,
                         double_quant=double_quant, block_size=block_size, dtype=dtype, name=name,
                         attention=attention, dropout=dropout, experts=experts,
                         quantize_experts=quantize_experts, optimizer_state=optimizer_state)
    if remat not in REMATS:
        raise ValueError(f"remat {remat!r}: expected one of {', '.join(REMATS)}")
    c = DTYPE_BYTES[dtype]
    P = fsdp * seq_parallel * tensor  # (the seq axis is one more FSDP axis for the weights)
    L, D, F = shape.num_hidden_layers, shape.hidden_size, shape.intermediate_size
    if shape.num_experts:  # MoE: each token runs k experts, in dispatch tiles padded up to ~2x (models/moe.py)
        F = 2 * shape.num_experts_per_tok * F
    N, K, H, V = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim, shape.vocab_size
    B, S = batch, seq
    T = B * S / seq_parallel  # tokens a device holds; attention's [B, N, S, S]-sized rows divide by it too (heads)
    low = memory == "min"
    w = weight_bytes(shape, quant=quant, double_quant=double_quant, block_size=block_size, dtype_bytes=c,
                     quantize_experts=quantize_experts, quantized_heads=low)
    rows: dict[str, float] = {}
    rows[weights_row(dtype, quant)] = (w["total"] - w["norms"]) / P + w["norms"]
    float_experts = bool(shape.num_experts) and not quantize_experts and quant != "none"
    if P > 1:  # (float experts are gathered too)
        layer = w["per_layer_quantized"] + (w["experts"] / L if float_experts else 0)
        rows["gathered layer (fsdp prefetch, x2)"] = 2 * layer * (1 - 1 / P)
    n_lora = lora_param_count(shape, r, targets, experts)
    accumulates = not (memory == "min" and grad_accum == 1)  # (min without accumulation: no MultiSteps buffer)
    per_parameter = (12 if accumulates else 8) + state_bytes_per_parameter(optimizer_state)
    rows[lora_row(optimizer_state, accumulates)] = per_parameter * n_lora / (fsdp * seq_parallel)
    residual = L * T * D * c
    acts = T * (6 * D + 2 * N * H + 2 * K * H + 3 * F) * c / tensor
    if mlp_chunk and mlp_chunk < T:  # train.mlp_chunk: the F-wide activations of one chunk at a time
        acts -= (T - mlp_chunk) * 3 * F * c / tensor
    if dropout > 0 and remat == "none":
        # what the compiler keeps per layer with LoRA dropout and no remat (read off the compiled Llama-3-8B step,
        # h100-sxm, seq 2048): each adapter's dropped input and its mask, both float32 RMSNorm inputs, 6 F-wide
        # and 6 D-wide compute-dtype activations, q/k/v and the attention output
        acts = T * ((6 * F + 6 * D + 2 * N * H + 2 * K * H) * c + 2 * D * 4 + (5 * D + N * H + F)) / tensor
    flash = attention == "cudnn"
    scores = (B * min(64, S) * N * S * 4 if flash else 2 * B * N * S * S * c) / (tensor * seq_parallel)
    kernels = sum(O * I for O, I in linear_shapes(shape).values()) * c / tensor
    if low and quant != "none":  # tiled 4-bit matmuls: the layer's codes sliced out, and two tiles dequantized
        kernels = min(kernels, (w["per_layer_quantized"] + 2 * MIN_TILE_BYTES) / tensor)
    outs = T * (N * H + 2 * K * H + D + 2 * F + D) * c
    n_lin = len(targets)
    no_batch_dots = (2 * outs + T * r * n_lin * c) / tensor  # base and LoRA B outputs, LoRA A outputs
    # + attention's dots
    dots = no_batch_dots + (0 if flash else (B * N * S * S * c / seq_parallel + T * N * H * c) / tensor)
    host: dict[str, float] = {}
    if remat == "none":
        rows["all layers' activations (no remat)"] = L * (acts + scores)
        rows["one layer's dequantized kernels"] = kernels
    else:
        if offload_residual:  # train.offload_residual: in pinned host memory
            host["residual stream checkpoints"] = residual
        else:
            rows["residual stream checkpoints"] = residual
        if remat == "save_dots":
            rows["saved matmul outputs"] = L * dots
        elif remat == "save_dots_no_batch":
            rows["saved matmul outputs (no attention)"] = L * no_batch_dots
        elif remat == "offload":
            host["saved matmul outputs (no attention)"] = L * no_batch_dots
        rows["layer working set (recomputed)"] = acts + scores + kernels
    if low:  # one block of R vocabulary rows at a time: its logits and their gradient, its rows dequantized
        R = min(HEAD_BLOCK_ROWS, V)
        rows["cross-entropy chunk + final hidden"] = 2 * min(ce_chunk, T) * R * 4 + 2 * R * D * c + 2 * T * D * c
    else:
        rows["cross-entropy chunk + final hidden"] = 2 * min(ce_chunk, T) * V * 4 + 2 * T * D * c
    n_4bit = sum(O * I for k, (O, I) in linear_shapes(shape).items() if not (float_experts and k.startswith("experts.")))
    notes = [f"{(w['quantized'] - (w['heads'] if low else 0)) * 8 / max(1, n_4bit * L):.3f} "
             f"bits/param for the {'4-bit ' if float_experts else ''}linear kernels; {n_lora / 1e6:.1f} M LoRA params "
             f"(r={r})",
             f"all devices together hold {w['total'] / 1e9:.2f} GB of base weights"]
    if low:
        notes.append(f"memory=min: embedding{'' if shape.tie_word_embeddings else ' and lm_head'} 4-bit, "
                     f"{w['heads'] / 1e9:.2f} GB (in {dtype}: "
                     f"{(1 if shape.tie_word_embeddings else 2) * V * D * c / 1e9:.2f} GB)")
    if float_experts:
        packed = weight_bytes(shape, quant=quant, double_quant=double_quant, block_size=block_size, dtype_bytes=c)
        notes.append(f"model.quantize_experts=false: the MoE experts stay {dtype}, {w['experts'] / 1e9:.2f} GB "
                     f"(4-bit: {packed['experts'] / 1e9:.2f} GB)")
    if remat == "offload":
        notes.append("offload: the saved matmuls live in pinned host memory (GPU; on a backend without it they stay "
                     "on the device, as save_dots_no_batch)")
    title = (f"{name}: seq={S} batch={B}/device data={data} fsdp={fsdp} tensor={tensor} "
             f"{f'seq-parallel={seq_parallel} ' if seq_parallel > 1 else ''}remat={remat} "
             f"r={r} {quant}{'+dq' if double_quant else ''} {dtype}{' memory=min' if low else ''}")
    return Plan(title, rows, w["total"], notes, host)


def lora_row(optimizer_state: str = "float32", accumulates: bool = True) -> str:
    """The plan's row of the adapters, their gradients, the accumulated gradient (MultiSteps; not with
    train.memory=min at grad_accum_steps 1) and AdamW state (train.optimizer_state)."""
    return f"LoRA params+grad+{'acc+' if accumulates else ''}AdamW (" + {"float32": "fp32", "bfloat16": "fp32, bf16 moments",
                                             "8bit": "fp32, 8-bit moments"}[optimizer_state] + ")"


def settings_from_config(cfg: Any, axes: dict[str, int] | None = None) -> dict[str, Any]:
    """`memory_plan`'s settings from a run config; ``axes``: resolved mesh sizes (default: the config's, auto = 1)."""
    if axes is None:
        axes = {n: 1 if getattr(cfg.mesh, n) == "auto" else int(getattr(cfg.mesh, n)) for n in ("data", "fsdp",
                                                                                               "tensor")}
    rows = axes["data"] * axes["fsdp"] if all(isinstance(axes[n], int) for n in ("data", "fsdp")) else 1
    # train.batch_size is the global micro-batch: its rows are split over the data × fsdp devices; a preference
    # objective's batch_size counts pairs (or KTO examples with their mismatched rows): 2 sequences each. Its reference
    # pass keeps nothing for the backward (+1% temporary memory on the compiled step: tools/preference_cost.py)
    objective = getattr(cfg.train, "objective", "sft")
    per_example = 1 if objective in ("sft", "grpo") else 2
    grpo = {}
    if objective == "grpo":  # the rollout samples every micro-batch of the step at once (jqlora.run.grpo)
        grpo = dict(objective="grpo", new_tokens=cfg.grpo.max_new_tokens,
                    rollout_rows=max(1, cfg.train.batch_size * cfg.train.grad_accum_steps // rows))
    return dict(seq=cfg.data.max_length, batch=max(1, cfg.train.batch_size // rows) * per_example, **grpo,
                # every adapter at the largest rank: per-layer ranks are stored padded to it (an upper bound when
                # module kinds differ)
                r=max([cfg.lora.r, *cfg.lora.rank_pattern.values()]),
                dropout=cfg.lora.dropout, dtype=cfg.model.dtype,
                quant=cfg.model.quant, double_quant=cfg.model.double_quant and cfg.model.quant != "none",
                block_size=cfg.model.block_size, experts=bool(getattr(cfg.lora, "experts", False)), **axes,
                seq_parallel=int(getattr(cfg.mesh, "seq", 1)),
                quantize_experts=bool(getattr(cfg.model, "quantize_experts", True)),
                optimizer_state=resolve_state(getattr(cfg.train, "optimizer_state", "float32"),
                                              getattr(cfg.train, "memory", "default")),
                memory=getattr(cfg.train, "memory", "default"), mlp_chunk=int(getattr(cfg.train, "mlp_chunk", 0)),
                offload_residual=bool(getattr(cfg.train, "offload_residual", False)),
                grad_accum=int(getattr(cfg.train, "grad_accum_steps", 1)),
                targets=LINEARS if cfg.lora.targets == "all-linear" else tuple(cfg.lora.target_modules))


# ----------------------------------------------------------------------------------------------------------------
# GRPO: a rollout phase (the KV-cache decoder over prompts × G rows) and a train phase, never alive together

GRPO_LOGITS = 2  # float32 [rows, C, V] buffers the compiled GRPO step keeps at once: the logits (log-softmax in place)
# and their gradient (read off the compiled Llama-3-8B step on h100-sxm: tools/grpo_cost.py --gpu h100-sxm)


def kv_cache_bytes(shape: ModelConfig, rows: int, slots: int, dtype_bytes: int = 2) -> int:
    """The rollout's KV cache, keys and values of every layer: L · 2 · K · H · M · rows · c (`decode.init_cache`)."""
    return (shape.num_hidden_layers * 2 * shape.num_key_value_heads * shape.head_dim * slots * rows
            * dtype_bytes)


def grpo_plan(shape: ModelConfig, *, prompt: int, new_tokens: int, rows: int, rollout_rows: int = 0,
              dtype: str = "bfloat16", tensor: int = 1, name: str = "model", **settings: Any) -> Plan:
    """Bytes per device of a GRPO run (`jqlora.run.grpo`): the shared rows (base, adapter and AdamW) and two phases.

    rollout: ``rollout_rows`` = prompts × G rows (default ``rows``) left-padded to P = bucket(prompt) slots and
      decoded for T = bucket(new_tokens) steps with a cache of M = bucket(P + T) slots (`jqlora.models.sampling`):
      the KV cache `kv_cache_bytes`, held once (the layer scan carries it and writes each layer's new slots in
      place: the compiled token loop's temporaries are the cache + ~7%), and the larger of the prefill's working
      set (one layer over rows × P tokens: XLA attention's scores and probabilities over the P prompt slots
      rows·N·P·P·(4 + c), q / k / v, the MLP and the last position's logits) and a token step's (twice one layer's
      keys and values, 2 · kv / L: its slice read for attention; float32 logits and the sampler's sort,
      6 · rows · V · 4). Compiled
      for Llama-3-8B on h100-sxm (4 prompts × G = 8, 512 + 512 tokens) the rollout's peak is 11.34 GiB, the plan's
      rollout phase 15% above it (the optimizer state aside; tests/aot/test_aot_grpo.py);
    train: the SFT rows of `memory_plan` at ``rows`` × (P + T) tokens, the cross-entropy chunk replaced by the
      completions' float32 logits [rows, T, V] (no chunking: `grpo.completion_logps`; `GRPO_LOGITS` buffers).
    """
    from jqlora.models.decode import bucket

    P, T = bucket(prompt), bucket(new_tokens)
    M, B = bucket(P + T), rollout_rows or rows
    c = DTYPE_BYTES[dtype]
    D, F, V = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    N, K, H = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    base = memory_plan(shape, seq=P + T, batch=rows, dtype=dtype, tensor=tensor, name=name, **settings)
    rows_out = {k: v for k, v in base.rows.items() if not k.startswith("cross-entropy")}
    shared = [k for k in rows_out if k.startswith((WEIGHTS_ROW + " (", "gathered layer", "LoRA"))]
    train = [k for k in rows_out if k not in shared]
    logits = f"train: completion logits (float32 [{rows}, {T}, V] x {GRPO_LOGITS}) + hidden"
    rows_out[logits] = GRPO_LOGITS * rows * T * V * 4 + 2 * rows * (P + T) * D * c
    kv = kv_cache_bytes(shape, B, M, c) / tensor
    prefill = (B * N * P * P * (4 + c) + B * P * (2 * N * H + 2 * K * H + 3 * F + 2 * D) * c) / tensor + B * V * 4
    token = 2 * kv / shape.num_hidden_layers + 6 * B * V * 4
    kv_row = f"rollout: KV cache ({B} rows x {M} slots)"
    work_row = "rollout: working set (prefill, or a token step's layer of the cache + sampling)"
    rows_out[kv_row] = kv
    rows_out[work_row] = max(prefill, token)
    notes = [*base.notes, f"rollout: {B} rows (prompts x G), prompt {prompt} -> {P} slots, {new_tokens} new -> {T}, "
             f"KV cache {M} slots = {kv / 1e9:.2f} GB; the rollout and the train step never hold their "
             "temporaries at once: the total is the larger phase"]
    title = base.title.replace(f"seq={P + T} batch={rows}/device",
                               f"grpo prompt={P} new={T} rows={rows}/device rollout={B}")
    return Plan(title, rows_out, base.total_weight_bytes, notes, base.host_rows,
                phases={"train": (*train, logits), "rollout": (kv_row, work_row)})
