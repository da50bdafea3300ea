"""The pipeline behind the CLI: search (+ derive, + optional final) or final."""

from __future__ import annotations

import os

from enas_jax import data as data_lib
from enas_jax import metrics as metrics_lib
from enas_jax import parallel
from enas_jax import spaces
from enas_jax.spaces import ptb
from enas_jax.train import common
from enas_jax.train.final import FinalSetup, run_final
from enas_jax.train.lm import LMTask
from enas_jax.train.search import SearchSetup, derive, run_search

log = common.log


def build_space(config):
  s = config.space
  return spaces.get(s.name, num_nodes=int(s.num_nodes), num_activations=int(s.num_activations),
                    aggregate=s.aggregate, node0_activations=int(s.node0_activations))


# Named arcs: (seed-format string, num_nodes, aggregate).
NAMED_ARCS = {
    "paper": (ptb.PAPER_ARC, 12, "loose_ends"),
    "corrected": (str(ptb.from_corrected(ptb.CORRECTED_SHIPPED_ARC)), 9, "all"),
}


def resolve_arc(config, space):
  """The arc to train in final mode: ``arc_file`` if set, else ``arc``.

  ``arc`` may name an arc (``paper``, ``corrected``); then its space settings
  (``num_nodes``, ``aggregate``) replace the config's. Returns (space, arc).
  """
  if not config.arc_file and config.arc in NAMED_ARCS:
    text, n, agg = NAMED_ARCS[config.arc]
    s = config.space
    space = spaces.get(s.name, num_nodes=n, num_activations=int(s.num_activations),
                       aggregate=agg, node0_activations=int(s.node0_activations))
    return space, space.parse(text)
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
                     f"{', '.join(NAMED_ARCS)}) or --config.arc_file=PATH.")
  try:
    return space, space.parse(text)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def run(config, workdir: str) -> dict:
  """Runs what ``config.mode`` asks for in ``workdir``; returns a summary dict."""
  parallel.maybe_initialize_distributed(config.distributed)
  mesh = parallel.make_mesh()
  common.prepare_workdir(config, workdir)
  corpus = data_lib.load_corpus(config.data)
  space = build_space(config)
  out = {}
  with metrics_lib.MetricWriter(workdir, enabled=common.is_main_process(),
                                tensorboard=bool(config.tensorboard)) as writer:
    if config.mode == "search":
      task = LMTask(config, corpus, mesh, shared=True)
      setup = SearchSetup(config, space, task)
      state = run_search(setup, workdir, writer)
      best, ppl = derive(setup, state, workdir, writer)
      out.update(best_arc=best, best_valid_ppl=ppl)
    elif config.mode == "final":
      space, arc = resolve_arc(config, space)
      if (space.num_nodes, space.aggregate) != (config.space.num_nodes, config.space.aggregate):
        config = config.copy_and_resolve_references()
        with config.unlocked():
          config.space.num_nodes, config.space.aggregate = space.num_nodes, space.aggregate
      task = LMTask(config, corpus, mesh, shared=False)
      out.update(run_final(FinalSetup(config, space, task, arc), workdir, writer))
    else:
      raise ValueError(f"config.mode must be 'search' or 'final', got {config.mode!r}.")
  if config.mode == "search" and config.search.then_final:
    fdir = os.path.join(workdir, "final")
    common.prepare_workdir(config, fdir)
    task = LMTask(config, corpus, mesh, shared=False)
    with metrics_lib.MetricWriter(fdir, enabled=common.is_main_process(),
                                  tensorboard=bool(config.tensorboard)) as writer:
      out["final"] = run_final(FinalSetup(config, space, task, space.parse(out["best_arc"])),
                               fdir, writer)
  return out
