"""Typed states of the training loops (``flax.struct`` dataclasses: pytrees,
immutable, updated with ``.replace``) and their checkpoint layout.

Checkpoint layout (what :mod:`enas_jax.checkpoint` stores, via
``flax.serialization.to_state_dict``): every field under its own name, fields
that are ``None`` left out, and the best-so-far record of the search and final
states under ``best_valid_<metric>`` (``best_valid_ppl`` for PTB,
``best_valid_acc`` for the image spaces). These are the keys of the string-keyed
dicts earlier versions used, so their checkpoints and workdirs resume unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import serialization, struct


@struct.dataclass
class ChildState:
  """A child's training state. ``step`` counts child updates; it fixes the data
  position and the randomness (``fold_in(key, step)``). ``batch_stats``: the
  batch-norm moving statistics (``{}`` when the child has none)."""
  params: Any
  opt_state: Any
  step: jax.Array
  batch_stats: Any


@struct.dataclass
class LMChildState(ChildState):
  """The PTB child's state: ``h`` is the recurrent state carried from window to
  window, ``pos`` the column of the next window (variable-length windows), and
  ``avg`` the running weight average of the corrected final recipe
  (``{"params", "n", "active"}``; ``None`` when ``final.average`` is off)."""
  h: jax.Array
  pos: jax.Array
  avg: Any = None


@struct.dataclass
class SearchState:
  """The full search state: child, controller (:mod:`enas_jax.reinforce`'s
  state dict), epochs done and the best validation value so far."""
  child: ChildState
  ctrl: Any
  epochs_done: jax.Array
  best_valid: jax.Array
  metric: str = struct.field(pytree_node=False, default="ppl")  # names best_valid on disk


@struct.dataclass
class FinalState:
  """The final-training state: child, epochs done, best value so far and the
  per-epoch validation history (NaN-filled, fixed size: the averaging trigger)."""
  child: ChildState
  epochs_done: jax.Array
  best_valid: jax.Array
  valid_history: jax.Array
  metric: str = struct.field(pytree_node=False, default="ppl")


def _disk_name(state, name: str) -> str:
  return f"best_valid_{state.metric}" if name == "best_valid" else name


def _fields(cls):
  return [f.name for f in cls.__dataclass_fields__.values() if f.metadata.get("pytree_node", True)]


def _to_state_dict(state) -> dict:
  out = {}
  for name in _fields(type(state)):
    value = getattr(state, name)
    if value is not None:
      out[_disk_name(state, name)] = serialization.to_state_dict(value)
  return out


def _from_state_dict(target, saved: dict):
  saved = dict(saved)
  updates = {}
  for name in _fields(type(target)):
    value = getattr(target, name)
    if value is None:
      continue
    key = _disk_name(target, name)
    if key not in saved:
      raise ValueError(
          f"the checkpoint's {type(target).__name__} has no field {key!r} (it has "
          f"{', '.join(sorted(saved))}): it was written by another config or space; resume "
          f"it with the config that wrote it, or start a new --workdir.")
    updates[name] = serialization.from_state_dict(value, saved.pop(key), name=key)
  if saved:
    raise ValueError(
        f"the checkpoint's {type(target).__name__} has fields this run does not "
        f"({', '.join(sorted(saved))}): it was written by another config; resume it with the "
        f"config that wrote it, or start a new --workdir.")
  return target.replace(**updates)


for _cls in (ChildState, LMChildState, SearchState, FinalState):
  serialization.register_serialization_state(_cls, _to_state_dict, _from_state_dict,
                                              override=True)
