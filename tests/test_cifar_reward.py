"""The CIFAR controller reward draws a fresh minibatch of distinct validation
images per call, from its key, with one compilation (enas_jax/train/image.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_cifar_config
from enas_jax import data as data_lib
from enas_jax import parallel
from enas_jax.train.image import ImageTask
from enas_jax.train.run import build_space


def _task(**over):
  cfg = tiny_cifar_config("cifar_macro", "search", **over)
  return ImageTask(cfg, data_lib.load_images(cfg.data), parallel.make_mesh(), shared=True), cfg


def test_reward_indices_are_fresh_distinct_and_not_windows():
  task, _ = _task()  # 32 validation images, reward batch 8
  n, b = len(task.images.valid_y), task.reward_batch
  assert (n, b) == (32, 8)
  draw = jax.jit(jax.vmap(task.reward_indices))
  idx = np.asarray(draw(jax.random.split(jax.random.key(0), 4000)))
  assert idx.shape == (4000, b)
  assert all(len(set(row)) == b for row in idx)  # distinct within one reward
  assert set(idx[0]) != set(idx[1])  # another key, another set
  # Windows of a fixed order would reach the order's first and last images
  # once per n - b + 1 = 25 draws (4%), the middle ones 8 times as often; a
  # fresh draw takes every image with probability b / n = 25%.
  freq = np.bincount(idx.ravel(), minlength=n) / len(idx)
  assert freq.min() > 0.2 and freq.max() < 0.3, freq


def test_reward_uses_the_drawn_images_and_compiles_once():
  task, cfg = _task()
  space = build_space(cfg)
  # The child's scorer replaced by "sum of the images' labels" (the real child's
  # reward runs in the pipeline tests): the reward is then the label sum of
  # reward_indices(key), which tells which images it used.
  task.correct = lambda params, stats, arc, x, y: jnp.sum(y).astype(jnp.float32)  # noqa
  reward = jax.jit(task.reward_fn(float(task.reward_batch)))
  ctx = {"params": {}, "batch_stats": {}, "data": task.data}
  y = np.asarray(task.images.valid_y)
  for k in range(4):
    key = jax.random.key(k)
    arc = jnp.asarray(space.sample_uniform(jax.random.key(100 + k)))
    want = y[np.asarray(task.reward_indices(key))].sum()
    assert float(reward(arc, key, ctx)) == want
  assert reward._cache_size() == 1  # a new key or arc is no new compile
