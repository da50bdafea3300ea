"""The micro search (and, -m slow, final) step on two fake CPU devices: same
results as one device. Apart from tests/test_parallel.py so that the default
suite's --dist loadfile runs the two long subprocesses on different workers."""

import textwrap

import pytest

from test_parallel import _one_and_two_devices

_MICRO_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, ".")
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, numpy as np
    from conftest import tiny_cifar_config
    from enas_jax import data as data_lib, parallel
    from enas_jax.train.image import ImageTask
    from enas_jax.train.run import build_space
    from enas_jax.train.search import SearchSetup

    assert len(jax.devices()) == 2, jax.devices()
    # 3 cells of 1 node: the per-cell custom gradient, its scans and conditionals
    # (2 nodes per cell compile in more than twice the time and add no code path).
    cfg = tiny_cifar_config("cifar_micro", "search")
    images = data_lib.load_images(cfg.data)
    out = {}
    for n in (1, 2):
      mesh = parallel.make_mesh(n)
      setup = SearchSetup(cfg, build_space(cfg), ImageTask(cfg, images, mesh, shared=True))
      st = setup.init_state()
      # One child step: the tiny child's training is chaotic (with one shift
      # of batch norm's moments a 6e-8 difference between the two summation
      # orders grew to 7e-5 after two steps and 4e-3 after three), so only the
      # first step's weights can be compared tightly.
      child, acc = setup.child_chunk(st.child, st.ctrl["params"], setup.keys["child"],
                                     jnp.int32(1))
      ctrl_state, cm = setup.controller_phase(st.ctrl, setup.task.reward_context(child),
                                              setup.keys["ctrl"])
      w = child.params["cells"][2]["nodes"][0]["sep3"]["w_point"]
      out[n] = {"loss": float(acc["loss"]), "w": np.asarray(w)[0, :, 0].tolist(),
                "stem": np.asarray(child.params["stem"]["w"]).tolist(),
                "reward": float(cm["controller/reward"]), "devices": len(w.sharding.device_set)}
    print(json.dumps(out))
""")


def test_micro_search_on_two_fake_devices_matches_one_device():
  """The micro search step (per-cell custom VJP, scans, conditionals) with the
  batch split over two devices: the same loss, weights and controller reward."""
  one, two = _one_and_two_devices(_MICRO_SCRIPT, timeout=900)
  assert two["devices"] == 2
  import numpy as np
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(two["w"]), np.asarray(one["w"]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(two["stem"]), np.asarray(one["stem"]), atol=1e-5)
  np.testing.assert_allclose(two["reward"], one["reward"], rtol=1e-4)


_MICRO_FINAL_REMAT_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, ".")
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, numpy as np
    from conftest import tiny_cifar_config
    from enas_jax import data as data_lib, parallel
    from enas_jax.train.image import ImageTask
    from enas_jax.train.run import build_space

    assert len(jax.devices()) == 2, jax.devices()
    # Final training with per-cell recomputation: its conditional's predicate
    # comes from a batch-sharded cotangent.
    cfg = tiny_cifar_config("cifar_micro", "final", **{"space.num_nodes": 2,
                                                       "child.remat": "cells"})
    images = data_lib.load_images(cfg.data)
    space = build_space(cfg)
    arc = np.asarray(space.sample_uniform(jax.random.key(5)))
    out = {}
    for n in (1, 2):
      mesh = parallel.make_mesh(n)
      task = ImageTask(cfg, images, mesh, shared=False, arc=arc)
      chunk = task.make_train_chunk(arc_static=arc)
      state, acc = chunk(task.init_child(jax.random.key(0)), {}, jax.random.key(1),
                         jnp.int32(1))
      w = state.params["stem"]["w"]
      out[n] = {"loss": float(acc["loss"]), "stem": np.asarray(w).tolist(),
                "devices": len(state.params["fc"]["w"].sharding.device_set)}
    print(json.dumps(out))
""")


@pytest.mark.slow  # ~25 s; the default suite keeps the search-step two-device tests
def test_micro_final_with_remat_on_two_fake_devices_matches_one_device():
  one, two = _one_and_two_devices(_MICRO_FINAL_REMAT_SCRIPT, timeout=600)
  assert two["devices"] == 2
  import numpy as np
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(two["stem"]), np.asarray(one["stem"]), atol=1e-5)
