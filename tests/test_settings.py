"""The typed loop settings (enas_jax.train.settings) and the valid_windows ->
valid_batches rename: every config reads, bad values name their field, an old
workdir resumes under the new name only with the same value."""

import json

import pytest

from configs import cifar_macro, ptb
from enas_jax.train import common
from enas_jax.train.settings import DeriveSettings, FinalSettings, RunSettings, SearchSettings


def _set(config, **fields):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for path, value in fields.items():
      section, key = path.split("__")
      config[section][key] = value
  return config


def test_configs_read_into_typed_settings():
  s = RunSettings.from_config(ptb.get_config("smoke"))
  assert s.derive.valid_batches == 8 and s.final.average is True
  assert s.final.test_batch_size == 1 and s.search.sampler == "controller"
  c = RunSettings.from_config(cifar_macro.get_config("smoke"))
  assert c.derive.valid_batches == 2 and c.final.average is False
  assert c.final.test_batch_size is None  # PTB-only field, absent from the CIFAR schema
  with pytest.raises(dataclasses_frozen_error()):
    s.search.num_epochs = 3  # frozen


def dataclasses_frozen_error():
  import dataclasses
  return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("field,value,message", [
    ("search__sampler", "random", "search.sampler must be one of"),
    ("search__steps_per_dispatch", 0, "search.steps_per_dispatch must be >= 1"),
    ("derive__batch", 0, "derive.batch must be >= 1"),
    ("derive__valid_batches", -1, "derive.valid_batches must be >= 0"),
    ("final__test_bptt", 0, "final.test_bptt must be >= 1"),
])
def test_bad_values_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    RunSettings.from_config(_set(ptb.get_config("smoke"), **{field: value}))


def test_wrong_types_name_the_field():
  """(A ConfigDict keeps its types; a mapping built by hand may not.)"""
  search = {"num_epochs": "3", "sampler": "uniform", "controller_start_epoch": 1,
            "steps_per_dispatch": 1, "then_final": False, "valid_batches": 0}
  with pytest.raises(ValueError, match=r"search\.num_epochs must be of type int, got '3'"):
    SearchSettings.from_config(search)
  with pytest.raises(ValueError, match=r"final\.valid_batches must be of type int"):
    FinalSettings.from_config({"num_epochs": 1, "steps_per_dispatch": 1, "valid_batches": 1.5})
  with pytest.raises(ValueError, match=r"search\.then_final must be of type bool"):
    SearchSettings.from_config(dict(search, num_epochs=3, then_final=1))


def test_missing_field_is_named():
  with pytest.raises(ValueError, match="search config section has no valid_batches"):
    SearchSettings.from_config({"num_epochs": 1, "sampler": "uniform",
                                "controller_start_epoch": 1, "steps_per_dispatch": 1,
                                "then_final": False})
  assert DeriveSettings.from_config({"num_samples": 2, "batch": 1, "valid_batches": 0}).batch == 1
  assert FinalSettings.from_config(
      {"num_epochs": 1, "steps_per_dispatch": 1, "valid_batches": 0}).average is False


def test_old_name_is_an_unknown_key():
  config = ptb.get_config("smoke")
  with pytest.raises((AttributeError, KeyError), match="valid_windows"):
    config.search.valid_windows = 3


def _old_workdir(tmp_path, config, **renamed):
  """A workdir whose config.json predates the rename (valid_windows)."""
  d = common.config_to_dict(config)
  for section, value in renamed.items():
    del d[section]["valid_batches"]
    d[section]["valid_windows"] = value
  (tmp_path / "config.json").write_text(json.dumps(d))
  return str(tmp_path)


def test_old_workdir_with_valid_windows_resumes_with_the_same_value(tmp_path):
  config = _set(ptb.get_config("smoke"), search__valid_batches=3)
  workdir = _old_workdir(tmp_path, config, search=3, derive=8, final=0)
  assert common.prepare_workdir(config, workdir) is True
  # The resumed workdir now records the new name.
  assert "valid_windows" not in (tmp_path / "config.json").read_text()


def test_old_workdir_with_another_value_is_refused(tmp_path):
  old = _set(ptb.get_config("smoke"), search__valid_batches=3)
  workdir = _old_workdir(tmp_path, old, search=3, derive=8, final=0)
  new = _set(ptb.get_config("smoke"), search__valid_batches=5)
  with pytest.raises(ValueError, match=r"search\.valid_batches: workdir has 3 \(recorded as "
                     r"search\.valid_windows\), this run has 5"):
    common.prepare_workdir(new, workdir)


def test_cli_names_the_new_name_of_a_renamed_field():
  from enas_jax import cli_util
  msg = cli_util._renamed_hint(["--config.final.valid_windows"])
  assert "final.valid_windows was renamed to final.valid_batches" in msg
  assert "--config.final.valid_batches=" in msg
  assert cli_util._renamed_hint(["--config.final.valid_batchez"]) == ""
