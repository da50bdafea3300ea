"""The run config's loop sections, read and checked once.

:func:`RunSettings.from_config` turns the ``search``, ``derive`` and ``final``
sections (and the top-level loop fields: seed, logging, checkpoints) into
frozen dataclasses; ``train.run.run`` builds them at the top and passes them to
the tasks and setups, and the loops read typed fields instead of the ConfigDict
(which only travels where it must: the workdir's ``config.json`` and the
``then_final`` recipe). A bad value is reported as ``section.field`` with what
it must be. The fields' meanings and sources are the configs' comments
(``enas_jax/config_base.py``, ``configs/*.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

SAMPLERS = ("controller", "uniform")


def _read(section: Any, name: str, fields: tuple) -> dict:
  """The ``fields`` of a config section, each required (a clear error names
  the missing ones)."""
  missing = [k for k in fields if k not in section]
  if missing:
    raise ValueError(f"the {name} config section has no {', '.join(missing)}; build the config "
                     f"from one of configs/*.py (enas_jax.config_base declares these fields).")
  return {k: section[k] for k in fields}


def _check(section: str, obj, rules: dict) -> None:
  """Raises ``ValueError`` naming ``section.field`` for the first broken rule
  (``field -> (test, what it must be)``)."""
  for name, (ok, want) in rules.items():
    if not ok(getattr(obj, name)):
      raise ValueError(f"{section}.{name} must be {want}, got {getattr(obj, name)!r}.")


def _as(kind, section: str, name: str, value):
  """``kind(value)`` for a bool/int/float/str field; a clear error otherwise."""
  if kind is bool:
    if isinstance(value, bool):
      return value
  elif kind is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
  elif kind is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
  elif isinstance(value, str):
    return value
  raise ValueError(f"{section}.{name} must be of type {kind.__name__}, got {value!r}.")


def _typed(cls, section_name: str, section: Any, optional: tuple = ()) -> dict:
  """The dataclass ``cls``'s fields read from ``section`` with their types;
  the names in ``optional`` (fields only some spaces' schemas have) keep the
  dataclass default when absent."""
  out = {}
  fields = {f.name: f for f in dataclasses.fields(cls)}
  required = tuple(k for k in fields if k not in optional)
  raw = _read(section, section_name, required)
  raw.update({k: section[k] for k in optional if k in section})
  for k, v in raw.items():
    kind = {"bool": bool, "int": int, "float": float, "str": str}[
        str(fields[k].type).replace("Optional[", "").rstrip("]")]
    out[k] = _as(kind, section_name, k, v)
  return out


class _Section:
  """``from_config`` for a settings dataclass read from the config section
  ``SECTION``; the names in ``OPTIONAL`` keep their defaults when absent; the
  values are checked against ``RULES`` (``field -> (test, what it must be)``)."""

  SECTION = ""
  OPTIONAL: tuple = ()
  RULES: dict = {}

  def __post_init__(self):
    _check(self.SECTION, self, self.RULES)

  @classmethod
  def from_config(cls, section: Any):
    return cls(**_typed(cls, cls.SECTION, section, optional=cls.OPTIONAL))


@dataclasses.dataclass(frozen=True)
class SearchSettings(_Section):
  """``search``: child epochs, sampler, when the controller starts, dispatch size,
  validation batches per epoch (PTB: windows of eval_batch_size x bptt; 0 = all)."""

  num_epochs: int
  sampler: str
  controller_start_epoch: int
  steps_per_dispatch: int
  then_final: bool
  valid_batches: int

  SECTION = "search"
  RULES = {
      "num_epochs": (lambda v: v >= 0, ">= 0"),
      "sampler": (lambda v: v in SAMPLERS, f"one of {SAMPLERS}"),
      "controller_start_epoch": (lambda v: v >= 0, ">= 0"),
      "steps_per_dispatch": (lambda v: v >= 1, ">= 1"),
      "valid_batches": (lambda v: v >= 0, ">= 0 (0 = all)"),
  }


@dataclasses.dataclass(frozen=True)
class DeriveSettings(_Section):
  """``derive``: arcs sampled and scored, arcs per jitted call, validation
  batches per arc (PTB: windows, state carried; 0 = all)."""

  num_samples: int
  batch: int
  valid_batches: int

  SECTION = "derive"
  RULES = {
      "num_samples": (lambda v: v >= 1, ">= 1"),
      "batch": (lambda v: v >= 1, ">= 1"),
      "valid_batches": (lambda v: v >= 0, ">= 0 (0 = all)"),
  }


@dataclasses.dataclass(frozen=True)
class FinalSettings(_Section):
  """``final``: epochs, dispatch size, validation batches per epoch (0 = all);
  PTB only (absent from the CIFAR schemas, hence the defaults): iterate
  averaging and the test pass's batch size and window length."""

  num_epochs: int
  steps_per_dispatch: int
  valid_batches: int
  average: bool = False  # PTB only; the CIFAR recipes have no averaging
  average_nonmono: int = 0  # PTB only
  test_batch_size: Optional[int] = None  # PTB only: the test pass's batch
  test_bptt: Optional[int] = None  # PTB only: the test pass's window length

  SECTION = "final"
  OPTIONAL = ("average", "average_nonmono", "test_batch_size", "test_bptt")
  RULES = {
      "num_epochs": (lambda v: v >= 0, ">= 0"),
      "steps_per_dispatch": (lambda v: v >= 1, ">= 1"),
      "valid_batches": (lambda v: v >= 0, ">= 0 (0 = all)"),
      "average_nonmono": (lambda v: v >= 0, ">= 0"),
      "test_batch_size": (lambda v: v is None or v >= 1, ">= 1"),
      "test_bptt": (lambda v: v is None or v >= 1, ">= 1"),
  }


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """The loops' settings: the ``search``, ``derive`` and ``final`` sections
  and the top-level fields the loops read (seed, logging, checkpoints)."""

  search: SearchSettings
  derive: DeriveSettings
  final: FinalSettings
  seed: int
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  eval_only: bool

  def __post_init__(self):
    _check("config", self, {
        "log_every": (lambda v: v >= 1, ">= 1"),
        "checkpoint_every": (lambda v: v >= 0, ">= 0 (0: epoch ends only)"),
        "keep_checkpoints": (lambda v: v >= 1, ">= 1"),
    })

  @classmethod
  def from_config(cls, config: Any) -> "RunSettings":
    """From a run ConfigDict (``configs/*.py``)."""
    top = ("seed", "log_every", "checkpoint_every", "keep_checkpoints", "eval_only")
    raw = _read(config, "top-level", top + ("search", "derive", "final"))
    kinds = {"seed": int, "log_every": int, "checkpoint_every": int, "keep_checkpoints": int,
             "eval_only": bool}
    return cls(search=SearchSettings.from_config(raw["search"]),
               derive=DeriveSettings.from_config(raw["derive"]),
               final=FinalSettings.from_config(raw["final"]),
               **{k: _as(kinds[k], "config", k, raw[k]) for k in top})


def settings_for(config: Any, task: Any, settings: Optional[RunSettings]) -> RunSettings:
  """A setup's settings: ``settings`` if given, else the task's when the task
  was built from this same ``config`` (read once), else read from ``config``."""
  if settings is not None:
    return settings
  if config is getattr(task, "config", None) and hasattr(task, "settings"):
    return task.settings
  return RunSettings.from_config(config)
