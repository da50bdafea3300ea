"""The two kernel sets (enas_jax.kernels) through the ops layer (conv_ops):
every ``cpu`` kernel equals its ``xla`` counterpart, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enas_jax import kernels as kernel_sets
from enas_jax.spaces import conv_ops as ops

SETS = ["cpu", "xla"]


def _rand(key, shape):
  # numpy, not jax.random: each eager threefry draw of a new shape is an XLA:CPU
  # compile of its own.
  return jnp.asarray(np.random.default_rng(key).standard_normal(shape), jnp.float32)


# Batch 19: the kernel gradient's loop over chunks of images (4 for full
# convolutions, 8 for depthwise) runs several chunks plus a remainder of 3.
@pytest.mark.parametrize("n", [2, 19])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_cpu_conv_matches_xla_forward_and_backward(k, n):
  x, w = _rand(0, (n, 8, 8, 3)), _rand(1, (k, k, 3, 4))
  g = _rand(2, (n, 8, 8, 4))

  def loss(kernels):
    return lambda x, w: jnp.sum(ops.conv2d(x, w, kernels=kernels) * g)

  np.testing.assert_allclose(ops.conv2d(x, w, kernels="cpu"), ops.conv2d(x, w, kernels="xla"),
                             rtol=1e-5, atol=1e-5)
  gc = jax.jit(jax.grad(loss("cpu"), (0, 1)))(x, w)
  gp = jax.jit(jax.grad(loss("xla"), (0, 1)))(x, w)
  for a, b in zip(gc, gp):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
def test_depthwise_shifted_slices_match_grouped_conv(k, stride):
  x, w = _rand(3, (2, 8, 8, 4)), _rand(4, (k, k, 4))
  a = ops.depthwise_conv2d(x, w, stride, kernels="cpu")
  b = ops.depthwise_conv2d(x, w, stride, kernels="xla")
  assert a.shape == b.shape == (2, 8 // stride, 8 // stride, 4)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  grad = lambda kernels: jax.jit(jax.grad(  # noqa: E731
      lambda x: jnp.sum(ops.depthwise_conv2d(x, w, stride, kernels=kernels) ** 2)))
  ga, gb = grad("cpu")(x), grad("xla")(x)
  np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels", SETS)
@pytest.mark.parametrize("stride", [1, 2])
def test_pools_match_reduce_window_with_tf_padding_rules(stride, kernels):
  x = _rand(5, (2, 8, 8, 3))
  win, strides = (1, 3, 3, 1), (1, stride, stride, 1)
  ref_max = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, win, strides, "SAME")
  np.testing.assert_allclose(ops.max_pool(x, 3, stride, kernels=kernels), ref_max, rtol=1e-6)
  s = jax.lax.reduce_window(x, 0.0, jax.lax.add, win, strides, "SAME")
  cnt = jax.lax.reduce_window(jnp.ones_like(x), 0.0, jax.lax.add, win, strides, "SAME")
  np.testing.assert_allclose(ops.avg_pool(x, 3, stride, kernels=kernels), s / cnt, rtol=1e-5,
                             atol=1e-6)
  # A corner's average divides by the 4 real pixels, not 9 (padding excluded).
  if stride == 1:
    np.testing.assert_allclose(ops.avg_pool(x, kernels=kernels)[0, 0, 0],
                               jnp.mean(x[0, :2, :2], axis=(0, 1)), rtol=1e-5)


def test_factorized_reduce_paths():
  x = _rand(6, (1, 4, 4, 2))
  w1, w2 = _rand(7, (2, 3)), _rand(8, (2, 3))
  y = ops.factorized_reduce(x, w1, w2)
  assert y.shape == (1, 2, 2, 6)
  np.testing.assert_allclose(y[0, 0, 0, :3], x[0, 0, 0] @ w1, rtol=1e-5)
  np.testing.assert_allclose(y[0, 0, 0, 3:], x[0, 1, 1] @ w2, rtol=1e-5)
  np.testing.assert_allclose(y[0, 1, 1, 3:], x[0, 3, 3] @ w2, rtol=1e-5)
  # The zero-padded row/column of path 2 shows on odd sizes.
  y3 = ops.factorized_reduce(_rand(11, (1, 3, 3, 2)), w1, w2)
  np.testing.assert_allclose(y3[0, 1, 1, 3:], np.zeros(3), atol=1e-6)


@pytest.mark.parametrize("kernels", SETS)
def test_batch_norm_train_and_eval(kernels):
  x = _rand(9, (4, 3, 3, 2)) * 3 + 1
  p, s = ops.bn_params(2), ops.bn_stats(2)
  y, s2 = ops.batch_norm(x, p, s, train=True, kernels=kernels, decay=0.9)
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
  n = 4 * 3 * 3
  var_unbiased = jnp.var(x, axis=(0, 1, 2)) * n / (n - 1)
  np.testing.assert_allclose(s2["var"], 0.9 + 0.1 * var_unbiased, rtol=1e-5)
  y_eval, s3 = ops.batch_norm(x, p, s2, train=False, kernels=kernels)
  assert s3 is s2
  np.testing.assert_allclose(y_eval, (x - s2["mean"]) / jnp.sqrt(s2["var"] + 1e-5), rtol=1e-5)


@pytest.mark.parametrize("kernels", SETS)
def test_select_branch_modes_agree_and_static_index_builds_one_branch(kernels):
  branches = [lambda x: x * 2.0, lambda x: ops.max_pool(x, kernels=kernels),
              lambda x: jnp.sin(x) * x]
  x = _rand(10, (1, 4, 4, 1))
  for i in range(3):
    ref = branches[i](x)
    g_ref = jax.grad(lambda x: jnp.sum(branches[i](x) ** 2))(x)
    for mode in ("switch", "mask"):
      for ckpt in (True, False):
        sel = lambda i, x: ops.select_branch(i, branches, x, mode=mode, kernels=kernels,  # noqa
                                             checkpoint=ckpt)
        np.testing.assert_allclose(jax.jit(sel)(jnp.int32(i), x), ref, rtol=1e-6)
        g = jax.grad(lambda x: jnp.sum(sel(jnp.int32(i), x) ** 2))(x)
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        ops.select_branch(np.int32(i), branches, x, mode="switch", kernels=kernels), ref)


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="child.kernels"):
    kernel_sets.get("auto")  # resolved names only
  with pytest.raises(ValueError, match="op_select"):
    ops.select_branch(jnp.int32(0), [lambda x: x], 1.0, mode="one_hot", kernels="cpu")


def test_both_sets_provide_the_same_api():
  for name in kernel_sets.API:
    assert hasattr(kernel_sets.cpu, name) and hasattr(kernel_sets.xla, name), name


@pytest.mark.parametrize("n", [2, 19])
@pytest.mark.parametrize("c", [4, 36])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_depthwise_cpu_gradient_matches_xla(k, c, n):
  x, w = _rand(11, (n, 7, 6, c)), _rand(12, (k, k, c))
  g = _rand(13, (n, 7, 6, c))
  fc = jax.jit(jax.grad(lambda x, w: jnp.sum(ops.depthwise_conv2d(x, w, 1, kernels="cpu") * g),
                        (0, 1)))
  fp = jax.jit(jax.grad(lambda x, w: jnp.sum(ops.depthwise_conv2d(x, w, 1, kernels="xla") * g),
                        (0, 1)))
  for a, b in zip(fc(x, w), fp(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernels", SETS)
def test_depthwise_relu_input_is_depthwise_of_relu(kernels, stride):
  """``relu_input`` (the custom gradient keeps x, not ReLU(x)) is the same
  function, values and gradients, as a depthwise convolution of ReLU(x)."""
  x, w, g = _rand(14, (3, 8, 6, 5)), _rand(15, (3, 3, 5)), _rand(16, (3, 8 // stride, 6 // stride, 5))
  fused = lambda x, w: jnp.sum(  # noqa: E731
      ops.depthwise_conv2d(x, w, stride, kernels=kernels, relu_input=True) * g)
  ref = lambda x, w: jnp.sum(  # noqa: E731
      ops.depthwise_conv2d(jnp.maximum(x, 0.0), w, stride, kernels="xla") * g)
  np.testing.assert_allclose(fused(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  ga, gb = jax.jit(jax.grad(fused, (0, 1)))(x, w), jax.jit(jax.grad(ref, (0, 1)))(x, w)
  assert np.any(np.asarray(ga[0]) == 0.0)  # the ReLU's gradient mask is applied
  for a, b in zip(ga, gb):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _ref_pool(x, kind):
  """stride-1 SAME 3x3 pools from lax.reduce_window (XLA's own gradients)."""
  dims, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  if kind == "max":
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, pad)
  tot = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad)
  cnt = jax.lax.reduce_window(jnp.ones_like(x[:1, ..., :1]), 0.0, jax.lax.add, dims, strides,
                              pad)
  return tot / cnt


