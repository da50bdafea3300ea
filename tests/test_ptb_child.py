"""Tests of the PTB child networks (enas_jax/spaces/ptb_child.py) and of the
language-model task that trains them (enas_jax/train/lm.py).

The central property: the weight-shared child, run on a traced arc, computes
exactly what the fixed child computes on the view ``gather(shared, arc)``, and
an SGD step on the shared weights touches only the slices the arc uses
(enas_original.md §2.3-2.4, enas_lm_corrected_ptb.md §3.2).
"""

import copy
import dataclasses
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enas_jax import parallel, spaces
from enas_jax.data import synthetic_corpus
from enas_jax.spaces import ptb_child as pc
from enas_jax.train import lm as lm_lib
from enas_jax.train import task as task_lib
from enas_jax.train.lm import LMTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, H, B, T, N = 50, 8, 4, 5, 4

# Arcs of a 4-node cell (7 tokens). Node 0 takes each activation once; the
# later nodes use every activation too; the loose ends differ.
ARCS = [
    [3, 0, 2, 1, 1, 0, 3],  # node 0 sigmoid; loose ends {2, 3}
    [1, 0, 0, 0, 3, 2, 2],  # node 0 ReLU; loose ends {1, 3}
    [2, 0, 1, 1, 0, 2, 3],  # node 0 identity; a chain, loose end {3}
    [0, 0, 3, 0, 2, 0, 1],  # node 0 tanh; a star, loose ends {1, 2, 3}
]


