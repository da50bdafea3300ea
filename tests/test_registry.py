"""The search-space registry: every entry is complete and consistent, and the
library outside ``enas_jax.spaces`` asks the entries, never a space's name."""

import ast
import importlib
import pathlib

import jax
import numpy as np
import pytest

from enas_jax import spaces, visualize
from enas_jax.spaces import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "enas_jax"
# Where a space's name may be written: the spaces themselves, and the data
# package, whose "ptb" is the Penn Treebank data set (data.source) and its folder.
ALLOWED = (PACKAGE / "spaces", PACKAGE / "data")
ENTRIES = spaces.entries()


def _name_literals(source: str, names) -> list[tuple[int, str]]:
  """(line, text) of every string constant equal to one of ``names``."""
  return [(node.lineno, node.value) for node in ast.walk(ast.parse(source))
          if isinstance(node, ast.Constant) and node.value in names]


def test_no_space_name_literal_outside_spaces():
  names = set(spaces.names())
  assert {"ptb", "cifar_macro", "cifar_micro"} <= names
  # The check finds a literal where one is (and ignores docstrings and f-strings' text).
  assert _name_literals('x = "cifar_micro"\n"""ptb docs"""\ny = f"{x} ptb"\n', names) == [
      (1, "cifar_micro")]
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    if any(path.is_relative_to(a) for a in ALLOWED):
      continue
    found += [f"{path.relative_to(ROOT)}:{line}: {text!r}"
              for line, text in _name_literals(path.read_text(), names)]
  assert not found, ("space names written outside enas_jax/spaces (ask "
                     "spaces.entry(config.space.name) instead):\n" + "\n".join(found))


def test_unknown_space_lists_the_available_ones():
  with pytest.raises(ValueError, match=r"unknown search space 'nope'; available: \[") as e:
    spaces.entry("nope")
  assert all(n in str(e.value) for n in spaces.names())
  with pytest.raises(ValueError, match="available"):
    spaces.get("nope")


def test_entry_fields_are_checked():
  e = spaces.entry("cifar_micro")
  with pytest.raises(ValueError, match="task must be one of"):
    registry.SpaceEntry(**{**vars(e), "task": "speech"})
  with pytest.raises(ValueError, match="dataset must be one of"):
    registry.SpaceEntry(**{**vars(e), "dataset": "audio"})
  with pytest.raises(ValueError, match="image space needs child"):
    registry.SpaceEntry(**{**vars(e), "child": None})
  with pytest.raises(ValueError, match="registered twice"):
    registry.register(registry.SpaceEntry(**vars(e)))


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_named_arcs_parse_round_trip_and_imply_their_sizes(entry):
  assert entry.named_arcs
  for name, named in entry.named_arcs.items():
    assert set(entry.size_fields) <= set(named.space), (name, named.space)
    space = entry.codec(**named.space)
    assert space.name == entry.name
    arc = space.parse(named.text)
    assert space.format(arc) == " ".join(named.text.split())
    assert space.parse(space.format(arc)).tolist() == arc.tolist()
    # A bare arc of that length implies the named arc's sizes.
    assert entry.sizes_for_length(len(arc)) == {f: named.space[f] for f in entry.size_fields}


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_sizes_for_a_bad_length_say_the_rule(entry):
  lengths = [n for n in range(1, 64) if _raises(entry.sizes_for_length, n)]
  assert lengths, f"{entry.name}: every length from 1 to 63 is accepted"
  with pytest.raises(ValueError, match=f"{entry.name}: wrong arc length {lengths[0]}"):
    entry.sizes_for_length(lengths[0])


def _raises(f, *args) -> bool:
  try:
    f(*args)
  except ValueError:
    return True
  return False


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_build_from_each_config(entry):
  """Every variant of ``configs/<space>.py`` builds its space, with the arc length
  its size fields give; a final variant's named arc resolves with its sizes."""
  mod = importlib.import_module(f"configs.{entry.name}")
  for variant in mod.VARIANTS:
    config = mod.get_config(variant)
    assert config.space.name == entry.name
    space = spaces.build(config)
    assert space.name == entry.name
    assert len(space.sample_uniform(jax.random.key(0))) == space.arc_length
    assert entry.sizes_for_length(space.arc_length) == {
        f: int(config.space[f]) for f in entry.size_fields}, variant
    if config.mode == "final" and config.arc in entry.named_arcs:
      from enas_jax.train.run import named_arc_config, resolve_arc
      fspace, arc = resolve_arc(config, space)
      assert len(arc) == fspace.arc_length
      fconfig = named_arc_config(config)
      assert all(fconfig.space[k] == v for k, v in entry.named_arcs[config.arc].space.items())


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_visualize_draws_every_named_arc(entry, capsys):
  for name in entry.named_arcs:
    assert visualize.main([f"--space={entry.name}", f"--arc={name}"]) == 0
    dot = capsys.readouterr().out
    assert dot.splitlines()[0].startswith(f"// enas_jax.visualize: space={entry.name} ")
    assert "digraph" in dot and dot.rstrip().endswith("}")


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.task == "image"],
                         ids=lambda e: e.name)
def test_image_child_convention(entry):
  """init -> (params, batch_stats); apply -> (logits, aux or None, batch_stats),
  shared and fixed; L2 weights a subset of the params (shapes only: no compute)."""
  from enas_jax.train.image import ChildFns
  config = importlib.import_module(f"configs.{entry.name}").get_config("smoke")
  arc = np.asarray(spaces.build(config).sample_uniform(jax.random.key(3)))
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32)
  for shared in (True, False):
    fns = ChildFns(entry.name, config, shared=shared, arc=None if shared else arc)
    params, stats = jax.eval_shape(fns.init, jax.random.key(0))
    out = jax.eval_shape(lambda p, s, a, x: fns.apply(p, s, a, x, train=True,
                                                      key=jax.random.key(1), progress=0.5),
                         params, stats, arc, x)
    assert len(out) == 3
    logits, aux, new_stats = out
    assert logits.shape == (2, 10) and (aux is None or aux.shape == (2, 10))
    assert jax.tree.structure(new_stats) == jax.tree.structure(stats)
    kept = jax.tree.leaves(fns.child.l2_params(params))
    assert 0 < len(kept) <= len(jax.tree.leaves(params))
    assert fns.count_params(params) > 0


def test_task_and_data_come_from_the_entry():
  from enas_jax import data as data_lib
  from enas_jax.train import run as run_lib
  for entry in ENTRIES:
    assert entry.task in run_lib.TASKS and entry.dataset in data_lib.LOADERS
    assert entry.metric and isinstance(entry.higher_is_better, bool)
  with pytest.raises(ValueError, match="unknown kind of data 'audio'"):
    data_lib.load("audio", None)
