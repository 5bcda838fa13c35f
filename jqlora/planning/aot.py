"""Ahead-of-time compile of the real train step for a named NVIDIA GPU, on any machine (no GPU needed).

`compile_step(shape, cfg, gpu="h100-sxm")` builds the step `jqlora.train` jits — `step.make_train_step` over
`step.SplitModel.of(model)` with the run's own optimizer; for ``train.objective`` dpo / orpo / simpo / kto
`preference_step.make_preference_train_step` on ``train.batch_size`` pairs (2 rows each: the policy's forward and
backward, and for dpo / kto the reference's forward under `stop_gradient` with its own adapter tree, as
`jqlora.run.preference` jits it) — for an abstract model (`nnx.eval_shape`, no weights),
and compiles it for the GPU that a target description names (`jqlora/planning/gpu_targets/<gpu>.txtpb`, XLA's
GpuTargetConfig text format written from the vendor's published figures) through the CUDA PJRT plugin
(`jax.experimental.topologies.get_topology_desc`). The compiler's `memory_analysis()` then says what the step
needs on that device: arguments + temporaries + outputs − aliased (donated) outputs. ``gpu=None`` compiles for
the machine's own first device instead (a real GPU where there is one).

A deviceless compile needs Python ≥ 3.12, ``jax[cuda13]`` and ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` (set here when
unset). There is no autotuning without a device, so GEMM tiles are fallbacks: buffer sizes and the fusion
structure are the compiler's own, kernel speed is not (`tools/gpu_estimate.py` turns the HLO into a roofline).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
from importlib import resources
from typing import Any

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Gpu:
    """Published figures of one GPU (the target file holds the compiler's; these feed the roofline)."""

    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    bf16_flops: float  # dense tensor-core peak
    host_link_bytes_per_s: float  # to or from host memory, one direction (the target file's pcie_bandwidth)
    launch_s: float = 4e-6  # per kernel launch (CUDA graphs amortize part of it)


GPUS: dict[str, Gpu] = {
    "h100-sxm": Gpu("NVIDIA H100 SXM 80GB", 80 * 2**30, 3.35e12, 989e12, 64e9),  # PCIe Gen5 x16
    "h200": Gpu("NVIDIA H200 141GB", 141_000_000_000, 4.8e12, 989e12, 64e9),  # PCIe Gen5 x16
    "a100-80gb": Gpu("NVIDIA A100 SXM 80GB", 80 * 2**30, 2.039e12, 312e12, 32e9),  # PCIe Gen4 x16
    "l4": Gpu("NVIDIA L4 24GB", 24 * 2**30, 300e9, 121e12, 32e9),  # PCIe Gen4 x16
    "gh200": Gpu("NVIDIA GH200 96GB", 96 * 2**30, 4.0e12, 989e12, 450e9),  # NVLink-C2C to the Grace CPU's memory
}


class AotError(ValueError):
    """A deviceless compile that cannot be done here (unknown GPU, no CUDA plugin)."""


def target_config(gpu: str) -> str:
    """The text of ``jqlora/planning/gpu_targets/<gpu>.txtpb``."""
    if gpu not in GPUS:
        raise AotError(f"unknown GPU {gpu!r}: expected one of {', '.join(GPUS)}")
    return resources.files(__package__).joinpath("gpu_targets", f"{gpu}.txtpb").read_text()


@functools.cache
def gpu_device(gpu: str):
    """A (deviceless) device of the named GPU, from the CUDA plugin and its target description."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc("jqlora", "cuda", target_config=target_config(gpu), topology="1x1x1")
    except AotError:
        raise
    except Exception as e:  # noqa: BLE001 - the plugin's own error, shortened
        raise AotError(f"cannot build a deviceless {gpu} target here ({str(e).splitlines()[0][:200]}); it needs "
                       f"Python >= 3.12 with jax[cuda13]") from None
    return topo.devices[0]


def compute_capability(gpu: str) -> tuple[int, int]:
    """(major, minor) from the target description."""
    text = target_config(gpu)
    cc = re.search(r"cuda_compute_capability\s*\{\s*major:\s*(\d+)\s*minor:\s*(\d+)", text)
    assert cc, f"{gpu}.txtpb has no cuda_compute_capability"
    return int(cc.group(1)), int(cc.group(2))


@contextlib.contextmanager
def _traced_for(gpu: str | None):
    """jax's cuDNN attention checks the compute capability of the *local* GPU while tracing; a deviceless trace
    answers those checks from the target description instead (nothing else changes)."""
    if gpu is None:
        yield
        return
    import jax._src.cudnn.fused_attention_stablehlo as fa

    cc = compute_capability(gpu)

    def parse(capability: str) -> tuple[int, ...]:
        return tuple(int(x) for x in capability.split("."))

    saved = fa.check_compute_capability, fa.is_cuda_compute_capability_equal
    fa.check_compute_capability = lambda c: cc >= parse(c)
    fa.is_cuda_compute_capability_equal = lambda c: cc == parse(c)
    try:
        yield
    finally:
        fa.check_compute_capability, fa.is_cuda_compute_capability_equal = saved


@dataclasses.dataclass
class CompiledStep:
    compiled: Any
    gpu: str | None
    memory: dict[str, int]  # argument / output / alias / temp / generated_code bytes
    _estimates: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def peak_bytes(self) -> int:
        """Arguments + temporaries + outputs − aliased outputs (donated buffers are counted once)."""
        m = self.memory
        return m["argument"] + m["temp"] + m["output"] - m["alias"]

    def hlo(self) -> str:
        return self.compiled.as_text()

    def estimate(self, figures, **kw):
        """`estimate.estimate` of this step's HLO, parsed once per (GPU figures, keywords): `remat=auto` ranks the same
        compiled steps against several budgets."""
        from jqlora.planning.estimate import estimate

        key = (repr(figures), tuple(sorted(kw.items())))
        if key not in self._estimates:
            self._estimates[key] = estimate(self.hlo(), figures, **kw)
        return self._estimates[key]


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp",
                                                                 "generated_code")}


def abstract_model(shape, cfg, *, remat: str, attention: str = "cudnn", scan_layers: bool = True):
    """The run's model as shapes only (`nnx.eval_shape`): no weights are drawn or loaded."""
    from jqlora.lora import LoraConfig, QuantSpec, compute_dtype
    from jqlora.models import LlamaForCausalLM

    qspec = QuantSpec(cfg.model.quant, cfg.model.double_quant and cfg.model.quant != "none", cfg.model.block_size,
                      cfg.model.quantize_experts)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(
        shape, LoraConfig.from_config(cfg.lora), qspec, compute_dtype(cfg.model.dtype), rngs=nnx.Rngs(cfg.train.seed),
        remat=remat, scan_layers=scan_layers, attention=attention,
        memory=getattr(cfg.train, "memory", "default")))
    model.mlp_chunk = getattr(cfg.train, "mlp_chunk", 0)  # the long-context savings (as jqlora.run sets them)
    model.offload_residual = getattr(cfg.train, "residual_offloaded", False)
    return model


