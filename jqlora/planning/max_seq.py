"""The longest sequence a run fits in a memory budget (`python -m jqlora.plan --max-seq`).

The peak is taken to grow with the sequence length S (every activation is T = B·S tokens wide), so the longest
fitting S is found by search: from a first guess, doubling (or halving) until the boundary is bracketed, then
bisection over multiples of a coarse step (4096 tokens), then over multiples of a fine step inside the last coarse
interval. Each probe is one peak: the analytic plan's total (`memory.memory_plan`), or the compiled step's peak
(`aot.compile_step` / `aot.compile_step_mesh`, deviceless).

A compiled probe compiles the model with few scanned layers and extrapolates in the layer count L: under the layer
scan, everything that depends on L is stacked over it (4-bit kernels, adapters and their optimizer state, the scan's
saved residuals), and the body's working set is one layer's whatever L is, so the peak is affine in L,

    peak(L) = peak(L₁) + (L - L₁) · (peak(L₂) - peak(L₁)) / (L₂ - L₁),

with L₁ = 2 and L₂ = 4 by default (a scan of one layer may be unrolled by XLA, and then buffers differ). With the
residual offloaded (``train.offload_residual``) only the arguments (and the outputs they alias) are extrapolated so,
and the device temporaries are taken as the larger of the two compiles': near the device's memory XLA's own
rematerialization and scheduling change the temporaries by a whole [S, D] buffer or so between the two small
compiles (Llama-3-8B at 733,184 tokens: 59.95 GB with 2 layers, 66.26 GB with 4), which the straight line would
multiply by L/2. The answer is checked once against a compile of the full depth (`FullDepthCheck`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

COARSE_STEP = 4096  # tokens: the first search grid
FINE_STEP = 256  # tokens: the default refinement grid
COMPILED_FINE_STEP = 1024  # tokens: the refinement grid of a compiled search (the analytic one refines to 1 token)
PROBE_LAYERS = (2, 4)  # scanned layers compiled per probe, extrapolated to the model's depth
LONG_MLP_CHUNK = 4096  # train.mlp_chunk that --max-seq turns on unless told otherwise


@dataclasses.dataclass
class Search:
    """The answer (``best`` tokens, 0 when not even ``fine`` fits) and every probe as (seq, peak bytes, fits)."""

    best: int
    probes: list[tuple[int, float, bool]]
    coarse: int
    fine: int
    interpolated: bool = False

    def over(self) -> tuple[int, float] | None:
        """The shortest probed sequence above ``best`` and its peak (what shows the boundary)."""
        above = [(s, p) for s, p, ok in self.probes if not ok and s > self.best]
        return min(above) if above else None


def with_layers(shape: Any, n: int) -> Any:
    """``shape`` (a `ModelConfig`) cut to its first ``n`` layers."""
    return dataclasses.replace(shape, num_hidden_layers=n, sliding_windows=tuple(shape.sliding_windows[:n]))


def search(peak: Callable[[int], float], budget: float, *, guess: int = 32768, coarse: int = COARSE_STEP,
           fine: int = FINE_STEP, limit: int = 1 << 24, growth: float = 2.0, interpolate: bool = False,
           progress: Callable[[str], None] | None = None) -> Search:
    """The largest multiple of ``fine`` tokens whose ``peak(seq)`` is ≤ ``budget`` bytes (``peak`` nondecreasing
    in seq; at most ``limit`` tokens). From ``guess`` the bracket grows (or shrinks) by ``growth`` a probe on
    multiples of ``coarse``, then bisection narrows it on multiples of ``coarse`` and then of ``fine``.

    ``interpolate``: the split point is where the straight line through the bracket's two peaks meets the budget
    (regula falsi, safeguarded: a split that does not halve the bracket is followed by a midpoint), the bracket
    grows to where the last two probes' line meets it, and there is no coarse stage. For a peak affine in seq this
    takes about 4 probes in all. ``progress`` is told each probe's line as it is done."""
    assert coarse % fine == 0 and fine >= 1
    probes: list[tuple[int, float, bool]] = []
    val: dict[int, float] = {}

    def fits(seq: int) -> bool:
        if seq not in val:
            val[seq] = float(peak(seq))
            probes.append((seq, val[seq], val[seq] <= budget))
            if progress is not None:
                progress(_probe_line(seq, val[seq], val[seq] <= budget))
        return val[seq] <= budget

    def meets(a: int, b: int) -> float | None:
        """Where the line through the peaks at a and b meets the budget."""
        if a == b or val[a] == val[b]:
            return None
        return a + (budget - val[a]) * (b - a) / (val[b] - val[a])

    x = max(coarse, guess // coarse * coarse)
    last = x
    if fits(x):
        lo, hi = x, None
        while hi is None:
            nxt = int(x * growth) // coarse * coarse
            at = meets(last, x) if interpolate and last != x else None
            if at is not None:  # one grid step past the line's answer (at most 4x): the bracket closes at once
                nxt = min(4 * x, int(at) // coarse * coarse + coarse)
            last, x = x, max(x + coarse, nxt)
            if x > limit:
                hi = limit // coarse * coarse + coarse
            elif fits(x):
                lo = x
            else:
                hi = x
    else:
        lo, hi = 0, x
        while lo == 0 and x > coarse:
            nxt = int(x / growth) // coarse * coarse
            at = meets(last, x) if interpolate and last != x else None
            if at is not None:
                nxt = max(x // 4, int(at) // coarse * coarse)
            last, x = x, max(coarse, min(x - coarse, nxt))
            if fits(x):
                lo = x
            else:
                hi = x
    if not interpolate:
        lo, hi = _bisect(fits, lo, hi, coarse)
    lo, _ = _bisect(fits, lo, hi, fine, meets if interpolate else None)
    return Search(lo, sorted(probes), coarse, fine, interpolate)


def _bisect(fits: Callable[[int], bool], lo: int, hi: int, step: int,
            meets: Callable[[int, int], float | None] | None = None) -> tuple[int, int]:
    """(lo, hi) multiples of ``step`` with ``fits(lo)`` (or lo = 0) and not ``fits(hi)``, hi - lo = step; the split
    at ``meets(lo, hi)`` when given (and lo > 0), else at the midpoint."""
    lo = lo // step * step
    hi = -(-hi // step) * step
    halve = meets is None
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        at = None if halve or lo == 0 else meets(lo, hi)
        if at is not None:
            mid = min(hi - step, max(lo + step, int(at) // step * step))
        width = hi - lo
        if fits(mid):
            lo = mid
        else:
            hi = mid
        halve = meets is None or (not halve and 2 * (hi - lo) > width)
    return lo, hi


def analytic_peak(shape: Any, settings: dict[str, Any]) -> Callable[[int], float]:
    """seq → the analytic plan's per-device total (`memory_plan` with ``settings``, ``seq`` replaced)."""
    from jqlora.planning.memory import memory_plan

    return lambda seq: memory_plan(shape, **{**settings, "seq": seq}).total


@dataclasses.dataclass
class CompiledProbe:
    """seq → the compiled step's per-device peak, extrapolated from `PROBE_LAYERS` scanned layers to the model's
    depth. ``run`` is the run config (`jqlora.config.Config`) whose ``data.max_length`` each probe replaces;
    ``axes`` the mesh (data, fsdp, tensor), all 1 for one device."""

    shape: Any
    run: Any
    gpu: str
    remat: str
    axes: tuple[int, int, int] = (1, 1, 1)
    layers: tuple[int, int] = PROBE_LAYERS
    log: Callable[[str], None] | None = None  # told each probe's two compiled peaks
    compiles: dict[tuple[int, int], tuple[int, dict[str, int]]] = dataclasses.field(default_factory=dict)

    def compile_peak(self, seq: int, n_layers: int) -> tuple[int, dict[str, int]]:
        """The compiled peak and memory figures (with ``host_temp``, the host memory it plans) at ``seq`` tokens of
        a model of ``n_layers`` layers (once per (seq, n_layers))."""
        if (seq, n_layers) not in self.compiles:
            self.compiles[(seq, n_layers)] = self._compile(seq, n_layers)
        return self.compiles[(seq, n_layers)]

    def _compile(self, seq: int, n_layers: int) -> tuple[int, dict[str, int]]:
        from jqlora.planning import aot

        run = dataclasses.replace(self.run, data=dataclasses.replace(self.run.data, max_length=seq))
        shape = with_layers(self.shape, n_layers)
        if self.axes == (1, 1, 1):
            c = aot.compile_step(shape, run, self.gpu, remat=self.remat)
        else:
            data, fsdp, tensor = self.axes
            c = aot.compile_step_mesh(shape, run, self.gpu, data=data, fsdp=fsdp, tensor=tensor, remat=self.remat)
        host = int(c.compiled.memory_analysis().host_temp_size_in_bytes)
        return c.peak_bytes, {**c.memory, "host_temp": host}

    def __call__(self, seq: int) -> float:
        L, (L1, L2) = self.shape.num_hidden_layers, self.layers
        if L <= L2:
            return float(self.compile_peak(seq, L)[0])
        (p1, m1), (p2, m2) = self.compile_peak(seq, L1), self.compile_peak(seq, L2)
        if self.log is not None:
            self.log(f"  seq {seq:>9}: {L1} layers {p1 / 1e9:.2f} GB, {L2} layers {p2 / 1e9:.2f} GB")
        if not self.run.train.offload_residual:
            return p1 + (L - L1) * (p2 - p1) / (L2 - L1)
        # the residual offloaded, nothing on the device is stacked over the layers but the arguments (and the
        # outputs they alias): those are extrapolated, the temporaries are one layer's (the larger of the two)
        fixed1, fixed2 = p1 - m1["temp"], p2 - m2["temp"]
        return fixed1 + (L - L1) * (fixed2 - fixed1) / (L2 - L1) + max(m1["temp"], m2["temp"])



@dataclasses.dataclass
class FullDepthCheck:
    seq: int
    extrapolated: float
    compiled: int
    memory: dict[str, int]

    def line(self) -> str:
        m = self.memory
        return (f"full-depth check at {self.seq} tokens: compiled peak {self.compiled / 1e9:.2f} GB (arguments "
                f"{m['argument'] / 1e9:.2f} + temporaries {m['temp'] / 1e9:.2f} + outputs {m['output'] / 1e9:.2f} - "
                f"aliased {m['alias'] / 1e9:.2f}; host {m['host_temp'] / 1e9:.2f}); extrapolated "
                f"{self.extrapolated / 1e9:.2f} GB "
                f"({(self.extrapolated - self.compiled) / self.compiled:+.2%})")


def full_depth_check(probe: CompiledProbe, seq: int) -> FullDepthCheck:
    """One compile of the whole depth at ``seq`` beside the extrapolation."""
    peak, memory = probe.compile_peak(seq, probe.shape.num_hidden_layers)
    return FullDepthCheck(seq, probe(seq), peak, memory)


def _probe_line(seq: int, peak: float, fits: bool) -> str:
    return f"  seq {seq:>9}: {peak / 1e9:8.2f} GB  {'fits' if fits else 'over'}"


def report_lines(found: Search, budget: float, usable: float, what: str) -> list[str]:
    """What `plan --max-seq` prints: the method, the probes, the boundary and the answer line."""
    how = (f"bracketed on multiples of {found.coarse}, then bisected on multiples of {found.fine}, split where the "
           "line through the bracket's peaks meets the budget" if found.interpolated else
           f"found on multiples of {found.coarse} first, then of {found.fine}")
    lines = [f"max seq search over {what}: the longest multiple of {found.fine} tokens whose peak is within "
             f"{usable / 1e9:.2f} GB ({usable / budget:.0%} of {budget / 1e9:.1f} GB), {how}"]
    lines += [_probe_line(s, p, ok) for s, p, ok in found.probes]
    over = found.over()
    if over is not None:
        lines.append(f"boundary: {found.best} tokens fit, {over[0]} tokens (+{over[0] - found.best}) need "
                     f"{over[1] / 1e9:.2f} GB")
    lines.append(f"max seq: {found.best} tokens")
    return lines


def longest(shape: Any, name: str, settings: dict[str, Any], budget: float, *, chunk: int, offload: bool,
            run: Any = None, gpu: str | None = None) -> tuple[bool, list[str]]:
    """`plan --max-seq`: (found one that fits, the lines to print). ``settings`` are the plan's (`memory_plan`'s
    keywords), ``chunk`` / ``offload`` the long-context savings; with ``run`` (the run config whose step is
    compiled) the compiled search for ``gpu``, first guessed by the analytic one."""
    from jqlora.planning.memory import HEADROOM
    from jqlora.planning.remat import COMPILED_HEADROOM

    savings = f"train.mlp_chunk={chunk} train.offload_residual={str(offload).lower()}"
    remat = settings["remat"]
    usable = (COMPILED_HEADROOM if run is not None else HEADROOM) * budget
    guess = search(analytic_peak(shape, {**settings, "name": name, "mlp_chunk": chunk, "offload_residual": offload,
                                         "attention": "cudnn"}), usable, fine=1)
    if run is None:
        what = (f"the analytic plan ({name}, remat={remat}, batch {settings['batch']}/device, {savings}, cuDNN flash "
                "attention)")
        return guess.best > 0, report_lines(guess, budget, usable, what)
    axes = tuple(int(settings[a]) for a in ("data", "fsdp", "tensor"))
    run = dataclasses.replace(run, train=dataclasses.replace(
        run.train, mlp_chunk=chunk, offload_residual=offload, batch_size=run.train.batch_size * axes[0] * axes[1]))
    def log(line: str) -> None:
        print(f"compiled probe:{line[1:]}", file=sys.stderr, flush=True)

    probe = CompiledProbe(shape, run, gpu, remat, axes, log=log)
    # the grid in whole MLP chunks: a length that is not pads its last chunk, and the padded copy of the MLP input
    # makes the compiled peak jump (Llama-3-70B, 2 layers: 39.71 GB at 203,776 tokens, 36.98 GB at 204,800)
    fine = math.lcm(COMPILED_FINE_STEP, chunk or 1)
    found = search(probe, usable, guess=max(guess.best, COARSE_STEP), growth=1.125, fine=fine,
                   coarse=math.lcm(COARSE_STEP, fine), interpolate=True, progress=log)
    check = full_depth_check(probe, found.best) if found.best else None
    mesh = "" if axes == (1, 1, 1) else f" on data {axes[0]} x fsdp {axes[1]} x tensor {axes[2]}, per device"
    what = (f"deviceless compiles for {gpu}{mesh} ({name}, remat={remat}, {savings}, cuDNN attention; the peak of "
            f"{probe.layers[0]} and {probe.layers[1]} scanned layers extrapolated to {shape.num_hidden_layers}, "
            f"affine in the layer count under scan; first guess {guess.best} tokens from the analytic plan)")
    lines = report_lines(found, budget, usable, what)
    ok = found.best > 0
    if check is not None and check.compiled > usable:  # shift the extrapolation by what the full depth showed
        lines.insert(-1, check.line())
        best = corrected(found, check.compiled - check.extrapolated, usable)
        lines.insert(-1, f"over the budget at full depth: the extrapolation shifted by the full depth's offset "
                     f"({(check.compiled - check.extrapolated) / 1e9:+.2f} GB) on the line through the two probes "
                     f"below gives {best} tokens")
        found = dataclasses.replace(found, best=best)
        lines[-1] = f"max seq: {best} tokens"
        check = full_depth_check(probe, best) if best else None
    if check is not None:
        lines.insert(-1, check.line())
        if check.compiled > usable:
            ok = False
            lines.insert(-1, "the full-depth compile does NOT fit at that length: the extrapolation is off here")
    return ok, lines


def corrected(found: Search, offset: float, usable: float) -> int:
    """The longest multiple of ``found.fine`` at most ``found.best`` whose peak, on the line through the two probes
    around it and shifted by ``offset`` bytes, is within ``usable`` (0 when none)."""
    below = [(s, p) for s, p, _ in found.probes if s <= found.best]
    if len(below) < 2:
        return 0
    (s0, p0), (s1, p1) = below[-2], below[-1]
    per_token = (p1 - p0) / (s1 - s0)
    if per_token <= 0:
        return s0 if p0 + offset <= usable else 0
    best = int((s1 - (p1 + offset - usable) / per_token) // found.fine * found.fine)
    return max(0, min(best, found.best))
