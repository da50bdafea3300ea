"""Command line: ``python -m enas_jax.main --config=configs/ptb.py[:variant] [--workdir=DIR] [--config.x=y ...]``.

Without ``--workdir`` the run goes to ``runs/<config name>_<variant>``. Rerunning
the same command on the same workdir resumes from its newest checkpoint.
Compiled steps are kept in a per-user folder (``enas_jax.compile_cache``), so a
rerun skips most compilation; ``--config.compilation_cache=False`` turns it off.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/ptb.py:search.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default runs/<config name>_<variant>).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/ptb.py:smoke")
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
  logger = logging.getLogger("enas_jax")
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  workdir = _WORKDIR.value or os.path.join("runs", f"{config.name}_{config.variant}")
  from enas_jax import compile_cache, memory  # heavy imports after flag parsing
  from enas_jax.checkpoint import CheckpointError
  from enas_jax.exec_cache import StaleExecutableError
  from enas_jax.train import run as run_lib
  from enas_jax.train.common import NonFiniteError
  print(f"workdir: {workdir}", flush=True)
  try:  # before anything compiles: a rerun loads its compiled steps from disk
    cache = compile_cache.enable(config=config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"compilation cache: {cache or 'off'}", flush=True)
  memory.release_after_compiles()
  try:
    run_lib.run(config, workdir)
  except (ValueError, FileNotFoundError) as e:  # bad input: nothing was lost
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (NonFiniteError, CheckpointError, StaleExecutableError) as e:  # the run stopped; its last checkpoint is intact
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  from enas_jax.cli_util import parse_flags
  app.run(main, flags_parser=parse_flags)
