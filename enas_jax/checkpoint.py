"""Orbax checkpoints of an arbitrary JAX pytree state plus a JSON metadata dict.

Layout: ``<directory>/<step>/{state,meta}``, written by an
``orbax.checkpoint.CheckpointManager`` with synchronous saves. Orbax writes each
step into ``<step>.orbax-checkpoint-tmp`` and renames it only after every file
is written, so a step directory that exists is complete; leftovers of a killed
save are never listed as steps and are removed by the next :meth:`save`.

The state is stored as ``flax.serialization.to_state_dict(state)`` (nested
dicts only) and rebuilt with ``from_state_dict(target, ...)``, so namedtuples
and empty tuples of optax states round-trip. Typed PRNG keys
(``jax.random.key``) are stored as their raw ``key_data`` and re-wrapped with the
target key's implementation; raw ``uint32`` keys are ordinary arrays.

Multi-process JAX: every process must call ``save``/``restore`` with the same
arguments (orbax saves collectively; process 0 writes the metadata and does the
renames and deletions). Only single-process use is tested here.
"""

from __future__ import annotations

import json
import time
import logging
import os
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import serialization
import orbax.checkpoint as ocp

from enas_jax import exec_cache

log = logging.getLogger(__name__)
_TMP_MARK = '.orbax-checkpoint-tmp'
_DELETED = 'deleted' + _TMP_MARK  # holding area of steps being deleted


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or no checkpoint could be read."""


class _QuietOrbax(logging.Filter):
  """Drops orbax's INFO/DEBUG records (one per file op) from the absl logger."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


if not any(isinstance(f, _QuietOrbax) for f in logging.getLogger('absl').filters):
  logging.getLogger('absl').addFilter(_QuietOrbax())


def _why(e: BaseException, limit: int = 400) -> str:
  """``Type: message``, cut to ``limit`` chars (tensorstore errors embed specs)."""
  msg = f'{type(e).__name__}: {e}'
  return msg if len(msg) <= limit else msg[:limit] + ' ...'


def _is_key(x) -> bool:
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host_local(x) -> bool:
  """A jax.Array on a subset of the devices in a multi-process run (e.g. a
  scalar record made on the host): orbax cannot save it as a global array."""
  return (jax.process_count() > 1 and isinstance(x, jax.Array)
          and len(x.sharding.device_set) < jax.device_count())


def _to_storable(state):
  """State dict of ``state`` with typed PRNG keys replaced by their key data
  and host-local arrays (multi-process runs) by numpy copies (they hold the same
  value on every process)."""
  def conv(x):
    if _is_key(x):
      x = jax.random.key_data(x)
    return np.asarray(x) if _host_local(x) else x
  return jax.tree.map(conv, serialization.to_state_dict(state))


def _from_storable(target, restored):
  """Inverse of :func:`_to_storable`, using ``target`` for structure and key impls."""
  tdict = serialization.to_state_dict(target)
  restored = jax.tree.map(
      lambda t, r: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
      if _is_key(t) else r, tdict, restored)
  return serialization.from_state_dict(target, restored)


def _rmtree_retrying(p: epath.Path) -> None:
  """``rmtree`` that retries briefly: after a failed write, orbax's writer
  threads may still be finishing files in ``p`` ("Directory not empty")."""
  for attempt in range(10):
    try:
      p.rmtree()
      return
    except FileNotFoundError:
      return
    except OSError as e:  # listing ignores it anyway; retried next save
      if attempt == 9:
        log.warning('Could not remove %s: %s', p, _why(e))
      else:
        time.sleep(0.1 * (attempt + 1))


