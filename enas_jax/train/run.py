"""The pipeline behind the CLI: search (+ derive, + optional final) or final."""

from __future__ import annotations

import hashlib
import json
import os

import ml_collections

from enas_jax import backend
from enas_jax import data as data_lib
from enas_jax import metrics as metrics_lib
from enas_jax import parallel
from enas_jax import spaces
from enas_jax.train import common
from enas_jax.train.final import FinalSetup, run_final
from enas_jax.train.image import ImageTask
from enas_jax.train.lm import LMTask
from enas_jax.train.search import SearchSetup, derive, run_search
from enas_jax.train.settings import RunSettings

log = common.log


def build_space(config):
  """The search space the config names, with its sizes (its registry entry's
  ``build``; PTB: and the structure of its controller program,
  ``controller.node0_anchor`` / ``node1_input``)."""
  return spaces.build(config)


def load_data(config):
  """The data the config's space trains on: its entry's ``dataset`` loader
  (``corpus`` or ``images``) reading ``config.data`` (``data.source`` names the set)."""
  return data_lib.load(spaces.entry(config.space.name).dataset, config.data)


def _with_space_fields(config, fields):
  """The config with ``space.<field> = value`` for ``fields`` (a copy when any differs)."""
  if all(config.space[k] == v for k, v in fields.items()):
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for k, v in fields.items():
      config.space[k] = v
  return config


def named_arc_config(config):
  """The config with the space fields of the named arc it trains (``config.arc``
  a name of the space's ``named_arcs`` and no ``arc_file``: e.g. PTB
  ``corrected`` sets ``space.num_nodes=9, space.aggregate="all"``); else the
  config unchanged."""
  named = spaces.entry(config.space.name).named_arcs
  if config.arc_file or config.arc not in named:
    return config
  return _with_space_fields(config, named[config.arc].space)


def resolve_arc(config, space):
  """The arc to train in final mode: ``arc_file`` if set, else ``arc``.

  ``arc`` may name an arc of the space (``paper``; PTB ``corrected``); then the
  space fields it implies (PTB ``num_nodes``, ``aggregate``) replace the
  config's. Returns (space, arc).
  """
  entry = spaces.entry(config.space.name)
  if not config.arc_file and config.arc in entry.named_arcs:
    space = entry.build(named_arc_config(config))
    return space, space.parse(entry.named_arcs[config.arc].text)
  if config.arc_file:
    path = os.path.expanduser(config.arc_file)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"arc_file {path!r} does not exist; pass a file holding one arc string "
          f"(e.g. a search's best_arc.txt) or the arc itself with --config.arc=\"...\".")
    with open(path) as f:
      text = f.read().strip()
    where = f"arc_file {path}"
  else:
    text, where = config.arc, "config.arc"
  if not text:
    raise ValueError("final mode needs an arc: --config.arc=\"0 0 0 1 ...\" (or a name: "
                     f"{', '.join(entry.named_arcs)}) or --config.arc_file=PATH.")
  try:
    return space, space.parse(text)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


# The task class of each task kind (SpaceEntry.task).
TASKS = {"lm": LMTask, "image": ImageTask}


def _make_task(config, data, mesh, *, shared: bool, arc=None,
               settings: RunSettings | None = None):
  """The config's task; ``settings``: the run's typed loop settings (read from
  ``config`` when not given)."""
  task = TASKS[spaces.entry(config.space.name).task]
  if task is ImageTask:
    return ImageTask(config, data, mesh, shared=shared, arc=arc, settings=settings)
  return task(config, data, mesh, shared=shared, settings=settings)


