"""The benchmark's row on a tiny PTB config: its JSON fields, and the compile
split into its phases (tracing, lowering, XLA) inside ``compile_s``."""

import jax
from conftest import tiny_ptb_config

from enas_jax import benchmark


def test_row_reports_compile_phases_within_compile_s():
  # No persistent cache: a hit there would skip XLA's compile.
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    row = benchmark.run_row(tiny_ptb_config("search"), "shared", steps=2)
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
  assert row["compile_count"] == 1 and row["steps"] == 2 and row["tokens_per_s"] > 0
  assert row["exec_cache"] == "jit"  # off in the suite (conftest.py)
  phases = row["compile_phases"]
  assert set(phases) == {"trace_s", "lower_s", "xla_compile_s"}
  # Every phase happened and they add up to no more than the first dispatch
  # they are part of.
  assert all(v > 0 for v in phases.values()), phases
  assert sum(phases.values()) <= row["compile_s"] + 1e-3, (phases, row["compile_s"])
