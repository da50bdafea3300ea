"""The Penn Treebank recurrent-cell search space.

Arc format (the seed's, `melodyguan/enas`): a cell of ``num_nodes`` nodes has
``2 * num_nodes - 1`` tokens. ``a[0]`` is node 0's activation; for node
``i = 1 .. num_nodes - 1``, ``a[2i - 1]`` is its previous node (``0 .. i-1``)
and ``a[2i]`` its activation. Activations: 0 tanh, 1 ReLU, 2 identity,
3 sigmoid. The paper's cell is ``0 0 0 1 1 2 1 2 0 2 0 5 1 1 0 6 1 8 1 8 1 8 1``.

The cell (seed definition, no biases):

* node 0: ``[c | g] = [x_t * m_x, h_{t-1} * m_l] @ W0``;
  ``n_0 = h_{t-1} + sigmoid(g) * (act(c) - h_{t-1})`` (a highway gate);
* node i: ``[c | g] = (n_p * m_l) @ W_i``; ``n_i = n_p + sigmoid(g) * (act(c) - n_p)``;
* output (and next state): the mean of the *loose ends* (nodes no later node
  reads; ``aggregate="loose_ends"``, the seed's) or of nodes ``1 .. N-1``
  (``aggregate="all"``, the corrected code's GPU recipe). The string does not
  say which: it is a setting of the space, carried by converted arcs.

The corrected code (`google-research/enas_lm`) writes arcs without node 0's
activation (always tanh) and numbers activations 0 tanh, 1 ReLU, 2 sigmoid,
3 identity; :func:`from_corrected` / :func:`to_corrected` convert explicitly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax.spaces import base, diagram, registry

ACTIVATION_NAMES = ("tanh", "relu", "identity", "sigmoid")  # seed ids 0..3
# Corrected-code id -> seed id (and back: the map is its own inverse).
_CORRECTED_TO_SEED_ACT = {0: 0, 1: 1, 2: 3, 3: 2}
AGGREGATES = ("loose_ends", "all")
NODE0_ANCHORS = ("lstm", "zero")
NODE1_INPUTS = ("act_emb", "g_emb")
PAPER_ARC = "0 0 0 1 1 2 1 2 0 2 0 5 1 1 0 6 1 8 1 8 1 8 1"
# The corrected code's shipped arc, in its own format (aggregate = all).
CORRECTED_SHIPPED_ARC = "0 2 1 0 2 1 2 2 4 0 5 0 3 2 6 2"


def _identity(x):
  return x


ACTIVATIONS = (jnp.tanh, jax.nn.relu, _identity, jax.nn.sigmoid)


@dataclasses.dataclass(frozen=True)
class PTBDecisions(base.Decisions):
  """A controller program that may leave arc positions to a constant.

  ``fixed_tokens``: arc positions no step writes; they hold 0 in every sampled
  arc (node 0's activation, tanh, when node 0 makes no decision).
  """
  fixed_tokens: tuple = ()


@dataclasses.dataclass(frozen=True)
class ConvertedArc:
  """An arc together with the space settings it needs to mean the same cell."""
  arc: np.ndarray  # seed-format tokens
  num_nodes: int
  aggregate: str

  def space(self) -> "PTBSpace":
    return PTBSpace(num_nodes=self.num_nodes, aggregate=self.aggregate)

  def __str__(self) -> str:
    return base.format_tokens(self.arc)


class PTBSpace(base.Codec):
  """Recurrent cell search space (seed arc format).

  Args:
    num_nodes: nodes in the cell, node 0 included (the seed's 12).
    num_activations: how many activations the controller and the uniform
      sampler may pick, the first ``k`` of (tanh, ReLU, identity, sigmoid). The
      original controller could only sample 2; all 4 by default. Arcs with any
      of the 4 always parse and train.
    aggregate: ``"loose_ends"`` (seed) or ``"all"`` (corrected GPU recipe).
    node0_activations: how many activations the controller and the uniform
      sampler may pick for node 0 (first ``k``). ``None`` means
      ``num_activations``. The corrected code fixes node 0 to tanh (1): an
      unbounded node-0 activation lets the recurrent state grow across time
      steps, and without the seed's search-time batch norm the shared child
      diverges (seen on PTB with identity/ReLU at node 0).
    node0_anchor: the controller's anchor (and attention key) for node 0.
      ``"lstm"`` (the seed): one LSTM step on ``g_emb`` whose output is both;
      ``"zero"`` (``enas_lm``): zero vectors, no LSTM step.
    node1_input: ``"act_emb"`` (the seed): node 0's activation is an LSTM
      step (even when it has one choice) and node 1's pointer step is fed its
      embedding ``w_emb[act_0]``; ``"g_emb"`` (``enas_lm``): node 0's
      activation is no decision (always tanh, which needs
      ``node0_activations=1``) and node 1's pointer step is fed ``g_emb``.
      Sampled arcs keep the seed format either way (token 0 is then 0).
  """

  name = "ptb"
  num_ops = len(ACTIVATION_NAMES)

  def __init__(self, num_nodes: int = 12, num_activations: int = 4,
               aggregate: str = "loose_ends", node0_activations: int | None = None,
               node0_anchor: str = "lstm", node1_input: str = "act_emb"):
    if not isinstance(num_nodes, (int, np.integer)) or num_nodes < 2:
      raise ValueError(f"ptb: num_nodes must be an integer >= 2, got {num_nodes!r}.")
    if num_activations not in (1, 2, 3, 4):
      raise ValueError(
          f"ptb: num_activations must be 1..4 (tanh, ReLU, identity, sigmoid), "
          f"got {num_activations!r}.")
    if aggregate not in AGGREGATES:
      raise ValueError(f"ptb: aggregate must be one of {AGGREGATES}, got {aggregate!r}.")
    self.num_nodes = int(num_nodes)
    self.num_activations = int(num_activations)
    n0 = self.num_activations if node0_activations is None else node0_activations
    if n0 not in (1, 2, 3, 4):
      raise ValueError(f"ptb: node0_activations must be 1..4, got {node0_activations!r}.")
    self.node0_activations = int(n0)
    if node0_anchor not in NODE0_ANCHORS:
      raise ValueError(f"ptb: node0_anchor must be one of {NODE0_ANCHORS}, got {node0_anchor!r}.")
    if node1_input not in NODE1_INPUTS:
      raise ValueError(f"ptb: node1_input must be one of {NODE1_INPUTS}, got {node1_input!r}.")
    if node1_input == "g_emb" and self.node0_activations != 1:
      raise ValueError(
          f"ptb: node1_input='g_emb' leaves node 0's activation out of the controller "
          f"(always tanh), but node0_activations={self.node0_activations}; set "
          f"node0_activations=1 (space.node0_activations) or node1_input='act_emb'.")
    self.node0_anchor = node0_anchor
    self.node1_input = node1_input
    self.aggregate = aggregate
    self.arc_length = 2 * self.num_nodes - 1
    self.decisions = self._build_decisions()

  def __repr__(self) -> str:
    return (f"PTBSpace(num_nodes={self.num_nodes}, num_activations="
            f"{self.num_activations}, aggregate={self.aggregate!r}, "
            f"node0_activations={self.node0_activations}, node0_anchor="
            f"{self.node0_anchor!r}, node1_input={self.node1_input!r})")

  # ---------------------------------------------------------------- decisions
  def _build_decisions(self) -> base.Decisions:
    # The seed controller: node 0 takes one LSTM step for its anchor, then one
    # for its activation; node i takes a pointer step (which also stores its
    # anchor) and an activation step. enas_lm drops both node-0 steps: node 0's
    # anchor and key stay zero, and node 1's pointer step is the first (fed g_emb).
    kind, node, nchoice, token, anchor = [], [], [], [], []

    def add(k, n, c, t, a):
      kind.append(k); node.append(n); nchoice.append(c); token.append(t); anchor.append(a)

    if self.node0_anchor == "lstm":
      add(base.ANCHOR, 0, 0, -1, True)
    if self.node1_input == "act_emb":
      add(base.OP, 0, self.node0_activations, 0, False)
    for i in range(1, self.num_nodes):
      add(base.POINTER, i, i, 2 * i - 1, True)
      add(base.OP, i, self.num_activations, 2 * i, False)
    arr = lambda v, dt=np.int32: np.asarray(v, dtype=dt)  # noqa: E731
    return PTBDecisions(
        kind=arr(kind), node=arr(node), num_choices=arr(nchoice), token=arr(token),
        write_anchor=arr(anchor, bool), num_ops=self.num_ops,
        num_nodes=self.num_nodes, arc_length=self.arc_length,
        fixed_tokens=() if self.node1_input == "act_emb" else (0,))

  # -------------------------------------------------------------------- codec
  def validate(self, arc: Any) -> np.ndarray:
    """Checks an arc array; returns it as int32 or raises ``ValueError``."""
    a = base.check_arc_tokens(arc, self.arc_length, "ptb")
    nact = len(ACTIVATION_NAMES)
    if a[0] >= nact:
      raise ValueError(
          f"ptb: token 0 (node 0's activation) is {a[0]}; allowed 0..{nact - 1} "
          f"(0 tanh, 1 ReLU, 2 identity, 3 sigmoid).")
    for i in range(1, self.num_nodes):
      p, f = int(a[2 * i - 1]), int(a[2 * i])
      if p >= i:
        raise ValueError(
            f"ptb: token {2 * i - 1} (node {i}'s previous node) is {p}; allowed "
            f"0..{i - 1}: a node reads an earlier node.")
      if f >= nact:
        raise ValueError(
            f"ptb: token {2 * i} (node {i}'s activation) is {f}; allowed "
            f"0..{nact - 1} (0 tanh, 1 ReLU, 2 identity, 3 sigmoid).")
    return a

  def length_rule(self, num_tokens: int) -> str:
    hint = ""
    if num_tokens % 2 == 0:
      hint = (" An even length looks like the corrected code's format "
              "(no node-0 token): convert it with "
              "enas_jax.spaces.ptb.from_corrected(text).")
    return f"{self.num_nodes} nodes take 2*{self.num_nodes}-1 = {self.arc_length} tokens.{hint}"

  def describe(self, arc: Any) -> str:
    """Human-readable per-node listing of an arc."""
    a = self.validate(arc)
    lines = [f"node 0: (x, h_prev) -> {ACTIVATION_NAMES[a[0]]}"]
    for i in range(1, self.num_nodes):
      lines.append(f"node {i}: node {a[2 * i - 1]} -> {ACTIVATION_NAMES[a[2 * i]]}")
    w = np.asarray(output_weights(a, self.num_nodes, self.aggregate, static=True))
    lines.append("output: mean of nodes " + ", ".join(str(k) for k in np.nonzero(w)[0]))
    return "\n".join(lines)

  def sample_uniform(self, key: jax.Array) -> jax.Array:
    """A uniformly random valid arc (jittable; int32 array)."""
    k_act, k_prev, k_0 = jax.random.split(key, 3)
    acts = jax.random.randint(k_act, (self.num_nodes,), 0, self.num_activations)
    acts = acts.at[0].set(jax.random.randint(k_0, (), 0, self.node0_activations))
    i = jnp.arange(1, self.num_nodes)
    prevs = jnp.floor(jax.random.uniform(k_prev, (self.num_nodes - 1,)) * i).astype(jnp.int32)
    prevs = jnp.minimum(prevs, i - 1)
    arc = jnp.zeros((self.arc_length,), jnp.int32).at[0].set(acts[0])
    arc = arc.at[1::2].set(prevs).at[2::2].set(acts[1:])
    return arc.astype(jnp.int32)


def from_corrected(text_or_tokens: Any, aggregate: str = "all") -> ConvertedArc:
  """Converts an arc from the corrected code's format (``google-research/enas_lm``).

  That format has ``2L`` tokens ``(prev, func)`` for nodes ``1..L``, node 0 fixed
  to tanh, and activation ids 0 tanh, 1 ReLU, 2 sigmoid, 3 identity. The result
  carries ``aggregate`` (``"all"`` for the corrected GPU recipe, ``"loose_ends"``
  for its TPU recipe).
  """
  if isinstance(text_or_tokens, str):
    tokens = base.parse_tokens(text_or_tokens, "ptb(corrected)")
  else:
    a = np.asarray(text_or_tokens)
    tokens = base.check_arc_tokens(a, a.size, "ptb(corrected)").tolist() if a.size else []
  if len(tokens) == 0 or len(tokens) % 2:
    raise ValueError(
        f"ptb(corrected): an arc in the corrected code's format has an even, "
        f"non-zero number of tokens (prev, func per node); got {len(tokens)}.")
  seed = [0]
  for pos, v in enumerate(tokens):
    if pos % 2 == 1:
      if v not in _CORRECTED_TO_SEED_ACT:
        raise ValueError(
            f"ptb(corrected): token {pos} (an activation) is {v}; allowed 0..3 "
            f"(0 tanh, 1 ReLU, 2 sigmoid, 3 identity).")
      v = _CORRECTED_TO_SEED_ACT[v]
    seed.append(v)
  num_nodes = len(tokens) // 2 + 1
  space = PTBSpace(num_nodes=num_nodes, aggregate=aggregate)
  try:
    arc = space.validate(seed)
  except ValueError as e:
    raise ValueError(f"ptb(corrected): {e} (position counted in the converted seed-format arc)") from None
  return ConvertedArc(arc=arc, num_nodes=num_nodes, aggregate=aggregate)


def to_corrected(arc: Any, num_nodes: int | None = None) -> str:
  """Writes a seed-format arc in the corrected code's format.

  Only arcs whose node 0 is tanh are representable (the corrected code has no
  node-0 activation choice). The aggregate is not part of either string.
  """
  a = np.asarray(arc)
  n = num_nodes if num_nodes is not None else (a.size + 1) // 2
  a = PTBSpace(num_nodes=n).validate(a)
  if a[0] != 0:
    raise ValueError(
        f"ptb: token 0 (node 0's activation) is {a[0]}; the corrected code's "
        f"format fixes node 0 to tanh (0), so this arc has no corrected-format form.")
  out = []
  for pos, v in enumerate(a[1:].tolist()):
    out.append(_CORRECTED_TO_SEED_ACT[v] if pos % 2 == 1 else v)
  return base.format_tokens(out)


# ---------------------------------------------------------------------------
# Arc helpers used by the child networks. `static=True` means the arc is a numpy
# array (fixed child: Python control flow on its values is fine); otherwise it
# is a traced int32 array and every use is array arithmetic.

def output_weights(arc, num_nodes: int, aggregate: str, static: bool):
  """Per-node weights [num_nodes] of the cell output mean."""
  xp = np if static else jnp
  if aggregate == "all":
    w = xp.concatenate([xp.zeros((1,), xp.float32), xp.ones((num_nodes - 1,), xp.float32)])
    return w / (num_nodes - 1)
  prevs = xp.asarray(arc)[1::2]
  used = (prevs[:, None] == xp.arange(num_nodes)[None, :]).any(axis=0)
  loose = 1.0 - used.astype(xp.float32)
  return loose / loose.sum()


# ---------------------------------------------------------------------------
# The space's entry (enas_jax.spaces.registry): what the pipeline asks of it.

def build(config) -> PTBSpace:
  """The space a run config describes: ``space.*`` and the controller program's
  structure (``controller.node0_anchor`` / ``node1_input``)."""
  s = config.space
  c = config.controller
  return PTBSpace(num_nodes=int(s.num_nodes), num_activations=int(s.num_activations),
                  aggregate=s.aggregate, node0_activations=int(s.node0_activations),
                  node0_anchor=str(c.node0_anchor), node1_input=str(c.node1_input))


def sizes_for_length(num_tokens: int) -> dict:
  """``{"num_nodes": N}`` for an arc of ``2N - 1`` tokens."""
  if num_tokens % 2 == 0:
    raise ValueError(
        f"ptb: wrong arc length {num_tokens}; N nodes take 2N-1 tokens (23 for 12 nodes), "
        f"an odd number. An even length looks like the corrected code's format (no "
        f"node-0 token): pass --corrected to read it.")
  return {"num_nodes": max(2, (num_tokens + 1) // 2)}


def draw(space: PTBSpace, a: np.ndarray) -> str:
  """DOT text of a cell: the inputs, node 0 reading both, each node reading its
  chosen previous node (labelled with its activation), the output mean."""
  n = space.num_nodes
  weights = np.asarray(output_weights(a, n, space.aggregate, static=True))
  outputs = [int(k) for k in np.nonzero(weights)[0]]
  if space.aggregate == "all":
    what = f"mean of nodes 1..{n - 1}"
  else:
    what = f"mean of loose ends {{{diagram.ints(outputs)}}}"
  dot = diagram.Dot("ptb_cell", [
      f"enas_jax.visualize: space={space.name} num_nodes={n} aggregate={space.aggregate}",
      f"arc: {base.format_tokens(a)}"])
  diagram.header(dot, f"PTB recurrent cell: {n} nodes, output = {what}")
  dot.graph(rankdir="TB")
  dot.node("x_t", label="x_t", **diagram.INPUT)
  dot.node("h_prev", label="h_{t-1}", **diagram.INPUT)
  loose = set(outputs) if space.aggregate == "loose_ends" else set()
  for i in range(n):
    act = ACTIVATION_NAMES[int(a[0 if i == 0 else 2 * i])]
    dot.node(f"n{i}", label=f"{i}: {act}", **(diagram.LOOSE if i in loose else diagram.BOX))
  dot.edge("x_t", "n0")
  dot.edge("h_prev", "n0")
  for i in range(1, n):
    dot.edge(f"n{int(a[2 * i - 1])}", f"n{i}")
  dot.node("mean", label="mean", shape="circle", style="filled", fillcolor="#fff5bf")
  for k in outputs:
    dot.edge(f"n{k}", "mean", style="dashed", color="#2e7d32")
  dot.node("h_t", label="h_t", **diagram.OUTPUT)
  dot.edge("mean", "h_t")
  return dot.text()


ENTRY = registry.SpaceEntry(
    name=PTBSpace.name, codec=PTBSpace, build=build, size_fields=("num_nodes",),
    sizes_for_length=sizes_for_length, task="lm", dataset="corpus",
    named_arcs={
        # The paper's cell (12 nodes, output = mean of the loose ends).
        "paper": registry.NamedArc(PAPER_ARC, {"num_nodes": 12, "aggregate": "loose_ends"}),
        # The corrected code's shipped cell (9 nodes, output = mean of nodes 1..8).
        "corrected": registry.NamedArc(str(from_corrected(CORRECTED_SHIPPED_ARC)),
                                       {"num_nodes": 9, "aggregate": "all"}),
    },
    draw=draw, child=None, metric="ppl", higher_is_better=False)
