"""One entry per search space: everything the library outside ``enas_jax.spaces``
asks of a space.

The controller and REINFORCE only see a space's :class:`~enas_jax.spaces.base.Decisions`
program. The layer around them (the CLI pipeline, the tasks, the diagrams, the
benchmark, the seeds report) asks a :class:`SpaceEntry` instead of testing a
space's name, so a new space is its own files plus one ``register`` line in
``enas_jax/spaces/__init__.py`` (README "Adding a search space").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

TASKS = ("lm", "image")  # the task kinds: enas_jax.train.lm.LMTask, enas_jax.train.image.ImageTask
DATASETS = ("corpus", "images")  # the loader in enas_jax.data: load_corpus, load_images


@dataclasses.dataclass(frozen=True)
class NamedArc:
  """An arc known by name (``--config.arc=paper``, ``visualize --arc=paper``).

  Attributes:
    text: the arc's string form.
    space: the ``space`` config fields the arc implies (its sizes, and settings
      the string does not encode, e.g. PTB ``aggregate``); a run or a diagram
      of the named arc takes these values over the config's.
  """

  text: str
  space: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ImageChild:
  """The child network functions of an image space, in one calling convention
  (what :class:`enas_jax.train.image.ImageTask` calls).

  Attributes:
    config: ``config(run_config) -> cfg``, the child's static config (hashable).
    init_shared: ``init_shared(key, cfg) -> (params, batch_stats)``, the
      weight-shared search child.
    apply_shared: ``apply_shared(params, batch_stats, arc, images, *, train, key, cfg)
      -> (logits, aux_logits or None, batch_stats)``; ``arc`` a traced int32 array
      (or a numpy arc, baked in).
    init_fixed: ``init_fixed(key, cfg, arc) -> (params, batch_stats)``, the fixed
      child of the numpy ``arc``.
    apply_fixed: ``apply_fixed(params, batch_stats, arc, images, *, train, key, cfg,
      progress) -> (logits, aux_logits or None, batch_stats)``; ``progress`` is the
      fraction of training done (drop-path schedules; ignore it if unused).
    l2_params: ``l2_params(params) -> pytree``, the weights the L2 penalty covers
      (micro: all but the auxiliary head's).
    count_params: ``count_params(params) -> int``, parameters reported.
  """

  config: Callable[[Any], Any]
  init_shared: Callable[..., Any]
  apply_shared: Callable[..., Any]
  init_fixed: Callable[..., Any]
  apply_fixed: Callable[..., Any]
  l2_params: Callable[[Any], Any]
  count_params: Callable[[Any], int]


@dataclasses.dataclass(frozen=True)
class SpaceEntry:
  """A search space as the rest of the library sees it.

  Attributes:
    name: the space's name: ``config.space.name``, ``visualize --space``, ``codec.name``.
    codec: ``codec(**space_fields) -> Codec``, the codec class (or factory); what
      ``enas_jax.spaces.get(name, ...)`` calls.
    build: ``build(config) -> Codec``, the codec a run config describes: its
      ``space`` section (sizes and settings), and any other section the
      space's controller program reads (PTB: ``controller.node0_anchor``,
      ``controller.node1_input``).
    size_fields: the ``space`` config fields that set the arc's length (PTB
      ``("num_nodes",)``, macro ``("num_layers",)``); ``visualize`` takes them as
      ``--num_nodes`` / ``--num_layers`` flags.
    sizes_for_length: ``sizes_for_length(num_tokens) -> {size field: value}``,
      the sizes a bare arc of that many tokens implies (``visualize`` without
      size flags); raises ``ValueError`` saying the length rule when none does.
    task: ``"lm"`` (``LMTask``: language model on a corpus) or ``"image"``
      (``ImageTask`` with :attr:`child`).
    dataset: ``"corpus"`` or ``"images"``: which loader of ``enas_jax.data``
      reads ``config.data`` (whose ``source`` then names the data set).
    named_arcs: name -> :class:`NamedArc` (``paper`` at least, by convention).
    draw: ``draw(codec, arc) -> str``, the DOT text of a validated numpy arc
      (``enas_jax.visualize.to_dot`` calls it).
    child: for ``task="image"``, a no-argument function returning the
      :class:`ImageChild` (a function so that importing the space list does not
      import the child networks); ``None`` for ``"lm"``.
    metric: the validation metric a run reports (``"ppl"``, ``"acc"``); it names
      ``best_valid_<metric>`` and ``derive/best_valid_<metric>``.
    higher_is_better: the metric's direction.
  """

  name: str
  codec: Callable[..., Any]
  build: Callable[[Any], Any]
  size_fields: tuple[str, ...]
  sizes_for_length: Callable[[int], dict]
  task: str
  dataset: str
  named_arcs: Mapping[str, NamedArc]
  draw: Callable[[Any, Any], str]
  child: Callable[[], ImageChild] | None = None
  metric: str = "acc"
  higher_is_better: bool = True

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"space entry {self.name!r}: task must be one of {TASKS}, "
                       f"got {self.task!r}.")
    if self.dataset not in DATASETS:
      raise ValueError(f"space entry {self.name!r}: dataset must be one of {DATASETS}, "
                       f"got {self.dataset!r}.")
    if (self.task == "image") != (self.child is not None):
      raise ValueError(f"space entry {self.name!r}: an image space needs child=..., "
                       "a language-model space none.")


_ENTRIES: dict[str, SpaceEntry] = {}


def register(entry: SpaceEntry) -> SpaceEntry:
  """Adds ``entry`` to the space list (``enas_jax/spaces/__init__.py`` calls it
  once per space). A second entry under the same name is an error."""
  if entry.name in _ENTRIES and _ENTRIES[entry.name] is not entry:
    raise ValueError(f"search space {entry.name!r} is registered twice.")
  _ENTRIES[entry.name] = entry
  return entry


def entry(name: str) -> SpaceEntry:
  """The entry of space ``name``; an unknown name lists the available ones."""
  try:
    return _ENTRIES[name]
  except KeyError:
    raise ValueError(
        f"unknown search space {name!r}; available: {sorted(_ENTRIES)}") from None


def names() -> list[str]:
  """The registered spaces' names, sorted."""
  return sorted(_ENTRIES)


def entries() -> list[SpaceEntry]:
  """The registered entries, sorted by name."""
  return [_ENTRIES[n] for n in names()]
