"""Throughput of the micro search child's train step: shared (traced arc) vs baked.

One jitted SGD step (CE + 0.4 aux CE, grads, ``params - lr * grads``, new BN
statistics) per variant, at the search sizes by default (6 layers, C=20, B=5,
32x32):

* ``switch``: ``lax.switch`` op choice, custom-VJP conv, checkpointed branches;
* ``switch_plain``: ``lax.switch`` with plain XLA convolutions;
* ``switch_nockpt``: ``lax.switch``, custom conv, no per-branch checkpoint;
* ``mask``: all ops computed, ``jnp.where`` selection;
* ``static``: the arc baked in (a numpy arc: no switch, no input gather).

Shared variants get a fresh uniform arc (an argument) every step (``fresh``)
and, for the ratio, the static row's own arc (``same_arc``).

``--fast_ops`` first replaces four ``conv_ops`` helpers by the versions below
(a *proposal* for ``conv_ops``, prototyped here): on XLA:CPU the autodiff
gradients of the shifted-slice depthwise convolution, of the pools and of the
batch norm are several times slower than their forward passes; hand-written
VJPs fix that (stride-1 depthwise 3-4x, max pool 7x, avg pool 5x, batch norm
8x for fwd+bwd on [160, 32, 32, 20] in isolation). Example:

  python tools/bench_micro_child.py --batch 160 --variants switch,static --fast_ops
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from enas_jax.spaces import cifar_micro, conv_ops
from enas_jax.spaces import cifar_micro_child as mc

VARIANTS = {
    "switch": {"op_select": "switch", "conv_impl": "custom", "checkpoint_branches": True},
    "switch_plain": {"op_select": "switch", "conv_impl": "plain", "checkpoint_branches": True},
    "switch_nockpt": {"op_select": "switch", "conv_impl": "custom",
                      "checkpoint_branches": False},
    "mask": {"op_select": "mask", "conv_impl": "custom", "checkpoint_branches": True},
    "static": {"op_select": "switch", "conv_impl": "custom", "checkpoint_branches": True},
    "static_nockpt": {"op_select": "switch", "conv_impl": "custom",
                      "checkpoint_branches": False},
}


# ----------------------------------------------------------------------------
# Proposed conv_ops helpers with hand-written VJPs (stride 1, NHWC, TF SAME).
def _pads(k: int) -> tuple[int, int]:
  return (k - 1) // 2, k - 1 - (k - 1) // 2


def _windows(x, k, lo, hi, pad_value=0.0):
  """The k*k shifted [N,H,W,C] views of x padded by (lo, hi) on H and W."""
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)), constant_values=pad_value)
  return [xp[:, a:a + h, b:b + w, :] for a in range(k) for b in range(k)]


def _fused_sums(xs, dims):
  """Sums of several same-shape arrays over ``dims`` in ONE variadic reduce: XLA
  emits one loop that reads its inputs once (25 separate reductions each
  re-read them and materialise a shifted copy first)."""
  xs = tuple(xs)
  return jax.lax.reduce(xs, tuple(jnp.zeros((), x.dtype) for x in xs),
                        lambda u, v: tuple(p + q for p, q in zip(u, v)), dims)


def _depthwise_corr(x, w, lo, hi):
  out = None
  for (a, b), xs in zip(np.ndindex(w.shape[0], w.shape[1]), _windows(x, w.shape[0], lo, hi)):
    t = xs * w[a, b]
    out = t if out is None else out + t
  return out


@jax.custom_vjp
def depthwise_s1(x_NHWC, w_HWC):
  """Stride-1 SAME depthwise conv as shifted slices, with a hand-written VJP."""
  return _depthwise_corr(x_NHWC, w_HWC, *_pads(w_HWC.shape[0]))


def _depthwise_fwd(x, w):
  return depthwise_s1(x, w), (x, w)


def _depthwise_bwd(res, g):
  x, w = res
  k = w.shape[0]
  lo, hi = _pads(k)
  # dx: the same shifted-slice correlation of g with the flipped kernel.
  dx = _depthwise_corr(g, jnp.flip(w, (0, 1)), hi, lo)
  # dw[a,b,c] = sum_{n,h,w} xpad[n,h+a,w+b,c] g[n,h,w,c]: all taps in one pass
  # over (n, h), then over w (a shorter sequential sum: float32 accuracy).
  part = _fused_sums([xs * g for xs in _windows(x, k, lo, hi)], (0, 1))
  dw = jnp.stack([p.sum(0) for p in part]).reshape(w.shape)
  return dx, dw.astype(w.dtype)


depthwise_s1.defvjp(_depthwise_fwd, _depthwise_bwd)


def _pool_count(h, w, k, dtype):
  lo, hi = _pads(k)
  ones = np.pad(np.ones((h, w), np.float32), ((lo, hi), (lo, hi)))
  cnt = sum(ones[a:a + h, b:b + w] for a in range(k) for b in range(k))
  return jnp.asarray(cnt[None, :, :, None], dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def avg_pool_s1(x_NHWC, k=3):
  """Stride-1 SAME average pool (divisor excludes padding), hand-written VJP."""
  lo, hi = _pads(k)
  return sum(_windows(x_NHWC, k, lo, hi)) / _pool_count(x_NHWC.shape[1], x_NHWC.shape[2], k,
                                                        x_NHWC.dtype)


def _avg_fwd(x, k):
  return avg_pool_s1(x, k), x.shape


def _avg_bwd(k, shape, g):
  lo, hi = _pads(k)
  gc = g / _pool_count(shape[1], shape[2], k, g.dtype)
  return (sum(_windows(gc, k, hi, lo)),)


avg_pool_s1.defvjp(_avg_fwd, _avg_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_s1(x_NHWC, k=3):
  """Stride-1 SAME max pool, hand-written VJP."""
  lo, hi = _pads(k)
  out = None
  for xs in _windows(x_NHWC, k, lo, hi, -jnp.inf):
    out = xs if out is None else jnp.maximum(out, xs)
  return out


def _max_fwd(x, k):
  y = max_pool_s1(x, k)
  return y, (x, y)


def _max_bwd(k, res, g):
  # Gather form: input p collects g of every window whose maximum equals x[p].
  # Differs from TF's MaxPoolGrad (first maximum only) on exact ties only.
  x, y = res
  lo, hi = _pads(k)
  dx = None
  for ys, gs in zip(_windows(y, k, hi, lo, jnp.nan), _windows(g, k, hi, lo, 0.0)):
    t = jnp.where(x == ys, gs, 0.0)
    dx = t if dx is None else dx + t
  return (dx,)


max_pool_s1.defvjp(_max_fwd, _max_bwd)


@jax.custom_vjp
def _bn_batch(x, scale, offset, eps):
  """Training-mode batch norm over (N, H, W): returns (y, mean, biased var)."""
  return _bn_batch_impl(x, scale, offset, eps)


def _bn_batch_impl(x, scale, offset, eps):
  r = x.shape[0] * x.shape[1] * x.shape[2]
  mean = jnp.sum(x, (0, 1, 2)) / r
  var = jnp.sum(jnp.square(x - mean), (0, 1, 2)) / r
  return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + offset, mean, var


def _bn_batch_fwd(x, scale, offset, eps):
  y, mean, var = _bn_batch_impl(x, scale, offset, eps)
  return (y, mean, var), (x, scale, mean, var, eps)


def _bn_batch_bwd(res, cts):
  x, scale, mean, var, eps = res
  g, g_mean, g_var = cts
  r = x.shape[0] * x.shape[1] * x.shape[2]
  rstd = jax.lax.rsqrt(var + eps)
  xc = x - mean
  sg, sgx = _fused_sums((g, g * xc), (0, 1, 2))
  dx = (scale * rstd) * (g - sg / r - xc * (sgx * rstd * rstd / r))
  dx = dx + g_mean / r + g_var * (2.0 / r) * xc  # exact, if mean/var are differentiated
  return dx, sgx * rstd, sg, jnp.zeros_like(eps)


_bn_batch.defvjp(_bn_batch_fwd, _bn_batch_bwd)


def patch_conv_ops(ops=conv_ops):
  """Swaps the proposed helpers into ``conv_ops`` (stride 1, ``impl="custom"``
  for the depthwise conv; everything else falls through to the originals)."""
  orig = {"depthwise_conv2d": ops.depthwise_conv2d, "avg_pool": ops.avg_pool,
          "max_pool": ops.max_pool, "batch_norm": ops.batch_norm}

  def depthwise_conv2d(x, w, stride=1, impl="plain"):
    if impl == "custom" and stride == 1:
      return depthwise_s1(x, w)
    return orig["depthwise_conv2d"](x, w, stride, impl)

  def avg_pool(x, k=3, stride=1):
    return avg_pool_s1(x, k) if stride == 1 else orig["avg_pool"](x, k, stride)

  def max_pool(x, k=3, stride=1):
    return max_pool_s1(x, k) if stride == 1 else orig["max_pool"](x, k, stride)

  def batch_norm(x, params, stats, *, train, decay=0.9, eps=1e-5):
    if params is None or not (train or stats is None):
      return orig["batch_norm"](x, params, stats, train=train, decay=decay, eps=eps)
    y, mean, var = _bn_batch(x, params["scale"], params["offset"], jnp.float32(eps))
    new_stats = stats
    if stats is not None:
      n = x.shape[0] * x.shape[1] * x.shape[2]
      unbiased = var * (n / max(n - 1, 1))
      d = jnp.asarray(decay, x.dtype)
      new_stats = {"mean": d * stats["mean"] + (1 - d) * jax.lax.stop_gradient(mean),
                   "var": d * stats["var"] + (1 - d) * jax.lax.stop_gradient(unbiased)}
    return y, new_stats

  ops.depthwise_conv2d, ops.avg_pool = depthwise_conv2d, avg_pool
  ops.max_pool, ops.batch_norm = max_pool, batch_norm
  return orig


# ----------------------------------------------------------------------------
def make_step(cfg, arc_static=None, lr=0.01, aux_weight=0.4):
  """Jitted ``(params, stats, arc, x, y, key) -> (params, stats, loss)``."""
  def step(params, stats, arc, x, y, key):
    if arc_static is not None:
      arc = arc_static

    def loss_fn(p):
      logits, aux, ns = mc.apply_shared(p, stats, arc, x, train=True, key=key, cfg=cfg)
      ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
      if aux is not None:
        ce = ce + aux_weight * -jnp.mean(
            jnp.take_along_axis(jax.nn.log_softmax(aux), y[:, None], 1))
      return ce, ns

    (loss, ns), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - lr * g, params, g)
    return params, ns, loss

  return jax.jit(step, donate_argnums=(0, 1))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=160)
  ap.add_argument("--num_layers", type=int, default=6)
  ap.add_argument("--out_filters", type=int, default=20)
  ap.add_argument("--num_nodes", type=int, default=5)
  ap.add_argument("--image", type=int, default=32)
  ap.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
  ap.add_argument("--variants", default="switch,static")
  ap.add_argument("--no_aux", action="store_true")
  ap.add_argument("--slow_s", type=float, default=60.0,
                  help="a first step slower than this is the only one timed (no fresh arcs)")
  ap.add_argument("--fast_ops", action="store_true", help="apply patch_conv_ops() first")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", default="", help="also write the rows to this file")
  args = ap.parse_args(argv)
  if args.fast_ops:
    patch_conv_ops()

  codec = cifar_micro.MicroCodec(args.num_nodes)
  sample = jax.jit(codec.sample_uniform)
  static_arc = np.asarray(sample(jax.random.key(args.seed + 123)))
  kx, ky = jax.random.split(jax.random.key(args.seed))
  x = jax.random.normal(kx, (args.batch, args.image, args.image, 3), jnp.float32)
  y = jax.random.randint(ky, (args.batch,), 0, 10)
  # Compile every variant first, then time them in interleaved rounds (one step
  # of each per round): on a shared machine the load drifts, and the ratios
  # should compare steps taken under the same conditions.
  # A variant name ending in "+fast" is traced with patch_conv_ops() applied.
  runs = []
  for name in args.variants.split(","):
    base, fast = name.removesuffix("+fast"), name.endswith("+fast") or args.fast_ops
    cfg = mc.MicroChildConfig(num_layers=args.num_layers, num_nodes=args.num_nodes,
                              out_filters=args.out_filters, use_aux_heads=not args.no_aux,
                              **VARIANTS[base])
    params, stats = mc.init_shared(jax.random.key(args.seed), cfg)
    step = make_step(cfg, static_arc if base.startswith("static") else None)
    t0 = time.perf_counter()
    orig = patch_conv_ops() if fast and not args.fast_ops else None
    compiled = step.lower(params, stats, jnp.asarray(static_arc), x, y,
                          jax.random.key(1)).compile()
    if orig:
      for k, v in orig.items():
        setattr(conv_ops, k, v)
    row = {"variant": name, "batch": args.batch, "fast_ops": fast,
           "compile_s": round(time.perf_counter() - t0, 1)}
    print(f"  {name}: compiled in {row['compile_s']}s", file=sys.stderr, flush=True)
    modes = ["same_arc"] if base.startswith("static") else ["same_arc", "fresh"]
    runs.append({"row": row, "fn": compiled, "state": [params, stats], "modes": modes,
                 "times": {m: [] for m in modes}})
  for i in range(args.steps + 1):
    for run in runs:
      row = run["row"]
      for mode in run["modes"]:
        if row.get("slow") and (i > 0 or mode == "fresh"):
          continue
        arc = sample(jax.random.key(1000 + i)) if mode == "fresh" else jnp.asarray(static_arc)
        jax.block_until_ready(arc)
        t = time.perf_counter()
        params, stats, loss = run["fn"](*run["state"], arc, x, y, jax.random.key(i))
        jax.block_until_ready(loss)
        dt = time.perf_counter() - t
        run["state"] = [params, stats]
        print(f"  {row['variant']} {mode} step {i}: {dt:.2f}s", file=sys.stderr, flush=True)
        if i > 0:  # the first call pays one-off allocation costs
          run["times"][mode].append(dt)
        elif dt > args.slow_s:  # too slow to repeat: this step is the measurement
          run["times"][mode].append(dt)
          row["slow"] = True
  rows = []
  for run in runs:
    row = run["row"]
    for mode, times in run["times"].items():
      if times:
        med = float(np.median(times))
        row[f"{mode}_step_s"] = round(med, 3)
        row[f"{mode}_img_s"] = round(args.batch / med, 1)
    rows.append(row)
    print(json.dumps(row), flush=True)
  for r in rows:
    # The ratio's baseline: the static row with the same conv_ops.
    st = next((q for q in rows if q["variant"].startswith("static")
               and q["fast_ops"] == r["fast_ops"]), None)
    if st and not r["variant"].startswith("static"):
      r["ratio_same_arc"] = round(r["same_arc_step_s"] / st["same_arc_step_s"], 2)
      if "fresh_step_s" in r:
        r["ratio_fresh"] = round(r["fresh_step_s"] / st["same_arc_step_s"], 2)
      print(f"{r['variant']}: shared/static {r['ratio_same_arc']} (same arc), "
            f"{r.get('ratio_fresh')} (fresh arcs)", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
