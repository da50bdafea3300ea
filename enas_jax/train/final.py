"""Final training: one fixed arc trained from scratch, then valid and test perplexity."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from enas_jax import metrics as metrics_lib
from enas_jax.spaces import ptb_child
from enas_jax.train import common
from enas_jax.train.search import open_run_state, run_child_epoch_part

log = common.log


class FinalSetup:
  """A fixed arc's jitted train chunk, validation and test (notebook entry point)."""

  def __init__(self, config, space, task, arc):
    self.config, self.space, self.task = config, space, task
    self.arc = space.validate(arc)
    self.child_chunk = task.make_train_chunk(arc_static=self.arc)
    self.valid = task.make_fixed_valid(self.arc, int(config.final.valid_windows))
    self.test = task.make_test_eval(self.arc, int(config.final.test_batch_size),
                                    int(config.final.test_bptt))
    root = jax.random.key(int(config.seed))
    self.keys = {n: jax.random.fold_in(root, 100 + i) for i, n in enumerate(("child_init", "child"))}

  def init_state(self) -> dict:
    return {"child": self.task.init_child(self.keys["child_init"]),
            "epochs_done": jnp.int32(0), "best_valid_ppl": jnp.float32(np.inf),
            # Validation perplexity per epoch (NaN-filled; fixed size so that
            # checkpoints restore whatever num_epochs says): the averaging trigger.
            "valid_history": jnp.full((HISTORY_CAP,), jnp.nan, jnp.float32)}

  def eval_params(self, state) -> dict:
    """The weights to evaluate: the running average once averaging started."""
    child = state["child"]
    if "avg" in child and bool(child["avg"]["active"]):
      return child["avg"]["params"]
    return child["params"]


HISTORY_CAP = 20000


def should_start_averaging(history: list[float], ppl: float, nonmono: int) -> bool:
  """The corrected code's trigger (evaluated before ``ppl`` joins the history):
  more than ``nonmono`` past values exist and ``ppl`` is worse than the best of
  the history excluding its last ``nonmono`` values."""
  return len(history) > nonmono and ppl > min(history[:-nonmono])


def run_final(setup: FinalSetup, workdir: str, writer) -> dict:
  """Trains (or resumes, or with ``eval_only`` only evaluates) the fixed arc."""
  config, task = setup.config, setup.task
  ckpt, state, resumed = open_run_state(setup, workdir, "final training")
  if not resumed and config.eval_only:
    raise FileNotFoundError(
        f"eval_only: no checkpoint under {os.path.join(workdir, 'checkpoints')}; "
        f"train first (same command without --config.eval_only) or pass the run's --workdir.")
  num_params = ptb_child.count_params(state["child"]["params"])
  if common.is_main_process():
    print(f"final training of arc {setup.space.format(setup.arc)} "
          f"({num_params:,} parameters)", flush=True)
  num_epochs = int(config.final.num_epochs)
  nb = task.num_batches
  budget = num_epochs * nb  # nominal epochs x windows of length bptt, as the corrected code counts
  nonmono = int(config.final.get("average_nonmono", 10))
  progress = metrics_lib.Progress(budget, start_step=int(state["child"]["step"]),
                                  items_per_step=task.tokens_per_step, item_name="tokens")
  while not config.eval_only:
    epoch, step = int(state["epochs_done"]), int(state["child"]["step"])
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
                                 config, prefix="train", ctrl_params={})
    step = int(state["child"]["step"])
    if task.random_bptt and step >= budget and int(state["child"]["pos"]) != 0:
      break  # budget reached mid-pass: straight to the final evaluation
    ppl = float(setup.valid(setup.eval_params(state), state["child"]["batch_stats"]))
    hist = np.asarray(state["valid_history"])[:epoch].tolist()
    m = {"valid/ppl": ppl, "epoch": epoch + 1}
    if "avg" in state["child"]:
      avg = state["child"]["avg"]
      if not bool(avg["active"]) and should_start_averaging(hist, ppl, nonmono):
        state["child"]["avg"] = dict(avg, active=jnp.bool_(True))
        if common.is_main_process():
          print(f"epoch {epoch + 1}: valid ppl {ppl:.2f} is worse than the best before the "
                f"last {nonmono} epochs: starting weight averaging", flush=True)
      m["train/averaging"] = float(bool(state["child"]["avg"]["active"]))
    if epoch < HISTORY_CAP:
      state["valid_history"] = state["valid_history"].at[epoch].set(ppl)
    state["epochs_done"] = jnp.int32(epoch + 1)
    state["best_valid_ppl"] = jnp.minimum(state["best_valid_ppl"], ppl)
    writer.write(step, m)
    if common.is_main_process():
      print(f"epoch {epoch + 1} | step {step:,}/{budget:,} | valid ppl {ppl:.2f}", flush=True)
    ckpt.save(step, state, {"stage": "final", "epoch": epoch + 1})
  ckpt.close()
  step = int(state["child"]["step"])
  params = setup.eval_params(state)
  valid_ppl = float(setup.valid(params, state["child"]["batch_stats"]))
  t0 = time.time()
  test_ppl = float(setup.test(params, state["child"]["batch_stats"]))
  test_s = time.time() - t0
  result = {"arc": setup.space.format(setup.arc), "num_params": num_params, "step": step,
            "valid_ppl": valid_ppl, "test_ppl": test_ppl,
            "test_batch_size": int(config.final.test_batch_size),
            "test_bptt": int(config.final.test_bptt), "test_seconds": round(test_s, 1),
            "averaged": bool("avg" in state["child"] and bool(state["child"]["avg"]["active"]))}
  writer.write(step, {"valid/ppl": valid_ppl, "test/ppl": test_ppl})
  common.write_text(os.path.join(workdir, "final_result.json"), json.dumps(result, indent=2) + "\n")
  if common.is_main_process():
    print(f"final: valid ppl {valid_ppl:.2f} | test ppl {test_ppl:.2f}", flush=True)
  return result
