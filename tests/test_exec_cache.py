"""enas_jax.exec_cache: the key (fingerprints of functions and what they read),
loading without tracing, the background check that catches a stale entry before
anything is written, and the failures that must lose nothing."""

import dataclasses
import errno
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_cifar_config
from enas_jax import exec_cache


@pytest.fixture
def cache(monkeypatch, tmp_path):
  """The executable cache on, in tmp_path, storing every compile."""
  monkeypatch.setenv(exec_cache.ENV_SWITCH, "1")
  monkeypatch.setattr(exec_cache, "folder", lambda: str(tmp_path))
  # Every compile stored here; JAX's cache keeps the suite's 2 s threshold, so
  # it never holds these tiny programs (see test_executable_from_jax_cache_is_not_stored).
  monkeypatch.setattr(exec_cache, "_min_compile_secs", lambda: 0.0)
  yield tmp_path
  exec_cache.wait_verified()


def _entries(path):
  return sorted(f for f in os.listdir(path) if f.endswith(".exe"))


# ------------------------------------------------------------- fingerprints
def _scaled(scale):
  return lambda x: x * scale


@dataclasses.dataclass
class _Settings:
  lr: float
  stats: np.ndarray


class _Task:
  def __init__(self, settings, big):
    self.settings, self.big, self.me = settings, big, self  # a cycle


def test_fingerprint_follows_values_not_identity():
  fp = exec_cache.fingerprint
  assert fp(_scaled(2.0)) == fp(_scaled(2.0))  # two closures, same code and value
  assert fp(_scaled(2.0)) != fp(_scaled(3.0))  # a closed-over constant differs
  mean = np.array([0.49, 0.48, 0.45], np.float32)
  a = _Task(_Settings(0.1, mean), np.zeros((2000, 1000), np.float32))
  b = _Task(_Settings(0.1, mean.copy()), np.ones((2000, 1000), np.float32))
  # data statistics by content; the 8 MB array (an argument's data) by shape only
  assert fp(functools.partial(np.add, a)) == fp(functools.partial(np.add, b))
  c = _Task(_Settings(0.1, mean + 1e-3), a.big)
  assert fp(a) != fp(c)
  assert fp(a) != fp(_Task(_Settings(0.2, mean), a.big))
  assert fp(a) != fp(_Task(_Settings(0.1, mean), np.zeros((2000, 999), np.float32)))
  assert fp(tiny_cifar_config()) == fp(tiny_cifar_config())
  assert fp(tiny_cifar_config()) != fp(tiny_cifar_config(**{"child.l2_reg": 1e-3}))


# ----------------------------------------------------------------- round trip
def _step(scale, state, x):
  return {"w": state["w"] - scale * jnp.tanh(x.T @ x @ state["w"])}, jnp.sum(x)


def test_second_instance_loads_from_disk_and_agrees(cache):
  state = {"w": jnp.eye(4)}
  x = jnp.arange(8.0).reshape(2, 4)
  first = exec_cache.CachedJit(functools.partial(_step, 0.5), donate_argnums=(0,))
  out1 = first({"w": jnp.eye(4)}, x)
  assert first.last_source == "compiled" and len(_entries(cache)) == 1
  first({"w": jnp.eye(4)}, x)
  assert first.last_source == "memory"

  second = exec_cache.CachedJit(functools.partial(_step, 0.5), donate_argnums=(0,))
  out2 = second(state, x)
  assert second.last_source == "disk"
  assert state["w"].is_deleted()  # the loaded executable still donates
  np.testing.assert_array_equal(out1[0]["w"], out2[0]["w"])
  exec_cache.wait_verified()  # the background check agrees
  assert len(_entries(cache)) == 1

  # another shape, another entry; another constant, another key
  exec_cache.CachedJit(functools.partial(_step, 0.5))({"w": jnp.eye(4)}, x[:1])
  other = exec_cache.CachedJit(functools.partial(_step, 0.25))
  other({"w": jnp.eye(4)}, x)
  assert other.last_source == "compiled" and len(_entries(cache)) == 3


def test_stale_entry_is_caught_before_anything_is_written(cache, monkeypatch, tmp_path):
  """An entry whose key missed what changed the program: the check finds it,
  deletes it, and the next checkpoint refuses to write."""
  from enas_jax import checkpoint as ckpt_lib
  x = jnp.ones((3,))
  exec_cache.CachedJit(lambda v: v * 2.0)(x)
  assert len(_entries(cache)) == 1
  # the same key for a different program (as if a baked-in input were not fingerprinted)
  key = _entries(cache)[0][:-len(".exe")]
  monkeypatch.setattr(exec_cache.CachedJit, "_key", lambda self, sig: key)
  stale = exec_cache.CachedJit(lambda v: v * 3.0)
  out = stale(x)
  assert stale.last_source == "disk"
  np.testing.assert_allclose(out, 2.0)  # the stale program ran: this is what the check is for
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  with pytest.raises(exec_cache.StaleExecutableError, match="rerun the same command"):
    ckpt.save(1, {"w": np.zeros(2)})
  assert ckpt.latest_step() is None and _entries(cache) == []
  exec_cache.wait_verified()  # reported once