def _load_ptb_config_module():
  spec = importlib.util.spec_from_file_location("enas_ptb_config",
                                                os.path.join(ROOT, "configs", "ptb.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


_CFG_MOD = _load_ptb_config_module()
CORPUS = synthetic_corpus(V, 400, 200, 100, seed=0)
MESH = parallel.make_mesh()


def make_config(aggregate="loose_ends", op_select="switch", share=False, **child):
  """The smoke config shrunk to tiny sizes (the run's ConfigDict as run.py builds it)."""
  c = copy.deepcopy(_CFG_MOD.get_config("smoke"))
  c.unlock()
  c.data.vocab_size = V
  c.data.batch_size = B
  c.data.eval_batch_size = B
  c.data.bptt = T
  c.space.num_nodes = N
  c.space.aggregate = aggregate
  c.child.hidden_size = H
  c.child.op_select = op_select
  c.child.share_across_activations = share
  # Every dropout and regulariser on, so that equivalence covers all of them.
  c.child.drop_e = 0.1
  c.child.drop_i = 0.2
  c.child.drop_x = 0.25
  c.child.drop_l = 0.15
  c.child.drop_o = 0.25
  c.child.alpha = 0.5
  c.child.beta = 1.0
  c.child.weight_decay = 1e-3
  for k, v in child.items():
    setattr(c.child, k, v)
  return c


def make_tasks(**kw):
  cfg = make_config(**kw)
  return (LMTask(cfg, CORPUS, MESH, shared=True), LMTask(cfg, CORPUS, MESH, shared=False))


def used_rows(arc, cc):
  """(row of w0, [row of w_nodes[i-1] for i = 1..N-1]) that ``arc`` uses."""
  arc = np.asarray(arc)
  A = cc.num_acts
  if cc.share_across_activations:
    return 0, [int(arc[2 * i - 1]) for i in range(1, cc.num_nodes)]
  return int(arc[0]), [int(arc[2 * i - 1]) * A + int(arc[2 * i])
                       for i in range(1, cc.num_nodes)]


def unused_mask(leaf_rows, num_rows):
  m = np.ones(num_rows, bool)
  m[leaf_rows] = False
  return m


def _np(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


# ----------------------------------------------------------------------------
# Parameters, gather and scatter.


@pytest.mark.parametrize("share", [False, True])
def test_param_shapes_and_gather_layout(share):
  cc = pc.ChildConfig(vocab_size=V, hidden_size=H, num_nodes=N,
                      share_across_activations=share)
  A = 1 if share else 4
  assert cc.num_acts == A
  sh = pc.init_shared(jax.random.key(0), cc)
  assert sh["emb"].shape == (V, H)
  assert sh["w0"].shape == (A, 2 * H, 2 * H)
  assert [w.shape for w in sh["w_nodes"]] == [(i * A, H, 2 * H) for i in range(1, N)]
  fx = pc.init_fixed(jax.random.key(0), cc)
  assert jax.tree_util.tree_map(jnp.shape, fx) == {
      "emb": (V, H), "w0": (2 * H, 2 * H), "w_nodes": (N - 1, H, 2 * H)}
  shn = _np(sh)
  for leaf in jax.tree_util.tree_leaves(shn) + jax.tree_util.tree_leaves(_np(fx)):
    assert np.abs(leaf).max() <= cc.init_range
  gather = jax.jit(lambda s, a: pc.gather(s, a, cc))
  for arc in ARCS:
    view = _np(gather(sh, jnp.asarray(arc, jnp.int32)))
    assert jax.tree_util.tree_map(np.shape, view) == jax.tree_util.tree_map(np.shape, _np(fx))
    r0, rows = used_rows(arc, cc)
    np.testing.assert_array_equal(view["emb"], shn["emb"])
    np.testing.assert_array_equal(view["w0"], shn["w0"][r0])
    for i in range(1, N):
      np.testing.assert_array_equal(view["w_nodes"][i - 1], shn["w_nodes"][i - 1][rows[i - 1]])
    # The numpy (static) arc gathers the same view.
    np.testing.assert_array_equal(_np(pc.gather(sh, np.asarray(arc), cc))["w0"], view["w0"])


def test_scatter_writes_only_the_arc_slices():
  cc = pc.ChildConfig(vocab_size=V, hidden_size=H, num_nodes=N)
  sh = pc.init_shared(jax.random.key(1), cc)
  arc = jnp.asarray(ARCS[0], jnp.int32)
  gather = jax.jit(lambda s, a: pc.gather(s, a, cc))
  scatter = jax.jit(lambda s, a, v: pc.scatter(s, a, v, cc))
  # scatter(gather) is the identity.
  same = _np(scatter(sh, arc, gather(sh, arc)))
  for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(_np(sh))):
    np.testing.assert_array_equal(a, b)
  view = jax.tree_util.tree_map(lambda x: x + 1.0, gather(sh, arc))
  new = _np(scatter(sh, arc, view))
  old = _np(sh)
  r0, rows = used_rows(ARCS[0], cc)
  np.testing.assert_allclose(new["emb"], old["emb"] + 1.0)
  np.testing.assert_allclose(new["w0"][r0], old["w0"][r0] + 1.0)
  keep = unused_mask([r0], 4)
  np.testing.assert_array_equal(new["w0"][keep], old["w0"][keep])
  for i in range(1, N):
    np.testing.assert_allclose(new["w_nodes"][i - 1][rows[i - 1]],
                               old["w_nodes"][i - 1][rows[i - 1]] + 1.0)
    keep = unused_mask([rows[i - 1]], i * 4)
    np.testing.assert_array_equal(new["w_nodes"][i - 1][keep], old["w_nodes"][i - 1][keep])


# ----------------------------------------------------------------------------
# Shared child == fixed child on the gathered view.

# Every setting appears both ways (a pairwise cover of the 8 combinations; the
# full product costs twice the compile time for little extra coverage). Each
# variant runs one of ARCS, so node 0 takes every activation once.
VARIANTS = [
    dict(aggregate="loose_ends", op_select="switch", share=False),
    dict(aggregate="loose_ends", op_select="mask", share=True),
    dict(aggregate="all", op_select="switch", share=True),
    dict(aggregate="all", op_select="mask", share=False),
]


def _variant_id(v):
  return f"{v['aggregate']}-{v['op_select']}-{'share' if v['share'] else 'full'}"


@pytest.mark.parametrize("k", range(len(VARIANTS)), ids=[_variant_id(v) for v in VARIANTS])
def test_shared_matches_fixed(k):
  variant, arc = VARIANTS[k], ARCS[k]
  wd_mode = "w4_selected" if k % 2 else "l2"
  ts, tf = make_tasks(weight_decay_mode=wd_mode, **variant)
  cc = ts.cc
  assert cc == tf.cc and cc.op_select == variant["op_select"]
  state = ts.init_child(jax.random.key(k))
  # Start mid-epoch (step 1) from a nonzero state, so h0 matters.
  h_init = 0.3 * jax.random.normal(jax.random.key(7), (B, H))
  state = state.replace(h=h_init, step=jnp.int32(1))
  x, y = lm_lib.window(ts.data["valid"], 3, T)
  key = jax.random.key(11)
  shared_step = functools.partial(task_lib.train_step, ts)

  @jax.jit
  def run_shared(state, arc):
    # The arc is traced: the view is gathered inside the compiled function.
    ce, h = pc.eval_ce_sum(pc.gather(state.params, arc, cc), arc, x, y, h_init, cc,
                           static=False)
    new_state, metrics = shared_step(state, ts.data, arc, key)
    return ce, h, new_state, metrics

  arc_np = np.asarray(arc, np.int32)
  fixed_step = functools.partial(task_lib.train_step, tf, arc_static=arc_np)

  @jax.jit
  def run_fixed(fstate):
    ce, h = pc.eval_ce_sum(fstate.params, arc_np, x, y, h_init, cc, static=True)
    new_state, metrics = fixed_step(fstate, tf.data, None, key)
    return ce, h, new_state, metrics

  arc_j = jnp.asarray(arc_np)
  old = _np(state.params)
  view = pc.gather(state.params, arc_j, cc)
  fstate = state.replace(params=view, opt_state=tf.tx.init(view))
  ce_s, h_s, new_s, m_s = _np(run_shared(state, arc_j))
  ce_f, h_f, new_f, m_f = _np(run_fixed(fstate))

  # Evaluation (no dropout).
  np.testing.assert_allclose(ce_s, ce_f, rtol=2e-5)
  np.testing.assert_allclose(h_s, h_f, rtol=2e-5, atol=1e-6)
  # Training loss with every dropout, the regularisers and the penalty on,
  # same dropout key; and the gradient norm.
  for name in ("loss", "ce", "grad_norm"):
    np.testing.assert_allclose(m_s[name], m_f[name], rtol=2e-5, atol=1e-6, err_msg=name)
  assert m_s["finite"] and m_f["finite"]
  assert m_s["loss"] > m_s["ce"] > 0
  np.testing.assert_allclose(new_s.h, new_f.h, rtol=2e-5, atol=1e-6)
  assert int(new_s.step) == int(new_f.step) == 2

  # After the SGD step the arc's slices of the shared weights equal the fixed
  # child's updated parameters...
  new_view = _np(pc.gather(new_s.params, arc_j, cc))
  for name in ("emb", "w0", "w_nodes"):
    np.testing.assert_allclose(new_view[name], new_f.params[name], rtol=2e-5, atol=1e-6,
                               err_msg=name)
  assert not np.array_equal(new_view["w0"], np.asarray(view["w0"]))
  assert not np.array_equal(new_view["w_nodes"], np.asarray(view["w_nodes"]))
  # ...and every slice the arc did not use is bit-identical to before.
  new = new_s.params
  r0, rows = used_rows(arc, cc)
  keep = unused_mask([r0], cc.num_acts)
  np.testing.assert_array_equal(new["w0"][keep], old["w0"][keep])
  for i in range(1, N):
    keep = unused_mask([rows[i - 1]], i * cc.num_acts)
    assert keep.sum() == i * cc.num_acts - 1
    np.testing.assert_array_equal(new["w_nodes"][i - 1][keep], old["w_nodes"][i - 1][keep])


@pytest.mark.parametrize("share", [False, True])
def test_gradients_zero_on_unused_slices(share):
  cc = make_tasks(share=share)[0].cc
  sh = pc.init_shared(jax.random.key(3), cc)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  y = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  h0 = 0.1 * jnp.ones((B, H))

  @jax.jit
  def grad(params, arc):
    return jax.grad(lambda p: pc.loss(pc.gather(p, arc, cc), arc, x, y, h0,
                                      jax.random.key(5), cc, static=False)[0])(params)

  space = spaces.get("ptb", num_nodes=N)
  sampled = np.asarray(jax.vmap(space.sample_uniform)(jax.random.split(jax.random.key(4), 6)))
  for arc in ARCS + sampled.tolist():
    g = _np(grad(sh, jnp.asarray(arc, jnp.int32)))
    r0, rows = used_rows(arc, cc)
    assert np.abs(g["emb"]).sum() > 0
    assert np.abs(g["w0"][r0]).sum() > 0
    keep = unused_mask([r0], cc.num_acts)
    assert (g["w0"][keep] == 0).all()
    for i in range(1, N):
      gi = g["w_nodes"][i - 1]
      assert np.abs(gi[rows[i - 1]]).sum() > 0, i
      assert (gi[unused_mask([rows[i - 1]], i * cc.num_acts)] == 0).all(), i


# ----------------------------------------------------------------------------
# One compilation for all arcs.


def test_train_chunk_compiles_once():
  ts, _ = make_tasks()
  space = spaces.get("ptb", num_nodes=N)
  chunk = ts.make_train_chunk(lambda p, k: space.sample_uniform(k))
  state = ts.init_child(jax.random.key(0))
  total = 0
  for i, n in enumerate((20, 7, 13, 11)):
    state, sums = chunk(state, {}, jax.random.key(100 + i), n)
    sums = _np(sums)
    total += n
    assert int(sums["n"]) == n and int(sums["first_bad"]) == -1
    assert np.isfinite(sums["loss"]) and sums["loss"] > 0
    assert int(state.step) == total
  assert total >= 50
  assert chunk._cache_size() == 1
  # The state keeps its declared layout: params replicated, h batch-sharded.
  rep = parallel.replicated(MESH)
  for leaf in jax.tree_util.tree_leaves(state.params):
    assert leaf.sharding.is_equivalent_to(rep, leaf.ndim)
    assert leaf.sharding.spec == rep.spec
  assert state.h.sharding.spec == parallel.batch_sharding(MESH).spec


def test_eval_through_gather_compiles_once():
  ts, _ = make_tasks()
  cc = ts.cc
  space = spaces.get("ptb", num_nodes=N)
  sh = pc.init_shared(jax.random.key(0), cc)
  x, y = lm_lib.window(ts.data["valid"], 0, T)
  h0 = jnp.zeros((B, H))
  f = jax.jit(lambda p, a: pc.eval_ce_sum(pc.gather(p, a, cc), a, x, y, h0, cc, False)[0])
  arcs = np.asarray(jax.vmap(space.sample_uniform)(jax.random.split(jax.random.key(9), 50)))
  ces = []
  for a in arcs:
    space.validate(a)
    ces.append(float(f(sh, jnp.asarray(a, jnp.int32))))
  assert f._cache_size() == 1
  assert np.isfinite(ces).all()
  assert len(set(ces)) > 25  # different arcs, different cells


def test_score_arcs_matches_fixed_valid():
  ts, tf = make_tasks(aggregate="all")
  sh = ts.init_child(jax.random.key(2)).params
  arcs = jnp.asarray(ARCS[:2], jnp.int32)
  score = ts.make_score_arcs(3)
  ppl = np.asarray(score(sh, arcs))
  assert ppl.shape == (2,) and np.isfinite(ppl).all() and ppl[0] != ppl[1]
  for k in range(2):
    fixed = tf.make_fixed_valid(np.asarray(ARCS[k]), num_batches=3)
    np.testing.assert_allclose(ppl[k], float(fixed(pc.gather(sh, arcs[k], ts.cc))), rtol=2e-5)
  # The reward is c / ppl of one window with a zero state: at most c, positive.
  reward = jax.jit(ts.reward_fn(80.0))
  r = float(reward(arcs[0], jax.random.key(0),
                   {"params": sh, "batch_stats": {}, "data": ts.data}))
  assert 0.0 < r < 80.0
  ce_fn = jax.jit(functools.partial(lm_lib.window_ce, ts, ts.data))
  col = int(jax.random.randint(jax.random.key(0), (), 0, ts.data["valid"].shape[1] - T))
  s, _ = ce_fn(sh, arcs[0], col, jnp.zeros((B, H)))
  np.testing.assert_allclose(r, 80.0 / np.exp(float(s) / (B * T)), rtol=1e-5)


# ----------------------------------------------------------------------------
# Locked dropout.


def test_make_masks_shapes_and_values():
  cc = pc.ChildConfig(vocab_size=V, hidden_size=64, num_nodes=N, drop_e=0.1, drop_i=0.2,
                      drop_x=0.75, drop_l=0.25, drop_o=0.5)
  m = _np(pc.make_masks(jax.random.key(0), 64, cc))
  assert set(m) == {"e", "i", "x", "l", "o"}
  assert m["e"].shape == (V,)
  rates = {"e": 0.1, "i": 0.2, "x": 0.75, "l": 0.25, "o": 0.5}
  for name, rate in rates.items():
    if name != "e":
      assert m[name].shape == (64, 64), name
    keep = 1.0 - rate
    vals = np.unique(m[name])
    assert set(vals.tolist()) <= {0.0, np.float32(1.0 / keep)}, (name, vals)
    assert len(vals) == 2, name
    if name != "e":
      assert abs((m[name] > 0).mean() - keep) < 0.05, name
  # Independent masks per kind, new masks per key.
  assert not np.array_equal(m["i"], m["o"])
  m2 = _np(pc.make_masks(jax.random.key(1), 64, cc))
  assert not np.array_equal(m["x"], m2["x"])
  assert pc.make_masks(None, 64, cc) is None
  none = pc.ChildConfig(vocab_size=V, hidden_size=8, num_nodes=N)
  assert pc.make_masks(jax.random.key(0), 4, none) == {}


@functools.lru_cache(maxsize=None)
def _cell_fn(arc: tuple, cc):
  return jax.jit(lambda v, x, m: pc.run_cell(
      v, np.asarray(arc), x, jnp.zeros((x.shape[0], cc.hidden_size)), m, cc, static=True)[0])


def _run_outputs(view, arc, x, masks, cc):
  """Cell outputs [T, B, H] of the fixed child (one compilation per arc and config)."""
  return np.asarray(_cell_fn(tuple(int(a) for a in arc), cc)(view, x, masks))


@pytest.mark.parametrize("kind", ["x", "i"])
def test_input_masks_are_locked_across_time(kind):
  # A unit j of x zeroed for row b at every step <=> changing column j of the
  # embedding cannot change row b's outputs at any time step.
  cc = pc.ChildConfig(vocab_size=V, hidden_size=H, num_nodes=N, drop_x=0.5, drop_i=0.5)
  view = pc.init_fixed(jax.random.key(0), cc)
  x = jnp.asarray(np.random.default_rng(0).integers(0, V, (16, 12)), jnp.int32)
  masks = {kind: pc.make_masks(jax.random.key(4), 16, cc)[kind]}
  mask = np.asarray(masks[kind])
  arc = np.asarray(ARCS[2])
  base = _run_outputs(view, arc, x, masks, cc)
  checked = 0
  for j in range(H):
    view2 = dict(view, emb=view["emb"].at[:, j].add(1.0))
    out = _run_outputs(view2, arc, x, masks, cc)
    dropped = mask[:, j] == 0
    np.testing.assert_array_equal(out[:, dropped], base[:, dropped])
    diff = np.abs(out[:, ~dropped] - base[:, ~dropped]).max(axis=-1)  # [T, kept rows]
    assert (diff > 0).all()
    checked += dropped.sum()
  assert checked > 0


def test_state_mask_is_locked_across_time():
  # drop_l masks h_{t-1} into node 0 and every node's input with one [B,H]
  # mask: with unit j of row b dropped, row j of w0's h-half and of every node
  # matrix never reaches row b's outputs, at any time step.
  cc = pc.ChildConfig(vocab_size=V, hidden_size=H, num_nodes=N, drop_l=0.5)
  view = pc.init_fixed(jax.random.key(1), cc)
  x = jnp.asarray(np.random.default_rng(1).integers(0, V, (16, 12)), jnp.int32)
  masks = pc.make_masks(jax.random.key(5), 16, cc)
  mask = np.asarray(masks["l"])
  arc = np.asarray(ARCS[0])
  base = _run_outputs(view, arc, x, masks, cc)
  for j in range(H):
    view2 = dict(view, w0=view["w0"].at[H + j].add(0.5),
                 w_nodes=view["w_nodes"].at[:, j].add(0.5))
    out = _run_outputs(view2, arc, x, masks, cc)
    dropped = mask[:, j] == 0
    np.testing.assert_array_equal(out[:, dropped], base[:, dropped])
    if (~dropped).any():
      assert np.abs(out[1:, ~dropped] - base[1:, ~dropped]).max(axis=-1).min() > 0


def test_output_mask_is_locked_across_time():
  # token_ce applies one [B,H] output mask at every time step.
  rng = np.random.default_rng(2)
  emb = rng.normal(size=(V, H)).astype(np.float32)
  outs = rng.normal(size=(T, B, H)).astype(np.float32)
  y = rng.integers(0, V, (B, T))
  mask = (rng.integers(0, 2, (B, H)) * 2.0).astype(np.float32)

  def ref(o):  # [T,B] cross-entropy, float64
    logits = np.einsum("tbh,vh->tbv", o.astype(np.float64), emb)
    lse = np.log(np.exp(logits).sum(-1))
    return lse - np.take_along_axis(logits, y.T[..., None], axis=-1)[..., 0]

  view = {"emb": jnp.asarray(emb)}
  got = np.asarray(pc.token_ce(view, jnp.asarray(outs), jnp.asarray(y), {"o": jnp.asarray(mask)}))
  assert got.shape == (T, B)
  np.testing.assert_allclose(got, ref(outs * mask[None]), rtol=1e-5, atol=1e-5)
  plain = np.asarray(pc.token_ce(view, jnp.asarray(outs), jnp.asarray(y)))
  np.testing.assert_allclose(plain, ref(outs), rtol=1e-5, atol=1e-5)


def test_embedding_row_dropout_drops_whole_words():
  cc = pc.ChildConfig(vocab_size=V, hidden_size=H, num_nodes=N, drop_e=0.5)
  view = pc.init_fixed(jax.random.key(0), cc)
  m = pc.make_masks(jax.random.key(3), 4, cc)
  e = np.asarray(m["e"])
  dropped_words = np.nonzero(e == 0)[0]
  assert 0 < len(dropped_words) < V
  w = int(dropped_words[0])
  x = jnp.full((4, 6), w, jnp.int32)
  # A sequence of one dropped word: x = 0 at every step, so changing that
  # word's embedding row changes nothing in the cell's outputs.
  base = _run_outputs(view, np.asarray(ARCS[1]), x, m, cc)
  view2 = dict(view, emb=view["emb"].at[w].add(1.0))
  np.testing.assert_array_equal(_run_outputs(view2, np.asarray(ARCS[1]), x, m, cc), base)


# ----------------------------------------------------------------------------
# Weight penalty and configuration.


def test_weight_penalty_modes():
  cc = pc.ChildConfig(vocab_size=V, hidden_size=H, num_nodes=N, weight_decay=1e-3,
                      weight_decay_mode="l2")
  view = pc.init_fixed(jax.random.key(0), dataclasses.replace(cc, init_range=0.9))
  v64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), view)
  l2 = 1e-3 * sum((a ** 2).sum() for a in (v64["emb"], v64["w0"], v64["w_nodes"]))
  np.testing.assert_allclose(float(pc.weight_penalty(view, cc)), l2, rtol=1e-5)
  cc4 = dataclasses.replace(cc, weight_decay_mode="w4_selected")
  w4 = 1e-3 * 0.5 * ((v64["w0"] ** 4).sum() + (v64["w_nodes"][1:] ** 4).sum())
  np.testing.assert_allclose(float(pc.weight_penalty(view, cc4)), w4, rtol=1e-5)
  # The embedding and node 1's matrix are excluded from w4_selected...
  view2 = dict(view, emb=view["emb"] * 3.0, w_nodes=view["w_nodes"].at[0].multiply(3.0))
  np.testing.assert_allclose(float(pc.weight_penalty(view2, cc4)), w4, rtol=1e-5)
  # ...but not from l2.
  assert float(pc.weight_penalty(view2, cc)) > 2 * l2
  for c in (dataclasses.replace(cc, weight_decay_mode="none"),
            dataclasses.replace(cc, weight_decay=0.0)):
    assert float(pc.weight_penalty(view, c)) == 0.0
  # The penalty is what the loss adds (and reports); no dropout (key None),
  # alpha = beta = 0, so loss = ce + penalty.
  x = jnp.zeros((B, T), jnp.int32)
  h0 = jnp.zeros((B, H))
  for c in (cc, cc4):
    tot, aux = pc.loss(view, np.asarray(ARCS[0]), x, x, h0, None, c, static=True)
    np.testing.assert_allclose(float(aux["penalty"]), float(pc.weight_penalty(view, c)),
                               rtol=1e-6)
    assert float(aux["penalty"]) > 0.01
    np.testing.assert_allclose(float(tot - aux["ce"]), float(aux["penalty"]), rtol=1e-3)


def test_child_config_checks_and_from_config():
  for kw in ({"weight_decay_mode": "l1"}, {"op_select": "gather"}, {"drop_x": 1.0},
             {"drop_l": -0.1}):
    with pytest.raises(ValueError):
      pc.ChildConfig(vocab_size=V, hidden_size=H, **kw)
  cfg = make_config()
  cfg.child.op_select = "auto"
  cc = pc.ChildConfig.from_config(cfg)
  assert cc.op_select == "switch"
  assert (cc.vocab_size, cc.hidden_size, cc.num_nodes) == (V, H, N)
  assert cc.drop_l == 0.15 and cc.weight_decay_mode == "w4_selected"
  hash(cc)  # static argument of jitted functions


def test_lm_task_rejects_small_vocab():
  cfg = make_config()
  cfg.data.vocab_size = 20
  with pytest.raises(ValueError, match="vocab_size"):
    LMTask(cfg, CORPUS, MESH, shared=True)
