"""Metric logging: JSON lines + TensorBoard, and a one-line progress reporter.

``<workdir>/metrics.jsonl`` holds one JSON object per :meth:`MetricWriter.write`
call, ``{"step": int, "time": unix_seconds, **metrics}``. The file is strict
JSON: non-finite floats are written as the strings ``"nan"``, ``"inf"`` and
``"-inf"``, and :func:`read_metrics` turns those strings back into floats.
TensorBoard event files go to ``<workdir>/tensorboard``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import numpy as np

log = logging.getLogger(__name__)
METRICS_FILE = 'metrics.jsonl'
_NONFINITE = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf}
_RESERVED = ('step', 'time')
_warned_no_tb = False


def _scalar(name: str, value: Any) -> int | float:
  """Python int (for bools/integers) or float from a Python/numpy/JAX scalar."""
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f'metric {name!r} is not a scalar (shape {arr.shape})')
  item = arr.reshape(()).item()
  if isinstance(item, (bool, int)):
    return int(item)
  return float(item)


def _json_value(x: int | float) -> int | float | str:
  if isinstance(x, float) and not math.isfinite(x):
    return 'nan' if math.isnan(x) else ('inf' if x > 0 else '-inf')
  return x


class MetricWriter:
  """Appends scalar metrics to ``metrics.jsonl`` and TensorBoard under ``workdir``.

  With ``enabled=False`` (e.g. on JAX processes other than 0) nothing is
  created or written. If ``tensorboardX`` cannot be imported, a warning is
  logged once and only the JSON file is written.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
               tensorboard: bool = True):
    """Opens ``<workdir>/metrics.jsonl`` for appending (creating ``workdir``)."""
    global _warned_no_tb
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self._file = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self._file = open(os.path.join(self.workdir, METRICS_FILE), 'a',
                      encoding='utf-8')
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      except ImportError as e:
        if not _warned_no_tb:
          log.warning('tensorboardX unavailable (%s); writing JSON metrics only', e)
          _warned_no_tb = True
      else:
        self._tb = SummaryWriter(os.path.join(self.workdir, 'tensorboard'))

  def _append(self, record: Mapping[str, Any]) -> None:
    self._file.write(json.dumps(record, allow_nan=False) + '\n')
    self._file.flush()

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes scalar ``metrics`` (Python, numpy or JAX scalars) for ``step``.

    Raises:
      ValueError: a value is not a scalar, or a key is ``"step"``/``"time"``.
    """
    if not self.enabled:
      return
    clash = [k for k in metrics if k in _RESERVED]
    if clash:
      raise ValueError(f'metric names {clash} are reserved')
    values = {str(k): _scalar(k, v) for k, v in metrics.items()}
    step = int(step)
    self._append({'step': step, 'time': time.time(),
                  **{k: _json_value(v) for k, v in values.items()}})
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Writes ``{"step", "time", tag: text}`` and a TensorBoard text summary."""
    if not self.enabled:
      return
    if tag in _RESERVED:
      raise ValueError(f'tag {tag!r} is reserved')
    self._append({'step': int(step), 'time': time.time(), tag: str(text)})
    if self._tb is not None:
      self._tb.add_text(tag, str(text), int(step))

  def flush(self) -> None:
    """Flushes the TensorBoard writer (the JSON file is flushed on every write)."""
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes both outputs; safe to call twice."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """All records of ``<workdir>/metrics.jsonl`` in file order ([] if absent).

  ``"nan"``/``"inf"``/``"-inf"`` strings become floats again. Unparseable lines
  (e.g. a last line cut short by a crash) are skipped with a warning.
  """
  path = os.path.join(os.fspath(workdir), METRICS_FILE)
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        log.warning('%s:%d: skipping unparseable line', path, n)
        continue
      records.append({k: _NONFINITE.get(v, v) if isinstance(v, str) else v
                      for k, v in rec.items()})
  return records


def _fmt_duration(seconds: float) -> str:
  s = int(round(seconds))
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def _fmt_rate(r: float) -> str:
  return f'{r:.2f}' if r >= 1 else f'{r:.3g}'


def _fmt_value(v: Any) -> str:
  if isinstance(v, str):
    return v
  x = _scalar('extra', v)
  return f'{x:,}' if isinstance(x, int) else f'{x:.4g}'


class Progress:
  """Formats one-line progress reports with throughput and ETA.

  The first :meth:`line` call only starts the clock (it usually comes after
  compilation), so its line has no rates or ETA. Afterwards ``steps/s`` and
  ``<item_name>/s`` are measured over the wall time since the previous call and
  the ETA uses the average rate since the first call. Steps are absolute;
  ``start_step`` (the step a resumed run starts from) is only recorded, since
  timing starts at the first call. A step lower than the previous one restarts
  the clock. ``clock`` returns seconds (default ``time.monotonic``).
  """

  def __init__(self, total_steps: int, start_step: int = 0,
               items_per_step: float | None = None, item_name: str = 'tokens',
               clock: Callable[[], float] = time.monotonic):
    """See the class docstring."""
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.items_per_step = items_per_step
    self.item_name = item_name
    self._clock = clock
    self._first = None  # (step, time) of the first line() call
    self._prev = None  # (step, time) of the previous line() call

  def mark(self, step: int) -> None:
    """Restarts the steps/s window at ``step`` without printing (call after work
    that is not training, e.g. an epoch end's controller phase and validation,
    so the next line's rate measures training only; the ETA keeps counting it)."""
    if self._first is not None:
      self._prev = (int(step), self._clock())

  def line(self, step: int, extra: Mapping[str, Any] | None = None,
           items: float | None = None) -> str:
    """Returns e.g. ``step 1,200/41,400 (2.9%) | 3.41 steps/s | 7,638 tokens/s |
    ETA 3:21:04 | child/loss 5.123``; ``extra`` values are formatted compactly."""
    now, step = self._clock(), int(step)
    pct = 100.0 * step / self.total_steps if self.total_steps else 100.0
    parts = [f'step {step:,}/{self.total_steps:,} ({pct:.1f}%)']
    if self._first is None or step < self._prev[0]:
      self._first = (step, now)  # start (or restart after a step reset)
    else:
      (p_step, p_t), (f_step, f_t) = self._prev, self._first
      if now > p_t:
        rate = (step - p_step) / (now - p_t)
        parts.append(f'{_fmt_rate(rate)} steps/s')
        if items is not None:  # the caller counted the items since the last line
          parts.append(f'{items / (now - p_t):,.0f} {self.item_name}/s')
        elif self.items_per_step:
          parts.append(f'{rate * self.items_per_step:,.0f} {self.item_name}/s')
      remaining = max(self.total_steps - step, 0)
      avg = (step - f_step) / (now - f_t) if now > f_t else 0.0
      if remaining == 0:
        parts.append('ETA 0:00:00')
      elif avg > 0:
        parts.append(f'ETA {_fmt_duration(remaining / avg)}')
    self._prev = (step, now)
    if extra:
      parts.append(' '.join(f'{k} {_fmt_value(v)}' for k, v in extra.items()))
    return ' | '.join(parts)
