"""Final training: one fixed arc trained from scratch, then valid and test
metrics. The state is a :class:`~enas_jax.train.state.FinalState`."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax import metrics as metrics_lib
from enas_jax.train import common
from enas_jax.train.search import better, open_run_state, run_child_epoch_part, worst
from enas_jax.train.settings import RunSettings, settings_for
from enas_jax.train.state import FinalState

log = common.log


class FinalSetup:
  """A fixed arc's jitted train chunk, validation and test (notebook entry point).

  ``settings``: the typed loop settings (defaults to the task's when it was
  built from ``config``, else read from ``config``).
  """

  def __init__(self, config, space, task, arc, *, settings: RunSettings | None = None):
    self.config, self.space, self.task = config, space, task
    self.settings = settings_for(config, task, settings)
    self.arc = space.validate(arc)
    self.child_chunk = task.make_train_chunk(arc_static=self.arc)
    f = self.settings.final
    # Images: valid may be absent (final training on all 50,000 images).
    self.valid = task.make_fixed_valid(self.arc, f.valid_batches)
    if task.metric == "ppl":
      if f.test_batch_size is None or f.test_bptt is None:
        raise ValueError("final.test_batch_size and final.test_bptt are needed by the PTB "
                         "test pass; build the config from configs/ptb.py.")
      self.test = task.make_test_eval(self.arc, f.test_batch_size, f.test_bptt)
    else:
      self.test = task.make_test_eval(self.arc)
    root = jax.random.key(self.settings.seed)
    self.keys = {n: jax.random.fold_in(root, 100 + i) for i, n in enumerate(("child_init", "child"))}

  def init_state(self) -> FinalState:
    return FinalState(child=self.task.init_child(self.keys["child_init"]),
                      epochs_done=jnp.int32(0), best_valid=worst(self.task),
                      # Validation value per epoch (NaN-filled; fixed size so that
                      # checkpoints restore whatever num_epochs says): the averaging trigger.
                      valid_history=jnp.full((HISTORY_CAP,), jnp.nan, jnp.float32),
                      metric=self.task.metric)

  def eval_params(self, state: FinalState):
    """The weights to evaluate: the running average once it holds at least one
    step, else the raw weights (averaging switched on at the last epoch, a budget
    ending at a pass boundary, or ``eval_only`` on the trigger epoch's checkpoint
    would otherwise evaluate the all-zero empty average)."""
    return state.child.avg["params"] if uses_average(state) else state.child.params


def uses_average(state: FinalState) -> bool:
  """Whether evaluation uses the averaged weights: averaging is on and at least
  one step has been averaged (``avg.n``, checkpointed with the state)."""
  avg = getattr(state.child, "avg", None)
  return avg is not None and bool(avg["active"]) and int(avg["n"]) > 0


HISTORY_CAP = 20000


def should_start_averaging(history: list[float], ppl: float, nonmono: int) -> bool:
  """The corrected code's trigger (evaluated before ``ppl`` joins the history):
  more than ``nonmono`` past values exist and ``ppl`` is worse than the best of
  the history excluding its last ``nonmono`` values."""
  return len(history) > nonmono and ppl > min(history[:len(history) - nonmono])


def run_final(setup: FinalSetup, workdir: str, writer) -> dict:
  """Trains (or resumes, or with ``eval_only`` only evaluates) the fixed arc."""
  s, task = setup.settings, setup.task
  ckpt, state, resumed = open_run_state(setup, workdir, "final training")
  if not resumed and s.eval_only:
    raise FileNotFoundError(
        f"eval_only: no checkpoint under {os.path.join(workdir, 'checkpoints')}; "
        f"train first (same command without --config.eval_only) or pass the run's --workdir.")
  num_params = task.count_params(state.child.params)
  if common.is_main_process():
    print(f"final training of arc {setup.space.format(setup.arc)} "
          f"({num_params:,} parameters)", flush=True)
  num_epochs = s.final.num_epochs
  nb = task.num_batches
  budget = num_epochs * nb  # nominal epochs x windows of length bptt, as the corrected code counts
  progress = metrics_lib.Progress(budget, start_step=int(state.child.step),
                                  items_per_step=task.tokens_per_step, item_name=task.item_name)
  while not s.eval_only:
    epoch, step = int(state.epochs_done), int(state.child.step)
    if task.random_bptt:
      # Passes over the data have a random number of steps; the run ends at the
      # step budget (possibly mid-pass).
      if step >= budget:
        break
      end = budget
    else:
      if epoch >= num_epochs:
        break
      end = (epoch + 1) * nb
    state = run_child_epoch_part(setup, state, end, writer, progress, ckpt,
                                 prefix="train", ctrl_params={})
    step = int(state.child.step)
    if task.random_bptt and step >= budget and int(state.child.pos) != 0:
      break  # budget reached mid-pass: straight to the final evaluation
    # PTB: test only at the end (its batch-1 pass is slow); CIFAR: test every
    # epoch, as the original's eval_every_epochs=1.
    m = epoch_metrics(setup, state, with_test=task.metric != "ppl")
    m["epoch"] = epoch + 1
    metric = task.metric
    # The value the history and the best-so-far record follow: validation, or
    # (CIFAR final training on all 50,000 images, no validation set) test.
    watch = m.get(f"valid/{metric}", m.get(f"test/{metric}"))
    avg = getattr(state.child, "avg", None)
    if avg is not None:
      ppl = watch
      hist = np.asarray(state.valid_history)[:epoch].tolist()
      nonmono = s.final.average_nonmono
      if not bool(avg["active"]) and should_start_averaging(hist, ppl, nonmono):
        state = state.replace(child=state.child.replace(avg=dict(avg, active=jnp.bool_(True))))
        if common.is_main_process():
          print(f"epoch {epoch + 1}: valid ppl {ppl:.2f} is worse than the best before the "
                f"last {nonmono} epochs: starting weight averaging", flush=True)
      m["train/averaging"] = float(bool(state.child.avg["active"]))
    if epoch < HISTORY_CAP:
      state = state.replace(valid_history=state.valid_history.at[epoch].set(watch))
    state = state.replace(epochs_done=jnp.int32(epoch + 1),
                          best_valid=better(task, state.best_valid, watch))
    writer.write(step, m)
    if common.is_main_process():
      shown = " | ".join(f"{k} {v:.4g}" for k, v in m.items() if k.startswith(("valid/", "test/")))
      print(f"epoch {epoch + 1} | step {step:,}/{budget:,} | {shown}", flush=True)
    ckpt.save(step, state, {"stage": "final", "epoch": epoch + 1})
  ckpt.close()
  step = int(state.child.step)
  t0 = time.time()
  m = epoch_metrics(setup, state, with_test=True)
  eval_s = time.time() - t0
  result = {"arc": setup.space.format(setup.arc), "num_params": num_params, "step": step}
  for k, v in m.items():
    result[k.replace("/", "_")] = v
  if task.metric == "ppl":
    result.update(test_batch_size=s.final.test_batch_size,
                  test_bptt=s.final.test_bptt, test_seconds=round(eval_s, 1),
                  averaged=uses_average(state))
  else:
    result["eval_seconds"] = round(eval_s, 1)
    params = state.child.params
    aux = params.get("aux") if isinstance(params, dict) else None
    if aux is not None:
      result["num_params_aux_head"] = task.count_params(aux)
  writer.write(step, m)
  common.write_text(os.path.join(workdir, "final_result.json"), json.dumps(result, indent=2) + "\n")
  if common.is_main_process():
    print("final: " + " | ".join(f"{k} {v:.4g}" for k, v in m.items()), flush=True)
  return result


def epoch_metrics(setup: FinalSetup, state: FinalState, with_test: bool) -> dict:
  """``valid/<metric>`` (when a validation split exists) and, with ``with_test``,
  ``test/<metric>`` of the weights to evaluate (the average once it started)."""
  task, params = setup.task, setup.eval_params(state)
  stats = state.child.batch_stats
  m = {}
  if setup.valid is not None:
    m[f"valid/{task.metric}"] = float(setup.valid(params, stats))
  if with_test:
    m[f"test/{task.metric}"] = float(setup.test(params, stats))
  return m
