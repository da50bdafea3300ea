"""The operations of the CIFAR children, dispatched to a kernel set.

Layouts are NHWC activations and HWIO kernels throughout (names carry shape
suffixes: ``x_NHWC``, ``w_HWIO``). Every operation that has two implementations
takes ``kernels``, the *resolved* set name (``cpu`` or ``xla``: the child
config's ``kernels`` field, resolved by :mod:`enas_jax.backend`), and runs that
set's function (:mod:`enas_jax.kernels`); the rest (1x1 convolutions, the
factorized reduction, batch-norm bookkeeping, He-normal draws) is the same for
both.

Compute dtype: activations may be float32 or bfloat16. Weights stay float32
and are cast to the activations' dtype where they are used; batch-norm
statistics, moments and scale/offset stay float32.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax import kernels as kernel_sets
from enas_jax.kernels import cpu as _cpu


def scoped(name: str):
  """Runs the function under ``jax.named_scope(name)``: its operations (and, as
  ``transpose(jvp(name))``, their gradients) carry the name in profiles and HLO
  metadata, so a ``jax.profiler`` trace can be summed per operation kind."""
  def wrap(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
      with jax.named_scope(name):
        return fn(*args, **kwargs)
    return run
  return wrap


def _like(w, x):
  """Weight ``w`` in the dtype of activation ``x`` (no operation when equal)."""
  return w if w.dtype == x.dtype else w.astype(x.dtype)


def matmul_1x1(x_NHWC, w_IO):
  """A 1x1 convolution ``[C_in, C_out]`` as a 4-D product."""
  return jnp.einsum("nhwc,co->nhwo", x_NHWC, _like(w_IO, x_NHWC))


@scoped("conv")
def conv2d(x_NHWC: jax.Array, w_HWIO: jax.Array, stride: int = 1, *, kernels: str):
  """SAME convolution, no bias. 1x1 kernels are a matrix product (both sets)."""
  w_HWIO = _like(w_HWIO, x_NHWC)
  if w_HWIO.shape[0] == 1 and w_HWIO.shape[1] == 1:
    if stride > 1:
      x_NHWC = x_NHWC[:, ::stride, ::stride, :]
    return jnp.einsum("nhwc,co->nhwo", x_NHWC, w_HWIO[0, 0])
  return kernel_sets.get(kernels).conv2d(x_NHWC, w_HWIO, stride)


@scoped("depthwise")
def depthwise_conv2d(x_NHWC: jax.Array, w_HWC: jax.Array, stride: int = 1, *, kernels: str,
                     relu_input: bool = False):
  """SAME depthwise convolution with a ``[k, k, C]`` kernel (channel multiplier 1)
  of ``x`` (of ``ReLU(x)`` with ``relu_input``)."""
  return kernel_sets.get(kernels).depthwise_conv2d(x_NHWC, _like(w_HWC, x_NHWC), stride,
                                                   relu_input)


def separable_conv2d(x_NHWC, w_depth_HWC, w_point_IO, stride: int = 1, *, kernels: str):
  """Depthwise ``[k,k,C]`` then pointwise ``[C, C_out]``: a true separable conv."""
  y = depthwise_conv2d(x_NHWC, w_depth_HWC, stride, kernels=kernels)
  return matmul_1x1(y, w_point_IO)


@scoped("avg_pool")
def avg_pool(x_NHWC: jax.Array, k: int = 3, stride: int = 1, *, kernels: str):
  """SAME average pool whose divisor excludes the padding (as TF's)."""
  return kernel_sets.get(kernels).avg_pool(x_NHWC, k, stride)


@scoped("max_pool")
def max_pool(x_NHWC: jax.Array, k: int = 3, stride: int = 1, *, kernels: str):
  """SAME max pool (padding never wins: it is -inf). Its gradient goes to the
  first maximum of each window, as XLA's and TF's."""
  return kernel_sets.get(kernels).max_pool(x_NHWC, k, stride)


@scoped("factorized_reduce")
def factorized_reduce(x_NHWC, w1_IO, w2_IO, stride: int = 2):
  """The original's factorized reduction without its BN: path 1 = stride-2
  subsample -> 1x1 conv; path 2 = shift by one pixel (drop the first row and
  column, zero-pad the end) -> subsample -> 1x1 conv; concat on channels.
  With ``stride == 1`` it is a single 1x1 conv with ``w1_IO``."""
  if stride == 1:
    return matmul_1x1(x_NHWC, w1_IO)
  p1 = x_NHWC[:, ::stride, ::stride, :]
  shifted = jnp.pad(x_NHWC[:, 1:, 1:, :], ((0, 0), (0, 1), (0, 1), (0, 0)))
  p2 = shifted[:, ::stride, ::stride, :]
  return jnp.concatenate([matmul_1x1(p1, w1_IO), matmul_1x1(p2, w2_IO)], axis=-1)


# ---------------------------------------------------------------------------
# Batch norm (functional): parameters {"scale", "offset"}, statistics {"mean", "var"}.


@scoped("batch_norm")
def batch_norm(x_NHWC, params: dict | None, stats: dict | None, *, train: bool, kernels: str,
               decay: float = 0.9, eps: float = 1e-5):
  """Returns ``(y, new_stats)``; y in x's dtype, statistics float32.

  Training: normalise with the batch statistics; the moving averages (if
  ``stats`` is given) move by ``decay`` towards the batch mean and the
  Bessel-corrected batch variance (as TF's fused batch norm feeds them).
  Evaluation (``train=False``): normalise with the moving averages.
  ``params=None`` means no learned scale/offset.
  """
  if train or stats is None:
    c = x_NHWC.shape[-1]
    scale = params["scale"] if params is not None else jnp.ones((c,), jnp.float32)
    offset = params["offset"] if params is not None else jnp.zeros((c,), jnp.float32)
    y, mean, var = kernel_sets.get(kernels).bn_batch(x_NHWC, scale, offset,
                                                     jnp.asarray(eps, jnp.float32))
    new_stats = stats
    if stats is not None and train:
      n = x_NHWC.shape[0] * x_NHWC.shape[1] * x_NHWC.shape[2]
      unbiased = var * (n / max(n - 1, 1))
      d = jnp.asarray(decay, jnp.float32)
      new_stats = {"mean": d * stats["mean"] + (1 - d) * jax.lax.stop_gradient(mean),
                   "var": d * stats["var"] + (1 - d) * jax.lax.stop_gradient(unbiased)}
    return y, new_stats
  mean, var = stats["mean"], stats["var"]
  x = x_NHWC.astype(jnp.float32)  # no operation in float32
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  if params is not None:
    y = y * params["scale"] + params["offset"]
  return y.astype(x_NHWC.dtype), stats


def bn_params(c: int) -> dict:
  return {"scale": jnp.ones((c,), jnp.float32), "offset": jnp.zeros((c,), jnp.float32)}


def bn_stats(c: int) -> dict:
  return {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)}


