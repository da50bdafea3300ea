"""enas_jax.compile_cache: where the per-user cache lives, when it stays off, and
that a second process loads what the first compiled. Nothing here writes under
the real home folder: HOME and the cache variables point into tmp_path."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT, tiny_ptb_config
from enas_jax import compile_cache

_VARS = ("JAX_COMPILATION_CACHE_DIR", "ENAS_JAX_CACHE_DIR", "XDG_CACHE_HOME",
         "ENAS_JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
_OPTS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture
def no_cache(monkeypatch, tmp_path):
  """This process with no cache dir configured and a fake home; restores the
  test suite's cache (conftest.py) afterwards."""
  # jax opens its cache folder at the first compile after a folder is set: open
  # the suite's one now, so nothing compiled during the test writes elsewhere.
  jax.jit(lambda x: x * 3 + 1)(jnp.float32(1)).block_until_ready()
  saved = {k: getattr(jax.config, k) for k in _OPTS}
  for var in _VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  jax.config.update("jax_compilation_cache_dir", None)
  yield tmp_path
  for k, v in saved.items():
    jax.config.update(k, v)


def test_default_dir_order(no_cache, monkeypatch):
  tmp = no_cache
  assert compile_cache.default_dir() == str(tmp / "home" / ".cache" / "enas_jax" / "xla")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "xdg"))
  assert compile_cache.default_dir() == str(tmp / "xdg" / "enas_jax" / "xla")
  monkeypatch.setenv("ENAS_JAX_CACHE_DIR", str(tmp / "ours"))
  assert compile_cache.default_dir() == str(tmp / "ours")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp / "jax"))
  assert compile_cache.default_dir() == str(tmp / "jax")


def test_enable_sets_jax_cache(no_cache, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(no_cache / "xdg"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 7.0)
  path = compile_cache.enable()
  assert path == str(no_cache / "xdg" / "enas_jax" / "xla") and os.path.isdir(path)
  assert os.stat(path).st_mode & 0o077 == 0  # private: entries are trusted code
  assert jax.config.jax_compilation_cache_dir == path
  assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_TIME_SECS
  assert compile_cache.enable(str(no_cache / "other")) == path  # a second call changes nothing
  assert not (no_cache / "home").exists()


def test_disabled_by_env(no_cache, monkeypatch):
  monkeypatch.setenv("ENAS_JAX_CACHE_DIR", str(no_cache / "c"))
  monkeypatch.setenv("ENAS_JAX_COMPILATION_CACHE", "0")
  assert compile_cache.enable() is None
  assert jax.config.jax_compilation_cache_dir is None and not (no_cache / "c").exists()
  monkeypatch.setenv("ENAS_JAX_COMPILATION_CACHE", "maybe")
  with pytest.raises(ValueError, match="ENAS_JAX_COMPILATION_CACHE='maybe'"):
    compile_cache.enable()


@pytest.mark.parametrize("module", ["ptb", "cifar_micro", "cifar_macro"])
def test_disabled_by_config_field(no_cache, monkeypatch, module):
  import importlib
  monkeypatch.setenv("ENAS_JAX_CACHE_DIR", str(no_cache / "c"))
  config = importlib.import_module(f"configs.{module}").get_config("smoke")
  assert config.compilation_cache is True
  with config.unlocked():
    config.compilation_cache = False
  assert compile_cache.enable(config=config) is None
  assert jax.config.jax_compilation_cache_dir is None
  with config.unlocked():
    config.compilation_cache = True
  assert compile_cache.enable(config=config) == str(no_cache / "c")


def test_configured_dir_left_alone(no_cache, monkeypatch):
  mine = str(no_cache / "mine")
  jax.config.update("jax_compilation_cache_dir", mine)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 7.0)
  monkeypatch.setenv("ENAS_JAX_CACHE_DIR", str(no_cache / "c"))
  assert compile_cache.enable(str(no_cache / "explicit")) == mine
  assert jax.config.jax_compilation_cache_dir == mine
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 7.0
  assert not (no_cache / "c").exists() and not (no_cache / "explicit").exists()


def test_task_enables_cache(no_cache, monkeypatch):
  """The notebook path: building a task turns the cache on (unless the config says no)."""
  from enas_jax import data, parallel
  from enas_jax.train.lm import LMTask
  monkeypatch.setenv("ENAS_JAX_CACHE_DIR", str(no_cache / "c"))
  config = tiny_ptb_config("smoke", compilation_cache=False)
  corpus = data.load_corpus(config.data)
  LMTask(config, corpus, parallel.make_mesh(), shared=True)
  assert jax.config.jax_compilation_cache_dir is None
  LMTask(tiny_ptb_config("smoke"), corpus, parallel.make_mesh(), shared=True)
  assert jax.config.jax_compilation_cache_dir == str(no_cache / "c")


_CHILD = """
import json, jax, jax.numpy as jnp
from enas_jax import compile_cache
path = compile_cache.enable()
with compile_cache.count() as stats:
  jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"path": path, "hits": stats.hits, "writes": stats.writes,
                  "misses": stats.misses, "hit": stats.hit}))
"""


def test_second_process_hits(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in _VARS}
  env.update(JAX_PLATFORMS="cpu", HOME=str(tmp_path / "home"),
             ENAS_JAX_CACHE_DIR=str(tmp_path / "c"),
             # the function compiles in milliseconds; cache it anyway
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  def child():
    r = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

  first, second = child(), child()
  assert first["path"] == second["path"] == str(tmp_path / "c")
  assert first["hits"] == 0 and first["writes"] >= 1 and not first["hit"]
  assert second["hits"] >= 1 and second["writes"] == 0 and second["hit"]
  assert not (tmp_path / "home").exists()
