"""``enas_jax.remat.recompute_in_backward``: the same gradients as plain
autodiff with either kernel set, fewer temporaries on XLA:CPU with the ``cpu``
set (where ``jax.checkpoint`` saves none), zero cotangents for its
non-differentiated inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enas_jax import remat


def _block(diff, extra):
  w, x = diff
  scale, key = extra
  for _ in range(6):
    x = jnp.tanh(x @ w) * scale
  if key is not None:
    x = x * jax.random.bernoulli(key, 0.9, x.shape)
  return x, {"mean": jnp.mean(x)}


def _loss(block, w, x0, key):
  x = x0
  for i in range(5):
    x, stats = block((w, x), (jnp.float32(1.1), jax.random.fold_in(key, i)))
  return jnp.sum(x ** 2) + stats["mean"]


@pytest.fixture(scope="module")
def data():
  w = jax.random.normal(jax.random.key(0), (256, 256)) / 16
  x0 = jax.random.normal(jax.random.key(1), (256, 256))
  return w, x0, jax.random.key(2)


def _temps(f, *args):
  return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("kernels", ["cpu", "xla"])
def test_same_gradients_as_autodiff(data, kernels):
  w, x0, key = data
  g_plain = jax.jit(jax.grad(lambda w, x: _loss(_block, w, x, key), argnums=(0, 1)))(w, x0)
  blk = remat.recompute_in_backward(_block, kernels)
  g_remat = jax.jit(jax.grad(lambda w, x: _loss(blk, w, x, key), argnums=(0, 1)))(w, x0)
  for a, b in zip(g_plain, g_remat):  # recomputed matmuls may round differently
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))


def test_fewer_temporaries_on_cpu(data):
  if jax.default_backend() != "cpu":
    pytest.skip("measures XLA:CPU")
  w, x0, key = data
  plain = _temps(jax.grad(lambda w: _loss(_block, w, x0, key)), w)
  ckpt = _temps(jax.grad(lambda w: _loss(jax.checkpoint(_block), w, x0, key)), w)
  ours = _temps(jax.grad(lambda w: _loss(remat.recompute_in_backward(_block, "cpu"), w, x0,
                                          key)), w)
  # 5 blocks x 6 activations of 256 KiB kept by autodiff; one block's worth here.
  assert ours < 0.5 * plain, (plain, ours)
  # Documents why the module exists: if XLA:CPU ever honours jax.checkpoint,
  # this fails and the cpu set's recompute_in_backward can become jax.checkpoint.
  assert ckpt > 0.8 * plain, (plain, ckpt)


def test_extra_inputs_get_zero_cotangents():
  blk = remat.recompute_in_backward(_block, "cpu")
  w, x = jnp.eye(4), jnp.ones((2, 4))
  out, pull = jax.vjp(lambda d, e: blk(d, e), (w, x), (jnp.float32(2.0), None))
  d_diff, d_extra = pull(jax.tree.map(jnp.ones_like, out))
  assert d_extra[1] is None and float(d_extra[0]) == 0.0
  assert np.all(np.isfinite(np.asarray(d_diff[0]))) and np.any(np.asarray(d_diff[0]) != 0)
