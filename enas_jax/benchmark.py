"""Throughput, compilations and memory of the child step, as JSON lines.

    python -m enas_jax.benchmark --config=configs/ptb.py[:variant] [--steps N] [--config.x=y ...]

Works for every space: PTB rows report ``tokens_per_s``, CIFAR rows
``examples_per_s`` (images), with the ``op_select`` and ``kernels`` that ran
(``--config.child.op_select=switch|mask`` selects the variant).

On a search config it prints a ``shared`` row (the search step: a fresh arc
from the controller every step, one compiled function), a ``fixed`` row (the
same network with one arc baked in as Python constants: only the used weights,
no switch, no gather), and a last line with ``shared_over_fixed``: time per step
of the shared step *on that same arc* over the fixed step's. On a final config
it prints one ``final`` row (the final-training network).

With ``--aot=tpu:v5e:2x2`` (any TPU slice libtpu knows) the same chunks are
compiled for that slice on this host, without a TPU, and never run: the rows
report XLA's FLOPs and bytes per example, the HBM plan per chip and a roofline
estimate instead of timings (:mod:`enas_jax.aot`).

Each row runs in a fresh subprocess so that ``peak_rss_mb`` (the process's peak
resident memory) belongs to that row alone. Data are synthetic with the
configured shapes (vocabulary, batch, BPTT; random uint8 images): only speed
is measured.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps per row (>= 50 for the compile-count check).")
_KEEP_HEAP = flags.DEFINE_bool(
    "keep_compiler_heap", False, "Skip enas_jax.memory's malloc_trim after each long compile "
    "(on by default here and in `python -m enas_jax.main`), to measure what it saves.")
_ROW = flags.DEFINE_string("row", "", "Internal: run one row in this process "
                           "(shared, shared_fixed_arc, fixed, final).")
_AOT = flags.DEFINE_string(
    "aot", "", "Compile the rows for a TPU slice without running them, e.g. tpu:v5e:2x2 "
    "(libtpu, `pip install -e .[tpu]`; no TPU needed): FLOPs, bytes, HBM per chip, roofline.")


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _tree_bytes(tree) -> int:
  import jax
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def _synthetic_corpus(config, steps: int):
  import numpy as np
  from enas_jax.data.ptb import Corpus
  rng = np.random.default_rng(0)
  d = config.data
  V = int(d.vocab_size)
  n_train = int(d.batch_size) * (int(d.bptt) * min(steps + 2, 64) + 2)
  n_eval = int(d.eval_batch_size) * (int(d.bptt) * 4 + 2)
  mk = lambda n: rng.integers(0, V, n).astype(np.int32)  # noqa: E731
  return Corpus(train=mk(n_train), valid=mk(n_eval), test=mk(n_eval),
                vocab=[f"w{i}" for i in range(V)], name="benchmark")


# jax.monitoring's duration events of one compilation, by the name the rows use.
_COMPILE_PHASES = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "xla_compile_s",
}


class _CompilePhases:
  """Seconds jax spends tracing, lowering and in XLA's compiler (every jitted
  function, all threads) inside ``with``: where a row's ``compile_s`` goes."""

  def __init__(self):
    self.seconds = dict.fromkeys(_COMPILE_PHASES.values(), 0.0)

  def _listener(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in _COMPILE_PHASES:
      self.seconds[_COMPILE_PHASES[event]] += duration

  def __enter__(self) -> "_CompilePhases":
    import jax
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc) -> None:
    import jax
    jax.monitoring.unregister_event_duration_listener(self._listener)


def _time_chunk(chunk, state, ctrl_params, steps: int, spd: int):
  """Compiles (one step), then times ``steps`` steps in dispatches of ``spd``.
  Returns (state, last sums, compile seconds, timed seconds, peak RSS before
  compiling, the compile's phases: trace / lower / XLA seconds, and the
  executable cache's part: hit or miss, load seconds, the check's wait)."""
  import jax
  import jax.numpy as jnp
  key = jax.random.key(3)
  rss_before = _peak_rss_mb()
  t0 = time.perf_counter()
  with _CompilePhases() as phases:
    state, acc = chunk(state, ctrl_params, key, jnp.int32(1))  # compiles
    jax.block_until_ready(acc)
  compile_s = time.perf_counter() - t0
  # A step loaded from the executable cache is checked in the background
  # (traced and lowered again): finished before the timed steps, timed apart.
  from enas_jax import exec_cache
  t0 = time.perf_counter()
  exec_cache.wait_verified()
  cache = {"exec_cache": chunk.cached.last_source,  # disk (a hit), compiled, jit (off)
           # the load (a hit) or trace + lower + compile (a miss) of the step
           "exec_cache_load_s": round(chunk.cached.last_seconds, 3),
           "exec_cache_check_wait_s": round(time.perf_counter() - t0, 3)}
  done = 0
  t0 = time.perf_counter()
  while done < steps:
    n = min(spd, steps - done)
    state, acc = chunk(state, ctrl_params, key, jnp.int32(n))
    done += n
  jax.block_until_ready(state)
  dt = time.perf_counter() - t0
  if int(acc["first_bad"]) >= 0:
    raise RuntimeError(f"non-finite loss during the benchmark at step {int(acc['first_bad'])}")
  return state, acc, compile_s, dt, rss_before, {
      k: round(v, 3) for k, v in phases.seconds.items()}, cache


