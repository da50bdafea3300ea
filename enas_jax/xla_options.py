"""XLA:CPU compiler options that shorten the children's compiles, set before JAX starts.

Two options of XLA:CPU's LLVM pipeline, passed through ``XLA_FLAGS``
(``--xla_backend_extra_options``): ``xla_cpu_disable_loop_unrolling`` and
LLVM's ``-disable-lsr`` (no Loop Strength Reduction, a pass whose cost grows with
the many address expressions of the CPU kernels' loops). On this project's
2-core CPU they cut the XLA compile of the micro search step by ~18% and of
the PTB step by ~16%, with the steps as fast or faster (``docs/performance.md``,
"CPU compile options").

They are process-wide LLVM options and would also reach an accelerator's
compiler, so ``auto`` sets them only where no accelerator backend is installed.
XLA reads ``XLA_FLAGS`` when its first backend starts, so :func:`apply` runs
when ``enas_jax`` is imported and changes nothing once a backend is up.

* ``ENAS_JAX_CPU_COMPILE_OPTIONS=0``: never; ``=1``: whenever a backend is not
  yet up (also with an accelerator package installed); unset: ``auto``.
* An ``--xla_backend_extra_options`` already in ``XLA_FLAGS`` is the user's: left alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

from enas_jax import cli_util

ENV_SWITCH = "ENAS_JAX_CPU_COMPILE_OPTIONS"
CPU_BACKEND_OPTIONS = ("xla_cpu_disable_loop_unrolling", "-disable-lsr")
FLAG = "--xla_backend_extra_options"
OPTION = f"{FLAG}={','.join(CPU_BACKEND_OPTIONS)}"
# Packages that bring an accelerator backend (or, libtpu, the TPU compiler that
# ahead-of-time compiles read): with one installed, auto leaves XLA_FLAGS alone.
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin",
                        "jax_rocm6_plugin", "jax_rocm7_plugin", "jax_plugins")


def accelerator_installed() -> bool:
  """Whether a package that gives JAX a GPU or TPU backend is importable."""
  for name in _ACCELERATOR_MODULES:
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except (ImportError, ValueError):
      continue
  try:
    return bool(importlib.metadata.entry_points(group="jax_plugins"))
  except Exception:  # a broken distribution's metadata must not stop an import
    return False


def _backends_started() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False  # unknown: setting XLA_FLAGS is harmless when it is too late


def wanted() -> bool:
  """Whether :func:`apply` would add the options now (switch, platform, user's flags)."""
  switch = cli_util.env_switch(ENV_SWITCH, "0 (never), 1 (always) or auto (only without "
                               "an accelerator package)", allow_auto=True)
  if switch is False or FLAG in os.environ.get("XLA_FLAGS", ""):
    return False
  return switch is True or not accelerator_installed()


def active() -> bool:
  """Whether ``XLA_FLAGS`` carries these options (set by :func:`apply` or by hand)."""
  return OPTION in os.environ.get("XLA_FLAGS", "")


def apply() -> bool:
  """Adds the CPU options to ``XLA_FLAGS`` if :func:`wanted` and no backend has
  started yet; returns :func:`active`."""
  if not active() and wanted() and not _backends_started():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {OPTION}".strip()
  return active()
