"""Convolution, pooling and batch-norm helpers shared by the CIFAR children.

Layouts are NHWC activations and HWIO kernels throughout (names carry shape
suffixes: ``x_NHWC``, ``w_HWIO``).

Why this module exists (``shared/notes/jax-shared-weights.md``): on XLA:CPU a
convolution whose *backward* pass sits inside a ``lax.switch`` branch runs 13-20x
slower than the same static network, because XLA keeps it in a layout that the
CPU backend executes with a slow loop emitter. Three measures fix most of it,
and the children use them through this one helper so each backend can choose:

1. :func:`conv2d` with ``impl="custom"``: a ``jax.custom_vjp`` whose backward
   convolutions are written in the canonical NHWC/HWIO form (input gradient =
   convolution of the output gradient with the flipped, in/out-swapped kernel;
   kernel gradient = convolution of the input, transposed to [C_in, H, W, N], with
   the output gradient, transposed to [H, W, N, C_out], as the kernel: what XLA
   itself emits outside a conditional);
2. :func:`select_branch` gives the switch a recomputing gradient (the forward
   switch saves only the operand; the backward switch reruns the taken branch),
   so that autodiff does not emit the zero-filled residuals of every branch;
3. :func:`depthwise_conv2d` as a sum of shifted slices (XLA:CPU's grouped
   convolution is about 30x slower than that), with a custom gradient at stride 1.

Batch norm and the stride-1 pools also have hand-written gradients (several
times faster than XLA:CPU's autodiff of the same formulas), and kernel gradients
are computed over a few images at a time (see :func:`_sum_over_batch_chunks`).

``impl="auto"`` picks ``custom`` on CPU and ``plain`` (``lax.conv_general_dilated``)
elsewhere, until a GPU/TPU measurement says otherwise; the benchmark reports
which one ran.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CONV_IMPLS = ("auto", "plain", "custom")
OP_SELECT_MODES = ("auto", "switch", "mask")
_DN = ("NHWC", "HWIO", "NHWC")


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


def resolve_conv_impl(impl: str) -> str:
  """``auto`` -> ``custom`` on CPU, ``plain`` on GPU/TPU."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"child.conv_impl must be one of {CONV_IMPLS}, got {impl!r}.")
  if impl == "auto":
    return "custom" if jax.default_backend() == "cpu" else "plain"
  return impl


def resolve_op_select(op_select: str) -> str:
  """``auto`` -> ``switch`` (the fastest on CPU with the measures above, and the
  only choice that does not pay for every op on GPU/TPU)."""
  if op_select not in OP_SELECT_MODES:
    raise ValueError(f"child.op_select must be one of {OP_SELECT_MODES}, got {op_select!r}.")
  return "switch" if op_select == "auto" else op_select


