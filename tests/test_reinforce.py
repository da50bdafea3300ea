"""Tests of the REINFORCE pieces and the controller train step (enas_jax/reinforce.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from enas_jax import controller as C
from enas_jax import reinforce as R
from enas_jax import spaces


# The PTB space's own program (node 0 = [ANCHOR, OP]; node i = [POINTER, OP]).
PTB = spaces.get("ptb", num_nodes=5).decisions
CFG = C.ControllerConfig(lstm_size=16, temperature=5.0, tanh_constant=2.5, init_range=0.1)
# A valid target: ops at even tokens, pointers (< node index) at odd tokens.
TARGET = jnp.array([3, 0, 2, 1, 0, 0, 1, 2, 3], jnp.int32)


def match_reward(arc, rng, ctx):
  """Fraction of tokens equal to the target arc held in the reward context."""
  del rng
  return jnp.mean((arc == ctx["target"]).astype(jnp.float32))


# ----------------------------------------------------------------------------
# Small pure functions.


@pytest.mark.parametrize("decay,b0", [(0.99, 0.0), (0.9, 0.3), (0.5, -1.0), (0.0, 2.0)])
def test_sequential_baseline_matches_python_loop(decay, b0):
  rewards = np.random.RandomState(0).uniform(-1, 2, size=7).astype(np.float32)
  b = b0
  want = []
  for r in rewards:
    b = b - (1.0 - decay) * (b - r)  # update first ...
    want.append(r - b)  # ... then use
  new_b, adv = R.sequential_baseline(jnp.float32(b0), jnp.asarray(rewards), decay)
  np.testing.assert_allclose(float(new_b), b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(adv), np.array(want), rtol=1e-5, atol=1e-6)
  assert adv.shape == (7,)


def test_policy_loss_value_and_gradients():
  lp = jnp.array([-1.0, -2.0, -0.5])
  adv = jnp.array([0.5, -1.0, 2.0])
  loss = R.policy_loss(lp, adv)
  np.testing.assert_allclose(float(loss), np.mean([0.5, -2.0, 1.0]), rtol=1e-6)
  g_lp, g_adv = jax.grad(R.policy_loss, argnums=(0, 1))(lp, adv)
  np.testing.assert_allclose(np.asarray(g_lp), -np.asarray(adv) / 3, rtol=1e-6)
  assert np.all(np.asarray(g_adv) == 0)  # advantages are stop-gradient


def test_make_optimizer_optax_form_is_optax_adam():
  opt = R.make_optimizer(0.1, form="optax")
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  g = {"w": jnp.array([0.3, -0.02, 5.0])}
  # β1 = 0 and bias correction: m̂ = g, v̂ = g² at step 1, so the step is g/(|g| + ε).
  upd, _ = opt.update(g, opt.init(params), params)
  np.testing.assert_allclose(np.asarray(upd["w"]),
                             -0.1 * np.asarray(g["w"]) / (np.abs(np.asarray(g["w"])) + 1e-3),
                             rtol=1e-5)
  ref = optax.adam(0.1, b1=0.0, b2=0.999, eps=1e-3)
  s, s_ref = opt.init(params), ref.init(params)
  for scale in (1.0, -0.5, 2.0):
    gs = jax.tree.map(lambda x: x * scale, g)
    u1, s = opt.update(gs, s, params)
    u2, s_ref = ref.update(gs, s_ref, params)
    np.testing.assert_allclose(np.asarray(u1["w"]), np.asarray(u2["w"]), rtol=1e-6)


def tf1_adam_updates(grads, lr, b1, b2, eps):
  """TF1 AdamOptimizer by hand (float64): the updates applied at t = 1, 2, ..."""
  m = v = np.zeros_like(grads[0], np.float64)
  out = []
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g                              # m_t
    v = b2 * v + (1 - b2) * g * g                          # v_t (never bias-corrected)
    lr_t = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)       # correction folded into lr
    out.append(-lr_t * m / (np.sqrt(v) + eps))             # eps added to the raw sqrt(v)
  return out


@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_make_optimizer_tf1_form_matches_tf1_formula(b1):
  lr, b2, eps = 0.01, 0.999, 1e-3
  opt = R.make_optimizer(lr, b1, b2, eps)  # form="tf1" is the default
  params = {"w": jnp.zeros(4)}
  grads = [np.array([0.3, -0.02, 5.0, 1e-3]), np.array([-1.0, 0.5, 0.01, 1e-3]),
           np.array([0.2, 0.0, -3.0, -2e-3]), np.array([1e-4, 0.1, 0.5, 1e-3])]
  state = opt.init(params)
  for g, want in zip(grads, tf1_adam_updates(grads, lr, b1, b2, eps)):
    upd, state = opt.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    np.testing.assert_allclose(np.asarray(upd["w"]), want, rtol=2e-5)
  # The moments are the same quantities as optax's (one checkpoint layout).
  ref = optax.adam(lr, b1=b1, b2=b2, eps=eps)
  s_ref = ref.init(params)
  for g in grads:
    _, s_ref = ref.update({"w": jnp.asarray(g, jnp.float32)}, s_ref, params)
  assert jax.tree.structure(state) == jax.tree.structure(s_ref)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(s_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize("g,tf1_step,optax_step", [(1e-3, 0.0307, 0.500), (1e-2, 0.240, 0.909)])
def test_tf1_and_optax_first_steps_differ_as_computed(g, tf1_step, optax_step):
  """One step with β1 = 0, ε = 1e-3: TF1 moves 0.031·lr at |g| = 1e-3, optax 0.50·lr."""
  lr, params = 1.0, {"w": jnp.zeros(1)}
  grads = {"w": jnp.array([g], jnp.float32)}
  for form, want in (("tf1", tf1_step), ("optax", optax_step)):
    opt = R.make_optimizer(lr, form=form)
    upd, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(-float(upd["w"][0]), want, rtol=3e-3, err_msg=form)


def test_make_optimizer_refuses_an_unknown_form():
  with pytest.raises(ValueError, match="adam_form.*'tf1', 'optax'.*'tf'"):
    R.make_optimizer(1e-3, form="tf")


def test_init_state_structure():
  opt = R.make_optimizer(1e-3)
  state = R.init_state(jax.random.key(0), PTB, CFG, opt)
  assert set(state) == {"params", "opt_state", "baseline", "step"}
  assert state["baseline"].dtype == jnp.float32 and float(state["baseline"]) == 0.0
  assert state["step"].dtype == jnp.int32 and int(state["step"]) == 0
  ref = C.init(jax.random.key(0), PTB, CFG)
  for k in ref:
    np.testing.assert_array_equal(np.asarray(state["params"][k]), np.asarray(ref[k]))


# ----------------------------------------------------------------------------
# Train step and phase.


def test_train_step_metrics_baseline_and_extra_loss():
  opt = R.make_optimizer(1e-2)
  state = R.init_state(jax.random.key(0), PTB, CFG, opt)
  state["baseline"] = jnp.float32(0.2)
  k, decay, w_ent = 4, 0.8, 0.1
  const_reward = lambda arc, rng, ctx: ctx["r"] + 0.0 * jnp.sum(arc)
  seen_shapes = []

  def extra(params, arcs):
    seen_shapes.append(arcs.shape)
    return 2.5 + 0.0 * jnp.sum(params["g_emb"])

  kwargs = dict(num_aggregate=k, entropy_weight=w_ent, baseline_decay=decay)
  step = jax.jit(R.make_train_step(PTB, CFG, opt, const_reward, **kwargs))
  step_x = jax.jit(R.make_train_step(PTB, CFG, opt, const_reward, extra_loss_fn=extra, **kwargs))
  ctx = {"r": jnp.float32(0.7)}
  rng = jax.random.key(3)
  new, m = step(state, ctx, rng)
  new_x, m_x = step_x(state, ctx, rng)

  assert set(R.METRIC_KEYS) <= set(m)
  assert set(m_x) == set(m) | {"controller/extra_loss"}
  for v in m.values():
    assert v.shape == () and np.isfinite(float(v))
  assert int(new["step"]) == 1
  np.testing.assert_allclose(float(m["controller/reward"]), 0.7, rtol=1e-6)
  np.testing.assert_allclose(
      float(m["controller/total_reward"]),
      0.7 + w_ent * float(m["controller/entropy"]), rtol=1e-5)
  # The entropy metric is the sampled-token entropy of the K arcs (cfg default).
  assert 0 < float(m["controller/entropy"]) < 20
  assert float(m["controller/log_prob"]) < 0
  # Baseline: K sequential EMA updates from 0.2 on the per-arc total rewards.
  # With total rewards t_k: b_K = decay^K b_0 + (1 - decay) Σ decay^(K-1-k) t_k.
  # All t_k are within w_ent * max entropy of 0.7 + w_ent * mean entropy.
  expected_const = decay ** k * 0.2 + (1 - decay ** k) * float(m["controller/total_reward"])
  np.testing.assert_allclose(float(new["baseline"]), expected_const, atol=0.05)
  np.testing.assert_allclose(float(m["controller/baseline"]), float(new["baseline"]))
  # Same arcs and rewards with and without the extra term; loss differs by 2.5.
  assert seen_shapes and seen_shapes[0] == (k, PTB.arc_length)
  np.testing.assert_allclose(float(m_x["controller/loss"]) - float(m["controller/loss"]), 2.5,
                             rtol=1e-5)
  np.testing.assert_allclose(float(m_x["controller/extra_loss"]), 2.5)
  for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(new_x["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  # The parameters moved, and only through the optimiser.
  moved = [float(jnp.abs(a - b).max()) for a, b in
           zip(jax.tree.leaves(new["params"]), jax.tree.leaves(state["params"]))]
  assert max(moved) > 0


def test_reward_fn_runs_one_arc_at_a_time_with_switch():
  """lax.map keeps a reward's lax.switch a real conditional (vmap would not)."""
  opt = R.make_optimizer(1e-2)
  state = R.init_state(jax.random.key(0), PTB, CFG, opt)

  def switch_reward(arc, rng, ctx):
    branches = [lambda x, i=i: x * (i + 1.0) for i in range(PTB.num_ops)]
    return jax.lax.switch(arc[0], branches, ctx["x"]) + jax.random.uniform(rng) * 0.0

  step = R.make_train_step(PTB, CFG, opt, switch_reward, num_aggregate=3, entropy_weight=0.0,
                           baseline_decay=0.9)
  ctx = {"x": jnp.float32(0.25)}
  jaxpr = str(jax.make_jaxpr(step)(state, ctx, jax.random.key(0)))
  assert "cond[" in jaxpr
  _, m = jax.jit(step)(state, ctx, jax.random.key(0))
  # Each reward is 0.25 · (op + 1) for the arc's first op.
  assert 0.25 <= float(m["controller/reward"]) <= 1.0