def step_arguments(split, tx, *, batch: int, seq: int, sharding) -> tuple:
    """Abstract (lora, opt_state, frozen, batch, rng, grad_scale) of the jitted step, placed by ``sharding``."""
    from jqlora.training.step import STEP_KEYS

    def place(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    lora = jax.tree.map(place, split.lora)
    opt = jax.tree.map(place, jax.eval_shape(tx.init, split.lora))
    frozen = jax.tree.map(place, split.frozen)
    dtypes = {"loss_mask": jnp.float32}
    batch_args = {k: jax.ShapeDtypeStruct((batch, seq), dtypes.get(k, jnp.int32), sharding=sharding)
                  for k in STEP_KEYS}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding)
    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding)
    return lora, opt, frozen, batch_args, rng, scale


def preference_arguments(split, tx, obj, *, pairs: int, seq: int, sharding) -> tuple:
    """Abstract (lora, opt_state, ref_lora, frozen, batch, rng, grad_scale) of the jitted preference step: ``pairs``
    pairs (or KTO examples with their mismatched rows) of 2 rows of ``seq`` tokens, as `jqlora.data.pairs` collates."""
    from jqlora.training.preference_step import step_keys

    lora, opt, frozen, _, rng, scale = step_arguments(split, tx, batch=1, seq=1, sharding=sharding)
    per_pair = ("valid", "label")  # one float per pair (KTO's label); every other key int32 [pairs, 2, seq]
    batch_args = {k: jax.ShapeDtypeStruct((pairs,) if k in per_pair else (pairs, 2, seq),
                                          jnp.float32 if k in per_pair else jnp.int32, sharding=sharding)
                  for k in step_keys(obj)}
    return lora, opt, lora, frozen, batch_args, rng, scale