@pytest.mark.parametrize("kernels", SETS)
@pytest.mark.parametrize("kind", ["avg", "max"])
def test_stride1_pool_gradients_match_reduce_window(kind, kernels):
  # After a ReLU most windows hold tied zeros: the max-pool gradient must go to
  # the first maximum only, as XLA's (and TF's) does.
  x = jax.nn.relu(_rand(20, (3, 7, 6, 5)))
  x = x.at[0, 2:5, 2:5, 0].set(1.5)  # a plateau of tied maxima above zero too
  g = _rand(21, (3, 7, 6, 5))
  pool = ops.max_pool if kind == "max" else ops.avg_pool
  f = lambda x, k, s: pool(x, k, s, kernels=kernels)  # noqa: E731
  np.testing.assert_allclose(f(x, 3, 1), _ref_pool(x, kind), rtol=1e-6, atol=1e-6)
  got = jax.jit(jax.grad(lambda x: jnp.sum(f(x, 3, 1) * g)))(x)
  want = jax.jit(jax.grad(lambda x: jnp.sum(_ref_pool(x, kind) * g)))(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", SETS)
@pytest.mark.parametrize("with_params", [True, False])
def test_batch_norm_gradient_matches_autodiff_of_the_formula(with_params, kernels):
  x = _rand(22, (4, 5, 3, 6)) * 3.0 + 2.0
  g = _rand(23, (4, 5, 3, 6))
  p = {"scale": _rand(24, (6,)), "offset": _rand(25, (6,))} if with_params else None

  def ref(x, p):
    mean = jnp.mean(x, (0, 1, 2))
    y = (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), (0, 1, 2)) + 1e-5)
    return y * p["scale"] + p["offset"] if p is not None else y

  def ours(x, p):
    return ops.batch_norm(x, p, ops.bn_stats(6), train=True, kernels=kernels)[0]

  np.testing.assert_allclose(ours(x, p), ref(x, p), rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(lambda x, p: jnp.sum(ours(x, p) * g), (0, 1)))(x, p)
  want = jax.jit(jax.grad(lambda x, p: jnp.sum(ref(x, p) * g), (0, 1)))(x, p)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels", SETS)
