"""CIFAR end to end (macro; micro in test_cifar_pipeline_micro.py): search ->
derive -> final, resume equals an uninterrupted run, the random-search baseline,
metrics, bad input."""

import contextlib
import json
import os

import numpy as np
import pytest

from conftest import tiny_cifar_config
from enas_jax import checkpoint as ckpt_lib
from enas_jax import metrics as metrics_lib
from enas_jax.train import run as run_lib


def _read(path):
  with open(path) as f:
    return f.read()


class _Interrupted(Exception):
  pass


@contextlib.contextmanager
def _stop_after_search_epoch(epoch):
  """Raises :class:`_Interrupted` once the search's ``epoch`` checkpoint is committed."""
  save = ckpt_lib.Checkpointer.save

  def save_then_stop(self, step, state, meta=None):
    save(self, step, state, meta)
    if (meta or {}).get("stage") == "search" and (meta or {}).get("epoch") == epoch:
      raise _Interrupted(step)

  ckpt_lib.Checkpointer.save = save_then_stop
  try:
    yield
  finally:
    ckpt_lib.Checkpointer.save = save


@pytest.mark.parametrize("space", [
    "cifar_macro", pytest.param("cifar_micro", marks=pytest.mark.slow)])
def test_search_derive_final_then_resume_matches_uninterrupted(tmp_path, space):
  full = str(tmp_path / "full")
  out_full = run_lib.run(tiny_cifar_config(space), full)
  for name in ("best_arc.txt", "arcs.jsonl", "best_arc.dot", "final/final_result.json"):
    assert os.path.exists(os.path.join(full, name)), name
  rows = [json.loads(l) for l in _read(os.path.join(full, "arcs.jsonl")).splitlines()]
  accs = [r["valid_acc"] for r in rows]
  assert accs == sorted(accs, reverse=True)  # best (highest accuracy) first
  names = set().union(*metrics_lib.read_metrics(full))
  for k in ("child/loss", "child/acc", "child/lr", "controller/reward", "valid/acc"):
    assert k in names, k
  assert "test/acc" in set().union(*metrics_lib.read_metrics(os.path.join(full, "final")))
  final = out_full["final"]
  assert 0.0 <= final["test_acc"] <= 1.0 and final["num_params"] > 0

  # Interrupted: the same search stopped right after its epoch-1 checkpoint (the
  # same compiled programs: a run with num_epochs=1 would bake in another
  # schedule length and compile its child step again), then rerun. Without
  # then_final: the final stage starts afresh from the derived arc whether the
  # search was resumed or not (its own resume: test_faults.py's kill -9 test).
  part = str(tmp_path / "part")
  part_config = tiny_cifar_config(space, **{"search.then_final": False})
  with pytest.raises(_Interrupted):
    with _stop_after_search_epoch(1):
      run_lib.run(part_config, part)
  assert not os.path.exists(os.path.join(part, "best_arc.txt"))
  out_part = run_lib.run(part_config, part)
  assert _read(os.path.join(part, "arcs.jsonl")) == _read(os.path.join(full, "arcs.jsonl"))
  assert out_part["best_arc"] == out_full["best_arc"] and "final" not in out_part
  valid = lambda d: [r["valid/acc"] for r in metrics_lib.read_metrics(d) if "epoch" in r]  # noqa: E731
  np.testing.assert_allclose(valid(part), valid(full), atol=1e-6)


@pytest.mark.slow
def test_macro_random_search_and_skip_penalty(tmp_path):
  out = run_lib.run(tiny_cifar_config("cifar_macro", **{
      "search.sampler": "uniform", "search.num_epochs": 1, "search.then_final": False}),
      str(tmp_path / "uniform"))
  assert "best_arc" in out
  names = set().union(*metrics_lib.read_metrics(str(tmp_path / "uniform")))
  assert "controller/reward" not in names


def test_final_on_the_paper_arc_name_and_bad_arcs(tmp_path):
  c = tiny_cifar_config("cifar_macro", "final", **{"space.num_layers": 24, "arc": "paper"})
  space, arc = run_lib.resolve_arc(c, run_lib.build_space(c))
  assert len(arc) == 24 + 24 * 23 // 2
  bad = tiny_cifar_config("cifar_macro", "final", **{"arc": "0 1 7"})
  with pytest.raises(ValueError, match="cifar_macro"):
    run_lib.run(bad, str(tmp_path / "bad"))
  assert not os.path.exists(str(tmp_path / "bad" / "checkpoints"))
  bad = tiny_cifar_config("cifar_micro", "final", **{"arc": "0 9 0 0 0 0 0 0"})
  with pytest.raises(ValueError, match="cifar_micro"):
    run_lib.run(bad, str(tmp_path / "bad2"))


def test_missing_cifar_data_is_one_clear_message(tmp_path):
  # download off: the test must never reach the internet (the download paths
  # are tested against a local server in test_cifar10_download.py).
  c = tiny_cifar_config("cifar_micro", "search", **{"data.source": "cifar10",
                                                   "data.data_dir": str(tmp_path / "none"),
                                                   "data.download": False})
  with pytest.raises(FileNotFoundError) as e:
    run_lib.run(c, str(tmp_path / "run"))
  msg = str(e.value)
  assert "cifar-10-batches-py" in msg and str(tmp_path / "none") in msg


@pytest.mark.parametrize("bound", [0.5, 100.0])
def test_child_global_norm_clip_matches_optax(bound):
  import jax
  import optax
  from enas_jax.train.image import clip_by_global_norm
  rng = np.random.default_rng(0)
  g = {"w": rng.normal(size=(4, 3)).astype(np.float32),
       "b": [rng.normal(size=(5,)).astype(np.float32)]}
  ours, _ = clip_by_global_norm(bound).update(g, optax.EmptyState())
  ref_tx = optax.clip_by_global_norm(bound)
  ref, _ = ref_tx.update(g, ref_tx.init(g))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  norm = np.sqrt(sum(float(np.sum(x ** 2)) for x in jax.tree.leaves(g)))
  assert (norm > bound) == (bound == 0.5)  # one case clips, the other does not


def test_l2_penalty_leaves_out_the_micro_aux_head():
  import jax
  from enas_jax.spaces import cifar_micro_child as mc
  from enas_jax import spaces
  from enas_jax.train import image
  cfg = mc.MicroChildConfig(num_layers=1, num_nodes=2, out_filters=4)
  l2_params = spaces.entry("cifar_micro").child().l2_params  # the micro entry's L2 weights
  l2_penalty = lambda p: image.l2_penalty(p, l2_params=l2_params)  # noqa: E731
  shapes, _ = jax.eval_shape(lambda k: mc.init_shared(k, cfg), jax.random.key(0))
  assert "aux" in shapes  # the key l2_penalty leaves out
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  total = sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(params))
  aux = sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(params["aux"]))
  value, g = jax.jit(jax.value_and_grad(l2_penalty))(params)  # one compile (eager: ~150)
  np.testing.assert_allclose(float(value), total - aux, rtol=1e-5)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g["aux"]))
  np.testing.assert_allclose(g["stem"]["w"], 2 * params["stem"]["w"], rtol=1e-6)