def _same_pads(k: int) -> tuple[int, int]:
  # TF "SAME" for stride 1: total k-1, the extra pixel (even k) at the end.
  return ((k - 1) // 2, k - 1 - (k - 1) // 2)


def _plain_conv(x_NHWC, w_HWIO, stride: int = 1):
  return jax.lax.conv_general_dilated(
      x_NHWC, w_HWIO, (stride, stride), "SAME", dimension_numbers=_DN)


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
  return jax.lax.conv_general_dilated(
      x_NHWC.transpose(3, 1, 2, 0), g_NHWO.transpose(1, 2, 0, 3), (1, 1),
      (pads_h, pads_w), dimension_numbers=_DN)


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


@scoped("conv")
def conv2d(x_NHWC: jax.Array, w_HWIO: jax.Array, stride: int = 1, impl: str = "plain"):
  """SAME convolution, no bias. ``impl``: ``plain`` or ``custom`` (resolved
  already; see :func:`resolve_conv_impl`). 1x1 kernels are a matrix product;
  strided convolutions always use the plain form (they only occur outside
  switch branches)."""
  if w_HWIO.shape[0] == 1 and w_HWIO.shape[1] == 1:
    if stride > 1:
      x_NHWC = x_NHWC[:, ::stride, ::stride, :]
    return jnp.einsum("nhwc,co->nhwo", x_NHWC, w_HWIO[0, 0])
  if impl == "custom" and stride == 1:
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
    part = _fused_sums([xs * g for xs in windows], (0, 1))
    return jnp.stack([q.sum(0) for q in part])

  per_image = int(np.prod(x_NHWC.shape[1:]))
  chunk = 1 << max(0, (_DEPTHWISE_CHUNK_FLOATS // per_image).bit_length() - 1)
  dw = _sum_over_batch_chunks(taps, x_NHWC, g_NHWC, chunk).reshape(w_HWC.shape)
  return dx.astype(x_NHWC.dtype), dw.astype(w_HWC.dtype)


_custom_depthwise.defvjp(_custom_depthwise_fwd, _custom_depthwise_bwd)


@scoped("depthwise")
def depthwise_conv2d(x_NHWC: jax.Array, w_HWC: jax.Array, stride: int = 1, impl: str = "plain",
                     relu_input: bool = False):
  """SAME depthwise convolution with a ``[k, k, C]`` kernel (channel multiplier 1)
  of ``x`` (of ``ReLU(x)`` with ``relu_input``).

  ``custom`` sums shifted slices (fast on XLA:CPU, exact), with a custom gradient at
  stride 1 (which, with ``relu_input``, keeps x instead of ReLU(x) for the
  backward pass); ``plain`` uses a grouped ``conv_general_dilated``."""
  k = w_HWC.shape[0]
  if impl == "custom" and stride == 1:
    return _custom_depthwise(x_NHWC, w_HWC, relu_input)
  x_NHWC = _relu_if(x_NHWC, relu_input)
  if impl == "custom":
    return _depthwise_slices(x_NHWC, w_HWC, stride)
  c = x_NHWC.shape[-1]
  return jax.lax.conv_general_dilated(
      x_NHWC, w_HWC.reshape(k, k, 1, c), (stride, stride), "SAME",
      dimension_numbers=_DN, feature_group_count=c)


def separable_conv2d(x_NHWC, w_depth_HWC, w_point_IO, stride: int = 1, impl: str = "plain"):
  """Depthwise ``[k,k,C]`` then pointwise ``[C, C_out]``: a true separable conv."""
  y = depthwise_conv2d(x_NHWC, w_depth_HWC, stride, impl)
  return jnp.einsum("nhwc,co->nhwo", y, w_point_IO)


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


@scoped("avg_pool")
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


@scoped("max_pool")
def max_pool(x_NHWC: jax.Array, k: int = 3, stride: int = 1):
  """SAME max pool (padding never wins: it is -inf). Its gradient goes to the
  first maximum of each window, as XLA's and TF's."""
  if stride == 1:
    return _max_pool_s1(x_NHWC, k)
  out = None
  for _, _, xs in _shifted_windows(x_NHWC, k, stride, -jnp.inf):
    out = xs if out is None else jnp.maximum(out, xs)
  return out


@scoped("factorized_reduce")
def factorized_reduce(x_NHWC, w1_IO, w2_IO, stride: int = 2):
  """The original's factorized reduction without its BN: path 1 = stride-2
  subsample -> 1x1 conv; path 2 = shift by one pixel (drop the first row and
  column, zero-pad the end) -> subsample -> 1x1 conv; concat on channels.
  With ``stride == 1`` it is a single 1x1 conv with ``w1_IO``."""
  if stride == 1:
    return jnp.einsum("nhwc,co->nhwo", x_NHWC, w1_IO)
  p1 = x_NHWC[:, ::stride, ::stride, :]
  shifted = jnp.pad(x_NHWC[:, 1:, 1:, :], ((0, 0), (0, 1), (0, 1), (0, 0)))
  p2 = shifted[:, ::stride, ::stride, :]
  return jnp.concatenate([jnp.einsum("nhwc,co->nhwo", p1, w1_IO),
                          jnp.einsum("nhwc,co->nhwo", p2, w2_IO)], axis=-1)


# ---------------------------------------------------------------------------
# Batch norm (functional): parameters {"scale", "offset"}, statistics {"mean", "var"}.


@scoped("batch_norm")
def batch_norm(x_NHWC, params: dict | None, stats: dict | None, *, train: bool,
               decay: float = 0.9, eps: float = 1e-5):
  """Returns ``(y, new_stats)``.

  Training: normalise with the batch statistics; the moving averages (if
  ``stats`` is given) move by ``decay`` towards the batch mean and the
  Bessel-corrected batch variance (as TF's fused batch norm feeds them).
  Evaluation (``train=False``): normalise with the moving averages.
  ``params=None`` means no learned scale/offset.
  """
  if train or stats is None:
    c = x_NHWC.shape[-1]
    scale = params["scale"] if params is not None else jnp.ones((c,), x_NHWC.dtype)
    offset = params["offset"] if params is not None else jnp.zeros((c,), x_NHWC.dtype)
    y, mean, var = _bn_batch(x_NHWC, scale, offset, jnp.asarray(eps, x_NHWC.dtype))
    new_stats = stats
    if stats is not None and train:
      n = x_NHWC.shape[0] * x_NHWC.shape[1] * x_NHWC.shape[2]
      unbiased = var * (n / max(n - 1, 1))
      d = jnp.asarray(decay, x_NHWC.dtype)
      new_stats = {"mean": d * stats["mean"] + (1 - d) * jax.lax.stop_gradient(mean),
                   "var": d * stats["var"] + (1 - d) * jax.lax.stop_gradient(unbiased)}
    return y, new_stats
  mean, var = stats["mean"], stats["var"]
  y = (x_NHWC - mean) * jax.lax.rsqrt(var + eps)
  if params is not None:
    y = y * params["scale"] + params["offset"]
  return y, stats


def _bn_batch_impl(x, scale, offset, eps):
  r = x.shape[0] * x.shape[1] * x.shape[2]
  # One pass over x for both moments, of x shifted by the batch mean of its
  # first pixel (close to the mean: var = E[d^2] - E[d]^2 with d = x - shift
  # then cancels only as far as that shift is from the mean, not as far as the
  # mean is from 0). A mean over the batch: a closer estimate than one
  # image's pixel.
  # And no ``x - mean`` in the forward: XLA merged it with the backward's own
  # ``x - mean`` and kept that centred copy alive from the forward pass to
  # the backward (micro search step: ~0.15 GB of the peak; written as
  # ``square(mean - x)`` it was still stored). The shift matters: the batch
  # mean of the centre pixel gave 5e-3 relative differences between the
  # traced and baked gradients of the tests' small micro child (this one:
  # 5e-5). A Welford-style reduction would not depend on it.
  shift = jax.lax.stop_gradient(jnp.mean(x[:, 0, 0], axis=0))
  d = x - shift
  s1, s2 = jnp.sum(d, (0, 1, 2)) / r, jnp.sum(jnp.square(d), (0, 1, 2)) / r
  mean, var = shift + s1, jnp.maximum(s2 - jnp.square(s1), 0.0)
  a = jax.lax.rsqrt(var + eps) * scale
  return x * a + (offset - mean * a), mean, var


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
  r = x.shape[0] * x.shape[1] * x.shape[2]
  rstd = jax.lax.rsqrt(var + eps)
  # Two plain reductions: 1.3-3x faster on XLA:CPU than one variadic reduce of
  # both (measured at [160, 32, 32, 20], [160, 16, 16, 40], [128, 32, 32, 36]).
  sg, sgx = jnp.sum(g, (0, 1, 2)), jnp.sum(g * (x - mean), (0, 1, 2))
  # dx = k1 g + k2 (x - mean) + k3, written with x itself: a standalone
  # ``x - mean`` needs only forward values, and XLA computed it during the
  # forward pass and kept it until here (one more activation-sized buffer per
  # batch norm). The mean and variance outputs feed the moving averages under
  # stop_gradient (zero cotangents); kept exact for any other use.
  k1 = scale * rstd
  k2 = g_var * (2.0 / r) - k1 * sgx * rstd * rstd / r
  k3 = g_mean / r - k1 * sg / r - k2 * mean
  dx = k1 * g + k2 * x + k3
  return dx, sgx * rstd, sg, jnp.zeros_like(eps)


_bn_batch.defvjp(_bn_batch_fwd, _bn_batch_bwd)


def bn_params(c: int) -> dict:
  return {"scale": jnp.ones((c,), jnp.float32), "offset": jnp.zeros((c,), jnp.float32)}


def bn_stats(c: int) -> dict:
  return {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)}


def he_normal(key, shape, fan_in: int | None = None):
  """Keras ``he_normal``: truncated normal (2 std), std = sqrt(2 / fan_in).

  The samples' deviation is exactly that (the truncation corrected for, as Keras
  since 2.2.3); the original's TF1-era Keras passed it uncorrected, giving about
  0.88x (README, "Differences from the original code").
  Inside :func:`init_with_one_draw` the values come from that function's single
  sample and ``key`` is not used."""
  if fan_in is None:
    fan_in = int(np.prod(shape[:-1]))
  std = np.sqrt(2.0 / fan_in) / 0.87962566103423978  # truncation correction
  if _draws.stream is not None:
    return _draws.stream.take(tuple(shape), std)
  return (std * jax.random.truncated_normal(key, -2.0, 2.0, shape)).astype(jnp.float32)


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


def init_with_one_draw(init_fn: Callable, key: jax.Array, *args):
  """``init_fn(key, *args)`` with every :func:`he_normal` weight cut from ONE
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
    raise AssertionError("init_with_one_draw: init_fn drew differently on its two passes "
                         f"({draw.offset} vs {total} values); it must not branch "
                         "on traced values.")
  return out


# ---------------------------------------------------------------------------
# Choosing one of several branches by a (traced or static) index.


def select_branch(index, branches: Sequence[Callable], operand, *, mode: str,
                  checkpoint: bool = True):
  """Runs ``branches[index](operand)``.

  * ``index`` a Python/numpy integer: the branch is called directly (a fixed
    network: the arc baked in, nothing else is built).
  * ``mode="switch"``: ``lax.switch``; with ``checkpoint``, a switch whose
    gradient is a second switch that recomputes the taken branch (see
    :func:`_checkpointed_switch`).
  * ``mode="mask"``: every branch runs and the chosen output is picked with
    ``jnp.where`` (never a multiply: 0 * inf = NaN from max-pool padding). Every
    branch must return the same pytree structure.
  """
  if isinstance(index, (int, np.integer)) or (isinstance(index, np.ndarray) and index.ndim == 0):
    return branches[int(index)](operand)
  if mode == "switch":
    if checkpoint:
      return _checkpointed_switch(index, tuple(branches), operand)
    return jax.lax.switch(index, list(branches), operand)
  if mode == "mask":
    outs = [b(operand) for b in branches]
    result = outs[0]
    for k in range(1, len(outs)):
      result = jax.tree.map(lambda r, o, k=k: jnp.where(index == k, o, r), result, outs[k])
    return result
  raise ValueError(f"op_select mode must be 'switch' or 'mask', got {mode!r}.")


def _checkpointed_switch(index, branches: tuple, operand):
  """``lax.switch(index, branches, operand)`` with a gradient that saves only
  ``(index, operand)`` and, in a second ``lax.switch``, recomputes the taken
  branch and pulls the cotangent back through it.

  ``jax.checkpoint`` around each branch did the same recomputation, but the
  forward conditional still had to return one joint residual tuple for all
  branches: every branch zero-filled the slots of the others (a full activation
  for a pool branch, every weight of the separable branches), 550 zero
  broadcasts per micro search step. Branches must not close over traced values
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

  The micro search child has 1,340 weight tensors. A reduction per leaf (and,
  under autodiff, the slices that transpose a concatenation) is a kernel per
  leaf for XLA to compile: the L2 term, the gradient norm and the global-norm
  clip together added ~30 s and ~0.7 GB to compiling the search step. Here the
  leaves are concatenated into one reduction, and the gradient (``2 x g``) is
  written per leaf, where it fuses with the optimizer's own element-wise work."""
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


def global_norm(tree) -> jax.Array:
  """The L2 norm of all leaves together (``optax.tree.norm``, one reduction)."""
  return jnp.sqrt(sum_of_squares(tree))


def l2_sum(tree) -> jax.Array:
  """The original's L2 term: sum of squares of every leaf (no 1/2)."""
  return sum_of_squares(tree)
