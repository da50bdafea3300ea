"""The optional search-time batch norm (the seed's): statistics, state, eval."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_ptb_config
from enas_jax import data as data_lib
from enas_jax import parallel
from enas_jax.spaces import ptb_child as pc
from enas_jax.train.lm import LMTask


def test_ema_over_time_matches_sequential_updates():
  rng = np.random.default_rng(0)
  old = rng.normal(size=(3,)).astype(np.float32)
  xs = rng.normal(size=(7, 3)).astype(np.float32)
  m = old.copy()
  for x in xs:
    m = 0.9 * m + 0.1 * x
  np.testing.assert_allclose(pc._ema_over_time(jnp.asarray(old), jnp.asarray(xs), 0.9), m,
                             rtol=1e-5)


def test_batch_norm_training_normalises_and_updates_stats():
  cfg = tiny_ptb_config(**{"child.batch_norm": True, "child.bn_eps": 1e-5})
  cc = pc.ChildConfig.from_config(cfg)
  arc = np.array([0, 0, 1, 1, 2, 0, 3], np.int32)
  view = pc.gather(pc.init_shared(jax.random.key(0), cc), arc, cc)
  x = jax.random.randint(jax.random.key(1), (4, 6), 0, 40)
  h0 = jnp.zeros((4, cc.hidden_size))
  stats = pc.init_batch_stats(cc)
  outs, _, new = pc.run_cell_bn(view, arc, x, h0, None, cc, True, stats)
  # Outputs are batch-normalised per time step: zero mean over the batch.
  np.testing.assert_allclose(np.asarray(outs).mean(axis=1), 0.0, atol=1e-5)
  assert not np.allclose(np.asarray(new["mean"]), 0.0)
  # Evaluation uses the moving statistics, so it differs from batch statistics.
  ce_moving, _ = pc.eval_ce_sum(view, arc, x, x, h0, cc, True, bn_stats=new)
  assert np.isfinite(float(ce_moving))


def test_search_chunk_with_batch_norm_carries_stats_and_compiles_once():
  cfg = tiny_ptb_config(**{"child.batch_norm": True})
  task = LMTask(cfg, data_lib.load_corpus(cfg.data), parallel.make_mesh(), shared=True)
  from enas_jax.train.run import build_space
  space = build_space(cfg)
  chunk = task.make_train_chunk(lambda p, k: space.sample_uniform(k))
  st = task.init_child(jax.random.key(0))
  before = np.asarray(st.batch_stats["mean"]).copy()
  for n in (3, 5):
    st, acc = chunk(st, {}, jax.random.key(1), jnp.int32(n))
  assert int(acc["first_bad"]) == -1
  assert not np.allclose(np.asarray(st.batch_stats["mean"]), before)
  assert chunk._cache_size() == 1
  score = task.make_score_arcs(2)
  arcs = jnp.stack([space.sample_uniform(jax.random.key(i)) for i in range(2)])
  ppl = score(st.params, arcs, st.batch_stats)
  assert np.all(np.isfinite(np.asarray(ppl)))
