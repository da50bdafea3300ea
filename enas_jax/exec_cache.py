"""Compiled steps on disk, found without tracing: a restart runs at once.

JAX's persistent cache (:mod:`enas_jax.compile_cache`) keys an entry by the
lowered program, so even a warm start traces and lowers every step first
(seconds for a CIFAR child, most of a warm restart). This cache keys the
executable by what builds the program instead:

* a fingerprint of the jitted Python callable and everything it reaches
  (:func:`fingerprint`: the run's config, the task's settings, data statistics
  such as the CIFAR mean/std, closures, arcs);
* the arguments' structure, shapes, dtypes, weak types and shardings;
* the enas_jax source, the jax/jaxlib versions, the devices, ``XLA_FLAGS`` and
  jax's configuration options.

On a hit the executable is loaded and runs at once. A hit is then **verified**
in a background thread: the function is traced and lowered as on a cold start
and its program compared with the one the entry was compiled from. Checkpoint
and result writes wait for pending checks (:func:`wait_verified`), so a stale
entry can never reach a checkpoint: it is deleted and the run stops with
:class:`StaleExecutableError` (rerunning resumes from the newest checkpoint).

On by default wherever the compilation cache is (entries in its folder, under
``executables/``); off with ``ENAS_JAX_EXEC_CACHE=0`` or with the compilation
cache. Single-process runs only (a multi-host run uses JAX's cache alone). A
compile that JAX loaded from its own cache is not stored: XLA:CPU re-serialises
such an executable without its kernels. Measurements: docs/performance.md.
"""

from __future__ import annotations

import atexit
import dataclasses
import enum
import functools
import hashlib
import logging
import os
import pickle
import sys
import tempfile
import threading
import time
import types
from typing import Any

import jax
import numpy as np

from enas_jax import cli_util, compile_cache

_LOG = logging.getLogger(__name__)

ENV_SWITCH = "ENAS_JAX_EXEC_CACHE"
SUBDIR = "executables"
FORMAT = 2  # bump when the entry layout changes
# numpy arrays up to this size are fingerprinted by content; larger ones (the
# datasets, which every step takes as arguments) by shape and dtype only.
MAX_HASHED_BYTES = 4 << 20
# jax options that cannot change a program (or that a folder setting would
# make every entry miss on); the rest are part of the key.
_IGNORED_OPTIONS = ("cache", "log", "pprint", "dump", "transfer_guard", "traceback", "explain",
                    "source_url", "error_num")


class StaleExecutableError(RuntimeError):
  """A cached executable did not match the program this run builds."""


# --------------------------------------------------------------------- switch
def folder() -> str | None:
  """The entries' folder, or None when this cache is off (see the module docstring)."""
  if cli_util.env_switch(ENV_SWITCH, "0 (off) or 1 (on, the default)") is False:
    return None
  base = jax.config.jax_compilation_cache_dir
  if not base or "://" in str(base) or not jax.config.jax_enable_compilation_cache:
    return None
  if jax.process_count() > 1:
    return None
  return os.path.join(base, SUBDIR)


