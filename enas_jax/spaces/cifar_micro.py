"""The CIFAR-10 micro (cell) search space: its arc codec and controller program.

Arc format (the seed's ``--child_fixed_arc`` for micro search): the normal
cell, then the reduction cell. A cell of ``B`` nodes (the scripts' 5) has
``4B`` tokens: for node ``b = 2 .. B+1``, ``index_1 op_1 index_2 op_2``, where an
index is ``0 .. b-1`` (0 and 1 are the cell's two inputs, older first; 2.. are
earlier nodes) and an op is 0 sep 3x3, 1 sep 5x5, 2 avg pool, 3 max pool,
4 identity. The whole arc has
``8B`` tokens (40 for B = 5).

``MicroCodec.decisions`` is the micro controller's decision program
of the original: per cell two input-node steps on ``g_emb`` (zero anchors,
non-zero attention keys), then per node ``b`` two pointers over ``0 .. b-1``,
two op softmaxes and one anchor step; the reduction cell continues the LSTM
state with fresh anchors. It asks the controller for the learned op bias
``b_soft`` (initial ``[10, 10, 0, 0, 0]``), the normal-cell constant offset
``b_soft_no_learn`` and plain (unscaled, prior-free) pointers. The search
script's controller settings are ``lstm_size=64``, ``tanh_constant=1.1``,
``op_tanh_reduce=2.5``, no temperature and ``entropy_mode="full"``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax.spaces import base, diagram, registry

OP_NAMES = ("sep3x3", "sep5x5", "avgpool", "maxpool", "identity")
CELL_NAMES = ("normal", "reduction")
# The micro controller's learned op bias at initialisation (``b_soft``) and the
# constant added to normal-cell op logits after the tanh (``b_soft_no_learn``):
# both favour the two separable convolutions.
OP_BIAS_INIT = (10.0, 10.0, 0.0, 0.0, 0.0)
NORMAL_OP_OFFSET = (0.25, 0.25, -0.25, -0.25, -0.25)
# The paper's cells (seed scripts/cifar10_micro_final.sh): normal, then reduction.
PAPER_ARC = ("0 2 0 0 0 4 0 1 0 4 1 1 1 0 0 1 0 2 1 1 "
             "1 0 1 0 0 3 0 2 1 1 3 1 1 0 0 4 0 3 1 1")


class MicroCodec(base.Codec):
  """Codec of micro arcs with ``num_nodes`` nodes per cell (the scripts' 5)."""

  name = "cifar_micro"
  num_ops = len(OP_NAMES)

  def __init__(self, num_nodes: int = 5):
    if not isinstance(num_nodes, (int, np.integer)) or num_nodes < 1:
      raise ValueError(f"cifar_micro: num_nodes must be an integer >= 1, got {num_nodes!r}.")
    self.num_nodes = int(num_nodes)
    self.cell_length = 4 * self.num_nodes
    self.arc_length = 2 * self.cell_length
    self.decisions = self._build_decisions()

  def _build_decisions(self) -> base.Decisions:
    """The micro controller's program.

    Per cell (normal, then reduction; node indices count within the cell, the
    anchor slots being nodes ``0 .. B+1``): two ``ANCHOR`` steps for the input
    nodes 0 and 1 (zero anchors, attention keys from the LSTM output); then
    for each node ``b = 2 .. B+1``: ``POINTER`` idx1, ``POINTER`` idx2, ``OP``
    op1, ``OP`` op2 (written to tokens ``[idx1, op1, idx2, op2]``), and one
    ``ANCHOR`` step on op2's embedding whose output is node ``b``'s anchor. The
    next node (and the next cell) starts from ``g_emb``.
    """
    cols = ("kind", "node", "num_choices", "token", "write_anchor", "zero_anchor", "cell",
            "op_offset")
    rows = []
    zero_off = (0.0,) * self.num_ops

    def add(*row, op_offset=zero_off):
      rows.append(row + (op_offset,))

    for c in range(len(CELL_NAMES)):
      op_off = NORMAL_OP_OFFSET if c == 0 else zero_off
      for b in range(2):
        add(base.ANCHOR, b, 0, -1, True, True, c)
      for b in range(2, self.num_nodes + 2):
        start = c * self.cell_length + 4 * (b - 2)
        add(base.POINTER, b, b, start, False, False, c)
        add(base.POINTER, b, b, start + 2, False, False, c)
        add(base.OP, b, self.num_ops, start + 1, False, False, c, op_offset=op_off)
        add(base.OP, b, self.num_ops, start + 3, False, False, c, op_offset=op_off)
        add(base.ANCHOR, b, 0, -1, True, False, c)
    dtypes = (np.int32,) * 4 + (bool, bool, np.int32, np.float32)
    arrays = {name: np.asarray(col, dtype=dt)
              for name, col, dt in zip(cols, zip(*rows), dtypes)}
    return base.Decisions(
        **arrays, num_ops=self.num_ops, num_nodes=self.num_nodes + 2,
        arc_length=self.arc_length, op_bias_init=OP_BIAS_INIT, pointer_style="micro")

  def _where(self, pos: int) -> tuple[str, int, str]:
    cell = CELL_NAMES[pos // self.cell_length]
    node = 2 + (pos % self.cell_length) // 4
    field = ("input 1", "op 1", "input 2", "op 2")[pos % 4]
    return cell, node, field

  def validate(self, arc: Any) -> np.ndarray:
    a = base.check_arc_tokens(arc, self.arc_length, "cifar_micro")
    for pos, v in enumerate(a.tolist()):
      cell, node, field = self._where(pos)
      if pos % 2 == 0 and v >= node:
        raise ValueError(
            f"cifar_micro: token {pos} ({cell} cell, node {node}'s {field}) is {v}; allowed "
            f"0..{node - 1} (0 and 1 are the cell inputs, 2.. earlier nodes).")
      if pos % 2 == 1 and v >= self.num_ops:
        raise ValueError(
            f"cifar_micro: token {pos} ({cell} cell, node {node}'s {field}) is {v}; allowed "
            f"0..{self.num_ops - 1} ({', '.join(f'{i} {n}' for i, n in enumerate(OP_NAMES))}).")
    return a

  def length_rule(self, num_tokens: int) -> str:
    return (f"two cells of {self.num_nodes} nodes take 8 x {self.num_nodes} = "
            f"{self.arc_length} tokens (normal cell, then reduction).")

  def loose_ends(self, arc: Any, cell: int) -> list[int]:
    """Nodes of a cell that no node of the same cell reads: the cell output.

    The cell inputs 0 and 1 count too (an unread input is concatenated into the
    output, as in the original's search and final cells)."""
    a = self.validate(arc)[cell * self.cell_length:(cell + 1) * self.cell_length]
    used = set(a[0::4].tolist()) | set(a[2::4].tolist())
    return [b for b in range(self.num_nodes + 2) if b not in used]

  def describe(self, arc: Any) -> str:
    a = self.validate(arc)
    lines = []
    for c, cname in enumerate(CELL_NAMES):
      cell = a[c * self.cell_length:(c + 1) * self.cell_length]
      lines.append(f"{cname} cell:")
      for k in range(self.num_nodes):
        i1, o1, i2, o2 = cell[4 * k:4 * k + 4].tolist()
        lines.append(f"  node {k + 2} = {OP_NAMES[o1]}({i1}) + {OP_NAMES[o2]}({i2})")
      lines.append(f"  output: concat of nodes {self.loose_ends(a, c)}")
    return "\n".join(lines)

  def sample_uniform(self, key: jax.Array) -> jax.Array:
    """A uniformly random valid arc (jittable)."""
    k_idx, k_op = jax.random.split(key)
    node = jnp.asarray([2 + (p % self.cell_length) // 4 for p in range(self.arc_length)])
    u = jax.random.uniform(k_idx, (self.arc_length,))
    idx = jnp.minimum(jnp.floor(u * node).astype(jnp.int32), node - 1)
    ops = jax.random.randint(k_op, (self.arc_length,), 0, self.num_ops)
    is_idx = (jnp.arange(self.arc_length) % 2) == 0
    return jnp.where(is_idx, idx, ops).astype(jnp.int32)


# ---------------------------------------------------------------------------
# The space's entry (enas_jax.spaces.registry): what the pipeline asks of it.

def build(config) -> MicroCodec:
  """The codec of a run config's ``space.num_nodes``."""
  return MicroCodec(num_nodes=int(config.space.num_nodes))


def sizes_for_length(num_tokens: int) -> dict:
  """``{"num_nodes": B}`` for an arc of ``8B`` tokens."""
  if num_tokens % 8 or num_tokens == 0:
    raise ValueError(
        f"cifar_micro: wrong arc length {num_tokens}; two cells of B nodes take 8 x B "
        f"tokens (40 for 5 nodes), and {num_tokens} is not a multiple of 8.")
  return {"num_nodes": num_tokens // 8}


def draw(space: MicroCodec, a: np.ndarray) -> str:
  """DOT text of the two cells: per cell its inputs, an add node per node fed by
  two op-labelled edges, and the concat of the loose ends."""
  B = space.num_nodes
  dot = diagram.Dot(space.name, [
      f"enas_jax.visualize: space={space.name} num_nodes={B}",
      f"arc: {base.format_tokens(a)}"])
  diagram.header(dot, f"CIFAR-10 micro cells: {B} nodes each; output = concat of loose ends")
  dot.graph(rankdir="TB")
  for c, cname in enumerate(CELL_NAMES):
    cell = a[c * space.cell_length:(c + 1) * space.cell_length].tolist()
    loose = space.loose_ends(a, c)
    title = f"{cname} cell"
    if cname == "reduction":
      title += " (ops reading c_{k-2} or c_{k-1} have stride 2)"
    dot.open(f"subgraph cluster_{cname}")
    dot.graph(label=title, style="rounded", color="#7f7f7f")
    ids = {0: f"{cname}_in0", 1: f"{cname}_in1"}
    dot.node(ids[0], label="c_{k-2}", **diagram.INPUT)
    dot.node(ids[1], label="c_{k-1}", **diagram.INPUT)
    for k in range(B):
      b = k + 2
      ids[b] = f"{cname}_n{b}"
      dot.node(f"{cname}_add{b}", label="add", shape="circle", style="filled",
               fillcolor="#fff5bf", fontsize="9")
      dot.node(ids[b], label=f"node {b}", **(diagram.LOOSE if b in loose else diagram.BOX))
    for k in range(B):
      b = k + 2
      i1, o1, i2, o2 = cell[4 * k:4 * k + 4]
      for idx, op in ((i1, o1), (i2, o2)):
        dot.edge(ids[idx], f"{cname}_add{b}", label=OP_NAMES[op])
      dot.edge(f"{cname}_add{b}", ids[b])
    dot.node(f"{cname}_out", label="concat\nc_k", **diagram.OUTPUT)
    for b in loose:
      dot.edge(ids[b], f"{cname}_out", style="dashed", color="#2e7d32")
    dot.close()
  return dot.text()


def child() -> registry.ImageChild:
  """The micro child networks (enas_jax.spaces.cifar_micro_child); L2 leaves out
  the auxiliary head (the original's L2 covered its optimised weights only)."""
  from enas_jax.spaces import cifar_micro_child as m
  return registry.ImageChild(
      config=m.MicroChildConfig.from_config, init_shared=m.init_shared,
      apply_shared=m.apply_shared, init_fixed=m.init_fixed, apply_fixed=m.apply_fixed,
      l2_params=m.without_aux, count_params=m.count_params)


ENTRY = registry.SpaceEntry(
    name=MicroCodec.name, codec=MicroCodec, build=build, size_fields=("num_nodes",),
    sizes_for_length=sizes_for_length, task="image", dataset="images",
    # The paper's cells, 5 nodes each.
    named_arcs={"paper": registry.NamedArc(PAPER_ARC, {"num_nodes": 5})},
    draw=draw, child=child, metric="acc", higher_is_better=True)
