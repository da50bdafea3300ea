"""The implementation set per backend, decided in one place.

What runs fastest differs by backend. On XLA:CPU, hand-written gradients
(convolutions, depthwise convolutions as shifted slices, batch norm, stride-1
pools, the recomputing switch) pay several times over. On GPU and TPU, XLA's own
convolutions, pools, autodiff batch norm and ``jax.checkpoint`` are the
baseline, and activations in bfloat16 halve the bytes that bound these
small-channel networks.

Every ``auto`` in a config (``child.kernels``, ``child.compute_dtype``,
``child.op_select``) is resolved here, for the *target* platform: the running
backend by default, or the one a program is compiled for ahead of time (a TPU
topology compiled on a CPU host). Model code reads the resolved values and
never asks which backend it runs on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

PLATFORMS = ("cpu", "gpu", "tpu")
KERNEL_SETS = ("auto", "cpu", "xla")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
OP_SELECT_MODES = ("auto", "switch", "mask")

# The defaults per platform. GPU: bfloat16, as on TPU. No GPU run has measured
# it yet; the argument is that these children are small-channel networks bound
# by memory traffic, and every GPU this tool targets (A100, H100, H200) has
# bf16 tensor cores, so halving the activation bytes is the lever that matters.
_DEFAULT_KERNELS = {"cpu": "cpu", "gpu": "xla", "tpu": "xla"}
_DEFAULT_DTYPE = {"cpu": "float32", "gpu": "bfloat16", "tpu": "bfloat16"}


def platform_name(platform: str | None = None) -> str:
  """``cpu``, ``gpu`` or ``tpu``: ``platform`` normalised (``cuda``/``rocm`` are
  ``gpu``), or the running backend's when None."""
  p = (platform or jax.default_backend()).lower()
  if p in ("cuda", "rocm"):
    p = "gpu"
  if p not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; expected one of {PLATFORMS}.")
  return p


def _check(name: str, value: str, allowed: tuple) -> str:
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
  return value


def resolve_kernels(kernels: str = "auto", platform: str | None = None) -> str:
  """``cpu`` (the hand-written kernels) or ``xla`` (XLA's own ops)."""
  _check("child.kernels", kernels, KERNEL_SETS)
  return _DEFAULT_KERNELS[platform_name(platform)] if kernels == "auto" else kernels


def resolve_compute_dtype(compute_dtype: str = "auto", platform: str | None = None) -> str:
  """``float32`` or ``bfloat16``: the dtype of activations and conv/matmul inputs."""
  _check("child.compute_dtype", compute_dtype, COMPUTE_DTYPES)
  if compute_dtype == "auto":
    return _DEFAULT_DTYPE[platform_name(platform)]
  return compute_dtype


def resolve_op_select(op_select: str = "auto", platform: str | None = None) -> str:
  """``switch`` or ``mask``. ``auto`` is ``switch`` everywhere: on CPU the
  fastest with the recomputing gradient, and on GPU/TPU the only choice that
  does not pay for every op."""
  del platform  # the same on every platform, measured on CPU only so far
  _check("child.op_select", op_select, OP_SELECT_MODES)
  return "switch" if op_select == "auto" else op_select


# child.scan_layers "auto": whether layers/cells of identical shapes run as one
# lax.scan (one compiled body per run). CPU: False. Measured there
# (docs/performance.md): the micro fixed child compiles ~40% faster but steps
# ~20% slower; the search children, whose cells already hold loops and switches,
# compile *slower* and step slower when nested in a scan. TPU: False too: the
# micro search step compiled for v5e took no less time scanned (836 s against
# 665 s unscanned, a loaded host). GPU: not measured; as TPU.
_DEFAULT_SCAN = {"cpu": False, "gpu": False, "tpu": False}


def resolve_scan_layers(scan_layers="auto", platform: str | None = None) -> bool:
  """``child.scan_layers``: True, False, or ``"auto"`` (the platform's default).
  ``"true"``/``"false"`` (any case) are accepted too: the config field is a
  string, so a command-line override arrives as one."""
  if isinstance(scan_layers, str) and scan_layers.lower() in ("auto", "true", "false"):
    v = scan_layers.lower()
    return _DEFAULT_SCAN[platform_name(platform)] if v == "auto" else v == "true"
  if not isinstance(scan_layers, (bool, np.bool_)):
    raise ValueError(f"child.scan_layers must be True, False or 'auto' (e.g. "
                     f"--config.child.scan_layers=true), got {scan_layers!r}.")
  return bool(scan_layers)


def jnp_dtype(name: str):
  """The jnp dtype of a resolved compute dtype name."""
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[_check(
      "compute_dtype", name, COMPUTE_DTYPES[1:])]


@dataclasses.dataclass(frozen=True)
class Implementation:
  """The resolved implementation set of one run."""

  platform: str  # cpu | gpu | tpu: the target, not necessarily the host
  kernels: str  # cpu | xla
  compute_dtype: str  # float32 | bfloat16
  op_select: str  # switch | mask

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def resolve(kernels: str = "auto", compute_dtype: str = "auto", op_select: str = "auto",
            platform: str | None = None) -> Implementation:
  """Resolves every ``auto`` for ``platform`` (the running backend when None)."""
  p = platform_name(platform)
  return Implementation(platform=p, kernels=resolve_kernels(kernels, p),
                        compute_dtype=resolve_compute_dtype(compute_dtype, p),
                        op_select=resolve_op_select(op_select, p))


class ResolvedChild:
  """Mixin for the frozen child-config dataclasses with ``kernels``,
  ``compute_dtype``, ``op_select`` and ``platform`` fields: ``_resolve_impl()``
  (call it in ``__post_init__``) replaces them by their resolved values, and
  ``dtype`` is the jnp compute dtype."""

  def _resolve_impl(self) -> None:
    impl = resolve(self.kernels, self.compute_dtype, self.op_select, self.platform)
    for name, value in impl.as_dict().items():
      object.__setattr__(self, name, value)

  @property
  def dtype(self):
    """The jnp compute dtype of activations and conv/matmul inputs."""
    return jnp_dtype(self.compute_dtype)


def resolve_config(config, platform: str | None = None):
  """A locked copy of ``config`` with ``child.kernels``, ``child.compute_dtype``
  and ``child.op_select`` resolved for ``platform``, plus ``child.platform``
  (the target) so that code built from the config never asks the host. Fields a
  config lacks are left out."""
  config = config.copy_and_resolve_references()
  c = config.child
  impl = resolve(kernels=c.get("kernels", "auto"), compute_dtype=c.get("compute_dtype", "auto"),
                 op_select=c.get("op_select", "auto"), platform=platform)
  with config.unlocked():
    for field in ("kernels", "compute_dtype", "op_select"):
      if field in c:
        c[field] = getattr(impl, field)
    c.platform = impl.platform
  config.lock()
  return config


def describe(config) -> dict:
  """The implementation fields of a (resolved) config, for logs and benchmark rows."""
  c = config.child
  return {k: c.get(k) for k in ("platform", "kernels", "compute_dtype", "op_select") if k in c}


__all__ = ["Implementation", "ResolvedChild", "resolve", "resolve_config", "resolve_kernels",
           "resolve_compute_dtype", "resolve_op_select",
           "resolve_scan_layers", "platform_name", "describe",
           "jnp_dtype", "PLATFORMS", "KERNEL_SETS", "COMPUTE_DTYPES", "OP_SELECT_MODES"]
