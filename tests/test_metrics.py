"""Tests for enas_jax.metrics (JSON-lines/TensorBoard writer and Progress)."""

import builtins
import json
import logging
import math
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest

from enas_jax import metrics as metrics_lib
from enas_jax.metrics import MetricWriter, Progress, read_metrics


def test_json_lines_round_trip(tmp_path):
  t0 = time.time()
  with MetricWriter(tmp_path, tensorboard=False) as w:
    w.write(1, {'child/loss': 5.25, 'lr': np.float32(0.5), 'n': np.int64(3),
                'acc': jnp.asarray(0.75), 'ok': True, 'one': np.array([2.5])})
    w.write_text(1, 'arc', '0 1 1 0')
    w.write(2, {'child/loss': jnp.float32(4.0)})
  recs = read_metrics(tmp_path)
  assert [r['step'] for r in recs] == [1, 1, 2]
  assert all(t0 - 1 <= r['time'] <= time.time() + 1 for r in recs)
  r = recs[0]
  assert r['child/loss'] == 5.25 and r['lr'] == 0.5 and r['acc'] == 0.75
  assert r['one'] == 2.5
  assert r['n'] == 3 and isinstance(r['n'], int) and r['ok'] == 1
  assert recs[1]['arc'] == '0 1 1 0'
  assert recs[2]['child/loss'] == 4.0
  # Appends (a resumed run keeps the earlier lines).
  with MetricWriter(tmp_path, tensorboard=False) as w:
    w.write(3, {'x': 1.0})
  assert [r['step'] for r in read_metrics(tmp_path)] == [1, 1, 2, 3]


def test_each_write_is_flushed(tmp_path):
  w = MetricWriter(tmp_path, tensorboard=False)
  w.write(7, {'x': 1.5})
  # Read through an independent handle before close().
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    assert json.loads(f.readline())['x'] == 1.5
  w.close()
  w.close()  # idempotent


def test_non_finite_values_are_strict_json(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as w:
    w.write(1, {'a': float('nan'), 'b': np.inf, 'c': -jnp.inf, 'd': 1.0})
  text = (tmp_path / 'metrics.jsonl').read_text()
  # Strict JSON parsers reject NaN/Infinity tokens; the file must not have them.
  raw = json.loads(text, parse_constant=lambda c: pytest.fail(f'found {c}'))
  assert raw['a'] == 'nan' and raw['b'] == 'inf' and raw['c'] == '-inf'
  (rec,) = read_metrics(tmp_path)
  assert math.isnan(rec['a']) and rec['b'] == math.inf and rec['c'] == -math.inf
  assert rec['d'] == 1.0


def test_bad_metrics_raise(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as w:
    with pytest.raises(ValueError, match='not a scalar'):
      w.write(1, {'v': np.ones(3)})
    with pytest.raises(ValueError, match='reserved'):
      w.write(1, {'step': 3})
  assert read_metrics(tmp_path) == []


def test_read_metrics_missing_and_truncated(tmp_path, caplog):
  assert read_metrics(tmp_path / 'nope') == []
  with MetricWriter(tmp_path, tensorboard=False) as w:
    w.write(1, {'x': 1.0})
  with open(tmp_path / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"step": 2, "x": 1.')  # killed mid-write
  with caplog.at_level(logging.WARNING):
    assert [r['step'] for r in read_metrics(tmp_path)] == [1]
  assert 'unparseable' in caplog.text


def test_disabled_writer_is_a_no_op(tmp_path):
  workdir = tmp_path / 'proc1'
  with MetricWriter(workdir, enabled=False) as w:
    w.write(1, {'x': 1.0})
    w.write_text(1, 'arc', 'x')
  assert not workdir.exists()


def test_tensorboard_events_written(tmp_path):
  with MetricWriter(tmp_path) as w:
    w.write(1, {'child/loss': 2.0, 'bad': float('nan')})
    w.write_text(1, 'arc', '0 1')
  tb = tmp_path / 'tensorboard'
  files = os.listdir(tb)
  assert any(f.startswith('events.out.tfevents') for f in files)
  data = b''.join((tb / f).read_bytes() for f in files)
  assert b'child/loss' in data and b'arc' in data


def test_missing_tensorboardx_warns_once(tmp_path, monkeypatch, caplog):
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name.startswith('tensorboardX'):
      raise ImportError('No module named tensorboardX')
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, '__import__', fake_import)
  monkeypatch.setattr(metrics_lib, '_warned_no_tb', False)
  with caplog.at_level(logging.WARNING):
    for i in range(2):
      with MetricWriter(tmp_path / str(i)) as w:
        w.write(1, {'x': 1.0})
  assert caplog.text.count('tensorboardX unavailable') == 1
  assert read_metrics(tmp_path / '1')[0]['x'] == 1.0
  assert not (tmp_path / '0' / 'tensorboard').exists()


class FakeClock:
  """Manually advanced clock for Progress."""

  def __init__(self, t=1000.0):
    self.t = t

  def __call__(self):
    return self.t


def test_progress_line_format_and_eta():
  clock = FakeClock()
  p = Progress(41_400, start_step=1_000, items_per_step=35 * 64, clock=clock)
  # First call: compilation happened before it; no rates yet.
  assert p.line(1_000) == 'step 1,000/41,400 (2.4%)'
  clock.t += 100.0  # 200 steps in 100 s -> 2 steps/s, 4,480 tokens/s
  line = p.line(1_200, {'child/loss': 5.12345, 'ctrl/reward': np.float32(0.25),
                        'arc': '0 1', 'epoch': 3})
  # ETA: 40,200 steps left at 2 steps/s = 20,100 s = 5:35:00.
  assert line == ('step 1,200/41,400 (2.9%) | 2.00 steps/s | 4,480 tokens/s | '
                  'ETA 5:35:00 | child/loss 5.123 ctrl/reward 0.25 arc 0 1 epoch 3')
  # Window rate vs overall ETA: 600 steps in the next 100 s (6 steps/s), but
  # the ETA uses 800 steps / 200 s = 4 steps/s: 39,600 / 4 = 9,900 s.
  clock.t += 100.0
  line = p.line(1_800)
  assert '| 6.00 steps/s | 13,440 tokens/s | ETA 2:45:00' in line
  # Slow rates keep significant digits; ETAs past a day keep counting hours:
  # 130 steps / 10,000 s; ETA 39,470 / (930 / 10,200 s) = 432,897 s.
  clock.t += 10_000.0
  assert p.line(1_930).endswith('| 0.013 steps/s | 29 tokens/s | ETA 120:14:57')


def test_progress_without_items_and_at_end():
  clock = FakeClock()
  p = Progress(100, clock=clock)
  p.line(0)
  clock.t += 4.0
  assert p.line(10) == 'step 10/100 (10.0%) | 2.50 steps/s | ETA 0:00:36'
  clock.t += 1.0
  assert p.line(100).endswith('ETA 0:00:00')
  # Same clock reading: no division by zero, no rate.
  assert p.line(100) == 'step 100/100 (100.0%) | ETA 0:00:00'


def test_progress_restart_on_lower_step():
  clock = FakeClock()
  p = Progress(1_000, clock=clock)
  p.line(500)
  clock.t += 10.0
  p.line(600)
  clock.t += 10.0
  # Resumed from an older checkpoint: the clock starts over.
  assert p.line(400) == 'step 400/1,000 (40.0%)'
  clock.t += 10.0
  assert p.line(450) == 'step 450/1,000 (45.0%) | 5.00 steps/s | ETA 0:01:50'
