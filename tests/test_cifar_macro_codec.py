"""The macro space's arc codec: the paper's 24-layer arc round-trips; bad arcs are refused."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from enas_jax.spaces.cifar_macro import OP_NAMES, PAPER_ARC, MacroCodec


def test_paper_arc_round_trips_and_decodes():
  c = MacroCodec(num_layers=24)
  assert c.arc_length == 300
  arc = c.parse(PAPER_ARC)
  assert c.format(arc) == PAPER_ARC
  ops = [c.layer_tokens(arc, l)[0] for l in range(24)]
  assert ops == [0, 3, 0, 2, 2, 3, 2, 2, 1, 0, 2, 0, 2, 1, 0, 2, 2, 2, 3, 3, 0, 3, 0, 0]
  op5, bits5 = c.layer_tokens(arc, 5)
  assert OP_NAMES[op5] == "sep5x5" and bits5.tolist() == [1, 1, 0, 1, 0]
  assert "layer 23: conv3x3" in c.describe(arc)


def test_default_is_the_search_scripts_12_layers():
  assert MacroCodec().arc_length == 78


@pytest.mark.parametrize("tokens, match", [
    ([0, 6, 0, 0, 0, 0], r"token 1 \(layer 1's op\) is 6; allowed 0..5"),
    ([0, 1, 2, 0, 0, 0], r"token 2 \(layer 1's skip bit 0\) is 2; allowed 0..1"),
    ([0, 1, 0, 0, 1, -1], r"token 5 is -1, negative"),
    ([0, 1, 0], r"wrong arc length 3"),
])
def test_malformed_arcs_are_refused_with_position(tokens, match):
  c = MacroCodec(num_layers=3)
  with pytest.raises(ValueError, match=match):
    c.validate(tokens) if len(tokens) == c.arc_length else c.parse(" ".join(map(str, tokens)))


def test_non_integer_and_empty_are_refused():
  c = MacroCodec(num_layers=3)
  with pytest.raises(ValueError, match="not a non-negative integer"):
    c.parse("0 1 0 x 0 0")
  with pytest.raises(ValueError, match="empty"):
    c.parse("  ")
  with pytest.raises(ValueError, match="not an integer"):
    c.validate(np.array([0, 1, 0.5, 0, 0, 0]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-2, 8), min_size=0, max_size=12))
def test_fuzz_only_value_errors(tokens):
  c = MacroCodec(num_layers=4)
  try:
    arc = c.parse(" ".join(map(str, tokens)))
  except ValueError:
    return
  assert c.format(arc) == " ".join(map(str, tokens))


def test_uniform_samples_are_valid_and_cover_ops():
  c = MacroCodec(num_layers=6)
  f = jax.jit(c.sample_uniform)
  seen = set()
  for i in range(40):
    arc = np.asarray(f(jax.random.key(i)))
    c.validate(arc)
    seen.update(c.layer_tokens(arc, l)[0] for l in range(6))
  assert seen == set(range(6))
  assert f._cache_size() == 1


# --------------------------------------------------------------------------
# The controller on the macro program (op softmax + independent skip bits).

def _ctrl():
  from enas_jax import controller as C
  return C, C.ControllerConfig(lstm_size=8, tanh_constant=1.5, init_range=0.5)


def test_macro_probabilities_sum_to_one_over_all_arcs():
  import itertools
  import jax.numpy as jnp
  C, cfg = _ctrl()
  c = MacroCodec(num_layers=3)
  params = C.init(jax.random.key(0), c.decisions, cfg)
  arcs = []
  for o0, o1, o2 in itertools.product(range(6), repeat=3):
    for b10, b20, b21 in itertools.product(range(2), repeat=3):
      arcs.append([o0, o1, b10, o2, b20, b21])
  arcs = jnp.asarray(arcs, jnp.int32)
  assert arcs.shape[1] == c.arc_length
  lp = jax.vmap(lambda a: C.log_prob(params, a, c.decisions, cfg)["log_prob"])(arcs)
  np.testing.assert_allclose(float(jnp.exp(lp).sum()), 1.0, rtol=1e-4)


def test_macro_sampling_is_valid_and_scored_consistently():
  C, cfg = _ctrl()
  c = MacroCodec(num_layers=5)
  params = C.init(jax.random.key(1), c.decisions, cfg)
  sample = jax.jit(lambda k: C.sample(params, k, c.decisions, cfg))
  score = jax.jit(lambda a: C.log_prob(params, a, c.decisions, cfg))
  bits_seen = set()
  for i in range(30):
    out = sample(jax.random.key(i))
    arc = np.asarray(out["arc"])
    c.validate(arc)
    bits_seen.update(c.layer_tokens(arc, 4)[1].tolist())
    again = score(out["arc"])
    np.testing.assert_allclose(again["log_prob"], out["log_prob"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again["entropy_full"], out["entropy_full"], rtol=1e-5)
  assert bits_seen == {0, 1}
  assert sample._cache_size() == 1 and score._cache_size() == 1
  bad = np.asarray(sample(jax.random.key(0))["arc"]).copy()
  bad[2] = 2  # not a bit
  assert float(score(jnp_int(bad))["log_prob"]) < -1e8


def jnp_int(a):
  import jax.numpy as jnp
  return jnp.asarray(a, jnp.int32)


def test_skip_penalty_matches_a_direct_computation_and_trains_toward_target():
  from enas_jax import reinforce as R
  C, cfg = _ctrl()
  c = MacroCodec(num_layers=4)
  # Jitted (one compile each; eagerly every op and scan compiles on its own).
  params = jax.jit(lambda k: C.init(k, c.decisions, cfg))(jax.random.key(2))
  pen = jax.jit(R.make_skip_penalty(c.decisions, cfg, skip_target=0.4, skip_weight=0.8))
  arc = jax.jit(lambda p, k: C.sample(p, k, c.decisions, cfg)["arc"])(params, jax.random.key(3))
  q = np.asarray(jax.jit(lambda p, a: C.step_logits(p, a, c.decisions, cfg))(params, arc))
  kls = []
  for l in range(1, 4):
    row = q[2 * l + 1, :l]  # the BITS step of layer l
    p1 = 1 / (1 + np.exp(-row))
    kl = p1 * np.log(p1 / 0.4) + (1 - p1) * np.log((1 - p1) / 0.6)
    kls.append(kl.sum())
  np.testing.assert_allclose(float(pen(params, arc[None])), 0.8 * np.mean(kls), rtol=1e-5)
  # Minimising the penalty alone moves the skip probability toward the target.
  g = jax.grad(lambda p: pen(p, arc[None]))
  # One jitted update (eager grads of a scan, called 200 times, exhaust XLA:CPU's
  # code memory here).
  update = jax.jit(lambda p: jax.tree_util.tree_map(lambda w, d: w - 0.05 * d, p, g(p)))
  p = params
  for _ in range(200):
    p = update(p)
  assert float(pen(p, arc[None])) < 0.2 * float(pen(params, arc[None]))
