"""Every config variant builds, is locked, and its pieces construct."""

import importlib
import inspect
import subprocess
import sys
import types

import jax
import pytest

from conftest import ROOT
from configs import ptb as ptb_config
from enas_jax import controller as ctrl
from enas_jax.spaces import ptb_child
from enas_jax.train.run import build_space, resolve_arc

CONFIGS = ("ptb", "cifar_macro", "cifar_micro")
ALL = [(name, v) for name in CONFIGS for v in importlib.import_module(f"configs.{name}").VARIANTS]


@pytest.mark.parametrize("name,variant", ALL)
def test_variant_builds(name, variant):
  c = importlib.import_module(f"configs.{name}").get_config(variant)
  assert c.variant == variant and c.space.name == name
  space = build_space(c)
  if name == "ptb":
    cc = ptb_child.ChildConfig.from_config(c)
    assert cc.vocab_size == c.data.vocab_size
  else:
    from enas_jax.train.image import ChildFns
    ChildFns(name, c, shared=True)  # the child config reads and validates its fields
  if c.mode == "final":
    fspace, arc = resolve_arc(c, space)  # the default final arc resolves and is valid
    fspace.validate(arc)
    if name == "ptb":
      assert (fspace.num_nodes, fspace.aggregate) == (c.space.num_nodes, c.space.aggregate)
  with pytest.raises(AttributeError):
    c.child.hidden_sise = 3  # locked: a typo is an error, not a new field
  # The controller program samples exactly the arc layout.
  cc = ctrl.ControllerConfig.from_config(c.controller)
  p = ctrl.init(jax.random.key(0), space.decisions, cc)
  arc = ctrl.sample(p, jax.random.key(1), space.decisions, cc)["arc"]
  space.validate(arc)


def test_default_variant_is_search():
  for name in CONFIGS:
    mod = importlib.import_module(f"configs.{name}")
    assert mod.get_config().mode == "search"
    with pytest.raises(ValueError, match="unknown variant"):
      mod.get_config("nope")
  assert ptb_config.get_config().mode == "search"


def _uncommented(fn):
  lines = inspect.getsource(fn).splitlines()
  missing = []
  for i, line in enumerate(lines):
    s = line.strip()
    if s.startswith("c.") and "=" in s.split("#")[0] and "ConfigDict()" not in s \
        and not s.startswith("c.lock"):
      prev = lines[i - 1].strip() if i else ""
      if "#" not in s and not prev.startswith("#"):
        missing.append(s)
  return missing


def test_every_field_has_a_comment():
  from configs import cifar_macro, cifar_micro, cifar_nb201
  from enas_jax import config_base
  fns = [config_base.common, config_base._controller, config_base.cifar, ptb_config._base,
         cifar_macro._search, cifar_macro._final, cifar_micro._micro_fields, cifar_micro._final,
         cifar_nb201._nb201_fields, cifar_nb201._final]
  missing = [m for fn in fns for m in _uncommented(fn)]
  assert not missing, missing


def test_uncommented_finds_a_bare_field():
  def bare():
    c = types.SimpleNamespace()
    c.x = 1
    # a comment above
    c.y = 2
    c.z = 3  # a comment on the line
  assert _uncommented(bare) == ["c.x = 1"]


def test_configs_import_the_base_as_a_module():
  """Config files import the shared schema (enas_jax.config_base) with a plain
  import: none edits sys.path or imports a sibling file."""
  import pathlib
  files = sorted(pathlib.Path(ROOT, "configs").glob("*.py"))
  assert files
  for f in files:
    src = f.read_text()
    assert "sys.path" not in src, f"{f.name} edits sys.path"
    assert "from enas_jax import config_base" in src, f"{f.name} does not build on config_base"


def test_unknown_config_key_is_a_clear_cli_error(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "enas_jax.main", "--config=configs/cifar_micro.py:smoke",
       "--config.child.out_filterz=3", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, check=False, timeout=120)
  assert out.returncode != 0
  assert "out_filterz" in out.stderr