# ---------------------------------------------------------------- fingerprint
class _Walker:
  """Builds a deterministic description of a Python object graph (cycles by reference)."""

  def __init__(self):
    self.seen: dict[int, int] = {}
    self.keep: list = []  # keeps walked objects alive so their ids stay unique

  def walk(self, obj, depth: int = 0) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
      return (type(obj).__name__, repr(obj))
    if depth > 60:
      raise ValueError("object graph too deep to fingerprint")
    if isinstance(obj, (np.dtype, type)) or isinstance(obj, enum.Enum):
      return ("type", getattr(obj, "__module__", ""), getattr(obj, "__qualname__", repr(obj)))
    if isinstance(obj, types.ModuleType):
      return ("module", obj.__name__)
    if id(obj) in self.seen:
      return ("ref", self.seen[id(obj)])
    self.seen[id(obj)] = len(self.seen)
    self.keep.append(obj)
    w = functools.partial(self.walk, depth=depth + 1)
    if isinstance(obj, np.generic):
      return ("np", str(obj.dtype), repr(obj.item()))
    if isinstance(obj, np.ndarray):
      return ("ndarray", str(obj.dtype), obj.shape, _array_digest(obj))
    if isinstance(obj, jax.Array):
      if jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key):
        return ("key", str(obj.dtype), obj.shape, _array_digest(np.asarray(jax.random.key_data(obj))))
      if obj.nbytes > MAX_HASHED_BYTES or not obj.is_fully_addressable:
        return ("array", str(obj.dtype), obj.shape)
      return ("array", str(obj.dtype), obj.shape, _array_digest(np.asarray(obj)))
    if isinstance(obj, (list, tuple)):
      return (type(obj).__name__, tuple(w(x) for x in obj))
    if isinstance(obj, (set, frozenset)):
      return ("set", tuple(sorted(repr(w(x)) for x in obj)))
    if isinstance(obj, dict):
      return ("dict", tuple((repr(k), w(v)) for k, v in obj.items()))
    if isinstance(obj, functools.partial):
      return ("partial", w(obj.func), w(obj.args), w(obj.keywords))
    if isinstance(obj, types.MethodType):
      return ("method", w(obj.__func__), w(obj.__self__))
    if isinstance(obj, types.FunctionType):
      code = obj.__code__
      cells = tuple(w(c.cell_contents) if _cell_full(c) else ("empty",)
                    for c in (obj.__closure__ or ()))
      return ("function", obj.__module__, obj.__qualname__, _code_digest(code), cells,
              w(obj.__defaults__), w(obj.__kwdefaults__))
    if isinstance(obj, jax.sharding.Mesh):
      return ("mesh", obj.axis_names, obj.devices.shape,
              tuple(d.id for d in obj.devices.flat))
    if isinstance(obj, jax.sharding.Sharding):
      return ("sharding", repr(obj))
    if hasattr(obj, "to_dict") and type(obj).__module__.startswith("ml_collections"):
      return ("config", w(obj.to_dict()))
    if dataclasses.is_dataclass(obj):
      return ("dataclass", w(type(obj)),
              tuple((f.name, w(getattr(obj, f.name))) for f in dataclasses.fields(obj)))
    fp = getattr(obj, "_fingerprint_", None)  # objects that describe themselves (CachedJit)
    if callable(fp):
      return ("self", w(type(obj)), w(fp()))
    if hasattr(obj, "__wrapped__"):  # jax.jit's functions, functools.wraps
      return ("wrapped", type(obj).__name__, w(obj.__wrapped__))
    if callable(obj) and not hasattr(obj, "__dict__"):  # builtins, jax primitives, numpy ufuncs
      return ("callable", type(obj).__name__, getattr(obj, "__module__", None),
              getattr(obj, "__qualname__", getattr(obj, "__name__", None)) or _safe_repr(obj))
    state = getattr(obj, "__dict__", None)
    slots = [s for c in type(obj).__mro__ for s in getattr(c, "__slots__", ())
             if isinstance(s, str) and hasattr(obj, s)]
    if state is None and not slots:
      return ("opaque", w(type(obj)), _safe_repr(obj))
    items = list((state or {}).items()) + [(s, getattr(obj, s)) for s in slots if s != "__dict__"]
    return ("object", w(type(obj)), tuple((k, w(v)) for k, v in items))


def _cell_full(cell) -> bool:
  try:
    cell.cell_contents  # noqa: B018
    return True
  except ValueError:
    return False


def _safe_repr(obj) -> str:
  r = repr(obj)
  return type(obj).__qualname__ if " at 0x" in r else r


def _array_digest(a: np.ndarray) -> str:
  if a.nbytes > MAX_HASHED_BYTES:
    return "large"
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _code_digest(code) -> str:
  h = hashlib.sha256(code.co_code)
  h.update(repr(code.co_names).encode())
  for c in code.co_consts:
    h.update((_code_digest(c) if isinstance(c, types.CodeType) else repr(c)).encode())
  return h.hexdigest()


def fingerprint(obj) -> str:
  """A hex digest of ``obj`` and everything it reaches: values of plain data,
  numpy arrays (contents up to :data:`MAX_HASHED_BYTES`), configs, dataclasses,
  objects' attributes, and functions' code, closures and defaults."""
  return hashlib.sha256(repr(_Walker().walk(obj)).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
  """A digest of every ``.py`` file of the enas_jax package."""
  root = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha256()
  for dirpath, dirnames, files in os.walk(root):
    dirnames.sort()
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
          h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()


def environment() -> dict:
  """What outside the function decides the program: versions, devices, flags, options."""
  import jaxlib
  devs = jax.devices()
  opts = {k: repr(v) for k, v in sorted(jax.config.values.items())
          if not any(s in k for s in _IGNORED_OPTIONS)}
  return {"format": FORMAT, "python": sys.version_info[:2], "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
          "platform_version": devs[0].client.platform_version,
          "devices": [(d.id, d.device_kind) for d in devs],
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
          "options": opts, "source": source_digest()}


def _abstract(x):
  """The argument as the compile sees it: shape, dtype, weak type, and its
  sharding when committed to devices (uncommitted ones are placed by the call)."""
  if isinstance(x, jax.Array):
    sharding = x.sharding if getattr(x, "_committed", True) else None
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding,
                                weak_type=getattr(x, "weak_type", False))
  aval = jax.typeof(x)  # numpy arrays, Python scalars (weakly typed, x64 rules applied)
  return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _leaf_key(x):
  """What :func:`_abstract` reads of an argument, as a hashable tuple."""
  if isinstance(x, jax.Array):
    return (x.shape, x.dtype, getattr(x, "weak_type", False), x.sharding,
            getattr(x, "_committed", True))
  return (type(x), np.shape(x), getattr(x, "dtype", None))


