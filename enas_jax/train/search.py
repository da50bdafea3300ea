"""The search loop and derive.

Per epoch: a child phase (one freshly sampled arc per minibatch, several steps
per dispatch), a controller phase (``train_steps`` REINFORCE updates, each
averaging ``num_aggregate`` arcs), validation, metrics and a checkpoint. Then
derive: sample arcs from the trained controller, score each on validation
data, write ``best_arc.txt`` and ``arcs.jsonl``.

The loop talks to the space through its protocol (``decisions``, codec,
``sample_uniform``) and to the task (:class:`~enas_jax.train.task.Task`)
through its jitted functions. The state is a
:class:`~enas_jax.train.state.SearchState`.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax import checkpoint as ckpt_lib
from enas_jax import controller as ctrl
from enas_jax import exec_cache
from enas_jax import metrics as metrics_lib
from enas_jax import parallel
from enas_jax import reinforce
from enas_jax.train import common
from enas_jax.train import settings as settings_lib
from enas_jax.train.settings import RunSettings
from enas_jax.train.state import SearchState

log = common.log


class SearchSetup:
  """Everything a search needs, built once: the notebook entry point.

  Attributes: ``space``, ``task``, ``settings`` (the typed loop settings,
  :class:`~enas_jax.train.settings.RunSettings`), ``controller`` (the typed
  controller section, :class:`~enas_jax.reinforce.ControllerSettings`),
  ``ctrl_cfg`` (its network config), ``decisions``, ``sample_arc``
  (``(ctrl_params, key) -> arc``, controller or uniform), ``child_chunk``
  (jitted child steps), ``controller_phase`` (jitted controller updates),
  ``search_valid`` (jitted validation), ``keys``.

  ``config`` is read here once: ``settings`` defaults to the task's (built
  from the same config), ``controller`` to ``config.controller``'s.
  """

  def __init__(self, config, space, task, *, settings: RunSettings | None = None,
               controller: reinforce.ControllerSettings | None = None):
    self.config, self.space, self.task = config, space, task
    self.settings = settings_lib.settings_for(config, task, settings)
    self.decisions = space.decisions
    self.controller = (controller if controller is not None
                       else reinforce.ControllerSettings.from_config(config.controller))
    self.ctrl_cfg = self.controller.net
    self.optimizer = self.controller.optimizer()
    if self.settings.search.sampler == "controller":
      self.sample_arc = lambda p, k: ctrl.sample(p, k, self.decisions, self.ctrl_cfg)["arc"]
    else:  # "uniform" (SearchSettings checks the name)
      self.sample_arc = lambda p, k: space.sample_uniform(k)
    self.child_chunk = task.make_train_chunk(self.sample_arc)
    self.sample_one = jax.jit(self.sample_arc)  # one arc on the host side (logs)
    phase = reinforce.make_phase(self.decisions, self.controller, self.optimizer,
                                 task.reward_fn(self.controller.reward_c))
    # The reward runs the child: a compile as long as a child step's, cached the same way.
    self.controller_phase = exec_cache.CachedJit(phase, donate_argnums=(0,))
    self.search_valid = task.make_search_valid(self.sample_arc,
                                               self.settings.search.valid_batches)
    root = jax.random.key(self.settings.seed)
    self.keys = {n: jax.random.fold_in(root, i) for i, n in
                 enumerate(("child_init", "ctrl_init", "child", "ctrl", "valid", "derive", "show"))}

  def init_state(self) -> SearchState:
    """The full search state (invariant 6): child, controller, epoch, records."""
    ctrl_state = reinforce.init_state(self.keys["ctrl_init"], self.decisions, self.ctrl_cfg,
                                      self.optimizer)
    return SearchState(child=self.task.init_child(self.keys["child_init"]),
                       ctrl=parallel.replicate(ctrl_state, self.task.mesh),
                       epochs_done=jnp.int32(0), best_valid=worst(self.task),
                       metric=self.task.metric)


def worst(task) -> jax.Array:
  """The best-so-far record's start: the worst value of the task's metric."""
  return jnp.float32(-np.inf if task.higher_is_better else np.inf)


def better(task, a, b):
  """The better of two validation values for this task."""
  return jnp.maximum(a, b) if task.higher_is_better else jnp.minimum(a, b)


def _raise_nonfinite(step: int, epoch: int, ckpt: ckpt_lib.Checkpointer | None, what: str):
  last = ckpt.latest_step() if ckpt is not None else None
  keep = (f"the newest checkpoint (step {last}) holds the last good state and was not overwritten"
          if last is not None else "no checkpoint had been written yet")
  raise common.NonFiniteError(
      f"{what} became NaN or Inf at child step {step} (epoch {epoch}); the run stopped and "
      f"{keep}. Lower child.lr or child.grad_clip, or check the data, then rerun the same "
      f"command to resume from that checkpoint.")


def run_child_epoch_part(setup, state, end_step: int, writer, progress, ckpt,
                         prefix: str = "child", chunk=None, ctrl_params=None):
  """Runs child steps up to ``end_step`` (an epoch end, or the step budget) in
  dispatches of ``steps_per_dispatch``, logging every ``log_every`` and
  checkpointing every ``checkpoint_every`` steps; with variable-length windows
  it also returns when a pass over the data ends. Shared by search and final."""
  task = setup.task
  chunk = chunk or setup.child_chunk
  key = setup.keys["child"]
  s = setup.settings
  spd = (s.search if prefix == "child" else s.final).steps_per_dispatch
  log_every, ckpt_every = s.log_every, s.checkpoint_every
  step = int(state.child.step)
  progress.mark(step)
  sums, n_acc = {k: 0.0 for k in task.SUM_KEYS}, 0
  items = 0  # tokens or images since the last progress line (windows vary in length)
  if ctrl_params is None:
    ctrl_params = state.ctrl["params"]
  epoch_end = False
  while step < end_step and not epoch_end:
    n = min(spd, end_step - step, log_every - step % log_every)
    child, acc = chunk(state.child, ctrl_params, key, jnp.int32(n))
    acc = jax.device_get(acc)
    epoch = int(state.epochs_done)
    if int(acc["first_bad"]) >= 0:
      _raise_nonfinite(int(acc["first_bad"]), epoch, ckpt, "the child loss or gradient")
    state = state.replace(child=child)
    step += int(acc["n"])
    # With variable-length windows a chunk stops early at the end of a pass.
    epoch_end = task.random_bptt and bool(acc["epoch_end"])
    for k in sums:
      sums[k] += float(acc[k])
    n_acc += int(acc["n"])
    items += int(acc["tokens"]) * task.batch_size  # tokens per row, or 1 per step (images)
    if step % log_every == 0 or step == end_step or epoch_end:
      m = task.progress_metrics(prefix, sums, n_acc)
      m[f"{prefix}/epoch"] = step / task.num_batches
      writer.write(step, m)
      if task.random_bptt:
        m[f"{prefix}/tokens_per_step"] = items / max(n_acc, 1)
      if common.is_main_process():
        # The loss includes the L2 term (large for the micro child's shared
        # weights), so the cross-entropy is shown too where the task has it.
        shown = {k: m[f"{prefix}/{k}"] for k in ("loss", "ce", task.metric)
                 if f"{prefix}/{k}" in m}
        print(progress.line(step, {f"{prefix}/{k}": v for k, v in shown.items()}, items=items),
              flush=True)
      sums, n_acc, items = {k: 0.0 for k in sums}, 0, 0
    if ckpt is not None and ckpt_every > 0 and step % ckpt_every == 0 and step < end_step:
      ckpt.save(step, state, {"stage": prefix, "step": step})
  return state


def open_run_state(setup, workdir: str, stage: str):
  """The stage's checkpointer and its state: the newest checkpoint if one exists
  (resume), else a fresh ``setup.init_state()``. Returns (ckpt, state, resumed)."""
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               max_to_keep=setup.settings.keep_checkpoints)
  state = setup.init_state()
  resumed = ckpt.latest_step() is not None
  if resumed:
    state, _ = ckpt.restore(state)
    log.info("resumed %s from step %s (epoch %s)", stage, int(state.child.step),
             int(state.epochs_done))
  return ckpt, state, resumed


def run_search(setup: SearchSetup, workdir: str, writer) -> SearchState:
  """Runs (or resumes) the search in ``workdir``; returns the final state."""
  s, task = setup.settings.search, setup.task
  ckpt, state, _ = open_run_state(setup, workdir, "search")
  num_epochs = s.num_epochs
  nb = task.num_batches
  progress = metrics_lib.Progress(num_epochs * nb, start_step=int(state.child.step),
                                  items_per_step=task.tokens_per_step, item_name=task.item_name)
  use_ctrl = s.sampler == "controller"
  budget = num_epochs * nb
  while True:
    epoch = int(state.epochs_done)
    if task.random_bptt:
      # Variable-length windows (the corrected code's search): an epoch is one
      # pass over the data, of a random number of steps; the run ends at the
      # budget of num_epochs x (windows of length bptt) steps, possibly mid-pass.
      if int(state.child.step) >= budget:
        break
      state = run_child_epoch_part(setup, state, budget, writer, progress, ckpt)
      step = int(state.child.step)
      if step >= budget and int(state.child.pos) != 0:
        ckpt.save(step, state, {"stage": "search", "epoch": epoch})
        break  # mid-pass: no controller phase (the corrected code just stops)
    else:
      if epoch >= num_epochs:
        break
      state = run_child_epoch_part(setup, state, (epoch + 1) * nb, writer, progress, ckpt)
      step = int(state.child.step)
    m = {}
    if use_ctrl and epoch + 1 >= s.controller_start_epoch:
      t0 = time.time()
      ctrl_state, cm = setup.controller_phase(state.ctrl, task.reward_context(state.child),
                                              jax.random.fold_in(setup.keys["ctrl"], epoch))
      state = state.replace(ctrl=ctrl_state)
      cm = common.to_float_dict(cm)
      if not all(math.isfinite(v) for v in cm.values()):
        _raise_nonfinite(step, epoch, ckpt, "a controller metric")
      m.update(cm)
      m["controller/seconds"] = time.time() - t0
    val = float(setup.search_valid(state.child.params, state.ctrl["params"],
                                   jax.random.fold_in(setup.keys["valid"], epoch),
                                   state.child.batch_stats))
    state = state.replace(epochs_done=jnp.int32(epoch + 1),
                          best_valid=better(task, state.best_valid, val))
    m.update({f"valid/{task.metric}": val, "epoch": epoch + 1})
    writer.write(step, m)
    if use_ctrl and common.is_main_process():
      arc = setup.sample_one(state.ctrl["params"], jax.random.fold_in(setup.keys["show"], epoch))
      writer.write_text(step, "controller/sample_arc", setup.space.format(np.asarray(arc)))
    if common.is_main_process():
      extra = "" if "controller/reward" not in m else (
          f" | controller reward {m['controller/reward']:.3f} entropy {m['controller/entropy']:.3f}")
      print(f"epoch {epoch + 1}/{num_epochs} | valid {task.metric} {val:.4g}{extra}", flush=True)
    ckpt.save(step, state, {"stage": "search", "epoch": epoch + 1})
  ckpt.close()
  return state


def derive(setup: SearchSetup, state: SearchState, workdir: str, writer) -> tuple[str, float]:
  """Samples ``derive.num_samples`` arcs, scores each on validation data (PTB:
  perplexity with the state carried across windows; CIFAR: accuracy), no
  dropout, writes ``arcs.jsonl`` (all candidates, best first), ``best_arc.txt``
  and the best arc's diagram. Returns (best arc string, its score)."""
  d, space, task = setup.settings.derive, setup.space, setup.task
  metric = task.metric
  n, batch = d.num_samples, d.batch
  key = setup.keys["derive"]
  sample_many = jax.jit(jax.vmap(setup.sample_arc, in_axes=(None, 0)))
  arcs = np.asarray(sample_many(state.ctrl["params"], jax.random.split(key, n)))
  score = task.make_score_arcs(d.valid_batches)
  scores = []
  for i in range(0, n, batch):
    chunk = arcs[i:i + batch]
    if chunk.shape[0] < batch:  # pad: keep one compiled shape
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - chunk.shape[0], 0)])
    scores.extend(np.asarray(score(state.child.params, jnp.asarray(chunk),
                                   state.child.batch_stats)).tolist()[:n - i])
  scores = np.asarray(scores[:n])
  order = np.argsort(-scores if task.higher_is_better else scores, kind="stable")
  rows = [{"rank": r + 1, "arc": space.format(arcs[j]), f"valid_{metric}": float(scores[j]),
           "sample": int(j)} for r, j in enumerate(order)]
  best = rows[0]
  common.write_text(os.path.join(workdir, "arcs.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
  common.write_text(os.path.join(workdir, "best_arc.txt"), best["arc"] + "\n")
  if common.is_main_process():
    try:
      from enas_jax import visualize
      visualize.write_arc_diagram(space, arcs[order[0]], workdir, stem="best_arc")
    except Exception as e:  # a diagram never fails a finished search
      log.warning("could not draw the best arc: %s", e)
  step = int(state.child.step)
  writer.write(step, {f"derive/best_valid_{metric}": best[f"valid_{metric}"],
                      f"derive/median_valid_{metric}": float(np.median(scores))})
  writer.write_text(step, "derive/best_arc", best["arc"])
  if common.is_main_process():
    print(f"derive: best of {n} arcs has valid {metric} {best[f'valid_{metric}']:.4g} "
          f"(median {np.median(scores):.4g}): {best['arc']}", flush=True)
  return best["arc"], best[f"valid_{metric}"]
