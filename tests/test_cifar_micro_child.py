"""The micro CIFAR child: the traced-arc shared child equals the baked one
(outputs, statistics, gradients), one compilation for many arcs, the fixed
child's shapes, parameter count and drop-path schedule, config errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import init_in_one_compile

from enas_jax.spaces import cifar_micro
from enas_jax.spaces import cifar_micro_child as mc

B = 2  # nodes per cell
# Batch, image size: at 32x32 the aux head's BNs see 2x2 maps (8 values), not
# 1x1 ones (2 values, ill-conditioned gradients); the cost is negligible at C=4.
N, HW = 2, 32
# num_layers=1: cells 0 (reduction), 1 (reduction), 2 (normal, aux head after it).
TINY = {"num_layers": 1, "num_nodes": B, "out_filters": 4}
NUM_ARCS = 2  # one random arc and the hand-made one below (each costs a baked compile)


def _codec():
  return cifar_micro.MicroCodec(B)


def _images(seed=1, hw=HW):
  # numpy, not jax.random: an eager threefry draw is an XLA:CPU compile of its own.
  return jnp.asarray(np.random.default_rng(seed).standard_normal((N, hw, hw, 3)), jnp.float32)


def _key(seed):
  """An "rbg" key: the child's dropout / drop-path draws compile much faster on
  XLA:CPU than threefry's (the functions under test do not depend on the impl)."""
  return jax.random.key(seed, impl="rbg")


def _labels():
  return jnp.arange(N) % 10


def _arcs():
  """Random arcs plus a hand-made one: normal cell ``node 2 = avg(0) + max(1)``
  (a node whose both branches are pools), ``node 3 = sep3(2) + id(2)`` (inputs
  0 and 1 used, loose end {3}); reduction cell ``node 2 = sep5(1) + sep3(1)``,
  ``node 3 = max(1) + id(2)`` (input 0 loose)."""
  c = _codec()
  arcs = [np.asarray(c.sample_uniform(jax.random.key(100 + i))) for i in range(NUM_ARCS - 1)]
  arcs.append(c.validate([0, 2, 1, 3, 2, 0, 2, 4, 1, 1, 1, 0, 1, 3, 2, 4]))
  return arcs


def _loss_fn(cfg, arc_static=None):
  """(params, stats, arc, x, key) -> (loss, (logits, aux, new_stats))."""
  def loss(params, stats, arc, x, key):
    if arc_static is not None:
      arc = arc_static
    logits, aux, ns = mc.apply_shared(params, stats, arc, x, train=True, key=key, cfg=cfg)
    y = _labels()
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
    ce = ce - 0.4 * jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(aux), y[:, None], 1))
    return ce, (logits, aux, ns)
  return loss


# The op_select modes the traced child is checked in, with their kernel sets.
# "switch_xla" (the accelerator default) is compiled only by its -m slow cases:
# the switch is the same code for both kernel sets, which test_kernels.py
# compares op by op, and the macro child checks (switch, xla) in the default suite.
_MODES = {"switch": ("switch", "cpu"), "mask": ("mask", "xla"), "switch_xla": ("switch", "xla")}


class _Shared(dict):
  """The fixture's results; a mode's jitted function (``d[mode]``) and its
  results per arc (``d[mode + "_res"]``) are compiled on first use."""

  def __missing__(self, key):
    mode = key[:-len("_res")] if key.endswith("_res") else key
    if mode not in _MODES:
      raise KeyError(key)
    # The mask mode runs every op anyway: XLA's kernels compile faster. Every
    # mode is value-and-grad: one compile per mode serves the forward and the
    # gradient tests (the mask mode's gradient recomputes all ops in the backward).
    op_select, kernels = _MODES[mode]
    cfg = mc.MicroChildConfig(**TINY, op_select=op_select, kernels=kernels)
    f = jax.jit(jax.value_and_grad(_loss_fn(cfg), has_aux=True))
    self[mode] = f
    self[mode + "_res"] = [f(self["params"], self["stats"], jnp.asarray(a), self["x"],
                             self["key"]) for a in self["arcs"]]
    return self[key]


