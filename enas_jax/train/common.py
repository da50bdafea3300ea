"""Pieces every loop shares: the workdir guard, errors, logging helpers."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections

log = logging.getLogger("enas_jax")

# Fields that may differ when resuming a run in an existing workdir: they change
# how long the run goes or how it reports, not what it computes.
RESUMABLE_FIELDS = {
    "search.num_epochs", "final.num_epochs", "log_every", "checkpoint_every",
    "keep_checkpoints", "tensorboard", "eval_only", "search.steps_per_dispatch",
    "final.steps_per_dispatch", "derive.batch", "distributed", "search.then_final",
    "data.data_dir",
}


class NonFiniteError(RuntimeError):
  """The loss or the gradient norm became NaN or Inf."""


def is_main_process() -> bool:
  return jax.process_index() == 0


def flatten(d: Any, prefix: str = "") -> dict:
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out.update(flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Creates ``workdir`` or checks that it belongs to the same config.

  Returns True when the workdir already held a run (so the caller resumes).
  Raises ``ValueError`` naming the differing fields when it held another config.
  """
  path = os.path.join(workdir, "config.json")
  current = config_to_dict(config)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    a, b = flatten(old), flatten(current)
    diff = sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and k not in RESUMABLE_FIELDS)
    if diff:
      lines = [f"  {k}: workdir has {a.get(k)!r}, this run has {b.get(k)!r}" for k in diff[:20]]
      raise ValueError(
          f"workdir {workdir} holds a run with a different config:\n" + "\n".join(lines) +
          "\nResume with the original settings, or pass a new --workdir.")
    resumed = True
  else:
    resumed = False
  if is_main_process():
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
  return resumed


def write_text(path: str, text: str) -> None:
  """Atomic small-file write (only process 0 writes)."""
  if not is_main_process():
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def to_float_dict(tree: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}
