"""The micro controller: MicroCodec's decision program run by enas_jax/controller.py.

Reference: ``enas_original.md`` §3.2 (``MicroController``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enas_jax import controller as C
from enas_jax import reinforce as R
from enas_jax.spaces.base import ANCHOR, OP, POINTER
from enas_jax.spaces.cifar_micro import NORMAL_OP_OFFSET, OP_BIAS_INIT, MicroCodec

CODEC = MicroCodec(5)
D = CODEC.decisions
# The micro search script's controller (§9.1): 64 units, tanh 1.1, op_tanh_reduce
# 2.5, no temperature, categorical entropy. locality_prior is left at its default
# (True) on purpose: micro programs must ignore it.
CFG = C.ControllerConfig(lstm_size=64, tanh_constant=1.1, op_tanh_reduce=2.5,
                         entropy_mode="full")
OP_TANH = 1.1 / 2.5  # 0.44: the saturated op logit of b_soft = 10

_JIT = {}


def jitted(name, decisions=D, cfg=CFG):
  """Cached jitted controller entry points (an eager scan recompiles per call)."""
  key = (name, id(decisions), cfg)
  if key not in _JIT:
    if name == "log_prob":
      fn = jax.jit(jax.vmap(lambda p, a: C.log_prob(p, a, decisions, cfg), (None, 0)))
    elif name == "step_logits":
      fn = jax.jit(lambda p, a: C.step_logits(p, a, decisions, cfg))
    elif name == "sample_many":
      fn = jax.jit(lambda p, k: C.sample_many(p, k, decisions, cfg, 400))
    else:
      raise KeyError(name)
    _JIT[key] = (decisions, fn)
  return _JIT[key][1]


def rkey(seed):
  """An "rbg" key: the controller's draws (init, sampling, REINFORCE) compile
  much faster on XLA:CPU than threefry's; nothing here depends on the impl."""
  return jax.random.key(seed, impl="rbg")


def init_params(seed=0, decisions=D, cfg=CFG):
  """C.init as one jitted program: eagerly every weight's draw is a compile."""
  return jax.jit(lambda k: C.init(k, decisions, cfg))(rkey(seed))


def params_at(seed=0, scale=1.0, decisions=D, cfg=CFG):
  """Initial parameters with the random ones scaled (b_soft keeps its init)."""
  p = init_params(seed, decisions, cfg)
  return {k: (v if k == "b_soft" else v * scale) for k, v in p.items()}


def op_steps(cell):
  return np.nonzero((D.kind == OP) & (D.step_cell == cell))[0]


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_micro_reference(params, arc, num_nodes, cfg):
  """The micro sampler of §3.2 written directly as loops (float64).

  Returns (log_prob, categorical entropy, sampled-token entropy).
  """
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  s, layers = cfg.lstm_size, cfg.lstm_layers
  c = np.zeros((layers, s))
  h = np.zeros((layers, s))
  g = p["g_emb"][0]

  def lstm(x):
    inp = x
    for l in range(layers):
      z = np.concatenate([inp, h[l]]) @ p["w_lstm"][l]
      i, f, o, gg = np.split(z, 4)
      c[l] = _sig(i) * np.tanh(gg) + _sig(f) * c[l]
      h[l] = _sig(o) * np.tanh(c[l])
      inp = h[l]
    return h[-1].copy()

  def squash(raw, tanh_c):
    if cfg.use_temperature:
      raw = raw / cfg.temperature
    if cfg.use_tanh:
      raw = tanh_c * np.tanh(raw)
    return raw

  totals = {"lp": 0.0, "ent": 0.0, "ent_s": 0.0}

  def score(logits, a):
    pr = np.exp(logits - logits.max())
    pr /= pr.sum()
    totals["lp"] += np.log(pr[a])
    totals["ent"] += -np.sum(pr * np.log(pr))
    totals["ent_s"] += -pr[a] * np.log(pr[a])

  tanh_c = cfg.tanh_constant
  op_c = tanh_c / cfg.op_tanh_reduce if cfg.use_tanh else None
  for cell in range(2):
    anchors, keys = [], []  # fresh anchors per cell; (c, h) carries on
    for _ in range(2):  # input nodes: zero anchors, non-zero attention keys
      top = lstm(g)
      anchors.append(np.zeros(s))
      keys.append(top @ p["w_attn_1"])
    for b in range(2, num_nodes + 2):
      start = cell * 4 * num_nodes + 4 * (b - 2)
      x = g
      for i in range(2):  # idx1, idx2 -> tokens start, start + 2
        top = lstm(x)
        q = top @ p["w_attn_2"]
        raw = np.array([np.tanh(keys[j] + q) @ p["v_attn"][:, 0] for j in range(b)])
        a = int(arc[start + 2 * i])
        score(squash(raw, tanh_c), a)
        x = anchors[a]
      for i in range(2):  # op1, op2 -> tokens start + 1, start + 3
        top = lstm(x)
        logits = squash(top @ p["w_soft"] + p["b_soft"][0], op_c)
        if cell == 0:
          logits = logits + np.asarray(NORMAL_OP_OFFSET)
        a = int(arc[start + 2 * i + 1])
        score(logits, a)
        x = p["w_emb"][a]
      top = lstm(x)  # the node's anchor
      anchors.append(top)
      keys.append(top @ p["w_attn_1"])
  return totals["lp"], totals["ent"], totals["ent_s"]