def compile_step(shape, cfg, gpu: str | None = "h100-sxm", *, remat: str | None = None, batch: int | None = None,
                 seq: int | None = None, attention: str | None = None, ce_chunk: int | None = None,
                 scan_layers: bool = True) -> CompiledStep:
    """Compile the run's train step for ``gpu`` (a name in `GPUS`; None: this machine's first device).

    ``shape`` is the model's `ModelConfig`, ``cfg`` the run's `jqlora.config.Config`; ``remat`` / ``batch`` /
    ``seq`` override ``train.remat`` / ``train.batch_size`` / ``data.max_length``. Attention is cuDNN's on a GPU.
    A preference ``train.objective`` compiles the preference step, ``batch`` counting pairs.
    """
    from jax.sharding import SingleDeviceSharding

    from jqlora.lora import SplitModel
    from jqlora.training import optim
    from jqlora.training.step import CE_CHUNK, make_train_step

    remat = remat or cfg.train.remat
    if remat == "auto":
        raise AotError("compile_step needs a concrete remat policy, not auto (see plan.resolve_remat)")
    device = gpu_device(gpu) if gpu is not None else jax.devices()[0]
    on_gpu = gpu is not None or device.platform == "gpu"
    attention = attention or ("cudnn" if on_gpu else "xla")
    model = abstract_model(shape, cfg, remat=remat, attention=attention, scan_layers=scan_layers)
    split = SplitModel.of(model)
    tx, _ = optim.make_optimizer(cfg.train, max(1, cfg.train.max_steps or 1), cfg.lora.plus_ratio)
    rows, seq, sharding = batch or cfg.train.batch_size, seq or cfg.data.max_length, SingleDeviceSharding(device)
    objective = getattr(cfg.train, "objective", "sft")
    if objective == "sft":
        args = step_arguments(split, tx, batch=rows, seq=seq, sharding=sharding)
        train_step = make_train_step(split, tx, ce_chunk or CE_CHUNK, packed=cfg.data.packing,
                                     aux_coef=cfg.train.router_aux_loss_coef)  # the step jqlora.train jits
    else:
        from jqlora.training.preference import Objective
        from jqlora.training.preference_step import make_preference_train_step

        obj = Objective.from_config(objective, cfg.preference)
        args = preference_arguments(split, tx, obj, pairs=rows, seq=seq, sharding=sharding)
        train_step = make_preference_train_step(split, tx, obj, ce_chunk or CE_CHUNK)  # jqlora.run.preference's
    with _traced_for(gpu):
        traced = train_step.trace(*args)
    compiled = traced.lower().compile()
    return CompiledStep(compiled, gpu, _memory(compiled))


def compiled(shape, cfg, gpu: str | None, remat: str, attention: str | None = None) -> CompiledStep:
    """`compile_step` under ``remat``, compiled once per (shape, run config, GPU, policy) in this process."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, remat=remat))
    return _compiled(shape, cfg, gpu, attention)


@functools.lru_cache(maxsize=32)
def _compiled(shape, cfg, gpu: str | None, attention: str | None) -> CompiledStep:
    return compile_step(shape, cfg, gpu, attention=attention)


def compiled_peak(shape, cfg, gpu: str | None, remat: str) -> dict[str, int]:
    """The memory figures (and ``peak``) of the run's step under ``remat``."""
    c = compiled(shape, cfg, gpu, remat)
    return {**c.memory, "peak": c.peak_bytes}


# ---------------------------------------------------------------------------------------------------------------
# A mesh of several GPUs of one kind, deviceless


@functools.cache
def gpu_devices(gpu: str, n: int) -> tuple:
    """``n`` (deviceless) devices of the named GPU in one host, from the CUDA plugin and the target description."""
    if n == 1:
        return (gpu_device(gpu),)
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc("jqlora", "cuda", target_config=target_config(gpu), topology=f"1x1x{n}")
    except AotError:
        raise
    except Exception as e:  # noqa: BLE001 - the plugin's own error, shortened
        raise AotError(f"cannot build a deviceless {n}x {gpu} topology here ({str(e).splitlines()[0][:200]}); it "
                       f"needs Python >= 3.12 with jax[cuda13]") from None
    return tuple(topo.devices)


