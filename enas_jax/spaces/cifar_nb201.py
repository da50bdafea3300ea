"""The NAS-Bench-201 cell space (Dong & Yang, ICLR 2020): its arc codec and
controller program.

A cell has ``num_nodes`` nodes (4 in the benchmark; node 0 is the cell input,
the last node its output). Every edge ``i -> j`` (``i < j``) carries one of five
ops: 0 ``none`` (zero), 1 ``skip_connect`` (identity), 2 ``nor_conv_1x1``
(ReLU-conv1x1-BN), 3 ``nor_conv_3x3`` (ReLU-conv3x3-BN), 4 ``avg_pool_3x3``
(stride 1, the padding left out of the divisor); node ``j`` sums its incoming
edges. One cell is searched and every cell of the network uses it.

Arc format: one op id per edge, edges ordered by target node, then source:
``(1<-0), (2<-0), (2<-1), (3<-0), (3<-1), (3<-2)`` for 4 nodes (``n(n-1)/2``
tokens), which is the order of the benchmark's arch string
``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``; :meth:`NB201Codec.to_nb201_string`
and :meth:`NB201Codec.from_nb201_string` convert between the two, so that an
arc can be looked up in the benchmark's tables.

``NB201Codec.decisions``: one ``OP`` step of 5 choices per edge, in arc order,
nothing else (no pointers, no anchors): the controller NAS-Bench-201's ENAS
baseline used (an LSTM, one softmax per edge, the sampled op's embedding as the
next input).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax.spaces import base, diagram, registry

OP_NAMES = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
NONE, SKIP, CONV1, CONV3, AVGPOOL = range(5)

# The benchmark's ResNet cell (NAS-Bench-201 paper, Fig. 1 and its API's
# example): two 3x3 convs in a chain and a skip from the input to the output.
RESNET_ARC = "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"


def edges(num_nodes: int) -> tuple[tuple[int, int], ...]:
  """``(target, source)`` per arc token, in arc order."""
  return tuple((j, i) for j in range(1, num_nodes) for i in range(j))


class NB201Codec(base.Codec):
  """Codec of NAS-Bench-201 cells of ``num_nodes`` nodes (the benchmark's 4)."""

  name = "cifar_nb201"
  num_ops = len(OP_NAMES)

  def __init__(self, num_nodes: int = 4):
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, (int, np.integer)) \
        or num_nodes < 2:
      raise ValueError(
          f"cifar_nb201: num_nodes must be an integer >= 2 (node 0 is the cell input, the "
          f"last node its output; the benchmark uses 4), got {num_nodes!r}.")
    self.num_nodes = int(num_nodes)
    self.edges = edges(self.num_nodes)
    self.arc_length = len(self.edges)
    self.decisions = self._build_decisions()

  def _build_decisions(self) -> base.Decisions:
    """One ``OP`` step per edge, in arc order (``node`` = the edge's target),
    with a learned op bias."""
    n = self.arc_length
    return base.Decisions(
        kind=np.full(n, base.OP, np.int32),
        node=np.asarray([j for j, _ in self.edges], np.int32),
        num_choices=np.full(n, self.num_ops, np.int32),
        token=np.arange(n, dtype=np.int32),
        write_anchor=np.zeros(n, bool),
        num_ops=self.num_ops, num_nodes=self.num_nodes, arc_length=n,
        # A learned op-logit bias from zero: the benchmark's controller scores
        # the ops with an nn.Linear (weights and bias).
        op_bias_init=(0.0,) * self.num_ops)

  def validate(self, arc: Any) -> np.ndarray:
    a = base.check_arc_tokens(arc, self.arc_length, self.name)
    for pos, v in enumerate(a.tolist()):
      if v >= self.num_ops:
        j, i = self.edges[pos]
        raise ValueError(
            f"cifar_nb201: token {pos} (edge {j}<-{i}) is {v}; allowed 0..{self.num_ops - 1} "
            f"({', '.join(f'{k} {o}' for k, o in enumerate(OP_NAMES))}).")
    return a

  def length_rule(self, num_tokens: int) -> str:
    return (f"a cell of {self.num_nodes} nodes has n(n-1)/2 = {self.arc_length} edges, one op "
            f"token each, in the order "
            f"{', '.join(f'({j}<-{i})' for j, i in self.edges)}. A NAS-Bench-201 arch "
            f"string ('|nor_conv_3x3~0|+|...') is read by from_nb201_string().")

  # --------------------------------------------------------- benchmark strings
  def to_nb201_string(self, arc: Any) -> str:
    """The benchmark's arch string, e.g. ``|nor_conv_3x3~0|+|none~0|skip_connect~1|+|...|``."""
    a = self.validate(arc)
    nodes, pos = [], 0
    for j in range(1, self.num_nodes):
      nodes.append("|" + "|".join(f"{OP_NAMES[a[pos + i]]}~{i}" for i in range(j)) + "|")
      pos += j
    return "+".join(nodes)

  def from_nb201_string(self, text: str) -> np.ndarray:
    """The arc of a benchmark arch string (the inverse of :meth:`to_nb201_string`)."""
    if not isinstance(text, str):
      raise ValueError(f"cifar_nb201: from_nb201_string takes a string, got "
                       f"{type(text).__name__}.")
    example = self.to_nb201_string(np.full(self.arc_length, CONV3, np.int32))
    groups = text.strip().split("+")
    if len(groups) != self.num_nodes - 1:
      raise ValueError(
          f"cifar_nb201: {text!r} has {len(groups)} node group(s) separated by '+'; a cell of "
          f"{self.num_nodes} nodes has {self.num_nodes - 1}, e.g. {example!r}.")
    out = []
    for j, g in enumerate(groups, start=1):
      if not re.fullmatch(r"\|([^|]+\|)+", g):
        raise ValueError(f"cifar_nb201: node {j}'s group {g!r} is not of the form "
                         f"'|op~i|op~i|'; e.g. {example!r}.")
      items = g.strip("|").split("|")
      if len(items) != j:
        raise ValueError(f"cifar_nb201: node {j}'s group {g!r} lists {len(items)} edge(s); "
                         f"node {j} has {j} (from nodes 0..{j - 1}).")
      for i, item in enumerate(items):
        op, sep, src = item.partition("~")
        if not sep or src != str(i):
          raise ValueError(f"cifar_nb201: node {j}'s edge {item!r} should read 'op~{i}' "
                           f"(edges listed by source node 0..{j - 1}, in order).")
        if op not in OP_NAMES:
          raise ValueError(f"cifar_nb201: unknown op {op!r} on edge {j}<-{i}; ops: "
                           f"{', '.join(OP_NAMES)}.")
        out.append(OP_NAMES.index(op))
    return self.validate(out)

  def parse(self, text: str) -> np.ndarray:
    """The plain token form (``"3 0 3 1 0 1"``); a benchmark arch string
    (starting with ``|``) is accepted too."""
    if isinstance(text, str) and text.strip().startswith("|"):
      return self.from_nb201_string(text)
    return super().parse(text)

  # ------------------------------------------------------------- structure
  def describe(self, arc: Any) -> str:
    a = self.validate(arc)
    lines, pos = [], 0
    for j in range(1, self.num_nodes):
      terms = [f"{OP_NAMES[a[pos + i]]}({i})" for i in range(j) if a[pos + i] != NONE]
      pos += j
      lines.append(f"node {j} = " + (" + ".join(terms) if terms else "zero"))
    lines.append(f"output: node {self.num_nodes - 1}; NAS-Bench-201: {self.to_nb201_string(a)}")
    return "\n".join(lines)

  def sample_uniform(self, key: jax.Array) -> jax.Array:
    """A uniformly random arc (jittable): every edge's op uniform over the five."""
    return jax.random.randint(key, (self.arc_length,), 0, self.num_ops).astype(jnp.int32)