@pytest.mark.parametrize("outlier_first", [False, True])
def test_batch_norm_statistics_accurate_far_from_zero_and_all_cotangents(outlier_first,
                                                                          kernels):
  # One-pass moments of x shifted by the batch mean of its first pixel: a mean
  # 100 std away from zero (and, second case, first pixels 20 std away from the
  # mean) must not cost the variance its accuracy. Reference in float64.
  x = np.asarray(_rand(30, (16, 8, 8, 4)), np.float64) * 0.5 + 50.0
  if outlier_first:
    x[:, 0, 0] += 10.0
  scale, offset = np.asarray(_rand(31, (4,))), np.asarray(_rand(32, (4,)))
  bn_batch = kernel_sets.get(kernels).bn_batch
  y, mean, var = bn_batch(jnp.asarray(x, jnp.float32), jnp.asarray(scale),
                          jnp.asarray(offset), jnp.float32(1e-5))
  m64, v64 = x.mean((0, 1, 2)), x.var((0, 1, 2))
  np.testing.assert_allclose(mean, m64, rtol=1e-6)
  np.testing.assert_allclose(var, v64, rtol=2e-4)
  np.testing.assert_allclose(y, (x - m64) / np.sqrt(v64 + 1e-5) * scale + offset,
                             rtol=2e-3, atol=2e-3)
  # The gradient through y, mean and var together against autodiff of the
  # two-pass formula (float32: both sides see the same rounding of x).
  g, a, b = _rand(33, x.shape), _rand(34, (4,)), _rand(35, (4,))

  def ref(x, s, o):
    m = jnp.mean(x, (0, 1, 2))
    v = jnp.mean(jnp.square(x - m), (0, 1, 2))
    return (x - m) * jax.lax.rsqrt(v + 1e-5) * s + o, m, v

  def loss(fn):
    def f(x, s, o):
      y, m, v = fn(x, s, o)
      return jnp.sum(y * g) + jnp.sum(m * a) + jnp.sum(v * b)
    return jax.jit(jax.grad(f, (0, 1, 2)))

  args = (jnp.asarray(x - 50.0, jnp.float32), jnp.asarray(scale), jnp.asarray(offset))
  got = loss(lambda x, s, o: bn_batch(x, s, o, jnp.float32(1e-5)))(*args)
  want = loss(ref)(*args)
  for u, w in zip(got, want):
    np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-4)