class Checkpointer:
  """Keeps the newest ``max_to_keep`` checkpoints of a pytree state in ``directory``."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
    """Opens (creating if needed) the checkpoint directory."""
    if '://' not in str(directory):
      directory = os.path.abspath(directory)
    self.directory = epath.Path(directory)
    # Old steps are first renamed into _DELETED (atomic), then removed: a kill
    # mid-deletion never leaves a half-deleted step that still looks committed.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True,
        todelete_subdir=_DELETED)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'meta'))

  def _tmp_dirs(self) -> list[epath.Path]:
    """Unfinished ``<step>.orbax-checkpoint-tmp`` dirs and the deletion area."""
    if not self.directory.exists():
      return []
    return [p for p in self.directory.iterdir() if _TMP_MARK in p.name and p.is_dir()]

  def _remove_tmp_dirs(self, settle_s: float = 0.0):
    """Deletes unfinished ``<step>.orbax-checkpoint-tmp`` dirs (process 0 only).

    ``settle_s > 0`` (after a failed save): orbax raises on the first failed
    write while tensorstore's writer threads may still be creating files of
    the same step, which can bring a removed directory back. Removal is then
    repeated until the directory has stayed clean for ``settle_s`` seconds
    (bounded: ~40 rounds; anything left is removed by the next save).
    """
    if jax.process_index() != 0:
      return
    warned = set()
    for _ in range(40):
      for p in self._tmp_dirs():
        if p.name != _DELETED and p.name not in warned:
          warned.add(p.name)
          log.warning('Removing unfinished checkpoint directory %s', p)
        _rmtree_retrying(p)
      if settle_s <= 0:
        return
      time.sleep(settle_s)
      if not self._tmp_dirs():
        return

  def all_steps(self) -> list[int]:
    """Sorted steps of all committed checkpoints currently on disk."""
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    """Newest committed step on disk, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict | None = None) -> None:
    """Writes ``state`` and the JSON-serialisable ``meta`` as checkpoint ``step``.

    Blocks until the checkpoint is committed, then deletes all but the newest
    ``max_to_keep`` steps. Saving an existing step overwrites it: the old copy
    is deleted first, so if that write fails the next older step is the latest.

    Raises:
      TypeError: ``meta`` is not JSON-serialisable (nothing is written).
      CheckpointError: the write failed (e.g. ``OSError`` ENOSPC); the partial
        directory is removed and the previous checkpoint stays the latest.
      StaleExecutableError: a cached executable of this run failed its check
        (:mod:`enas_jax.exec_cache`); nothing is written.
    """
    meta = dict(meta or {})
    json.dumps(meta)
    step = int(step)
    # Nothing from a program that a cache check found stale reaches the disk.
    exec_cache.wait_verified()
    self._remove_tmp_dirs()
    try:
      if step in self.all_steps():
        log.warning('Overwriting existing checkpoint for step %d', step)
        self._mngr.delete(step)
      self._mngr.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_to_storable(state)),
          meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # pylint: disable=broad-except
      self._remove_tmp_dirs(settle_s=0.25)
      steps = self.all_steps()
      if step in steps:  # committed; only the cleanup of old steps failed
        log.warning('Checkpoint step %d committed, but post-save cleanup '
                    'failed: %s', step, _why(e))
        return
      prev = (f'the previous checkpoint (step {steps[-1]}) is intact and '
              'remains the latest' if steps else 'no earlier checkpoint exists')
      raise CheckpointError(
          f'Saving checkpoint step {step} to {self.directory} failed: '
          f'{_why(e)}. Nothing of step {step} was kept; '
          f'{prev}.') from e
    self._remove_tmp_dirs()  # the renamed-away old steps

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores ``(state, meta)`` from ``step`` (default: the newest readable).

    ``target`` is a pytree with the saved structure (concrete arrays or
    ``jax.ShapeDtypeStruct`` with shardings; typed PRNG keys must be concrete);
    restored arrays get the dtypes and shardings of ``target``'s leaves. With ``step=None`` a checkpoint that
    cannot be read is skipped with a warning and the next older one is tried.

    Raises:
      CheckpointError: no (readable) checkpoint, or ``step`` unreadable/absent.
    """
    steps = self.all_steps()
    if step is not None:
      if int(step) not in steps:
        raise CheckpointError(f'No checkpoint for step {step} in '
                              f'{self.directory} (available: {steps}).')
      steps = [int(step)]
    if not steps:
      raise CheckpointError(f'No checkpoint found in {self.directory}.')
    abstract = _to_storable(target)
    errors = []
    for s in reversed(steps):
      try:
        out = self._mngr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            meta=ocp.args.JsonRestore()))
        return _from_storable(target, out['state']), dict(out['meta'] or {})
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f'step {s}: {_why(e)}')
        log.warning('Could not read checkpoint step %d in %s (%s)%s', s,
                    self.directory, _why(e),
                    '; trying an older one' if s != steps[0] else '')
    hint = ''
    if any('structures do not match' in e for e in errors):
      hint = (' -- the saved state is laid out differently from this run\'s (another config, '
              'or an enas_jax version with another weight layout, e.g. a micro search '
              'written before the shared sep weights were stacked per node): resume it with '
              'the config and version that wrote it, or start a new --workdir.')
    raise CheckpointError(f'No readable checkpoint in {self.directory}: '
                          + ' | '.join(errors) + hint)

  def close(self) -> None:
    """Releases orbax resources."""
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
