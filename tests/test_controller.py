"""Tests of the space-agnostic LSTM controller (enas_jax/controller.py)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from enas_jax import controller as C
from enas_jax.spaces.base import ANCHOR, OP, POINTER, Decisions


# ----------------------------------------------------------------------------
# Decision programs built by hand.


def ptb_like(num_nodes=6, num_ops=4):
  """melodyguan PTB order: node 0 = [ANCHOR, OP]; node i = [POINTER, OP]."""
  kind, node, nc, tok, wa = [ANCHOR, OP], [0, 0], [0, num_ops], [-1, 0], [True, False]
  for i in range(1, num_nodes):
    kind += [POINTER, OP]
    node += [i, i]
    nc += [i, num_ops]
    tok += [2 * i - 1, 2 * i]
    wa += [True, False]
  return Decisions(
      kind=np.array(kind), node=np.array(node), num_choices=np.array(nc),
      token=np.array(tok), write_anchor=np.array(wa), num_ops=num_ops,
      num_nodes=num_nodes, arc_length=2 * num_nodes - 1)


def masked_program():
  """Micro-like program with OPs narrower than the vocabulary (num_ops=5).

  nodes 0, 1: ANCHOR steps; node 2: ptr(2), op(2 of 5), ptr(2), op(3 of 5),
  ANCHOR; node 3: ptr(3), op(1 of 5: a forced op, log p = 0).
  """
  steps = [  # kind, node, num_choices, token, write_anchor
      (ANCHOR, 0, 0, -1, True),
      (ANCHOR, 1, 0, -1, True),
      (POINTER, 2, 2, 0, False),
      (OP, 2, 2, 1, False),
      (POINTER, 2, 2, 2, False),
      (OP, 2, 3, 3, False),
      (ANCHOR, 2, 0, -1, True),
      (POINTER, 3, 3, 4, False),
      (OP, 3, 1, 5, False),
  ]
  cols = list(zip(*steps))
  return Decisions(
      kind=np.array(cols[0]), node=np.array(cols[1]), num_choices=np.array(cols[2]),
      token=np.array(cols[3]), write_anchor=np.array(cols[4], bool), num_ops=5,
      num_nodes=4, arc_length=6)


PTB = ptb_like()
MASKED = masked_program()
CFG = C.ControllerConfig(lstm_size=16, temperature=5.0, tanh_constant=2.5, init_range=0.1)


_JITTED = {}


def jitted(fn, decisions, cfg):
  """jit(fn) closed over (decisions, cfg), cached: eager scans recompile per call."""
  key = (fn.__name__, id(decisions), cfg)
  if key not in _JITTED:
    _JITTED[key] = (decisions, jax.jit(functools.partial(fn, decisions=decisions, cfg=cfg)))
  return _JITTED[key][1]


def rkey(seed):
  """An "rbg" key: the controller's draws (init, sampling) compile much faster
  on XLA:CPU than threefry's; nothing here depends on the impl (threefry and
  raw uint32 keys are checked in test_sampling_is_deterministic...)."""
  return jax.random.key(seed, impl="rbg")


def init_params(decisions, cfg, seed=0):
  """C.init as one jitted program: eagerly every weight's draw is a compile."""
  return jax.jit(lambda k: C.init(k, decisions, cfg))(rkey(seed))


def scaled_params(decisions, cfg, seed=0, scale=1.0):
  params = init_params(decisions, cfg, seed)
  return jax.tree.map(lambda w: w * scale, params)


def valid_arc_mask(arcs, decisions):
  """Per arc: every decision token lies in [0, num_choices)."""
  arcs = np.asarray(arcs)
  ok = np.ones(arcs.shape[0], bool)
  for t in range(decisions.num_steps):
    if decisions.kind[t] == ANCHOR:
      continue
    v = arcs[:, decisions.token[t]]
    ok &= (v >= 0) & (v < decisions.num_choices[t])
    if decisions.kind[t] == POINTER:
      ok &= v < decisions.node[t]
  return ok


