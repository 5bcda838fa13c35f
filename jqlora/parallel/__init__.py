"""Many devices, one run: the mesh (`mesh`), the partition rules for every variable (`rules`), the batch on the mesh
(`batches`) and the multi-process start (`multihost`).

Processes. With `jax.distributed` (`initialize_distributed`, from the environment) the mesh spans the devices of
every process. Each process builds only the batch rows its own devices hold (`assemble_batch`), places the frozen
weights it loaded by the same rules (`jax.device_put` keeps just the local shards), and gathers sharded arrays to
the host only when asked (`to_host`, which every process must call); `is_primary` picks the process that writes
files and `any_process` lets all of them agree on a flag (a signal one of them received).
"""

from jqlora.parallel.batches import (RowIds, assemble_batch, batch_sharding, local_row_ranges, shard_batch,
                                     token_counts)
from jqlora.parallel.mesh import (AXES, BATCH_AXES, check_model_fits, make_mesh, mesh_from_config, mesh_size,
                                  resolve_mesh_shape)
from jqlora.parallel.multihost import DistributedError, any_process, distributed_env, initialize_distributed, is_primary
from jqlora.parallel.rules import (named_shardings, partition_specs, per_device_bytes, replicated, shard_model_state,
                                   shard_optimizer_state, shard_tree, to_host)

__all__ = [
    "AXES", "BATCH_AXES", "DistributedError", "RowIds", "any_process", "assemble_batch", "batch_sharding",
    "check_model_fits", "distributed_env", "initialize_distributed", "is_primary", "local_row_ranges", "make_mesh",
    "mesh_from_config", "mesh_size", "named_shardings", "partition_specs", "per_device_bytes", "replicated",
    "resolve_mesh_shape", "shard_batch", "shard_model_state", "shard_optimizer_state", "shard_tree", "to_host",
    "token_counts",
]
