"""Search spaces. ``get(name, **sizes)`` returns a space's codec (see ``base``);
``entry(name)`` its :class:`~enas_jax.spaces.registry.SpaceEntry`, everything
the rest of the library asks of a space. Each space registers itself below, one
line each (README "Adding a search space")."""

from __future__ import annotations

from enas_jax.spaces import base, cifar_macro, cifar_micro, cifar_nb201, ptb, registry
from enas_jax.spaces.cifar_macro import MacroCodec
from enas_jax.spaces.cifar_micro import MicroCodec
from enas_jax.spaces.ptb import PTBSpace
from enas_jax.spaces.registry import NamedArc, SpaceEntry, entries, entry, names

registry.register(ptb.ENTRY)
registry.register(cifar_macro.ENTRY)
registry.register(cifar_micro.ENTRY)
registry.register(cifar_nb201.ENTRY)


def get(name: str, **kwargs):
  """Builds the search space ``name`` with its sizes as keyword arguments.

  Example: ``get("ptb", num_nodes=12)``.
  """
  cls = entry(name).codec
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ValueError(f"search space {name!r}: {e}") from None


def build(config):
  """The codec a run config describes (``config.space.name`` and its fields)."""
  return entry(config.space.name).build(config)


__all__ = ["MacroCodec", "MicroCodec", "NamedArc", "PTBSpace", "SpaceEntry", "base", "build",
           "entries", "entry", "get", "names", "registry"]