def random_valid_arcs(decisions, n, seed):
  rs = np.random.RandomState(seed)
  arcs = np.zeros((n, decisions.arc_length), np.int32)
  for t in range(decisions.num_steps):
    if decisions.kind[t] != ANCHOR:
      arcs[:, decisions.token[t]] = rs.randint(0, decisions.num_choices[t], size=n)
  return arcs


# ----------------------------------------------------------------------------
# An independent float64 numpy re-implementation, written as a plain loop.


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_reference(params, arc, decisions, cfg):
  """Returns (log_prob, entropy_sampled, entropy_full, list of per-step probs)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  s, layers = cfg.lstm_size, cfg.lstm_layers
  c = np.zeros((layers, s))
  h = np.zeros((layers, s))
  x = p["g_emb"][0]
  anchors, anchor_w = {}, {}
  lp = ent_s = ent_f = 0.0
  probs = []
  for t in range(decisions.num_steps):
    inp = x
    for l in range(layers):
      z = np.concatenate([inp, h[l]]) @ p["w_lstm"][l]
      i, f, o, g = np.split(z, 4)
      c[l] = _sig(i) * np.tanh(g) + _sig(f) * c[l]
      h[l] = _sig(o) * np.tanh(c[l])
      inp = h[l]
    top = h[-1].copy()
    node = int(decisions.node[t])
    if decisions.write_anchor[t]:
      anchors[node] = top
      anchor_w[node] = top @ p["w_attn_1"]
    kind = decisions.kind[t]
    if kind == ANCHOR:
      x = p["g_emb"][0]
      probs.append(None)
      continue
    n = int(decisions.num_choices[t])
    if kind == OP:
      raw = (top @ p["w_soft"])[:n]
    else:
      q = top @ p["w_attn_2"]
      raw = np.array([np.tanh(anchor_w.get(j, np.zeros(s)) + q) @ p["v_attn"][:, 0]
                      for j in range(n)])
    logits = raw.copy()
    if cfg.temperature:
      logits = logits / cfg.temperature
    if cfg.tanh_constant:
      logits = cfg.tanh_constant * np.tanh(logits)
    if kind == POINTER and cfg.locality_prior:
      logits = logits - (node - np.arange(n)) ** 2 / 6.0
    pr = np.exp(logits - logits.max())
    pr /= pr.sum()
    probs.append(pr)
    a = int(arc[decisions.token[t]])
    lp += np.log(pr[a])
    ent_s += -pr[a] * np.log(pr[a])
    ent_f += -np.sum(pr * np.log(pr))
    if kind == OP:
      x = p["w_emb"][a]
    else:
      x = anchors.get(a, np.zeros(s)) / (0.1 + (node - a))
  return lp, ent_s, ent_f, probs


# ----------------------------------------------------------------------------
# Config, init, validation.


def test_init_shapes_dtypes_and_range():
  cfg = C.ControllerConfig(lstm_size=8, lstm_layers=2, init_range=0.05)
  params = init_params(PTB, cfg)
  expected = {
      "w_lstm": (2, 16, 32), "g_emb": (1, 8), "w_emb": (4, 8), "w_soft": (8, 4),
      "w_attn_1": (8, 8), "w_attn_2": (8, 8), "v_attn": (8, 1),
  }
  assert {k: v.shape for k, v in params.items()} == expected
  for v in params.values():
    assert v.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(v))) <= 0.05
  # Not degenerate: the weights use the range.
  assert float(jnp.max(jnp.abs(params["w_lstm"]))) > 0.04


def test_config_from_config_and_checks():
  cd = ml_collections.ConfigDict({
      "lstm_size": 32, "lstm_layers": 2, "temperature": 5, "tanh_constant": None,
      "init_range": 0.01, "locality_prior": False, "entropy_mode": "full",
      "learning_rate": 1e-3, "num_aggregate": 10})
  cfg = C.ControllerConfig.from_config(cd)
  assert cfg == C.ControllerConfig(32, 2, 5.0, None, 0.01, False, "full")
  assert isinstance(cfg.temperature, float)
  hash(cfg)  # static-argument friendly
  partial = C.ControllerConfig.from_config({"lstm_size": 10})
  assert partial == C.ControllerConfig(lstm_size=10)
  with pytest.raises(ValueError, match="lstm_size"):
    C.ControllerConfig.from_config({"temperature": 1.0})
  with pytest.raises(ValueError, match="entropy_mode"):
    C.ControllerConfig(lstm_size=4, entropy_mode="bogus")
  assert not C.ControllerConfig(4, temperature=0.0, tanh_constant=-1.0).use_temperature
  assert not C.ControllerConfig(4, temperature=0.0, tanh_constant=-1.0).use_tanh


def test_validate_decisions_rejects_malformed_programs():
  C.validate_decisions(PTB)
  C.validate_decisions(MASKED)
  bad_ptr = dataclasses.replace(PTB, num_choices=PTB.num_choices.copy())
  bad_ptr.num_choices[2] = 2  # pointer at node 1 offering nodes 0 and 1
  with pytest.raises(ValueError, match="POINTER"):
    C.validate_decisions(bad_ptr)
  bad_tok = dataclasses.replace(PTB, token=PTB.token.copy())
  bad_tok.token[3] = 0
  with pytest.raises(ValueError, match="token"):
    C.validate_decisions(bad_tok)
  bad_op = dataclasses.replace(PTB, num_choices=PTB.num_choices.copy())
  bad_op.num_choices[1] = 5
  with pytest.raises(ValueError, match="OP"):
    C.validate_decisions(bad_op)


# ----------------------------------------------------------------------------
# Sampling.


@pytest.mark.parametrize("decisions", [PTB, MASKED], ids=["ptb", "masked"])
def test_sampled_arcs_are_valid(decisions):
  # No temperature/tanh bound here, and large weights make some logits extreme:
  # masking must still hold. Same config for both scales: one compilation.
  cfg = C.ControllerConfig(16, locality_prior=True)
  sample_many = jax.jit(lambda p, k: C.sample_many(p, k, decisions, cfg, 1000))
  for scale in (1.0, 30.0):
    params = scaled_params(decisions, cfg, scale=scale)
    out = sample_many(params, rkey(1))
    arcs = np.asarray(out["arc"])
    assert arcs.dtype == np.int32 and arcs.shape == (1000, decisions.arc_length)
    assert valid_arc_mask(arcs, decisions).all()
    assert np.all(np.isfinite(np.asarray(out["log_prob"])))
    assert np.all(np.asarray(out["log_prob"]) <= 0)
  # The one-choice OP of MASKED is forced.
  if decisions is MASKED:
    assert np.all(arcs[:, 5] == 0)


def test_sampling_is_deterministic_per_key_and_varies_across_keys():
  params = scaled_params(PTB, CFG)
  sampler = C.make_sampler(PTB, CFG)
  a = sampler(params, jax.random.key(7))
  b = sampler(params, jax.random.key(7))
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
  arcs = {tuple(np.asarray(sampler(params, jax.random.key(s))["arc"]).tolist())
          for s in range(20)}
  assert len(arcs) >= 15  # ~4^5 * 4! arcs: collisions are rare
  # Raw uint32 keys work too.
  raw = sampler(params, jax.random.PRNGKey(7))
  assert valid_arc_mask(np.asarray(raw["arc"])[None], PTB).all()


@pytest.mark.parametrize("decisions", [PTB, MASKED], ids=["ptb", "masked"])
def test_log_prob_equals_sampling_log_prob(decisions):
  params = scaled_params(decisions, CFG, scale=5.0)
  samples = jax.jit(lambda p, k: C.sample_many(p, k, decisions, CFG, 64))(
      params, rkey(3))
  scored = jax.jit(jax.vmap(lambda a: C.log_prob(params, a, decisions, CFG)))(samples["arc"])
  for k in ("log_prob", "entropy", "entropy_sampled", "entropy_full"):
    np.testing.assert_allclose(np.asarray(scored[k]), np.asarray(samples[k]), rtol=1e-6,
                               atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(np.asarray(scored["arc"]), np.asarray(samples["arc"]))
  if decisions is PTB:  # eager, unbatched path agrees as well (one compile: once)
    one = C.log_prob(params, samples["arc"][5], decisions, CFG)
    np.testing.assert_allclose(float(one["log_prob"]), float(samples["log_prob"][5]),
                               rtol=1e-6)
  # Sampling log-prob is not trivially zero.
  assert float(jnp.mean(samples["log_prob"])) < -1.0


@pytest.mark.parametrize("decisions,cfg,scale", [
    (PTB, CFG, 3.0),
    (PTB, C.ControllerConfig(12, lstm_layers=2, entropy_mode="full"), 2.0),
    (PTB, C.ControllerConfig(12, temperature=2.0, locality_prior=False), 4.0),
    (MASKED, C.ControllerConfig(12, tanh_constant=1.5), 4.0),
], ids=["ptb-temp-tanh", "ptb-2layers", "ptb-noprior", "masked-tanh"])
def test_matches_numpy_reference(decisions, cfg, scale):
  params = scaled_params(decisions, cfg, seed=4, scale=scale)
  arcs = random_valid_arcs(decisions, 6, seed=0)
  # Full float32 matmuls: GPUs may default to TF32, too coarse for 2e-5.
  with jax.default_matmul_precision("highest"):
    outs = jax.vmap(lambda a: jitted(C.log_prob, decisions, cfg)(params, a))(jnp.asarray(arcs))
  for n, arc in enumerate(arcs):
    out = jax.tree.map(lambda v: v[n], outs)
    lp, ent_s, ent_f, _ = numpy_reference(params, arc, decisions, cfg)
    np.testing.assert_allclose(float(out["log_prob"]), lp, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(float(out["entropy_sampled"]), ent_s, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(float(out["entropy_full"]), ent_f, rtol=2e-5, atol=2e-5)
    want = ent_s if cfg.entropy_mode == "sampled" else ent_f
    np.testing.assert_allclose(float(out["entropy"]), want, rtol=2e-5, atol=2e-5)


def test_first_op_probability_by_hand():
  """Step 0 (ANCHOR) and step 1 (first OP) of the PTB program, computed by hand."""
  cfg = C.ControllerConfig(lstm_size=4, temperature=2.0, tanh_constant=1.5, init_range=0.5)
  params = init_params(PTB, cfg, 11)
  params["w_soft"] = params["w_soft"] * 8.0  # clearly non-uniform op probabilities
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  w = p["w_lstm"][0]

  def lstm(x, c, h):
    z = np.concatenate([x, h]) @ w
    i, f, o, g = z[0:4], z[4:8], z[8:12], z[12:16]
    c = _sig(i) * np.tanh(g) + _sig(f) * c
    return c, _sig(o) * np.tanh(c)

  c, h = lstm(p["g_emb"][0], np.zeros(4), np.zeros(4))  # ANCHOR step on g_emb
  c, h = lstm(p["g_emb"][0], c, h)  # OP step, input g_emb again, state carried
  logits = 1.5 * np.tanh((h @ p["w_soft"]) / 2.0)
  probs = np.exp(logits) / np.exp(logits).sum()
  assert probs.max() - probs.min() > 0.05, probs  # not a trivially uniform case
  arc = jnp.zeros(PTB.arc_length, jnp.int32)
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
    got_p = np.asarray(jax.nn.softmax(jitted(C.step_logits, PTB, cfg)(params, arc)[1]))
  np.testing.assert_allclose(got_p[:4], probs, rtol=1e-5)
  assert np.all(got_p[4:] == 0.0)  # padding up to max_choices = num_nodes = 6
  # A program of just the first three steps: node 1's pointer has one choice
  # (log p = 0), so the arc's log-probability is exactly log p(op).
  first = dataclasses.replace(
      PTB, kind=PTB.kind[:3], node=PTB.node[:3], num_choices=PTB.num_choices[:3],
      token=PTB.token[:3], write_anchor=PTB.write_anchor[:3], arc_length=2)
  ops = jnp.stack([jnp.array([op, 0], jnp.int32) for op in range(4)])
  with jax.default_matmul_precision("highest"):
    lps = jax.vmap(lambda a: jitted(C.log_prob, first, cfg)(params, a)["log_prob"])(ops)
  np.testing.assert_allclose(np.asarray(lps), np.log(probs), rtol=1e-5)


def test_empirical_distribution_matches_softmax():
  cfg = C.ControllerConfig(lstm_size=16, locality_prior=True)
  params = scaled_params(PTB, cfg, seed=2, scale=10.0)
  params["w_soft"] = params["w_soft"] * 3.0  # make the first op decision clearly non-uniform
  n = 4000
  out = jax.jit(lambda p, k: C.sample_many(p, k, PTB, cfg, n))(params, rkey(5))
  arcs = np.asarray(out["arc"])
  probs = np.asarray(jax.nn.softmax(jitted(C.step_logits, PTB, cfg)(params, out["arc"][0])[1]))[:4]
  assert probs.max() - probs.min() > 0.15, probs
  freq = np.bincount(arcs[:, 0], minlength=4) / n
  np.testing.assert_allclose(freq, probs, atol=0.03)
  # The pointer at node 1 has one choice.
  assert np.all(arcs[:, 1] == 0)


def test_masked_choices_have_zero_probability():
  cfg = C.ControllerConfig(lstm_size=16, locality_prior=False)
  params = scaled_params(MASKED, cfg, seed=3, scale=20.0)
  arc = jnp.asarray(random_valid_arcs(MASKED, 1, seed=1)[0])
  logits = jitted(C.step_logits, MASKED, cfg)(params, arc)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  for t in range(MASKED.num_steps):
    if MASKED.kind[t] == ANCHOR:
      assert np.all(np.asarray(logits[t]) == C.NEG_LOGIT)
      continue
    n = MASKED.num_choices[t]
    assert np.all(probs[t, n:] == 0.0), (t, probs[t])
    np.testing.assert_allclose(probs[t, :n].sum(), 1.0, rtol=1e-6)
  # An out-of-range token is reported with a hugely negative log-probability.
  score = jitted(C.log_prob, MASKED, cfg)
  for pos, value in [(1, 4), (1, 2), (5, 7), (4, 3), (0, -1)]:  # OP 2-of-5, ..., ptr
    bad = arc.at[pos].set(value)
    assert float(score(params, bad)["log_prob"]) < -1e8, (pos, value)
  # Gradients stay finite even with masked choices and saturated logits.
  grads = jax.jit(jax.grad(lambda p: C.log_prob(p, arc, MASKED, cfg)["log_prob"]))(params)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))


def test_locality_prior_favours_recent_nodes_at_init():
  last = PTB.num_nodes - 1  # pointer of the last node: choices 0 .. last-1
  t_ptr = 2 * last
  assert PTB.kind[t_ptr] == POINTER and PTB.node[t_ptr] == last
  arc = jnp.zeros(PTB.arc_length, jnp.int32)
  prior = np.exp(-((last - np.arange(last)) ** 2) / 6.0)
  prior /= prior.sum()
  cfg = C.ControllerConfig(lstm_size=16, init_range=0.01, locality_prior=True)
  params = init_params(PTB, cfg)
  probs = np.asarray(jax.nn.softmax(jitted(C.step_logits, PTB, cfg)(params, arc)[t_ptr]))[:last]
  assert np.all(np.diff(probs) > 0)  # strictly more likely the closer the node
  np.testing.assert_allclose(probs, prior, atol=0.01)
  samples = jax.jit(lambda p, k: C.sample_many(p, k, PTB, cfg, 2000))(params, rkey(1))
  freq = np.bincount(np.asarray(samples["arc"])[:, PTB.token[t_ptr]], minlength=last) / 2000
  np.testing.assert_allclose(freq, prior, atol=0.04)
  # Without the prior the same (near-zero) weights give a near-uniform pointer.
  flat = dataclasses.replace(cfg, locality_prior=False)
  probs_flat = np.asarray(
      jax.nn.softmax(jitted(C.step_logits, PTB, flat)(params, arc)[t_ptr]))[:last]
  np.testing.assert_allclose(probs_flat, np.full(last, 1.0 / last), atol=0.01)


def test_temperature_and_tanh_transform_logits_as_specified():
  off = C.ControllerConfig(lstm_size=16, temperature=None, tanh_constant=None,
                           locality_prior=False)
  params = scaled_params(PTB, off, seed=6, scale=20.0)
  arc = jnp.asarray(random_valid_arcs(PTB, 1, seed=2)[0])
  raw = np.asarray(jitted(C.step_logits, PTB, off)(params, arc), np.float64)
  valid = raw > C.NEG_LOGIT / 2
  is_ptr = (PTB.kind == POINTER)[:, None]
  dist = PTB.node[:, None] - np.arange(raw.shape[1])[None, :]
  prior = np.where(is_ptr, dist ** 2 / 6.0, 0.0)
  assert np.abs(raw[valid]).max() > 2.0  # tanh is far from linear here

  # (<= 0 meaning "off" is covered by test_config_from_config_and_checks.)
  cases = [
      (dict(temperature=5.0), False, lambda r: r / 5.0),
      (dict(tanh_constant=2.5), True, lambda r: 2.5 * np.tanh(r)),
      (dict(temperature=5.0, tanh_constant=2.5), True, lambda r: 2.5 * np.tanh(r / 5.0)),
  ]
  for kwargs, locality, fn in cases:
    cfg = dataclasses.replace(off, locality_prior=locality, **kwargs)
    got = np.asarray(jitted(C.step_logits, PTB, cfg)(params, arc), np.float64)
    want = fn(raw) - (prior if locality else 0.0)
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5,
                               err_msg=f"{kwargs} locality={locality}")
    assert np.all(got[~valid] == C.NEG_LOGIT)


def test_log_prob_is_differentiable_and_entropy_is_not():
  params = scaled_params(PTB, CFG, scale=3.0)
  arc = C.make_sampler(PTB, CFG)(params, rkey(0))["arc"]

  @jax.jit
  def grads(p):
    def f(q):
      out = C.log_prob(q, arc, PTB, CFG)
      return jnp.stack([out["log_prob"], out["entropy"] + out["entropy_full"]])
    return jax.jacrev(f)(p)

  g = grads(params)
  assert all(float(jnp.abs(x[0]).sum()) > 0 for x in jax.tree.leaves(g))  # log_prob
  assert all(float(jnp.abs(x[1]).sum()) == 0 for x in jax.tree.leaves(g))  # entropies


def test_one_compilation_for_every_key_arc_and_params():
  sampler = C.make_sampler(PTB, CFG)
  scorer = C.make_log_prob(PTB, CFG)
  params = scaled_params(PTB, CFG)
  arcs = set()
  for s in range(25):
    if s % 5 == 4:  # new parameter values, same shapes
      params = jax.tree.map(lambda w: w + 0.01, params)
    out = sampler(params, rkey(s))
    scored = scorer(params, out["arc"])
    assert float(scored["log_prob"]) == pytest.approx(float(out["log_prob"]), abs=1e-6)
    arcs.add(tuple(np.asarray(out["arc"]).tolist()))
  assert len(arcs) > 10
  assert sampler._cache_size() == 1
  assert scorer._cache_size() == 1
