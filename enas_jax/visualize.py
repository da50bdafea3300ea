"""Arc diagrams (Graphviz DOT) for the registered search spaces.

* :func:`to_dot` turns an arc of a space into DOT text (deterministic: the same
  arc and space settings always give the same string).
* :func:`render` writes DOT text to ``.dot`` (no dependency) or, through the
  Graphviz ``dot`` executable, to ``.svg`` / ``.png`` / ``.pdf``.
* :func:`write_arc_diagram` writes ``<stem>.dot`` (and ``<stem>.svg`` when
  Graphviz is installed) into a directory and never fails for a missing
  Graphviz; the search loop calls it after derive.
* :func:`show` returns a small object that notebooks display as SVG (Graphviz
  installed) or as the DOT text.

What is drawn (each space's entry ``draw``, next to its codec in ``enas_jax.spaces``):

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
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from enas_jax import spaces
from enas_jax.spaces import base, diagram, ptb
from enas_jax.spaces.cifar_macro import macro_reduction_layers  # noqa: F401 (re-export)

logger = logging.getLogger(__name__)

RENDER_FORMATS = ("svg", "png", "pdf")
_DOT_TIMEOUT_S = 120

_INSTALL_HINT = (
    "Install Graphviz (it provides the `dot` executable): "
    "`sudo apt install graphviz` (Debian/Ubuntu), `brew install graphviz` (macOS) "
    "or `conda install -c conda-forge graphviz`.")


class GraphvizNotFoundError(RuntimeError):
  """The Graphviz ``dot`` executable is not on ``PATH``."""


_q = diagram.q  # DOT quoting (the spaces' drawings are built with enas_jax.spaces.diagram)


def to_dot(space: base.Codec, arc: Any) -> str:
  """DOT text of ``arc`` in ``space`` (a registered space's codec; its entry's ``draw``).

  ``arc`` is the arc array (or its string form). Raises ``ValueError`` with
  the codec's message when the arc is malformed for this space.
  """
  name = getattr(space, "name", None)
  if name not in spaces.names():
    raise ValueError(
        f"visualize: no diagram for search space {name!r} ({type(space).__name__}); "
        f"supported: {', '.join(spaces.names())}.")
  if isinstance(arc, ptb.ConvertedArc):
    arc = arc.arc
  a = space.parse(arc) if isinstance(arc, str) else space.validate(arc)
  return spaces.entry(name).draw(space, np.asarray(a))


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

def _size_fields() -> list[str]:
  """Every registered space's size fields (``--num_nodes``, ``--num_layers``, ...)."""
  return sorted(set().union(*(e.size_fields for e in spaces.entries())))


def build_space(space_name: str, num_tokens: int, aggregate: str | None = None,
                **sizes) -> base.Codec:
  """The codec of ``space_name`` sized by ``sizes`` (its entry's size fields, e.g.
  ``num_nodes=5``), or by the arc length ``num_tokens`` when none is given."""
  entry = spaces.entry(space_name)
  sizes = {k: v for k, v in sizes.items() if v is not None}
  for k in sizes:
    if k not in entry.size_fields:
      raise ValueError(f"{space_name}: --{k} is not a size of this space; its sizes: "
                       f"{', '.join('--' + f for f in entry.size_fields) or 'none'}.")
  if not sizes:
    sizes = entry.sizes_for_length(num_tokens)
  kwargs = dict(sizes)
  if aggregate is not None:
    if entry.codec is not ptb.PTBSpace:
      raise ValueError(f"{space_name}: --aggregate is a {ptb.PTBSpace.name} setting.")
    kwargs["aggregate"] = aggregate
  return entry.codec(**kwargs)


def resolve(space_name: str, arc_text: str, num_nodes: int | None = None,
            num_layers: int | None = None, aggregate: str | None = None,
            corrected: bool = False, **sizes):
  """(space, arc array) for the CLI: ``arc_text`` is a name of the space's named
  arcs or the arc's string form; sizes not given come from the name or the length.

  ``corrected``: a ptb arc in the corrected code's format (``google-research/enas_lm``),
  converted with :func:`enas_jax.spaces.ptb.from_corrected` (aggregate ``"all"``
  unless given).
  """
  entry = spaces.entry(space_name)
  sizes = {k: v for k, v in dict(sizes, num_nodes=num_nodes, num_layers=num_layers).items()
           if v is not None}
  key = arc_text.strip()
  if corrected:
    if entry.codec is not ptb.PTBSpace:
      raise ValueError(f"{space_name}: --corrected is for {ptb.PTBSpace.name} arcs.")
    if key in entry.named_arcs:
      raise ValueError(f"ptb: --corrected reads an arc string; the named arc {key!r} "
                       f"needs no conversion.")
    conv = ptb.from_corrected(arc_text, aggregate=aggregate or "all")
    if "num_nodes" in sizes and sizes["num_nodes"] != conv.num_nodes:
      raise ValueError(f"ptb(corrected): the arc has {conv.num_nodes} nodes (node 0 "
                       f"included), not --num_nodes={sizes['num_nodes']}.")
    if set(sizes) - {"num_nodes"}:
      raise ValueError("ptb: --num_layers is for cifar_macro; use --num_nodes.")
    return conv.space(), conv.arc
  if key in entry.named_arcs:
    named = entry.named_arcs[key]
    for k, v in sizes.items():
      if named.space.get(k) != v:
        raise ValueError(
            f"{space_name}: the {key!r} arc has {k}={named.space.get(k)}; drop --{k}={v}.")
    arc_text = named.text
    sizes = {k: named.space[k] for k in entry.size_fields if k in named.space}
    if aggregate is None and "aggregate" in named.space:
      aggregate = named.space["aggregate"]
  tokens = base.parse_tokens(arc_text, space_name)
  space = build_space(space_name, len(tokens), aggregate=aggregate, **sizes)
  return space, space.parse(arc_text)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m enas_jax.visualize",
      description="Draws an ENAS arc as a Graphviz diagram (.dot, or .svg/.png/.pdf "
                  "with Graphviz installed).")
  p.add_argument("--space", required=True, choices=spaces.names())
  src = p.add_mutually_exclusive_group(required=True)
  names = "; ".join(f"{e.name}: {', '.join(e.named_arcs)}" for e in spaces.entries())
  src.add_argument("--arc", help=f"the arc's tokens (quoted), or a name ({names})")
  src.add_argument("--arc_file", help="a file holding one arc (e.g. a search's best_arc.txt)")
  p.add_argument("--out", help="output file: .dot, .svg, .png or .pdf (default: print DOT)")
  for f in _size_fields():
    which = " / ".join(e.name for e in spaces.entries() if f in e.size_fields)
    p.add_argument(f"--{f}", type=int, help=f"{which}: {f} (default: from the arc)")
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
    sizes = {f: getattr(args, f) for f in _size_fields()}
    space, arc = resolve(args.space, arc_text, aggregate=args.aggregate,
                         corrected=args.corrected, **sizes)
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