def compile_step_mesh(shape, cfg, gpu: str, *, data: int = 1, fsdp: int = 1, tensor: int = 1,
                      remat: str | None = None, attention: str = "cudnn", seq: int = 1) -> CompiledStep:
    """Compile the run's train step (``train.objective=sft``) for a data × fsdp × seq × tensor mesh of ``gpu``s,
    deviceless, with the partition rules `jqlora.run` places the model, the optimizer state and the batch by
    (`jqlora.parallel`). ``cfg.train.batch_size`` is the global micro-batch (rows split over data × fsdp; with
    ``seq`` > 1 every row's tokens over seq, `jqlora.models.sequence`). The memory figures are per device (the
    compiler's SPMD program is one device's)."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jqlora import parallel
    from jqlora.lora import SplitModel
    from jqlora.training import optim
    from jqlora.training.step import CE_CHUNK, STEP_KEYS, make_train_step

    if getattr(cfg.train, "objective", "sft") != "sft":
        raise AotError(f"a mesh compile covers train.objective=sft, not {cfg.train.objective}")
    remat = remat or cfg.train.remat
    if remat == "auto":
        raise AotError("compile_step_mesh needs a concrete remat policy, not auto")
    devices = gpu_devices(gpu, data * fsdp * seq * tensor)
    mesh = Mesh(np.array(devices).reshape(data, fsdp, seq, tensor), parallel.AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(parallel.AXES))
    rows, seq = cfg.train.batch_size, cfg.data.max_length
    if rows % (data * fsdp):
        raise AotError(f"train.batch_size={rows} is not divisible by mesh data × fsdp = {data} × {fsdp}")
    model = abstract_model(shape, cfg, remat=remat, attention=attention)
    if seq > 1:
        try:
            parallel.check_model_fits(mesh, shape, rows, seq_len=cfg.data.max_length)
        except ValueError as e:
            raise AotError(str(e)) from None
        model.seq_mesh = mesh
    split = SplitModel.of(model)
    tx, _ = optim.make_optimizer(cfg.train, max(1, cfg.train.max_steps or 1), cfg.lora.plus_ratio)

    def placed(tree):
        shardings = parallel.named_shardings(tree, mesh)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    lora, frozen = placed(split.lora), placed(split.frozen)
    by_path = {tuple(parallel.rules._key_name(k) for k in p): x
               for p, x in jax.tree_util.tree_leaves_with_path(lora)}
    replicated = NamedSharding(mesh, PartitionSpec())

    def place_opt(p, x):  # as parallel.shard_optimizer_state: a LoRA parameter's sharding where path and shape match
        keys = tuple(parallel.rules._key_name(k) for k in p if isinstance(k, jax.tree_util.DictKey))
        match = by_path.get(keys)
        sharding = match.sharding if match is not None and match.shape == x.shape else replicated
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    opt = jax.tree_util.tree_map_with_path(place_opt, jax.eval_shape(tx.init, split.lora))
    rows_sharding = parallel.batch_sharding(mesh)
    dtypes = {"loss_mask": jnp.float32}
    batch_args = {k: jax.ShapeDtypeStruct((rows, seq), dtypes.get(k, jnp.int32), sharding=rows_sharding)
                  for k in STEP_KEYS}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    train_step = make_train_step(split, tx, CE_CHUNK, packed=cfg.data.packing,
                                 aux_coef=cfg.train.router_aux_loss_coef)
    with _traced_for(gpu):
        traced = train_step.trace(lora, opt, frozen, batch_args, rng, scale)
    compiled_step = traced.lower().compile()
    return CompiledStep(compiled_step, gpu, _memory(compiled_step))


@functools.lru_cache(maxsize=16)
def compiled_mesh(shape, cfg, gpu: str, remat: str, data: int, fsdp: int, tensor: int, seq: int = 1) -> CompiledStep:
    """`compile_step_mesh`, once per (shape, run config, GPU, policy, mesh) in this process."""
    return compile_step_mesh(shape, cfg, gpu, data=data, fsdp=fsdp, tensor=tensor, remat=remat, seq=seq)
