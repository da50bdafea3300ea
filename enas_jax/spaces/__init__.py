"""Search spaces. ``get(name, **sizes)`` returns a space object (see ``base``)."""

from __future__ import annotations

from enas_jax.spaces import base
from enas_jax.spaces.cifar_macro import MacroCodec
from enas_jax.spaces.cifar_micro import MicroCodec
from enas_jax.spaces.ptb import PTBSpace

_REGISTRY = {"ptb": PTBSpace, "cifar_macro": MacroCodec, "cifar_micro": MicroCodec}


def get(name: str, **kwargs):
  """Builds the search space ``name`` with its sizes as keyword arguments.

  Example: ``get("ptb", num_nodes=12)``.
  """
  try:
    cls = _REGISTRY[name]
  except KeyError:
    raise ValueError(
        f"unknown search space {name!r}; available: {sorted(_REGISTRY)}") from None
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ValueError(f"search space {name!r}: {e}") from None


def names() -> list[str]:
  return sorted(_REGISTRY)


__all__ = ["MacroCodec", "MicroCodec", "PTBSpace", "base", "get", "names"]
