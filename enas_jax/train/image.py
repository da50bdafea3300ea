"""Image-classification task of the CIFAR spaces (macro and micro): data on the
device, jitted child steps, the controller's reward, validation and arc scoring.

The counterpart of :mod:`enas_jax.train.lm` for CIFAR-10; the search and final
loops talk to both through the same methods. Everything is a pure function of
explicit state; :class:`ImageTask` holds static settings and the uint8 images
on the device (150 MB for all of CIFAR-10), and hands out jitted functions.

Child state: ``{"params", "batch_stats", "opt_state", "step"}``. ``step`` counts
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

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from enas_jax import backend, compile_cache, parallel, spaces
from enas_jax.data import cifar10 as cifar_data
from enas_jax.spaces import conv_ops
from enas_jax.train import common

ArcSampler = Callable[[dict, jax.Array], jax.Array]
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


def child_optimizer(child_cfg, schedule) -> optax.GradientTransformation:
  """Clipping (``child.grad_clip_mode``, bound ``child.grad_clip``), then SGD with
  Nesterov momentum (``child.momentum``) on the SGDR schedule. The norm uses
  the kernel set ``child.kernels`` resolves to (for ``child.platform``)."""
  mode = child_cfg.get("grad_clip_mode", "global")
  if mode not in GRAD_CLIP_MODES:
    raise ValueError(f"child.grad_clip_mode must be one of {GRAD_CLIP_MODES}, got {mode!r}.")
  bound = float(child_cfg.get("grad_clip", 0.0))
  if mode == "none" or bound <= 0:
    clip = optax.identity()
  elif mode == "global":
    kernels = backend.resolve_kernels(child_cfg.get("kernels", "auto"),
                                      child_cfg.get("platform", None))
    clip = clip_by_global_norm(bound, kernels)
  else:
    clip = _clip_per_tensor(bound)
  momentum = float(child_cfg.get("momentum", 0.9))
  sgd = optax.sgd(schedule, momentum=momentum if momentum > 0 else None,
                  nesterov=bool(child_cfg.get("nesterov", True)) and momentum > 0)
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


class ImageTask(common.DeviceData):
  """Static settings + device data for training and evaluating CIFAR children.

  Args:
    config: the run's ConfigDict (sections ``data``, ``space``, ``child``, and
      ``search`` or ``final`` for the epoch budget).
    images: an :class:`~enas_jax.data.cifar10.ImageData`.
    mesh: the device mesh; batches are sharded over its ``data`` axis.
    shared: True for the weight-shared search child, False for a fixed child.
    arc: the fixed child's arc (numpy), when ``shared`` is False.
  """

  metric = "acc"  # the validation metric (higher is better)
  higher_is_better = True
  random_bptt = False  # the loops ask; images have fixed-size steps
  item_name = "images"

  def __init__(self, config, images: cifar_data.ImageData, mesh, *, shared: bool, arc=None):
    compile_cache.enable(config=config)  # notebooks too; a user-set cache dir stays
    self.config, self.mesh, self.shared = config, mesh, shared
    self.data = images
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
    self.tokens_per_step = self.batch_size  # items per step (the loops' progress unit)
    self.cutout = int(d.get("cutout_size", 0) or 0)
    self.cutout_anchor = d.get("cutout_anchor", "corner")
    self.fns = ChildFns(config.space.name, config, shared=shared, arc=arc)
    self.aux_weight = float(c.get("aux_weight", 0.0)) if config.child.get("use_aux_heads") else 0.0
    self.l2_reg = float(c.l2_reg)
    section = config.search if shared else config.final
    self.num_epochs = int(section.num_epochs)
    rep = parallel.replicated(mesh)
    # Every process holds all training images (150 MB for CIFAR-10): the
    # in-jit sampler draws any of them. Jitted functions get them as arguments.
    self._set_data("train_x", jax.device_put(images.train_x, rep))
    self._set_data("train_y", jax.device_put(images.train_y, rep))
    self.mean, self.std = jnp.asarray(images.mean), jnp.asarray(images.std)
    # Evaluation sets are cut into whole eval batches (the remainder, if any,
    # is left out and the count reported by eval_sizes).
    self.num_valid_batches = self._eval_split("valid", images.valid_x, images.valid_y)
    self.num_test_batches = self._eval_split("test", images.test_x, images.test_y)
    # All validation images (eval batches may leave a remainder out): each reward
    # draws its minibatch from them afresh (reward_fn).
    if images.num_valid:
      self._set_data("reward_x", jax.device_put(images.valid_x, rep))
      self._set_data("reward_y", jax.device_put(images.valid_y, rep))
    self.reward_batch = min(int(d.get("reward_batch_size", 0) or self.batch_size),
                            max(images.num_valid, 1))
    lr_max, lr_min = float(c.lr_max), float(c.lr_min)
    t0, t_mul = int(c.lr_t0), float(c.lr_t_mul)
    nb = self.num_batches
    self.schedule = lambda step: sgdr_lr(step // nb, lr_max, lr_min, t0, t_mul)
    self.tx = child_optimizer(c, self.schedule)

  def _eval_split(self, name, x, y):
    n = (len(y) // self.eval_batch_size) * self.eval_batch_size
    rep = parallel.replicated(self.mesh)
    self._set_data(f"{name}_x", jax.device_put(x[:n], rep))
    self._set_data(f"{name}_y", jax.device_put(y[:n], rep))
    return n // self.eval_batch_size

  # ------------------------------------------------------------------ state
  @property
  def _rep(self):
    return parallel.replicated(self.mesh)

  def state_shardings(self) -> dict:
    return {"params": self._rep, "opt_state": self._rep, "step": self._rep,
            "batch_stats": self._rep}

  def init_child(self, key: jax.Array) -> dict:
    # As the kernel set initialises (cpu: eagerly, one truncated-normal sample
    # for all weights), then placed with the optimizer state.
    # Host arrays (identical on every process) are valid inputs of a multi-process jit.
    params, stats = jax.tree.map(np.asarray, conv_ops.init_params(
        self.fns.init, key, kernels=self.fns.cfg.kernels))

    def make(params, stats):
      return {"params": params, "batch_stats": stats, "opt_state": self.tx.init(params),
              "step": jnp.int32(0)}
    return jax.jit(make, out_shardings=self.state_shardings())(params, stats)

  def count_params(self, params) -> int:
    return self.fns.count_params(params)

  # ------------------------------------------------------------ child steps
  def _batch(self, step):
    """The training batch of ``step``: position ``step % num_batches`` in the
    permutation of epoch ``step // num_batches``."""
    nb, b = self.num_batches, self.batch_size
    epoch, pos = step // nb, step % nb
    key = jax.random.fold_in(jax.random.key(int(self.config.seed) + 7919), epoch)
    perm = jax.random.permutation(key, self.data.num_train)
    idx = jax.lax.dynamic_slice_in_dim(perm, pos * b, b)
    bs = parallel.batch_sharding(self.mesh, 4)
    x = jax.lax.with_sharding_constraint(self.train_x[idx], bs)
    y = jax.lax.with_sharding_constraint(self.train_y[idx], parallel.batch_sharding(self.mesh, 1))
    return x, y

  def train_step_fn(self, arc_static=None):
    """The pure child update ``(state, arc, key) -> (state, metrics)``.

    With ``arc_static`` (a numpy arc) the arc is baked into the shared child
    (the benchmark's fixed row); a fixed child ignores ``arc``."""
    nan_step = int(self.config.get("debug", {}).get("inject_nan_at_step", -1))
    total_steps = max(1, self.num_epochs * self.num_batches)
    fns, aux_w, l2 = self.fns, self.aux_weight, self.l2_reg

    def step_fn(state, arc, key):
      if arc_static is not None:
        arc = arc_static
      k_aug, k_drop = jax.random.split(key)
      x_u8, y = self._batch(state["step"])
      x = cifar_data.augment(x_u8, k_aug, self.mean, self.std, cutout=self.cutout,
                             cutout_anchor=self.cutout_anchor)
      progress = (state["step"] + 1).astype(jnp.float32) / total_steps

      def loss_fn(params):
        logits, aux_logits, stats = fns.apply(params, state["batch_stats"], arc, x, train=True,
                                              key=k_drop, progress=progress)
        ce, correct = _ce_and_correct(logits, y)
        ce = jnp.mean(ce)
        loss = ce
        if aux_logits is not None and aux_w > 0:
          loss = loss + aux_w * jnp.mean(_ce_and_correct(aux_logits, y)[0])
        if l2 > 0:
          loss = loss + l2 * fns.l2_penalty(params)
        return loss, (ce, jnp.mean(correct), stats)

      (loss, (ce, acc, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
      if nan_step >= 0:  # fault injection for tests (config.debug)
        loss = jnp.where(state["step"] == nan_step, jnp.nan, loss)
      gnorm = conv_ops.global_norm(grads, kernels=fns.cfg.kernels)
      updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      new_state = dict(state, params=params, opt_state=opt_state, batch_stats=stats,
                       step=state["step"] + 1)
      metrics = {"loss": loss, "ce": ce, "acc": acc, "grad_norm": gnorm,
                 "lr": self.schedule(state["step"]),
                 "finite": jnp.isfinite(loss) & jnp.isfinite(gnorm)}
      return new_state, metrics

    return step_fn

  SUM_KEYS = ("loss", "ce", "acc", "grad_norm", "lr")

  def make_train_chunk(self, sample_arc: ArcSampler | None = None, arc_static=None):
    """Jitted ``(state, ctrl_params, key, num_steps) -> (state, sums)``: ``num_steps``
    (traced: one compilation for any count) child updates in one dispatch, each
    with a fresh arc from ``sample_arc`` unless the arc is static or fixed."""
    step_fn = self.train_step_fn(arc_static)
    fresh = sample_arc is not None and arc_static is None and self.shared

    def chunk(state, ctrl_params, key, num_steps):
      def body(carry):
        st, acc = carry
        k = jax.random.fold_in(key, st["step"])
        k_arc, k_step = jax.random.split(k)
        arc = sample_arc(ctrl_params, k_arc) if fresh else None
        step = st["step"]
        st, m = step_fn(st, arc, k_step)
        bad = jnp.where((acc["first_bad"] < 0) & ~m["finite"], step, acc["first_bad"])
        acc = dict({k: acc[k] + m[k] for k in self.SUM_KEYS}, n=acc["n"] + 1, first_bad=bad,
                   epoch_end=jnp.bool_(False), tokens=acc["tokens"] + 1)
        return st, acc

      zero = jnp.float32(0.0)
      acc0 = dict({k: zero for k in self.SUM_KEYS}, n=jnp.int32(0), first_bad=jnp.int32(-1),
                  epoch_end=jnp.bool_(False), tokens=jnp.int32(0))
      return jax.lax.while_loop(lambda c: c[1]["n"] < num_steps, body, (state, acc0))

    return self.jit(chunk, donate_argnums=(0,), out_shardings=(self.state_shardings(), self._rep))

  def progress_metrics(self, prefix: str, sums: dict, n: int) -> dict:
    """The metrics a progress line reports from a chunk's sums."""
    m = {f"{prefix}/{k}": sums[k] / n for k in self.SUM_KEYS}
    return m

  # ------------------------------------------------------------- evaluation
  def _correct(self, params, stats, arc, x_u8, y):
    x = cifar_data.normalize(x_u8, self.mean, self.std)
    logits, _, _ = self.fns.apply(params, stats, arc, x, train=False, key=jax.random.key(0))
    return jnp.sum(_ce_and_correct(logits, y)[1])

  def _eval_batch(self, xs, ys, i):
    b = self.eval_batch_size
    x = jax.lax.dynamic_slice_in_dim(xs, i * b, b)
    y = jax.lax.dynamic_slice_in_dim(ys, i * b, b)
    return (jax.lax.with_sharding_constraint(x, parallel.batch_sharding(self.mesh, 4)),
            jax.lax.with_sharding_constraint(y, parallel.batch_sharding(self.mesh, 1)))

  def _need_valid(self, what: str):
    if self.num_valid_batches == 0:
      raise ValueError(
          f"{what} needs validation images: set data.num_valid > 0 (the search's 5,000) and "
          f"at least data.eval_batch_size={self.eval_batch_size} of them.")

  def reward_indices(self, key: jax.Array) -> jax.Array:
    """The validation images of one reward: ``reward_batch`` distinct indices
    drawn from ``key`` without replacement (jittable): those of the largest of
    one uniform number per image. ``top_k`` rather than
    ``jax.random.permutation``, whose sorts cost ~15x more on the CPU."""
    u = jax.random.uniform(key, (len(self.data.valid_y),))
    return jax.lax.top_k(u, self.reward_batch)[1]

  def reward_fn(self, reward_c: float = 1.0):
    """The controller's reward: ``reward_c`` x accuracy of one arc on a random
    validation minibatch (``data.reward_batch_size``, default the training batch),
    no augmentation, as in the original. Like the original's shuffled
    batch, each call draws distinct images afresh from ``key``
    (:meth:`reward_indices`, on the device)."""
    self._need_valid("the controller's reward")
    b = self.reward_batch

    def reward(arc, key, ctx):
      idx = self.reward_indices(key)
      with self.using(ctx["data"]) if "data" in ctx else contextlib.nullcontext():
        x = jnp.take(self.reward_x, idx, axis=0)
        y = jnp.take(self.reward_y, idx, axis=0)
      return reward_c * self._correct(ctx["params"], ctx["batch_stats"], arc, x, y) / b

    return reward

  def make_search_valid(self, sample_arc: ArcSampler, num_batches: int = 0):
    """Jitted ``(params, ctrl_params, key, stats) -> acc`` on the validation set,
    a freshly sampled arc per eval batch (as the original's search eval)."""
    self._need_valid("search validation")
    E = self.num_valid_batches if num_batches <= 0 else min(num_batches, self.num_valid_batches)

    def valid(params, ctrl_params, key, stats):
      def one(i):
        arc = sample_arc(ctrl_params, jax.random.fold_in(key, i))
        x, y = self._eval_batch(self.valid_x, self.valid_y, i)
        return self._correct(params, stats, arc, x, y)
      return jax.lax.map(one, jnp.arange(E)).sum() / (E * self.eval_batch_size)

    return self.jit(valid)

  def make_score_arcs(self, num_batches: int = 0):
    """Jitted ``(params, arcs[K, A], stats) -> acc[K]``: each arc's validation
    accuracy on the first ``num_batches`` eval batches (all if 0) (derive)."""
    self._need_valid("derive")
    E = self.num_valid_batches if num_batches <= 0 else min(num_batches, self.num_valid_batches)

    def score(params, arcs, stats):
      def one_arc(arc):
        def one(i):
          x, y = self._eval_batch(self.valid_x, self.valid_y, i)
          return self._correct(params, stats, arc, x, y)
        return jax.lax.map(one, jnp.arange(E)).sum() / (E * self.eval_batch_size)
      return jax.lax.map(one_arc, arcs)

    return self.jit(score)

  def _make_fixed_eval(self, split, num):
    def run(params, stats):
      def one(i):
        x, y = self._eval_batch(self.data_arrays[f"{split}_x"], self.data_arrays[f"{split}_y"], i)
        return self._correct(params, stats, None, x, y)
      return jax.lax.map(one, jnp.arange(num)).sum() / (num * self.eval_batch_size)
    return self.jit(run)

  def make_fixed_valid(self, arc_static=None, num_batches: int = 0):
    """Jitted ``(params, stats) -> acc`` of the fixed child on the validation set
    (``None`` when there is none, e.g. final training on all 50,000 images)."""
    if self.num_valid_batches == 0:
      return None
    E = self.num_valid_batches if num_batches <= 0 else min(num_batches, self.num_valid_batches)
    return self._make_fixed_eval("valid", E)

  def make_test_eval(self, arc_static=None):
    """Jitted ``(params, stats) -> acc`` of the fixed child on the test set."""
    if self.num_test_batches == 0:
      raise ValueError("no test images (fewer than data.eval_batch_size).")
    return self._make_fixed_eval("test", self.num_test_batches)


def eval_sizes(task: ImageTask) -> str:
  return (f"valid {task.num_valid_batches * task.eval_batch_size}/{task.data.num_valid}, "
          f"test {task.num_test_batches * task.eval_batch_size}/{task.data.num_test}")


__all__ = ["ImageTask", "ChildFns", "sgdr_lr", "child_optimizer", "eval_sizes"]