def _with_arc(config, arc_text: str):
  """The config with ``arc`` set to the arc's text, so the workdir records (and
  a resume checks) the arc trained, not only a file name or a name."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.arc = arc_text
  config.lock()
  return config


def _set_aside_other_arc(fdir: str, arc_text: str) -> None:
  """A search resumed with a longer budget can derive another arc: then the
  final training of the previous one is moved to ``final.<arc hash>`` rather
  than resumed under the new arc."""
  path = os.path.join(fdir, "config.json")
  if not os.path.exists(path) or not common.is_main_process():
    return
  with open(path) as f:
    old = json.load(f).get("arc", "")
  if old and old != arc_text:
    dest = f"{fdir}.{hashlib.sha1(old.encode()).hexdigest()[:8]}"
    os.replace(fdir, dest)
    print(f"derive chose another arc than the one trained in {fdir}; that run was moved to "
          f"{dest} and the new arc is trained from scratch.", flush=True)


def run(config, workdir: str) -> dict:
  """Runs what ``config.mode`` asks for in ``workdir``; returns a summary dict."""
  if config.mode not in ("search", "final"):
    raise ValueError(f"config.mode must be 'search' or 'final', got {config.mode!r}.")
  given = config  # as passed (unresolved): search.then_final builds its config from it
  # The loop sections, read and checked once (a bad value fails before any work);
  # the tasks and setups get these, not the ConfigDict's fields.
  settings = RunSettings.from_config(config)
  parallel.maybe_initialize_distributed(config.distributed)
  mesh = parallel.make_mesh()
  space = build_space(config)
  if config.mode == "final":  # a bad arc is reported before any data is read
    space, arc = resolve_arc(config, space)
    config = _with_arc(named_arc_config(config), space.format(arc))
  common.prepare_workdir(config, workdir)
  # Recorded unresolved above (a run resumed on another backend is not refused);
  # from here on every "auto" is concrete for this backend.
  config = backend.resolve_config(config)
  print(f"implementation: {backend.describe(config)}", flush=True)
  data = load_data(config)
  out = {}
  with metrics_lib.MetricWriter(workdir, enabled=common.is_main_process(),
                                tensorboard=bool(config.tensorboard)) as writer:
    if config.mode == "search":
      task = _make_task(config, data, mesh, shared=True, settings=settings)
      setup = SearchSetup(config, space, task, settings=settings)
      state = run_search(setup, workdir, writer)
      best, score = derive(setup, state, workdir, writer)
      out.update(best_arc=best)
      out[f"best_valid_{task.metric}"] = score
    else:
      task = _make_task(config, data, mesh, shared=False, arc=arc, settings=settings)
      out.update(run_final(FinalSetup(config, space, task, arc, settings=settings), workdir,
                           writer))
  if config.mode == "search" and settings.search.then_final:
    del task, setup, state  # the search's device arrays are not needed any more
    out["final"] = _run_then_final(given, data, mesh, workdir, out["best_arc"])
  return out


def final_stage_config(config, arc_text: str):
  """The config of ``search.then_final``'s final stage (``<workdir>/final``).

  Where its fields come from: ``search.final_recipe`` (the config file's final
  variant values where they differ from its search variant's, with the user's
  ``--config.search.final_recipe.*`` overrides); every other field, the
  ``final`` section and the space included, from the search config as run
  (the user's overrides included); ``mode`` is ``"final"`` and ``arc`` the
  derived arc. The search run needs no config file for this: the recipe is in
  its config (and its ``config.json``).
  """
  fconfig = config.copy_and_resolve_references()
  with fconfig.unlocked():
    fconfig.mode = "final"
    fconfig.arc = arc_text
    fconfig.arc_file = ""
    for section, fields in config.search.final_recipe.items():
      target = fconfig.get(section)
      keys = fields.keys() if isinstance(fields, ml_collections.ConfigDict) else [None]
      for key in keys:
        if not isinstance(target, ml_collections.ConfigDict) or key not in target:
          raise ValueError(
              f"search.final_recipe.{section}{'' if key is None else '.' + key}: the config "
              "has no such field; the recipe holds config fields by section (e.g. "
              "child.hidden_size). Fix or drop it.")
        target[key] = fields[key]
  fconfig.lock()
  return fconfig


def _run_then_final(config, data, mesh, workdir: str, best_arc: str) -> dict:
  """Trains the derived arc from scratch in ``<workdir>/final`` with the final
  recipe (:func:`final_stage_config` of the unresolved search ``config``); its
  config.json (unresolved, as the search's) makes a resume check it."""
  fdir = os.path.join(workdir, "final")
  fconfig = final_stage_config(config, best_arc)
  fsettings = RunSettings.from_config(fconfig)
  before, after = (common.flatten(common.config_to_dict(c)) for c in (config, fconfig))
  changed = [f"{k} {before[k]!r} -> {after[k]!r}" for k in sorted(after)
             if k not in ("mode", "arc", "arc_file") and before.get(k) != after[k]]
  if changed:
    log.info("final stage with the final recipe (search.final_recipe): %s", ", ".join(changed))
  space = build_space(fconfig)
  arc = space.parse(best_arc)
  _set_aside_other_arc(fdir, best_arc)
  common.prepare_workdir(fconfig, fdir)
  fconfig = backend.resolve_config(fconfig)
  if common.config_to_dict(fconfig.data) != common.config_to_dict(config.data):
    # e.g. CIFAR final training uses all 50,000 images (data.num_valid 0)
    data = load_data(fconfig)
  task = _make_task(fconfig, data, mesh, shared=False, arc=arc, settings=fsettings)
  with metrics_lib.MetricWriter(fdir, enabled=common.is_main_process(),
                                tensorboard=bool(fconfig.tensorboard)) as writer:
    return run_final(FinalSetup(fconfig, space, task, arc, settings=fsettings), fdir, writer)
