"""The task core (enas_jax/train/task.py) and the typed states (state.py): a
train step is a module-level function of arrays a caller builds itself, and
the states keep the checkpoint layout of the earlier string-keyed dicts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_cifar_config, tiny_ptb_config
from enas_jax import checkpoint as ckpt_lib
from enas_jax import parallel
from enas_jax.data.cifar10 import ImageData
from enas_jax.data.ptb import Corpus
from enas_jax.train import task as task_lib
from enas_jax.train.image import ImageTask
from enas_jax.train.lm import LMTask
from enas_jax.train.run import build_space
from enas_jax.train.state import ChildState, FinalState, LMChildState, SearchState

MESH = parallel.make_mesh(1)


def _changed(a, b) -> bool:
  return any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_lm_train_step_on_arrays_built_by_hand():
  cfg = tiny_ptb_config()
  rng = np.random.default_rng(0)
  V = int(cfg.data.vocab_size)
  corpus = Corpus(*(rng.integers(0, V, n) for n in (400, 200, 100)),
                  vocab=[f"w{i}" for i in range(V)])
  task = LMTask(cfg, corpus, MESH, shared=True)
  # Other tokens than the task's own, in the layout of task.data.
  data = {"train": jnp.asarray(rng.integers(0, V, task.data["train"].shape), jnp.int32)}
  state = task.init_child(jax.random.key(0))
  before = jax.tree.map(np.asarray, state.params)
  arc = jnp.asarray(build_space(cfg).sample_uniform(jax.random.key(1)))
  step = jax.jit(functools.partial(task_lib.train_step, task))
  new, m = step(state, data, arc, jax.random.key(2))
  assert np.isfinite(float(m["loss"])) and bool(m["finite"])
  assert int(new.step) == 1 and _changed(before, new.params)
  # The data is an argument: other tokens, another loss, the same compilation.
  data2 = {"train": (data["train"] + 1) % V}
  _, m2 = step(state, data2, arc, jax.random.key(2))
  assert float(m2["loss"]) != float(m["loss"]) and step._cache_size() == 1


def test_image_train_step_on_arrays_built_by_hand():
  cfg = tiny_cifar_config("cifar_macro", "search")
  rng = np.random.default_rng(0)
  n = 32
  images = ImageData(
      train_x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
      train_y=rng.integers(0, 10, n).astype(np.int32),
      valid_x=np.zeros((0, 32, 32, 3), np.uint8), valid_y=np.zeros((0,), np.int32),
      test_x=np.zeros((0, 32, 32, 3), np.uint8), test_y=np.zeros((0,), np.int32),
      mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.25, np.float32), source="hand")
  task = ImageTask(cfg, images, MESH, shared=True)
  data = {"train_x": jnp.asarray(rng.integers(0, 256, (n, 32, 32, 3)), jnp.uint8),
          "train_y": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}
  state = task.init_child(jax.random.key(0))
  before = jax.tree.map(np.asarray, state.params)
  arc = jnp.asarray(build_space(cfg).sample_uniform(jax.random.key(1)))
  new, m = jax.jit(functools.partial(task_lib.train_step, task))(state, data, arc,
                                                                  jax.random.key(2))
  assert np.isfinite(float(m["loss"])) and bool(m["finite"])
  assert int(new.step) == 1 and _changed(before, new.params)


def _lm_child(avg=None):
  return LMChildState(params={"w": jnp.ones(3)}, opt_state=(), step=jnp.int32(7),
                      batch_stats={}, h=jnp.zeros((2, 3)), pos=jnp.int32(4), avg=avg)


def test_checkpoint_layout_is_the_dict_keys_of_before():
  from flax import serialization
  s = SearchState(child=_lm_child(), ctrl={"params": {"a": jnp.ones(2)}},
                  epochs_done=jnp.int32(3), best_valid=jnp.float32(50.0), metric="ppl")
  d = serialization.to_state_dict(s)
  assert set(d) == {"child", "ctrl", "epochs_done", "best_valid_ppl"}
  assert set(d["child"]) == {"params", "opt_state", "step", "batch_stats", "h", "pos"}
  avg = {"params": {"w": jnp.zeros(3)}, "n": jnp.int32(0), "active": jnp.bool_(False)}
  f = FinalState(child=_lm_child(avg), epochs_done=jnp.int32(0), best_valid=jnp.float32(0.5),
                 valid_history=jnp.zeros(4), metric="acc")
  d = serialization.to_state_dict(f)
  assert set(d) == {"child", "epochs_done", "best_valid_acc", "valid_history"}
  assert "avg" in d["child"]
  img = ChildState(params={"w": jnp.ones(2)}, opt_state=(), step=jnp.int32(0), batch_stats={})
  assert set(serialization.to_state_dict(img)) == {"params", "opt_state", "step", "batch_stats"}


def test_a_checkpoint_of_the_old_dict_state_restores_into_the_typed_state(tmp_path):
  old = {"child": {"params": {"w": jnp.arange(3.0)}, "opt_state": (), "step": jnp.int32(7),
                   "batch_stats": {}, "h": jnp.full((2, 3), 0.5), "pos": jnp.int32(4)},
         "ctrl": {"params": {"a": jnp.full(2, 2.0)}}, "epochs_done": jnp.int32(3),
         "best_valid_ppl": jnp.float32(42.0)}
  with ckpt_lib.Checkpointer(tmp_path / "ck") as ck:
    ck.save(7, old, {"stage": "search"})
    target = SearchState(child=_lm_child(), ctrl={"params": {"a": jnp.zeros(2)}},
                         epochs_done=jnp.int32(0), best_valid=jnp.float32(np.inf), metric="ppl")
    state, meta = ck.restore(target)
  assert isinstance(state, SearchState) and isinstance(state.child, LMChildState)
  assert int(state.child.step) == 7 and int(state.child.pos) == 4 and int(state.epochs_done) == 3
  assert float(state.best_valid) == 42.0 and meta == {"stage": "search"}
  np.testing.assert_array_equal(state.child.params["w"], np.arange(3.0))
  np.testing.assert_array_equal(state.ctrl["params"]["a"], 2.0)
