"""Throughput of the micro search child's train step: shared (traced arc) vs baked.

One jitted SGD step (CE + 0.4 aux CE, grads, ``params - lr * grads``, new BN
statistics) per variant, at the search sizes by default (6 layers, C=20, B=5,
32x32):

* ``switch``: ``lax.switch`` op choice, the ``cpu`` kernel set, the per-cell
  custom gradient (``checkpoint_branches``);
* ``switch_xla``: ``lax.switch`` with the ``xla`` kernel set (XLA's own ops,
  each branch under ``jax.checkpoint``);
* ``switch_nockpt``: ``lax.switch``, ``cpu`` kernels, no per-branch checkpoint;
* ``mask``: all ops computed, ``jnp.where`` selection (same per-cell gradient);
* ``static``: the arc baked in (a numpy arc: no switch, no input gather).

Shared variants get a fresh uniform arc (an argument) every step (``fresh``)
and, for the ratio, the static row's own arc (``same_arc``).

The batch norm, pool and depthwise gradients this tool once prototyped now live
in ``enas_jax.kernels.cpu``. ``--compute_dtype`` sets the activations' dtype
(``child.compute_dtype``). Example:

  python tools/bench_micro_child.py --batch 160 --variants switch,static
  python tools/bench_micro_child.py --variants switch --compute_dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from enas_jax.spaces import cifar_micro
from enas_jax.spaces import cifar_micro_child as mc

VARIANTS = {
    "switch": {"op_select": "switch", "kernels": "cpu", "checkpoint_branches": True},
    "switch_xla": {"op_select": "switch", "kernels": "xla", "checkpoint_branches": True},
    "switch_nockpt": {"op_select": "switch", "kernels": "cpu", "checkpoint_branches": False},
    "mask": {"op_select": "mask", "kernels": "cpu", "checkpoint_branches": True},
    "static": {"op_select": "switch", "kernels": "cpu", "checkpoint_branches": True},
    "static_xla": {"op_select": "switch", "kernels": "xla", "checkpoint_branches": True},
    "static_nockpt": {"op_select": "switch", "kernels": "cpu", "checkpoint_branches": False},
}


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


def add_size_args(ap: argparse.ArgumentParser):
  """The search child's sizes (defaults: the paper's search: 6 layers, C=20, B=5)."""
  ap.add_argument("--batch", type=int, default=160)
  ap.add_argument("--num_layers", type=int, default=6)
  ap.add_argument("--out_filters", type=int, default=20)
  ap.add_argument("--num_nodes", type=int, default=5)
  ap.add_argument("--image", type=int, default=32)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_size_args(ap)
  ap.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
  ap.add_argument("--variants", default="switch,static")
  ap.add_argument("--no_aux", action="store_true")
  ap.add_argument("--slow_s", type=float, default=60.0,
                  help="a first step slower than this is the only one timed (no fresh arcs)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--json", default="", help="also write the rows to this file")
  args = ap.parse_args(argv)

  codec = cifar_micro.MicroCodec(args.num_nodes)
  sample = jax.jit(codec.sample_uniform)
  static_arc = np.asarray(sample(jax.random.key(args.seed + 123)))
  kx, ky = jax.random.split(jax.random.key(args.seed))
  x = jax.random.normal(kx, (args.batch, args.image, args.image, 3), jnp.float32)
  y = jax.random.randint(ky, (args.batch,), 0, 10)
  # Compile every variant first, then time them in interleaved rounds (one step
  # of each per round): on a shared machine the load drifts, and the ratios
  # should compare steps taken under the same conditions.
  runs = []
  for name in args.variants.split(","):
    base = name
    cfg = mc.MicroChildConfig(num_layers=args.num_layers, num_nodes=args.num_nodes,
                              out_filters=args.out_filters, use_aux_heads=not args.no_aux,
                              compute_dtype=args.compute_dtype, **VARIANTS[base])
    params, stats = mc.init_shared(jax.random.key(args.seed), cfg)
    step = make_step(cfg, static_arc if base.startswith("static") else None)
    t0 = time.perf_counter()
    compiled = step.lower(params, stats, jnp.asarray(static_arc), x, y,
                          jax.random.key(1)).compile()
    row = {"variant": name, "batch": args.batch, "compute_dtype": args.compute_dtype,
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
  st = next((q for q in rows if q["variant"].startswith("static")), None)
  for r in rows:
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
