"""Shared test helpers: tiny configs, the compile flags and persistent compilation
cache of the suite, and the order its files run in."""

import gc
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# The tests check what the code computes, not how fast XLA's code runs, and on
# their tiny shapes compiling dominates: LLVM at -O0 with XLA:CPU's older
# (non-MLIR) fusion emitters roughly halves every compile (the macro and PTB
# child tests: 149 s -> 81 s serially). Results agree with the default
# pipeline within the tests' tolerances. The two pytest-xdist workers fill the
# 2 cores, so each compiles and runs on one thread (no Eigen thread pool, the
# LLVM module not split for parallel codegen): ~7% less CPU time in all.
# ENAS_JAX_TEST_FULL_OPT=1 tests with XLA's default flags instead.
# Subprocesses inherit these through XLA_FLAGS;
# a test that sets its own XLA_FLAGS adds to them with :func:`xla_flags`.
TEST_XLA_FLAGS = ("" if os.environ.get("ENAS_JAX_TEST_FULL_OPT") == "1" else
                  "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
                  " --xla_cpu_multi_thread_eigen=false --xla_cpu_parallel_codegen_split_count=1")


def xla_flags(*extra: str) -> str:
  """``XLA_FLAGS`` for a test's subprocess: the suite's flags plus ``extra``."""
  return " ".join(f for f in (TEST_XLA_FLAGS, *extra) if f)


if TEST_XLA_FLAGS and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402

# Tracing builds many short-lived Python objects; with the default thresholds
# the cyclic collector ran often enough to cost ~5% of the macro child tests
# (70-74 s -> 68 s). Collections still happen, just less often.
gc.set_threshold(50_000, 20, 100)

# Compiles dominate the suite's time on 2 cores; a cache shared by the tests of
# one run (and by reruns) cuts repeated compilations to a fraction of a second.
# The pytest-xdist workers and the tests' subprocesses share one folder: with a
# size limit set, jax takes a file lock (the filelock package) around every
# cache read and write, so no process reads another's half-written entry.
# (A folder of its own: entries of older, unlocked layouts lack the access-time
# files that the locked cache needs.)
_CACHE = os.environ.get("ENAS_JAX_TEST_CACHE",
                        os.path.join(ROOT, ".pytest_cache", "jax-locked"))
CACHE_MAX_BYTES = 8 << 30
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
# Only long compiles are cached: a clean-clone CI run once crashed (SIGSEGV inside
# jax's compilation_cache.put_executable_and_time) writing a small controller
# executable; fewer, larger writes keep most of the benefit with less exposure.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
# The runs the tests start as subprocesses (python -m enas_jax.main ...) get no
# default per-user cache (enas_jax.compile_cache): nothing under ~/.cache, and
# they compile as before unless a test passes them this cache explicitly.
os.environ["ENAS_JAX_COMPILATION_CACHE"] = "0"
# Nor do the in-process tests use the executable cache (enas_jax.exec_cache):
# each test compiles as before; tests/test_exec_cache.py turns it on.
os.environ["ENAS_JAX_EXEC_CACHE"] = "0"


def init_in_one_compile(init, *args, seed: int = 0):
  """``init(key, *args)`` jitted, on an "rbg" key: for tests that need some weights.

  Eagerly every weight's draw compiles on its own, and XLA:CPU compiles many
  threefry draws (the default key) slowly even in one program: the tiny micro
  child's 100 weights took 164 s eagerly on the loaded 2 cores, 15 s this way.
  """
  return jax.jit(lambda k: init(k, *args))(jax.random.key(seed, impl="rbg"))


def tiny_ptb_config(variant: str = "smoke", **overrides):
  """configs/ptb.py:<variant> shrunk to seconds; ``overrides`` use dotted keys."""
  from configs import ptb as ptb_config
  c = ptb_config.get_config(variant)
  c.unlock()
  c.data.source = "synthetic"
  c.data.vocab_size = 40
  c.data.num_train_tokens = 2400
  c.data.num_valid_tokens = 800
  c.data.num_test_tokens = 200
  c.data.batch_size = 4
  c.data.eval_batch_size = 4
  c.data.bptt = 6
  c.data.bptt_buckets = (4, 8, 16)
  c.space.num_nodes = 4
  c.child.hidden_size = 8
  c.controller.lstm_size = 8
  c.controller.train_steps = 2
  c.controller.num_aggregate = 2
  c.search.num_epochs = 2
  c.search.steps_per_dispatch = 40
  c.derive.num_samples = 3
  c.derive.valid_batches = 3
  c.derive.batch = 2
  c.final.num_epochs = 1
  c.final.valid_batches = 4
  c.final.test_batch_size = 2
  c.final.test_bptt = 5
  c.log_every = 20
  c.tensorboard = False
  if variant == "final":
    c.arc = ""
  for k, v in overrides.items():
    node = c
    parts = k.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = v
  c.lock()
  return c


@pytest.fixture
def tiny_config():
  return tiny_ptb_config


def tiny_cifar_config(space: str = "cifar_macro", variant: str = "smoke", **overrides):
  """configs/<space>.py:<variant> on a few generated images; ``overrides`` use dotted keys."""
  import importlib
  mod = importlib.import_module(f"configs.{space}")
  c = mod.get_config(variant)
  c.unlock()
  c.data.source = "synthetic"
  c.data.num_train = 96
  c.data.num_valid = 32
  c.data.num_test = 32
  c.data.batch_size = 8
  c.data.eval_batch_size = 16
  c.child.out_filters = 4
  if space == "cifar_macro":
    c.space.num_layers = 3  # reductions after layers 0 and 1
  else:
    c.space.num_layers = 1  # 3 cells: reduction, reduction, normal (pd = 0)
    c.space.num_nodes = 1
  c.controller.lstm_size = 8
  c.controller.train_steps = 2
  c.controller.num_aggregate = 2
  c.search.num_epochs = 2
  c.search.steps_per_dispatch = 4
  c.search.then_final = variant == "smoke"
  c.derive.num_samples = 3
  c.derive.valid_batches = 1
  c.derive.batch = 2
  c.final.num_epochs = 1
  c.final.steps_per_dispatch = 4
  c.log_every = 4
  c.tensorboard = False
  for k, v in overrides.items():
    node = c
    parts = k.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = v
  c.lock()
  return c


# Seconds each of the heaviest test files took in a cold run on 2 cores (sum of
# its tests' durations). pytest-xdist hands whole files to its 2 workers
# (--dist loadfile); by default it queues the files with the most tests first,
# which left the long one-test files (two-device runs, pipelines) for the end
# and one worker idle while the other finished them. The files below run first,
# longest first (--no-loadscope-reorder keeps this order); the rest follow in
# collection order.
_HEAVY_FILES = {
    "test_cifar_macro_child.py": 68, "test_cifar_micro_child.py": 40, "test_faults.py": 50,
    "test_cifar_pipeline.py": 33, "test_kernels.py": 29, "test_pipeline.py": 26,
    "test_parallel_micro.py": 23, "test_parallel.py": 20, "test_ptb_child.py": 18,
    "test_controller.py": 17, "test_reinforce.py": 15, "test_seeds.py": 15,
    "test_task_scalars.py": 15, "test_readme.py": 14, "test_controller_micro.py": 13,
    "test_micro_compile.py": 10, "test_task_core.py": 10, "test_final_recipe.py": 9,
    "test_cifar_nb201.py": 9, "test_exec_cache.py": 25,
}


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: -_HEAVY_FILES.get(os.path.basename(str(item.fspath)), 0))
