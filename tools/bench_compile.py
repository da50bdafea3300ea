"""Cold compile time of the CIFAR children's train step: trace, lower, compile.

One SGD step (CE + 0.4 aux CE, gradients, new BN statistics) of a child, as
tools/bench_micro_child.py builds it; prints one JSON row per child with the
seconds spent tracing (``jax.make_jaxpr``), lowering (``jit(...).lower``) and
compiling (``.compile()``), the number of instructions of the optimized HLO
module, and optionally the run time of a few steps. Examples:

  python tools/bench_compile.py --child micro_final --num_layers 15 --out_filters 36 --batch 16
  python tools/bench_compile.py --child micro_search --num_layers 6 --out_filters 20
  python tools/bench_compile.py --child macro_search --num_layers 12 --out_filters 36
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from enas_jax.spaces import cifar_macro, cifar_micro  # noqa: E402
from enas_jax.spaces import cifar_macro_child as mac  # noqa: E402
from enas_jax.spaces import cifar_micro_child as mc  # noqa: E402


def _ce(logits, y):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def build(args):
  """(step, example arguments)."""
  extra = {}
  if args.scan_layers is not None:
    extra["scan_layers"] = args.scan_layers == "on"
  if args.child.startswith("micro"):
    cfg = mc.MicroChildConfig(num_layers=args.num_layers, out_filters=args.out_filters,
                              kernels=args.kernels, remat=args.remat, **extra)
    codec = cifar_micro.MicroCodec(cfg.num_nodes)
    arc = np.asarray(jax.jit(codec.sample_uniform)(jax.random.key(123)))
    if args.child == "micro_final":
      params, stats = mc.init_fixed(jax.random.key(0), cfg, arc)
      apply = lambda p, s, a, x, k: mc.apply_fixed(p, s, arc, x, train=True, key=k, cfg=cfg,
                                                   progress=0.5)
    else:
      params, stats = mc.init_shared(jax.random.key(0), cfg)
      apply = lambda p, s, a, x, k: mc.apply_shared(p, s, a, x, train=True, key=k, cfg=cfg)
  else:
    cfg = mac.MacroChildConfig(num_layers=args.num_layers, out_filters=args.out_filters,
                               kernels=args.kernels, **extra)
    codec = cifar_macro.MacroCodec(args.num_layers)
    arc = np.asarray(jax.jit(codec.sample_uniform)(jax.random.key(123)))
    params, stats = mac.init_shared(jax.random.key(0), cfg)
    apply = lambda p, s, a, x, k: mac.apply_shared(p, s, a, x, train=True, key=k, cfg=cfg)

  def step(params, stats, arc, x, y, key):
    def loss_fn(p):
      logits, aux, ns = apply(p, stats, arc, x, key)
      ce = _ce(logits, y)
      if aux is not None:
        ce = ce + 0.4 * _ce(aux, y)
      return ce, ns
    (loss, ns), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - 0.01 * g, params, g), ns, loss

  kx, ky = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (args.batch, 32, 32, 3), jnp.float32)
  y = jax.random.randint(ky, (args.batch,), 0, 10)
  return step, (params, stats, jnp.asarray(arc), x, y, jax.random.key(2))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--child", default="micro_final",
                  choices=("micro_final", "micro_search", "macro_search"))
  ap.add_argument("--num_layers", type=int, default=15)
  ap.add_argument("--out_filters", type=int, default=36)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--kernels", default="auto")
  ap.add_argument("--remat", default="none")
  ap.add_argument("--scan_layers", default=None, choices=(None, "on", "off"),
                  help="child.scan_layers (default: the config's default)")
  ap.add_argument("--hlo_out", default="", help="also write the optimized HLO text here")
  ap.add_argument("--steps", type=int, default=0, help="also time this many steps (median)")
  ap.add_argument("--interleave", action="store_true",
                  help="compile scan_layers off and on, then time their steps in turns "
                       "(the same load for both on a shared machine)")
  args = ap.parse_args(argv)
  if args.interleave:
    return interleave(args)
  step, a = build(args)
  t0 = time.perf_counter()
  jax.make_jaxpr(step)(*a)
  t1 = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(*a)
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  text = compiled.as_text() or ""
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(text)
  n_instr = sum(1 for line in text.splitlines() if re.match(r"\s+(ROOT )?%?[\w.\-]+ = ", line))
  row = {"child": args.child, "num_layers": args.num_layers, "out_filters": args.out_filters,
         "batch": args.batch, "scan_layers": args.scan_layers, "remat": args.remat,
         "trace_s": round(t1 - t0, 1), "lower_s": round(t2 - t1, 1),
         "compile_s": round(t3 - t2, 1), "hlo_instructions": n_instr,
         "load_avg": round(os.getloadavg()[0], 2)}
  if args.steps:
    state = list(a[:2])
    times = []
    for i in range(args.steps + 1):
      t = time.perf_counter()
      p, s, loss = compiled(*state, *a[2:])
      jax.block_until_ready(loss)
      if i:
        times.append(time.perf_counter() - t)
      else:
        first = time.perf_counter() - t
      state = [p, s]
    med = float(np.median(times))
    row.update(step_s=round(med, 3), img_s=round(args.batch / med, 1),
               first_step_s=round(first, 3))
  print(json.dumps(row), flush=True)


def interleave(args):
  runs = []
  for mode in ("off", "on"):
    args.scan_layers = mode
    step, a = build(args)
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*a).compile()
    runs.append({"mode": mode, "fn": compiled, "a": a, "state": list(a[:2]), "times": [],
                 "compile_s": round(time.perf_counter() - t, 1)})
  for i in range(args.steps + 1):
    for r in runs:
      t = time.perf_counter()
      p, s, loss = r["fn"](*r["state"], *r["a"][2:])
      jax.block_until_ready(loss)
      if i:
        r["times"].append(time.perf_counter() - t)
      r["state"] = [p, s]
  for r in runs:
    med = float(np.median(r["times"]))
    print(json.dumps({"child": args.child, "num_layers": args.num_layers, "batch": args.batch,
                      "remat": args.remat, "scan_layers": r["mode"],
                      "compile_s": r["compile_s"], "step_s": round(med, 3),
                      "img_s": round(args.batch / med, 1),
                      "load_avg": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
  main()
