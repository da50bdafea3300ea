"""REINFORCE for the ENAS controller: baseline, loss, optimiser, train step.

Follows the original (``melodyguan/enas`` ``get_train_ops`` and the
controllers):

* reward ``R = reward_fn(arc) + entropy_weight · entropy`` (the entropy bonus
  goes into the reward, not the loss; it is stop-gradient);
* an EMA baseline updated per sample *before* that sample's advantage is
  taken: ``b ← b − (1 − decay)(b − R)``, ``A = R − b``; ``b`` starts at 0;
* loss ``−log p(arc) · A``, gradients averaged over ``num_aggregate`` arcs
  (the original's ``SyncReplicasOptimizer``), one Adam step (β1 = 0,
  ε = 1e-3, ε placed as TensorFlow 1 did), no clipping, no L2;
* extra terms that go into the *loss* (the macro skip penalty) come through
  ``extra_loss_fn``.

Everything is pure and jittable; the sampled arcs never leave the device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from enas_jax import controller as ctrl
from enas_jax.spaces.base import BITS, Decisions

METRIC_KEYS = (
    "controller/reward",
    "controller/total_reward",
    "controller/entropy",
    "controller/log_prob",
    "controller/baseline",
    "controller/loss",
    "controller/advantage",
    "controller/grad_norm",
)


def sequential_baseline(baseline: jax.Array, rewards: jax.Array,
                        decay: float) -> tuple[jax.Array, jax.Array]:
  """Runs the EMA baseline over ``rewards`` in order.

  For each ``R_k``: ``b ← b − (1 − decay)(b − R_k)``, then
  ``advantage_k = R_k − b`` (update first, then use, as the original
  code does). Returns ``(new_baseline, advantages[K])``.
  """
  rewards = jnp.asarray(rewards, jnp.float32)

  def body(b, r):
    b = b - (1.0 - decay) * (b - r)
    return b, r - b

  return jax.lax.scan(body, jnp.asarray(baseline, jnp.float32), rewards)


def policy_loss(log_probs: jax.Array, advantages: jax.Array) -> jax.Array:
  """``mean_k(−log_prob_k · stop_gradient(advantage_k))``.

  The mean over the K arcs averages their REINFORCE gradients, which is what the
  original's ``SyncReplicasOptimizer`` (``replicas_to_aggregate = K``) did.
  """
  return jnp.mean(-log_probs * jax.lax.stop_gradient(advantages))


ADAM_FORMS = ("tf1", "optax")


def _scale_by_tf_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """Adam with TensorFlow 1's epsilon placement (direction only, no lr).

  TF1's ``AdamOptimizer`` steps by ``lr·√(1−β2^t)/(1−β1^t) · m / (√v + ε)`` with
  the *uncorrected* ``v``; optax adds ε to the bias-corrected ``√v̂``. So a TF1
  ε equals an optax ε of ``ε/√(1−β2^t)``: about 31× larger at step 1 with
  β2 = 0.999, which damps the controller's first updates when ε = 1e-3. The
  state is optax's ``ScaleByAdamState`` (same moments), so checkpoints of
  either form have one layout.
  """
  def init_fn(params):
    return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32),
                                  mu=jax.tree.map(jnp.zeros_like, params),
                                  nu=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, updates)
    t = count.astype(jnp.float32)
    scale = jnp.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
    new = jax.tree.map(lambda m, v: scale * m / (jnp.sqrt(v) + eps), mu, nu)
    return new, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(learning_rate: Any, b1: float = 0.0, b2: float = 0.999, eps: float = 1e-3,
                   *, form: str = "tf1") -> optax.GradientTransformation:
  """The controller's Adam: β1 = 0, β2 = 0.999, ε = 1e-3 (the seed code's values).

  ``learning_rate`` is a float or an optax schedule. ``form="tf1"`` (default)
  places ε as TensorFlow 1's ``AdamOptimizer`` did, which both original codes
  used (see :func:`_scale_by_tf_adam`); ``form="optax"`` is exactly
  ``optax.adam``. ``enas_lm`` used TF's defaults ``b1=0.9, eps=1e-8`` instead.
  """
  if form == "optax":
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  if form != "tf1":
    raise ValueError(f"controller.adam_form must be one of {ADAM_FORMS}, got {form!r}.")
  return optax.chain(_scale_by_tf_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate))


def init_state(rng: jax.Array, decisions: Decisions, cfg: ctrl.ControllerConfig,
               optimizer: optax.GradientTransformation) -> dict:
  """A fresh controller training state.

  ``dict(params, opt_state, baseline=float32 0., step=int32 0)``; ``step``
  counts optimiser updates (one per ``num_aggregate`` arcs, as the original's
  ``train_step``).
  """
  params = ctrl.init(rng, decisions, cfg)
  return {
      "params": params,
      "opt_state": optimizer.init(params),
      "baseline": jnp.zeros((), jnp.float32),
      "step": jnp.zeros((), jnp.int32),
  }


@dataclasses.dataclass(frozen=True)
class ControllerSettings:
  """The run config's ``controller`` section, read and checked once.

  ``net`` is the network's :class:`~enas_jax.controller.ControllerConfig`; the
  other fields are the REINFORCE training settings (their meaning and sources:
  the configs' comments). Frozen (hashable): build it at the top with
  :meth:`from_config` and pass it down instead of the ConfigDict.
  """

  net: ctrl.ControllerConfig
  lr: float
  num_aggregate: int
  train_steps: int
  entropy_weight: float
  baseline_decay: float
  reward_c: float
  adam_b1: float = 0.0
  adam_eps: float = 1e-3
  adam_form: str = "tf1"
  skip_target: float = 0.4
  skip_weight: float = 0.0  # 0: no skip penalty

  def __post_init__(self):
    def bad(name, want):
      raise ValueError(f"controller.{name} must be {want}, got {getattr(self, name)!r}.")
    for name in ("num_aggregate", "train_steps"):
      if int(getattr(self, name)) < 1:
        bad(name, ">= 1")
    if not float(self.lr) > 0:
      bad("lr", "> 0")
    if not 0.0 <= float(self.baseline_decay) <= 1.0:
      bad("baseline_decay", "in [0, 1]")
    if not 0.0 <= float(self.adam_b1) < 1.0:
      bad("adam_b1", "in [0, 1)")
    if not float(self.adam_eps) >= 0:
      bad("adam_eps", ">= 0")
    if self.adam_form not in ADAM_FORMS:
      bad("adam_form", f"one of {ADAM_FORMS}")
    for name in ("entropy_weight", "reward_c"):
      if not math.isfinite(float(getattr(self, name))):
        bad(name, "finite")
    if not float(self.skip_weight) >= 0:
      bad("skip_weight", ">= 0 (0 turns the skip penalty off)")
    if float(self.skip_weight) > 0 and not 0.0 < float(self.skip_target) < 1.0:
      bad("skip_target", "in (0, 1) when skip_weight > 0")

  @classmethod
  def from_config(cls, section: Any) -> "ControllerSettings":
    """From a run config's ``controller`` section (a ConfigDict or a mapping).

    Every training field is required; ``skip_target``/``skip_weight`` are
    optional because only the spaces with skip decisions (macro) have them in
    their schema. ``net`` is ``ControllerConfig.from_config(section)``.
    """
    required = ("lr", "num_aggregate", "train_steps", "entropy_weight", "baseline_decay",
                "reward_c", "adam_b1", "adam_eps", "adam_form")
    missing = [k for k in required if k not in section]
    if missing:
      raise ValueError(f"the controller config section has no {missing}; build it from one "
                       f"of configs/*.py (enas_jax.config_base declares these fields).")
    f = {k: section[k] for k in required}
    optional = {k: float(section[k]) for k in ("skip_target", "skip_weight") if k in section}
    return cls(
        net=ctrl.ControllerConfig.from_config(section), lr=float(f["lr"]),
        num_aggregate=int(f["num_aggregate"]), train_steps=int(f["train_steps"]),
        entropy_weight=float(f["entropy_weight"]), baseline_decay=float(f["baseline_decay"]),
        reward_c=float(f["reward_c"]), adam_b1=float(f["adam_b1"]),
        adam_eps=float(f["adam_eps"]), adam_form=str(f["adam_form"]), **optional)

  def optimizer(self) -> optax.GradientTransformation:
    """The controller's Adam (:func:`make_optimizer`) with these settings."""
    return make_optimizer(self.lr, b1=self.adam_b1, eps=self.adam_eps, form=self.adam_form)

  def extra_loss_fn(self, decisions: Decisions) -> Optional[Callable[[dict, jax.Array],
                                                                      jax.Array]]:
    """The skip penalty (:func:`make_skip_penalty`) when ``skip_weight > 0``, else None."""
    if self.skip_weight > 0:
      return make_skip_penalty(decisions, self.net, skip_target=self.skip_target,
                               skip_weight=self.skip_weight)
    return None


RewardFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def make_train_step(decisions: Decisions,
                    cfg: ctrl.ControllerConfig,
                    optimizer: optax.GradientTransformation,
                    reward_fn: RewardFn,
                    *,
                    num_aggregate: int,
                    entropy_weight: float,
                    baseline_decay: float,
                    extra_loss_fn: Optional[Callable[[dict, jax.Array], jax.Array]] = None):
  """Builds ``train_step(ctrl_state, reward_ctx, rng) -> (ctrl_state, metrics)``.

  One step = one controller update: sample ``num_aggregate`` arcs, reward each
  with ``reward_fn(arc, rng_k, reward_ctx) -> scalar`` (run one arc at a time
  with ``lax.map``: the reward runs a child network with ``lax.switch``, which
  ``vmap`` would turn into a select over all branches), add the entropy bonus,
  advance the baseline sample by sample, and take one optimiser step on the
  mean REINFORCE loss (+ ``extra_loss_fn(params, arcs[K, arc_length])`` if
  given). ``reward_ctx`` is any pytree of arrays (child params, validation
  data, ...). The returned function is pure; jit it (it is not jitted here so
  it can be composed, e.g. in :func:`make_train_phase`).

  Metrics (float32 scalars, means over the K arcs unless noted):
  ``controller/reward`` (reward_fn value, no entropy bonus),
  ``controller/total_reward``, ``controller/entropy`` (per
  ``cfg.entropy_mode``), ``controller/log_prob``, ``controller/baseline``
  (the baseline after this step's K updates: the value the original logged),
  ``controller/loss`` (total loss incl. extra term), ``controller/advantage``,
  ``controller/grad_norm`` (global norm of the averaged gradient), and
  ``controller/extra_loss`` when ``extra_loss_fn`` is given.
  """
  num_aggregate = int(num_aggregate)
  if num_aggregate < 1:
    raise ValueError(f"make_train_step: num_aggregate must be >= 1, got {num_aggregate}.")
  entropy_weight = float(entropy_weight)
  baseline_decay = float(baseline_decay)

  def sample_one(params, key):
    return ctrl.sample(params, key, decisions, cfg)

  def loss_fn(params, arcs, advantages):
    scored = jax.vmap(lambda a: ctrl.log_prob(params, a, decisions, cfg))(arcs)
    loss = policy_loss(scored["log_prob"], advantages)
    extra = jnp.zeros((), jnp.float32)
    if extra_loss_fn is not None:
      extra = jnp.asarray(extra_loss_fn(params, arcs), jnp.float32)
    return loss + extra, (scored["log_prob"], extra)

  def train_step(ctrl_state: dict, reward_ctx: Any, rng: jax.Array):
    params = ctrl_state["params"]
    k_sample, k_reward = jax.random.split(rng)
    # The controller has no lax.switch, so vmap over keys is a true batch.
    samples = jax.vmap(sample_one, in_axes=(None, 0))(
        params, jax.random.split(k_sample, num_aggregate))
    arcs = samples["arc"]

    def reward_one(args):
      arc, key = args
      return jnp.asarray(reward_fn(arc, key, reward_ctx), jnp.float32).reshape(())

    rewards = jax.lax.stop_gradient(
        jax.lax.map(reward_one, (arcs, jax.random.split(k_reward, num_aggregate))))
    entropy = jax.lax.stop_gradient(samples["entropy"])
    total = rewards + entropy_weight * entropy
    baseline, advantages = sequential_baseline(ctrl_state["baseline"], total, baseline_decay)

    (loss, (log_probs, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, arcs, advantages)
    updates, opt_state = optimizer.update(grads, ctrl_state["opt_state"], params)
    new_state = {
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
        "baseline": baseline,
        "step": ctrl_state["step"] + 1,
    }
    metrics = {
        "controller/reward": jnp.mean(rewards),
        "controller/total_reward": jnp.mean(total),
        "controller/entropy": jnp.mean(entropy),
        "controller/log_prob": jnp.mean(log_probs),
        "controller/baseline": baseline,
        "controller/loss": loss,
        "controller/advantage": jnp.mean(advantages),
        "controller/grad_norm": optax.tree.norm(grads),
    }
    if extra_loss_fn is not None:
      metrics["controller/extra_loss"] = extra
    return new_state, metrics

  return train_step


def make_train_phase(decisions: Decisions,
                     cfg: ctrl.ControllerConfig,
                     optimizer: optax.GradientTransformation,
                     reward_fn: RewardFn,
                     *,
                     num_aggregate: int,
                     entropy_weight: float,
                     baseline_decay: float,
                     num_steps: int,
                     extra_loss_fn: Optional[Callable[[dict, jax.Array], jax.Array]] = None):
  """Builds ``train_phase(ctrl_state, reward_ctx, rng) -> (ctrl_state, metrics)``.

  Runs ``num_steps`` :func:`make_train_step` updates inside one ``lax.scan``
  (one controller phase of the original: e.g. PTB 100 updates × 10 arcs). Step
  ``i`` uses ``jax.random.fold_in(rng, i)``, so pass a fresh ``rng`` per phase.

  Metrics: every ``make_train_step`` metric averaged over the steps, except
  ``controller/baseline``, which is the baseline at the end of the phase (an
  average of a slowly moving EMA says less than its current value). Also
  ``controller/reward_last`` and ``controller/total_reward_last``: the last
  step's means, which show where the policy ended rather than the phase
  average.
  """
  num_steps = int(num_steps)
  if num_steps < 1:
    raise ValueError(f"make_train_phase: num_steps must be >= 1, got {num_steps}.")
  train_step = make_train_step(
      decisions, cfg, optimizer, reward_fn, num_aggregate=num_aggregate,
      entropy_weight=entropy_weight, baseline_decay=baseline_decay,
      extra_loss_fn=extra_loss_fn)

  def train_phase(ctrl_state: dict, reward_ctx: Any, rng: jax.Array):
    def body(state, i):
      return train_step(state, reward_ctx, jax.random.fold_in(rng, i))

    state, history = jax.lax.scan(body, ctrl_state, jnp.arange(num_steps, dtype=jnp.int32))
    metrics = {k: jnp.mean(v) for k, v in history.items()}
    metrics["controller/baseline"] = history["controller/baseline"][-1]
    metrics["controller/reward_last"] = history["controller/reward"][-1]
    metrics["controller/total_reward_last"] = history["controller/total_reward"][-1]
    return state, metrics

  return train_phase


def make_skip_penalty(decisions: Decisions, cfg: ctrl.ControllerConfig, *, skip_target: float,
                      skip_weight: float) -> Callable[[dict, jax.Array], jax.Array]:
  """The macro controller's skip penalty, an ``extra_loss_fn`` for the train step.

  For each layer ``l >= 1`` (each ``BITS`` step), ``KL_l = sum_j sum_k p_jk
  log(p_jk / rho_k)`` with ``p_j = [sigmoid(-q'_j), sigmoid(q'_j)]`` and ``rho =
  [1 - skip_target, skip_target]``; the penalty is the mean over layers, times
  ``skip_weight``, averaged over the arcs, and added to the *loss* (as in the
  original code). As in the original, ``p`` uses ``sigmoid(q')``
  although bits are sampled with ``sigmoid(2 q')``.
  """
  if not 0.0 < skip_target < 1.0:
    raise ValueError(f"skip_target must be in (0, 1), got {skip_target!r}.")
  kind = jnp.asarray(decisions.kind)
  nbits = jnp.asarray(decisions.num_choices)
  rows = (kind == BITS) & (nbits > 0)
  num_layers = int(jnp.sum(rows))
  width = decisions.max_choices
  rho = jnp.asarray([1.0 - skip_target, skip_target], jnp.float32)

  def penalty(params: dict, arcs: jax.Array) -> jax.Array:
    def one(arc):
      q = ctrl.step_logits(params, arc, decisions, cfg)  # [steps, width]
      valid = rows[:, None] & (jnp.arange(width)[None, :] < nbits[:, None])
      p1 = jax.nn.sigmoid(jnp.where(valid, q, 0.0))
      p = jnp.stack([1.0 - p1, p1], axis=-1)
      kl = jnp.sum(p * (jnp.log(p) - jnp.log(rho)), axis=-1)
      return jnp.sum(jnp.where(valid, kl, 0.0)) / max(num_layers, 1)
    return skip_weight * jnp.mean(jax.vmap(one)(arcs))

  return penalty


def make_phase(decisions: Decisions, settings: ControllerSettings,
               optimizer: optax.GradientTransformation, reward_fn: RewardFn):
  """:func:`make_train_phase` with everything from ``settings``: its network
  config, ``train_steps`` updates of ``num_aggregate`` arcs, its entropy weight
  and baseline decay, and its skip penalty when ``skip_weight > 0``. Pass
  ``settings.optimizer()`` (the same one :func:`init_state` got)."""
  return make_train_phase(
      decisions, settings.net, optimizer, reward_fn, num_aggregate=settings.num_aggregate,
      entropy_weight=settings.entropy_weight, baseline_decay=settings.baseline_decay,
      num_steps=settings.train_steps, extra_loss_fn=settings.extra_loss_fn(decisions))