def categorical_entropy(logits, decisions):
  """Σ over decision steps of −Σ p log p, from the step logits (float64)."""
  total = 0.0
  for t in range(decisions.num_steps):
    if decisions.kind[t] == ANCHOR:
      continue
    row = np.asarray(logits[t], np.float64)[:decisions.num_choices[t]]
    pr = np.exp(row - row.max())
    pr /= pr.sum()
    total += -np.sum(pr * np.log(pr))
  return total


# ----------------------------------------------------------------------------
# The program.


@pytest.mark.parametrize("num_nodes", [1, 5])
def test_program_layout(num_nodes):
  codec = MicroCodec(num_nodes)
  d = codec.decisions
  C.validate_decisions(d)
  per_cell = 2 + 5 * num_nodes
  assert d.num_steps == 2 * per_cell
  assert d.num_nodes == num_nodes + 2 and d.num_ops == 5 and d.arc_length == 8 * num_nodes
  assert d.pointer_style == "micro" and tuple(d.op_bias_init) == OP_BIAS_INIT
  np.testing.assert_array_equal(d.step_cell, np.repeat([0, 1], per_cell))
  np.testing.assert_array_equal(np.nonzero(d.step_new_cell)[0], [per_cell])
  for cell in range(2):
    o = cell * per_cell
    # Input nodes: anchor steps with zero anchors.
    assert list(d.kind[o:o + 2]) == [ANCHOR, ANCHOR]
    assert list(d.node[o:o + 2]) == [0, 1]
    assert d.write_anchor[o:o + 2].all() and d.step_zero_anchor[o:o + 2].all()
    for k, b in enumerate(range(2, num_nodes + 2)):
      t = o + 2 + 5 * k
      start = cell * 4 * num_nodes + 4 * k
      # Decision order idx1, idx2, op1, op2, anchor; token order idx1 op1 idx2 op2.
      assert list(d.kind[t:t + 5]) == [POINTER, POINTER, OP, OP, ANCHOR]
      assert list(d.token[t:t + 5]) == [start, start + 2, start + 1, start + 3, -1]
      assert list(d.num_choices[t:t + 5]) == [b, b, 5, 5, 0]
      assert list(d.node[t:t + 5]) == [b] * 5
      assert list(d.write_anchor[t:t + 5]) == [False] * 4 + [True]
      assert not d.step_zero_anchor[t:t + 5].any()
      want = NORMAL_OP_OFFSET if cell == 0 else (0.0,) * 5
      for s in (t + 2, t + 3):
        np.testing.assert_allclose(d.step_op_offset[s], want)
  assert not np.any(d.step_op_offset[d.kind != OP])


