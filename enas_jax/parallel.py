"""Devices, mesh and shardings.

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


def maybe_initialize_distributed(enabled: bool | str = "auto") -> bool:
  """Calls ``jax.distributed.initialize()`` when asked to or when the environment says so.

  ``"auto"`` initializes when a cluster is detectable from the environment:
  SLURM with several tasks, a TPU pod slice with several workers, or
  ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``:
  e.g. several processes on one machine, or hosts without a cluster manager);
  ``True`` always; ``False`` never. On CPU the cross-process collectives use
  gloo. Returns whether this process is part of a multi-process run.
  """
  if isinstance(enabled, str):
    enabled = {"auto": "auto", "true": True, "false": False}.get(enabled.strip().lower(), None)
    if enabled is None:
      raise ValueError("config.distributed must be 'auto', True or False.")
  if enabled is False or _initialized():
    return jax.process_count() > 1
  env = os.environ
  explicit = "JAX_COORDINATOR_ADDRESS" in env
  detected = (explicit or int(env.get("SLURM_NTASKS", "1")) > 1
              or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if not (enabled is True or detected):
    return False
  kwargs = {}
  if explicit:
    kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    for name, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
      if var in env:
        kwargs[name] = int(env[var])
  if env.get("JAX_PLATFORMS", "").startswith("cpu") or "cpu" == env.get("JAX_PLATFORM_NAME"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return jax.process_count() > 1


def _initialized() -> bool:
  try:
    from jax._src import distributed
    return distributed.global_state.client is not None
  except Exception:  # noqa: BLE001 - private API; assume not initialised
    return False


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
  """Places a host array (the same on every process) sharded along its first
  axis when it divides, else replicated.

  With several processes each one contributes only the rows of its own
  devices, through ``jax.make_array_from_process_local_data``: the result is one
  global array that jitted code indexes as a whole."""
  x = np.asarray(x)
  if x.shape[0] % mesh.devices.size:
    return replicate(x, mesh)
  sharding = batch_sharding(mesh, x.ndim)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  rows = sorted({i for d, idx in sharding.addressable_devices_indices_map(x.shape).items()
                 for i in range(*idx[0].indices(x.shape[0]))})
  lo, hi = rows[0], rows[-1] + 1  # a process's devices hold contiguous rows of a 1-D mesh
  return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))
