"""Devices, mesh and shardings (DESIGN.md invariant 4: shardings, not pmap).

One 1-D mesh over all devices with axis ``data``. Batches are sharded along
their first axis, the state is replicated, and ``jax.jit`` inserts the
gradient all-reduce. The same code runs on one CPU, several GPUs, or a
multi-host TPU slice after :func:`maybe_initialize_distributed`.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(enabled: bool | str = "auto") -> None:
  """Calls ``jax.distributed.initialize()`` when asked to or when the environment says so.

  ``"auto"`` initializes when a cluster is detectable from the environment
  (SLURM, a TPU pod slice with several workers, or the ``JAX_COORDINATOR_ADDRESS``
  variable); ``True`` always; ``False`` never.
  """
  if enabled is False or enabled == "false":
    return
  env = os.environ
  detected = ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
              or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if enabled is True or enabled == "true" or detected:
    jax.distributed.initialize()


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over all (or the first ``num_devices``) devices, axis ``data``."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices, only {len(devices)} present.")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(
        f"{what} = {batch_size} is not divisible by the {n} devices of the mesh; "
        f"choose a multiple of {n} (each device takes an equal slice of the batch).")


def shard_batch(x, mesh: Mesh):
  """Places an array sharded along its first axis when it divides, else replicated."""
  x = np.asarray(x)
  if x.shape[0] % mesh.devices.size == 0:
    return jax.device_put(x, batch_sharding(mesh, x.ndim))
  return jax.device_put(x, replicated(mesh))


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))