# ---------------------------------------------------------------------------
# The space's entry (enas_jax.spaces.registry): what the pipeline asks of it.

def build(config) -> NB201Codec:
  """The codec of a run config's ``space.num_nodes``."""
  return NB201Codec(num_nodes=int(config.space.num_nodes))


def sizes_for_length(num_tokens: int) -> dict:
  """``{"num_nodes": n}`` for an arc of ``n(n-1)/2`` tokens."""
  n = int(round((1 + np.sqrt(1 + 8 * num_tokens)) / 2))
  if num_tokens < 1 or n * (n - 1) // 2 != num_tokens:
    raise ValueError(
        f"cifar_nb201: wrong arc length {num_tokens}; a cell of n nodes has n(n-1)/2 edges, "
        f"one op token each (6 for the benchmark's 4 nodes).")
  return {"num_nodes": n}


def draw(space: NB201Codec, a: np.ndarray) -> str:
  """DOT text of the cell: its nodes, one op-labelled edge per non-``none`` edge."""
  n = space.num_nodes
  dot = diagram.Dot(space.name, [
      f"enas_jax.visualize: space={space.name} num_nodes={n}",
      f"arc: {base.format_tokens(a)}",
      f"NAS-Bench-201: {space.to_nb201_string(a)}"])
  diagram.header(dot, f"NAS-Bench-201 cell: {n} nodes, each the sum of its incoming edges; "
                      f"'none' edges left out")
  dot.graph(rankdir="LR")
  for j in range(n):
    style = diagram.INPUT if j == 0 else diagram.OUTPUT if j == n - 1 else diagram.BOX
    label = "input (node 0)" if j == 0 else f"output (node {j})" if j == n - 1 else f"node {j}"
    dot.node(f"n{j}", label=label, **style)
  for pos, (j, i) in enumerate(space.edges):
    if a[pos] != NONE:
      dot.edge(f"n{i}", f"n{j}", label=OP_NAMES[a[pos]],
               **({"style": "dashed"} if a[pos] == SKIP else {}))
  return dot.text()


def child() -> registry.ImageChild:
  """The NAS-Bench-201 child networks (enas_jax.spaces.cifar_nb201_child)."""
  from enas_jax.spaces import cifar_nb201_child as m
  return registry.ImageChild(
      config=m.NB201ChildConfig.from_config, init_shared=m.init_shared,
      apply_shared=m.apply_shared, init_fixed=m.init_fixed, apply_fixed=m.apply_fixed,
      l2_params=m.l2_params, count_params=m.count_params)


ENTRY = registry.SpaceEntry(
    name=NB201Codec.name, codec=NB201Codec, build=build, size_fields=("num_nodes",),
    sizes_for_length=sizes_for_length, task="image", dataset="images",
    # No ENAS paper arc in this space; the benchmark's ResNet cell instead.
    named_arcs={"resnet": registry.NamedArc("3 0 3 1 0 1", {"num_nodes": 4})},
    draw=draw, child=child, metric="acc", higher_is_better=True)
