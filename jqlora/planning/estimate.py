"""How fast one train step is, estimated without running it: a roofline over the kernels of the step's compiled HLO
(`estimate`, from `jqlora.planning.aot`'s deviceless compile or the run's own), and an analytic rule without a compile
(`analytic_step`, what ``train.remat=auto`` ranks policies by where nothing is compiled).

Compiled: every kernel of the optimized HLO (a fusion, a custom call such as cuDNN attention, a copy), counted as often
as the loops around it run (`known_trip_count` of each while loop), costs

    time = max(bytes read + written / HBM bandwidth, FLOPs / bf16 tensor peak) + a launch cost,

bytes from the kernel's operand and result shapes, FLOPs = 2·M·N·K for every dot inside it, and for cuDNN flash
attention 4·B·N·T·S·H forward (halved for the causal mask, scaled by W/S for a sliding window) and 2.5× that
backward. A copy to or from host memory (memory space S(5): ``remat=offload``) costs its bytes over the GPU's host
link (PCIe, or NVLink-C2C on a GH200: ``pcie_bandwidth`` of the target file), counted in full: no overlap with compute
is assumed, so this part is an upper bound on its time. The kernels are grouped as frozen matmuls, LoRA (a dot with
the adapter rank as a dimension), attention, dequantization (codebook lookups without a dot), cross-entropy (the
chunked-CE loop), elementwise, host link and launches. MFU = model FLOPs / (time × peak) with tools/bench.py's
definition: per token 4N + 6·L·S·Nq·H, N the frozen linear and lm_head parameters.

A roofline is an upper bound on speed (a lower bound on time): no autotuning happened deviceless, so every kernel
is assumed to reach its roofline (real GEMMs reach 60–80% of peak, small ones less); caches, kernel overlap and
CUDA-graph launch amortization are ignored; bytes count each operand once per kernel (no re-reads, no L2 hits).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

from jqlora.planning.memory import DTYPE_BYTES as _CB, LINEARS, linear_shapes, memory_plan

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "token": 0}
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
        "after-all", "partition-id", "replica-id", "opt-barrier", "copy-done", "iota", "fusion-done"}
HOST = "S(5)"  # XLA's memory space of pinned host memory, in a layout
CATEGORIES = ("frozen matmuls", "LoRA", "attention", "dequantization", "cross-entropy", "elementwise", "host link",
              "launches")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \((.*)\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*)$")


def _arrays(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_str)
            if dt in DTYPE_BYTES]


def _bytes(type_str: str) -> float:
    return sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in _arrays(type_str))


@dataclasses.dataclass
class Instr:
    name: str
    type: str
    opcode: str
    rest: str

    def operands(self) -> list[str]:
        depth, out = 1, []
        for i, ch in enumerate(self.rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                out = re.findall(r"%([\w.\-]+)", self.rest[:i])
                break
        return out

    def attr(self, key: str) -> str | None:
        m = re.search(rf"{key}=%?([\w.\-$]+)", self.rest)
        return m.group(1) if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.rest)
        return m.group(1) if m else ""


def parse(text: str) -> tuple[dict[str, list[Instr]], dict[str, dict[str, str]], str]:
    """Computations (name → instructions), each one's value types (name → type), and the entry's name."""
    comps: dict[str, list[Instr]] = {}
    types: dict[str, dict[str, str]] = {}
    entry, current = "", None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = h.group(2)
            comps[current], types[current] = [], {}
            if h.group(1):
                entry = current
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if m:
            ins = Instr(*m.groups())
            comps[current].append(ins)
            types[current][ins.name] = ins.type
        elif line.startswith("}"):
            current = None
    return comps, types, entry


def _dot_flops(comps, types, comp: str, seen=None) -> tuple[float, list[tuple[int, ...]]]:
    """2·M·N·K over the dots of a fused computation (and those it calls), and the dots' operand/result dims."""
    flops, dims = 0.0, []
    for ins in comps.get(comp, []):
        if ins.opcode == "dot":
            ops = ins.operands()
            lhs = _arrays(types[comp].get(ops[0], ""))
            out = _arrays(ins.type)
            contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
            k = math.prod(lhs[0][1][int(d)] for d in contract.group(1).split(",") if d) if lhs and contract else 1
            flops += 2.0 * math.prod(out[0][1]) * k
            dims += [a[1] for o in ops for a in _arrays(types[comp].get(o, ""))] + [out[0][1]]
        for key in ("calls",):
            sub = ins.attr(key)
            if sub and sub in comps:
                f, d = _dot_flops(comps, types, sub)
                flops, dims = flops + f, dims + d
    return flops, dims