# ---------------------------------------------------------------------------
# Initialisation.


def he_normal(key, shape, fan_in: int | None = None):
  """Keras ``he_normal``: truncated normal (2 std), std = sqrt(2 / fan_in).

  The samples' deviation is exactly that (the truncation corrected for, as Keras
  since 2.2.3); the original's TF1-era Keras passed it uncorrected, giving about
  0.88x (README, "Differences from the original code").
  Inside the CPU set's :func:`init_params` the values come from that function's
  single sample and ``key`` is not used."""
  if fan_in is None:
    fan_in = int(np.prod(shape[:-1]))
  std = np.sqrt(2.0 / fan_in) / 0.87962566103423978  # truncation correction
  drawn = _cpu.take_from_stream(shape, std)
  if drawn is not None:
    return drawn
  return (std * jax.random.truncated_normal(key, -2.0, 2.0, shape)).astype(jnp.float32)


def init_params(init_fn: Callable, key: jax.Array, *args, kernels: str):
  """``init_fn(key, *args)`` (a child initialiser built from :func:`he_normal`)
  as the kernel set does it: ``cpu`` cuts every weight from one draw, eagerly
  (numpy arrays); ``xla`` runs the initialiser jitted. Same distribution."""
  return kernel_sets.get(kernels).init_params(init_fn, key, *args)


# ---------------------------------------------------------------------------
# Choosing one of several branches by a (traced or static) index.


def select_branch(index, branches: Sequence[Callable], operand, *, mode: str, kernels: str,
                  checkpoint: bool = True):
  """Runs ``branches[index](operand)``.

  * ``index`` a Python/numpy integer: the branch is called directly (a fixed
    network: the arc baked in, nothing else is built).
  * ``mode="switch"``: ``lax.switch``; with ``checkpoint``, the backward pass
    recomputes the taken branch from ``operand`` (the kernel set's ``switch``).
    Branches must not close over traced values that need gradients (pass them
    in ``operand``).
  * ``mode="mask"``: every branch runs and the chosen output is picked with
    ``jnp.where`` (never a multiply: 0 * inf = NaN from max-pool padding). Every
    branch must return the same pytree structure.
  """
  if isinstance(index, (int, np.integer)) or (isinstance(index, np.ndarray) and index.ndim == 0):
    return branches[int(index)](operand)
  if mode == "switch":
    return kernel_sets.get(kernels).switch(index, branches, operand, checkpoint)
  if mode == "mask":
    outs = [b(operand) for b in branches]
    result = outs[0]
    for k in range(1, len(outs)):
      result = jax.tree.map(lambda r, o, k=k: jnp.where(index == k, o, r), result, outs[k])
    return result
  raise ValueError(f"op_select mode must be 'switch' or 'mask', got {mode!r}.")


# ---------------------------------------------------------------------------
# Sums of squares over weight pytrees (L2 term, gradient norm).


def sum_of_squares(tree, *, kernels: str) -> jax.Array:
  """``sum(x ** 2)`` over every element of every leaf, in float32."""
  return kernel_sets.get(kernels).sum_of_squares(tree)


def global_norm(tree, *, kernels: str) -> jax.Array:
  """The L2 norm of all leaves together (``optax.tree.norm``)."""
  return jnp.sqrt(sum_of_squares(tree, kernels=kernels))


def l2_sum(tree, *, kernels: str) -> jax.Array:
  """The original's L2 term: sum of squares of every leaf (no 1/2)."""
  return sum_of_squares(tree, kernels=kernels)
