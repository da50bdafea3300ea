"""The PTB child in bfloat16 (``child.compute_dtype``): the dtype is read from
the config (``auto`` resolved by enas_jax.backend), matmul inputs and nodes are
bfloat16 while parameters, gradients, the carried state and the loss stay
float32, and a bfloat16 step agrees with the float32 step to bfloat16's
precision."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enas_jax import parallel
from enas_jax.data import synthetic_corpus
from enas_jax.spaces import ptb_child as pc
from enas_jax.train.lm import LMTask

V, H, B, T, N = 100, 32, 8, 10, 4
ARC = jnp.asarray([0, 0, 1, 1, 3, 0, 2], jnp.int32)


def _cc(**kw):
  return pc.ChildConfig(vocab_size=V, hidden_size=H, num_nodes=N, drop_e=0.1, drop_i=0.2,
                        drop_x=0.25, drop_l=0.15, drop_o=0.25, alpha=0.5, beta=1.0,
                        weight_decay=1e-3, init_range=0.1, **kw)


def _config(**child):
  from configs import ptb as ptb_config
  c = copy.deepcopy(ptb_config.get_config("smoke"))
  c.unlock()
  for k, v in child.items():
    c.child[k] = v
  return c


def test_compute_dtype_from_config():
  assert pc.ChildConfig.from_config(_config(compute_dtype="bfloat16")).compute_dtype == "bfloat16"
  assert pc.ChildConfig.from_config(_config(compute_dtype="float32")).compute_dtype == "float32"
  # "auto": the backend's default for the config's target platform, else the host's.
  assert pc.ChildConfig.from_config(_config(compute_dtype="auto", platform="tpu")).compute_dtype \
      == "bfloat16"
  assert pc.ChildConfig.from_config(_config(compute_dtype="auto", platform="cpu")).compute_dtype \
      == "float32"
  host = jax.default_backend()
  expect = "float32" if host == "cpu" else "bfloat16"
  assert pc.ChildConfig.from_config(_config(compute_dtype="auto")).compute_dtype == expect
  with pytest.raises(ValueError, match="compute_dtype"):
    pc.ChildConfig.from_config(_config(compute_dtype="float16"))
  with pytest.raises(ValueError, match="compute_dtype"):
    pc.ChildConfig(vocab_size=V, hidden_size=H, compute_dtype="auto")  # unresolved


# loose_ends is -m slow: the same casts as "all", ~15 s more in the default suite.
@pytest.mark.parametrize("aggregate", [pytest.param("loose_ends", marks=pytest.mark.slow), "all"])
def test_bf16_step_agrees_with_f32(aggregate):
  c32 = _cc(aggregate=aggregate)
  c16 = dataclasses.replace(c32, compute_dtype="bfloat16")
  shared = pc.init_shared(jax.random.key(0), c32)
  x = jax.random.randint(jax.random.key(1), (B, T), 0, V)
  y = jnp.roll(x, -1, axis=1)
  h0 = jax.random.uniform(jax.random.key(3), (B, H), minval=-0.5, maxval=0.5)

  def step(cc):
    fn = lambda v: jax.value_and_grad(pc.loss, has_aux=True)(  # noqa: E731
        v, ARC, x, y, h0, jax.random.key(5), cc, False)
    view = pc.gather(shared, ARC, cc)
    return jax.jit(fn)(view), jax.make_jaxpr(fn)(view)

  ((l32, a32), g32), _ = step(c32)
  ((l16, a16), g16), jaxpr16 = step(c16)
  # bfloat16 really is used: the cell's matmuls (inside the scan) and the
  # logits' matmul take bfloat16 operands...
  bf16_dots = [ln for ln in str(jaxpr16).splitlines() if "dot_general" in ln and "bf16" in ln]
  assert len(bf16_dots) >= 3, str(jaxpr16)
  # ...while the loss, gradients and carried state stay float32.
  assert l16.dtype == jnp.float32 and a16["h"].dtype == jnp.float32
  for leaf in jax.tree_util.tree_leaves(g16):
    assert leaf.dtype == jnp.float32
  # Measured (loose_ends / all): loss relative error 1e-7 / 7e-6, gradient
  # relative error (global norm of the difference / norm) 0.005 / 0.005, carried
  # state max |diff| 2e-3 / 1e-3: bfloat16's 8-bit mantissa (unit roundoff 4e-3).
  assert abs(float(l16 - l32)) / float(l32) < 1e-3
  leaves32, leaves16 = jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g16)
  diff = np.sqrt(sum(float(jnp.sum(jnp.square(a - b))) for a, b in zip(leaves32, leaves16)))
  norm = np.sqrt(sum(float(jnp.sum(jnp.square(a))) for a in leaves32))
  assert 1e-4 < diff / norm < 0.03  # > 1e-4: not silently float32
  assert float(jnp.max(jnp.abs(a16["h"] - a32["h"]))) < 1e-2


@pytest.mark.slow  # two chunk compilations: 28 s with a cold compilation cache
def test_bf16_training_tracks_f32():
  """The shared child trained in bfloat16 through the task's jitted chunk
  (random traced arcs) follows the float32 run: same data and randomness, mean
  cross-entropy within bfloat16 rounding, state and parameters float32."""
  from enas_jax import spaces
  corpus = synthetic_corpus(50, 2000, 400, 100, seed=0)
  mesh = parallel.make_mesh()
  space = spaces.get("ptb", num_nodes=4)
  ces = {}
  for dt in ("float32", "bfloat16"):
    cfg = _config(compute_dtype=dt, hidden_size=16)
    cfg.data.vocab_size, cfg.data.batch_size, cfg.data.eval_batch_size = 50, 4, 4
    cfg.data.bptt, cfg.space.num_nodes = 8, 4
    task = LMTask(cfg, corpus, mesh, shared=True)
    assert task.cc.compute_dtype == dt
    chunk = task.make_train_chunk(lambda p, k: space.sample_uniform(k))
    state = task.init_child(jax.random.key(0))
    state, sums = chunk(state, {}, jax.random.key(7), 40)
    assert int(sums["first_bad"]) == -1
    ces[dt] = float(sums["ce"]) / int(sums["n"])
    assert state.h.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
  assert ces["bfloat16"] != ces["float32"]
  assert abs(ces["bfloat16"] - ces["float32"]) < 0.02, ces
