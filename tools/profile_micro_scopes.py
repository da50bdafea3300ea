"""Where the micro search step's time goes, summed per named scope.

Runs the jitted SGD step of ``tools/bench_micro_child.py`` (a traced arc, or a
baked one with ``--static``) under ``jax.profiler``, maps every executed XLA
thunk to its HLO instruction's ``op_name`` metadata, and sums the thunk times
per innermost named scope (``depthwise``, ``batch_norm``, ``conv1x1``,
``pick_node``, ... set in ``conv_ops`` and ``cifar_micro_child``), split into
forward / backward (``transpose(...)`` in the name: gradients and the switch's
recomputation) and inside / outside a conditional. Thunks on the two cores can
overlap, so the sum may exceed the step's wall time. Prints one JSON object.

  python tools/profile_micro_scopes.py --batch 160
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_micro_child import add_size_args, make_step  # noqa: E402

from enas_jax.spaces import cifar_micro  # noqa: E402
from enas_jax.spaces import cifar_micro_child as mc  # noqa: E402

SCOPES = ("conv1x1", "conv", "depthwise", "avg_pool", "max_pool", "factorized_reduce",
          "batch_norm", "pick_node", "pick_weights", "calibrate", "combine", "node_write",
          "grad_write")


def _scope_of(op_name: str) -> str:
  best, pos = "", -1
  for k in SCOPES:
    for m in re.finditer(r"[(/]" + k + r"[)/]", op_name + "/"):
      if m.start() > pos:
        best, pos = k, m.start()
  if not best:
    best = "other:" + re.sub(r"\d+", "#", op_name.split("/")[-1])
  return best + (" bwd" if "transpose(" in op_name else " fwd") + (
      " (in cond)" if "/cond/" in op_name else "")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_size_args(ap)
  ap.add_argument("--static", action="store_true", help="bake the arc in")
  ap.add_argument("--steps", type=int, default=2, help="profiled steps (after 2 warm-up steps)")
  args = ap.parse_args(argv)

  cfg = mc.MicroChildConfig(num_layers=args.num_layers, num_nodes=args.num_nodes,
                            out_filters=args.out_filters)
  params, stats = mc.init_shared(jax.random.key(0), cfg)
  x = jax.random.normal(jax.random.key(1), (args.batch, args.image, args.image, 3))
  y = jax.random.randint(jax.random.key(2), (args.batch,), 0, 10)
  arc_np = np.asarray(cifar_micro.MicroCodec(args.num_nodes).sample_uniform(jax.random.key(5)))
  step = make_step(cfg, arc_np if args.static else None)
  arc = jnp.asarray(arc_np, jnp.int32)
  t0 = time.perf_counter()
  compiled = step.lower(params, stats, arc, x, y, jax.random.key(3)).compile()
  compile_s = time.perf_counter() - t0
  op_name = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", line)
    if m:
      op_name[m.group(1)] = m.group(2)
  for _ in range(2):
    params, stats, loss = compiled(params, stats, arc, x, y, jax.random.key(3))
  jax.block_until_ready(loss)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    t0 = time.perf_counter()
    for _ in range(args.steps):
      params, stats, loss = compiled(params, stats, arc, x, y, jax.random.key(3))
    jax.block_until_ready(loss)
    wall = (time.perf_counter() - t0) / args.steps
    jax.profiler.stop_trace()
    trace = json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  ms, count = collections.Counter(), collections.Counter()
  for e in events:
    name = op_name.get(e.get("name", "")) if e.get("ph") == "X" else None
    if name is not None:
      key = _scope_of(name)
      ms[key] += e.get("dur", 0) / 1000.0 / args.steps
      count[key] += 1
  print(json.dumps({
      "batch": args.batch, "static": args.static, "compile_s": round(compile_s, 1),
      "step_ms": round(1000 * wall, 1), "thunk_ms_total": round(sum(ms.values()), 1),
      "per_scope_ms": {k: round(v, 1) for k, v in ms.most_common()},
      "thunks_per_step": {k: count[k] // args.steps for k, _ in ms.most_common()}}, indent=1))


if __name__ == "__main__":
  main()
