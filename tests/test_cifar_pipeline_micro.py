"""The micro space end to end: search -> derive -> final on a tiny config (its
resume is the slow variant in test_cifar_pipeline.py).

-m slow (~28 s on the loaded 2 cores): the run's loops, derive and final stage
are the task code the macro pipeline (test_cifar_pipeline.py) runs in the
default suite, and the default suite runs the micro parts on their own: the
search chunk and controller phase (test_parallel_micro.py), the final chunk
(test_task_scalars.py), the child (test_cifar_micro_child.py)."""

import pytest

from conftest import tiny_cifar_config
from enas_jax import metrics as metrics_lib
from enas_jax.train import run as run_lib


@pytest.mark.slow
def test_micro_search_derive_final(tmp_path):
  """Search, derive and final training of the micro space."""
  out = run_lib.run(tiny_cifar_config("cifar_micro", **{"search.num_epochs": 1}),
                    str(tmp_path))
  assert 0.0 <= out["final"]["test_acc"] <= 1.0
  assert len(out["best_arc"].split()) == 8  # one node per cell in the tiny config
  names = set().union(*metrics_lib.read_metrics(str(tmp_path)))
  assert {"child/acc", "controller/reward", "controller/entropy", "valid/acc"} <= names
