"""The CIFAR-10 micro (cell) search space: its arc codec (issue 5, first part).

Arc format (the seed's ``--child_fixed_arc`` for micro search): the normal
cell, then the reduction cell. A cell of ``B`` nodes (the scripts' 5) has
``4B`` tokens: for node ``b = 2 .. B+1``, ``index_1 op_1 index_2 op_2``, where an
index is ``0 .. b-1`` (0 and 1 are the cell's two inputs, older first; 2.. are
earlier nodes) and an op is 0 sep 3x3, 1 sep 5x5, 2 avg pool, 3 max pool,
4 identity (reference ``enas_original.md`` §3.2, §6, §7.3). The whole arc has
``8B`` tokens (40 for B = 5).

Only the codec and the uniform sampler are here so far; the controller program
(which needs the micro controller's op biases and zero input anchors) and the
children come with the rest of the space, so it is not yet registered in
``enas_jax.spaces.get``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax.spaces import base

OP_NAMES = ("sep3x3", "sep5x5", "avgpool", "maxpool", "identity")
CELL_NAMES = ("normal", "reduction")
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
    """Nodes of a cell (2..B+1) that no node of the same cell reads: the cell output."""
    a = self.validate(arc)[cell * self.cell_length:(cell + 1) * self.cell_length]
    used = set(a[0::4].tolist()) | set(a[2::4].tolist())
    return [b for b in range(2, self.num_nodes + 2) if b not in used]

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
