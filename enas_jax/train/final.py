"""Final training: one fixed arc trained from scratch, then valid and test perplexity."""

from __future__ import annotations

import json
import os

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
            "epochs_done": jnp.int32(0), "best_valid_ppl": jnp.float32(np.inf)}


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
  progress = metrics_lib.Progress(num_epochs * nb, start_step=int(state["child"]["step"]),
                                  items_per_step=task.tokens_per_step, item_name="tokens")
  while not config.eval_only and int(state["epochs_done"]) < num_epochs:
    epoch = int(state["epochs_done"])
    state = run_child_epoch_part(setup, state, (epoch + 1) * nb, writer, progress, ckpt,
                                 config, prefix="train", ctrl_params={})
    step = int(state["child"]["step"])
    ppl = float(setup.valid(state["child"]["params"], state["child"]["batch_stats"]))
    state["epochs_done"] = jnp.int32(epoch + 1)
    state["best_valid_ppl"] = jnp.minimum(state["best_valid_ppl"], ppl)
    writer.write(step, {"valid/ppl": ppl, "epoch": epoch + 1})
    if common.is_main_process():
      print(f"epoch {epoch + 1}/{num_epochs} | valid ppl {ppl:.2f}", flush=True)
    ckpt.save(step, state, {"stage": "final", "epoch": epoch + 1})
  ckpt.close()
  step = int(state["child"]["step"])
  valid_ppl = float(setup.valid(state["child"]["params"], state["child"]["batch_stats"]))
  test_ppl = float(setup.test(state["child"]["params"], state["child"]["batch_stats"]))
  result = {"arc": setup.space.format(setup.arc), "num_params": num_params, "step": step,
            "valid_ppl": valid_ppl, "test_ppl": test_ppl,
            "test_batch_size": int(config.final.test_batch_size),
            "test_bptt": int(config.final.test_bptt)}
  writer.write(step, {"valid/ppl": valid_ppl, "test/ppl": test_ppl})
  common.write_text(os.path.join(workdir, "final_result.json"), json.dumps(result, indent=2) + "\n")
  if common.is_main_process():
    print(f"final: valid ppl {valid_ppl:.2f} | test ppl {test_ppl:.2f}", flush=True)
  return result
