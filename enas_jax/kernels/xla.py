"""The XLA kernel set: XLA's own operations and JAX's autodiff.

The baseline on GPU and TPU: ``lax.conv_general_dilated`` (depthwise through
``feature_group_count``), ``lax.reduce_window`` pools, batch norm differentiated
by JAX, ``jax.checkpoint`` for rematerialisation and around switch branches, and a
plain sum of squares. Initialisation is the CPU set's one-draw initialiser (a
jitted per-weight initialiser costs a long compile on every start). The same functions as :mod:`enas_jax.kernels.cpu`
(tests/test_kernels.py). Inputs may be float32 or bfloat16; batch-norm moments
and the sum of squares are computed in float32.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax.kernels.base import DN, plain_conv

# The micro search cell is differentiated by JAX (lax.switch over
# jax.checkpoint'ed branches), not by the CPU set's hand-written cell VJP.
CELL_VJP = False


def _f32(x):
  return x if x.dtype == jnp.float32 else x.astype(jnp.float32)


def conv2d(x_NHWC: jax.Array, w_HWIO: jax.Array, stride: int = 1):
  """SAME k x k convolution."""
  return plain_conv(x_NHWC, w_HWIO, stride)


def depthwise_conv2d(x_NHWC: jax.Array, w_HWC: jax.Array, stride: int = 1,
                     relu_input: bool = False):
  """SAME depthwise convolution (channel multiplier 1) of x, of ReLU(x) with
  ``relu_input``, as a grouped convolution."""
  if relu_input:
    x_NHWC = jnp.maximum(x_NHWC, 0.0)
  k, c = w_HWC.shape[0], x_NHWC.shape[-1]
  return jax.lax.conv_general_dilated(
      x_NHWC, w_HWC.reshape(k, k, 1, c), (stride, stride), "SAME",
      dimension_numbers=DN, feature_group_count=c)


def _window(k: int, stride: int):
  return (1, k, k, 1), (1, stride, stride, 1)


def avg_pool(x_NHWC: jax.Array, k: int = 3, stride: int = 1):
  """SAME average pool whose divisor excludes the padding (as TF's)."""
  dims, strides = _window(k, stride)
  zero = np.zeros((), x_NHWC.dtype)  # concrete: JAX differentiates it as a sum
  total = jax.lax.reduce_window(x_NHWC, zero, jax.lax.add, dims, strides, "SAME")
  ones = np.ones((1,) + x_NHWC.shape[1:3] + (1,), x_NHWC.dtype)
  count = jax.lax.reduce_window(ones, zero, jax.lax.add, dims, strides, "SAME")
  return total / count


def max_pool(x_NHWC: jax.Array, k: int = 3, stride: int = 1):
  """SAME max pool (the padding is -inf: it never wins)."""
  dims, strides = _window(k, stride)
  # A concrete -inf: JAX recognises the max monoid and differentiates it.
  return jax.lax.reduce_window(x_NHWC, np.array(-np.inf, x_NHWC.dtype), jax.lax.max, dims,
                               strides, "SAME")


def bn_batch(x_NHWC, scale, offset, eps):
  """``(y, mean, biased var)`` over (N, H, W), differentiated by JAX; moments
  in float32, y in x's dtype."""
  x = _f32(x_NHWC)
  mean = jnp.mean(x, (0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
  y = (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + offset
  return y.astype(x_NHWC.dtype), mean, var


def switch(index, branches: Sequence[Callable], operand, checkpoint: bool = True):
  """``lax.switch``; with ``checkpoint``, each branch under ``jax.checkpoint``
  (its backward recomputes the branch from the operand instead of keeping its
  activations)."""
  if checkpoint:
    branches = [jax.checkpoint(b) for b in branches]
  return jax.lax.switch(index, list(branches), operand)


def recompute_in_backward(f: Callable) -> Callable:
  """``f(diff, extra)`` under ``jax.checkpoint``: only its inputs are kept for
  the backward pass."""
  return jax.checkpoint(f)


def init_params(init_fn: Callable, key: jax.Array, *args):
  """The CPU set's initialiser (one truncated-normal draw cut into every weight).

  A jitted initialiser with a draw per weight is the textbook form, but it
  compiles for over a minute for the micro search child (hundreds of Threefry
  and inverse-CDF blocks), on every start, for the same distribution.
  """
  from enas_jax.kernels import cpu
  return cpu.init_params(init_fn, key, *args)


def sum_of_squares(tree) -> jax.Array:
  """``sum(x ** 2)`` over every element of every leaf (float32), one reduction per leaf."""
  total = jnp.zeros((), jnp.float32)
  for x in jax.tree.leaves(tree):
    total = total + jnp.sum(jnp.square(_f32(x)))
  return total
