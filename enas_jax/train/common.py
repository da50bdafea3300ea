"""Pieces every loop shares: the workdir guard, errors, logging helpers."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections

from enas_jax import exec_cache

log = logging.getLogger("enas_jax")

# Fields that may differ when resuming a run in an existing workdir: they change
# how long the run goes or how it reports, not what it computes.
RESUMABLE_FIELDS = {
    "search.num_epochs", "final.num_epochs", "log_every", "checkpoint_every",
    "keep_checkpoints", "tensorboard", "eval_only", "search.steps_per_dispatch",
    "final.steps_per_dispatch", "derive.batch", "distributed", "search.then_final",
    "data.data_dir", "arc_file", "compilation_cache", "data.download", "data.download_url",
    "child.scan_layers",  # the same function, compiled rolled or unrolled
}
# Prefixes of resumable fields: the final stage's recipe is checked by the final
# stage's own workdir (``<workdir>/final/config.json``), not by the search's.
RESUMABLE_PREFIXES = ("search.final_recipe.",)


def _resolves_to_float32(value) -> bool:
  from enas_jax import backend
  try:
    return backend.resolve_compute_dtype(value) == "float32"
  except ValueError:
    return False


# Fields added to the schema after runs were written with it. A workdir whose
# config.json lacks one resumes when this run's value computes what the run
# computed then (its value, or a test on it); any other value is refused.
LEGACY_VALUES = {
    "controller.adam_form": lambda v: v == "optax",  # runs before it used optax's form
    "controller.tie_op_logits": lambda v: v is False,
    "controller.node0_anchor": lambda v: v == "lstm",
    "controller.node1_input": lambda v: v == "act_emb",
    "child.compute_dtype": _resolves_to_float32,  # every run before it was float32
}
# Renamed fields: old name -> (new name, old value -> the equivalent new value;
# None: the value passes through unchanged). A workdir recorded under the old
# name resumes when the equivalent value is this run's.
RENAMED_FIELDS = {
    "child.conv_impl": ("child.kernels", {"auto": "auto", "custom": "cpu"}),
    # PTB's validation windows are the one concept "validation batches" (issue 17).
    "search.valid_windows": ("search.valid_batches", None),
    "derive.valid_windows": ("derive.valid_batches", None),
    "final.valid_windows": ("final.valid_batches", None),
}


def _config_diff(old: dict, new: dict) -> list[str]:
  """The fields that keep a run recorded as ``old`` from resuming as ``new``
  (flattened dicts), each as a line for the error message."""
  old = dict(old)
  recorded_as = {}  # new name -> the old name the workdir recorded it under
  for name, (new_name, mapping) in RENAMED_FIELDS.items():
    if name in old and new_name not in old and name not in new:
      value = old.pop(name)
      old[new_name] = value if mapping is None else mapping.get(
          value, f"{name}={value!r} (no equivalent)")
      recorded_as[new_name] = name
  lines = []
  for k in sorted(set(old) | set(new)):
    if k in RESUMABLE_FIELDS or k.startswith(RESUMABLE_PREFIXES) or old.get(k) == new.get(k):
      continue
    if k not in old and k in LEGACY_VALUES:
      if LEGACY_VALUES[k](new.get(k)):
        continue
      lines.append(f"  {k}: the workdir's run predates this field (it computed as the "
                   f"older default does), this run has {new.get(k)!r}")
      continue
    was = f" (recorded as {recorded_as[k]})" if k in recorded_as else ""
    lines.append(f"  {k}: workdir has {old.get(k)!r}{was}, this run has {new.get(k)!r}")
  return lines


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
    lines = _config_diff(flatten(old), flatten(current))[:20]
    if lines:
      raise ValueError(
          f"workdir {workdir} holds a run with a different config:\n" + "\n".join(lines) +
          "\nResume with the original settings, or pass a new --workdir.")
    resumed = True
  else:
    resumed = False
  if is_main_process():
    os.makedirs(workdir, exist_ok=True)
    write_text(path, json.dumps(current, indent=2, sort_keys=True))  # atomic: others may read
  return resumed


def write_text(path: str, text: str) -> None:
  """Atomic small-file write (only process 0 writes), once every loaded
  executable is verified (:func:`enas_jax.exec_cache.wait_verified`)."""
  if not is_main_process():
    return
  exec_cache.wait_verified()
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def to_float_dict(tree: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(tree).items()}