def _signature(abstract) -> str:
  leaves, tree = jax.tree_util.tree_flatten(abstract)
  return repr((str(tree), [(s.shape, str(s.dtype), s.weak_type, repr(s.sharding))
                           for s in leaves]))


def program_digest(lowered) -> str:
  """A digest of a lowered program without debug locations (the verification)."""
  return hashlib.sha256(lowered.as_text(debug_info=False).encode()).hexdigest()


# ------------------------------------------------------------- verification
_PENDING: list[threading.Thread] = []
_FAILURES: list[str] = []
_LOCK = threading.Lock()


def wait_verified() -> None:
  """Blocks until every background check of a loaded executable is done; raises
  :class:`StaleExecutableError` if one did not match (its entry is deleted).
  Called before a checkpoint or a result file is written."""
  while True:
    with _LOCK:
      pending = [t for t in _PENDING if t.is_alive()]
      _PENDING[:] = pending
    if not pending:
      break
    for t in pending:
      t.join()
  with _LOCK:
    failures, _FAILURES[:] = list(_FAILURES), []
  if failures:
    raise StaleExecutableError(
        "a cached executable did not match the program this run builds, so the steps since "
        "the start ran a different program; no checkpoint or result file was written from "
        "them (progress lines and metrics logged since the start are not to be trusted). "
        + " ".join(failures)
        + f" The entry was deleted: rerun the same command to compile afresh (it resumes from "
        f"the newest checkpoint). Set {ENV_SWITCH}=0 to turn this cache off, and please report "
        f"the config that did this.")


def _check_at_exit() -> None:
  """A check still running (or failed) when the program ends is reported, not lost."""
  try:
    wait_verified()
  except StaleExecutableError as e:
    _LOG.error("%s", e)


atexit.register(_check_at_exit)


