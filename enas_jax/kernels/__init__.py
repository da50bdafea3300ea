"""The two kernel sets of the CIFAR children, chosen by ``child.kernels``.

* :mod:`enas_jax.kernels.cpu`: hand-written gradients and shifted-slice forms
  that XLA:CPU runs several times faster than its own (inside switch branches
  especially).
* :mod:`enas_jax.kernels.xla`: XLA's own operations and autodiff
  (``lax.conv_general_dilated``, grouped depthwise convolutions,
  ``lax.reduce_window`` pools, ``jax.checkpoint``), the baseline on GPU and TPU.

Both modules define the same functions (:data:`API`); model code reaches them
through :mod:`enas_jax.spaces.conv_ops` with the *resolved* set name
(:mod:`enas_jax.backend` resolves ``auto``) and never asks for the backend.
"""

from __future__ import annotations

from types import ModuleType

from enas_jax.kernels import cpu, xla

SETS = {"cpu": cpu, "xla": xla}
# What each set provides (same names, same signatures, same functions up to
# rounding; tests/test_kernels.py checks values and gradients).
API = ("conv2d", "depthwise_conv2d", "avg_pool", "max_pool", "bn_batch", "switch",
       "recompute_in_backward", "init_params", "sum_of_squares", "CELL_VJP")


def get(name: str) -> ModuleType:
  """The kernel module of a resolved set name (``cpu`` or ``xla``)."""
  try:
    return SETS[name]
  except KeyError:
    raise ValueError(
        f"child.kernels must be resolved to one of {tuple(SETS)} before use, got {name!r} "
        "(enas_jax.backend.resolve_kernels resolves 'auto').") from None


__all__ = ["API", "SETS", "get", "cpu", "xla"]
