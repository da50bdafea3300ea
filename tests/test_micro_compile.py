"""The micro search cell compiles each op once: one op switch in its forward
scan (one branch per step, as the backward), with the same numbers as a baked
arc. Tiny shapes; the cell is traced, and differentiated on CPU in a second."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from enas_jax.spaces import cifar_micro
from enas_jax.spaces import cifar_micro_child as mc


def _cell_setup(B=2, C=4):
  cfg = mc.MicroChildConfig(num_layers=1, num_nodes=B, out_filters=C, kernels="cpu")
  p = {"nodes": [mc._init_shared_node(k, b, C) for b, k in
                 enumerate(jax.random.split(jax.random.key(0), B))]}
  kx, ky, kw = jax.random.split(jax.random.key(1), 3)
  x0 = jax.random.normal(kx, (2, 4, 4, C))
  x1 = jax.random.normal(ky, (2, 4, 4, C))
  w_final = jax.random.normal(kw, (B + 2, C, C))
  return cfg, p, x0, x1, w_final


def _switches(jaxpr, n_branches):
  """Number of ``cond`` equations with ``n_branches`` branches, nested ones included."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond" and len(eqn.params["branches"]) == n_branches:
      count += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _switches(sub, n_branches)
  return count


def test_cell_forward_has_one_op_switch():
  cfg, p, x0, x1, w_final = _cell_setup()
  arc = jnp.zeros((4 * cfg.num_nodes,), jnp.int32)

  def fwd(x0, x1, arc):
    ws = mc._pick_weights(p["nodes"], arc, False)
    return mc._cell_forward(x0, x1, ws, w_final, arc, cfg)

  jaxpr = jax.make_jaxpr(fwd)(x0, x1, arc).jaxpr
  assert _switches(jaxpr, 5) == 1  # the five ops: one switch, not one per node input


def test_traced_cell_equals_baked_cell_value_and_grads():
  cfg, p, x0, x1, w_final = _cell_setup()
  codec = cifar_micro.MicroCodec(cfg.num_nodes)

  def traced(x0, x1, nodes, w, a):
    return jnp.sum(jnp.sin(mc._traced_cell(x0, x1, mc._pick_weights(nodes, a, False), w,
                                           a, cfg)))

  # One compile of the traced cell serves every arc (the arc is an argument).
  traced_vg = jax.jit(jax.value_and_grad(traced, argnums=(0, 1, 2, 3)))
  args = (x0, x1, p["nodes"], w_final)
  # Both ops of a node differ and read different inputs in some arcs.
  for seed in range(3):
    arc = np.asarray(codec.sample_uniform(jax.random.key(seed)))[:4 * cfg.num_nodes]

    def baked(x0, x1, nodes, w):
      return jnp.sum(jnp.sin(mc._autodiff_cell(x0, x1, mc._pick_weights(nodes, arc, True), w,
                                               arc, cfg, True)))

    vt, gt = traced_vg(*args, jnp.asarray(arc))
    vb, gb = jax.jit(jax.value_and_grad(baked, argnums=(0, 1, 2, 3)))(*args)
    np.testing.assert_allclose(vt, vb, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gt), jax.tree.leaves(gb)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
