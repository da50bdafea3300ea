"""End to end: search -> derive -> final (with a final recipe), resume, refusals, NaN stop,
CLI errors."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import ROOT, tiny_ptb_config
from enas_jax import backend
from enas_jax import checkpoint as ckpt_lib
from enas_jax import data
from enas_jax import metrics as metrics_lib
from enas_jax import parallel
from enas_jax.train import common
from enas_jax.train import run as run_lib
from enas_jax.train.lm import LMTask


def _read(path):
  with open(path) as f:
    return f.read()


def _with_recipe(**overrides):
  """The tiny config with a final recipe (search.then_final trains with it) and a
  user's override of one of its fields (--config.search.final_recipe.child.hidden_size)."""
  recipe = ml_collections.ConfigDict(
      {"child": {"hidden_size": 10, "drop_o": 0.3, "weight_decay_mode": "l2", "grad_clip": 0.5}})
  return tiny_ptb_config(**{"search.final_recipe": recipe,
                            "search.final_recipe.child.hidden_size": 12, **overrides})


def test_search_derive_final_then_resume_matches_uninterrupted(tmp_path):
  # Uninterrupted: 2 search epochs, derive, final (with the recipe's values).
  full = str(tmp_path / "full")
  out_full = run_lib.run(_with_recipe(), full)
  for name in ("best_arc.txt", "arcs.jsonl", "metrics.jsonl", "config.json",
               "final/final_result.json"):
    assert os.path.exists(os.path.join(full, name)), name
  assert ckpt_lib.Checkpointer(os.path.join(full, "checkpoints")).latest_step() is not None
  rows = [json.loads(l) for l in _read(os.path.join(full, "arcs.jsonl")).splitlines()]
  assert len(rows) == 3 and rows[0]["arc"] == _read(os.path.join(full, "best_arc.txt")).strip()
  assert [r["valid_ppl"] for r in rows] == sorted(r["valid_ppl"] for r in rows)
  m = metrics_lib.read_metrics(full)
  names = set().union(*m)
  for k in ("child/loss", "child/ppl", "controller/reward", "controller/entropy", "valid/ppl"):
    assert k in names, k
  assert np.isfinite(out_full["final"]["test_ppl"])
  # The final stage trained with the recipe (and the override), recorded for resumes;
  # the search with its own sizes.
  saved = common.flatten(json.loads(_read(os.path.join(full, "final", "config.json"))))
  assert saved["mode"] == "final" and saved["arc"] == out_full["best_arc"]
  assert (saved["child.hidden_size"], saved["child.drop_o"], saved["child.weight_decay_mode"],
          saved["child.grad_clip"]) == (12, 0.3, "l2", 0.5)
  assert json.loads(_read(os.path.join(full, "config.json")))["child"]["hidden_size"] == 8
  fcfg = backend.resolve_config(run_lib.final_stage_config(_with_recipe(), out_full["best_arc"]))
  task = LMTask(fcfg, data.load_corpus(fcfg.data), parallel.make_mesh(), shared=False)
  shapes = jax.eval_shape(task.init_child, jax.random.key(0))
  assert out_full["final"]["num_params"] == task.count_params(shapes.params)
  other = _with_recipe(**{"search.final_recipe.child.hidden_size": 10})
  with pytest.raises(ValueError, match="child.hidden_size: workdir has 12, this run has 10"):
    common.prepare_workdir(run_lib.final_stage_config(other, out_full["best_arc"]),
                           os.path.join(full, "final"))

  # Interrupted: stop after epoch 1 (no final), then rerun the same command for 2.
  part = str(tmp_path / "part")
  run_lib.run(_with_recipe(**{"search.num_epochs": 1, "search.then_final": False}), part)
  out_part = run_lib.run(_with_recipe(), part)
  assert _read(os.path.join(part, "best_arc.txt")) == _read(os.path.join(full, "best_arc.txt"))
  assert _read(os.path.join(part, "arcs.jsonl")) == _read(os.path.join(full, "arcs.jsonl"))
  np.testing.assert_allclose(out_part["final"]["test_ppl"], out_full["final"]["test_ppl"],
                             rtol=1e-5)
  valid = lambda d: [r["valid/ppl"] for r in metrics_lib.read_metrics(d) if "epoch" in r]  # noqa
  np.testing.assert_allclose(valid(part)[-1], valid(full)[-1], rtol=1e-5)


def test_random_search_baseline_runs(tmp_path):
  out = run_lib.run(tiny_ptb_config(**{"search.sampler": "uniform", "search.num_epochs": 1,
                                       "search.then_final": False}), str(tmp_path))
  assert "best_arc" in out
  names = set().union(*metrics_lib.read_metrics(str(tmp_path)))
  assert "controller/reward" not in names  # no controller phase in random search