def test_cpu_init_one_draw_same_values_eager_and_jitted_with_he_normal_statistics():
  from enas_jax.spaces import cifar_micro_child as mc
  cfg = mc.MicroChildConfig(num_layers=1, num_nodes=2, out_filters=8)
  init = lambda k: mc.init_shared(k, cfg)  # noqa: E731
  eager = ops.init_params(init, jax.random.key(0), kernels="cpu")
  jitted = jax.jit(lambda k: ops.init_params(init, k, kernels="cpu"))(jax.random.key(0))
  plain = jax.eval_shape(init, jax.random.key(0))
  assert jax.tree.structure(eager) == jax.tree.structure(plain)
  for a, b, c in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(plain)):
    assert a.shape == c.shape and a.dtype == c.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  other = ops.init_params(init, jax.random.key(1), kernels="cpu")
  w0 = eager[0]["stem"]["w"]
  assert not np.allclose(w0, other[0]["stem"]["w"])
  # BN parameters are not drawn; weights have the he_normal scale and +-2 std cut.
  np.testing.assert_array_equal(eager[0]["stem"]["bn"]["scale"], 1.0)
  w = np.asarray(eager[0]["cells"][0]["final"]["w"])  # fan_in = B + 2 = 4 rows
  std = np.sqrt(2.0 / 4)
  assert abs(w.std() / std - 1.0) < 0.1
  assert np.abs(w).max() <= 2.0 * std / 0.87962566103423978 + 1e-6
  # Different weights of one initialisation are not copies of each other.
  w_point = np.asarray(eager[0]["cells"][0]["nodes"][0]["sep3"]["w_point"])
  a, b = w_point[0, 0, 0].ravel(), w_point[1, 0, 0].ravel()  # inputs x and y
  assert abs(np.corrcoef(a, b)[0, 1]) < 0.2


