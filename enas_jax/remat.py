"""Rematerialisation of one block (a cell, a layer) with the kernel set's method.

``jax.checkpoint`` marks a block to be recomputed in the backward pass. It
does not hold on XLA:CPU (the backend merges the recomputation back into the
forward pass), so the ``cpu`` kernel set recomputes the block inside a
conditional instead (:func:`enas_jax.kernels.cpu.recompute_in_backward`); the
``xla`` set uses ``jax.checkpoint``.
"""

from __future__ import annotations

from typing import Callable

from enas_jax import kernels as kernel_sets


def recompute_in_backward(f: Callable, kernels: str) -> Callable:
  """``f(diff, extra) -> out`` that saves only its inputs for the backward pass.

  ``diff``: a pytree of float arrays (weights, statistics, activations) that
  gets cotangents; ``extra``: a pytree of inputs that does not (PRNG keys,
  drop-path keep probabilities, ``None``); its cotangent is zero. ``out``'s
  first leaf must be a float array. ``kernels``: the resolved kernel set
  (``cpu`` or ``xla``; ``child.kernels`` after :mod:`enas_jax.backend`).
  """
  return kernel_sets.get(kernels).recompute_in_backward(f)


__all__ = ["recompute_in_backward"]