def test_workdir_with_other_config_is_refused(tmp_path):
  cfg = tiny_ptb_config(**{"search.num_epochs": 1, "search.then_final": False})
  # What run() does first in a new workdir (a whole run here only costs time:
  # the check happens before any data is read or state restored).
  common.prepare_workdir(cfg, str(tmp_path))
  (tmp_path / "checkpoints").mkdir()
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  other = tiny_ptb_config(**{"search.num_epochs": 1, "search.then_final": False,
                             "child.hidden_size": 12})
  with pytest.raises(ValueError, match="child.hidden_size: workdir has 8, this run has 12"):
    run_lib.run(other, str(tmp_path))
  # Refused without touching the workdir; the same config is accepted (a resume).
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
  assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json"]
  assert common.prepare_workdir(cfg, str(tmp_path)) is True


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_ptb_config(**{"search.then_final": False, "checkpoint_every": 20,
                           "log_every": 10, "search.steps_per_dispatch": 10,
                           "debug.inject_nan_at_step": 55})
  with pytest.raises(common.NonFiniteError, match="child step 55") as e:
    run_lib.run(cfg, str(tmp_path))
  ck = ckpt_lib.Checkpointer(os.path.join(str(tmp_path), "checkpoints"))
  last = ck.latest_step()
  assert last is not None and last <= 55
  assert f"step {last}" in str(e.value)


def test_final_rejects_malformed_arc_with_position(tmp_path):
  cfg = tiny_ptb_config("final", arc="0 0 0 3 1 2 1")  # node 2 reads node 3
  with pytest.raises(ValueError, match=r"token 3 .*is 3; allowed 0..1"):
    run_lib.run(cfg, str(tmp_path))


def test_final_from_arc_file(tmp_path):
  p = tmp_path / "arc.txt"
  p.write_text("0 0 1 1 2 0 3\n")
  out = run_lib.run(tiny_ptb_config("final", arc_file=str(p)), str(tmp_path / "w"))
  assert out["arc"] == "0 0 1 1 2 0 3" and np.isfinite(out["test_ppl"])
  missing = tiny_ptb_config("final", arc_file=str(tmp_path / "nope.txt"))
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    run_lib.run(missing, str(tmp_path / "w2"))


def test_missing_ptb_files_named(tmp_path):
  cfg = tiny_ptb_config(**{"data.source": "ptb", "data.data_dir": str(tmp_path / "nodata")})
  with pytest.raises(FileNotFoundError, match="ptb.train.txt"):
    run_lib.run(cfg, str(tmp_path / "w"))


def _cli(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "enas_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_unknown_config_key_and_bad_variant(tmp_path):
  r = _cli("--config=configs/ptb.py:smoke", "--config.child.hidden_sise=3",
           f"--workdir={tmp_path}")
  assert r.returncode != 0 and "hidden_sise" in (r.stderr + r.stdout)
  r = _cli("--config=configs/ptb.py:nosuch", f"--workdir={tmp_path}")
  assert r.returncode != 0 and "nosuch" in (r.stderr + r.stdout)


def test_final_eval_only_reproduces_the_trained_result(tmp_path):
  cfg = tiny_ptb_config("final", arc="0 0 1 1 2 0 3")
  trained = run_lib.run(cfg, str(tmp_path))
  again = run_lib.run(tiny_ptb_config("final", arc="0 0 1 1 2 0 3", eval_only=True),
                      str(tmp_path))
  np.testing.assert_allclose(again["test_ppl"], trained["test_ppl"], rtol=1e-6)
  np.testing.assert_allclose(again["valid_ppl"], trained["valid_ppl"], rtol=1e-6)
  with pytest.raises(FileNotFoundError, match="eval_only"):
    run_lib.run(tiny_ptb_config("final", arc="0 0 1 1 2 0 3", eval_only=True),
                str(tmp_path / "empty"))


def test_named_arcs_set_the_space():
  from enas_jax import spaces
  from enas_jax.train.run import build_space, named_arc_config, resolve_arc
  from configs import ptb as ptb_config
  c = ptb_config.get_config("final")
  for name, named in spaces.entry("ptb").named_arcs.items():
    c2 = c.copy_and_resolve_references()
    with c2.unlocked():
      c2.arc = name
    space, arc = resolve_arc(c2, build_space(c2))
    assert (space.num_nodes, space.aggregate) == (named.space["num_nodes"],
                                                  named.space["aggregate"])
    assert space.format(arc) == named.text
    c3 = named_arc_config(c2)  # the config a final run of the name records
    assert (c3.space.num_nodes, c3.space.aggregate) == (space.num_nodes, space.aggregate)


def test_workdir_written_before_new_fields(tmp_path):
  """A workdir recorded before a field existed resumes when this run's value
  computes as the run did, and is refused with a message naming the field
  otherwise; a renamed field maps its old values."""
  cfg = tiny_ptb_config(**{"search.num_epochs": 1, "search.then_final": False,
                           "controller.adam_form": "optax"})
  common.prepare_workdir(cfg, str(tmp_path))
  path = tmp_path / "config.json"
  old = json.loads(path.read_text())
  del old["controller"]["adam_form"], old["child"]["compute_dtype"]
  old["search"]["final_recipe"] = {}
  path.write_text(json.dumps(old))
  assert common.prepare_workdir(cfg, str(tmp_path)) is True  # optax form, float32 on CPU
  path.write_text(json.dumps(old))
  tf1 = tiny_ptb_config(**{"search.num_epochs": 1, "search.then_final": False})
  with pytest.raises(ValueError, match="controller.adam_form: the workdir's run predates"):
    common.prepare_workdir(tf1, str(tmp_path))
  lines = common._config_diff({"child.conv_impl": "custom"}, {"child.kernels": "cpu"})
  assert lines == []
  lines = common._config_diff({"child.conv_impl": "plain"}, {"child.kernels": "xla"})
  assert len(lines) == 1 and "no equivalent" in lines[0]
