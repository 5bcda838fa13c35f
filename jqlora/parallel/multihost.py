"""Multi-process runs: `jax.distributed` started from the environment (an explicit coordinator, SLURM or Open MPI),
which process writes files (`is_primary`), and a flag all processes agree on (`any_process`)."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

log = logging.getLogger("jqlora.parallel")




_DISTRIBUTED = False


class DistributedError(ValueError):
    """The environment describes a multi-process run that cannot start (a bad variable, no coordinator)."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def distributed_env() -> dict[str, Any] | None:
    """What the environment says about a multi-process run, or None for a single process.

    ``JAX_COORDINATOR_ADDRESS`` (host:port) with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (and optionally
    ``JAX_LOCAL_DEVICE_IDS``, comma-separated) are passed on explicitly; otherwise a SLURM (``SLURM_NTASKS`` > 1)
    or Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1) launch is left to JAX's own cluster detection.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        kwargs: dict[str, Any] = {"coordinator_address": address}
        n, pid = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
        if n is not None:
            kwargs["num_processes"] = n
        if pid is not None:
            kwargs["process_id"] = pid
        ids = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        if ids:
            kwargs["local_device_ids"] = [int(i) for i in ids.split(",") if i.strip()]
        return kwargs
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        n = _env_int(var)
        if n is not None and n > 1:
            return {}
    return None


def initialize_distributed() -> bool:
    """Call `jax.distributed.initialize` when the environment describes a multi-process run (see
    `distributed_env`); returns whether this process is part of one. Safe to call twice; call it before any
    other JAX call (it must run before the backends start)."""
    global _DISTRIBUTED
    if _DISTRIBUTED:
        return True
    kwargs = distributed_env()
    if kwargs is None:
        return False
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:  # no coordinator, a wrong process id, ...: the environment's mistake
        where = kwargs.get("coordinator_address", "the cluster environment")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"jax.distributed.initialize ({where}) failed: {first}") from None
    _DISTRIBUTED = True
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """Whether this is process 0, the one that writes metrics, plots and exports (always, in a one-process run)."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (all processes must call it; a plain bool on one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))