def test_xla_init_is_the_one_draw_initialiser_with_he_normal_statistics():
  from enas_jax.spaces import cifar_micro_child as mc
  cfg = mc.MicroChildConfig(num_layers=1, num_nodes=2, out_filters=8, kernels="xla")
  init = lambda k: mc.init_shared(k, cfg)  # noqa: E731
  a = ops.init_params(init, jax.random.key(0), kernels="cpu")
  b = ops.init_params(init, jax.random.key(0), kernels="xla")
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert u.shape == v.shape and u.dtype == v.dtype
    np.testing.assert_array_equal(u, v)  # the same initialiser on both sets
  w = np.asarray(b[0]["cells"][0]["final"]["w"])  # fan_in = B + 2 = 4 rows
  std = np.sqrt(2.0 / 4)
  assert abs(w.std() / std - 1.0) < 0.1
  assert np.abs(w).max() <= 2.0 * std / 0.87962566103423978 + 1e-6
  np.testing.assert_array_equal(b[0]["stem"]["bn"]["scale"], 1.0)


@pytest.mark.parametrize("kernels", SETS)
def test_sum_of_squares_value_and_gradient_match_per_leaf_sums(kernels):
  tree = {"a": _rand(40, (3, 4)), "b": [_rand(41, (5,)), _rand(42, (2, 2, 3))]}
  want = sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(tree))
  np.testing.assert_allclose(ops.sum_of_squares(tree, kernels=kernels), want, rtol=1e-6)
  np.testing.assert_allclose(ops.global_norm(tree, kernels=kernels), np.sqrt(want), rtol=1e-6)
  grads = jax.grad(lambda t: 3.0 * ops.l2_sum(t, kernels=kernels))(tree)
  for g, x in zip(jax.tree.leaves(grads), jax.tree.leaves(tree)):
    np.testing.assert_allclose(g, 6.0 * x, rtol=1e-6)
  assert float(ops.sum_of_squares({}, kernels=kernels)) == 0.0


@pytest.mark.parametrize("kernels", SETS)
def test_bfloat16_inputs_keep_their_dtype_and_float32_moments(kernels):
  """bfloat16 activations: outputs and input gradients in bfloat16, batch-norm
  moments and weight gradients in float32, values within bfloat16 rounding of
  the float32 computation."""
  x32, w32 = _rand(50, (8, 6, 6, 4)) * 2.0 + 3.0, _rand(51, (3, 3, 4))
  g32 = _rand(52, (8, 6, 6, 4))
  x, g = x32.astype(jnp.bfloat16), g32.astype(jnp.bfloat16)
  p, s = ops.bn_params(4), ops.bn_stats(4)

  def f(x, w, g):
    h = ops.depthwise_conv2d(x, w, kernels=kernels, relu_input=True)
    h = ops.conv2d(h, jnp.ones((3, 3, 4, 4)) / 9.0, kernels=kernels)
    # (No max pool in the chain: bfloat16 rounding creates ties that move its
    # gradient to other pixels, a difference of the function, not the kernel.)
    h = ops.avg_pool(h, kernels=kernels)
    y, st = ops.batch_norm(h, p, s, train=True, kernels=kernels)
    return jnp.sum((y * g).astype(jnp.float32)), (y, st)

  # Jitted: one compile per dtype instead of one per eager op.
  vg = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))
  (v, (y, st)), (dx, dw) = vg(x, w32, g)
  (v32, (y32, st32)), (dx32, dw32) = vg(
      x.astype(jnp.float32), w32, g.astype(jnp.float32))
  assert y.dtype == dx.dtype == ops.max_pool(x, kernels=kernels).dtype == jnp.bfloat16
  assert dw.dtype == st["mean"].dtype == st["var"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=5e-2, atol=5e-2)
  for a, b in ((st["mean"], st32["mean"]), (st["var"], st32["var"])):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)
  for a, b in ((dx, dx32), (dw, dw32)):
    a, b = np.asarray(a, np.float32), np.asarray(b)
    assert np.linalg.norm(a - b) < 5e-2 * np.linalg.norm(b)
