"""search.then_final trains the derived arc with the space's final recipe."""

import importlib
import json
import os

import ml_collections
import pytest

from conftest import tiny_cifar_config
from enas_jax import data as data_lib
from enas_jax import parallel
from enas_jax.train import common
from enas_jax.train import run as run_lib
from enas_jax.train.settings import RunSettings

# Fields where the final stage rightly differs from the final variant: the arc and
# the fields that shape it stay the search's (the derived arc was searched there).
ARC_SHAPE = {"ptb": {"space.num_nodes", "space.aggregate"},
             "cifar_macro": {"space.num_layers"}, "cifar_micro": set()}


def _flat(config):
  return common.flatten(common.config_to_dict(config))


@pytest.mark.parametrize("name", sorted(ARC_SHAPE))
def test_final_stage_of_the_search_variant_is_the_final_variant(name):
  mod = importlib.import_module(f"configs.{name}")
  search, final = mod.get_config("search"), mod.get_config("final")
  assert len(search.search.final_recipe) > 0
  got, want = _flat(run_lib.final_stage_config(search, "ARC")), _flat(final)
  differ = {k for k in set(got) | set(want) if got.get(k) != want.get(k)}
  differ = {k for k in differ if not k.startswith("search.")} - {"variant", "arc"}
  assert differ == ARC_SHAPE[name], differ
  assert got["mode"] == "final" and got["arc"] == "ARC"
  # The values the issue names: the search's would be the opposite.
  expect = {"ptb": {"child.hidden_size": 800, "data.batch_size": 64, "data.random_bptt": True,
                    "child.weight_decay_mode": "l2", "child.grad_clip": 0.25,
                    "child.drop_x": 0.725},
            "cifar_macro": {"child.out_filters": 96, "data.batch_size": 100,
                            "data.num_valid": 0, "child.keep_prob": 0.5},
            "cifar_micro": {"child.out_filters": 36, "space.num_layers": 15,
                            "data.num_valid": 0, "data.cutout_size": 16,
                            "final.num_epochs": 630, "child.keep_prob": 0.8}}[name]
  for k, v in expect.items():
    assert got[k] == v != _flat(search).get(k) or k == "final.num_epochs", k


@pytest.mark.parametrize("name", sorted(ARC_SHAPE))
def test_smoke_final_stage_keeps_the_small_sizes(name):
  smoke = importlib.import_module(f"configs.{name}").get_config("smoke")
  assert len(smoke.search.final_recipe) == 0
  got, before = _flat(run_lib.final_stage_config(smoke, "ARC")), _flat(smoke)
  assert {k for k in got if got[k] != before.get(k)} == {"mode", "arc"}


def test_user_overrides_of_final_fields_are_honoured():
  from configs import ptb as ptb_config
  c = ptb_config.get_config("search")
  with c.unlocked():  # as --config.X=Y on the search command line
    c.final.num_epochs = 30
    c.search.final_recipe.child.hidden_size = 400
    c.child.lr = 10.0  # a field both recipes share: the search's value carries over
  f = run_lib.final_stage_config(c, "ARC")
  assert (f.final.num_epochs, f.child.hidden_size, f.child.lr) == (30, 400, 10.0)
  assert f.child.drop_e == 0.125 and c.child.hidden_size == 200
  with c.unlocked():
    c.search.final_recipe.child.hiden_size = 3
  with pytest.raises(ValueError, match="final_recipe.child.hiden_size: the config has no"):
    run_lib.final_stage_config(c, "ARC")


def test_cifar_final_stage_reloads_the_data_and_builds_from_the_recipe(tmp_path, monkeypatch):
  """The recipe's data.num_valid 0 (all training images): the final stage's task
  gets reloaded data and the final config (the tiny run is in test_pipeline)."""
  recipe = ml_collections.ConfigDict({"data": {"num_valid": 0}, "child": {"out_filters": 6}})
  cfg = tiny_cifar_config("cifar_macro", **{"search.final_recipe": recipe})
  seen = {}
  monkeypatch.setattr(run_lib, "_make_task", lambda config, data, mesh, shared, arc, settings: seen.update(
      config=config, data=data, shared=shared, settings=settings) or "task")
  monkeypatch.setattr(run_lib, "FinalSetup", lambda config, space, task, arc, settings: (config, task))
  monkeypatch.setattr(run_lib, "run_final", lambda setup, fdir, writer: {"setup": setup})
  search_data = data_lib.load_images(cfg.data)
  out = run_lib._run_then_final(cfg, search_data, parallel.make_mesh(), str(tmp_path),
                                "0 1 0 2 1 1")
  assert seen["config"].child.out_filters == 6 and seen["config"].mode == "final"
  assert seen["config"].child.platform is not None  # resolved for the backend
  assert not seen["shared"] and out["setup"] == (seen["config"], "task")
  # The final stage's typed settings are read from its own config.
  assert seen["settings"] == RunSettings.from_config(seen["config"])
  assert len(seen["data"].valid_x) == 0 and len(seen["data"].train_x) == (
      len(search_data.train_x) + len(search_data.valid_x))
  with open(os.path.join(tmp_path, "final", "config.json")) as f:
    saved = json.load(f)
  assert saved["data"]["num_valid"] == 0 and saved["arc"] == "0 1 0 2 1 1"
  assert saved["child"].get("platform") is None  # recorded unresolved, as the search's
