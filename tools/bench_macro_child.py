"""Throughput of one macro-child SGD step: shared child (traced arc) vs the arc baked in.

Each row times a jitted step ``(params, stats, arc, x, y, key) -> (params - 0.01 * grads,
new stats, loss)`` (mean cross-entropy, BN in training mode, dropout on). Shared rows get a
fresh random arc per step as an argument (one compilation for all); the ``static`` rows
compile one step per arc with the arc baked in (numpy; ``static`` with the ``cpu``
kernel set, ``static_xla`` with the ``xla`` set), and every variant is timed round-robin on
the *same* arcs; "vs static" is the median over arcs of the per-arc time ratio.

  python tools/bench_macro_child.py                      # the two default sizes
  python tools/bench_macro_child.py --sizes 8,16,128 --steps 5 --variants switch,static
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax.spaces import cifar_macro_child as M
from enas_jax.spaces.cifar_macro import MacroCodec

VARIANTS = {
    # name: (op_select, kernels, checkpoint_branches, static arc)
    "switch": ("switch", "cpu", True, False),
    "switch_xla": ("switch", "xla", True, False),
    "switch_nockpt": ("switch", "cpu", False, False),
    "mask": ("mask", "cpu", True, False),
    "static": ("switch", "cpu", True, True),
    "static_xla": ("switch", "xla", True, True),
}


def make_step(cfg, static_arc=None):
  def loss_fn(params, stats, arc, x, y, key):
    logits, _, new_stats = M.apply_shared(params, stats,
                                          arc if static_arc is None else static_arc,
                                          x, train=True, key=key, cfg=cfg)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), new_stats

  def step(params, stats, arc, x, y, key):
    (loss, new_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, arc, x, y,
                                                                    key)
    return jax.tree.map(lambda p, d: p - 0.01 * d, params, g), new_stats, loss

  return jax.jit(step, donate_argnums=(0, 1))


def run_size(L, C, B, variants, steps, warmup, hw, seed=0):
  """Compiles every variant (shared: once, warmed up on six arcs that cover every
  (layer, op) and ``warmup`` random arcs; static: once per timed arc), then times them round-robin on the same ``steps`` arcs, so that
  load changes on a shared machine hit every variant alike."""
  codec = MacroCodec(L)
  rng = np.random.default_rng(seed)
  arcs = [np.asarray(codec.sample_uniform(jax.random.key(int(rng.integers(1 << 30)))))
          for _ in range(warmup + steps)]
  # XLA:CPU finishes preparing a conditional's branch the first time it runs (measured
  # 10-40 ms per (layer, op) at first use), so the shared variants warm up on arcs that
  # use every op at every layer before the timed arcs.
  cover = []
  for op in range(M.NUM_OPS):
    a = arcs[op % len(arcs)].copy()
    a[codec.op_positions] = op
    cover.append(a)
  x = jax.random.normal(jax.random.key(1), (B, hw, hw, 3), jnp.float32)
  y = jax.random.randint(jax.random.key(2), (B,), 0, 10)
  key = jax.random.key(3)
  state, steps_of, compiles, times, loss = {}, {}, {}, {}, {}
  for name in variants:
    op_select, kernels, ckpt, static = VARIANTS[name]
    cfg = M.MacroChildConfig(num_layers=L, out_filters=C, op_select=op_select,
                             kernels=kernels, checkpoint_branches=ckpt)
    params, stats = M.init_shared(jax.random.key(0), cfg)
    compiles[name], times[name] = [], []
    if static:
      steps_of[name] = []
      for a in arcs[warmup:]:
        step = make_step(cfg, static_arc=a)
        t = time.perf_counter()
        params, stats, loss[name] = step(params, stats, jnp.asarray(a), x, y, key)
        jax.block_until_ready(loss[name])
        compiles[name].append(time.perf_counter() - t)  # compile + one step
        steps_of[name].append(step)
    else:
      step = make_step(cfg)
      for i, a in enumerate(cover + arcs[:warmup]):
        t = time.perf_counter()
        params, stats, loss[name] = step(params, stats, jnp.asarray(a, jnp.int32), x, y, key)
        jax.block_until_ready(loss[name])
        if i == 0:
          compiles[name].append(time.perf_counter() - t)  # compile + one step
      steps_of[name] = [step] * steps
    state[name] = (params, stats)
    print(f"compiled {name}: {np.mean(compiles[name]):.1f} s", flush=True)
  for i, a in enumerate(arcs[warmup:]):
    for name in variants:
      params, stats = state[name]
      t = time.perf_counter()
      params, stats, loss[name] = steps_of[name][i](params, stats, jnp.asarray(a, jnp.int32),
                                                    x, y, key)
      jax.block_until_ready((params, stats, loss[name]))
      times[name].append(time.perf_counter() - t)
      state[name] = (params, stats)
  rows = []
  for name in variants:
    op_select, kernels, ckpt, static = VARIANTS[name]
    med = float(np.median(times[name]))
    row = {"L": L, "C": C, "B": B, "variant": name, "op_select": op_select,
           "kernels": kernels, "checkpoint": ckpt, "static": static,
           "step_ms_median": 1e3 * med, "step_ms_min": 1e3 * float(np.min(times[name])),
           "step_ms_all": [1e3 * t for t in times[name]], "images_per_s": B / med,
           "compile_s": float(np.mean(compiles[name])),
           "compiles": (len(compiles[name]) if static else steps_of[name][0]._cache_size()),
           "loss": float(loss[name])}
    rows.append(row)
    print(json.dumps(row), flush=True)
  ref = next((r for r in rows if r["variant"] == "static"), None)
  if ref is not None:
    for r in rows:
      # Per-arc ratios (same arc, adjacent in time), then their median.
      r["ratio_vs_static"] = float(np.median(
          np.asarray(r["step_ms_all"]) / np.asarray(ref["step_ms_all"])))
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="12,36,128;8,16,128", help="L,C,B;L,C,B")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--steps", type=int, default=6)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--hw", type=int, default=32)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  print(f"backend={jax.default_backend()} devices={jax.devices()}", flush=True)
  allrows = []
  for size in args.sizes.split(";"):
    L, C, B = (int(v) for v in size.split(","))
    allrows += run_size(L, C, B, args.variants.split(","), args.steps, args.warmup, args.hw)
  print()
  print(f"{'L':>3} {'C':>3} {'B':>4} {'variant':<14} {'ms/step':>9} {'img/s':>8} "
        f"{'vs static':>9} {'compile s':>9} {'#comp':>5}   (ms/step: median; compile s: "
        f"first call)")
  for r in allrows:
    print(f"{r['L']:>3} {r['C']:>3} {r['B']:>4} {r['variant']:<14} {r['step_ms_median']:>9.1f} "
          f"{r['images_per_s']:>8.1f} {r.get('ratio_vs_static', float('nan')):>9.2f} "
          f"{r['compile_s']:>9.1f} {r['compiles']:>5}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(allrows, f, indent=1)


if __name__ == "__main__":
  main()