def synthetic_images(n: int):
  """``n`` random 32x32 training images (uint8) and labels, no validation or
  test split: the benchmark's data (real shapes, no disk)."""
  import numpy as np
  from enas_jax.data.cifar10 import ImageData
  rng = np.random.default_rng(0)
  empty = np.zeros((0, 32, 32, 3), np.uint8)
  return ImageData(
      train_x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
      train_y=rng.integers(0, 10, n).astype(np.int32),
      valid_x=empty, valid_y=np.zeros((0,), np.int32),
      test_x=empty, test_y=np.zeros((0,), np.int32),
      mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.25, np.float32), source="benchmark")


def _steps_per_dispatch(task, config) -> int:
  """Steps per compiled chunk of the row's stage, from the task's typed settings."""
  stage = task.settings.search if config.mode == "search" else task.settings.final
  return stage.steps_per_dispatch


def _image_row(config, row: str, steps: int) -> dict:
  import jax
  from enas_jax import aot, parallel, spaces
  from enas_jax.train.image import ImageTask
  from enas_jax.train.run import build_space

  mesh = parallel.make_mesh()
  space = build_space(config)
  space, arc, config = aot.row_arc(config, space, row)
  b = int(config.data.batch_size)
  images = synthetic_images(b * 4)
  shared = row in ("shared", "shared_fixed_arc", "fixed")
  task = ImageTask(config, images, mesh, shared=shared, arc=None if shared else arc)
  chunk, ctrl_params = aot.chunk_for_row(task, space, row, arc, config, mesh)
  state = task.init_child(jax.random.key(0))
  spd = _steps_per_dispatch(task, config)
  state, acc, compile_s, dt, rss_before, phases, cache = _time_chunk(
      chunk, state, ctrl_params, steps, spd)
  cfg = task.fns.cfg
  state_bytes = 2 * _tree_bytes(state.params) + _tree_bytes(state.opt_state)
  return {
      "space": space.name, "mode": row, "backend": jax.default_backend(),
      "devices": len(jax.devices()), "batch_size": b,
      **({"num_layers": int(config.space.num_layers)} if "num_layers" in config.space else {}),
      **{f: getattr(space, f) for f in spaces.entry(space.name).size_fields},
      "out_filters": int(config.child.out_filters), "op_select": cfg.op_select,
      "kernels": cfg.kernels, "compute_dtype": cfg.compute_dtype,
      "checkpoint_branches": cfg.checkpoint_branches,
      "num_params": task.count_params(state.params),
      "compile_count": int(chunk._cache_size()), "compile_s": round(compile_s, 3),
      "compile_phases": phases, **cache,
      "steps": steps, "steps_per_s": round(steps / dt, 4),
      "examples_per_s": round(steps * b / dt, 1), "ms_per_step": round(1000 * dt / steps, 2),
      "arc": space.format(arc) if row != "shared" else "sampled per step",
      "state_mb": round(state_bytes / 2**20, 1), "peak_rss_mb": round(_peak_rss_mb(), 1),
      "rss_before_compile_mb": round(rss_before, 1),
  }


