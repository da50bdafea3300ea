"""The corrected code's PTB search (configs/ptb.py:search_corrected).

Its controller (``google-research/enas_lm``): no node-0 steps (node 0's anchor
and attention key are zero vectors), node 1's pointer step fed ``g_emb``,
activation logits tied to the activation embedding (``h @ w_emb.T``, no
``w_soft``). Checked against a plain numpy loop written from that description
(not from the ``Decisions`` program), and by hand for the first steps. The
seed-structured ``search`` variant keeps its controller (tests/test_controller.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_ptb_config
from enas_jax import controller as C
from enas_jax.spaces import base
from enas_jax.spaces.ptb import PTBSpace

N = 6  # nodes, node 0 included: 5 decided nodes, 10 decisions
CFG = C.ControllerConfig(lstm_size=12, temperature=5.0, tanh_constant=2.25, init_range=0.1,
                         tie_op_logits=True)
SPACE = PTBSpace(num_nodes=N, aggregate="all", node0_activations=1, node0_anchor="zero",
                 node1_input="g_emb")


def _params(scale=4.0, seed=3):
  # One jitted program on an "rbg" key: eagerly every weight's threefry draw is
  # an XLA:CPU compile (the tied-logits test below keeps eager threefry init).
  p = jax.jit(lambda k: C.init(k, SPACE.decisions, CFG))(jax.random.key(seed, impl="rbg"))
  return jax.tree.map(lambda w: w * scale, p)


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def _lstm(w, x, c, h):
  z = np.concatenate([x, h]) @ w
  i, f, o, g = np.split(z, 4)
  c = _sig(i) * np.tanh(g) + _sig(f) * c
  return c, _sig(o) * np.tanh(c)


def enas_lm_reference(params, arc, cfg=CFG):
  """log p and sampled-token entropy of a seed-format arc under enas_lm's
  controller, float64, as a plain loop over nodes 1..N-1."""
  p = {k: np.asarray(v, np.float64)[...] for k, v in params.items()}
  w, s = p["w_lstm"][0], cfg.lstm_size
  squash = lambda l: cfg.tanh_constant * np.tanh(l / cfg.temperature)  # noqa: E731
  c, h = np.zeros(s), np.zeros(s)
  anchors, keys = [np.zeros(s)], [np.zeros(s)]  # node 0: zero anchor, zero key
  x = p["g_emb"][0]
  lp = ent = 0.0
  n = (len(arc) + 1) // 2
  for k in range(1, n):
    prev, func = int(arc[2 * k - 1]), int(arc[2 * k])
    c, h = _lstm(w, x, c, h)  # index step
    anchors.append(h)
    keys.append(h @ p["w_attn_1"])
    q = h @ p["w_attn_2"]
    logits = np.array([np.tanh(keys[j] + q) @ p["v_attn"][:, 0] for j in range(k)])
    logits = squash(logits) - (k - np.arange(k)) ** 2 / 6.0
    pr = np.exp(logits - logits.max())
    pr /= pr.sum()
    lp += np.log(pr[prev])
    ent += -pr[prev] * np.log(pr[prev])
    x = anchors[prev] / (0.1 + (k - prev))
    c, h = _lstm(w, x, c, h)  # function step
    logits = squash(h @ p["w_emb"].T)  # tied to the function embedding
    pr = np.exp(logits - logits.max())
    pr /= pr.sum()
    lp += np.log(pr[func])
    ent += -pr[func] * np.log(pr[func])
    x = p["w_emb"][func]
  return lp, ent


@functools.lru_cache(maxsize=None)
def _scorer():
  return C.make_log_prob(SPACE.decisions, CFG)


def _arcs(n, seed):
  rs = np.random.RandomState(seed)
  arcs = np.zeros((n, SPACE.arc_length), np.int32)
  for i in range(1, N):
    arcs[:, 2 * i - 1] = rs.randint(0, i, n)
    arcs[:, 2 * i] = rs.randint(0, 4, n)
  return arcs


def test_program_structure():
  d = SPACE.decisions
  # 2 steps per node 1..N-1, none for node 0; node 1's pointer comes first.
  assert d.num_steps == 2 * (N - 1)
  assert base.ANCHOR not in d.kind.tolist()
  assert (d.kind[0], d.node[0], d.num_choices[0]) == (base.POINTER, 1, 1)
  assert 0 not in d.token.tolist() and d.fixed_tokens == (0,)
  assert not d.write_anchor[d.node == 0].any()
  # The seed's program is unchanged: node 0 = [ANCHOR, OP], then [POINTER, OP].
  seed = PTBSpace(num_nodes=N).decisions
  assert seed.kind[:3].tolist() == [base.ANCHOR, base.OP, base.POINTER]
  assert seed.num_steps == 2 * N and getattr(seed, "fixed_tokens", ()) == ()
  with pytest.raises(ValueError, match="node0_activations"):
    PTBSpace(num_nodes=N, node0_activations=2, node1_input="g_emb")
  with pytest.raises(ValueError, match="node0_anchor"):
    PTBSpace(num_nodes=N, node0_anchor="learned")


def test_tied_logits_have_no_w_soft_and_keep_other_params():
  tied = C.init(jax.random.key(0), SPACE.decisions, CFG)
  untied_cfg = C.ControllerConfig(lstm_size=12, temperature=5.0, tanh_constant=2.25,
                                  init_range=0.1)
  untied = C.init(jax.random.key(0), SPACE.decisions, untied_cfg)
  assert "w_soft" not in tied and set(untied) - set(tied) == {"w_soft"}
  for k in tied:  # same draws for the shared entries
    np.testing.assert_array_equal(np.asarray(tied[k]), np.asarray(untied[k]))
  with pytest.raises(ValueError, match="w_soft"):
    C.log_prob(tied, jnp.asarray(_arcs(1, 0)[0]), SPACE.decisions, untied_cfg)


def test_first_steps_by_hand():
  """Node 1: a one-way pointer (log p 0) on g_emb; its function step is fed
  anchor_0 / 1.1 = 0 and scores the functions with h @ w_emb.T."""
  p = _params()
  arc = _arcs(1, 1)[0]
  logits = np.asarray(C.step_logits(p, jnp.asarray(arc), SPACE.decisions, CFG))
  q = {k: np.asarray(v, np.float64) for k, v in p.items()}
  s = CFG.lstm_size
  c1, h1 = _lstm(q["w_lstm"][0], q["g_emb"][0], np.zeros(s), np.zeros(s))
  # Step 0: node 1's pointer; only j = 0 is valid, with the zero key.
  want0 = 2.25 * np.tanh((np.tanh(h1 @ q["w_attn_2"]) @ q["v_attn"][:, 0]) / 5.0) - 1.0 / 6.0
  np.testing.assert_allclose(logits[0, 0], want0, rtol=1e-5, atol=1e-6)
  assert (logits[0, 1:] == C.NEG_LOGIT).all()
  # Step 1: fed zeros (anchor 0 is zero), logits tied to w_emb.
  _, h2 = _lstm(q["w_lstm"][0], np.zeros(s), c1, h1)
  np.testing.assert_allclose(logits[1, :4], 2.25 * np.tanh(h2 @ q["w_emb"].T / 5.0),
                             rtol=1e-5, atol=1e-6)
  # Step 2 (node 2's pointer): node 0's key is zero, node 1's is h1 @ w_attn_1.
  c2, h2 = _lstm(q["w_lstm"][0], np.zeros(s), c1, h1)
  _, h3 = _lstm(q["w_lstm"][0], q["w_emb"][arc[2]], c2, h2)
  qq = h3 @ q["w_attn_2"]
  raw = np.array([np.tanh(qq) @ q["v_attn"][:, 0],
                  np.tanh(h1 @ q["w_attn_1"] + qq) @ q["v_attn"][:, 0]])
  want2 = 2.25 * np.tanh(raw / 5.0) - np.array([4.0, 1.0]) / 6.0
  np.testing.assert_allclose(logits[2, :2], want2, rtol=1e-5, atol=1e-6)


def test_log_prob_matches_enas_lm_reference():
  p = _params()
  arcs = _arcs(8, 2)
  with jax.default_matmul_precision("highest"):
    outs = jax.vmap(lambda a: _scorer()(p, a))(jnp.asarray(arcs))
  for i, arc in enumerate(arcs):
    lp, ent = enas_lm_reference(p, arc)
    np.testing.assert_allclose(float(outs["log_prob"][i]), lp, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(float(outs["entropy_sampled"][i]), ent, rtol=2e-5, atol=2e-5)
  # The gradient reaches w_emb through the logits too: with w_emb = 0 the
  # function steps are uniform, log p(func) = log 1/4 each.
  flat = dict(p, w_emb=jnp.zeros_like(p["w_emb"]))
  lp0, _ = enas_lm_reference(flat, arcs[0])
  np.testing.assert_allclose(float(_scorer()(flat, jnp.asarray(arcs[0]))["log_prob"]), lp0,
                             rtol=2e-5, atol=2e-5)
  g = jax.grad(lambda w: _scorer()(dict(p, w_emb=w), jnp.asarray(arcs[0]))["log_prob"])(
      p["w_emb"])
  assert float(jnp.abs(g).sum()) > 0


def test_sampling_compiles_once_and_fixes_node0():
  p = _params(scale=1.0)
  sampler = C.make_sampler(SPACE.decisions, CFG)
  scorer = _scorer()
  seen = set()
  for k in range(30):
    out = sampler(p, jax.random.key(k, impl="rbg"))  # rbg: a faster compile on CPU
    arc = np.asarray(out["arc"])
    SPACE.validate(arc)
    assert arc[0] == 0  # node 0 is tanh: no decision, token fixed
    seen.add(tuple(arc.tolist()))
    scored = scorer(p, out["arc"])
    assert float(scored["log_prob"]) == pytest.approx(float(out["log_prob"]), abs=1e-5)
  assert len(seen) > 20
  assert sampler._cache_size() == 1 and scorer._cache_size() == 1
  # An arc with another node-0 activation is impossible under this controller.
  bad = jnp.asarray(arc).at[0].set(1)
  assert float(scorer(p, bad)["log_prob"]) <= C.NEG_LOGIT / 2


def test_config_variant_builds_the_corrected_search():
  from configs import ptb as ptb_config
  from enas_jax.train.run import build_space
  c = ptb_config.get_config("search_corrected")
  space = build_space(c)
  assert (space.num_nodes, space.aggregate, space.node0_anchor, space.node1_input) == (
      10, "all", "zero", "g_emb")
  assert space.decisions.num_steps == 18  # enas_lm: 2 x 9 decisions
  cfg = C.ControllerConfig.from_config(c.controller)
  assert cfg.tie_op_logits
  assert (c.controller.adam_b1, c.controller.adam_eps) == (0.9, 1e-8)
  assert c.data.random_bptt
  # The seed-structured default keeps its controller.
  s = ptb_config.get_config("search")
  seed_space = build_space(s)
  assert (seed_space.num_nodes, seed_space.aggregate, seed_space.node0_anchor,
          seed_space.node1_input) == (12, "loose_ends", "lstm", "act_emb")
  assert not C.ControllerConfig.from_config(s.controller).tie_op_logits
  assert (s.controller.adam_b1, s.controller.adam_eps, s.data.random_bptt) == (0.0, 1e-3, False)


@pytest.mark.slow  # a whole tiny search and derive: 32 s with a cold compilation cache
def test_tiny_corrected_search_runs(tmp_path):
  """Search with random-length windows: passes of a random number of steps,
  a controller phase after each, the run ends at the nominal step budget."""
  import json
  from enas_jax.train import run
  cfg = tiny_ptb_config("search_corrected", **{"search.num_epochs": 2,
                                               "search.then_final": False})
  run.run(cfg, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  ctrl = [r for r in rows if "controller/reward" in r]
  valid = [r for r in rows if "valid/ppl" in r]
  assert ctrl and valid and all(np.isfinite(r["valid/ppl"]) for r in valid)
  nb, budget = 99, 2 * 99  # windows of 6 per row of 600 tokens; 2 nominal epochs
  pass_ends = [r["step"] for r in valid]
  assert pass_ends[0] != nb  # a pass of random-length windows, not 99 fixed ones
  assert all(r["step"] <= budget for r in rows)
  assert max(r["step"] for r in rows) == budget
  best = open(tmp_path / "best_arc.txt").read().split()
  assert len(best) == 2 * 4 - 1 and best[0] == "0"


@pytest.mark.slow  # three tiny searches: 37 s cold on the loaded 2 cores
def test_random_window_search_resumes_exactly(tmp_path):
  """Stopped at a budget that ends mid-pass, then rerun with a larger budget:
  the same derived arcs as an uninterrupted run."""
  from enas_jax.train import run
  cfg = lambda n: tiny_ptb_config("search_corrected", **{  # noqa: E731
      "search.num_epochs": n, "search.then_final": False})
  full, part = tmp_path / "full", tmp_path / "part"
  run.run(cfg(2), str(full))
  run.run(cfg(1), str(part))  # budget 99 steps: mid-pass (the first pass is longer)
  run.run(cfg(2), str(part))
  assert (part / "arcs.jsonl").read_text() == (full / "arcs.jsonl").read_text()