def test_validate_decisions_checks_the_new_fields():
  bad = [
      ({"op_offset": np.zeros((D.num_steps, 4))}, "op_offset"),
      ({"op_offset": np.ones((D.num_steps, 5))}, "not an OP step"),
      ({"op_bias_init": (10.0, 10.0)}, "op_bias_init"),
      ({"pointer_style": "nearest"}, "pointer_style"),
      ({"cell": np.zeros(3, np.int32)}, "cell"),
      ({"zero_anchor": np.zeros(D.num_steps + 1, bool)}, "zero_anchor"),
  ]
  for kwargs, match in bad:
    with pytest.raises(ValueError, match=match):
      C.validate_decisions(dataclasses.replace(D, **kwargs))
  params = params_at()
  del params["b_soft"]
  with pytest.raises(ValueError, match="b_soft"):
    C.sample(params, jax.random.key(0), D, CFG)


def test_init_and_config():
  params = params_at()
  np.testing.assert_array_equal(np.asarray(params["b_soft"]), [OP_BIAS_INIT])
  assert params["b_soft"].dtype == jnp.float32
  assert params["w_soft"].shape == (64, 5) and params["w_emb"].shape == (5, 64)
  # Programs without an op bias get no b_soft, and the same random draw.
  plain = dataclasses.replace(D, op_bias_init=None)
  p2 = init_params(0, plain, CFG)
  assert "b_soft" not in p2
  for k in p2:
    np.testing.assert_array_equal(np.asarray(p2[k]), np.asarray(params[k]))
  # The config reads op_tanh_reduce when present.
  cfg = C.ControllerConfig.from_config(
      {"lstm_size": 64, "tanh_constant": 1.1, "op_tanh_reduce": 2.5, "entropy_mode": "full",
       "num_aggregate": 10})
  assert cfg == CFG and isinstance(cfg.op_tanh_reduce, float)
  assert C.ControllerConfig.from_config({"lstm_size": 8}).op_tanh_reduce == 1.0
  with pytest.raises(ValueError, match="op_tanh_reduce"):
    C.ControllerConfig(8, op_tanh_reduce=0.0)


# ----------------------------------------------------------------------------
# Sampling and scoring.


def test_sampled_arcs_always_validate():
  sample_many = jitted("sample_many")
  for scale in (1.0, 30.0):  # 30: saturated, near-deterministic logits
    out = sample_many(params_at(scale=scale), rkey(1))
    arcs = np.asarray(out["arc"])
    assert arcs.shape == (400, 40) and arcs.dtype == np.int32
    for arc in arcs:
      CODEC.validate(arc)
    lp = np.asarray(out["log_prob"])
    assert np.all(np.isfinite(lp)) and np.all(lp <= 0)
    if scale == 1.0:
      # Every choice of the last node's pointers (0..5) and every op shows up.
      for pos in (16, 18, 36, 38):
        assert set(arcs[:, pos].tolist()) == set(range(6)), pos
      assert set(arcs[:, 1::2].ravel().tolist()) == set(range(5))


def test_log_prob_of_sampled_arc_equals_sampled_log_prob():
  params = params_at(seed=3, scale=3.0)
  samples = jitted("sample_many")(params, rkey(5))
  scored = jitted("log_prob")(params, samples["arc"])
  for k in ("log_prob", "entropy", "entropy_full", "entropy_sampled"):
    np.testing.assert_allclose(np.asarray(scored[k]), np.asarray(samples[k]), rtol=1e-5,
                               atol=1e-5, err_msg=k)
  assert float(jnp.mean(samples["log_prob"])) < -5.0  # not trivially certain


