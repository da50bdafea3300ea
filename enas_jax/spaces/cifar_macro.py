"""The CIFAR-10 macro search space: its arc codec, uniform sampler and the
controller's decision program.

Arc format (the original code's ``--child_fixed_arc`` for whole-channel macro
search): for each layer ``l = 0 .. L-1`` an op id followed by ``l`` skip bits,
all concatenated: ``L + L(L-1)/2`` tokens (78 for the search script's 12
layers, 300 for the paper's 24-layer network). Ops: 0 conv 3x3, 1 separable
conv 3x3, 2 conv 5x5, 3 separable conv 5x5, 4 average pool, 5 max pool. Bit
``i`` of layer ``l`` is a skip connection from an earlier layer ``i``.

The decision program is op, then skip bits, per layer. The children are in
:mod:`enas_jax.spaces.cifar_macro_child`; the registry entry
(:mod:`enas_jax.spaces.registry`) ties them together.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax.spaces import base, diagram, registry

OP_NAMES = ("conv3x3", "sep3x3", "conv5x5", "sep5x5", "avgpool", "maxpool")

# The paper's 24-layer network (seed scripts/cifar10_macro_final.sh), one line per layer.
PAPER_ARC = " ".join("""
0
3 0
0 1 0
2 0 0 1
2 0 0 0 0
3 1 1 0 1 0
2 0 0 0 0 0 1
2 0 1 1 0 1 1 1
1 0 1 1 1 0 1 0 1
0 0 0 0 0 0 0 0 0 0
2 0 0 0 0 0 1 0 0 0 0
0 1 0 0 1 1 0 0 0 0 1 1
2 0 1 0 0 0 0 0 1 0 1 1 0
1 0 0 1 0 0 0 1 1 1 0 1 0 1
0 1 1 0 1 0 1 0 0 0 0 0 1 0 0
2 0 0 1 0 0 0 0 0 0 0 1 0 1 0 1
2 0 1 0 0 0 1 0 0 1 1 1 1 0 0 1 0
2 0 0 0 0 1 0 1 0 1 0 0 1 0 1 0 0 1
3 0 1 1 0 1 0 0 0 0 0 1 0 1 0 1 0 0 0
3 0 1 1 0 0 0 0 0 0 0 0 0 1 1 0 0 0 0 1
0 1 0 0 1 0 1 1 0 0 0 1 0 0 0 0 0 1 1 0 0
3 0 1 0 1 1 0 0 1 0 1 1 0 1 1 0 1 0 0 1 0 0
0 1 0 1 0 1 0 0 0 0 0 0 0 0 1 0 1 0 0 1 0 0 0
0 1 1 0 0 0 1 1 1 0 1 0 0 0 1 0 1 0 0 1 1 0 0 0
""".split())


class MacroCodec(base.Codec):
  """Codec of macro arcs for ``num_layers`` layers (the search script's 12 by default)."""

  name = "cifar_macro"
  num_ops = len(OP_NAMES)

  def __init__(self, num_layers: int = 12):
    if not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
      raise ValueError(f"cifar_macro: num_layers must be an integer >= 1, got {num_layers!r}.")
    self.num_layers = int(num_layers)
    self.arc_length = self.num_layers + self.num_layers * (self.num_layers - 1) // 2
    # Position of each layer's op token; its skip bits follow it.
    self.op_positions = np.asarray(
        [l + l * (l - 1) // 2 for l in range(self.num_layers)], np.int32)
    self.decisions = self._build_decisions()

  def _build_decisions(self) -> base.Decisions:
    """The seed's macro controller program: per layer an op step, then a skip-bit
    step over the earlier layers, whose LSTM output is stored as the layer's
    anchor."""
    kind, node, nc, tok, wa = [], [], [], [], []
    for l in range(self.num_layers):
      p = int(self.op_positions[l])
      kind += [base.OP, base.BITS]
      node += [l, l]
      nc += [self.num_ops, l]
      tok += [p, p + 1 if l > 0 else -1]
      wa += [False, True]
    arr = lambda v, dt=np.int32: np.asarray(v, dtype=dt)  # noqa: E731
    return base.Decisions(
        kind=arr(kind), node=arr(node), num_choices=arr(nc), token=arr(tok),
        write_anchor=arr(wa, bool), num_ops=self.num_ops, num_nodes=self.num_layers,
        arc_length=self.arc_length)

  def layer_tokens(self, arc: Any, layer: int) -> tuple[int, np.ndarray]:
    """(op, skip bits) of one layer of a validated arc."""
    a = np.asarray(arc)
    p = int(self.op_positions[layer])
    return int(a[p]), a[p + 1:p + 1 + layer]

  def validate(self, arc: Any) -> np.ndarray:
    a = base.check_arc_tokens(arc, self.arc_length, "cifar_macro")
    for l in range(self.num_layers):
      p = int(self.op_positions[l])
      if a[p] >= self.num_ops:
        raise ValueError(
            f"cifar_macro: token {p} (layer {l}'s op) is {a[p]}; allowed 0..{self.num_ops - 1} "
            f"({', '.join(f'{i} {n}' for i, n in enumerate(OP_NAMES))}).")
      for j in range(l):
        if a[p + 1 + j] > 1:
          raise ValueError(
              f"cifar_macro: token {p + 1 + j} (layer {l}'s skip bit {j}) is {a[p + 1 + j]}; "
              f"allowed 0..1.")
    return a

  def length_rule(self, num_tokens: int) -> str:
    return (f"{self.num_layers} layers take L + L(L-1)/2 = {self.arc_length} tokens "
            f"(set num_layers to match the arc).")

  def describe(self, arc: Any) -> str:
    a = self.validate(arc)
    lines = []
    for l in range(self.num_layers):
      op, bits = self.layer_tokens(a, l)
      skips = [str(j) for j in np.nonzero(bits)[0]]
      lines.append(f"layer {l}: {OP_NAMES[op]}" + (f", skip bits set: {', '.join(skips)}"
                                                   if skips else ""))
    return "\n".join(lines)

  def sample_uniform(self, key: jax.Array, skip_prob: float = 0.5) -> jax.Array:
    """A random valid arc (jittable): uniform ops, independent skip bits."""
    k_op, k_bit = jax.random.split(key)
    bits = jax.random.bernoulli(k_bit, skip_prob, (self.arc_length,)).astype(jnp.int32)
    ops = jax.random.randint(k_op, (self.num_layers,), 0, self.num_ops)
    return bits.at[jnp.asarray(self.op_positions)].set(ops).astype(jnp.int32)


# ---------------------------------------------------------------------------
# The space's entry (enas_jax.spaces.registry): what the pipeline asks of it.

def build(config) -> MacroCodec:
  """The codec of a run config's ``space.num_layers``."""
  return MacroCodec(num_layers=int(config.space.num_layers))


def sizes_for_length(num_tokens: int) -> dict:
  """``{"num_layers": L}`` for an arc of ``L + L(L-1)/2`` tokens."""
  L = (math.isqrt(8 * num_tokens + 1) - 1) // 2
  if L < 1 or L * (L + 1) // 2 != num_tokens:
    raise ValueError(
        f"cifar_macro: wrong arc length {num_tokens}; L layers take L + L(L-1)/2 tokens "
        f"(78 for 12 layers, 300 for 24), and {num_tokens} is not such a number.")
  return {"num_layers": L}


def macro_reduction_layers(num_layers: int) -> list[int]:
  """Layers followed by a factorized reduction: ``floor(L/3)-1`` and ``2*floor(L/3)-1``
  (none when L < 3)."""
  pd = num_layers // 3
  return [l for l in (pd - 1, 2 * pd - 1) if l >= 0]


def draw(space: MacroCodec, a: np.ndarray) -> str:
  """DOT text of a network: image, stem, the layers with their ops on the main
  chain, the skip connections (dashed), the factorized reductions, the head."""
  L = space.num_layers
  reductions = macro_reduction_layers(L)
  dot = diagram.Dot(space.name, [
      f"enas_jax.visualize: space={space.name} num_layers={L}",
      f"arc: {base.format_tokens(a)}"])
  where = (f"factorized reductions after layers {diagram.ints(reductions)}" if reductions
           else "no reductions")
  diagram.header(dot, f"CIFAR-10 macro network: {L} layers, {where}; dashed = skip connections")
  dot.graph(rankdir="TB")
  dot.node("image", label="image", **diagram.INPUT)
  dot.node("stem", label="stem\nconv3x3 + BN", **diagram.BOX)
  dot.edge("image", "stem", style="bold", weight="100")
  prev = "stem"
  for l in range(L):
    op, bits = space.layer_tokens(a, l)
    dot.node(f"L{l}", label=f"layer {l}\n{OP_NAMES[op]}", **diagram.BOX)
    dot.edge(prev, f"L{l}", style="bold", weight="100")
    for i in np.nonzero(bits)[0].tolist():
      src = "stem" if i == 0 else f"L{i - 1}"
      dot.edge(src, f"L{l}", style="dashed", color="#7f7f7f", constraint="false",
               tailport="e", headport="e")
    prev = f"L{l}"
    if l in reductions:
      dot.node(f"reduce_{l}", label="factorized reduction\nstride 2, every earlier output",
               shape="box", style="filled,dashed", fillcolor="#fde2c8")
      dot.edge(prev, f"reduce_{l}", style="bold", weight="100")
      prev = f"reduce_{l}"
  dot.node("head", label="global avg pool\ndropout, FC (10 classes)", **diagram.OUTPUT)
  dot.edge(prev, "head", style="bold", weight="100")
  return dot.text()


def child() -> registry.ImageChild:
  """The macro child networks (enas_jax.spaces.cifar_macro_child)."""
  from enas_jax.spaces import cifar_macro_child as m
  return registry.ImageChild(
      config=m.MacroChildConfig.from_config, init_shared=m.init_shared,
      apply_shared=m.apply_shared, init_fixed=m.init_fixed, apply_fixed=m.apply_fixed,
      l2_params=lambda params: params, count_params=m.count_params)


ENTRY = registry.SpaceEntry(
    name=MacroCodec.name, codec=MacroCodec, build=build, size_fields=("num_layers",),
    sizes_for_length=sizes_for_length, task="image", dataset="images",
    # The paper's 24-layer network.
    named_arcs={"paper": registry.NamedArc(PAPER_ARC, {"num_layers": 24})},
    draw=draw, child=child, metric="acc", higher_is_better=True)
