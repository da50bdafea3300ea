"""Building blocks of the arc diagrams (Graphviz DOT text) each space draws.

Each space's entry points at its own ``draw(codec, arc) -> str`` (next to its
codec), built from these; :mod:`enas_jax.visualize` renders and writes them.
The output is deterministic: lines appear in the order they are added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def q(text: Any) -> str:
  """A DOT double-quoted string; a newline in ``text`` becomes a line break."""
  s = str(text)
  s = s.replace("\\", "\\\\").replace('"', '\\"')
  s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
  return f'"{s}"'


def attrs_text(attrs: dict) -> str:
  if not attrs:
    return ""
  return " [" + ", ".join(f"{k}={q(v)}" for k, v in attrs.items()) + "]"


class Dot:
  """Collects DOT lines in the order they are added (so output is deterministic)."""

  def __init__(self, name: str, comments: Sequence[str] = ()):
    self.lines = [f"// {c}" for c in comments]
    self.lines.append(f"digraph {name} {{")
    self.indent = 1

  def raw(self, line: str) -> None:
    self.lines.append("  " * self.indent + line)

  def graph(self, **attrs) -> None:
    for k, v in attrs.items():
      self.raw(f"{k}={q(v)};")

  def defaults(self, kind: str, **attrs) -> None:
    self.raw(f"{kind}{attrs_text(attrs)};")

  def node(self, node_id: str, **attrs) -> None:
    self.raw(f"{node_id}{attrs_text(attrs)};")

  def edge(self, src: str, dst: str, **attrs) -> None:
    self.raw(f"{src} -> {dst}{attrs_text(attrs)};")

  def open(self, header: str) -> None:
    self.raw(header + " {")
    self.indent += 1

  def close(self) -> None:
    self.indent -= 1
    self.raw("}")

  def text(self) -> str:
    return "\n".join(self.lines + ["}"]) + "\n"


def header(dot: Dot, title: str) -> None:
  dot.graph(label=title, labelloc="t", fontname="Helvetica", fontsize="14")
  dot.defaults("node", fontname="Helvetica", fontsize="11")
  dot.defaults("edge", fontname="Helvetica", fontsize="9")


INPUT = {"shape": "ellipse", "style": "filled", "fillcolor": "#dbe9f6"}
OUTPUT = {"shape": "ellipse", "style": "filled", "fillcolor": "#fde2c8"}
BOX = {"shape": "box", "style": "rounded,filled", "fillcolor": "#f4f4f4"}
LOOSE = {"shape": "box", "style": "rounded,filled", "fillcolor": "#d9f2d9"}


def ints(values) -> str:
  return ", ".join(str(int(v)) for v in values)
