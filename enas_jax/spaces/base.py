"""The search-space protocol shared by every space.

A search space is a small object that tells the controller *what* to sample (its
:class:`Decisions` program), converts arcs between their string form and a flat
``int32`` array (the codec), samples arcs uniformly, and builds the two child
networks: the weight-shared child used during search (the arc is a traced array,
one compilation serves every arc) and the fixed child used for final training
(the arc is baked in as Python constants).

The controller, the REINFORCE update and the search loop only ever talk to a
space through this protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

# Kinds of controller steps (see :class:`Decisions`).
OP = 0  # softmax over the space's op vocabulary (activations, conv ops, ...)
POINTER = 1  # attention pointer over earlier nodes' anchors
ANCHOR = 2  # no decision: one LSTM step whose output becomes the node's anchor
# Independent skip bits to every earlier node (the macro space): one sigmoid per
# earlier node from the attention score q_j, P(bit = 1) = sigmoid(2 q'_j), written to
# ``num_choices`` consecutive tokens starting at ``token``.
BITS = 3


# Pointer styles (see :attr:`Decisions.pointer_style`).
POINTER_STYLES = ("ptb", "micro")


@dataclasses.dataclass(frozen=True)
class Decisions:
  """A static program of controller steps, in the order the controller runs them.

  Every per-step field is a numpy array of length ``num_steps``; the controller
  turns them into constants and runs one ``lax.scan`` over the steps. The fields
  after ``arc_length`` are optional (the micro controller's features); their
  defaults leave the PTB and macro programs exactly as they were. They stay
  ``None`` until read through the ``step_*`` properties, so that
  ``dataclasses.replace`` on the required fields keeps working.

  Attributes:
    kind: ``OP``, ``POINTER``, ``ANCHOR`` or ``BITS`` per step.
    node: index of the node the step belongs to, counted within the step's cell.
      A ``POINTER`` step at node ``i`` chooses among nodes ``0 .. i-1``; the
      locality prior uses ``i - j``.
    num_choices: number of valid choices (ops for ``OP``; ``i`` for ``POINTER``;
      0 for ``ANCHOR``; the number of bits, at most ``i``, for ``BITS``). Choices
      at or above it get probability 0.
    token: position in the arc array where the sampled value is written
      (-1 for ``ANCHOR`` steps).
    write_anchor: whether this step's LSTM output is stored as ``node``'s anchor
      (the original stores the anchor on the first LSTM step of each node).
    num_ops: size of the op vocabulary (width of the op softmax).
    num_nodes: number of anchor slots (nodes per cell).
    arc_length: number of tokens in an arc.
    cell: optional int array, the cell each step belongs to (default: all 0).
      Where it changes from one step to the next, the anchors (and their
      attention keys) are cleared before that step: every cell starts with
      fresh anchors while the LSTM state (c, h) carries on (the micro
      controller's reduction cell follows its normal cell this way).
    zero_anchor: optional bool array (default: all False). A ``write_anchor``
      step with this flag stores a zero anchor but still stores its attention
      key ``h @ w_attn_1`` (the micro cell's two input nodes).
    op_offset: optional float array ``[num_steps, num_ops]`` (default: zeros),
      a constant added to an ``OP`` step's logits after temperature and tanh
      (the micro controller's ``b_soft_no_learn``, normal cell only). Rows of
      non-``OP`` steps must be zero.
    op_bias_init: optional tuple of ``num_ops`` floats. When given, the
      controller has a learned op-logit bias ``b_soft`` (added to ``h @ w_soft``
      before temperature and tanh) initialised to it (micro: ``[10, 10, 0, 0,
      0]``).
    pointer_style: ``"ptb"`` (default): after a pointer to node ``j`` the next
      input is ``anchor_j / (0.1 + (i - j))`` and the config's locality prior
      applies; ``"micro"``: the next input is ``anchor_j`` itself and there is
      no locality prior.
  """

  kind: np.ndarray
  node: np.ndarray
  num_choices: np.ndarray
  token: np.ndarray
  write_anchor: np.ndarray
  num_ops: int
  num_nodes: int
  arc_length: int
  cell: np.ndarray | None = None
  zero_anchor: np.ndarray | None = None
  op_offset: np.ndarray | None = None
  op_bias_init: tuple | None = None
  pointer_style: str = "ptb"

  @property
  def num_steps(self) -> int:
    return int(self.kind.shape[0])

  @property
  def max_choices(self) -> int:
    return int(max(self.num_ops, self.num_nodes))

  @property
  def step_cell(self) -> np.ndarray:
    """``cell`` as an int32 array (zeros when not given)."""
    if self.cell is None:
      return np.zeros(self.num_steps, np.int32)
    return np.asarray(self.cell, np.int32)

  @property
  def step_new_cell(self) -> np.ndarray:
    """Bool per step: the step starts a new cell (its anchors are cleared first)."""
    c = self.step_cell
    out = np.zeros(c.shape, bool)
    out[1:] = c[1:] != c[:-1]
    return out

  @property
  def step_zero_anchor(self) -> np.ndarray:
    """``zero_anchor`` as a bool array (all False when not given)."""
    if self.zero_anchor is None:
      return np.zeros(self.num_steps, bool)
    return np.asarray(self.zero_anchor, bool)

  @property
  def step_op_offset(self) -> np.ndarray:
    """``op_offset`` as a float32 ``[num_steps, num_ops]`` array (zeros when not given)."""
    if self.op_offset is None:
      return np.zeros((self.num_steps, self.num_ops), np.float32)
    return np.asarray(self.op_offset, np.float32)


def check_arc_tokens(arc: Any, length: int, space_name: str) -> np.ndarray:
  """Common first checks of an arc: integer tokens, 1-D, right length.

  Returns the arc as an ``int32`` numpy array. Raises ``ValueError`` naming the
  position and value of the first bad token.
  """
  if isinstance(arc, str):
    raise ValueError(
        f"{space_name}: got a string where an arc array was expected; use "
        f"space.parse(text) to read the string form.")
  try:
    a = np.asarray(arc)
  except Exception as e:  # pragma: no cover - exotic inputs
    raise ValueError(f"{space_name}: cannot read arc {arc!r}: {e}") from e
  if a.ndim != 1:
    raise ValueError(
        f"{space_name}: an arc is a flat sequence of {length} integers, got an "
        f"array of shape {a.shape}.")
  if a.size == 0:
    raise ValueError(f"{space_name}: empty arc; expected {length} integer tokens.")
  if a.dtype.kind == "b":
    a = a.astype(np.int64)
  if a.dtype.kind not in "iuf":
    raise ValueError(
        f"{space_name}: arc tokens must be integers, got dtype {a.dtype} "
        f"(first token {a.flat[0]!r}).")
  if a.dtype.kind == "f":
    for pos, v in enumerate(a.tolist()):
      if not np.isfinite(v) or v != int(v):
        raise ValueError(
            f"{space_name}: token {pos} is {v!r}, which is not an integer.")
  if a.size != length:
    raise ValueError(
        f"{space_name}: wrong arc length {a.size}; this space (as configured) "
        f"takes exactly {length} tokens.")
  for pos, v in enumerate(a.tolist()):
    if v < 0:
      raise ValueError(f"{space_name}: token {pos} is {int(v)}, negative; tokens are >= 0.")
    if v > np.iinfo(np.int32).max:
      raise ValueError(f"{space_name}: token {pos} is {int(v)}, too large.")
  return a.astype(np.int32)


def parse_tokens(text: Any, space_name: str) -> list[int]:
  """Splits the string form of an arc (whitespace and/or commas) into ints."""
  if not isinstance(text, str):
    raise ValueError(
        f"{space_name}: parse() takes the arc's string form, e.g. '0 1 2 ...', "
        f"got {type(text).__name__}.")
  parts = text.replace(",", " ").split()
  if not parts:
    raise ValueError(f"{space_name}: empty arc string.")
  out = []
  for pos, p in enumerate(parts):
    try:
      v = int(p, 10)
    except ValueError:
      raise ValueError(
          f"{space_name}: token {pos} is {p!r}, not a non-negative integer.") from None
    out.append(v)
  return out


def format_tokens(arc: Sequence[int]) -> str:
  return " ".join(str(int(v)) for v in np.asarray(arc).tolist())


class Codec:
  """String form of arcs, shared by every space: ``parse`` and ``format`` on top
  of the space's ``validate`` and its ``length_rule`` (the message explaining the
  expected length). Subclasses set ``name`` and ``arc_length``."""

  name = "space"
  arc_length = 0

  def validate(self, arc: Any) -> np.ndarray:  # pragma: no cover - abstract
    raise NotImplementedError

  def length_rule(self, num_tokens: int) -> str:  # pragma: no cover - abstract
    raise NotImplementedError

  def parse(self, text: str) -> np.ndarray:
    """Reads the string form (tokens separated by spaces and/or commas)."""
    tokens = parse_tokens(text, self.name)
    if len(tokens) != self.arc_length:
      raise ValueError(
          f"{self.name}: wrong arc length {len(tokens)}; {self.length_rule(len(tokens))}")
    return self.validate(tokens)

  def format(self, arc: Any) -> str:
    return format_tokens(self.validate(arc))


def count_params(tree) -> int:
  """Number of scalars in a parameter pytree (arrays or shape structs)."""
  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))