@pytest.mark.parametrize("cfg,scale", [
    (CFG, 3.0),
    (C.ControllerConfig(16, lstm_layers=2, temperature=2.0, tanh_constant=2.5,
                        op_tanh_reduce=1.7, locality_prior=False), 4.0),
], ids=["script", "2layers-temp"])
def test_matches_independent_numpy_reference(cfg, scale):
  params = params_at(seed=4, scale=scale, cfg=cfg)
  arcs = np.stack([np.asarray(CODEC.sample_uniform(jax.random.key(i))) for i in range(4)])
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
    outs = jitted("log_prob", D, cfg)(params, jnp.asarray(arcs))
  for n, arc in enumerate(arcs):
    lp, ent, ent_s = numpy_micro_reference(params, arc, CODEC.num_nodes, cfg)
    np.testing.assert_allclose(float(outs["log_prob"][n]), lp, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(float(outs["entropy_full"][n]), ent, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(float(outs["entropy_sampled"][n]), ent_s, rtol=2e-5, atol=2e-5)


def test_one_compilation_for_many_samples():
  sampler = C.make_sampler(D, CFG)
  scorer = C.make_log_prob(D, CFG)
  params = params_at()
  arcs = set()
  for s in range(20):
    if s % 5 == 4:  # new parameter values, same shapes
      params = jax.tree.map(lambda w: w + 0.01, params)
    out = sampler(params, rkey(s))
    CODEC.validate(np.asarray(out["arc"]))
    scored = scorer(params, out["arc"])
    assert float(scored["log_prob"]) == pytest.approx(float(out["log_prob"]), abs=1e-5)
    arcs.add(tuple(np.asarray(out["arc"]).tolist()))
  assert len(arcs) == 20
  assert sampler._cache_size() == 1
  assert scorer._cache_size() == 1


# ----------------------------------------------------------------------------
# Op biases and entropy.


def test_first_op_logits_by_hand():
  """Steps 0-4 of the normal cell by hand: two input nodes, two pointers, op 1."""
  params = params_at(seed=11)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  w = p["w_lstm"][0]

  def lstm(x, c, h):
    z = np.concatenate([x, h]) @ w
    i, f, o, g = np.split(z, 4)
    c = _sig(i) * np.tanh(g) + _sig(f) * c
    return c, _sig(o) * np.tanh(c)

  g = p["g_emb"][0]
  c = h = np.zeros(64)
  for _ in range(3):  # input node 0, input node 1, node 2's idx1: all on g_emb
    c, h = lstm(g, c, h)
  # idx1 and idx2 of node 2 point at an input node, whose anchor is zero.
  c, h = lstm(np.zeros(64), c, h)  # idx2
  c, h = lstm(np.zeros(64), c, h)  # op1
  raw = h @ p["w_soft"] + np.asarray(OP_BIAS_INIT)
  want = OP_TANH * np.tanh(raw) + np.asarray(NORMAL_OP_OFFSET)

  arc = jnp.asarray(CODEC.parse(" ".join(["0 0 1 0"] * 10)))
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(jitted("step_logits")(params, arc))
  assert D.kind[4] == OP and D.token[4] == 1
  np.testing.assert_allclose(logits[4, :5], want, rtol=1e-5, atol=1e-6)
  assert np.all(logits[4, 5:] == C.NEG_LOGIT)  # padding to 7 anchor slots
  # The reference's numbers: b_soft = 10 saturates the tanh, so the separable
  # convs sit at 0.44 + 0.25 and the rest near 0 - 0.25.
  np.testing.assert_allclose(logits[4, :2], OP_TANH + 0.25, atol=1e-6)
  assert np.all(np.abs(logits[4, 2:5] + 0.25) < 0.15), logits[4]
  probs = np.exp(want) / np.exp(want).sum()
  assert probs[0] + probs[1] > 0.55 and probs[:2].min() > probs[2:].max()
  # This distribution does not depend on the earlier choices (both pointers can
  # only reach the zero input anchors): sampling reproduces it.
  out = jitted("sample_many")(params, rkey(2))
  freq = np.bincount(np.asarray(out["arc"])[:, 1], minlength=5) / 400
  np.testing.assert_allclose(freq, probs, atol=0.07)


def test_normal_and_reduction_op_biases_differ():
  params = params_at(seed=1)
  arc = jnp.asarray(CODEC.parse(" ".join(["0 0 1 0"] * 10)))
  logits = np.asarray(jitted("step_logits")(params, arc))
  normal, reduction = op_steps(0), op_steps(1)
  assert len(normal) == len(reduction) == 10
  # Saturated sep-conv logits: 0.44 + 0.25 (normal) vs 0.44 (reduction).
  np.testing.assert_allclose(logits[normal, :2], OP_TANH + 0.25, atol=1e-6)
  np.testing.assert_allclose(logits[reduction, :2], OP_TANH, atol=1e-6)
  assert np.all(np.abs(logits[normal, 2:5] + 0.25) < 0.2)
  assert np.all(np.abs(logits[reduction, 2:5]) < 0.2)
  # With w_soft = 0 every op step sees exactly b_soft through the tanh: the two
  # cells differ by b_soft_no_learn and nothing else.
  flat = dict(params, w_soft=jnp.zeros_like(params["w_soft"]))
  logits = np.asarray(jitted("step_logits")(flat, arc))
  base = OP_TANH * np.tanh(np.asarray(OP_BIAS_INIT))
  np.testing.assert_allclose(logits[normal, :5], np.tile(base + NORMAL_OP_OFFSET, (10, 1)),
                             atol=1e-6)
  np.testing.assert_allclose(logits[reduction, :5], np.tile(base, (10, 1)), atol=1e-6)
  # Sampled at init, normal cells favour the separable convs more strongly.
  arcs = np.asarray(jitted("sample_many")(params, rkey(4))["arc"])
  sep_normal = np.mean(arcs[:, 1:20:2] <= 1)
  sep_reduction = np.mean(arcs[:, 21:40:2] <= 1)
  assert sep_normal > 0.55, sep_normal  # ~0.63
  assert 0.4 < sep_reduction < 0.6, sep_reduction  # ~0.51
  assert sep_normal > sep_reduction + 0.07
  # b_soft is learned: it gets a gradient (off the saturated init here).
  unsat = dict(params, b_soft=jnp.zeros_like(params["b_soft"]))
  grad = jax.grad(lambda q: jitted("log_prob")(q, arc[None])["log_prob"][0])(unsat)
  assert np.all(np.abs(np.asarray(grad["b_soft"])) > 0)


def test_entropy_is_categorical_entropy():
  params = params_at(seed=6, scale=3.0)
  out = jitted("sample_many")(params, rkey(8))
  step_logits = jitted("step_logits")
  for n in range(5):
    logits = np.asarray(step_logits(params, out["arc"][n]))
    want = categorical_entropy(logits, D)
    np.testing.assert_allclose(float(out["entropy"][n]), want, rtol=1e-5)
    np.testing.assert_allclose(float(out["entropy_full"][n]), want, rtol=1e-5)
    # The sampled-token form is a different number.
    assert abs(float(out["entropy_sampled"][n]) - want) > 0.1


# ----------------------------------------------------------------------------
# REINFORCE.


def op4_reward(arc, rng, ctx):
  """Fraction of op tokens that are op 4 (identity)."""
  del rng, ctx
  return jnp.mean((arc[1::2] == 4).astype(jnp.float32))


def test_reinforce_raises_a_toy_reward():
  # With b_soft = 10 the separable convs stay pinned at the saturated logit
  # (+0.44, +0.25 in normal cells) and every other op logit lies in +-0.44
  # (-0.25 in normal cells), so P(op 4) starts at ~0.12 (normal) / ~0.16
  # (reduction) and can reach at most ~0.195 / ~0.261: mean 0.228.
  e = np.exp
  cap = (e(0.19) / (2 * e(0.69) + e(0.19) + 2 * e(-0.69))
         + e(0.44) / (3 * e(0.44) + 2 * e(-0.44))) / 2
  cfg = dataclasses.replace(CFG, lstm_size=32)
  opt = R.make_optimizer(0.02, form="optax")  # tuned with optax's ε placement (TF1's is slower)
  state = R.init_state(rkey(0), D, cfg, opt)
  phase = jax.jit(R.make_train_phase(
      D, cfg, opt, op4_reward, num_aggregate=10, entropy_weight=0.0, baseline_decay=0.9,
      num_steps=30))
  measure = jax.jit(lambda p, k: jnp.mean(jax.vmap(
      lambda a: op4_reward(a, None, None))(C.sample_many(p, k, D, cfg, 1000)["arc"])))
  all4 = jnp.asarray(CODEC.parse(" ".join(["0 4 1 4"] * 10)))
  score = jax.jit(lambda p: C.log_prob(p, all4, D, cfg)["log_prob"])
  before, lp0 = float(measure(state["params"], rkey(1))), float(score(state["params"]))
  for i in range(2):
    state, m = phase(state, {}, rkey(10 + i))
    assert np.isfinite(float(m["controller/loss"]))
  after, lp1 = float(measure(state["params"], rkey(1))), float(score(state["params"]))
  assert 0.12 < before < 0.17, before  # ~0.143
  assert after > 0.2, (before, after)  # ~0.229 in practice: the cap is reached
  assert after < cap + 0.01, (after, cap)
  assert lp1 > lp0 + 5.0, (lp0, lp1)