def run_row(config, row: str, steps: int) -> dict:
  """Measures one row in this process and returns its JSON dict."""
  from enas_jax import spaces
  if spaces.entry(config.space.name).task == "image":
    return _image_row(config, row, steps)
  import jax
  from enas_jax import aot, parallel
  from enas_jax.spaces import ptb_child
  from enas_jax.train.lm import LMTask
  from enas_jax.train.run import build_space

  mesh = parallel.make_mesh()
  space = build_space(config)
  # The arc timed by the fixed row (and by shared_fixed_arc): the paper's cell
  # when the space has 12 nodes, else a fixed uniform sample.
  space, arc, config = aot.row_arc(config, space, row)
  corpus = _synthetic_corpus(config, steps)
  shared = row in ("shared", "shared_fixed_arc")
  task = LMTask(config, corpus, mesh, shared=shared)
  chunk, ctrl_params = aot.chunk_for_row(task, space, row, arc, config, mesh)
  state = task.init_child(jax.random.key(0))
  num_params = task.count_params(state.params)
  spd = _steps_per_dispatch(task, config)
  state, acc, compile_s, dt, rss_before, phases, cache = _time_chunk(
      chunk, state, ctrl_params, steps, spd)
  # Bytes the step must hold: parameters, the gradient it computes (the used
  # slices for the shared step; all weights for a fixed one) and optimizer state.
  view = ptb_child.gather(state.params, arc, task.cc) if shared else state.params
  state_bytes = _tree_bytes(state.params) + _tree_bytes(view) + _tree_bytes(state.opt_state)
  B, T = task.batch_size, task.bptt
  # With variable-length windows the tokens per step are the mean real length.
  tokens = float(acc["tokens"]) / max(int(acc["n"]), 1) * B if task.random_bptt else B * T
  return {
      "space": space.name, "mode": row, "backend": jax.default_backend(),
      "devices": len(jax.devices()), "batch_size": B, "bptt": T,
      "hidden_size": task.cc.hidden_size, "num_nodes": space.num_nodes,
      "vocab_size": task.cc.vocab_size, "op_select": task.cc.op_select,
      "compute_dtype": task.cc.compute_dtype,
      "share_across_activations": task.cc.share_across_activations,
      "num_params": num_params, "compile_count": int(chunk._cache_size()),
      "compile_s": round(compile_s, 3), "compile_phases": phases, **cache, "steps": steps,
      "steps_per_s": round(steps / dt, 4), "tokens_per_s": round(steps * tokens / dt, 1),
      "random_bptt": task.random_bptt,
      "ms_per_step": round(1000 * dt / steps, 2),
      "arc": space.format(arc) if row != "shared" else "sampled per step",
      "state_mb": round(state_bytes / 2**20, 1), "peak_rss_mb": round(_peak_rss_mb(), 1),
      "rss_before_compile_mb": round(rss_before, 1), "remat": task.cc.remat,
  }


def _run_subprocess(row: str) -> dict:
  args = [sys.executable, "-m", "enas_jax.benchmark", f"--row={row}"] + [
      a for a in sys.argv[1:] if not a.startswith("--row")]
  env = dict(os.environ)
  if _AOT.value:  # the host compiles for the TPU slice: keep jax off any local accelerator
    env.setdefault("JAX_PLATFORMS", "cpu")
  out = subprocess.run(args, capture_output=True, text=True, env=env)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode != 0 or not lines:
    raise RuntimeError(f"benchmark row {row} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(lines[-1])


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/ptb.py:search")
  # On before anything compiles (the rows run this main).
  from enas_jax import compile_cache, xla_options
  try:
    cache_dir = compile_cache.enable(config=config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if _AOT.value:
    from enas_jax import aot
    try:
      aot.topology_devices(aot.parse_target(_AOT.value))  # a clear error before any row
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  if _ROW.value:
    from enas_jax import memory
    released = not _KEEP_HEAP.value and memory.release_after_compiles()
    cache_stats = compile_cache.CacheStats().start()  # the row's compilations
    if _AOT.value:
      row = aot.compile_row(config, _ROW.value, _AOT.value)
      row["peak_rss_mb"] = round(_peak_rss_mb(), 1)  # of the host compile
    else:
      row = run_row(config, _ROW.value, _STEPS.value)
    row["compiler_heap_released"] = bool(released)
    row["compile_cache"], row["compile_cache_hit"] = cache_dir, cache_stats.stop().hit
    row["xla_cpu_options"] = xla_options.active()  # enas_jax.xla_options
    print(json.dumps(row), flush=True)
    return
  if _AOT.value:
    # The search chunk (controller sampling) and the fixed network; or the final one.
    for row in (("shared", "fixed") if config.mode == "search" else ("final",)):
      print(json.dumps(_run_subprocess(row)), flush=True)
    return
  if config.mode == "search":
    shared = _run_subprocess("shared")
    print(json.dumps(shared), flush=True)
    fixed = _run_subprocess("fixed")
    print(json.dumps(fixed), flush=True)
    same_arc = _run_subprocess("shared_fixed_arc")
    print(json.dumps(same_arc), flush=True)
    print(json.dumps({
        "shared_over_fixed": round(same_arc["ms_per_step"] / fixed["ms_per_step"], 3),
        "shared_sampled_over_fixed": round(shared["ms_per_step"] / fixed["ms_per_step"], 3),
        "arc": fixed["arc"], "op_select": shared["op_select"],
        **({"kernels": shared["kernels"]} if "kernels" in shared else {})}), flush=True)
  else:
    print(json.dumps(_run_subprocess("final")), flush=True)


if __name__ == "__main__":
  app.run(main)
