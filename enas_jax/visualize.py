"""Arc diagrams (Graphviz DOT) for the three search spaces.

* :func:`to_dot` turns an arc of a space into DOT text (deterministic: the same
  arc and space settings always give the same string).
* :func:`render` writes DOT text to ``.dot`` (no dependency) or, through the
  Graphviz ``dot`` executable, to ``.svg`` / ``.png`` / ``.pdf``.
* :func:`write_arc_diagram` writes ``<stem>.dot`` (and ``<stem>.svg`` when
  Graphviz is installed) into a directory and never fails for a missing
  Graphviz; the search loop calls it after derive.
* :func:`show` returns a small object that notebooks display as SVG (Graphviz
  installed) or as the DOT text.

What is drawn:

* ``ptb``: the inputs ``x_t`` and ``h_{t-1}``, node 0 reading both, every node
  ``i`` reading its chosen previous node, each node labelled with its
  activation, and the output ``h_t`` = mean of the loose ends (or of nodes
  ``1..N-1`` when the space's ``aggregate`` is ``"all"``).
* ``cifar_macro``: image, stem, the layers with their ops on the main chain,
  the skip connections (dashed; bit 0 = stem, bit i = layer i-1), a factorized
  reduction after layers ``floor(L/3)-1`` and ``2*floor(L/3)-1``, and the head.
* ``cifar_micro``: two clusters, normal and reduction cell, each with inputs
  ``c_{k-2}``, ``c_{k-1}``, an add node per node fed by two op-labelled edges
  from its chosen inputs, and the concat of the loose ends as the cell output.

Command line (``--arc`` takes the arc's string form or a name: ``paper`` for
every space, ``corrected`` for ptb, the corrected code's shipped 9-node cell
with ``aggregate="all"``)::

  python -m enas_jax.visualize --space=ptb --arc=paper --out=cell.svg
  python -m enas_jax.visualize --space=cifar_micro --arc_file=best_arc.txt --out=cells.dot
  python -m enas_jax.visualize --space=ptb --corrected --arc="0 2 1 0 2 1 2 2 4 0 5 0 3 2 6 2"

Sizes (``--num_nodes``, ``--num_layers``) are inferred from the arc length
when not given (ptb ``2N-1`` tokens: ``N`` nodes; macro ``L + L(L-1)/2``: ``L``
layers; micro ``8B``: ``B`` nodes). Without ``--out`` the DOT text is printed.
A malformed arc prints the codec's message and exits with 2; a missing Graphviz
(for ``.svg``/``.png``/``.pdf``) exits with 1 after writing the ``.dot`` file.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from enas_jax.spaces import base, cifar_macro, cifar_micro, ptb

logger = logging.getLogger(__name__)

SPACE_NAMES = ("ptb", "cifar_macro", "cifar_micro")
RENDER_FORMATS = ("svg", "png", "pdf")
_DOT_TIMEOUT_S = 120

_INSTALL_HINT = (
    "Install Graphviz (it provides the `dot` executable): "
    "`sudo apt install graphviz` (Debian/Ubuntu), `brew install graphviz` (macOS) "
    "or `conda install -c conda-forge graphviz`.")


class GraphvizNotFoundError(RuntimeError):
  """The Graphviz ``dot`` executable is not on ``PATH``."""


# ----------------------------------------------------------------------------
# DOT building blocks.


def _q(text: Any) -> str:
  """A DOT double-quoted string; a newline in ``text`` becomes a line break."""
  s = str(text)
  s = s.replace("\\", "\\\\").replace('"', '\\"')
  s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
  return f'"{s}"'


def _attrs(attrs: dict) -> str:
  if not attrs:
    return ""
  return " [" + ", ".join(f"{k}={_q(v)}" for k, v in attrs.items()) + "]"


class _Dot:
  """Collects DOT lines in the order they are added (so output is deterministic)."""

  def __init__(self, name: str, comments: Sequence[str] = ()):
    self.lines = [f"// {c}" for c in comments]
    self.lines.append(f"digraph {name} {{")
    self.indent = 1

  def raw(self, line: str) -> None:
    self.lines.append("  " * self.indent + line)

  def graph(self, **attrs) -> None:
    for k, v in attrs.items():
      self.raw(f"{k}={_q(v)};")

  def defaults(self, kind: str, **attrs) -> None:
    self.raw(f"{kind}{_attrs(attrs)};")

  def node(self, node_id: str, **attrs) -> None:
    self.raw(f"{node_id}{_attrs(attrs)};")

  def edge(self, src: str, dst: str, **attrs) -> None:
    self.raw(f"{src} -> {dst}{_attrs(attrs)};")

  def open(self, header: str) -> None:
    self.raw(header + " {")
    self.indent += 1

  def close(self) -> None:
    self.indent -= 1
    self.raw("}")

  def text(self) -> str:
    return "\n".join(self.lines + ["}"]) + "\n"


def _header(dot: _Dot, title: str) -> None:
  dot.graph(label=title, labelloc="t", fontname="Helvetica", fontsize="14")
  dot.defaults("node", fontname="Helvetica", fontsize="11")
  dot.defaults("edge", fontname="Helvetica", fontsize="9")


_INPUT = {"shape": "ellipse", "style": "filled", "fillcolor": "#dbe9f6"}
_OUTPUT = {"shape": "ellipse", "style": "filled", "fillcolor": "#fde2c8"}
_BOX = {"shape": "box", "style": "rounded,filled", "fillcolor": "#f4f4f4"}
_LOOSE = {"shape": "box", "style": "rounded,filled", "fillcolor": "#d9f2d9"}


def _ints(values) -> str:
  return ", ".join(str(int(v)) for v in values)


# ----------------------------------------------------------------------------
# The three spaces.


def _ptb_dot(space: ptb.PTBSpace, a: np.ndarray) -> str:
  n = space.num_nodes
  weights = np.asarray(ptb.output_weights(a, n, space.aggregate, static=True))
  outputs = [int(k) for k in np.nonzero(weights)[0]]
  if space.aggregate == "all":
    what = f"mean of nodes 1..{n - 1}"
  else:
    what = f"mean of loose ends {{{_ints(outputs)}}}"
  dot = _Dot("ptb_cell", [
      f"enas_jax.visualize: space=ptb num_nodes={n} aggregate={space.aggregate}",
      f"arc: {base.format_tokens(a)}"])
  _header(dot, f"PTB recurrent cell: {n} nodes, output = {what}")
  dot.graph(rankdir="TB")
  dot.node("x_t", label="x_t", **_INPUT)
  dot.node("h_prev", label="h_{t-1}", **_INPUT)
  loose = set(outputs) if space.aggregate == "loose_ends" else set()
  for i in range(n):
    act = ptb.ACTIVATION_NAMES[int(a[0 if i == 0 else 2 * i])]
    dot.node(f"n{i}", label=f"{i}: {act}", **(_LOOSE if i in loose else _BOX))
  dot.edge("x_t", "n0")
  dot.edge("h_prev", "n0")
  for i in range(1, n):
    dot.edge(f"n{int(a[2 * i - 1])}", f"n{i}")
  dot.node("mean", label="mean", shape="circle", style="filled", fillcolor="#fff5bf")
  for k in outputs:
    dot.edge(f"n{k}", "mean", style="dashed", color="#2e7d32")
  dot.node("h_t", label="h_t", **_OUTPUT)
  dot.edge("mean", "h_t")
  return dot.text()


def macro_reduction_layers(num_layers: int) -> list[int]:
  """Layers followed by a factorized reduction: ``floor(L/3)-1`` and ``2*floor(L/3)-1``
  (none when L < 3; reference ``enas_original.md`` §5.1)."""
  pd = num_layers // 3
  return [l for l in (pd - 1, 2 * pd - 1) if l >= 0]


def _macro_dot(space: cifar_macro.MacroCodec, a: np.ndarray) -> str:
  L = space.num_layers
  reductions = macro_reduction_layers(L)
  dot = _Dot("cifar_macro", [
      f"enas_jax.visualize: space=cifar_macro num_layers={L}",
      f"arc: {base.format_tokens(a)}"])
  where = (f"factorized reductions after layers {_ints(reductions)}" if reductions
           else "no reductions")
  _header(dot, f"CIFAR-10 macro network: {L} layers, {where}; dashed = skip connections")
  dot.graph(rankdir="TB")
  dot.node("image", label="image", **_INPUT)
  dot.node("stem", label="stem\nconv3x3 + BN", **_BOX)
  dot.edge("image", "stem", style="bold", weight="100")
  prev = "stem"
  for l in range(L):
    op, bits = space.layer_tokens(a, l)
    dot.node(f"L{l}", label=f"layer {l}\n{cifar_macro.OP_NAMES[op]}", **_BOX)
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
  dot.node("head", label="global avg pool\ndropout, FC (10 classes)", **_OUTPUT)
  dot.edge(prev, "head", style="bold", weight="100")
  return dot.text()


def _micro_dot(space: cifar_micro.MicroCodec, a: np.ndarray) -> str:
  B = space.num_nodes
  dot = _Dot("cifar_micro", [
      f"enas_jax.visualize: space=cifar_micro num_nodes={B}",
      f"arc: {base.format_tokens(a)}"])
  _header(dot, f"CIFAR-10 micro cells: {B} nodes each; output = concat of loose ends")
  dot.graph(rankdir="TB")
  for c, cname in enumerate(cifar_micro.CELL_NAMES):
    cell = a[c * space.cell_length:(c + 1) * space.cell_length].tolist()
    loose = space.loose_ends(a, c)
    title = f"{cname} cell"
    if cname == "reduction":
      title += " (ops reading c_{k-2} or c_{k-1} have stride 2)"
    dot.open(f"subgraph cluster_{cname}")
    dot.graph(label=title, style="rounded", color="#7f7f7f")
    ids = {0: f"{cname}_in0", 1: f"{cname}_in1"}
    dot.node(ids[0], label="c_{k-2}", **_INPUT)
    dot.node(ids[1], label="c_{k-1}", **_INPUT)
    for k in range(B):
      b = k + 2
      ids[b] = f"{cname}_n{b}"
      dot.node(f"{cname}_add{b}", label="add", shape="circle", style="filled",
               fillcolor="#fff5bf", fontsize="9")
      dot.node(ids[b], label=f"node {b}", **(_LOOSE if b in loose else _BOX))
    for k in range(B):
      b = k + 2
      i1, o1, i2, o2 = cell[4 * k:4 * k + 4]
      for idx, op in ((i1, o1), (i2, o2)):
        dot.edge(ids[idx], f"{cname}_add{b}", label=cifar_micro.OP_NAMES[op])
      dot.edge(f"{cname}_add{b}", ids[b])
    dot.node(f"{cname}_out", label="concat\nc_k", **_OUTPUT)
    for b in loose:
      dot.edge(ids[b], f"{cname}_out", style="dashed", color="#2e7d32")
    dot.close()
  return dot.text()


_BUILDERS = {"ptb": _ptb_dot, "cifar_macro": _macro_dot, "cifar_micro": _micro_dot}


def to_dot(space: base.Codec, arc: Any) -> str:
  """DOT text of ``arc`` in ``space`` (a PTBSpace, MacroCodec or MicroCodec).

  ``arc`` is the arc array (or its string form). Raises ``ValueError`` with
  the codec's message when the arc is malformed for this space.
  """
  name = getattr(space, "name", None)
  if name not in _BUILDERS:
    raise ValueError(
        f"visualize: no diagram for search space {name!r} ({type(space).__name__}); "
        f"supported: {', '.join(SPACE_NAMES)}.")
  if isinstance(arc, ptb.ConvertedArc):
    arc = arc.arc
  a = space.parse(arc) if isinstance(arc, str) else space.validate(arc)
  return _BUILDERS[name](space, np.asarray(a))


# ----------------------------------------------------------------------------
# Rendering.


def graphviz_available() -> bool:
  return shutil.which("dot") is not None


def _write_atomic(path: str, data: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(data)
  os.replace(tmp, path)


def _run_dot(fmt: str, dot_text: str | None = None, src: str | None = None,
             out: str | None = None) -> bytes:
  exe = shutil.which("dot")
  if exe is None:
    raise GraphvizNotFoundError(f"Graphviz is not installed. {_INSTALL_HINT}")
  cmd = [exe, f"-T{fmt}"] + ([src] if src else []) + (["-o", out] if out else [])
  try:
    proc = subprocess.run(cmd, input=None if dot_text is None else dot_text.encode("utf-8"),
                          capture_output=True, timeout=_DOT_TIMEOUT_S, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise RuntimeError(f"Graphviz `dot -T{fmt}` failed: {e}") from e
  if proc.returncode != 0:
    msg = proc.stderr.decode("utf-8", "replace").strip()
    raise RuntimeError(f"Graphviz `dot -T{fmt}` exited with {proc.returncode}: {msg}")
  return proc.stdout


def render(dot_text: str, out_path: str) -> list[str]:
  """Writes ``dot_text`` to ``out_path`` (``.dot``, ``.svg``, ``.png`` or ``.pdf``).

  The DOT source is always written first: to ``out_path`` itself for ``.dot``,
  else next to it (same name, ``.dot`` suffix). Images are made by the Graphviz
  ``dot`` executable; without it this raises :class:`GraphvizNotFoundError`
  (after the ``.dot`` file was written). Returns the paths written.
  """
  root, ext = os.path.splitext(out_path)
  fmt = ext.lower().lstrip(".")
  if fmt != "dot" and fmt not in RENDER_FORMATS:
    raise ValueError(
        f"visualize: cannot write {out_path!r}: the file name must end in .dot, "
        f"{', '.join('.' + f for f in RENDER_FORMATS[:-1])} or .{RENDER_FORMATS[-1]}.")
  directory = os.path.dirname(out_path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  dot_path = out_path if fmt == "dot" else root + ".dot"
  _write_atomic(dot_path, dot_text)
  if fmt == "dot":
    return [dot_path]
  if not graphviz_available():
    raise GraphvizNotFoundError(
        f"Graphviz is not installed, so {out_path} was not rendered; the DOT source "
        f"was written to {dot_path} (render it later with `dot -T{fmt} {dot_path} "
        f"-o {out_path}`). {_INSTALL_HINT}")
  _run_dot(fmt, src=dot_path, out=out_path)
  return [dot_path, out_path]


def write_arc_diagram(space: base.Codec, arc: Any, directory: str,
                      stem: str = "best_arc") -> list[str]:
  """Writes ``<directory>/<stem>.dot`` and, when Graphviz is installed,
  ``<stem>.svg``. A missing or failing Graphviz is logged, never raised.

  Returns the paths written. A malformed arc still raises ``ValueError``.
  """
  text = to_dot(space, arc)
  os.makedirs(directory, exist_ok=True)
  base_path = os.path.join(directory, stem)
  written = render(text, base_path + ".dot")
  if not graphviz_available():
    logger.info("arc diagram: %s written; Graphviz is not installed, so no SVG.", written[0])
    return written
  try:
    written = render(text, base_path + ".svg")
  except (RuntimeError, OSError) as e:
    logger.warning("arc diagram: %s written, SVG rendering failed: %s", written[0], e)
  return written


class ArcDiagram:
  """A notebook-friendly diagram: SVG when Graphviz is installed, else the DOT text."""

  def __init__(self, dot: str):
    self.dot = dot
    self._svg: str | None = None

  @property
  def svg(self) -> str | None:
    """The SVG text, or ``None`` without Graphviz (or when rendering fails)."""
    if self._svg is None and graphviz_available():
      try:
        self._svg = _run_dot("svg", dot_text=self.dot).decode("utf-8")
      except (RuntimeError, OSError) as e:
        logger.warning("arc diagram: SVG rendering failed: %s", e)
    return self._svg

  def _repr_svg_(self) -> str | None:
    return self.svg

  def _repr_markdown_(self) -> str | None:
    if self.svg is not None:
      return None  # the SVG is shown
    return ("Graphviz is not installed, so here is the DOT source "
            "(`apt install graphviz`, `brew install graphviz` or "
            "`conda install -c conda-forge graphviz` to see the diagram):\n\n"
            f"```dot\n{self.dot}```\n")

  def save(self, out_path: str) -> list[str]:
    return render(self.dot, out_path)

  def __str__(self) -> str:
    return self.dot

  def __repr__(self) -> str:
    return self.dot


def show(space: base.Codec, arc: Any) -> ArcDiagram:
  """For notebooks: ``show(space, arc)`` as the last expression of a cell draws it."""
  return ArcDiagram(to_dot(space, arc))


# ----------------------------------------------------------------------------
# Command line.

# name -> {space: (arc text, sizes, default aggregate)}
NAMED_ARCS = {
    "ptb": {
        "paper": (ptb.PAPER_ARC, {"num_nodes": 12}, "loose_ends"),
        "corrected": (str(ptb.from_corrected(ptb.CORRECTED_SHIPPED_ARC)),
                      {"num_nodes": 9}, "all"),
    },
    "cifar_macro": {"paper": (cifar_macro.PAPER_ARC, {"num_layers": 24}, None)},
    "cifar_micro": {"paper": (cifar_micro.PAPER_ARC, {"num_nodes": 5}, None)},
}


def _infer_size(space_name: str, num_tokens: int) -> int:
  """Nodes / layers implied by an arc of ``num_tokens`` tokens."""
  if space_name == "ptb":
    if num_tokens % 2 == 0:
      raise ValueError(
          f"ptb: wrong arc length {num_tokens}; N nodes take 2N-1 tokens (23 for 12 nodes), "
          f"an odd number. An even length looks like the corrected code's format (no "
          f"node-0 token): pass --corrected to read it.")
    return max(2, (num_tokens + 1) // 2)
  if space_name == "cifar_macro":
    L = (math.isqrt(8 * num_tokens + 1) - 1) // 2
    if L < 1 or L * (L + 1) // 2 != num_tokens:
      raise ValueError(
          f"cifar_macro: wrong arc length {num_tokens}; L layers take L + L(L-1)/2 tokens "
          f"(78 for 12 layers, 300 for 24), and {num_tokens} is not such a number.")
    return L
  if num_tokens % 8:
    raise ValueError(
        f"cifar_micro: wrong arc length {num_tokens}; two cells of B nodes take 8 x B "
        f"tokens (40 for 5 nodes), and {num_tokens} is not a multiple of 8.")
  return num_tokens // 8


def build_space(space_name: str, num_tokens: int, num_nodes: int | None = None,
                num_layers: int | None = None, aggregate: str | None = None) -> base.Codec:
  """The codec for ``space_name`` sized for the given (or inferred) size."""
  if space_name == "ptb":
    if num_layers is not None:
      raise ValueError("ptb: --num_layers is for cifar_macro; use --num_nodes.")
    n = num_nodes if num_nodes is not None else _infer_size("ptb", num_tokens)
    return ptb.PTBSpace(num_nodes=n, aggregate=aggregate or "loose_ends")
  if aggregate is not None:
    raise ValueError(f"{space_name}: --aggregate is a ptb setting.")
  if space_name == "cifar_macro":
    if num_nodes is not None:
      raise ValueError("cifar_macro: --num_nodes is for ptb/cifar_micro; use --num_layers.")
    L = num_layers if num_layers is not None else _infer_size(space_name, num_tokens)
    return cifar_macro.MacroCodec(num_layers=L)
  if num_layers is not None:
    raise ValueError("cifar_micro: --num_layers is for cifar_macro; use --num_nodes.")
  B = num_nodes if num_nodes is not None else _infer_size(space_name, num_tokens)
  return cifar_micro.MicroCodec(num_nodes=B)


def resolve(space_name: str, arc_text: str, num_nodes: int | None = None,
            num_layers: int | None = None, aggregate: str | None = None,
            corrected: bool = False):
  """(space, arc array) for the CLI: ``arc_text`` is a name or the arc's string form.

  ``corrected``: a ptb arc in the corrected code's format (``google-research/enas_lm``),
  converted with :func:`enas_jax.spaces.ptb.from_corrected` (aggregate ``"all"``
  unless given).
  """
  named = NAMED_ARCS.get(space_name, {})
  key = arc_text.strip()
  if corrected:
    if space_name != "ptb":
      raise ValueError(f"{space_name}: --corrected is for ptb arcs.")
    if key in named:
      raise ValueError(f"ptb: --corrected reads an arc string; the named arc {key!r} "
                       f"needs no conversion.")
    conv = ptb.from_corrected(arc_text, aggregate=aggregate or "all")
    if num_nodes is not None and num_nodes != conv.num_nodes:
      raise ValueError(f"ptb(corrected): the arc has {conv.num_nodes} nodes (node 0 "
                       f"included), not --num_nodes={num_nodes}.")
    if num_layers is not None:
      raise ValueError("ptb: --num_layers is for cifar_macro; use --num_nodes.")
    return conv.space(), conv.arc
  if key in named:
    arc_text, sizes, default_agg = named[key]
    given = {"num_nodes": num_nodes, "num_layers": num_layers}
    for k, v in given.items():
      if v is not None and sizes.get(k) != v:
        raise ValueError(
            f"{space_name}: the {key!r} arc has {k}={sizes.get(k)}; drop --{k}={v}.")
    num_nodes, num_layers = sizes.get("num_nodes"), sizes.get("num_layers")
    if space_name == "ptb" and aggregate is None:
      aggregate = default_agg
  tokens = base.parse_tokens(arc_text, space_name)
  space = build_space(space_name, len(tokens), num_nodes=num_nodes, num_layers=num_layers,
                      aggregate=aggregate)
  return space, space.parse(arc_text)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m enas_jax.visualize",
      description="Draws an ENAS arc as a Graphviz diagram (.dot, or .svg/.png/.pdf "
                  "with Graphviz installed).")
  p.add_argument("--space", required=True, choices=SPACE_NAMES)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--arc", help="the arc's tokens (quoted), or a name: 'paper' "
                                 "(every space), 'corrected' (ptb)")
  src.add_argument("--arc_file", help="a file holding one arc (e.g. a search's best_arc.txt)")
  p.add_argument("--out", help="output file: .dot, .svg, .png or .pdf (default: print DOT)")
  p.add_argument("--num_nodes", type=int, help="ptb / cifar_micro nodes (default: from the arc)")
  p.add_argument("--num_layers", type=int, help="cifar_macro layers (default: from the arc)")
  p.add_argument("--aggregate", choices=ptb.AGGREGATES,
                 help="ptb cell output (default loose_ends; 'all' for the corrected arc "
                      "and --corrected)")
  p.add_argument("--corrected", action="store_true",
                 help="ptb: the arc is in the corrected code's format (google-research/"
                      "enas_lm: no node-0 token, activations 0 tanh 1 ReLU 2 sigmoid "
                      "3 identity)")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.arc_file is not None:
      path = os.path.expanduser(args.arc_file)
      if not os.path.isfile(path):
        raise ValueError(f"--arc_file {path!r} does not exist.")
      with open(path, encoding="utf-8") as f:
        arc_text = f.read()
    else:
      arc_text = args.arc
    space, arc = resolve(args.space, arc_text, num_nodes=args.num_nodes,
                         num_layers=args.num_layers, aggregate=args.aggregate,
                         corrected=args.corrected)
    text = to_dot(space, arc)
    if not args.out:
      sys.stdout.write(text)
      return 0
    written = render(text, args.out)
  except RuntimeError as e:  # GraphvizNotFoundError included; the .dot file was written
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("wrote " + ", ".join(written))
  return 0


if __name__ == "__main__":
  sys.exit(main())
