"""The micro space's arc codec: the paper's cells round-trip; bad arcs are refused."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from enas_jax.spaces.cifar_micro import PAPER_ARC, MicroCodec


def test_paper_arc_round_trips_and_decodes():
  c = MicroCodec()
  assert c.arc_length == 40
  arc = c.parse(PAPER_ARC)
  assert c.format(arc) == PAPER_ARC
  assert c.loose_ends(arc, 0) == [2, 3, 4, 5, 6]  # reference §7.3
  assert c.loose_ends(arc, 1) == [2, 4, 5, 6]
  text = c.describe(arc)
  assert "node 2 = avgpool(0) + sep3x3(0)" in text  # normal cell, reference table
  assert "node 4 = sep5x5(1) + sep5x5(3)" in text  # reduction cell


@pytest.mark.parametrize("pos, value, match", [
    (0, 2, r"token 0 \(normal cell, node 2's input 1\) is 2; allowed 0..1"),
    (1, 5, r"token 1 \(normal cell, node 2's op 1\) is 5; allowed 0..4"),
    (26, 4, r"token 26 \(reduction cell, node 3's input 2\) is 4; allowed 0..2"),
])
def test_malformed_arcs_name_position_value_and_range(pos, value, match):
  c = MicroCodec()
  arc = c.parse(PAPER_ARC).copy()
  arc[pos] = value
  with pytest.raises(ValueError, match=match):
    c.validate(arc)


def test_wrong_length_negative_non_integer_empty():
  c = MicroCodec()
  with pytest.raises(ValueError, match="wrong arc length 20"):
    c.parse(PAPER_ARC[:39])
  with pytest.raises(ValueError, match="negative"):
    c.parse(PAPER_ARC.replace("0 2 0 0", "0 2 -1 0", 1))
  with pytest.raises(ValueError, match="not a non-negative integer"):
    c.parse(PAPER_ARC.replace("0 2", "0 x", 1))
  with pytest.raises(ValueError, match="empty"):
    c.parse("")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-1, 6), min_size=8, max_size=8))
def test_fuzz_only_value_errors(tokens):
  c = MicroCodec(num_nodes=1)
  try:
    arc = c.parse(" ".join(map(str, tokens)))
  except ValueError:
    return
  assert c.format(arc) == " ".join(map(str, tokens))


def test_uniform_samples_are_valid_and_cover_choices():
  c = MicroCodec()
  f = jax.jit(c.sample_uniform)
  arcs = np.stack([np.asarray(f(jax.random.key(i))) for i in range(60)])
  for a in arcs:
    c.validate(a)
  assert set(arcs[:, 1::2].ravel().tolist()) == set(range(5))
  assert arcs[:, 16].max() == 5  # node 6's first input can be any of 0..5
  assert f._cache_size() == 1


def test_unread_cell_inputs_are_loose_ends():
  codec = MicroCodec(2)
  # normal cell: node 2 = f(1) + f(1), node 3 = f(2) + f(2): input 0 and node 3 are unread.
  arc = codec.parse("1 0 1 0 2 4 2 4 " "0 0 1 0 2 0 2 0")
  assert codec.loose_ends(arc, 0) == [0, 3]
  assert codec.loose_ends(arc, 1) == [3]