def test_train_phase_equals_repeated_steps():
  opt = R.make_optimizer(5e-2)
  state = R.init_state(jax.random.key(1), PTB, CFG, opt)
  kwargs = dict(num_aggregate=2, entropy_weight=0.01, baseline_decay=0.9)
  ctx = {"target": TARGET}
  rng = jax.random.key(9)
  phase = jax.jit(R.make_train_phase(PTB, CFG, opt, match_reward, num_steps=3, **kwargs))
  s_phase, m_phase = phase(state, ctx, rng)

  step = jax.jit(R.make_train_step(PTB, CFG, opt, match_reward, **kwargs))
  s = state
  hist = []
  for i in range(3):
    s, m = step(s, ctx, jax.random.fold_in(rng, i))
    hist.append(m)
  assert int(s_phase["step"]) == 3
  for a, b in zip(jax.tree.leaves(s_phase), jax.tree.leaves(s)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  for key in R.METRIC_KEYS:
    vals = [float(h[key]) for h in hist]
    want = vals[-1] if key == "controller/baseline" else np.mean(vals)
    np.testing.assert_allclose(float(m_phase[key]), want, rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(float(m_phase["controller/reward_last"]),
                             float(hist[-1]["controller/reward"]), rtol=1e-6)


def test_reinforce_learns_a_target_arc():
  # lr 0.02 with 10 arcs per update: with lr 0.05 (or 5 arcs) an occasional seed
  # collapses early onto a wrong arc (β1 = 0 makes every Adam step ~lr in size).
  # Tuned with optax's ε placement: with the TF1 form (the default) ε = 1e-3 damps
  # this toy's small gradients, and 300 updates only reach a reward of ~0.50.
  opt = R.make_optimizer(0.02, form="optax")
  state = R.init_state(jax.random.key(0), PTB, CFG, opt)
  phase = jax.jit(R.make_train_phase(
      PTB, CFG, opt, match_reward, num_aggregate=10, entropy_weight=0.0, baseline_decay=0.9,
      num_steps=100))
  score = jax.jit(lambda p: C.log_prob(p, TARGET, PTB, CFG)["log_prob"])
  ctx = {"target": TARGET}
  lp0 = float(score(state["params"]))
  rewards = []
  for i in range(3):
    state, m = phase(state, ctx, jax.random.key(100 + i))
    rewards.append(float(m["controller/reward"]))
  lp1 = float(score(state["params"]))
  assert int(state["step"]) == 300
  # A random arc matches about 40% of the target's tokens (the first phase
  # average is a little above that). The pointer of token 5 (3 nodes back,
  # disfavoured by the locality prior) tends to get stuck, so ~0.87 is typical.
  assert rewards[-1] > rewards[0] + 0.3, rewards
  assert rewards[-1] > 0.75, rewards
  assert lp1 > lp0 + 2.0, (lp0, lp1)


# ----------------------------------------------------------------------------
# The controller section as typed settings.


@pytest.mark.parametrize("name", ["ptb", "cifar_macro", "cifar_micro", "cifar_nb201"])
def test_settings_read_every_config(name):
  import importlib
  mod = importlib.import_module(f"configs.{name}")
  for variant in mod.VARIANTS:
    cc = mod.get_config(variant).controller
    s = R.ControllerSettings.from_config(cc)
    assert s.net == C.ControllerConfig.from_config(cc)
    for field in ("lr", "num_aggregate", "train_steps", "entropy_weight", "baseline_decay",
                  "reward_c", "adam_b1", "adam_eps", "adam_form"):
      assert getattr(s, field) == cc[field], (variant, field)
    # Only the macro space has skip decisions, and only its config a skip penalty.
    assert s.skip_weight == (cc.skip_weight if "skip_weight" in cc else 0.0)
    assert (s.skip_weight > 0) == (name == "cifar_macro")
    hash(s)  # frozen: usable as a static argument


def _section(**overrides):
  from configs import cifar_macro
  c = cifar_macro.get_config("smoke").controller.to_dict()
  c.update(overrides)
  return c


@pytest.mark.parametrize("field,value,match", [
    ("num_aggregate", 0, "controller.num_aggregate"),
    ("train_steps", 0, "controller.train_steps"),
    ("lr", 0.0, "controller.lr"),
    ("baseline_decay", 1.5, "controller.baseline_decay"),
    ("adam_b1", 1.0, "controller.adam_b1"),
    ("adam_form", "adamw", "controller.adam_form"),
    ("entropy_weight", float("nan"), "controller.entropy_weight"),
    ("skip_weight", -1.0, "controller.skip_weight"),
    ("skip_target", 1.0, "controller.skip_target"),
    ("entropy_mode", "exact", "entropy_mode"),
])
def test_settings_bad_values_raise(field, value, match):
  with pytest.raises(ValueError, match=match):
    R.ControllerSettings.from_config(_section(**{field: value}))


def test_settings_missing_field_is_a_clear_error():
  c = _section()
  del c["train_steps"]
  with pytest.raises(ValueError, match="train_steps"):
    R.ControllerSettings.from_config(c)


def test_make_phase_equals_explicit_train_phase_with_skip_penalty():
  """make_phase(settings) builds the same phase as make_train_phase with the
  fields passed one by one (macro: the skip penalty included)."""
  decisions = spaces.get("cifar_macro", num_layers=3).decisions
  s = R.ControllerSettings.from_config(
      _section(lstm_size=8, num_aggregate=2, train_steps=2, skip_weight=0.8))
  reward = lambda arc, rng, ctx: jnp.mean((arc == 0).astype(jnp.float32))  # noqa: E731
  opt = s.optimizer()
  state = R.init_state(jax.random.key(0), decisions, s.net, opt)
  got = jax.jit(R.make_phase(decisions, s, opt, reward))(state, None, jax.random.key(1))
  extra = R.make_skip_penalty(decisions, s.net, skip_target=0.4, skip_weight=0.8)
  opt2 = R.make_optimizer(s.lr, b1=s.adam_b1, eps=s.adam_eps, form=s.adam_form)
  want = jax.jit(R.make_train_phase(
      decisions, s.net, opt2, reward, num_aggregate=2, entropy_weight=s.entropy_weight,
      baseline_decay=s.baseline_decay, num_steps=2, extra_loss_fn=extra))(
          state, None, jax.random.key(1))
  assert "controller/extra_loss" in got[1]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert R.ControllerSettings.from_config(_section(skip_weight=0.0)).extra_loss_fn(
      decisions) is None