# ------------------------------------------------------------------ the jit
class CachedJit:
  """``jax.jit(fn, ...)`` whose executables are also kept in :func:`folder`.

  ``jitted`` is the plain jax function (``.lower``, ``.trace``). Calling this
  object looks up the executable by the key of the module docstring; on a miss
  it traces, lowers and compiles (JAX's own cache still applies) and writes the
  entry; on a hit it loads it and starts the background check. With the cache
  off, or if anything here fails (a backend that cannot serialise), it calls
  ``jitted`` unchanged.
  """

  def __init__(self, fn, *, donate_argnums=(), out_shardings=None):
    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    self.fn, self.donate_argnums, self.out_shardings = fn, tuple(donate_argnums), out_shardings
    self.jitted = jax.jit(fn, donate_argnums=self.donate_argnums, **kw)
    self._compiled: dict[Any, Any] = {}  # by the arguments' structure, avals, shardings
    self._fn_digest: str | None = None
    self._broken = False
    self.last_source: str | None = None  # "memory", "disk", "compiled" or "jit"
    self.last_seconds = 0.0  # the last load (disk) or trace + lower + compile (compiled)

  def _fingerprint_(self):
    return (self.fn, self.donate_argnums, self.out_shardings)

  def _cache_size(self) -> int:
    return len(self._compiled) + self.jitted._cache_size()

  def __call__(self, *args):
    path = None if self._broken else folder()
    compiled = None
    if path is not None:
      try:
        leaves, tree = jax.tree_util.tree_flatten(args)
        fast = (tree, tuple(_leaf_key(x) for x in leaves))  # hashable, no reprs
        compiled = self._compiled.get(fast)
        if compiled is not None:
          self.last_source = "memory"
        else:
          abstract = jax.tree_util.tree_unflatten(tree, [_abstract(x) for x in leaves])
          entry_path = os.path.join(path, self._key(_signature(abstract))[:40] + ".exe")
          loaded = self._load(entry_path, abstract)
      except Exception as e:  # pylint: disable=broad-except
        _LOG.warning("executable cache off for this function (%s: %s); compiling as usual.",
                     type(e).__name__, e)
        self._broken, compiled = True, None
      else:
        if compiled is None:  # on a miss the user's own errors (tracing) surface from here
          compiled = self._compiled[fast] = (
              loaded if loaded is not None else self._compile(path, entry_path, abstract))
    if compiled is None:
      self.last_source = "jit"
      return self.jitted(*args)
    return compiled(*args)

  def _key(self, sig: str) -> str:
    if self._fn_digest is None:
      self._fn_digest = fingerprint(self._fingerprint_())
    return hashlib.sha256(repr((environment(), self._fn_digest, sig)).encode()).hexdigest()

  def _load(self, entry_path: str, abstract):
    """The entry's executable (its check started), or None."""
    from jax.experimental import serialize_executable as se
    entry = _read(entry_path)
    if entry is None:
      return None
    t0 = time.perf_counter()
    try:
      by_id = {d.id: d for d in jax.devices()}
      devices = [by_id[i] for i in entry["device_ids"]]  # those it was compiled for, in order
      compiled = se.deserialize_and_load(entry["payload"], entry["in_tree"], entry["out_tree"],
                                         execution_devices=devices)
    except Exception as e:  # pylint: disable=broad-except
      _LOG.warning("executable cache: could not load %s (%s); compiling afresh.", entry_path, e)
      _remove(entry_path)
      return None
    self.last_source, self.last_seconds = "disk", time.perf_counter() - t0
    _LOG.info("executable cache: loaded %s in %.1f s (checked in the background)",
              _name(self.fn), self.last_seconds)
    self._start_check(entry_path, entry["program"], abstract)
    return compiled

  def _compile(self, path: str, entry_path: str, abstract):
    """Traces, lowers and compiles (JAX's cache applies); stores the entry."""
    from jax.experimental import serialize_executable as se
    t0 = time.perf_counter()
    lowered = self.jitted.trace(*abstract).lower()
    program = program_digest(lowered)
    t1 = time.perf_counter()
    with compile_cache.count() as jax_cache:
      compiled = lowered.compile()
    self.last_source, self.last_seconds = "compiled", time.perf_counter() - t0
    # Like JAX's cache: short compiles are not worth an entry (a file read and
    # a load each restart, and the background check's trace).
    if time.perf_counter() - t1 < _min_compile_secs():
      return compiled
    if jax_cache.hits:
      # Loaded from JAX's cache: XLA:CPU serialises such an executable without
      # its kernels ("Function ... not found" when the copy runs), so it is not
      # stored; the next start again traces, lowers and loads JAX's entry.
      _LOG.info("executable cache: %s came from JAX's cache; not stored", _name(self.fn))
      return compiled
    try:
      payload, in_tree, out_tree = se.serialize(compiled)
      # The devices it runs on: a one-device step on a many-device host must be
      # loaded for that device alone.
      device_ids = [d.id for d in compiled._executable._unloaded_executable.device_list]
      if _write(path, entry_path, {"format": FORMAT, "payload": payload, "in_tree": in_tree,
                                   "out_tree": out_tree, "program": program,
                                   "device_ids": device_ids, "created": time.time()}):
        _LOG.info("executable cache: compiled %s in %.1f s; stored for the next start",
                  _name(self.fn), self.last_seconds)
    except Exception as e:  # pylint: disable=broad-except  # e.g. a backend that cannot serialise
      _LOG.warning("executable cache: entry not stored (%s: %s).", type(e).__name__, e)
    return compiled

  def _start_check(self, entry_path: str, program: str, abstract) -> None:
    def check():
      try:
        got = program_digest(self.jitted.trace(*abstract).lower())
      except Exception as e:  # pylint: disable=broad-except
        got = f"unbuildable ({type(e).__name__}: {e})"
      if got != program:
        _remove(entry_path)
        with _LOCK:
          _FAILURES.append(f"{os.path.basename(entry_path)} ({_name(self.fn)}).")
    t = threading.Thread(target=check, name="enas_jax-exec-cache-check", daemon=True)
    with _LOCK:
      _PENDING.append(t)
    t.start()


def _min_compile_secs() -> float:
  """Compiles shorter than this are not stored: JAX's own threshold."""
  return float(jax.config.jax_persistent_cache_min_compile_time_secs)


def _name(fn) -> str:
  while isinstance(fn, functools.partial):
    fn = fn.func
  return getattr(fn, "__qualname__", type(fn).__name__)


def _read(entry_path: str) -> dict | None:
  try:
    with open(entry_path, "rb") as f:
      entry = pickle.load(f)
  except FileNotFoundError:
    return None
  except Exception as e:  # pylint: disable=broad-except
    _LOG.warning("executable cache: unreadable entry %s (%s); compiling afresh.", entry_path, e)
    _remove(entry_path)
    return None
  if not isinstance(entry, dict) or entry.get("format") != FORMAT:
    _remove(entry_path)
    return None
  return entry


def _write(path: str, entry_path: str, entry: dict) -> bool:
  """Writes the entry atomically (a temporary file, then a rename); a failed
  write (a full disk) only logs: the run goes on, without the entry."""
  tmp = None
  try:
    os.makedirs(path, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      pickle.dump(entry, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, entry_path)
    tmp = None
    return True
  except OSError as e:
    _LOG.warning("executable cache: could not write %s (%s); the run goes on without it.",
                 entry_path, e)
    return False
  finally:
    if tmp is not None:
      _remove(tmp)


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass
