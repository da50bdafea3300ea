"""The XLA:CPU kernel set: hand-written gradients and shifted-slice forms.

On XLA:CPU a convolution whose *backward* pass sits inside a ``lax.switch``
branch runs an order of magnitude slower than the same static network (XLA
keeps it in a layout the CPU backend runs with a slow loop emitter), and several
of XLA's autodiff gradients are several times slower than hand-written ones
(measurements: docs/performance.md). This set:

1. :func:`conv2d` (stride 1): a ``jax.custom_vjp`` whose backward convolutions
   are written in the canonical NHWC/HWIO form (input gradient = convolution of
   the output gradient with the flipped, in/out-swapped kernel; kernel gradient
   = convolution of the input, transposed to [C_in, H, W, N], with the output
   gradient, transposed to [H, W, N, C_out], as the kernel);
2. :func:`switch` with ``checkpoint``: a switch whose gradient is a second
   switch that recomputes the taken branch (the forward saves only the operand),
   so autodiff does not emit the zero-filled residuals of every branch;
3. :func:`depthwise_conv2d` as a sum of shifted slices (XLA:CPU's grouped
   convolution is much slower), with a custom gradient at stride 1;
4. batch norm (:func:`bn_batch`) and the stride-1 pools with hand-written
   gradients; kernel gradients summed over a few images at a time;
5. :func:`recompute_in_backward`: rematerialisation that holds on XLA:CPU;
6. :func:`init_params`: every He-normal weight cut from one truncated-normal
   draw; :func:`sum_of_squares` as one reduction over concatenated leaves.

Every function here equals its counterpart in :mod:`enas_jax.kernels.xla`
(tests/test_kernels.py). Inputs may be float32 or bfloat16; reductions
(kernel gradients, batch-norm moments) accumulate in float32.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax.kernels.base import DN as _DN
from enas_jax.kernels.base import plain_conv as _plain_conv
from enas_jax.kernels.base import same_pads as _same_pads

CELL_VJP = True  # the micro search cell's own VJP (enas_jax.spaces.cifar_micro_child)


def _f32(x):
  """x in float32 (no operation when it already is)."""
  return x if x.dtype == jnp.float32 else x.astype(jnp.float32)


_GRAD_CHUNK = 4  # images per step of the full kernel gradient's loop
# Depthwise kernel gradients loop over chunks of about this many floats per
# operand (~384 KB): 4 images at [32, 32, 20], 8 at [16, 16, 40], 2 at [32, 32, 36].
_DEPTHWISE_CHUNK_FLOATS = 98_304


def _full_kernel_grad(x_NHWC, g_NHWO, pads_h, pads_w):
  """``[C_in, kh, kw, C_out]``: ``sum_{n,h,w} xpad[n, h+a, w+b, i] dy[n, h, w, o]``,
  the kernel gradient of a stride-1 convolution, as a correlation of x
  (transposed to [C_in, H, W, N]: C_in as the batch, N as the features) with dy
  (transposed to [H, W, N, C_out]) as the kernel, in the canonical NHWC/HWIO
  form, so XLA:CPU runs its fast convolution inside a conditional too (per-tap
  matrix products were ~10x slower: a copy of x per tap)."""
  acc = None if x_NHWC.dtype == jnp.float32 else jnp.float32  # bf16: sums in f32
  return jax.lax.conv_general_dilated(
      x_NHWC.transpose(3, 1, 2, 0), g_NHWO.transpose(1, 2, 0, 3), (1, 1),
      (pads_h, pads_w), dimension_numbers=_DN, preferred_element_type=acc)


def _sum_over_batch_chunks(fn: Callable, x_NHWC, g_NHWO, chunk: int = _GRAD_CHUNK):
  """``sum_chunks fn(x[chunk], g[chunk])`` over chunks of ``chunk`` images.

  XLA:CPU reduces over the batch 2-4x faster a few images at a time than over
  the whole batch at once (the partial sums stay in cache). Kernel-gradient
  convolutions at batch 128, 32x32, 36 channels: 3x3 83-110 ms whole vs 26 ms in
  chunks of 4, 5x5 144-218 ms vs 50 ms; depthwise kernel gradients at
  [160, 32, 32, 20]: 3x3 11-15 -> 5 ms, 5x5 18 -> 9 ms. So gradients loop over
  the batch.
  """
  n = x_NHWC.shape[0]
  m = n // chunk  # full chunks; a remainder of n % chunk images is added once
  if m <= 1:
    return fn(x_NHWC, g_NHWO)
  full = m * chunk
  xs = x_NHWC[:full].reshape(m, chunk, *x_NHWC.shape[1:])
  gs = g_NHWO[:full].reshape(m, chunk, *g_NHWO.shape[1:])
  acc = fn(xs[0], gs[0])
  if full < n:
    acc = acc + fn(x_NHWC[full:], g_NHWO[full:])
  return jax.lax.fori_loop(1, m, lambda i, acc: acc + fn(xs[i], gs[i]), acc)


@jax.custom_vjp
def _custom_conv(x_NHWC, w_HWIO):
  return _plain_conv(x_NHWC, w_HWIO)


def _custom_conv_fwd(x_NHWC, w_HWIO):
  return _plain_conv(x_NHWC, w_HWIO), (x_NHWC, w_HWIO)


def _custom_conv_bwd(res, g_NHWO):
  x_NHWC, w_HWIO = res
  kh, kw = w_HWIO.shape[:2]
  (pt, pb), (pl, pr) = _same_pads(kh), _same_pads(kw)
  # dx: correlate dy with the spatially flipped kernel, in/out swapped. The
  # forward padding (pt, pb) becomes (pb, pt) for the transposed correlation.
  w_flip = jnp.flip(w_HWIO, (0, 1)).transpose(0, 1, 3, 2)
  dx = jax.lax.conv_general_dilated(g_NHWO, w_flip, (1, 1), ((pb, pt), (pr, pl)),
                                    dimension_numbers=_DN)
  dw = _sum_over_batch_chunks(
      lambda x, g: _full_kernel_grad(x, g, (pt, pb), (pl, pr)), x_NHWC, g_NHWO)
  dw = dw.transpose(1, 2, 0, 3).astype(w_HWIO.dtype)
  return dx.astype(x_NHWC.dtype), dw


_custom_conv.defvjp(_custom_conv_fwd, _custom_conv_bwd)


def conv2d(x_NHWC: jax.Array, w_HWIO: jax.Array, stride: int = 1):
  """SAME k x k convolution; the custom gradient at stride 1 (strided
  convolutions only occur outside switch branches)."""
  if stride == 1:
    return _custom_conv(x_NHWC, w_HWIO)
  return _plain_conv(x_NHWC, w_HWIO, stride)


def _shifted_windows(x_NHWC, k: int, stride: int, pad_value: float):
  """The k*k shifted views of a SAME-padded input (each [N, H/s, W/s, C])."""
  n, h, w, c = x_NHWC.shape
  lo, hi = _same_pads(k)
  if stride > 1:
    # TF SAME with stride s: output ceil(H/s), total padding max(k - s, 0) for even H.
    out_h, out_w = -(-h // stride), -(-w // stride)
    tot_h = max((out_h - 1) * stride + k - h, 0)
    tot_w = max((out_w - 1) * stride + k - w, 0)
    ph, pw = (tot_h // 2, tot_h - tot_h // 2), (tot_w // 2, tot_w - tot_w // 2)
  else:
    out_h, out_w = h, w
    ph = pw = (lo, hi)
  xp = jnp.pad(x_NHWC, ((0, 0), ph, pw, (0, 0)), constant_values=pad_value)
  for a in range(k):
    for b in range(k):
      yield a, b, jax.lax.slice(
          xp, (0, a, b, 0), (n, a + (out_h - 1) * stride + 1, b + (out_w - 1) * stride + 1, c),
          (1, stride, stride, 1))


def _tap_sum(views, w_TC):
  """``sum_t views[t] * w_TC[t]``: a depthwise correlation from its k*k shifted views."""
  out = None
  for t, xs in enumerate(views):
    out = xs * w_TC[t] if out is None else out + xs * w_TC[t]
  return out


def _depthwise_slices(x_NHWC, w_HWC, stride: int = 1):
  k = w_HWC.shape[0]
  views = [xs for _, _, xs in _shifted_windows(x_NHWC, k, stride, 0.0)]
  return _tap_sum(views, w_HWC.reshape(k * k, -1))


def _relu_if(x, relu: bool):
  return jnp.maximum(x, 0.0) if relu else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _custom_depthwise(x_NHWC, w_HWC, relu: bool):
  return _depthwise_slices(_relu_if(x_NHWC, relu), w_HWC)


def _custom_depthwise_fwd(x_NHWC, w_HWC, relu):
  # Saves x itself: with ``relu`` the rectified input is recomputed where it is
  # read (inside the backward's fusions) instead of being stored.
  return _depthwise_slices(_relu_if(x_NHWC, relu), w_HWC), (x_NHWC, w_HWC)


def _custom_depthwise_bwd(relu, res, g_NHWC):
  x_NHWC, w_HWC = res
  k = w_HWC.shape[0]
  lo, hi = _same_pads(k)
  # dx: dy correlated with the flipped kernel, the padding transposed.
  dx = _tap_sum(_windows_s1(g_NHWC, k, (hi, lo)), jnp.flip(w_HWC, (0, 1)).reshape(k * k, -1))
  if relu:
    dx = jnp.where(x_NHWC > 0, dx, 0.0)
  # dw[a, b, c] = sum_{n,h,w} xpad[n, h+a, w+b, c] dy[n, h, w, c]: all taps'
  # products in one variadic reduce over (N, H), then over W, a few images at a
  # time. Separate per-tap reductions made XLA:CPU copy a shifted x per tap (~10x
  # slower); the diagonal of a blocked full kernel gradient was 1.4-2x slower.
  def taps(x, g):
    windows = _windows_s1(_relu_if(x, relu), k, (lo, hi))
    part = _fused_sums([_f32(xs * g) for xs in windows], (0, 1))
    return jnp.stack([q.sum(0) for q in part])

  per_image = int(np.prod(x_NHWC.shape[1:]))
  chunk = 1 << max(0, (_DEPTHWISE_CHUNK_FLOATS // per_image).bit_length() - 1)
  dw = _sum_over_batch_chunks(taps, x_NHWC, g_NHWC, chunk).reshape(w_HWC.shape)
  return dx.astype(x_NHWC.dtype), dw.astype(w_HWC.dtype)


_custom_depthwise.defvjp(_custom_depthwise_fwd, _custom_depthwise_bwd)


def depthwise_conv2d(x_NHWC: jax.Array, w_HWC: jax.Array, stride: int = 1,
                     relu_input: bool = False):
  """SAME depthwise convolution of x (of ReLU(x) with ``relu_input``) as a sum of
  shifted slices; at stride 1 a custom gradient that, with ``relu_input``,
  keeps x instead of ReLU(x) for the backward pass."""
  if stride == 1:
    return _custom_depthwise(x_NHWC, w_HWC, relu_input)
  return _depthwise_slices(_relu_if(x_NHWC, relu_input), w_HWC, stride)


def _fused_sums(xs: Sequence[jax.Array], dims: tuple[int, ...]):
  """Sums of several same-shape arrays over ``dims`` in ONE variadic reduce: XLA
  emits one loop that reads its inputs once (separate reductions each re-read
  them, and materialise a shifted copy first when an input is a shifted slice)."""
  xs = tuple(xs)
  return jax.lax.reduce(xs, tuple(jnp.zeros((), x.dtype) for x in xs),
                        lambda u, v: tuple(p + q for p, q in zip(u, v)), dims)


def _pool_count(h: int, w: int, k: int, dtype):
  """[1, h, w, 1]: how many real (unpadded) pixels each stride-1 SAME window holds."""
  lo, hi = _same_pads(k)
  ones = np.pad(np.ones((h, w), np.float32), ((lo, hi), (lo, hi)))
  cnt = sum(ones[a:a + h, b:b + w] for a in range(k) for b in range(k))
  return jnp.asarray(cnt[None, :, :, None], dtype)


def _windows_s1(x_NHWC, k: int, pads: tuple[int, int], pad_value: float = 0.0):
  """The k*k shifted [N, H, W, C] views of x padded by ``pads`` on H and W."""
  _, h, w, _ = x_NHWC.shape
  xp = jnp.pad(x_NHWC, ((0, 0), pads, pads, (0, 0)), constant_values=pad_value)
  return [xp[:, a:a + h, b:b + w, :] for a in range(k) for b in range(k)]


# Pools at stride 1 (the ops inside search branches) have hand-written gradients:
# XLA:CPU's autodiff gradients of the shifted-slice pools were 5-7x slower than
# these (fwd+bwd on [160, 32, 32, 20]); they are the same functions.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _avg_pool_s1(x_NHWC, k: int):
  pads = _same_pads(k)
  return sum(_windows_s1(x_NHWC, k, pads)) / _pool_count(x_NHWC.shape[1], x_NHWC.shape[2], k,
                                                        x_NHWC.dtype)


def _avg_pool_s1_fwd(x_NHWC, k):
  return _avg_pool_s1(x_NHWC, k), x_NHWC.shape


def _avg_pool_s1_bwd(k, shape, g):
  # Each input pixel receives g / count of every window holding it: a sum of
  # shifted slices of g / count with the padding transposed.
  lo, hi = _same_pads(k)
  gc = g / _pool_count(shape[1], shape[2], k, g.dtype)
  return (sum(_windows_s1(gc, k, (hi, lo))),)


_avg_pool_s1.defvjp(_avg_pool_s1_fwd, _avg_pool_s1_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_s1(x_NHWC, k: int):
  return _max_pool_s1_fwd(x_NHWC, k)[0]


def _max_pool_s1_fwd(x_NHWC, k):
  # Also records which tap of each window won (the first maximum in row-major
  # window order, as XLA's and TF's max-pool gradients pick it on ties; ties are
  # common after a ReLU).
  out = tap = None
  for t, xs in enumerate(_windows_s1(x_NHWC, k, _same_pads(k), -jnp.inf)):
    if out is None:
      out, tap = xs, jnp.zeros(xs.shape, jnp.int8)
    else:
      win = xs > out
      out, tap = jnp.where(win, xs, out), jnp.where(win, jnp.int8(t), tap)
  return out, tap


def _max_pool_s1_bwd(k, tap, g):
  # Gather form: pixel p is tap t of the window at p - offset(t); with the padding
  # transposed, that window's g and winning tap are the (k*k - 1 - t)-th shifted views.
  lo, hi = _same_pads(k)
  gw, tw = _windows_s1(g, k, (hi, lo)), _windows_s1(tap, k, (hi, lo), -1)
  last = k * k - 1
  dx = None
  for t in range(k * k):
    term = jnp.where(tw[last - t] == t, gw[last - t], 0.0)
    dx = term if dx is None else dx + term
  return (dx,)


_max_pool_s1.defvjp(lambda x, k: _max_pool_s1_fwd(x, k), _max_pool_s1_bwd)


def avg_pool(x_NHWC: jax.Array, k: int = 3, stride: int = 1):
  """SAME average pool whose divisor excludes the padding (as TF's)."""
  if stride == 1:
    return _avg_pool_s1(x_NHWC, k)
  n, h, w, _ = x_NHWC.shape
  total = count = None
  ones = jnp.ones((1, h, w, 1), x_NHWC.dtype)
  for (_, _, xs), (_, _, os) in zip(_shifted_windows(x_NHWC, k, stride, 0.0),
                                    _shifted_windows(ones, k, stride, 0.0)):
    total = xs if total is None else total + xs
    count = os if count is None else count + os
  return total / count


def max_pool(x_NHWC: jax.Array, k: int = 3, stride: int = 1):
  """SAME max pool (padding never wins: it is -inf). Its gradient goes to the
  first maximum of each window, as XLA's and TF's."""
  if stride == 1:
    return _max_pool_s1(x_NHWC, k)
  out = None
  for _, _, xs in _shifted_windows(x_NHWC, k, stride, -jnp.inf):
    out = xs if out is None else jnp.maximum(out, xs)
  return out


def _bn_batch_impl(x, scale, offset, eps):
  r = x.shape[0] * x.shape[1] * x.shape[2]
  # One pass over x for both moments, of x shifted by the batch mean of its
  # first pixel (var = E[d^2] - E[d]^2 with d = x - shift cancels only as far
  # as the shift is from the mean, so the shift must be close to it). No
  # ``x - mean`` in the forward: XLA merged it with the backward's own and kept
  # that centred copy alive until the backward (docs/performance.md).
  x_dtype, x = x.dtype, _f32(x)  # bfloat16 inputs: moments and y computed in float32
  shift = jax.lax.stop_gradient(jnp.mean(x[:, 0, 0], axis=0))
  d = x - shift
  s1, s2 = jnp.sum(d, (0, 1, 2)) / r, jnp.sum(jnp.square(d), (0, 1, 2)) / r
  mean, var = shift + s1, jnp.maximum(s2 - jnp.square(s1), 0.0)
  a = jax.lax.rsqrt(var + eps) * scale
  return (x * a + (offset - mean * a)).astype(x_dtype), mean, var


@jax.custom_vjp
def _bn_batch(x_NHWC, scale, offset, eps):
  """Batch-statistics normalisation: ``(y, mean, biased var)`` over (N, H, W).

  A hand-written gradient: XLA:CPU's autodiff of the same formula took several
  times longer (it materialises the centred input before reducing it); this one
  reduces dy and dy * (x - mean) without materialising either, then writes dx."""
  return _bn_batch_impl(x_NHWC, scale, offset, eps)


def _bn_batch_fwd(x, scale, offset, eps):
  y, mean, var = _bn_batch_impl(x, scale, offset, eps)
  return (y, mean, var), (x, scale, mean, var, eps)


def _bn_batch_bwd(res, cts):
  x, scale, mean, var, eps = res
  g, g_mean, g_var = cts
  x_dtype, x, g = x.dtype, _f32(x), _f32(g)
  r = x.shape[0] * x.shape[1] * x.shape[2]
  rstd = jax.lax.rsqrt(var + eps)
  # Two plain reductions: faster on XLA:CPU than one variadic reduce of both.
  sg, sgx = jnp.sum(g, (0, 1, 2)), jnp.sum(g * (x - mean), (0, 1, 2))
  # dx = k1 g + k2 (x - mean) + k3, written with x itself: a standalone
  # ``x - mean`` needs only forward values, and XLA computed it during the
  # forward pass and kept it until here (one more activation-sized buffer per
  # batch norm). The mean and variance outputs feed the moving averages under
  # stop_gradient (zero cotangents); kept exact for any other use.
  k1 = scale * rstd
  k2 = g_var * (2.0 / r) - k1 * sgx * rstd * rstd / r
  k3 = g_mean / r - k1 * sg / r - k2 * mean
  dx = (k1 * g + k2 * x + k3).astype(x_dtype)
  return dx, sgx * rstd, sg, jnp.zeros_like(eps)


_bn_batch.defvjp(_bn_batch_fwd, _bn_batch_bwd)


def bn_batch(x_NHWC, scale, offset, eps):
  """``(y, mean, biased var)`` over (N, H, W), with the hand-written gradient;
  moments in float32, y in x's dtype."""
  return _bn_batch(x_NHWC, scale, offset, eps)


# ---------------------------------------------------------------------------
# Initialisation from one draw.


class _Stream:
  """He-normal draws of one initialisation: ``buf=None`` records the sizes
  (values are zeros), else each draw is the next slice of ``buf``."""

  def __init__(self, buf=None):
    self.buf, self.sizes, self.offset = buf, [], 0

  def take(self, shape, std):
    size = int(np.prod(shape))
    if self.buf is None:
      self.sizes.append(size)
      return jnp.zeros(shape, jnp.float32)
    part = self.buf[self.offset:self.offset + size]
    self.offset += size
    if isinstance(part, np.ndarray):  # eager: a host array, no compile per weight
      return (np.float32(std) * part).reshape(shape)
    return (std * part).reshape(shape).astype(jnp.float32)


class _Draws(threading.local):
  stream: _Stream | None = None


_draws = _Draws()


@contextlib.contextmanager
def _stream(stream):
  prev, _draws.stream = _draws.stream, stream
  try:
    yield stream
  finally:
    _draws.stream = prev


def take_from_stream(shape, std):
  """Inside :func:`init_params`: the next He-normal weight of ``shape`` (its
  values cut from the one sample, scaled by ``std``); None outside."""
  stream = _draws.stream
  return None if stream is None else stream.take(tuple(shape), std)


def init_params(init_fn: Callable, key: jax.Array, *args):
  """``init_fn(key, *args)`` with every ``conv_ops.he_normal`` weight cut from ONE
  truncated-normal sample (then scaled by its std): the same distribution.

  Why: each ``jax.random`` call is its own Threefry and inverse-CDF code, which
  XLA:CPU compiles at ~50-70 ms per call; the micro search child has ~700
  weight tensors, and jitting its initialiser took 74 s and 2 GB. Here the
  sizes are recorded first (an abstract trace: nothing is compiled), then one
  sample of their total size is drawn. Called eagerly (the fast way: ~1 s for
  the micro search child), the weights are cut from the sample on the host and
  returned as numpy arrays; under ``jit`` they are slices of it (``init_fn``'s
  own key splits are then dead code, but each slice is still a small kernel to
  compile). Deterministic in ``key``, and the same values either way."""
  rec = _Stream()
  with _stream(rec):
    jax.eval_shape(lambda k: init_fn(k, *args), key)
  total = sum(rec.sizes)
  k_draw, k_init = jax.random.split(key)
  sample = jax.random.truncated_normal(k_draw, -2.0, 2.0, (max(total, 1),), jnp.float32)
  if not isinstance(sample, jax.core.Tracer):
    sample = np.asarray(sample)  # called eagerly: the weights are cut on the host
  draw = _Stream(sample)
  with _stream(draw):
    out = init_fn(k_init, *args)
  if draw.offset != total:
    raise AssertionError("init_params: init_fn drew differently on its two passes "
                         f"({draw.offset} vs {total} values); it must not branch "
                         "on traced values.")
  return out


def switch(index, branches: Sequence[Callable], operand, checkpoint: bool = True):
  """``lax.switch``; with ``checkpoint``, the recomputing gradient of
  :func:`_checkpointed_switch`."""
  if checkpoint:
    return _checkpointed_switch(index, tuple(branches), operand)
  return jax.lax.switch(index, list(branches), operand)


def _checkpointed_switch(index, branches: tuple, operand):
  """``lax.switch(index, branches, operand)`` with a gradient that saves only
  ``(index, operand)`` and, in a second ``lax.switch``, recomputes the taken
  branch and pulls the cotangent back through it.

  ``jax.checkpoint`` around each branch did the same recomputation, but the
  forward conditional still had to return one joint residual tuple for all
  branches: every branch zero-filled the slots of the others (a full activation
  for a pool branch, every weight of the separable branches). Branches must not close over traced values
  that need gradients (pass them in ``operand``).
  """
  def run(index, operand):
    return jax.lax.switch(index, list(branches), operand)

  def pullback(branch):
    def f(args):
      op, g = args
      return jax.vjp(branch, op)[1](g)[0]
    return f

  @jax.custom_vjp
  def switch(index, operand):
    return run(index, operand)

  def fwd(index, operand):
    return run(index, operand), (index, operand)

  def bwd(res, g):
    index, operand = res
    d_operand = jax.lax.switch(index, [pullback(b) for b in branches], (operand, g))
    return None, d_operand

  switch.defvjp(fwd, bwd)
  return switch(index, operand)


@jax.custom_vjp
def sum_of_squares(tree) -> jax.Array:
  """``sum(x ** 2)`` over every element of every leaf, as one reduction.

  A reduction per leaf (and, under autodiff, the slices that transpose a
  concatenation) is a kernel per leaf for XLA to compile, which made the L2
  term, the gradient norm and the clip a large part of compiling the search
  step (docs/performance.md). Here the leaves are concatenated into one
  reduction, and the gradient (``2 x g``) is written per leaf, where it fuses
  with the optimizer's own element-wise work."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
  return jnp.sum(jnp.square(flat))


def _sum_of_squares_fwd(tree):
  return sum_of_squares(tree), tree


def _sum_of_squares_bwd(tree, g):
  return (jax.tree.map(lambda x: (2.0 * g * x).astype(x.dtype), tree),)


sum_of_squares.defvjp(_sum_of_squares_fwd, _sum_of_squares_bwd)




# ---------------------------------------------------------------------------
# Rematerialisation.


def _zero_cotangent(a):
  a = jnp.asarray(a)  # Python scalars; jax arrays (PRNG keys too) pass through
  if jnp.issubdtype(a.dtype, jnp.inexact):
    return jnp.zeros_like(a)
  return np.zeros(a.shape, jax.dtypes.float0)  # integer and PRNG-key inputs


def recompute_in_backward(f: Callable) -> Callable:
  """``f(diff, extra) -> out`` that keeps only its inputs for the backward pass
  and recomputes the block there, *inside a conditional* gated by the block's
  output cotangent.

  ``jax.checkpoint`` does not hold on XLA:CPU: the backend drops its
  optimization barriers early and merges the recomputation with the forward
  pass by common-subexpression elimination, so the forward activations stay
  alive. XLA does not merge work across a conditional's boundary, and the
  recomputation cannot start before the cotangent exists."""

  @jax.custom_vjp
  def block(diff, extra):
    return f(diff, extra)

  def fwd(diff, extra):
    return f(diff, extra), (diff, extra)

  def bwd(res, ct):
    diff, extra = res
    v = jnp.ravel(jax.tree.leaves(ct)[0])[0]
    # Always true (a NaN fails the first test and passes the second), but not
    # a constant XLA can fold: the conditional survives.
    pred = jnp.logical_or(v == v, v != v)

    def recompute(diff, ct):
      _, pull = jax.vjp(lambda d: f(d, extra), diff)
      return pull(ct)[0]

    def unreachable(diff, ct):  # the predicate is never false; NaN if it were
      return jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), diff)

    d_diff = jax.lax.cond(pred, recompute, unreachable, diff, ct)
    return d_diff, jax.tree.map(_zero_cotangent, extra)

  block.defvjp(fwd, bwd)
  return block
