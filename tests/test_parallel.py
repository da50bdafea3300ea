"""The multi-device path (invariant 4) on fake CPU devices: same results as one device."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, xla_flags

_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, ".")
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, numpy as np
    from conftest import tiny_ptb_config
    from enas_jax import data as data_lib, parallel
    from enas_jax.train.lm import LMTask
    from enas_jax.train.run import build_space
    from enas_jax.train.search import SearchSetup

    assert len(jax.devices()) == 2, jax.devices()
    cfg = tiny_ptb_config()
    corpus = data_lib.load_corpus(cfg.data)
    out = {}
    for n in (1, 2):
      mesh = parallel.make_mesh(n)
      space = build_space(cfg)
      setup = SearchSetup(cfg, space, LMTask(cfg, corpus, mesh, shared=True))
      st = setup.init_state()
      child, acc = setup.child_chunk(st.child, st.ctrl["params"], setup.keys["child"],
                                     jnp.int32(30))
      ctrl_state, cm = setup.controller_phase(st.ctrl, setup.task.reward_context(child),
                                              setup.keys["ctrl"])
      ppl = setup.search_valid(child.params, ctrl_state["params"], setup.keys["valid"])
      out[n] = {"loss": float(acc["loss"]), "emb": np.asarray(child.params["emb"]).tolist(),
                "h_sharding": str(child.h.sharding), "reward": float(cm["controller/reward"]),
                "ppl": float(ppl), "devices_h": len(child.h.sharding.device_set)}
    print(json.dumps(out))
""")


def _json_lines(script: str, timeout: int) -> list:
  """Runs ``script`` with two fake CPU devices; returns each JSON line it printed."""
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"),
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-3000:]
  return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def _one_and_two_devices(script: str, timeout: int):
  """Runs ``script`` with two fake CPU devices; returns its results on one and on two."""
  out = _json_lines(script, timeout)[-1]
  return out["1"], out["2"]


@pytest.fixture(scope="module")
def ptb_runs():
  """The two PTB scripts below in one subprocess (one start of Python and jax):
  {"search": (one device, two), "split": (one, two)}."""
  search, split = _json_lines(_SCRIPT + _PTB_SPLIT_SCRIPT, timeout=900)[-2:]
  return {"search": (search["1"], search["2"]), "split": (split["1"], split["2"])}


def test_two_fake_devices_match_one_device(ptb_runs):
  one, two = ptb_runs["search"]
  assert two["devices_h"] == 2  # the batch really is split over both devices
  import numpy as np
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(two["emb"]), np.asarray(one["emb"]), atol=1e-5)
  np.testing.assert_allclose(two["reward"], one["reward"], rtol=1e-4)
  np.testing.assert_allclose(two["ppl"], one["ppl"], rtol=1e-4)



_PTB_SPLIT_SCRIPT = textwrap.dedent("""
    import json, re, sys
    sys.path.insert(0, ".")
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, numpy as np
    from conftest import tiny_ptb_config
    from enas_jax import data as data_lib, parallel
    from enas_jax.train import task as task_lib
    from enas_jax.train.lm import LMTask
    from enas_jax.train.run import build_space

    assert len(jax.devices()) == 2, jax.devices()

    def cost(compiled):
      txt = compiled.as_text()
      ca = compiled.cost_analysis()
      ca = ca[0] if isinstance(ca, list) else ca
      return {"gathers": len(re.findall(r" all-gather(-start)?\\(", txt)),
              "reduces": len(re.findall(r" all-reduce(-start)?\\(", txt)),
              "flops": float(ca["flops"])}

    out = {"1": {}, "2": {}}
    # Fixed 35-token windows and the random-length ones (lax.switch over buckets).
    for rb in (False, True):
      cfg = tiny_ptb_config("search", **{"data.batch_size": 8, "data.eval_batch_size": 8,
                                         "data.random_bptt": rb})
      corpus = data_lib.load_corpus(cfg.data)
      space = build_space(cfg)
      arc = space.sample_uniform(jax.random.key(5))
      for n in (1, 2):
        task = LMTask(cfg, corpus, parallel.make_mesh(n), shared=True)
        state = task.init_child(jax.random.key(0))
        step = jax.jit(lambda st, d, a, k: task_lib.train_step(task, st, d, a, k),
                       out_shardings=(task.state_shardings(), task.replicated))
        r = {"step": cost(step.lower(state, task.data, arc, jax.random.key(1)).compile())}
        if not rb:
          valid = task.make_search_valid(lambda p, k: space.sample_uniform(k), 2)
          r["valid"] = cost(valid.jitted.lower(task.data, state.params, {},
                                               jax.random.key(2)).compile())
        losses = []
        for i in range(3):
          state, m = step(state, task.data, arc, jax.random.key(10 + i))
          losses.append(float(m["loss"]))
        r["loss"] = losses
        r["params"] = [np.asarray(x).ravel().tolist()
                       for x in jax.tree_util.tree_leaves(state.params)]
        r["h_devices"] = len(state.h.sharding.device_set)
        out[str(n)]["random" if rb else "fixed"] = r
    print(json.dumps(out))
""")


def test_ptb_step_splits_the_batch_over_two_fake_devices(ptb_runs):
  """Each device computes only its half of the batch (design invariant 4): the
  compiled PTB child step and validation hold no all-gather of tokens or
  activations (only the gradient and loss all-reduces), their FLOPs per device
  fall, and three steps give the 1-device losses and weights."""
  import numpy as np
  one, two = ptb_runs["split"]
  for kind in ("fixed", "random"):
    a, b = one[kind], two[kind]
    assert b["h_devices"] == 2
    assert b["step"]["gathers"] == 0, kind  # was 2: the window's tokens and a [T,B,H] output
    assert b["step"]["reduces"] > 0  # the gradient reduction is there
    # Half the batch per device; the replicated weight update does not shrink.
    assert b["step"]["flops"] < 0.7 * a["step"]["flops"], (kind, a["step"], b["step"])
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    for pa, pb in zip(a["params"], b["params"]):
      np.testing.assert_allclose(np.asarray(pb), np.asarray(pa), atol=1e-6)
  assert two["fixed"]["valid"]["gathers"] == 0
  assert two["fixed"]["valid"]["flops"] < 0.6 * one["fixed"]["valid"]["flops"]


# The micro two-device tests: tests/test_parallel_micro.py (its own file, so that
# pytest-xdist's --dist loadfile can run it beside this one).
