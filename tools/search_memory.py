"""Where a CIFAR training step's memory goes: the process's RSS at each stage.

Builds the benchmark's chunk (a search config: the ``shared`` search chunk,
controller-sampled arc; a final config: the ``final`` chunk of its fixed arc;
child update with its optimizer, ``steps_per_dispatch`` steps per call) on
synthetic images, compiles it ahead of time, then runs a few chunks, and prints
one JSON object:

* ``rss_*_mb``: resident memory after imports, after building the task, after
  the child's first state, right after compiling (the compiler's freed heap
  already handed back: ``enas_jax.memory``), and the highest while chunks run;
* ``compile_peak_mb``: the highest RSS while compiling (sampled every 20 ms);
* ``temp_mb`` / ``argument_mb`` / ``output_mb``: XLA's ``memory_analysis`` of
  the compiled chunk (its temporaries are one block allocated per call);
* ``weight_tensors``: the number of weight arrays (each one is its own gather,
  gradient and optimizer work to compile).

``peak_rss_mb`` of ``python -m enas_jax.benchmark`` is the maximum of these
over the whole process. Examples:

  python tools/search_memory.py --config=configs/cifar_micro.py
  python tools/search_memory.py --config=configs/cifar_macro.py --config.child.out_filters=16
  python tools/search_memory.py --config=configs/cifar_micro.py:final --config.child.remat=cells
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from enas_jax import benchmark  # noqa: E402  (defines --config, as for the benchmark)

_CHUNKS = flags.DEFINE_integer("chunks", 3, "chunks to run after compiling")


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Sampler:
  """The highest RSS seen since the last :meth:`reset` (a daemon thread)."""

  def __init__(self, period_s: float = 0.02):
    self.high = _rss_mb()
    self.period_s = period_s
    threading.Thread(target=self._run, daemon=True).start()

  def _run(self):
    while True:
      self.high = max(self.high, _rss_mb())
      time.sleep(self.period_s)

  def reset(self) -> float:
    high, self.high = self.high, _rss_mb()
    return high


def main(argv):
  del argv
  sampler = _Sampler()
  import jax
  import jax.numpy as jnp

  from enas_jax import aot, memory, parallel
  from enas_jax.train.image import ImageTask
  from enas_jax.train.run import build_space, resolve_arc

  memory.release_after_compiles()
  config = benchmark._CONFIG.value
  out = {"rss_imports_mb": round(_rss_mb())}
  mesh = parallel.make_mesh()
  space, arc = build_space(config), None
  if config.mode == "final":
    space, arc = resolve_arc(config, space)
  task = ImageTask(config, benchmark.synthetic_images(int(config.data.batch_size) * 4), mesh,
                   shared=arc is None, arc=arc)
  row = "final" if arc is not None else "shared"
  chunk, ctrl_params = aot.chunk_for_row(task, space, row, arc, config, mesh)
  out["rss_task_mb"] = round(_rss_mb())
  state = task.init_child(jax.random.key(0))
  jax.block_until_ready(state)
  out["rss_child_state_mb"] = round(_rss_mb())
  out["weight_tensors"] = len(jax.tree.leaves(state.params))
  arrays, key = task.data, jax.random.key(3)
  sampler.reset()
  t0 = time.perf_counter()
  compiled = chunk.jitted.lower(arrays, state, ctrl_params, key, jnp.int32(1)).compile()
  out["compile_s"] = round(time.perf_counter() - t0, 1)
  out["compile_peak_mb"] = round(sampler.reset())
  out["rss_after_compile_mb"] = round(_rss_mb())
  m = compiled.memory_analysis()
  for name in ("temp", "argument", "output"):
    out[f"{name}_mb"] = round(getattr(m, f"{name}_size_in_bytes") / 2**20, 1)
  s = task.settings
  n = (s.search if arc is None else s.final).steps_per_dispatch
  for _ in range(_CHUNKS.value):
    state, acc = compiled(arrays, state, ctrl_params, key, jnp.int32(n))
    jax.block_until_ready(acc)
  out["rss_run_peak_mb"] = round(sampler.reset())
  out["peak_rss_mb"] = round(benchmark._peak_rss_mb())
  print(json.dumps(out))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