_FROM_JAX_CACHE = """
import json, sys
import jax, jax.numpy as jnp
from enas_jax import compile_cache, exec_cache
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
f = lambda v: jnp.tanh(v @ v.T) * 7.0
x = jnp.ones((4, 4))
with compile_cache.count() as stats:
  if sys.argv[2] == "jax":
    out, src = jax.jit(f)(x), "jax"
  else:
    cached = exec_cache.CachedJit(f)
    out = cached(x)
    src = cached.last_source
exec_cache.wait_verified()
print(json.dumps({"src": src, "jax_hits": stats.hits, "out": float(out[0, 0])}))
"""


def test_executable_from_jax_cache_is_not_stored(tmp_path):
  """XLA:CPU re-serialises an executable loaded from JAX's cache without its
  kernels ("Function ... not found" when the copy runs): such a compile is not
  stored, and a later start still runs (from JAX's cache again)."""
  import json
  import subprocess
  import sys
  from conftest import ROOT
  env = dict(os.environ, JAX_PLATFORMS="cpu", ENAS_JAX_EXEC_CACHE="1")
  runs = []
  for how in ("jax", "cached", "cached"):
    r = subprocess.run([sys.executable, "-c", _FROM_JAX_CACHE, str(tmp_path), how], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
  assert [r["src"] for r in runs] == ["jax", "compiled", "compiled"]
  assert [r["jax_hits"] for r in runs] == [0, 1, 1]
  assert not os.listdir(tmp_path / exec_cache.SUBDIR) if (tmp_path / exec_cache.SUBDIR).exists() \
      else True
  np.testing.assert_allclose([r["out"] for r in runs], np.tanh(4.0) * 7.0, rtol=1e-6)


def test_stale_entry_reported_at_exit(cache, monkeypatch, caplog):
  """A run that ends before any write still reports a failed check (atexit)."""
  x = jnp.ones((2,))
  exec_cache.CachedJit(lambda v: v + 2.0)(x)
  key = _entries(cache)[0][:-len(".exe")]
  monkeypatch.setattr(exec_cache.CachedJit, "_key", lambda self, sig: key)
  exec_cache.CachedJit(lambda v: v + 3.0)(x)
  with caplog.at_level(logging.ERROR, logger="enas_jax.exec_cache"):
    exec_cache._check_at_exit()
  assert "did not match" in caplog.text and _entries(cache) == []


def test_corrupt_entry_recompiles(cache, caplog):
  f = lambda v: v + 1.0  # noqa: E731
  exec_cache.CachedJit(f)(jnp.ones(2))
  (name,) = _entries(cache)
  with open(os.path.join(cache, name), "wb") as fh:
    fh.write(b"not a pickle")
  again = exec_cache.CachedJit(f)
  with caplog.at_level(logging.WARNING, logger="enas_jax.exec_cache"):
    np.testing.assert_allclose(again(jnp.ones(2)), 2.0)
  assert again.last_source == "compiled" and "unreadable entry" in caplog.text
  assert _entries(cache) == [name]  # rewritten


def test_full_disk_loses_nothing(cache, monkeypatch, caplog):
  def no_space(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(exec_cache.tempfile, "mkstemp", no_space)
  f = exec_cache.CachedJit(lambda v: v * 5.0)
  with caplog.at_level(logging.WARNING, logger="enas_jax.exec_cache"):
    np.testing.assert_allclose(f(jnp.ones(2)), 5.0)
  assert "No space left" in caplog.text and _entries(cache) == []
  np.testing.assert_allclose(f(jnp.ones(2)), 5.0)


def test_switch(monkeypatch, tmp_path):
  jax.config.update("jax_compilation_cache_dir", jax.config.jax_compilation_cache_dir)
  monkeypatch.setenv(exec_cache.ENV_SWITCH, "0")
  assert exec_cache.folder() is None
  f = exec_cache.CachedJit(lambda v: v - 1.0)
  np.testing.assert_allclose(f(jnp.ones(2)), 0.0)
  assert f.last_source == "jit"
  monkeypatch.setenv(exec_cache.ENV_SWITCH, "1")
  assert exec_cache.folder() == os.path.join(jax.config.jax_compilation_cache_dir,
                                             exec_cache.SUBDIR)
  monkeypatch.setenv(exec_cache.ENV_SWITCH, "maybe")
  with pytest.raises(ValueError, match=exec_cache.ENV_SWITCH):
    exec_cache.folder()


# --------------------------------------------------------- a real train chunk
def test_task_chunk_key_covers_data_statistics(cache):
  """Two builds of one run share the entry; CIFAR mean/std (baked into the
  step as constants) are part of the key."""
  from enas_jax import data as data_lib
  from enas_jax import parallel
  from enas_jax.train.image import ImageTask
  cfg = tiny_cifar_config()
  images = data_lib.load_images(cfg.data)
  mesh = parallel.make_mesh()

  def key_of(imgs):
    task = ImageTask(cfg, imgs, mesh, shared=False, arc=np.zeros(6, np.int32))
    chunk = task.make_train_chunk(arc_static=task.fns.arc)
    state = task.init_child(jax.random.key(0))
    args = (task.data, state, {}, jax.random.key(1), jnp.int32(1))
    sig = exec_cache._signature(jax.tree_util.tree_map(exec_cache._abstract, args))
    return chunk.cached._key(sig)

  assert key_of(images) == key_of(data_lib.load_images(cfg.data))
  shifted = dataclasses.replace(images, mean=np.asarray(images.mean) + 0.01)
  assert key_of(shifted) != key_of(images)


def test_rerun_loads_every_step_and_matches(cache, monkeypatch, tmp_path):
  """A search run twice on one cache: the second loads its steps (child chunk,
  controller phase, validation, derive) from disk, checks them, and writes the
  same results."""
  from enas_jax import metrics as metrics_lib
  from enas_jax.train import run as run_lib
  loads = []
  load = exec_cache.CachedJit._load

  def counting_load(self, entry_path, abstract):
    out = load(self, entry_path, abstract)
    loads.append(out is not None)
    return out

  monkeypatch.setattr(exec_cache.CachedJit, "_load", counting_load)
  cfg = tiny_cifar_config("cifar_macro", **{"search.then_final": False,
                                             "search.num_epochs": 1})
  # JAX's cache unused (its hits would not be stored: see the test above). Not
  # through jax_enable_compilation_cache: jax reads that once per process.
  from jax._src import compilation_cache as jax_cc
  monkeypatch.setattr(jax_cc, "is_cache_used", lambda backend: False)
  run_lib.run(cfg, str(tmp_path / "a"))
  assert loads and not any(loads)
  stored = len(_entries(cache))
  assert stored >= 4  # child chunk, controller phase, validation, derive's scores
  loads.clear()
  run_lib.run(cfg, str(tmp_path / "b"))
  assert len(loads) == stored and all(loads)
  exec_cache.wait_verified()
  assert len(_entries(cache)) == stored  # every check passed: nothing deleted

  def read(d, name):
    with open(os.path.join(tmp_path, d, name)) as f:
      return f.read()
  assert read("a", "arcs.jsonl") == read("b", "arcs.jsonl")
  valid = lambda d: [r["valid/acc"] for r in metrics_lib.read_metrics(str(tmp_path / d))  # noqa: E731
                     if "epoch" in r]
  assert valid("a") == valid("b")


_TWO_DEVICES = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from enas_jax import exec_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
exec_cache.folder = lambda: sys.argv[1]
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.device_put(jnp.arange(8.0).reshape(4, 2), NamedSharding(mesh, P("data")))
both = exec_cache.CachedJit(lambda a: (a * 2).sum(0), out_shardings=NamedSharding(mesh, P()))
one = exec_cache.CachedJit(lambda a: a + 1)
y, z = both(x), one(jnp.ones(3))
exec_cache.wait_verified()
print(json.dumps({"src": [both.last_source, one.last_source], "y": np.asarray(y).tolist(),
                  "z": np.asarray(z).tolist(), "devices": [len(y.sharding.device_set),
                                                           len(z.sharding.device_set)]}))
"""


def test_two_devices_and_one_device_steps_reload(tmp_path):
  """On a 2-device host, a step over both devices and a one-device step each
  reload onto the devices they were compiled for (fake CPU devices)."""
  import json
  import subprocess
  import sys
  from conftest import ROOT, xla_flags
  env = dict(os.environ, JAX_PLATFORMS="cpu", ENAS_JAX_EXEC_CACHE="1",
             XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
  runs = []
  for _ in range(2):
    r = subprocess.run([sys.executable, "-c", _TWO_DEVICES, str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
  assert runs[0]["src"] == ["compiled", "compiled"] and runs[1]["src"] == ["disk", "disk"]
  assert runs[0]["y"] == runs[1]["y"] == [24.0, 32.0] and runs[1]["z"] == [2.0, 2.0, 2.0]
  assert runs[1]["devices"] == [2, 1]
