"""Every config variant builds, is locked, and its pieces construct."""

import jax
import pytest

from configs import ptb as ptb_config
from enas_jax import controller as ctrl
from enas_jax.spaces import ptb_child
from enas_jax.train.run import build_space


@pytest.mark.parametrize("variant", ptb_config.VARIANTS)
def test_variant_builds(variant):
  c = ptb_config.get_config(variant)
  assert c.variant == variant
  space = build_space(c)
  cc = ptb_child.ChildConfig.from_config(c)
  ctrl.ControllerConfig.from_config(c.controller)
  assert cc.vocab_size == c.data.vocab_size
  if c.mode == "final":
    from enas_jax.train.run import resolve_arc
    fspace, arc = resolve_arc(c, space)  # the default final arc resolves and is valid
    assert (fspace.num_nodes, fspace.aggregate) == (c.space.num_nodes, c.space.aggregate)
  with pytest.raises(AttributeError):
    c.child.hidden_sise = 3  # locked: a typo is an error, not a new field
  # The controller program samples exactly the arc layout.
  p = ctrl.init(jax.random.key(0), space.decisions, ctrl.ControllerConfig.from_config(c.controller))
  arc = ctrl.sample(p, jax.random.key(1), space.decisions,
                    ctrl.ControllerConfig.from_config(c.controller))["arc"]
  space.validate(arc)


def test_default_variant_is_search():
  assert ptb_config.get_config().mode == "search"
  with pytest.raises(ValueError, match="unknown variant"):
    ptb_config.get_config("nope")


def test_every_field_has_a_comment():
  import inspect
  src = inspect.getsource(ptb_config._base)
  lines = src.splitlines()
  missing = []
  for i, line in enumerate(lines):
    s = line.strip()
    if s.startswith("c.") and "=" in s and "ConfigDict()" not in s and not s.startswith("c.lock"):
      prev = lines[i - 1].strip() if i else ""
      if "#" not in s and not prev.startswith("#"):
        missing.append(s)
  assert not missing, missing
