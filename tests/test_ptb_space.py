"""Tests of the PTB recurrent-cell search space (enas_jax/spaces/ptb.py).

Facts checked against /work/shared/reference/enas_original.md §2.2 (seed arc
format, the paper's cell and its loose ends) and enas_lm_corrected_ptb.md
§2 (the corrected code's format and the conversion rules).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enas_jax import spaces
from enas_jax.spaces import base
from enas_jax.spaces import ptb

PAPER = "0 0 0 1 1 2 1 2 0 2 0 5 1 1 0 6 1 8 1 8 1 8 1"
PAPER_CORRECTED = "0 0 1 1 2 1 2 0 2 0 5 1 1 0 6 1 8 1 8 1 8 1"
SHIPPED_CORRECTED = "0 2 1 0 2 1 2 2 4 0 5 0 3 2 6 2"
SHIPPED_SEED = "0 0 3 1 0 2 1 2 3 4 0 5 0 3 3 6 3"


def _space(**kw):
  return spaces.get("ptb", **kw)


# ----------------------------------------------------------------------------
# The paper's cell.


def test_paper_constants_match_reference():
  assert ptb.PAPER_ARC == PAPER
  assert ptb.CORRECTED_SHIPPED_ARC == SHIPPED_CORRECTED


def test_paper_cell_parses_and_formats_back():
  s = _space()
  arc = s.parse(PAPER)
  assert arc.dtype == np.int32 and arc.shape == (23,)
  assert arc.tolist() == [int(v) for v in PAPER.split()]
  assert s.format(arc) == PAPER
  # Commas and extra whitespace are accepted; the canonical form comes back.
  assert s.format(s.parse("  " + PAPER.replace(" ", ", ") + "\n")) == PAPER
  # Per-node reading as in enas_original.md §2.2's table.
  prevs = arc[1::2].tolist()
  acts = arc[2::2].tolist()
  assert prevs == [0, 1, 2, 2, 2, 5, 1, 6, 8, 8, 8]
  assert [ptb.ACTIVATION_NAMES[a] for a in [arc[0]] + acts] == [
      "tanh", "tanh", "relu", "relu", "tanh", "tanh", "relu", "tanh", "relu", "relu",
      "relu", "relu"]


def test_paper_cell_loose_ends():
  arc = _space().parse(PAPER)
  w = np.asarray(ptb.output_weights(arc, 12, "loose_ends", static=True))
  assert w.shape == (12,)
  assert set(np.nonzero(w)[0].tolist()) == {3, 4, 7, 9, 10, 11}
  np.testing.assert_allclose(w[w > 0], 1.0 / 6.0, rtol=1e-6)
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
  # The traced version agrees (used by the shared child).
  wt = jax.jit(lambda a: ptb.output_weights(a, 12, "loose_ends", static=False))(
      jnp.asarray(arc))
  np.testing.assert_allclose(np.asarray(wt), w, rtol=1e-6)
  assert "output: mean of nodes 3, 4, 7, 9, 10, 11" in _space().describe(arc)


def test_aggregate_all_weights_nodes_1_to_n_equally():
  arc = _space().parse(PAPER)
  for static in (True, False):
    w = np.asarray(ptb.output_weights(arc if static else jnp.asarray(arc), 12, "all",
                                      static=static))
    assert w.shape == (12,)
    assert w[0] == 0.0
    np.testing.assert_allclose(w[1:], 1.0 / 11.0, rtol=1e-6)
  assert "output: mean of nodes 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11" in _space(
      aggregate="all").describe(arc)


def test_loose_ends_include_node_0_when_unused():
  # 3 nodes: node 1 reads 0, node 2 reads 0 -> loose ends {1, 2}; node 0 is used.
  s = _space(num_nodes=3)
  w = np.asarray(ptb.output_weights(s.parse("0 0 0 0 0"), 3, "loose_ends", static=True))
  assert np.nonzero(w)[0].tolist() == [1, 2]
  # node 2 reads 1 -> loose end {2} only.
  w = np.asarray(ptb.output_weights(s.parse("0 0 0 1 0"), 3, "loose_ends", static=True))
  assert np.nonzero(w)[0].tolist() == [2]


# ----------------------------------------------------------------------------
# Conversions to and from the corrected code's format.


def test_from_corrected_shipped_arc():
  conv = ptb.from_corrected(SHIPPED_CORRECTED)
  assert str(conv) == SHIPPED_SEED
  assert conv.arc.tolist() == [int(v) for v in SHIPPED_SEED.split()]
  assert conv.num_nodes == 9
  assert conv.aggregate == "all"
  s = conv.space()
  assert s.num_nodes == 9 and s.aggregate == "all" and s.arc_length == 17
  assert s.format(conv.arc) == SHIPPED_SEED
  # Round trip back to the corrected format.
  assert ptb.to_corrected(conv.arc) == SHIPPED_CORRECTED
  assert ptb.to_corrected(s.parse(SHIPPED_SEED), num_nodes=9) == SHIPPED_CORRECTED
  # Token lists are accepted too, and the TPU-recipe aggregate is carried.
  conv2 = ptb.from_corrected([int(v) for v in SHIPPED_CORRECTED.split()],
                             aggregate="loose_ends")
  assert str(conv2) == SHIPPED_SEED and conv2.aggregate == "loose_ends"


def test_activation_id_mapping_swaps_sigmoid_and_identity():
  # corrected: 0 tanh, 1 ReLU, 2 sigmoid, 3 identity; seed: 0 tanh, 1 ReLU,
  # 2 identity, 3 sigmoid.
  conv = ptb.from_corrected("0 0 1 1 0 2 0 3")
  acts = [ptb.ACTIVATION_NAMES[a] for a in conv.arc[2::2].tolist()]
  assert acts == ["tanh", "relu", "sigmoid", "identity"]
  assert ptb.to_corrected(conv.arc) == "0 0 1 1 0 2 0 3"


def test_paper_cell_to_corrected():
  arc = _space().parse(PAPER)
  assert ptb.to_corrected(arc) == PAPER_CORRECTED
  back = ptb.from_corrected(PAPER_CORRECTED, aggregate="loose_ends")
  assert str(back) == PAPER and back.num_nodes == 12


def test_to_corrected_rejects_non_tanh_node0():
  arc = _space().parse("1" + PAPER[1:])  # node 0 = ReLU
  with pytest.raises(ValueError, match=r"token 0 .* is 1.*tanh"):
    ptb.to_corrected(arc)


@pytest.mark.parametrize("text, pattern", [
    ("0 2 1", r"even, non-zero number of tokens.*got 3"),
    ("", r"empty"),
    ("0 4", r"token 1 .* is 4; allowed 0\.\.3"),
    ("0 0 2 0", r"token 3 .*previous node.* is 2; allowed 0\.\.1"),
    ("1 0", r"token 1 .*previous node.* is 1; allowed 0\.\.0"),
])
def test_from_corrected_rejects_bad_arcs(text, pattern):
  with pytest.raises(ValueError, match=pattern):
    ptb.from_corrected(text)


# ----------------------------------------------------------------------------
# Malformed arcs.


def _err(fn, *args):
  with pytest.raises(ValueError) as ei:
    fn(*args)
  return str(ei.value)


def test_wrong_length_parse_and_validate():
  s = _space()
  msg = _err(s.parse, PAPER + " 0 0")
  assert "25" in msg and "23" in msg
  msg = _err(s.parse, " ".join(PAPER.split()[:-1]))
  assert "22" in msg and "23" in msg and "from_corrected" in msg  # even length hint
  msg = _err(s.validate, [0] * 21)
  assert "21" in msg and "23" in msg
  msg = _err(s.validate, np.zeros(24, np.int32))
  assert "24" in msg and "23" in msg


def test_previous_index_must_be_earlier():
  s = _space()
  toks = PAPER.split()
  toks[5] = "3"  # node 3 reads node 3
  msg = _err(s.parse, " ".join(toks))
  assert re.search(r"token 5\b", msg) and re.search(r"\b3\b", msg)
  assert "0..2" in msg
  toks[5] = "7"
  msg = _err(s.parse, " ".join(toks))
  assert re.search(r"token 5\b", msg) and " 7" in msg and "0..2" in msg
  # Node 1 may only read node 0.
  arc = s.parse(PAPER)
  arc[1] = 1
  msg = _err(s.validate, arc)
  assert re.search(r"token 1\b", msg) and "0..0" in msg


@pytest.mark.parametrize("pos", [0, 2, 8, 22])
def test_unknown_activation(pos):
  s = _space()
  toks = PAPER.split()
  toks[pos] = "4"
  msg = _err(s.parse, " ".join(toks))
  assert re.search(rf"token {pos}\b", msg) and " 4" in msg and "0..3" in msg


def test_negative_token():
  s = _space()
  toks = PAPER.split()
  toks[3] = "-1"
  msg = _err(s.parse, " ".join(toks))
  assert re.search(r"token 3\b", msg) and "-1" in msg and ">= 0" in msg
  arc = s.parse(PAPER).astype(np.int64)
  arc[6] = -5
  msg = _err(s.validate, arc)
  assert re.search(r"token 6\b", msg) and "-5" in msg and ">= 0" in msg


@pytest.mark.parametrize("bad", ["1.5", "a", "1e3", "0x1", "--1"])
def test_non_integer_token_in_string(bad):
  s = _space()
  toks = PAPER.split()
  toks[4] = bad
  msg = _err(s.parse, " ".join(toks))
  assert re.search(r"token 4\b", msg) and repr(bad) in msg and "integer" in msg


@pytest.mark.parametrize("text", ["", "   ", "\n\t", ", ,"])
def test_empty_string(text):
  assert "empty" in _err(_space().parse, text)


def test_parse_rejects_non_strings():
  s = _space()
  msg = _err(s.parse, [0] * 23)
  assert "string" in msg
  # And validate rejects strings (pointing at parse).
  assert "parse" in _err(s.validate, PAPER)


def test_float_arrays():
  s = _space()
  arc = s.parse(PAPER).astype(np.float32)
  # Integral floats are accepted.
  assert s.validate(arc).tolist() == s.parse(PAPER).tolist()
  arc[7] = 1.5
  msg = _err(s.validate, arc)
  assert re.search(r"token 7\b", msg) and "1.5" in msg and "integer" in msg
  arc[7] = np.nan
  assert re.search(r"token 7\b", _err(s.validate, arc))
  arc[7] = np.inf
  assert re.search(r"token 7\b", _err(s.validate, arc))


def test_two_d_and_empty_arrays():
  s = _space()
  arc = s.parse(PAPER)
  msg = _err(s.validate, arc[None, :])
  assert "(1, 23)" in msg
  msg = _err(s.validate, arc.reshape(23, 1))
  assert "(23, 1)" in msg
  assert "shape ()" in _err(s.validate, np.int32(3))
  assert "empty" in _err(s.validate, np.zeros((0,), np.int32))
  assert "dtype" in _err(s.validate, np.array(["0"] * 23))


def test_validate_accepts_jax_arrays_and_lists():
  s = _space()
  arc = s.parse(PAPER)
  assert s.validate(jnp.asarray(arc)).tolist() == arc.tolist()
  assert s.validate(arc.tolist()).dtype == np.int32
  assert s.format(jnp.asarray(arc)) == PAPER


# ----------------------------------------------------------------------------
# Property tests.


@st.composite
def valid_arcs(draw):
  n = draw(st.integers(2, 8))
  toks = [draw(st.integers(0, 3))]
  for i in range(1, n):
    toks += [draw(st.integers(0, i - 1)), draw(st.integers(0, 3))]
  return n, toks


@st.composite
def mutated_arcs(draw):
  """A valid arc with one token changed, inserted or deleted (mostly invalid)."""
  _, toks = draw(valid_arcs())
  how = draw(st.sampled_from(["set", "insert", "delete"]))
  pos = draw(st.integers(0, len(toks) - 1))
  v = draw(st.integers(-3, 12))
  if how == "set":
    toks[pos] = v
  elif how == "insert":
    toks.insert(pos, v)
  else:
    del toks[pos]
  return toks


TOKEN_LISTS = st.one_of(
    st.lists(st.integers(-3, 12), min_size=0, max_size=30),
    valid_arcs().map(lambda nt: nt[1]),
    mutated_arcs())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=TOKEN_LISTS,
       sep=st.sampled_from([" ", ",", ", ", "  \t"]))
def test_random_token_lists_parse_or_value_error(tokens, sep):
  # A space whose length matches odd lists (so valid arcs do occur), and the
  # default 12-node space (almost always a length error).
  n = max(2, (len(tokens) + 1) // 2)
  for s in (_space(num_nodes=n), _space()):
    text = sep.join(str(v) for v in tokens)
    try:
      arc = s.parse(text)
    except ValueError:
      parsed = False
    else:
      parsed = True
      assert arc.dtype == np.int32 and arc.shape == (s.arc_length,)
      assert s.validate(arc).tolist() == tokens
      assert s.format(arc) == " ".join(str(v) for v in tokens)
      assert s.parse(s.format(arc)).tolist() == tokens
    # The array path agrees with the string path.
    try:
      s.validate(np.asarray(tokens, np.int64))
      ok = True
    except ValueError:
      ok = False
    assert ok == parsed
    # Independent oracle of validity.
    expect = (len(tokens) == s.arc_length and all(v >= 0 for v in tokens)
              and tokens[0] <= 3
              and all(tokens[2 * i - 1] < i and tokens[2 * i] <= 3
                      for i in range(1, s.num_nodes)))
    assert parsed == expect


@settings(max_examples=200, deadline=None)
@given(valid_arcs())
def test_valid_arcs_round_trip_and_convert(n_toks):
  n, toks = n_toks
  s = _space(num_nodes=n)
  text = " ".join(map(str, toks))
  arc = s.parse(text)
  assert s.format(arc) == text
  if toks[0] == 0:
    corr = ptb.to_corrected(arc)
    assert len(corr.split()) == 2 * (n - 1)
    back = ptb.from_corrected(corr)
    assert str(back) == text and back.num_nodes == n
  else:
    with pytest.raises(ValueError, match="tanh"):
      ptb.to_corrected(arc)
  # Output weights: non-negative, sum to one, zero exactly on used nodes.
  w = np.asarray(ptb.output_weights(arc, n, "loose_ends", static=True))
  used = set(toks[1::2])
  assert all((w[k] == 0) == (k in used) for k in range(n))
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
  assert w[n - 1] > 0  # the last node is always a loose end


def _check_valid(space, arcs):
  arcs = np.asarray(arcs)
  for a in arcs:
    space.validate(a)


def test_sample_uniform_valid_and_covering():
  s = _space()
  keys = jax.random.split(jax.random.key(0), 3000)
  sample = jax.jit(jax.vmap(s.sample_uniform))
  arcs = np.asarray(sample(keys))
  assert arcs.shape == (3000, 23) and arcs.dtype == np.int32
  _check_valid(s, arcs[:300])
  # Vectorised validity over all samples.
  i = np.arange(1, 12)
  assert (arcs >= 0).all()
  assert (arcs[:, 0::2] <= 3).all()
  assert (arcs[:, 1::2] < i).all()
  # Every activation at every node, every previous node of every node.
  for col in range(0, 23, 2):
    assert set(np.unique(arcs[:, col]).tolist()) == {0, 1, 2, 3}, col
  for k, col in enumerate(range(1, 23, 2)):
    assert set(np.unique(arcs[:, col]).tolist()) == set(range(k + 1)), col
  # Roughly uniform: node 11's prev takes 11 values, ~273 each.
  counts = np.bincount(arcs[:, 21], minlength=11)
  assert counts.min() > 180 and counts.max() < 380, counts
  # Deterministic per key, and different keys give different arcs.
  one = jax.jit(s.sample_uniform)
  assert np.asarray(one(keys[5])).tolist() == arcs[5].tolist()
  assert len({tuple(a) for a in arcs[:200].tolist()}) == 200


def test_sample_uniform_num_activations_2():
  s = _space(num_nodes=6, num_activations=2)
  arcs = np.asarray(jax.jit(jax.vmap(s.sample_uniform))(
      jax.random.split(jax.random.key(1), 1000)))
  _check_valid(s, arcs[:100])
  assert set(np.unique(arcs[:, 0::2]).tolist()) == {0, 1}
  assert set(np.unique(arcs[:, 1::2][:, -1]).tolist()) == set(range(5))


@pytest.mark.parametrize("n, nact", [(2, 1), (3, 3), (14, 4)])
def test_sample_uniform_any_size(n, nact):
  s = _space(num_nodes=n, num_activations=nact)
  arcs = np.asarray(jax.jit(jax.vmap(s.sample_uniform))(
      jax.random.split(jax.random.key(n), 256)))
  for a in arcs[:8]:
    s.validate(a)
  assert (arcs[:, 0::2] < nact).all()
  assert (arcs[:, 1::2] < np.arange(1, n)).all() and (arcs >= 0).all()


# ----------------------------------------------------------------------------
# Registry and decisions program.


def test_registry():
  s = spaces.get("ptb", num_nodes=5)
  assert isinstance(s, ptb.PTBSpace)
  assert s.arc_length == 9 and s.num_nodes == 5
  assert spaces.get("ptb").arc_length == 23
  assert "ptb" in spaces.names()
  with pytest.raises(ValueError, match=r"unknown search space 'cifar'.*ptb"):
    spaces.get("cifar")
  with pytest.raises(ValueError, match=r"ptb"):
    spaces.get("ptb", num_layers=3)  # unknown keyword
  for kw in ({"num_nodes": 1}, {"num_nodes": 2.5}, {"num_activations": 5},
             {"num_activations": 0}, {"aggregate": "mean"}):
    with pytest.raises(ValueError):
      spaces.get("ptb", **kw)


@pytest.mark.parametrize("n, nact", [(2, 4), (5, 4), (12, 2), (9, 3)])
def test_decisions_consistent_with_arc_layout(n, nact):
  s = _space(num_nodes=n, num_activations=nact)
  d = s.decisions
  assert isinstance(d, base.Decisions)
  assert d.arc_length == s.arc_length == 2 * n - 1
  assert d.num_nodes == n and d.num_ops == 4
  assert d.max_choices == max(4, n)
  for f in (d.kind, d.node, d.num_choices, d.token, d.write_anchor):
    assert f.shape == (d.num_steps,)
  tok = d.token[d.kind != base.ANCHOR]
  assert sorted(tok.tolist()) == list(range(s.arc_length))
  assert (d.token[d.kind == base.ANCHOR] == -1).all()
  assert (d.num_choices[d.kind == base.ANCHOR] == 0).all()
  # Steps run in node order, and node order matches token order.
  assert (np.diff(d.node) >= 0).all()
  assert (np.diff(tok) > 0).all()
  ptr = d.kind == base.POINTER
  assert (d.num_choices[ptr] == d.node[ptr]).all()
  assert (d.token[ptr] == 2 * d.node[ptr] - 1).all()
  assert sorted(d.node[ptr].tolist()) == list(range(1, n))
  op = d.kind == base.OP
  assert (d.num_choices[op] == nact).all()
  assert (d.token[op] == np.where(d.node[op] == 0, 0, 2 * d.node[op])).all()
  assert sorted(d.node[op].tolist()) == list(range(n))
  # Exactly one anchor written per node.
  assert sorted(d.node[d.write_anchor].tolist()) == list(range(n))
  # A pointer only points at nodes whose anchors were written earlier.
  written = set()
  for k in range(d.num_steps):
    if d.kind[k] == base.POINTER:
      assert set(range(int(d.node[k]))) <= written
    if d.write_anchor[k]:
      written.add(int(d.node[k]))


def test_from_corrected_rejects_non_integer_tokens():
  with pytest.raises(ValueError, match=r"token 1 is 2.5"):
    ptb.from_corrected([0, 2.5, 1, 0])
