"""enas_jax.memory: the compiler's freed heap is handed back after a compile."""

import jax
import jax.numpy as jnp
import pytest

from enas_jax import memory


def test_heap_is_trimmed_after_a_compile_and_results_are_unchanged():
  if not memory.release_after_compiles(min_compile_s=0.0):
    pytest.skip("no glibc malloc_trim on this platform")
  try:
    before = memory.trims_done()
    f = jax.jit(lambda x: jnp.tanh(x) * 3.0 + x.sum())  # a fresh function: it compiles
    x = jnp.arange(6.0)
    got = f(x)
    assert memory.trims_done() > before
    assert jnp.allclose(got, jnp.tanh(x) * 3.0 + 15.0)
    again = memory.trims_done()
    f(x)  # cached: no compile, no trim
    assert memory.trims_done() == again
  finally:
    memory.release_after_compiles()  # back to the default threshold
