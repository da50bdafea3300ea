"""The task core: what training and evaluating a child does the same way for
every task, written once.

A task (:class:`~enas_jax.train.lm.LMTask`, :class:`~enas_jax.train.image.ImageTask`)
holds static settings and its datasets on the device (``task.data``, a dict of
arrays), and writes only what differs: how a step draws its batch
(:meth:`Task.run_step`), the loss (:meth:`Task.loss`) and evaluation
(:meth:`Task.valid_sum`, :meth:`Task.score_arc`, :meth:`Task.to_metric`).

The step functions here are pure module-level functions of explicit state
with the data as an argument: ``train_step(task, state, data, arc, key)`` runs
on any arrays laid out as ``task.data`` (a notebook may build them itself), and
jitted functions never close over device arrays (in a multi-host run those span
other processes' devices). The ``Task.make_*`` methods jit them with the arc a
traced int32 array (one compilation for every arc) and bind ``task.data``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from enas_jax import exec_cache, parallel
from enas_jax.spaces import base as space_base
from enas_jax.train.settings import RunSettings
from enas_jax.train.state import ChildState

ArcSampler = Callable[[Any, jax.Array], jax.Array]  # (controller params, key) -> arc


class Bound:
  """A jitted ``fn(data, *args)`` called as ``fn(*args)`` with ``task.data``
  (read at call time). ``jitted`` is the jax function (``.lower(data, ...)``);
  calls go through :class:`~enas_jax.exec_cache.CachedJit`, so a restart loads
  the compiled step without tracing it again."""

  def __init__(self, task, fn, *, donate_argnums=(), out_shardings=None):
    self.task = task
    self.cached = exec_cache.CachedJit(fn, donate_argnums=tuple(i + 1 for i in donate_argnums),
                                       out_shardings=out_shardings)
    self.jitted = self.cached.jitted

  def __call__(self, *args):
    return self.cached(self.task.data, *args)

  def _fingerprint_(self):
    return self.cached

  def _cache_size(self) -> int:
    return self.cached._cache_size()


class Task:
  """Static settings shared by every task, the hooks each writes, and the
  jitted functions the loops use.

  Set by the subclass: ``config``, ``mesh``, ``shared``, ``batch_size``,
  ``eval_batch_size``, ``num_batches`` (steps per epoch), ``tokens_per_step``,
  ``tx`` (the child optimizer), ``num_valid_batches`` (validation batches:
  eval_batch_size x bptt windows for PTB), ``data`` (the device arrays) and
  the class attributes below. ``settings``: the run's loop sections, typed
  (:class:`~enas_jax.train.settings.RunSettings`), read from ``config`` when
  not given.
  """

  metric: str  # the validation metric ("ppl" or "acc")
  higher_is_better: bool
  item_name: str  # what a progress line counts ("tokens", "images")
  SUM_KEYS: tuple  # the step metrics a train chunk sums
  random_bptt = False  # variable-length steps: a chunk also stops at an epoch's end
  data: dict

  def __init__(self, config, mesh, *, shared: bool, settings: RunSettings | None = None):
    self.config, self.mesh, self.shared = config, mesh, shared
    self.settings = settings if settings is not None else RunSettings.from_config(config)
    # Fault injection for tests: a NaN loss at this child step (-1: off). A
    # traced value (``data["nan_at_step"]``, :meth:`scalar_data`): the run with
    # the fault and the one without share one compiled program.
    self.inject_nan_at_step = int(config.debug.inject_nan_at_step)

  def _fingerprint_(self) -> dict:
    """What the executable cache's key takes from the task: every attribute but
    ``data``, which the jitted functions take as an argument (its shapes are
    in the key; its values, such as ``total_steps``, are not baked in)."""
    return {k: v for k, v in vars(self).items() if k != "data"}

  # ------------------------------------------------------------ task hooks
  def init_child(self, key: jax.Array) -> ChildState:
    raise NotImplementedError

  def run_step(self, state, data, arc, key, static: bool):
    """Draws the step's batch from ``data`` and returns
    ``apply_update(self, state, arc, key, batch, static)`` (plus step metrics)."""
    raise NotImplementedError

  def loss(self, params, state, arc, batch, key, static: bool):
    """``(loss, (metrics, state_updates))`` of ``params`` (the trained view)."""
    raise NotImplementedError

  def view(self, params, arc, static: bool):
    """The weights a step trains (the shared PTB child: the arc's slices)."""
    return params

  def merge(self, params, arc, new_view, static: bool):
    """``params`` with the trained view written back."""
    return new_view

  def after_update(self, state):
    """The state after an update, for what follows the weights (averaging)."""
    return state

  def grad_norm(self, grads) -> jax.Array:
    return optax.tree.norm(grads)

  def reward_value(self, data, params, batch_stats, arc, key, reward_c: float) -> jax.Array:
    raise NotImplementedError

  def valid_sum(self, data, params, batch_stats, arc, i) -> jax.Array:
    """The metric's sum over validation batch ``i`` (PTB: window ``i``), fresh state."""
    raise NotImplementedError

  def score_arc(self, data, params, batch_stats, arc, num: int, static: bool = False):
    """The metric of one arc on the first ``num`` validation batches (derive)."""
    total = jax.lax.map(lambda i: self.valid_sum(data, params, batch_stats, arc, i),
                        jnp.arange(num)).sum()
    return self.to_metric(total, num)

  def to_metric(self, total, num: int) -> jax.Array:
    raise NotImplementedError

  def check_valid(self, what: str) -> None:
    """Raises when ``what`` needs validation data the task does not have."""

  # ---------------------------------------------------------- shared parts
  @property
  def replicated(self):
    return parallel.replicated(self.mesh)

  def state_shardings(self) -> ChildState:
    """Shardings of the child state: all replicated."""
    rep = self.replicated
    return ChildState(params=rep, opt_state=rep, step=rep, batch_stats=rep)

  def count_params(self, params) -> int:
    """Number of scalars in a parameter pytree (arrays or shapes)."""
    return space_base.count_params(params)

  def progress_metrics(self, prefix: str, sums: dict, n: int) -> dict:
    """The metrics a progress line reports from a chunk's sums."""
    return {f"{prefix}/{k}": sums[k] / n for k in self.SUM_KEYS}

  def num_units(self, num: int) -> int:
    """``num`` validation batches, all when ``num <= 0``."""
    return self.num_valid_batches if num <= 0 else min(num, self.num_valid_batches)

  def reward_context(self, child: ChildState) -> dict:
    """The controller phase's reward context for the child state ``child``."""
    return {"params": child.params, "batch_stats": child.batch_stats, "data": self.data}

  def scalar_data(self, **extra: int) -> dict:
    """Replicated int32 scalars for ``task.data``: ``nan_at_step`` and ``extra``.

    Run settings the step reads (the fault step, the image task's epoch budget)
    travel as data rather than as Python constants, so that runs differing only
    in them (a resume with more epochs, the NaN test) reuse one compilation."""
    vals = dict(nan_at_step=self.inject_nan_at_step, **extra)
    return {k: jax.device_put(np.int32(v), self.replicated) for k, v in vals.items()}

  def jit(self, fn, **kw) -> Bound:
    return Bound(self, fn, **kw)

  def make_train_chunk(self, sample_arc: ArcSampler | None = None, arc_static=None) -> Bound:
    """Jitted ``(state, ctrl_params, key, num_steps) -> (state, sums)`` (:func:`train_chunk`)."""
    # Pin the returned state's layout: otherwise sharding propagation from the
    # batch-sharded data can hand back weights sharded along `data`, and the
    # next call, fed that state, compiles again.
    return self.jit(functools.partial(train_chunk, self, sample_arc, arc_static),
                    donate_argnums=(0,), out_shardings=(self.state_shardings(), self.replicated))

  def reward_fn(self, reward_c: float) -> Callable:
    """The controller's reward ``(arc, key, ctx) -> scalar`` (:func:`reward`)."""
    self.check_valid("the controller's reward")
    return functools.partial(reward, self, float(reward_c))

  def make_search_valid(self, sample_arc: ArcSampler, num: int = 0) -> Bound:
    """Jitted ``(params, ctrl_params, key, stats=None) -> metric`` (:func:`search_valid`)."""
    self.check_valid("search validation")
    return self.jit(functools.partial(search_valid, self, sample_arc, self.num_units(num)))

  def make_score_arcs(self, num: int = 0) -> Bound:
    """Jitted ``(params, arcs[K, A], stats=None) -> metric[K]`` (:func:`score_arcs`)."""
    self.check_valid("derive")
    return self.jit(functools.partial(score_arcs, self, self.num_units(num)))


# ------------------------------------------------------------ step functions
def apply_update(task: Task, state: ChildState, arc, key, batch, static: bool, lr_scale=None):
  """One optimizer step on ``batch``: gradient of ``task.loss``, its norm,
  the optimizer update (scaled by ``lr_scale`` if given). Returns
  ``(state, metrics)`` with ``loss``, ``grad_norm``, ``finite`` and the loss's metrics."""
  view = task.view(state.params, arc, static)
  (loss, (metrics, changes)), grads = jax.value_and_grad(task.loss, has_aux=True)(
      view, state, arc, batch, key, static)
  gnorm = task.grad_norm(grads)
  updates, opt_state = task.tx.update(grads, state.opt_state, view)
  if lr_scale is not None:
    updates = jax.tree_util.tree_map(lambda u: u * lr_scale, updates)
  params = task.merge(state.params, arc, optax.apply_updates(view, updates), static)
  state = task.after_update(state.replace(params=params, opt_state=opt_state,
                                          step=state.step + 1, **changes))
  return state, dict(metrics, loss=loss, grad_norm=gnorm,
                     finite=jnp.isfinite(loss) & jnp.isfinite(gnorm))


def train_step(task: Task, state: ChildState, data: dict, arc, key, arc_static=None):
  """The pure child update ``(state, metrics)`` at ``state.step`` on ``data``
  (arrays laid out as ``task.data``). ``arc``: a traced int32 array, or with
  ``arc_static`` (a numpy arc) the arc is baked in. ``metrics`` also has
  ``tokens`` (items per batch row) and ``epoch_end``. ``data["nan_at_step"]``
  (if present; -1: off) makes the loss NaN at that step (fault injection)."""
  static = arc_static is not None
  new_state, m = task.run_step(state, data, arc_static if static else arc, key, static)
  if "nan_at_step" in data:
    loss = jnp.where(state.step == data["nan_at_step"], jnp.nan, m["loss"])
    m = dict(m, loss=loss, finite=m["finite"] & jnp.isfinite(loss))
  return new_state, m


def train_chunk(task: Task, sample_arc, arc_static, data, state, ctrl_params, key, num_steps):
  """``num_steps`` (a traced scalar: one compilation for any count) child
  updates in one ``while_loop``; each shared step trains a fresh arc
  ``sample_arc(ctrl_params, fold_in(key, step))`` unless ``arc_static`` is
  given. With variable-length steps the chunk also stops at an epoch's end.
  Returns ``(state, sums)``: sums of ``task.SUM_KEYS``, ``n`` steps, ``tokens``,
  ``epoch_end`` and ``first_bad``, the first step whose loss or gradient was not
  finite (-1 if none)."""
  fresh = task.shared and arc_static is None and sample_arc is not None

  def cond(carry):
    more = carry[1]["n"] < num_steps
    return more & ~carry[1]["epoch_end"] if task.random_bptt else more

  def body(carry):
    st, acc = carry
    k_arc, k_step = jax.random.split(jax.random.fold_in(key, st.step))
    arc = sample_arc(ctrl_params, k_arc) if fresh else None
    new, m = train_step(task, st, data, arc, k_step, arc_static)
    bad = jnp.where((acc["first_bad"] < 0) & ~m["finite"], st.step, acc["first_bad"])
    return new, dict({k: acc[k] + m[k] for k in task.SUM_KEYS}, n=acc["n"] + 1, first_bad=bad,
                     epoch_end=m["epoch_end"], tokens=acc["tokens"] + m["tokens"])

  acc0 = dict({k: jnp.float32(0.0) for k in task.SUM_KEYS}, n=jnp.int32(0),
              first_bad=jnp.int32(-1), epoch_end=jnp.bool_(False), tokens=jnp.int32(0))
  return jax.lax.while_loop(cond, body, (state, acc0))


def reward(task: Task, reward_c: float, arc, key, ctx: dict):
  """The controller's reward of one arc; ``ctx``: :meth:`Task.reward_context`."""
  return task.reward_value(ctx["data"], ctx["params"], ctx["batch_stats"], arc, key, reward_c)


def search_valid(task: Task, sample_arc, num: int, data, params, ctrl_params, key, stats=None):
  """Search validation: the first ``num`` validation units, each with a freshly
  sampled arc (``fold_in(key, i)``) and a fresh state."""
  def one(i):
    arc = sample_arc(ctrl_params, jax.random.fold_in(key, i))
    return task.valid_sum(data, params, stats, arc, i)
  return task.to_metric(jax.lax.map(one, jnp.arange(num)).sum(), num)


def score_arcs(task: Task, num: int, data, params, arcs, stats=None):
  """Each arc's validation metric on the first ``num`` units (derive)."""
  return jax.lax.map(lambda a: task.score_arc(data, params, stats, a, num), arcs)
