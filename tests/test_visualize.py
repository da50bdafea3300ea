"""Tests of the arc diagrams (enas_jax/visualize.py).

Facts checked against /work/shared/reference/enas_original.md: §2.2 (the PTB
paper cell and its loose ends {3, 4, 7, 9, 10, 11}), §5.1 and §7.2 (macro skip
bits: bit 0 = stem, bit i = layer i-1; reductions after layers 7 and 15 for 24
layers, 3 and 7 for 12), §7.3 (the paper's micro cells, their loose ends).
None of these tests needs Graphviz; the rendering ones skip without it.
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from enas_jax import visualize as viz
from enas_jax.spaces import cifar_macro, cifar_micro, ptb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAVE_DOT, reason="Graphviz `dot` is not installed")

_EDGE = re.compile(r'^\s*(\w+) -> (\w+)(?: \[(.*)\])?;$')
_NODE = re.compile(r'^\s*(\w+) \[label="((?:[^"\\]|\\.)*)"')


def _edges(dot):
  """(src, dst, attribute text) of every edge, in order."""
  return [m.groups("") for m in map(_EDGE.match, dot.splitlines()) if m]


def _labels(dot):
  """node id -> label of every node statement."""
  out = {}
  for line in dot.splitlines():
    m = _NODE.match(line)
    if m and "->" not in line:
      out[m.group(1)] = m.group(2)
  return out


def _label_of(attrs):
  m = re.search(r'label="([^"]*)"', attrs)
  return m.group(1) if m else None


def _no_graphviz(monkeypatch):
  monkeypatch.setattr(shutil, "which", lambda *a, **k: None)


def _check_syntax(dot):
  """Light structural check: balanced braces, every statement terminated."""
  assert dot.count("{") - dot.count("\\{") >= 1
  depth = 0
  for line in dot.splitlines():
    s = line.strip()
    if not s or s.startswith("//"):
      continue
    if s.endswith("{"):
      depth += 1
    elif s == "}":
      depth -= 1
    else:
      assert s.endswith(";"), line
    assert depth >= 0
  assert depth == 0


# ----------------------------------------------------------------------------
# PTB.


def test_ptb_paper_cell():
  space = ptb.PTBSpace(num_nodes=12)
  dot = viz.to_dot(space, space.parse(ptb.PAPER_ARC))
  _check_syntax(dot)
  labels = _labels(dot)
  acts = ["tanh", "tanh", "relu", "relu", "tanh", "tanh", "relu", "tanh", "relu", "relu",
          "relu", "relu"]
  for i, act in enumerate(acts):
    assert labels[f"n{i}"] == f"{i}: {act}"
  assert labels["x_t"] == "x_t" and labels["h_prev"] == "h_{t-1}"
  edges = {(s, d) for s, d, _ in _edges(dot)}
  prevs = {1: 0, 2: 1, 3: 2, 4: 2, 5: 2, 6: 5, 7: 1, 8: 6, 9: 8, 10: 8, 11: 8}
  assert {("x_t", "n0"), ("h_prev", "n0")} <= edges
  for i, p in prevs.items():
    assert (f"n{p}", f"n{i}") in edges
  into_mean = sorted(int(s[1:]) for s, d, _ in _edges(dot) if d == "mean")
  assert into_mean == [3, 4, 7, 9, 10, 11]
  assert ("mean", "h_t") in edges
  assert "loose ends {3, 4, 7, 9, 10, 11}" in dot


def test_ptb_aggregate_all_reads_nodes_1_to_n_minus_1():
  space = ptb.PTBSpace(num_nodes=12, aggregate="all")
  dot = viz.to_dot(space, ptb.PAPER_ARC)  # the string form is accepted too
  into_mean = [int(s[1:]) for s, d, _ in _edges(dot) if d == "mean"]
  assert into_mean == list(range(1, 12))
  assert "mean of nodes 1..11" in dot


def test_ptb_corrected_named_arc():
  space, arc = viz.resolve("ptb", "corrected")
  assert (space.num_nodes, space.aggregate) == (9, "all")
  conv = ptb.from_corrected(ptb.CORRECTED_SHIPPED_ARC)
  np.testing.assert_array_equal(arc, conv.arc)
  assert viz.to_dot(space, arc) == viz.to_dot(conv.space(), conv)
  # --aggregate overrides a named arc's default.
  space2, _ = viz.resolve("ptb", "corrected", aggregate="loose_ends")
  assert space2.aggregate == "loose_ends"


# ----------------------------------------------------------------------------
# Macro.

PAPER_MACRO_OPS = [0, 3, 0, 2, 2, 3, 2, 2, 1, 0, 2, 0, 2, 1, 0, 2, 2, 2, 3, 3, 0, 3, 0, 0]


def test_macro_reduction_layers():
  assert viz.macro_reduction_layers(24) == [7, 15]
  assert viz.macro_reduction_layers(12) == [3, 7]
  assert viz.macro_reduction_layers(3) == [0, 1]
  assert viz.macro_reduction_layers(2) == []


def test_macro_paper_network():
  space = cifar_macro.MacroCodec(num_layers=24)
  dot = viz.to_dot(space, space.parse(cifar_macro.PAPER_ARC))
  _check_syntax(dot)
  labels = _labels(dot)
  for l, op in enumerate(PAPER_MACRO_OPS):
    assert labels[f"L{l}"] == f"layer {l}\\n{cifar_macro.OP_NAMES[op]}"
  edges = _edges(dot)
  chain = [(s, d) for s, d, a in edges if 'style="bold"' in a]
  expect = [("image", "stem"), ("stem", "L0")]
  for l in range(1, 24):
    if l - 1 in (7, 15):
      expect += [(f"L{l - 1}", f"reduce_{l - 1}"), (f"reduce_{l - 1}", f"L{l}")]
    else:
      expect.append((f"L{l - 1}", f"L{l}"))
  expect.append(("L23", "head"))
  assert chain == expect
  assert "reduce_7" in labels and "reduce_15" in labels
  assert sum(1 for k in labels if k.startswith("reduce_")) == 2

  def skips(l):
    return {s for s, d, a in edges if d == f"L{l}" and 'style="dashed"' in a}

  # Reference §7.2's decoded examples (bit 0 = stem, bit i = layer i-1).
  assert skips(2) == {"stem"}
  assert skips(5) == {"stem", "L0", "L2"}
  assert skips(7) == {"L0", "L1", "L3", "L4", "L5"}
  assert skips(23) == {"stem", "L0", "L4", "L5", "L6", "L8", "L12", "L14", "L17", "L18"}
  assert skips(0) == set() and skips(1) == set()
  a = space.parse(cifar_macro.PAPER_ARC)
  n_bits = sum(int(space.layer_tokens(a, l)[1].sum()) for l in range(24))
  assert sum(1 for *_, at in edges if 'style="dashed"' in at) == n_bits


def test_macro_12_layers_reductions_after_3_and_7():
  space = cifar_macro.MacroCodec(num_layers=12)
  arc = np.zeros(space.arc_length, np.int32)
  dot = viz.to_dot(space, arc)
  pairs = {(s, d) for s, d, _ in _edges(dot)}
  assert {("L3", "reduce_3"), ("reduce_3", "L4"), ("L7", "reduce_7"), ("reduce_7", "L8"),
          ("L11", "head")} <= pairs
  assert not any(d.startswith("L") and "dashed" in at for _, d, at in _edges(dot))


# ----------------------------------------------------------------------------
# Micro.


def _micro_paper_dot():
  space = cifar_micro.MicroCodec(num_nodes=5)
  return viz.to_dot(space, space.parse(cifar_micro.PAPER_ARC))


def _node_inputs(dot, cell, b):
  return sorted((s, _label_of(a)) for s, d, a in _edges(dot) if d == f"{cell}_add{b}")


def test_micro_paper_normal_cell():
  dot = _micro_paper_dot()
  _check_syntax(dot)
  assert "subgraph cluster_normal {" in dot and "subgraph cluster_reduction {" in dot
  labels = _labels(dot)
  assert labels["normal_in0"] == "c_{k-2}" and labels["normal_in1"] == "c_{k-1}"
  assert labels["normal_add2"] == "add"
  # Reference §7.3: node 2 = avg(0) + sep3(0), ..., node 6 = avg(0) + sep5(1).
  expect = {
      2: [("normal_in0", "avgpool"), ("normal_in0", "sep3x3")],
      3: [("normal_in0", "identity"), ("normal_in0", "sep5x5")],
      4: [("normal_in0", "identity"), ("normal_in1", "sep5x5")],
      5: [("normal_in0", "sep5x5"), ("normal_in1", "sep3x3")],
      6: [("normal_in0", "avgpool"), ("normal_in1", "sep5x5")],
  }
  pairs = {(s, d) for s, d, _ in _edges(dot)}
  for b, inputs in expect.items():
    assert _node_inputs(dot, "normal", b) == inputs
    assert (f"normal_add{b}", f"normal_n{b}") in pairs
  into_concat = [s for s, d, _ in _edges(dot) if d == "normal_out"]
  assert into_concat == [f"normal_n{b}" for b in range(2, 7)]


def test_micro_paper_reduction_cell():
  dot = _micro_paper_dot()
  expect = {
      2: [("reduction_in1", "sep3x3"), ("reduction_in1", "sep3x3")],
      3: [("reduction_in0", "avgpool"), ("reduction_in0", "maxpool")],
      4: [("reduction_in1", "sep5x5"), ("reduction_n3", "sep5x5")],
      5: [("reduction_in0", "identity"), ("reduction_in1", "sep3x3")],
      6: [("reduction_in0", "maxpool"), ("reduction_in1", "sep5x5")],
  }
  for b, inputs in expect.items():
    assert _node_inputs(dot, "reduction", b) == inputs
  into_concat = [s for s, d, _ in _edges(dot) if d == "reduction_out"]
  assert into_concat == ["reduction_n2", "reduction_n4", "reduction_n5", "reduction_n6"]
  # Node ids never collide between the two clusters.
  normal_ids = {k for k in _labels(dot) if k.startswith("normal_")}
  reduction_ids = {k for k in _labels(dot) if k.startswith("reduction_")}
  assert len(normal_ids) == len(reduction_ids) == 2 + 2 * 5 + 1


# ----------------------------------------------------------------------------
# Common behaviour.


@pytest.mark.parametrize("space,arc", [
    (ptb.PTBSpace(num_nodes=12), ptb.PAPER_ARC),
    (cifar_macro.MacroCodec(num_layers=24), cifar_macro.PAPER_ARC),
    (cifar_micro.MicroCodec(num_nodes=5), cifar_micro.PAPER_ARC),
])
def test_deterministic_and_input_forms_agree(space, arc):
  a = space.parse(arc)
  dot = viz.to_dot(space, a)
  assert viz.to_dot(space, a) == dot
  assert viz.to_dot(space, arc) == dot
  assert viz.to_dot(space, a.tolist()) == dot
  assert viz.to_dot(space, np.asarray(a, np.int64)) == dot
  assert dot.startswith(f"// enas_jax.visualize: space={space.name}")
  assert f"// arc: {space.format(a)}\n" in dot
  _check_syntax(dot)


def test_malformed_arc_raises_codec_message():
  space = ptb.PTBSpace(num_nodes=3)
  with pytest.raises(ValueError, match=r"token 3 \(node 2's previous node\) is 2"):
    viz.to_dot(space, [0, 0, 0, 2, 0])
  with pytest.raises(ValueError, match="wrong arc length"):
    viz.to_dot(cifar_micro.MicroCodec(2), [0] * 8)


def test_unknown_space_is_rejected():
  class Other:
    name = "imagenet"

  with pytest.raises(ValueError, match="no diagram for search space 'imagenet'"):
    viz.to_dot(Other(), [0])


def test_quoting_escapes_labels():
  assert viz._q('a "b" \\c\nd') == '"a \\"b\\" \\\\c\\nd"'
  assert viz._q("c_{k-2}") == '"c_{k-2}"'


# ----------------------------------------------------------------------------
# Files, rendering, notebooks.


def test_render_dot_needs_no_graphviz(tmp_path, monkeypatch):
  _no_graphviz(monkeypatch)
  out = tmp_path / "sub" / "cell.dot"
  assert viz.render("digraph g {\n}\n", str(out)) == [str(out)]
  assert out.read_text() == "digraph g {\n}\n"


def test_render_svg_without_graphviz_says_how_to_install(tmp_path, monkeypatch):
  _no_graphviz(monkeypatch)
  with pytest.raises(viz.GraphvizNotFoundError) as e:
    viz.render("digraph g {\n}\n", str(tmp_path / "cell.svg"))
  msg = str(e.value)
  assert "Graphviz is not installed" in msg
  assert "apt install graphviz" in msg and "brew install graphviz" in msg and "conda" in msg
  assert str(tmp_path / "cell.dot") in msg
  assert (tmp_path / "cell.dot").exists() and not (tmp_path / "cell.svg").exists()


def test_render_rejects_unknown_extension(tmp_path):
  with pytest.raises(ValueError, match=r"must end in \.dot"):
    viz.render("digraph g {\n}\n", str(tmp_path / "cell.txt"))


def test_write_arc_diagram_without_graphviz(tmp_path, monkeypatch):
  _no_graphviz(monkeypatch)
  space = cifar_micro.MicroCodec()
  written = viz.write_arc_diagram(space, space.parse(cifar_micro.PAPER_ARC), str(tmp_path / "run"))
  assert written == [str(tmp_path / "run" / "best_arc.dot")]
  assert (tmp_path / "run" / "best_arc.dot").read_text() == _micro_paper_dot()
  assert sorted(os.listdir(tmp_path / "run")) == ["best_arc.dot"]


def test_show_without_graphviz_gives_dot_text(monkeypatch):
  _no_graphviz(monkeypatch)
  space = ptb.PTBSpace(num_nodes=12)
  d = viz.show(space, space.parse(ptb.PAPER_ARC))
  assert d._repr_svg_() is None
  md = d._repr_markdown_()
  assert "Graphviz is not installed" in md and "```dot\n// enas_jax.visualize" in md
  assert repr(d) == str(d) == d.dot == viz.to_dot(space, ptb.PAPER_ARC)


@needs_dot
def test_render_svg_and_png_with_graphviz(tmp_path):
  for space, arc in [(ptb.PTBSpace(num_nodes=12), ptb.PAPER_ARC),
                     (cifar_macro.MacroCodec(num_layers=24), cifar_macro.PAPER_ARC),
                     (cifar_micro.MicroCodec(), cifar_micro.PAPER_ARC)]:
    out = tmp_path / f"{space.name}.svg"
    assert viz.render(viz.to_dot(space, arc), str(out)) == [str(tmp_path / f"{space.name}.dot"),
                                                             str(out)]
    assert "<svg" in out.read_text()
  png = tmp_path / "micro.png"
  viz.render(_micro_paper_dot(), str(png))
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_dot
def test_write_arc_diagram_and_show_with_graphviz(tmp_path):
  space = ptb.PTBSpace(num_nodes=12)
  arc = space.parse(ptb.PAPER_ARC)
  written = viz.write_arc_diagram(space, arc, str(tmp_path), stem="cell")
  assert written == [str(tmp_path / "cell.dot"), str(tmp_path / "cell.svg")]
  d = viz.show(space, arc)
  assert "<svg" in d._repr_svg_() and d._repr_markdown_() is None


def test_docs_micro_diagram_is_current():
  """docs/paper_micro_cells.dot is regenerated with
  ``python -m enas_jax.visualize --space=cifar_micro --arc=paper --out=docs/paper_micro_cells.svg``."""
  path = os.path.join(ROOT, "docs", "paper_micro_cells.dot")
  with open(path, encoding="utf-8") as f:
    assert f.read() == _micro_paper_dot()


# ----------------------------------------------------------------------------
# Command line.


def _cli(capsys, *args):
  rc = viz.main(list(args))
  out, err = capsys.readouterr()
  return rc, out, err


@pytest.mark.parametrize("space,arc,size", [
    ("ptb", ptb.PAPER_ARC, "num_nodes=12"),
    ("ptb", "0 0 1 1 2", "num_nodes=3"),
    ("cifar_macro", cifar_macro.PAPER_ARC, "num_layers=24"),
    ("cifar_macro", " ".join(["0"] * 78), "num_layers=12"),
    ("cifar_micro", cifar_micro.PAPER_ARC, "num_nodes=5"),
    ("cifar_micro", "0 0 1 1 0 2 1 3 1 4 0 0 2 1 2 2", "num_nodes=2"),
])
def test_cli_infers_sizes(capsys, tmp_path, space, arc, size):
  out = tmp_path / "arc.dot"
  rc, stdout, err = _cli(capsys, f"--space={space}", f"--arc={arc}", f"--out={out}")
  assert rc == 0, err
  assert f"space={space} {size}" in out.read_text().splitlines()[0]
  assert str(out) in stdout


@pytest.mark.parametrize("space,name,first_line", [
    ("ptb", "paper", "space=ptb num_nodes=12 aggregate=loose_ends"),
    ("ptb", "corrected", "space=ptb num_nodes=9 aggregate=all"),
    ("cifar_macro", "paper", "space=cifar_macro num_layers=24"),
    ("cifar_micro", "paper", "space=cifar_micro num_nodes=5"),
])
def test_cli_named_arcs_print_dot(capsys, space, name, first_line):
  rc, out, err = _cli(capsys, f"--space={space}", f"--arc={name}")
  assert rc == 0, err
  assert out.splitlines()[0] == f"// enas_jax.visualize: {first_line}"


def test_cli_arc_file_and_corrected_format(capsys, tmp_path):
  f = tmp_path / "best_arc.txt"
  f.write_text(cifar_micro.PAPER_ARC + "\n")
  rc, out, _ = _cli(capsys, "--space=cifar_micro", f"--arc_file={f}")
  assert rc == 0 and out == _micro_paper_dot()
  rc, out, _ = _cli(capsys, "--space=ptb", "--corrected", f"--arc={ptb.CORRECTED_SHIPPED_ARC}")
  assert rc == 0
  rc2, out2, _ = _cli(capsys, "--space=ptb", "--arc=corrected")
  assert rc2 == 0 and out == out2


@pytest.mark.parametrize("args,message", [
    (["--space=ptb", "--arc=0 0 0 1 5"], "ptb: token 4 (node 2's activation) is 5"),
    (["--space=ptb", "--arc=0 2 1 0"], "pass --corrected"),
    (["--space=ptb", "--arc=0 x 1"], "ptb: token 1 is 'x'"),
    (["--space=ptb", "--arc=0 0 1", "--num_nodes=4"], "ptb: wrong arc length 3"),
    (["--space=cifar_macro", "--arc=0 1 0 1"], "cifar_macro: wrong arc length 4"),
    (["--space=cifar_macro", "--arc=0 7 0"], "cifar_macro: token 1 (layer 1's op) is 7"),
    (["--space=cifar_macro", "--arc=0 1 2"], "cifar_macro: token 2 (layer 1's skip bit 0) is 2"),
    (["--space=cifar_micro", "--arc=0 0 0 0 0 0 0"], "cifar_micro: wrong arc length 7"),
    (["--space=cifar_micro", "--arc=0 0 0 0 2 0 0 0"], "cifar_micro: token 4 (reduction cell"),
    (["--space=cifar_micro", "--arc=paper", "--num_nodes=4"], "drop --num_nodes=4"),
    (["--space=cifar_micro", "--arc=paper", "--aggregate=all"], "--aggregate is a ptb setting"),
    (["--space=ptb", "--arc_file=/no/such/arc.txt"], "does not exist"),
    (["--space=ptb", "--arc=paper", "--out=cell.txt"], "must end in .dot"),
])
def test_cli_bad_input_exits_2_with_message(capsys, args, message):
  rc, out, err = _cli(capsys, *args)
  assert rc == 2
  assert message in err and err.startswith("error: ")
  assert "Traceback" not in err and out == ""


def test_cli_svg_without_graphviz_exits_1_after_writing_dot(capsys, tmp_path, monkeypatch):
  _no_graphviz(monkeypatch)
  rc, _, err = _cli(capsys, "--space=ptb", "--arc=paper", f"--out={tmp_path / 'cell.svg'}")
  assert rc == 1 and "Graphviz is not installed" in err
  assert (tmp_path / "cell.dot").exists()


def test_cli_as_module_no_traceback():
  proc = subprocess.run(
      [sys.executable, "-m", "enas_jax.visualize", "--space=cifar_micro", "--arc=0 0 0 0 2 0 0 0"],
      capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
  assert proc.returncode == 2
  assert "error: cifar_micro: token 4" in proc.stderr and "Traceback" not in proc.stderr
