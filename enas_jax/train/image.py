"""Image-classification task of the CIFAR spaces (macro, micro, NAS-Bench-201):
what differs from the language-model task (:mod:`enas_jax.train.task` holds
the rest): how a step draws and augments its batch, the loss, and accuracy.
:class:`ImageTask` holds static settings and the uint8 images on the device
(150 MB for all of CIFAR-10, ``task.data``).

Child state: a :class:`~enas_jax.train.state.ChildState`. ``step`` counts
child updates; it fixes the position in the data (``step % num_batches`` in a
per-epoch permutation drawn from ``fold_in(data_key, epoch)``), the epoch of
the learning-rate schedule, and the randomness (``fold_in(key, step)``).

Training follows the original's CIFAR recipe:
SGD with Nesterov momentum 0.9, cosine learning rate with warm restarts per
epoch (SGDR: T0, Tmul), L2 as ``l2_reg * sum(w^2)`` over every child weight
added to the loss, and gradient clipping that really clips (the original's
per-tensor clip was a no-op).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from enas_jax import compile_cache, parallel, spaces
from enas_jax.data import cifar10 as cifar_data
from enas_jax.spaces import conv_ops
from enas_jax.train import task as task_lib
from enas_jax.train.state import ChildState

GRAD_CLIP_MODES = ("global", "per_tensor", "none")


def sgdr_lr(epoch, lr_max: float, lr_min: float, t0: int, t_mul: float):
  """Cosine learning rate with warm restarts, constant within an epoch.

  Cycle ``i`` lasts ``t0 * t_mul**i`` epochs; inside it
  ``lr = lr_min + (lr_max - lr_min) * (1 + cos(pi * t_cur / t_i)) / 2``. With
  ``t0=10, t_mul=2`` restarts fall at epochs 10, 30, 70, 150, 310, 630 (the
  original's budgets end exactly at a cycle's end). ``epoch`` may be traced.
  """
  lengths = [float(t0)]
  while len(lengths) < 64 and sum(lengths) < 1e7:
    lengths.append(lengths[-1] * t_mul)
  starts = np.concatenate([[0.0], np.cumsum(lengths)[:-1]]).astype(np.float32)
  lengths = np.asarray(lengths, np.float32)
  e = jnp.asarray(epoch, jnp.float32)
  i = jnp.clip(jnp.searchsorted(jnp.asarray(starts), e, side="right") - 1, 0, len(starts) - 1)
  t_cur = e - jnp.asarray(starts)[i]
  t_i = jnp.asarray(lengths)[i]
  return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + jnp.cos(jnp.pi * t_cur / t_i))


def _clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
  """Clips each gradient tensor to norm ``max_norm`` (the original's "norm" mode,
  done right: the clipped gradient is the one applied)."""
  def clip(g):
    n = jnp.sqrt(jnp.sum(jnp.square(g)))
    return g * jnp.minimum(1.0, max_norm / jnp.maximum(n, 1e-12))
  return optax.stateless(lambda updates, params: jax.tree.map(clip, updates))


def clip_by_global_norm(max_norm: float, kernels: str = "xla") -> optax.GradientTransformation:
  """``optax.clip_by_global_norm`` (same rule: if the norm of all gradients
  together is at least ``max_norm``, each is scaled by ``max_norm / norm``), with
  the norm from the kernel set ``kernels`` (``cpu``: one reduction over the
  concatenated leaves; see :func:`conv_ops.sum_of_squares`)."""
  def clip(updates, params):
    del params
    norm = conv_ops.global_norm(updates, kernels=kernels)
    trigger = norm < max_norm
    return jax.tree.map(
        lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm), updates)
  return optax.stateless(clip)


def l2_penalty(params, kernels: str = "xla", *, l2_params=None) -> jax.Array:
  """``sum(w^2)`` over the weights ``l2_params(params)`` selects (the space
  entry's :attr:`~enas_jax.spaces.registry.ImageChild.l2_params`; default all).
  The micro space's leaves out its auxiliary head (``params["aux"]``): the
  original's L2 covered only its optimised variables, which left the aux head
  out (its head was never trained at all, ours is)."""
  if l2_params is not None:
    params = l2_params(params)
  return conv_ops.l2_sum(params, kernels=kernels)


def child_optimizer(child_cfg, schedule, kernels: str = "xla") -> optax.GradientTransformation:
  """Clipping (``child.grad_clip_mode``, bound ``child.grad_clip``), then SGD with
  Nesterov momentum (``child.momentum``) on the SGDR schedule. The global norm
  uses the kernel set ``kernels`` (the child's resolved ``child.kernels``)."""
  mode = child_cfg.grad_clip_mode
  if mode not in GRAD_CLIP_MODES:
    raise ValueError(f"child.grad_clip_mode must be one of {GRAD_CLIP_MODES}, got {mode!r}.")
  bound = float(child_cfg.grad_clip)
  if mode == "none" or bound <= 0:
    clip = optax.identity()
  elif mode == "global":
    clip = clip_by_global_norm(bound, kernels)
  else:
    clip = _clip_per_tensor(bound)
  momentum = float(child_cfg.momentum)
  sgd = optax.sgd(schedule, momentum=momentum if momentum > 0 else None,
                  nesterov=bool(child_cfg.nesterov) and momentum > 0)
  return optax.chain(clip, sgd)


class ChildFns:
  """The child network functions of an image space (its entry's
  :class:`~enas_jax.spaces.registry.ImageChild`), bound to a run config:
  ``init(key) -> (params, batch_stats)`` and
  ``apply(params, batch_stats, arc, images, train, key, progress) -> (logits, aux_logits | None, batch_stats)``.
  ``shared=True`` is the weight-shared search child (``arc`` traced, or a numpy
  arc to bake it in); ``shared=False`` the fixed final child of ``arc``."""

  def __init__(self, space_name: str, config, *, shared: bool, arc=None):
    entry = spaces.entry(space_name)
    if entry.child is None:
      raise ValueError(f"ImageTask serves the image spaces "
                       f"({', '.join(e.name for e in spaces.entries() if e.child)}), "
                       f"not {space_name!r} (task {entry.task!r}).")
    self.child = entry.child()
    self.cfg = self.child.config(config)
    self.shared, self.space_name = shared, space_name
    self.arc = None if arc is None else np.asarray(arc, np.int32)
    if not shared and self.arc is None:
      raise ValueError("the fixed child needs its arc.")

  def init(self, key):
    if self.shared:
      return self.child.init_shared(key, self.cfg)
    return self.child.init_fixed(key, self.cfg, self.arc)

  def apply(self, params, batch_stats, arc, images, *, train, key, progress=0.0):
    if self.shared:
      return self.child.apply_shared(params, batch_stats, arc, images, train=train, key=key,
                                     cfg=self.cfg)
    return self.child.apply_fixed(params, batch_stats, self.arc, images, train=train, key=key,
                                  cfg=self.cfg, progress=progress)

  def l2_penalty(self, params) -> jax.Array:
    """:func:`l2_penalty` over the weights the space's L2 covers."""
    return l2_penalty(params, self.cfg.kernels, l2_params=self.child.l2_params)

  def count_params(self, params) -> int:
    return int(self.child.count_params(params))


def _ce_and_correct(logits, labels):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  ce = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return ce, correct


class ImageTask(task_lib.Task):
  """Static settings + device data for training and evaluating CIFAR children.

  Data (``task.data``, replicated uint8 images and int32 labels): ``train_x``,
  ``train_y``; ``valid_x/_y`` and ``test_x/_y`` cut to whole eval batches;
  ``reward_x/_y`` all validation images (when there are any).

  Args:
    config: the run's ConfigDict (sections ``data``, ``space``, ``child``).
    images: an :class:`~enas_jax.data.cifar10.ImageData`.
    mesh: the device mesh; batches are sharded over its ``data`` axis.
    shared: True for the weight-shared search child, False for a fixed child.
    arc: the fixed child's arc (numpy), when ``shared`` is False.
    settings: the run's typed loop settings (``search`` or ``final`` epochs: the
      epoch budget); read from ``config`` when not given.
  """

  metric = "acc"  # the validation metric (higher is better)
  higher_is_better = True
  item_name = "images"
  SUM_KEYS = ("loss", "ce", "acc", "grad_norm", "lr")

  def __init__(self, config, images: cifar_data.ImageData, mesh, *, shared: bool, arc=None,
               settings=None):
    super().__init__(config, mesh, shared=shared, settings=settings)
    compile_cache.enable(config=config)  # notebooks too; a user-set cache dir stays
    self.images = images
    d, c = config.data, config.child
    self.batch_size = int(d.batch_size)
    self.eval_batch_size = int(d.eval_batch_size)
    parallel.check_divisible(self.batch_size, mesh, "data.batch_size")
    parallel.check_divisible(self.eval_batch_size, mesh, "data.eval_batch_size")
    if images.num_train < self.batch_size:
      raise ValueError(f"data.batch_size = {self.batch_size} exceeds the {images.num_train} "
                       f"training images; lower it.")
    # Fixed-shape steps: an epoch is num_train // batch_size steps over a fresh
    # permutation (the original's ceil() counted a partial last batch).
    self.num_batches = images.num_train // self.batch_size
    self.num_train = images.num_train
    self.tokens_per_step = self.batch_size  # items per step (the loops' progress unit)
    self.cutout = int(d.cutout_size or 0)
    self.cutout_anchor = d.cutout_anchor
    self.fns = ChildFns(config.space.name, config, shared=shared, arc=arc)
    # Only spaces with an auxiliary head (micro) have child.use_aux_heads and aux_weight.
    self.aux_weight = float(c.aux_weight) if "use_aux_heads" in c and c.use_aux_heads else 0.0
    self.l2_reg = float(c.l2_reg)
    self.num_epochs = (self.settings.search if shared else self.settings.final).num_epochs
    # The drop-path progress's denominator, traced (``data["total_steps"]``):
    # one compiled step serves any num_epochs (a run, its resume with more
    # epochs, its final stage).
    self.total_steps = max(1, self.num_epochs * self.num_batches)
    self.data_seed = self.settings.seed + 7919  # the per-epoch permutations' key
    rep = self.replicated
    # Every process holds all training images (150 MB for CIFAR-10): the
    # in-jit sampler draws any of them. Jitted functions get them as arguments.
    self.data = {"train_x": jax.device_put(images.train_x, rep),
                 "train_y": jax.device_put(images.train_y, rep)}
    self.mean, self.std = np.asarray(images.mean), np.asarray(images.std)
    # Evaluation sets are cut into whole eval batches (the remainder, if any,
    # is left out and the count reported by eval_sizes).
    self.num_valid_batches = self._eval_split("valid", images.valid_x, images.valid_y)
    self.num_test_batches = self._eval_split("test", images.test_x, images.test_y)
    # All validation images (eval batches may leave a remainder out): each reward
    # draws its minibatch from them afresh (reward_value).
    if images.num_valid:
      self.data["reward_x"] = jax.device_put(images.valid_x, rep)
      self.data["reward_y"] = jax.device_put(images.valid_y, rep)
    self.num_reward_images = images.num_valid
    self.data.update(self.scalar_data(total_steps=self.total_steps))
    self.reward_batch = min(int(d.reward_batch_size or self.batch_size),
                            max(images.num_valid, 1))
    lr_max, lr_min = float(c.lr_max), float(c.lr_min)
    t0, t_mul = int(c.lr_t0), float(c.lr_t_mul)
    nb = self.num_batches
    self.schedule = lambda step: sgdr_lr(step // nb, lr_max, lr_min, t0, t_mul)
    self.tx = child_optimizer(c, self.schedule, self.fns.cfg.kernels)

  def _eval_split(self, name, x, y):
    n = (len(y) // self.eval_batch_size) * self.eval_batch_size
    self.data[f"{name}_x"] = jax.device_put(x[:n], self.replicated)
    self.data[f"{name}_y"] = jax.device_put(y[:n], self.replicated)
    return n // self.eval_batch_size

  # ------------------------------------------------------------------ state
  def init_child(self, key: jax.Array) -> ChildState:
    # As the kernel set initialises (cpu: eagerly, one truncated-normal sample
    # for all weights), then placed with the optimizer state.
    # Host arrays (identical on every process) are valid inputs of a multi-process jit.
    params, stats = jax.tree.map(np.asarray, conv_ops.init_params(
        self.fns.init, key, kernels=self.fns.cfg.kernels))

    def make(params, stats):
      return ChildState(params=params, opt_state=self.tx.init(params), step=jnp.int32(0),
                        batch_stats=stats)
    return jax.jit(make, out_shardings=self.state_shardings())(params, stats)

  # ------------------------------------------------------------- the step
  def batch(self, data, step):
    """The training batch of ``step``: position ``step % num_batches`` in the
    permutation of epoch ``step // num_batches``."""
    nb, b = self.num_batches, self.batch_size
    epoch, pos = step // nb, step % nb
    key = jax.random.fold_in(jax.random.key(self.data_seed), epoch)
    perm = jax.random.permutation(key, self.num_train)
    idx = jax.lax.dynamic_slice_in_dim(perm, pos * b, b)
    x = jax.lax.with_sharding_constraint(data["train_x"][idx],
                                         parallel.batch_sharding(self.mesh, 4))
    y = jax.lax.with_sharding_constraint(data["train_y"][idx],
                                         parallel.batch_sharding(self.mesh, 1))
    return x, y

  def run_step(self, state, data, arc, key, static):
    """The permuted batch of ``state.step``, augmented (flips, crops, cutout)."""
    k_aug, k_drop = jax.random.split(key)
    x_u8, y = self.batch(data, state.step)
    x = cifar_data.augment(x_u8, k_aug, jnp.asarray(self.mean), jnp.asarray(self.std),
                           cutout=self.cutout, cutout_anchor=self.cutout_anchor)
    total = data.get("total_steps", self.total_steps)  # absent in hand-built data
    progress = (state.step + 1).astype(jnp.float32) / jnp.asarray(total, jnp.float32)
    new_state, m = task_lib.apply_update(self, state, arc, k_drop, (x, y, progress), static)
    return new_state, dict(m, lr=self.schedule(state.step), epoch_end=jnp.bool_(False),
                           tokens=jnp.int32(1))

  def loss(self, params, state, arc, batch, key, static):
    """CE, plus ``aux_weight`` x the auxiliary head's CE, plus ``l2_reg`` x L2."""
    x, y, progress = batch
    logits, aux_logits, stats = self.fns.apply(params, state.batch_stats, arc, x, train=True,
                                               key=key, progress=progress)
    ce, correct = _ce_and_correct(logits, y)
    ce = jnp.mean(ce)
    loss = ce
    if aux_logits is not None and self.aux_weight > 0:
      loss = loss + self.aux_weight * jnp.mean(_ce_and_correct(aux_logits, y)[0])
    if self.l2_reg > 0:
      loss = loss + self.l2_reg * self.fns.l2_penalty(params)
    return loss, ({"ce": ce, "acc": jnp.mean(correct)}, {"batch_stats": stats})

  def grad_norm(self, grads):
    return conv_ops.global_norm(grads, kernels=self.fns.cfg.kernels)

  # ------------------------------------------------------------- evaluation
  def correct(self, params, stats, arc, x_u8, y):
    """Number of correctly classified images of a batch (no augmentation)."""
    x = cifar_data.normalize(x_u8, jnp.asarray(self.mean), jnp.asarray(self.std))
    logits, _, _ = self.fns.apply(params, stats, arc, x, train=False, key=jax.random.key(0))
    return jnp.sum(_ce_and_correct(logits, y)[1])

  def eval_batch(self, data, split: str, i):
    """Eval batch ``i`` of ``split`` (``valid`` or ``test``), batch-sharded."""
    b = self.eval_batch_size
    x = jax.lax.dynamic_slice_in_dim(data[f"{split}_x"], i * b, b)
    y = jax.lax.dynamic_slice_in_dim(data[f"{split}_y"], i * b, b)
    return (jax.lax.with_sharding_constraint(x, parallel.batch_sharding(self.mesh, 4)),
            jax.lax.with_sharding_constraint(y, parallel.batch_sharding(self.mesh, 1)))

  def check_valid(self, what: str):
    if self.num_valid_batches == 0:
      raise ValueError(
          f"{what} needs validation images: set data.num_valid > 0 (the search's 5,000) and "
          f"at least data.eval_batch_size={self.eval_batch_size} of them.")

  def reward_indices(self, key: jax.Array) -> jax.Array:
    """The validation images of one reward: ``reward_batch`` distinct indices
    drawn from ``key`` without replacement (jittable): those of the largest of
    one uniform number per image. ``top_k`` rather than
    ``jax.random.permutation``, whose sorts cost ~15x more on the CPU."""
    u = jax.random.uniform(key, (self.num_reward_images,))
    return jax.lax.top_k(u, self.reward_batch)[1]

  def reward_value(self, data, params, batch_stats, arc, key, reward_c):
    """``reward_c`` x accuracy of one arc on a random validation minibatch
    (``data.reward_batch_size``, default the training batch), no augmentation,
    as in the original. Like the original's shuffled batch, each call draws
    distinct images afresh from ``key`` (:meth:`reward_indices`, on the device)."""
    idx = self.reward_indices(key)
    x = jnp.take(data["reward_x"], idx, axis=0)
    y = jnp.take(data["reward_y"], idx, axis=0)
    return reward_c * self.correct(params, batch_stats, arc, x, y) / self.reward_batch

  def valid_sum(self, data, params, batch_stats, arc, i):
    return self.correct(params, batch_stats, arc, *self.eval_batch(data, "valid", i))

  def to_metric(self, total, num):
    return total / (num * self.eval_batch_size)

  def make_fixed_valid(self, arc_static=None, num_batches: int = 0):
    """Jitted ``(params, stats) -> acc`` of the fixed child on the validation set
    (``None`` when there is none, e.g. final training on all 50,000 images)."""
    if self.num_valid_batches == 0:
      return None
    return self.jit(functools.partial(fixed_eval, self, "valid", self.num_units(num_batches)))

  def make_test_eval(self, arc_static=None):
    """Jitted ``(params, stats) -> acc`` of the fixed child on the test set."""
    if self.num_test_batches == 0:
      raise ValueError("no test images (fewer than data.eval_batch_size).")
    return self.jit(functools.partial(fixed_eval, self, "test", self.num_test_batches))


def fixed_eval(task: ImageTask, split: str, num: int, data, params, stats):
  """Accuracy of the fixed child on the first ``num`` eval batches of ``split``."""
  total = jax.lax.map(
      lambda i: task.correct(params, stats, None, *task.eval_batch(data, split, i)),
      jnp.arange(num)).sum()
  return task.to_metric(total, num)


def eval_sizes(task: ImageTask) -> str:
  return (f"valid {task.num_valid_batches * task.eval_batch_size}/{task.images.num_valid}, "
          f"test {task.num_test_batches * task.eval_batch_size}/{task.images.num_test}")


__all__ = ["ImageTask", "ChildFns", "sgdr_lr", "child_optimizer", "eval_sizes"]