def _kernel_bytes(comps, types, comp: str, ins: Instr) -> float:
    """Bytes a kernel reads and writes: each operand and the result once, except an operand its fused computation
    only slices (the slice is read: one layer of a stacked kernel) and a buffer updated in place by a
    dynamic-update-slice (only the update is written: one layer's slot of a stacked residual)."""
    sub = ins.attr("calls")
    body = comps.get(sub, []) if sub else []
    params = {int(m.group(1)): p.name for p in body if p.opcode == "parameter"
              for m in [re.match(r"(\d+)\)", p.rest)] if m}
    by_name = {b.name: b for b in body}
    in_place = {}  # parameter name -> bytes of the update written into it
    # an async fusion-start's result also carries its operands: only the fused computation's root is written
    written = _bytes(body[-1].type) if ins.opcode == "fusion-start" and body else _bytes(ins.type)
    for b in body:
        if b.opcode == "dynamic-update-slice":
            target, update = b.operands()[:2]
            if target in by_name and by_name[target].opcode == "parameter":
                in_place[target] = _bytes(types[sub].get(update, ""))
    if in_place:
        written = max(0.0, written - sum(_bytes(by_name[t].type) for t in in_place)) + sum(in_place.values())
    total = written
    for i, o in enumerate(ins.operands()):
        full = _bytes(types[comp].get(o, ""))
        name = params.get(i)
        if name in in_place:
            full = 0.0
        elif name is not None:
            users = _users_through_views(body, name)
            if users and all(u.opcode in ("dynamic-slice", "slice") for u in users):
                full = min(full, sum(_bytes(u.type) for u in users))
        total += full
    return total


def _users_through_views(body: list[Instr], name: str) -> list[Instr]:
    """The instructions of a fused computation that use ``name``, looking through bitcasts / reshapes of it (a
    stacked kernel reshaped, then sliced to one layer's tile, is read one tile's worth)."""
    out = []
    for u in (u for u in body if name in u.operands()):
        out += _users_through_views(body, u.name) if u.opcode in ("bitcast", "reshape") else [u]
    return out


def _has(comps, comp: str, needle: str) -> bool:
    return any(needle in ins.op_name or (ins.attr("calls") and _has(comps, ins.attr("calls"), needle))
               for ins in comps.get(comp, []))


@dataclasses.dataclass
class Estimate:
    ms: dict[str, float]
    kernels: int
    tokens: int
    model_flops: float
    peak_flops: float

    @property
    def total_ms(self) -> float:
        return sum(self.ms.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.total_ms / 1e3)

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.total_ms / 1e3) / self.peak_flops


def estimate(text: str, gpu, *, tokens: int, model_flops: float, lora_rank: int, vocab: int) -> Estimate:
    comps, types, entry = parse(text)
    ms: dict[str, float] = defaultdict(float)
    kernels = 0

    def walk(comp: str, times: float, in_ce: bool) -> None:
        nonlocal kernels
        for ins in comps[comp]:
            if ins.opcode == "while":
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.rest)
                body = ins.attr("body")
                ce = in_ce or any(vocab in d for d in _dot_flops(comps, types, body)[1]) if body else in_ce
                walk(body, times * (int(trip.group(1)) if trip else 1), ce)
                continue
            if ins.opcode in ("call", "conditional"):
                for sub in re.findall(r"(?:to_apply|branch_computations=\{|calls)=?%([\w.\-]+)", ins.rest):
                    if sub in comps:
                        walk(sub, times, in_ce)
                continue
            if ins.opcode in FREE:
                continue
            nbytes = _kernel_bytes(comps, types, comp, ins)
            operands = [types[comp].get(o, "") for o in ins.operands()]
            if HOST in ins.type or any(HOST in t for t in operands):  # to or from pinned host memory
                if ins.opcode in ("copy-start", "copy"):
                    nbytes = sum(_bytes(t) for t in operands)  # (a copy-start's result also holds its operand)
                ms["host link"] += times * nbytes / gpu.host_link_bytes_per_s * 1e3
                ms["launches"] += times * gpu.launch_s * 1e3
                kernels += int(times)
                continue
            flops, category = 0.0, "elementwise"
            target = re.search(r'custom_call_target="([^"]+)"', ins.rest)
            if ins.opcode == "custom-call" and target and "fmha" in target.group(1):
                ops = ins.operands()
                q = _arrays(types[comp].get(ops[0], ""))[0][1]  # B T N H
                k = _arrays(types[comp].get(ops[1], ""))[0][1]
                window = re.search(r'"sliding_window_length":\s*"?(\d+)', ins.rest)
                causal = "CAUSAL" in (re.search(r'"mask_type":\s*"(\w+)"', ins.rest) or [None, ""])[1]
                share = min(1.0, int(window.group(1)) / k[1]) if window and int(window.group(1)) else (
                    0.5 if causal else 1.0)
                flops = 4.0 * q[0] * q[2] * q[1] * k[1] * q[3] * share
                flops *= 2.5 if "Backward" in target.group(1) else 1.0
                category = "attention"
            elif ins.opcode == "fusion" or ins.opcode == "custom-call":
                sub = ins.attr("calls")
                flops, dims = _dot_flops(comps, types, sub) if sub else (0.0, [])
                if in_ce or any(vocab in d for d in dims):
                    category = "cross-entropy"
                elif "xla_attention" in ins.op_name or (sub and _has(comps, sub, "xla_attention")):
                    category = "attention"
                elif flops:
                    category = "LoRA" if any(lora_rank in d for d in dims) else "frozen matmuls"
                elif sub and _has(comps, sub, "dequantize_codes"):
                    category = "dequantization"
            elif in_ce:
                category = "cross-entropy"
            t = max(nbytes / gpu.hbm_bytes_per_s, flops / gpu.bf16_flops)
            ms[category] += times * t * 1e3
            ms["launches"] += times * gpu.launch_s * 1e3
            kernels += int(times)

    walk(entry, 1.0, False)
    return Estimate({c: ms.get(c, 0.0) for c in CATEGORIES}, kernels, tokens, model_flops, gpu.bf16_flops)