@pytest.fixture(scope="module")
def shared():
  """Per op_select mode (on first use): the traced value-and-grad (jitted once),
  and for each arc its results; plus the baked (numpy-arc) results per arc."""
  x, key = _images(), _key(7)
  arcs = _arcs()
  out = _Shared(arcs=arcs, x=x, key=key)
  base_cfg = mc.MicroChildConfig(**TINY)
  params, stats = init_in_one_compile(mc.init_shared, base_cfg)
  out["params"], out["stats"] = params, stats
  # The baked reference (op_select does not matter for a numpy arc). Its convs
  # are the custom ones, like the traced switch's: at these tiny sizes (batch 2,
  # 8x8 maps in the last cell) one ReLU input crossing zero moves gradients by
  # ~1%, and with plain convs one input of random arc 0 does (tolerance 1e-3).
  out["baked"] = []
  for a in arcs:
    f = jax.jit(jax.value_and_grad(_loss_fn(base_cfg, a), has_aux=True))
    out["baked"].append(f(params, stats, None, x, key))
  return out


def _assert_trees_close(a, b, atol=1e-4, rtol=1e-4):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(la, lb):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol, rtol=rtol)


def _assert_grads_close(a, b, tol=1e-3):
  """Per leaf: ||a - b|| <= tol * ||b|| (+ a tiny floor for all-zero leaves)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    u, v = np.asarray(u), np.asarray(v)
    err, ref = np.linalg.norm(u - v), np.linalg.norm(v)
    assert err <= tol * ref + 1e-7, (jax.tree_util.keystr(path), err, ref)


_SLOW_XLA = pytest.param("switch_xla", marks=pytest.mark.slow)


@pytest.mark.parametrize("mode", ["switch", "mask", _SLOW_XLA])
def test_traced_arc_equals_baked_arc(shared, mode):
  for i, arc in enumerate(shared["arcs"]):
    res = shared[mode + "_res"][i]
    traced = res[0]  # (loss, (logits, aux, stats))
    baked = shared["baked"][i][0]
    assert traced[1][0].shape == (N, 10) and traced[1][1].shape == (N, 10)
    np.testing.assert_allclose(traced[0], baked[0], atol=1e-4, rtol=1e-4)
    _assert_trees_close(traced[1], baked[1])


@pytest.mark.parametrize("mode", ["switch", _SLOW_XLA, "mask"])
def test_grads_traced_equal_baked_and_unused_weights_get_zero(shared, mode):
  for i, arc in enumerate(shared["arcs"]):
    g_traced = shared[mode + "_res"][i][1]
    g_baked = shared["baked"][i][1]
    _assert_grads_close(g_traced, g_baked)
    for g in (g_traced, g_baked):
      assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(g))
  # The hand-made arc: normal-cell node 2 (cell 2) is avg(0) + max(1), so both of
  # its branches' sep weights get exactly zero gradient; so do the sep rows of
  # input indices that no branch reads, and the final-conv blocks of used nodes.
  g = shared[mode + "_res"][-1][1]
  normal = g["cells"][2]
  for leaf in jax.tree.leaves(normal["nodes"][0]):  # both inputs, every index
    assert np.all(np.asarray(leaf) == 0.0)
  # Node 3 = sep3(2) + id(2): input x's sep3 row 2 is used, rows 0 and 1 are not.
  w = np.asarray(normal["nodes"][1]["sep3"]["w_depth"])  # [input, index, stack, ...]
  assert np.all(np.any(w[0, 2] != 0, axis=(1, 2, 3))) and np.all(w[0, :2] == 0)
  assert np.all(w[1] == 0)  # input y is the identity: no sep weights used
  assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(normal["nodes"][1]["sep5"]))
  # Loose ends of the normal cell: {3}; final-conv blocks 0, 1, 2 are zero.
  wf = np.asarray(normal["final"]["w"])
  assert np.all(wf[:3] == 0) and np.any(wf[3] != 0)
  # Reduction cell (cell 1): input 0 is loose, so its final-conv block is used.
  wf = np.asarray(g["cells"][1]["final"]["w"])
  assert np.any(wf[0] != 0) and np.all(wf[1:3] == 0) and np.any(wf[3] != 0)


# The mask mode's gradient is checked by
# test_grads_traced_equal_baked_and_unused_weights_get_zero[mask] (the fixture's
# mask function is value-and-grad).
@pytest.mark.parametrize("variant", [
    # Plain autodiff through the switch: also covered for macro by
    # test_unselected_branches_get_zero_grads_and_keep_their_stats[switch-False].
    pytest.param({"checkpoint_branches": False}, marks=pytest.mark.slow)])
def test_grads_of_other_variants_equal_baked(shared, variant):
  """Plain autodiff through the switch (``checkpoint_branches=False``)."""
  cfg = mc.MicroChildConfig(**TINY, **variant)
  f = jax.jit(jax.value_and_grad(_loss_fn(cfg), has_aux=True))
  for i in (0, len(shared["arcs"]) - 1):
    (loss, _), g = f(shared["params"], shared["stats"], jnp.asarray(shared["arcs"][i]),
                     shared["x"], _key(7))
    (loss_b, _), g_b = shared["baked"][i]
    np.testing.assert_allclose(loss, loss_b, atol=1e-4, rtol=1e-4)
    _assert_grads_close(g, g_b)


def test_one_compilation_for_many_arcs(shared):
  c = _codec()
  f, sample = shared["mask"], jax.jit(c.sample_uniform)
  for i in range(20):
    arc = sample(jax.random.key(500 + i))
    (loss, _), _ = f(shared["params"], shared["stats"], arc, shared["x"], _key(i))
    assert np.isfinite(float(loss))
  for mode in _MODES:  # every mode compiled so far by this module's tests
    if mode in shared:
      assert shared[mode]._cache_size() == 1, mode


# -m slow: child.scan_layers is off for the search children on every backend
# ("auto"; it made their compiles and steps slower, docs/performance.md); the
# default suite checks the scanned fixed child.
@pytest.mark.slow
def test_scanned_search_cells_equal_unrolled_cells(shared):
  # TINY: cell 0 alone (calibrations), cells 1 (reduction) and 2 (aux head after
  # it) run as one lax.scan. Same weights -> same loss, logits, aux logits,
  # statistics and gradients as the unrolled cells, and one compile for every arc.
  cfg = mc.MicroChildConfig(**TINY, kernels="cpu", scan_layers=True)
  assert mc._shared_groups(shared["params"], cfg, True) == [[0], [1, 2]]
  f = jax.jit(jax.value_and_grad(_loss_fn(cfg), has_aux=True))
  for i, a in enumerate(shared["arcs"]):
    res = f(shared["params"], shared["stats"], jnp.asarray(a), shared["x"], _key(7))
    ref = shared["switch_res"][i]
    assert jax.tree.structure(res) == jax.tree.structure(ref)
    for u, v in zip(jax.tree.leaves(res), jax.tree.leaves(ref)):
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
  assert f._cache_size() == 1


# -m slow (two compiles of an 8-cell child): the stage-0 run whose second cell
# calibrates the stem (cells 0-1), besides the runs of the test above.
@pytest.mark.slow
def test_scanned_search_cells_equal_unrolled_cells_six_layers():
  x = _images(3, hw=8)
  arc = jnp.asarray(_arcs()[-1])
  out = {}
  for scan in (False, True):
    cfg = mc.MicroChildConfig(num_layers=6, num_nodes=B, out_filters=4, kernels="cpu",
                              scan_layers=scan)
    params, stats = init_in_one_compile(mc.init_shared, cfg)
    assert len(mc._shared_groups(params, cfg, scan)) == (3 if scan else 8)
    out[scan] = jax.jit(jax.value_and_grad(_loss_fn(cfg), has_aux=True))(
        params, stats, arc, x, _key(7))
  assert jax.tree.structure(out[True]) == jax.tree.structure(out[False])
  for u, v in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False])):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)


def test_search_scan_groups_at_search_size():
  # The search network (6 layers, 8 cells): each stage after its first cell is
  # one scan (reductions at cells 2 and 5 start a run; cell 0 calibrates both
  # inputs, cell 1 its input 0).
  cfg = mc.MicroChildConfig(num_layers=6, out_filters=20, kernels="cpu", scan_layers=True)
  params, _ = jax.eval_shape(lambda k: mc.init_shared(k, cfg), jax.random.key(0))
  assert mc._shared_groups(params, cfg, True) == [[0, 1], [2, 3, 4], [5, 6, 7]]
  assert mc._shared_groups(params, cfg, False) == [[i] for i in range(8)]


def test_eval_mode_has_no_aux_and_ignores_moving_averages(shared):
  cfg = mc.MicroChildConfig(**TINY, op_select="mask", kernels="xla")
  arc = shared["arcs"][0]
  p, x = shared["params"], shared["x"]
  f = jax.jit(lambda s: mc.apply_shared(p, s, arc, x, train=False, key=None, cfg=cfg)[:2])
  logits, aux = f(shared["stats"])
  assert aux is None and logits.shape == (N, 10)
  # Search BN always normalises with batch statistics: other moving averages
  # give the same output, and no dropout: the same output twice.
  logits2, _ = f(jax.tree.map(lambda v: v + 3.0, shared["stats"]))
  np.testing.assert_allclose(logits, logits2, atol=1e-5)
  assert f._cache_size() == 1


# ----------------------------------------------------------------- fixed child
def test_paper_arc_parameter_count():
  arc = cifar_micro.MicroCodec(5).parse(cifar_micro.PAPER_ARC)
  cfg = mc.MicroChildConfig(num_layers=15, out_filters=36)
  params, _ = jax.eval_shape(lambda k: mc.init_fixed(k, cfg, arc), jax.random.key(0))
  total, trunk, aux = (mc.count_params(params), mc.count_params(params, exclude_aux=True),
                       mc.count_params(params["aux"]))
  print(f"paper micro arc, final sizes: {trunk:,} trainable + {aux:,} aux = {total:,}")
  # Reference §6.3: 3.89M trainable + 0.50M aux head = 4.39M (the paper says 4.6M).
  assert trunk == 3_894_372 and aux == 494_848 and total == trunk + aux


@pytest.fixture(scope="module")
def fixed():
  # Reduction cell: node 2 = id(0) + sep3(1) (a strided identity: an FR), node 3
  # = avg(1) + max(2): input 0 is used, loose ends {3}; normal cell: node 2 =
  # sep5(0) + avg(0), node 3 = id(2) + sep3(0): input 1 is loose, loose {1, 3}.
  arc = cifar_micro.MicroCodec(B).validate(
      [0, 1, 0, 2, 2, 4, 0, 0, 0, 4, 1, 0, 1, 2, 2, 3])
  cfg = mc.MicroChildConfig(**TINY, kernels="cpu")
  params, stats = init_in_one_compile(mc.init_fixed, cfg, arc)
  x = _images(2)

  def loss(p, s, progress, key):
    logits, aux, ns = mc.apply_fixed(p, s, arc, x, train=True, key=key, cfg=cfg,
                                     progress=progress)
    return jnp.sum(logits ** 2) + 0.4 * jnp.sum(aux ** 2), (logits, aux, ns)

  args = (params, stats, jnp.float32(0.5), _key(3))
  # One compile gives the results and the memory analysis (the remat test's baseline).
  f = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(*args).compile()
  (l, (logits, aux, ns)), g = f(*args)
  return {"arc": arc, "cfg": cfg, "params": params, "stats": stats, "x": x, "logits": logits,
          "aux": aux, "new_stats": ns, "grads": g, "loss": l,
          "temp_bytes": f.memory_analysis().temp_size_in_bytes}


def test_fixed_child_shapes_grads_and_params(fixed):
  cfg, p = fixed["cfg"], fixed["params"]
  assert fixed["logits"].shape == (N, 10) and fixed["aux"].shape == (N, 10)
  assert np.isfinite(float(fixed["loss"]))
  leaves = jax.tree.leaves(fixed["grads"])
  assert all(np.all(np.isfinite(np.asarray(v))) for v in leaves)
  assert any(np.any(np.asarray(v) != 0) for v in leaves)
  assert jax.tree.structure(fixed["new_stats"]) == jax.tree.structure(fixed["stats"])
  # Only the arc's ops have parameters.
  red, normal = p["cells"][0], p["cells"][2]
  assert "fr" in red["nodes"][0]["x"] and "stacks" in red["nodes"][0]["y"]
  assert red["nodes"][1]["x"] == {} and red["nodes"][1]["y"] == {}
  assert red["combine"] == {}
  assert normal["nodes"][1]["x"] == {}  # identity at stride 1
  # The head reads the concat of the last (normal) cell's loose ends {1, 3}: 2 x 4C.
  c_last = 2 * 4 * cfg.out_filters
  assert p["fc"]["w"].shape == (c_last, 10)
  # Eval mode: moving averages, no aux, deterministic (jitted: one compile, not
  # one per op).
  a = jax.jit(lambda p, s: mc.apply_fixed(p, s, fixed["arc"], fixed["x"], train=False,
                                          key=None, cfg=cfg))(p, fixed["stats"])
  assert a[1] is None and a[0].shape == (N, 10)
  assert np.all(np.isfinite(np.asarray(a[0])))


def test_fixed_child_remat_cells_is_the_same_function_with_less_memory(fixed):
  # Per-cell rematerialisation recomputes each cell in the backward pass with
  # the same drop-path keys: same loss, gradients and statistics, fewer
  # temporaries (it keeps only each cell's inputs and output).
  cfg = mc.MicroChildConfig(**TINY, kernels="cpu", remat="cells")
  arc, x = fixed["arc"], fixed["x"]

  def loss(p, s, progress, key):
    logits, aux, ns = mc.apply_fixed(p, s, arc, x, train=True, key=key, cfg=cfg,
                                     progress=progress)
    return jnp.sum(logits ** 2) + 0.4 * jnp.sum(aux ** 2), (logits, aux, ns)

  args = (fixed["params"], fixed["stats"], jnp.float32(0.5), _key(3))
  f = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(*args).compile()
  (l, (logits, aux, ns)), g = f(*args)
  np.testing.assert_allclose(l, fixed["loss"], rtol=1e-5)
  np.testing.assert_allclose(logits, fixed["logits"], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves((g, ns)), jax.tree.leaves((fixed["grads"],
                                                               fixed["new_stats"]))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  temps = {"none": fixed["temp_bytes"], "cells": f.memory_analysis().temp_size_in_bytes}
  assert temps["cells"] < 0.8 * temps["none"], temps


# -m slow (~65 s): child.scan_layers is off by default; the scan groups at the
# paper's sizes are checked in the default suite (test_fixed_child_paper_sizes_scan_groups).
@pytest.mark.slow
def test_fixed_child_scanned_cells_equal_unrolled_cells(fixed):
  # 12 layers: cells 2-3, 7-8 and 12-13 have the same shapes; scan_layers runs
  # each pair as one lax.scan. Same weights -> same logits, aux logits, new
  # statistics and gradients as the unrolled cells (to float rounding), drop-path on.
  arc, hw = fixed["arc"], 8
  x = _images(4, hw=hw)
  out = {}
  for scan in (False, True):
    cfg = mc.MicroChildConfig(num_layers=12, num_nodes=B, out_filters=4, kernels="cpu",
                              scan_layers=scan)
    params, stats = init_in_one_compile(mc.init_fixed, cfg, arc)
    groups = mc._fixed_groups(mc._fixed_plan(cfg, arc)[0], params, stats, cfg)
    assert [len(g) for g in groups] == (
        [1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 2] if scan else [1] * cfg.num_cells)

    def loss(p, cfg=cfg):
      logits, aux, ns = mc.apply_fixed(p, stats, arc, x, train=True, key=_key(3),
                                       cfg=cfg, progress=0.7)
      return jnp.sum(logits ** 2) + 0.4 * jnp.sum(aux ** 2), (logits, aux, ns)
    out[scan] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  (la, (lo_a, aux_a, ns_a)), g_a = out[False]
  (lb, (lo_b, aux_b, ns_b)), g_b = out[True]
  np.testing.assert_allclose(lb, la, rtol=1e-5)
  np.testing.assert_allclose(lo_b, lo_a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux_b, aux_a, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(ns_b) == jax.tree.structure(ns_a)
  assert jax.tree.structure(g_b) == jax.tree.structure(g_a)
  # Per leaf, relative to its norm: at batch 2 the BNs of 2x2 maps amplify the
  # rounding of single elements.
  for a, b in zip(jax.tree.leaves((ns_a, g_a)), jax.tree.leaves((ns_b, g_b))):
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(b - a) <= 1e-3 * np.linalg.norm(a) + 1e-7, (a.shape, np.abs(b - a).max())


def test_fixed_child_paper_sizes_scan_groups():
  # The final network (15 layers): the last three normal cells of each stage are
  # one scan; the aux head's cell (12) ends a run.
  arc = cifar_micro.MicroCodec(5).validate(np.array(cifar_micro.PAPER_ARC.split(), np.int32))
  cfg = mc.MicroChildConfig(num_layers=15, out_filters=36, kernels="cpu", scan_layers=True)
  params, stats = jax.eval_shape(lambda k: mc.init_fixed(k, cfg, arc), jax.random.key(0))
  groups = mc._fixed_groups(mc._fixed_plan(cfg, arc)[0], params, stats, cfg)
  assert [g for g in groups if len(g) > 1] == [[2, 3, 4], [8, 9, 10], [14, 15, 16]]


def test_fixed_child_loose_input_of_reduction_cell_is_reduced():
  # Reduction cell with input 0 loose: node 2 = sep3(1) + max(1), node 3 = id(2) +
  # avg(1); its output concatenates FR(input 0) and node 3.
  arc = cifar_micro.MicroCodec(B).validate(
      [0, 0, 1, 2, 2, 4, 0, 3, 1, 0, 1, 3, 2, 4, 1, 2])
  cfg = mc.MicroChildConfig(num_layers=1, num_nodes=B, out_filters=2, use_aux_heads=False,
                            kernels="xla")
  codec = cifar_micro.MicroCodec(B)
  assert codec.loose_ends(arc, 1) == [0, 3] and codec.loose_ends(arc, 0) == [3]
  params, stats = jax.eval_shape(lambda k: mc.init_fixed(k, cfg, arc), jax.random.key(0))
  assert set(params["cells"][0]["combine"]) == {"0"}
  assert "aux" not in params
  out = jax.eval_shape(lambda p, s: mc.apply_fixed(p, s, arc, _images(), train=True,
                                                   key=jax.random.key(0), cfg=cfg),
                       params, stats)
  assert out[0].shape == (N, 10) and out[1] is None


def test_drop_path_schedule():
  cfg = mc.MicroChildConfig(num_layers=15, drop_path_keep_prob=0.6)
  # progress 0: keep 1 everywhere; progress >= 1: 1 - (i+1)/17 * 0.4, 0.6 at the last cell.
  for i in (0, 8, 16):
    assert float(mc.drop_path_keep(i, 0.0, cfg)) == pytest.approx(1.0)
    want = 1.0 - (i + 1) / 17 * 0.4
    assert float(mc.drop_path_keep(i, 1.0, cfg)) == pytest.approx(want, abs=1e-6)
    assert float(mc.drop_path_keep(i, 3.0, cfg)) == pytest.approx(want, abs=1e-6)
    assert float(mc.drop_path_keep(i, 0.5, cfg)) == pytest.approx(1 - 0.5 * (1 - want), abs=1e-6)
  assert float(mc.drop_path_keep(16, 1.0, cfg)) == pytest.approx(0.6)


def test_drop_path_zeroes_whole_examples(fixed):
  # At progress 1 with keep 0.6-ish, training outputs differ between keys, and
  # eval outputs do not depend on the key at all.
  cfg = mc.MicroChildConfig(**TINY, kernels="xla", keep_prob=1.0, drop_path_keep_prob=0.2)
  p, s, arc, x = fixed["params"], fixed["stats"], fixed["arc"], fixed["x"]
  f = jax.jit(lambda k, prog: mc.apply_fixed(p, s, arc, x, train=True, key=k, cfg=cfg,
                                             progress=prog)[0])
  a, b = f(_key(0), 1.0), f(_key(1), 1.0)
  assert not np.allclose(a, b)
  # progress 0: keep 1, no drop path; head dropout off (keep_prob 1): keys agree.
  np.testing.assert_allclose(f(_key(0), 0.0), f(_key(1), 0.0), atol=1e-6)


# ------------------------------------------------------------------- config
def _config(**child):
  c = ml_collections.ConfigDict()
  c.space = ml_collections.ConfigDict({"name": "cifar_micro", "num_layers": 6, "num_nodes": 5})
  c.child = ml_collections.ConfigDict(dict({"out_filters": 20}, **child))
  return c


def test_from_config_defaults_and_auto():
  cfg = mc.MicroChildConfig.from_config(_config(op_select="auto", kernels="auto"))
  assert cfg.num_layers == 6 and cfg.num_nodes == 5 and cfg.out_filters == 20
  assert cfg.op_select == "switch"
  assert cfg.kernels == ("cpu" if jax.default_backend() == "cpu" else "xla")
  t = mc.MicroChildConfig.from_config(_config(platform="gpu"))
  assert (t.platform, t.kernels, t.compute_dtype) == ("gpu", "xla", "bfloat16")
  assert cfg.keep_prob == 0.9 and cfg.drop_path_keep_prob == 0.6 and cfg.use_aux_heads
  assert cfg.reduction_cells == (2, 5) and cfg.aux_cell == 6 and cfg.num_cells == 8
  # scan_layers: "auto" resolves per platform (False everywhere so far); the
  # config field is a string, so "true"/"false" from the command line work too.
  assert cfg.scan_layers is False
  for v, want in (("true", True), ("False", False), (True, True), ("auto", False)):
    assert mc.MicroChildConfig.from_config(_config(scan_layers=v)).scan_layers is want
  with pytest.raises(ValueError, match="scan_layers"):
    mc.MicroChildConfig(num_layers=3, scan_layers="yes")


@pytest.mark.parametrize("child,match", [
    ({"op_select": "gather"}, "op_select"),
    ({"kernels": "fft"}, "child.kernels"),
    ({"compute_dtype": "float64"}, "child.compute_dtype"),
    ({"keep_prob": 0.0}, "keep_prob"),
    ({"drop_path_keep_prob": 1.5}, "drop_path_keep_prob"),
    ({"bn_decay": 1.0}, "bn_decay"),
    ({"bn_eps": 0.0}, "bn_eps"),
    ({"out_filters": 0}, "out_filters"),
    ({"remat": "layers"}, "remat must be 'none' or 'cells'"),
])
def test_bad_config_values_raise(child, match):
  with pytest.raises(ValueError, match=match):
    mc.MicroChildConfig.from_config(_config(**child))


def test_bad_sizes_and_arcs_raise():
  with pytest.raises(ValueError, match="num_layers"):
    mc.MicroChildConfig(num_layers=0)
  with pytest.raises(ValueError, match="num_nodes"):
    mc.MicroChildConfig(num_layers=3, num_nodes=0)
  c = _config()
  del c.child["out_filters"]
  with pytest.raises(ValueError, match="out_filters"):
    mc.MicroChildConfig.from_config(c)
  cfg = mc.MicroChildConfig(**TINY)
  bad = np.zeros(8 * B, np.int32)
  bad[0] = 5  # node 2 cannot read node 5
  with pytest.raises(ValueError, match="token 0"):
    mc.init_fixed(jax.random.key(0), cfg, bad)
  params, stats = jax.eval_shape(lambda k: mc.init_shared(k, cfg), jax.random.key(0))
  with pytest.raises(ValueError, match="multiples of 4"):
    jax.eval_shape(lambda p, s: mc.apply_shared(p, s, np.zeros(8 * B, np.int32),
                                                jnp.zeros((1, 10, 10, 3)), train=False,
                                                key=None, cfg=cfg), params, stats)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(tree)])


# -m slow (~18 s cold): the default suite checks bfloat16 on the macro and PTB
# children and every kernel's dtypes (test_kernels.py).
@pytest.mark.parametrize("kernels", [pytest.param("cpu", marks=pytest.mark.slow),
                                     pytest.param("xla", marks=pytest.mark.slow)])
def test_bfloat16_child_agrees_with_float32(shared, kernels):
  """compute_dtype=bfloat16: float32 parameters, statistics, logits and
  gradients; loss and gradient close to float32's. Seen (arc 0): loss 2.8e-3
  (cpu) / 5e-4 (xla) relative, gradient 0.31 / 0.24 relative (global norm),
  cosine 0.952 / 0.972. Both sets err alike: batch norm over 2 images makes
  the early layers' gradients (sums of cotangents that nearly cancel) the
  noisiest in bfloat16."""
  cfg = mc.MicroChildConfig(**TINY, kernels=kernels, compute_dtype="bfloat16")
  assert cfg.dtype == jnp.bfloat16
  f = jax.jit(jax.value_and_grad(_loss_fn(cfg), has_aux=True))
  (loss, (logits, aux, ns)), g = f(shared["params"], shared["stats"],
                                   jnp.asarray(shared["arcs"][0]), shared["x"], _key(7))
  assert logits.dtype == aux.dtype == jnp.float32
  for leaf in jax.tree.leaves((ns, g)):
    assert leaf.dtype == jnp.float32
  (loss32, _), g32 = shared["baked"][0]
  a, b = _flat(g), _flat(g32)
  rel, cos = np.linalg.norm(a - b) / np.linalg.norm(b), a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  print(f"bf16 vs f32 ({kernels}): loss {abs(float(loss) / float(loss32) - 1):.1e}, "
        f"grad {rel:.3f}, cosine {cos:.4f}")
  assert abs(float(loss) / float(loss32) - 1) < 1e-2
  assert rel < 0.5 and cos > 0.9
