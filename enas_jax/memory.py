"""Giving the XLA compiler's freed heap back to the operating system.

Compiling a large step (the micro search step: ~400k lines of optimised HLO)
allocates ~1.8 GB of small objects on the C heap. glibc keeps most of it after
the compiler frees it, so the step's own buffers are then allocated on top of
it and the process's peak RSS is their sum. :func:`release_after_compiles`
registers a ``jax.monitoring`` listener that calls glibc's ``malloc_trim(0)``
after every compilation that took at least ``min_compile_s`` (the event fires
between compiling and the first execution). Elsewhere than glibc it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_state = {"installed": False, "trims": 0, "min_s": 1.0}


def _libc_trim():
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    return getattr(ctypes.CDLL(name), "malloc_trim", None)
  except OSError:
    return None


def release_after_compiles(min_compile_s: float = 1.0) -> bool:
  """Installs the listener once per process (a later call only changes the
  threshold); returns whether it is active."""
  _state["min_s"] = float(min_compile_s)
  if _state["installed"]:
    return True
  trim = _libc_trim()
  if trim is None:
    return False
  import jax

  def listener(event: str, duration_secs: float, **_):
    if event == _BACKEND_COMPILE_EVENT and duration_secs >= _state["min_s"]:
      trim(0)
      _state["trims"] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  _state["installed"] = True
  return True


def trims_done() -> int:
  """How many times the listener has trimmed the heap (for tests and logs)."""
  return _state["trims"]