def model_flops(shape, *, tokens: int, seq: int) -> float:
    """Useful FLOPs of one QLoRA step (see the module docstring)."""
    L, D, V = shape.num_hidden_layers, shape.hidden_size, shape.vocab_size
    n = L * sum(o * i for o, i in linear_shapes(shape).values()) + V * D
    return tokens * (4 * n + 6 * L * seq * shape.num_attention_heads * shape.head_dim)




# ---------------------------------------------------------------------------------------------------------------
# Without a compile: the analytic recompute-cost rule


def _attention_share(shape, seq: int) -> float:
    """The mean share of the S×S score matrix a query row visits: causal ½, a sliding window W/S, averaged over layers."""
    shares = [min(1.0, w / seq) if w else 0.5 for w in shape.sliding_windows] or [0.5]
    return sum(shares) / len(shares)


def analytic_step(shape, gpu, *, seq: int, batch: int = 1, remat: str = "full", tensor: int = 1, r: int = 16,
                  targets: tuple[str, ...] = LINEARS, dtype: str = "bfloat16", attention: str = "cudnn",
                  **plan_settings) -> Estimate:
    """A roofline of one step from the shape alone, per device: what each remat policy recomputes costs its FLOPs.

    Per token, with N_l the frozen linear parameters of one layer and L layers: the forward and the input gradient of
    the frozen matmuls, 2·2·L·N_l (+ 2·L·N_l more where the backward recomputes the layer's matmuls: ``full``);
    attention 4·S·Nq·H·share forward and 2.5× that backward, plus one forward again wherever it is recomputed (every
    policy but ``none`` for cuDNN's fused call, which is no dot; ``full``, ``save_dots_no_batch`` and ``offload`` for
    XLA's batched dots); LoRA 2·r·(in+out) per target and pass; lm_head and the chunked cross-entropy 3·2·V·D (the
    logits again in the backward); dequantization writes and reads one bf16 copy of each kernel per pass over it; the
    elementwise work a remat policy recomputes reads and writes the layer's activations once more; ``offload`` moves
    the saved matmul outputs to the host and back over the host link, with no overlap assumed. ``plan_settings`` are
    `memory_plan`'s (the offloaded bytes are its host rows)."""
    T = batch * seq
    L, D, V = shape.num_hidden_layers, shape.hidden_size, shape.vocab_size
    lin = linear_shapes(shape)
    n_layer = sum(o * i for o, i in lin.values())
    if shape.num_experts:  # each token visits k experts' MLPs
        mlp = sum(o * i for k, (o, i) in lin.items() if k in ("gate_proj", "up_proj", "down_proj"))
        n_layer += mlp * (shape.num_experts_per_tok - 1)
    lin_passes = 3 if remat == "full" else 2
    recompute_attn = remat != "none" if attention == "cudnn" else remat in ("full", "save_dots_no_batch", "offload")
    att_fwd = 4.0 * T * seq * shape.num_attention_heads * shape.head_dim * _attention_share(shape, seq) * L
    lora_tok = sum(2 * r * (i + o) for k, (o, i) in lin.items() if k in targets) * L
    ms = dict.fromkeys(CATEGORIES, 0.0)
    ms["frozen matmuls"] = 2.0 * n_layer * L * T * lin_passes / tensor / gpu.bf16_flops * 1e3
    ms["attention"] = att_fwd * (1 + 2.5 + recompute_attn) / tensor / gpu.bf16_flops * 1e3
    ms["LoRA"] = lora_tok * T * lin_passes / tensor / gpu.bf16_flops * 1e3
    ms["cross-entropy"] = 3 * 2.0 * V * D * T / gpu.bf16_flops * 1e3
    c = _CB[dtype]
    ms["dequantization"] = lin_passes * L * n_layer * (2 * c + 0.5) / tensor / gpu.hbm_bytes_per_s * 1e3
    F = shape.intermediate_size
    acts = T * (6 * D + 2 * shape.num_attention_heads * shape.head_dim + 2 * shape.num_key_value_heads
                * shape.head_dim + 3 * F) * c / tensor
    ms["elementwise"] = L * acts * (2 + 2 * (remat != "none")) / gpu.hbm_bytes_per_s * 1e3
    if remat == "offload":
        host = sum(memory_plan(shape, seq=seq, batch=batch, remat=remat, tensor=tensor, r=r, targets=targets,
                               dtype=dtype, attention=attention, **plan_settings).host_rows.values())
        ms["host link"] = 2 * host / gpu.host_link_bytes_per_s * 1e3
    return Estimate(ms, 0, T, model_flops(shape, tokens=T, seq=seq), gpu.bf16_flops)
