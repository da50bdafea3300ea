"""Run settings the child step reads as traced data (``task.data`` scalars):
the image task's epoch budget (``total_steps``, the drop-path progress) and the
fault step (``nan_at_step``). Runs differing only in them, e.g. a run and its
resume with more epochs, or the NaN test and a plain run, compile one program."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_cifar_config, tiny_ptb_config
from enas_jax import parallel
from enas_jax.data.cifar10 import ImageData
from enas_jax.data.ptb import Corpus
from enas_jax.train import task as task_lib
from enas_jax.train.image import ImageTask
from enas_jax.train.lm import LMTask
from enas_jax.train.run import build_space

MESH = parallel.make_mesh(1)
_RNG = np.random.default_rng(0)
IMAGES = ImageData(
    train_x=_RNG.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
    train_y=_RNG.integers(0, 10, 32).astype(np.int32),
    valid_x=np.zeros((0, 32, 32, 3), np.uint8), valid_y=np.zeros((0,), np.int32),
    test_x=np.zeros((0, 32, 32, 3), np.uint8), test_y=np.zeros((0,), np.int32),
    mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.25, np.float32), source="hand")


def _image_task(space, variant, **over):
  cfg = tiny_cifar_config(space, variant, **over)
  arc = None if variant == "search" else np.asarray(
      build_space(cfg).sample_uniform(jax.random.key(1)))
  return ImageTask(cfg, IMAGES, MESH, shared=arc is None, arc=arc), arc


def _lowered(task, state, arc, data=None, arc_static=None):
  """The StableHLO text of one child step on ``data`` (default ``task.data``):
  equal text, one compilation (the persistent cache's key is the module)."""
  step = jax.jit(functools.partial(task_lib.train_step, task, arc_static=arc_static))
  return step.lower(state, task.data if data is None else data, jnp.asarray(arc),
                    jax.random.key(1)).as_text()


def test_image_tasks_differing_only_in_num_epochs_share_one_program():
  # The fixed micro child reads the progress (drop path's keep probability).
  a, arc = _image_task("cifar_micro", "final", **{"final.num_epochs": 2})
  b, _ = _image_task("cifar_micro", "final", **{"final.num_epochs": 7})
  assert int(a.data["total_steps"]) == 2 * a.num_batches
  assert int(b.data["total_steps"]) == 7 * b.num_batches
  state = a.init_child(jax.random.key(0))
  assert _lowered(a, state, arc, arc_static=arc) == _lowered(b, state, arc, arc_static=arc)
  # With the epoch budget a Python constant (data without the scalar) they differ.
  bare = lambda t: {k: v for k, v in t.data.items() if k != "total_steps"}  # noqa: E731
  assert (_lowered(a, state, arc, bare(a), arc_static=arc)
          != _lowered(b, state, arc, bare(b), arc_static=arc))


def test_progress_is_step_over_total_steps():
  a, arc = _image_task("cifar_micro", "final", **{"final.num_epochs": 3})
  seen = []
  a.loss = lambda params, state, arc, batch, key, static: (  # records the progress
      batch[2] * 0.0 + sum(jnp.sum(x) for x in jax.tree.leaves(params)) * 0.0,
      ({"ce": batch[2], "acc": batch[2]}, {"batch_stats": state.batch_stats}))
  state = a.init_child(jax.random.key(0))
  step = jax.jit(functools.partial(task_lib.train_step, a, arc_static=arc))
  for s in (0, 5, 3 * a.num_batches - 1):
    _, m = step(state.replace(step=jnp.int32(s)), a.data, jnp.asarray(arc), jax.random.key(1))
    seen.append(float(m["ce"]))
  total = 3 * a.num_batches
  np.testing.assert_array_equal(seen, np.float32([1 / total, 6 / total, 1.0]))


def test_nan_fault_step_is_traced_and_only_poisons_that_step():
  a, _ = _image_task("cifar_macro", "search")
  c, _ = _image_task("cifar_macro", "search", **{"debug.inject_nan_at_step": 3})
  assert int(a.data["nan_at_step"]) == -1 and int(c.data["nan_at_step"]) == 3
  state = a.init_child(jax.random.key(0))
  arc = build_space(c.config).sample_uniform(jax.random.key(1))
  assert _lowered(a, state, arc) == _lowered(c, state, arc)
  step = jax.jit(functools.partial(task_lib.train_step, c))
  for s, bad in ((2, False), (3, True)):
    _, m = step(state.replace(step=jnp.int32(s)), c.data, jnp.asarray(arc), jax.random.key(1))
    assert np.isnan(float(m["loss"])) == bad and bool(m["finite"]) != bad


def test_lm_task_carries_the_fault_step():
  cfg = tiny_ptb_config(**{"debug.inject_nan_at_step": 4})
  rng = np.random.default_rng(0)
  V = int(cfg.data.vocab_size)
  corpus = Corpus(*(rng.integers(0, V, n) for n in (400, 200, 100)),
                  vocab=[f"w{i}" for i in range(V)])
  task = LMTask(cfg, corpus, MESH, shared=True)
  assert int(task.data["nan_at_step"]) == 4
