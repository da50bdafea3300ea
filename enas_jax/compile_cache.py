"""JAX's persistent compilation cache, on by default in a per-user folder.

A rerun (after a preemption, or of the same config) then loads its compiled
steps from disk instead of compiling again: :func:`enable` is called by
``python -m enas_jax.main``, by the benchmark and when a task (``LMTask``,
``ImageTask``) is built, before any step compiles.

* Where: :func:`default_dir` (``$JAX_COMPILATION_CACHE_DIR``, else
  ``$ENAS_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/enas_jax/xla``, else
  ``~/.cache/enas_jax/xla``). Delete the folder to clear the cache.
* Off: ``ENAS_JAX_COMPILATION_CACHE=0`` or ``--config.compilation_cache=False``.
* A cache dir already set through JAX (``jax.config.update(
  "jax_compilation_cache_dir", ...)`` or JAX's environment variable) is left
  alone, whatever the switches say: it is the user's.
* Multi-host: JAX writes entries from process 0 only and every process reads,
  so each host's local folder helps only host 0; point ``ENAS_JAX_CACHE_DIR``
  at a folder every host sees (the NFS/gcsfuse mount of the workdir) to share it.
* The folder is trusted (an entry is executable code): it is created private
  to the user (mode 0700) and must not be writable by others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

from enas_jax import cli_util

_LOG = logging.getLogger(__name__)

ENV_SWITCH = "ENAS_JAX_COMPILATION_CACHE"
ENV_DIR = "ENAS_JAX_CACHE_DIR"
# Compiles shorter than this are not written: loading an entry costs a file read
# and a deserialisation (tens of ms), so the controller's and the small helpers'
# sub-second compiles would only add files; every child step (10 s to minutes)
# is written. (JAX's own default; a JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS in
# the environment wins.)
MIN_COMPILE_TIME_SECS = 1.0



def default_dir() -> str:
  """The cache folder used when none is configured (see the module docstring)."""
  for var in ("JAX_COMPILATION_CACHE_DIR", ENV_DIR):
    if os.environ.get(var):
      return os.path.expanduser(os.environ[var])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "enas_jax", "xla")


def _switch_on() -> bool:
  return cli_util.env_switch(ENV_SWITCH, "0 (cache off) or 1 (on, the default)") is not False


def enable(cache_dir: str | None = None, *, config=None) -> str | None:
  """Turns JAX's persistent compilation cache on in ``cache_dir`` (default
  :func:`default_dir`) and returns the folder in use, or None when off.

  Changes nothing and returns JAX's folder when one is already configured (by
  the user, a test, or an earlier call). Off when ``ENAS_JAX_COMPILATION_CACHE=0``,
  when ``config.compilation_cache`` is False, or when JAX's
  ``jax_enable_compilation_cache`` is False. Call it before the first compile
  that should be cached; a folder that cannot be created only logs a warning.
  """
  import jax
  configured = jax.config.jax_compilation_cache_dir
  if not jax.config.jax_enable_compilation_cache:
    return None
  if configured:
    return configured
  wanted = True if config is None else config.compilation_cache
  if not isinstance(wanted, bool):
    raise ValueError(f"config.compilation_cache must be True or False, not {wanted!r}.")
  if not (wanted and _switch_on()):
    return None
  path = os.path.abspath(os.path.expanduser(cache_dir or default_dir()))
  try:
    os.makedirs(path, mode=0o700, exist_ok=True)
  except OSError as e:
    _LOG.warning("compilation cache off: cannot create %s (%s); set %s to a writable folder.",
                 path, e, ENV_DIR)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
  return path


_FIELDS = {"/jax/compilation_cache/compile_requests_use_cache": "lookups",
           "/jax/compilation_cache/cache_hits": "hits",
           # recorded by jax when it writes an entry (a miss worth caching)
           "/jax/compilation_cache/cache_misses": "writes"}


@dataclasses.dataclass(eq=False)
class CacheStats:
  """Persistent-cache events of this process's compilations (all threads)
  between :meth:`start` and :meth:`stop` (or inside :func:`count`): ``lookups``
  (compilations that looked in the cache), ``hits`` (loaded from it) and
  ``writes`` (compiled and stored: a miss long enough to be cached)."""
  lookups: int = 0
  hits: int = 0
  writes: int = 0

  @property
  def misses(self) -> int:
    """Compilations that looked in the cache and compiled (short ones included)."""
    return self.lookups - self.hits

  @property
  def hit(self) -> bool:
    """Something was loaded from the cache and nothing cacheable was compiled."""
    return self.hits > 0 and self.writes == 0

  def _listener(self, event: str, **kwargs) -> None:
    del kwargs
    if event in _FIELDS:
      setattr(self, _FIELDS[event], getattr(self, _FIELDS[event]) + 1)

  def start(self) -> "CacheStats":
    import jax
    jax.monitoring.register_event_listener(self._listener)
    return self

  def stop(self) -> "CacheStats":
    import jax
    jax.monitoring.unregister_event_listener(self._listener)
    return self


@contextlib.contextmanager
def count():
  """``with count() as stats: f(x)``; then ``stats.hit``, ``stats.writes``, ..."""
  stats = CacheStats().start()
  try:
    yield stats
  finally:
    stats.stop()
