"""Faults: kill -9 at random moments then resume, codec and config fuzzing, a NaN
in a CIFAR run, a full disk during a run.

The kill test is also a script that prints one line per kill::

  python tests/test_faults.py --kills 10 [--seed 1] [--workdir DIR]
"""

import argparse
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CACHE_MAX_BYTES, ROOT, tiny_cifar_config, tiny_ptb_config

import jax  # noqa: E402  (after conftest: the compilation cache is set)

from enas_jax import checkpoint as ckpt_lib  # noqa: E402
from enas_jax.spaces.cifar_macro import OP_NAMES as MACRO_OPS, PAPER_ARC as MACRO_PAPER  # noqa: E402
from enas_jax.spaces.cifar_macro import MacroCodec  # noqa: E402
from enas_jax.spaces.cifar_micro import PAPER_ARC as MICRO_PAPER, MicroCodec  # noqa: E402
from enas_jax.train import common  # noqa: E402
from enas_jax.train import run as run_lib  # noqa: E402

# After a failed tensorstore write orbax closes its event loop while tensorstore
# still posts a callback to it (see test_checkpoint.py): harmless.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning")


# The fuzzers' examples per test: FUZZ_EXAMPLES (the default suite; hypothesis
# draws new ones every run), ENAS_JAX_FUZZ_EXAMPLES=2000 for a deeper search.
FUZZ_EXAMPLES = int(os.environ.get("ENAS_JAX_FUZZ_EXAMPLES", "400"))


# ============================================================================
# kill -9 at random moments, then rerun the same command.

# configs/ptb.py:smoke shrunk like tests/conftest.py's tiny_ptb_config, with
# mid-epoch checkpoints (every 20 of 99 steps per epoch) and final training.
KILL_OVERRIDES = {
    "data.vocab_size": 40, "data.num_train_tokens": 2400, "data.num_valid_tokens": 800,
    "data.num_test_tokens": 200, "data.batch_size": 4, "data.eval_batch_size": 4,
    "data.bptt": 6, "space.num_nodes": 4, "child.hidden_size": 8, "controller.lstm_size": 8,
    "controller.train_steps": 2, "controller.num_aggregate": 2, "search.num_epochs": 2,
    "search.steps_per_dispatch": 10, "search.then_final": True, "derive.num_samples": 3,
    "derive.valid_batches": 3, "derive.batch": 2, "final.num_epochs": 1,
    "final.valid_batches": 4, "final.test_batch_size": 2, "final.test_bptt": 5,
    "final.steps_per_dispatch": 10, "log_every": 10, "checkpoint_every": 20,
    "tensorboard": False,
}


def kill_command(workdir):
  return [sys.executable, "-m", "enas_jax.main", "--config=configs/ptb.py:smoke",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in KILL_OVERRIDES.items())]


def kill_config():
  """The config the command line above builds, in this process."""
  from configs import ptb as ptb_config
  c = ptb_config.get_config("smoke")
  with c.unlocked():
    for k, v in KILL_OVERRIDES.items():
      node = c
      *path, last = k.split(".")
      for p in path:
        node = node[p]
      node[last] = v
  return c


def _env(killed: bool = False):
  """Environment of a child run: it shares this process's compilation cache
  (conftest.py). A run that will be killed only reads it: with jax's size-limited
  cache a kill between an entry and its access-time file breaks later writes."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(CACHE_MAX_BYTES)  # locked reads and writes
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1e9" if killed else "0.5"
  return env


def _read(path):
  with open(path) as f:
    return f.read()


def run_outputs(workdir):
  """What a finished run is compared on: best arc, all derived arcs, final test ppl."""
  final = json.loads(_read(os.path.join(workdir, "final", "final_result.json")))
  return (_read(os.path.join(workdir, "best_arc.txt")),
          _read(os.path.join(workdir, "arcs.jsonl")), final["test_ppl"])


class Targets:
  """Restore targets (freshly initialised states) for a run's checkpoints."""

  def __init__(self, config):
    from enas_jax import parallel
    self.config = config
    self.space = run_lib.build_space(config)
    self.mesh = parallel.make_mesh()
    self.data = run_lib.load_data(config)
    self._search = None
    self._final = {}

  def search(self):
    from enas_jax.train.search import SearchSetup
    if self._search is None:
      task = run_lib._make_task(self.config, self.data, self.mesh, shared=True)
      self._search = SearchSetup(self.config, self.space, task).init_state()
    return self._search

  def final(self, arc_text):
    from enas_jax.train.final import FinalSetup
    if arc_text not in self._final:
      arc = self.space.parse(arc_text)
      task = run_lib._make_task(self.config, self.data, self.mesh, shared=False, arc=arc)
      self._final[arc_text] = FinalSetup(self.config, self.space, task, arc).init_state()
    return self._final[arc_text]


# A kill while an old step (keep_checkpoints) is deleted once left a partly
# deleted directory under the step's own name that Checkpointer still listed;
# checkpoint.py now renames a step away before deleting it
# (test_kill_during_deletion_of_an_old_step). Set True to tolerate unreadable
# steps older than a readable newest one again.
TOLERATE_PARTLY_DELETED_OLD_STEPS = False


def check_restorable(workdir, targets):
  """Restores every checkpoint step on disk (search and final); returns
  ``{"search": [steps], "final": [steps], "unreadable": [descriptions]}``."""
  found = {"unreadable": []}
  for stage, sub in (("search", "checkpoints"), ("final", os.path.join("final", "checkpoints"))):
    d = os.path.join(workdir, sub)
    found[stage] = []
    if not os.path.isdir(d):
      continue
    if stage == "final":
      target = targets.final(_read(os.path.join(workdir, "best_arc.txt")).strip())
    else:
      target = targets.search()
    with ckpt_lib.Checkpointer(d) as ck:
      steps = ck.all_steps()
      assert ck.latest_step() == (steps[-1] if steps else None)
      for s in steps:
        try:
          state, meta = ck.restore(target, step=s)
        except ckpt_lib.CheckpointError as e:
          found["unreadable"].append(f"{stage} step {s} ({str(e)[-90:]})")
          assert TOLERATE_PARTLY_DELETED_OLD_STEPS and s != steps[-1], str(e)
          continue
        assert int(state.child.step) == s, (stage, s)
        assert meta.get("stage") in ("search", "child", "final", "train"), meta
    found[stage] = steps
  return found


def _timed_run(cmd, log_path):
  """Runs ``cmd`` to completion; returns (seconds, [(t, line)], returncode)."""
  t0 = time.time()
  lines = []
  with open(log_path, "w") as log:
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
      lines.append((time.time() - t0, line.rstrip("\n")))
      log.write(line)
    rc = p.wait()
  return time.time() - t0, lines, rc


PROGRESS = ("step ", "epoch ", "derive", "final")  # the lines a kill point counts


def kill_points(num_kills, seed, num_lines):
  """Seeded kill points, one in each of ``num_kills`` equal slices of the
  reference run's ``num_lines`` progress lines: ``(line index, extra seconds)``.

  A killed run is killed ``extra`` seconds after printing that progress line,
  not at a wall-clock delay: it reads every compile from the cache the
  reference run wrote, so its timeline is shorter than the reference's (with
  delays taken from the reference, both kills once came after the run ended)."""
  rng = random.Random(seed)
  width = num_lines / num_kills
  return [(min(num_lines - 1, int(width * (i + rng.random()))), 0.5 * rng.random())
          for i in range(num_kills)]


def _run_and_kill(cmd, log_path, line_index, extra):
  """Runs ``cmd``; SIGKILLs it ``extra`` s after its ``line_index``-th progress
  line. Returns (killed, returncode, seconds from the start to the kill)."""
  t0 = time.time()
  count = 0
  with open(log_path, "w") as log:
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(killed=True), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
      log.write(line)
      log.flush()
      if line.startswith(PROGRESS):
        if count == line_index:
          time.sleep(extra)
          if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            t = time.time() - t0
            log.writelines(p.stdout)  # what it printed before the kill
            return True, p.wait(), t
          break
        count += 1
    for line in p.stdout:  # finished first: keep the rest of its output
      log.write(line)
    return False, p.wait(), time.time() - t0


def kill_and_resume(base, num_kills, seed=0, log=print, at=None):
  """An uninterrupted run, then ``num_kills`` runs killed with SIGKILL at seeded
  random moments (:func:`kill_points`) and rerun to completion. Returns one dict per kill.
  ``at``: fixed kill points instead, as fractions of the progress lines."""
  targets = Targets(kill_config())
  ref = os.path.join(base, "reference")
  total, lines, rc = _timed_run(kill_command(ref), ref + ".log")
  assert rc == 0, "\n".join(line for _, line in lines[-30:])
  expected = run_outputs(ref)
  # Spread the kills over the part of the run that does work: its progress
  # lines, from the first training step to the last but one (after the last
  # only the test evaluation and the result file are left).
  progress_lines = [line for _, line in lines if line.startswith(PROGRESS)]
  points = (kill_points(num_kills, seed, len(progress_lines) - 1) if at is None else
            [(int(f * (len(progress_lines) - 1)), 0.2) for f in at])
  log(f"uninterrupted run: {total:.1f} s, {len(progress_lines)} progress lines; "
      f"{num_kills} kills after lines {[i for i, _ in points]}"
      + (f", seed {seed}" if at is None else ""))
  results = []
  for i, (line_index, extra) in enumerate(points):
    wd = os.path.join(base, f"kill{i}")
    killed, returncode, delay = _run_and_kill(kill_command(wd), wd + ".log", line_index, extra)
    progress = [line for line in _read(wd + ".log").splitlines()
                if line.startswith(PROGRESS)]
    at_kill = check_restorable(wd, targets)  # every committed checkpoint reads back
    tmp_dirs = [n for sub in ("checkpoints", "final/checkpoints")
                if os.path.isdir(os.path.join(wd, sub))
                for n in os.listdir(os.path.join(wd, sub)) if "tmp" in n]
    t1 = time.time()
    r = subprocess.run(kill_command(wd), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
    resumed = r.returncode == 0
    res = {"kill": i, "delay": delay, "killed": killed, "rc": returncode,
           "search_ckpt": at_kill["search"][-1] if at_kill["search"] else None,
           "final_ckpt": at_kill["final"][-1] if at_kill["final"] else None,
           "last_line": progress[-1].split(" | ")[0][:48] if progress else "(no output yet)",
           "partial_ckpt_dirs": tmp_dirs, "unreadable": at_kill["unreadable"],
           "resumed": resumed,
           "resume_seconds": time.time() - t1,
           "resumed_from": re.findall(r"resumed (?:search|final training) from step \d+",
                                      r.stdout + r.stderr)}
    if resumed:
      got = run_outputs(wd)
      res["same_arc"] = got[0] == expected[0]
      res["same_arcs_jsonl"] = got[1] == expected[1]
      res["test_ppl"] = got[2]
      res["same_test_ppl"] = bool(np.isclose(got[2], expected[2], rtol=1e-5, atol=0))
      res["same"] = res["same_arc"] and res["same_arcs_jsonl"] and res["same_test_ppl"]
      res["after"] = check_restorable(wd, targets)
    else:
      res["same"] = False
      res["error"] = (r.stdout + r.stderr)[-2000:]
    results.append(res)
    log(format_kill(res))
  return results, expected


def format_kill(r):
  ck = (f"search ckpt {r['search_ckpt'] if r['search_ckpt'] is not None else '-'}, "
        f"final ckpt {r['final_ckpt'] if r['final_ckpt'] is not None else '-'}")
  partial = f" (+ partial {','.join(r['partial_ckpt_dirs'])})" if r["partial_ckpt_dirs"] else ""
  if r["unreadable"]:
    partial += " (UNREADABLE, listed: " + "; ".join(
        u.split(" (")[0] for u in r["unreadable"]) + ")"
  how = "killed" if r["killed"] else "finished before the kill"
  resumed = ("resumed OK" if r["resumed"] else "RESUME FAILED") + (
      f" ({'; '.join(r['resumed_from'])})" if r["resumed_from"] else " (from scratch)"
      if r["resumed"] and r["search_ckpt"] is None else "")
  same = "same result" if r["same"] else "DIFFERENT RESULT"
  if r["resumed"] and not r["same"]:
    same += (f" (arc {r['same_arc']}, arcs.jsonl {r['same_arcs_jsonl']}, "
             f"test ppl {r['test_ppl']:.6g})")
  return (f"kill {r['kill']}: delay {r['delay']:5.2f} s, {how} | last output: {r['last_line']} "
          f"| at kill: {ck}{partial} | {resumed} | {same}")


def test_kill9_during_final_training_then_resume(tmp_path):
  # One kill, during final training (85% of the progress lines): its rerun
  # restores the finished search's checkpoint and the final training's, so it
  # checks both restore paths. Each kill costs a killed and a resumed run: the
  # kills at seeded random moments are -m slow (test_kill9_at_random_moments_then_resume
  # has one in each half of the run, test_kill9_ten_moments ten).
  results, _ = kill_and_resume(str(tmp_path), num_kills=1, log=lambda s: None, at=[0.85])
  r = results[0]
  assert r["killed"], format_kill(r)  # a kill after the run's end tests nothing
  assert r["search_ckpt"] is not None and r["final_ckpt"] is not None, format_kill(r)
  assert r["resumed"], r.get("error")
  assert len(r["resumed_from"]) == 2, format_kill(r)  # search, then final training
  assert r["same"], format_kill(r)


def _skip_unless_slow(request):
  if "slow" not in (request.config.option.markexpr or ""):
    pytest.skip("slow (minutes): run with -m slow")


@pytest.mark.slow
def test_kill9_at_random_moments_then_resume(tmp_path, request):
  # Two kills, one in each half of the run (search; derive and final training).
  _skip_unless_slow(request)
  results, _ = kill_and_resume(str(tmp_path), num_kills=2, seed=0, log=lambda s: None)
  for r in results:
    assert r["killed"], format_kill(r)  # a kill after the run's end tests nothing
    assert r["resumed"], r.get("error")
    assert r["same"], format_kill(r)


@pytest.mark.slow
def test_kill9_ten_moments(tmp_path, request):
  _skip_unless_slow(request)
  results, _ = kill_and_resume(str(tmp_path), num_kills=10, seed=1, log=lambda s: None)
  for r in results:
    assert r["killed"] and r["resumed"] and r["same"], format_kill(r)


_DYING_DELETE = """
import os, shutil, signal, sys
import jax.numpy as jnp
from enas_jax.checkpoint import Checkpointer
real_rmtree = shutil.rmtree

def dying_rmtree(path, *args, **kwargs):
  # Deleting an old step (in place, or from the holding area it was renamed
  # into): remove part of it, then die as under kill -9.
  if os.path.basename(str(path)).isdigit() or "deleted" in os.path.basename(str(path)):
    for root, dirs, files in os.walk(path):
      for name in sorted(files)[:3]:  # as found after a kill: some files gone
        os.remove(os.path.join(root, name))
    os.kill(os.getpid(), signal.SIGKILL)
  return real_rmtree(path, *args, **kwargs)

shutil.rmtree = dying_rmtree
ck = Checkpointer(sys.argv[1], max_to_keep=2)
for s in (1, 2, 3):  # saving 3 deletes 1
  ck.save(s, {"x": jnp.ones(2) * s}, {"s": s})
"""


def test_kill_during_deletion_of_an_old_step(tmp_path):
  r = subprocess.run([sys.executable, "-c", _DYING_DELETE, str(tmp_path)], cwd=ROOT,
                     env=_env(killed=True), capture_output=True, text=True, timeout=120)
  assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]  # died inside the deletion
  with ckpt_lib.Checkpointer(tmp_path) as ck:
    assert ck.restore({"x": jax.numpy.zeros(2)})[1] == {"s": 3}  # resuming works
    for s in ck.all_steps():  # but every listed step should read back
      ck.restore({"x": jax.numpy.zeros(2)}, step=s)


# ============================================================================
# Codec fuzzing (macro and micro), in the style of tests/test_ptb_space.py.

CODECS = st.one_of(st.integers(1, 6).map(MacroCodec), st.integers(1, 4).map(MicroCodec))


def oracle_valid(codec, tokens):
  """Independent validity check of an integer token list."""
  if len(tokens) != codec.arc_length or any(v < 0 for v in tokens):
    return False
  if isinstance(codec, MacroCodec):
    ops = {k + k * (k - 1) // 2 for k in range(codec.num_layers)}
    return all(v < (len(MACRO_OPS) if p in ops else 2) for p, v in enumerate(tokens))
  cell = 4 * codec.num_nodes
  return all(v < (2 + (p % cell) // 4 if p % 2 == 0 else 5) for p, v in enumerate(tokens))


@st.composite
def valid_arcs(draw, codec=None):
  codec = codec or draw(CODECS)
  toks = []
  if isinstance(codec, MacroCodec):
    for layer in range(codec.num_layers):
      toks.append(draw(st.integers(0, len(MACRO_OPS) - 1)))
      toks += draw(st.lists(st.integers(0, 1), min_size=layer, max_size=layer))
  else:
    for p in range(codec.arc_length):
      node = 2 + (p % (4 * codec.num_nodes)) // 4
      toks.append(draw(st.integers(0, node - 1) if p % 2 == 0 else st.integers(0, 4)))
  return codec, toks


@st.composite
def near_valid_lists(draw):
  """A valid arc with a few tokens set, inserted or deleted (often invalid)."""
  codec, toks = draw(valid_arcs())
  for _ in range(draw(st.integers(0, 3))):
    how = draw(st.sampled_from(["set", "insert", "delete"]))
    pos = draw(st.integers(0, max(0, len(toks) - 1)))
    v = draw(st.one_of(st.integers(-3, 8), st.integers(-2**40, 2**40)))
    if how == "set" and toks:
      toks[pos] = v
    elif how == "insert":
      toks.insert(pos, v)
    elif toks:
      del toks[pos]
  return codec, toks


HUGE = st.one_of(st.integers(2**31 - 2, 2**31 + 2), st.integers(2**63 - 2, 2**64 + 2),
                 st.integers(-2**64, -2**31), st.integers(-2**200, 2**200))
JUNK_TOKEN = st.one_of(
    st.integers(-5, 10), HUGE,
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=6), st.binary(max_size=3), st.complex_numbers(max_magnitude=10),
    st.lists(st.integers(0, 3), max_size=3))
JUNK_TEXT_TOKEN = st.one_of(
    st.integers(-5, 10).map(str), HUGE.map(str), st.floats().map(repr),
    st.sampled_from(["+1", "1_0", "0x1", "1e3", "--1", "٣", "１", "nan", "inf", "", " ", ",",
                     "\x00", "0.", "00", "-0", "9" * 5000]),
    st.text(max_size=8))


def _check_error(codec, e):
  msg = str(e)
  assert msg and msg.startswith(f"{codec.name}:"), msg
  return msg


def _check_accepted(codec, arc, tokens=None):
  assert isinstance(arc, np.ndarray) and arc.dtype == np.int32
  assert arc.shape == (codec.arc_length,)
  assert codec.validate(arc).tolist() == arc.tolist()
  assert oracle_valid(codec, arc.tolist())
  text = codec.format(arc)
  assert codec.parse(text).tolist() == arc.tolist()
  assert codec.format(codec.parse(text)) == text
  if tokens is not None:
    assert arc.tolist() == [int(v) for v in tokens]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near=near_valid_lists(), sep=st.sampled_from([" ", ",", ", ", "  \t", "\n"]))
def test_fuzz_token_lists_agree_with_oracle(near, sep):
  codec, tokens = near
  expect = oracle_valid(codec, tokens)
  for how in ("parse", "validate"):
    try:
      arc = (codec.parse(sep.join(map(str, tokens))) if how == "parse"
             else codec.validate(tokens))
    except ValueError as e:
      _check_error(codec, e)
      assert not expect, (how, tokens)  # valid arcs are never rejected
    else:
      assert expect, (how, tokens)
      _check_accepted(codec, arc, tokens)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=CODECS, tokens=st.lists(JUNK_TOKEN, max_size=45),
       as_array=st.sampled_from([None, "object", "float64", "int64", "uint64"]))
def test_fuzz_junk_arrays_only_value_error(codec, tokens, as_array):
  arg = tokens
  if as_array:
    try:
      arg = np.asarray(tokens, dtype=None if as_array == "object" else as_array)
    except Exception:  # numpy itself refuses: nothing to feed the codec
      return
  for fn in (codec.validate, codec.format):
    try:
      out = fn(arg)
    except ValueError as e:
      _check_error(codec, e)
    else:
      arc = out if fn == codec.validate else codec.parse(out)
      _check_accepted(codec, arc)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=CODECS, text=st.one_of(
    st.text(max_size=120),
    st.lists(JUNK_TEXT_TOKEN, max_size=45).map(" ".join),
    st.lists(JUNK_TEXT_TOKEN, max_size=45).map(",".join)))
def test_fuzz_strings_only_value_error(codec, text):
  try:
    arc = codec.parse(text)
  except ValueError as e:
    _check_error(codec, e)
  else:
    _check_accepted(codec, arc)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(arc=valid_arcs(), form=st.sampled_from(["text", "commas", "list", "int64", "float",
                                               "jax", "padded"]))
def test_fuzz_valid_arcs_never_rejected(arc, form):
  codec, toks = arc
  if form == "text":
    out = codec.parse(" ".join(map(str, toks)))
  elif form == "commas":
    out = codec.parse(",".join(map(str, toks)))
  elif form == "padded":
    out = codec.parse("\n  " + " , ".join(map(str, toks)) + " \t\n")
  elif form == "list":
    out = codec.validate(toks)
  elif form == "int64":
    out = codec.validate(np.asarray(toks, np.int64))
  elif form == "float":
    out = codec.validate(np.asarray(toks, np.float32))
  else:
    out = codec.validate(jax.numpy.asarray(toks, jax.numpy.int32))
  _check_accepted(codec, out, toks)
  assert codec.format(out) == " ".join(map(str, toks))


def test_non_string_and_odd_containers_only_value_error():
  for codec in (MacroCodec(3), MicroCodec(2)):
    for bad in (None, 3, 2.5, b"0 1", ["0 1 0"], {"a": 1}, object(), np.zeros((2, 3)),
                np.zeros(0), [[0, 1], [0]], iter([0, 1]), np.array("0 1 0"), float("nan")):
      for fn in (codec.parse, codec.validate, codec.format):
        with pytest.raises(ValueError) as e:
          fn(bad)
        _check_error(codec, e.value)
  # Tokens beyond int64 are refused (by a dtype message, see the next test).
  for text in (f"0 0 {2**70}", f"0 0 -{2**64}"):
    with pytest.raises(ValueError, match="cifar_macro"):
      MacroCodec(2).parse(text)
  # The papers' arcs round-trip.
  assert MacroCodec(24).format(MacroCodec(24).parse(MACRO_PAPER)) == MACRO_PAPER
  assert MicroCodec(5).format(MicroCodec(5).parse(MICRO_PAPER)) == MICRO_PAPER


@pytest.mark.xfail(strict=True, reason=(
    "enas_jax/spaces/base.py check_arc_tokens: integers beyond int64 make numpy build an "
    "object array, reported as 'arc tokens must be integers, got dtype object (first token "
    "0)' instead of naming the token's position and value"))
def test_huge_integer_token_is_named_by_position():
  with pytest.raises(ValueError, match=r"token 2 is 1180591620717411303424, too large"):
    MacroCodec(2).parse(f"0 0 {2**70}")


# ============================================================================
# Config loader fuzzing: dotted keys and values applied to the locked configs.

CONFIGS = [(m, v) for m, vs in (("ptb", ("search", "final", "smoke")),
                                 ("cifar_macro", ("search", "final", "smoke")),
                                 ("cifar_micro", ("search", "final", "smoke"))) for v in vs]
_CONFIG_CACHE = {}


def _load(module, variant):
  import importlib
  if (module, variant) not in _CONFIG_CACHE:
    _CONFIG_CACHE[(module, variant)] = importlib.import_module(f"configs.{module}").get_config(
        variant)
  return _CONFIG_CACHE[(module, variant)].copy_and_resolve_references()


def _flat(c):
  return common.flatten(c.to_dict())


def apply_dotted(config, key, value):
  """``config.<key> = value`` for a dotted key (as --config.<key>=... does)."""
  node = config
  *path, last = key.split(".")
  for p in path:
    node = getattr(node, p)
  setattr(node, last, value)


_KEY_PART = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=0, max_size=10)


@st.composite
def dotted_keys(draw, flat_keys):
  how = draw(st.sampled_from(["existing", "typo", "suffix", "prefix", "random"]))
  key = draw(st.sampled_from(flat_keys))
  if how == "typo":
    i = draw(st.integers(0, len(key) - 1))
    key = key[:i] + draw(st.sampled_from("xz_.")) + key[i + 1:]
  elif how == "suffix":
    key = key + "." + draw(_KEY_PART)
  elif how == "prefix":
    key = draw(_KEY_PART) + "." + key
  elif how == "random":
    key = ".".join(draw(st.lists(_KEY_PART, min_size=1, max_size=4)))
  return key


CONFIG_VALUES = st.one_of(
    st.integers(-10, 10), HUGE, st.floats(allow_nan=True), st.booleans(), st.none(),
    st.text(max_size=8), st.tuples(st.integers(0, 50)), st.lists(st.integers(0, 50), max_size=3),
    st.sampled_from(["True", "false", "1", "3.5", "auto", "(1, 2)"]))


def _same_type_value(draw, old):
  if isinstance(old, bool):
    return draw(st.booleans())
  if isinstance(old, int):
    return draw(st.integers(-2**31, 2**31))
  if isinstance(old, float):
    return draw(st.floats(allow_nan=False))
  if isinstance(old, str):
    return draw(st.text(max_size=10))
  if isinstance(old, tuple):
    return tuple(draw(st.lists(st.integers(1, 64), max_size=4)))
  raise AssertionError(type(old))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(CONFIGS), data=st.data())
def test_fuzz_dotted_overrides_on_locked_configs(which, data):
  c = _load(*which)
  flat = _flat(c)
  key = data.draw(dotted_keys(sorted(flat)), label="key")
  value = data.draw(CONFIG_VALUES, label="value")
  try:
    apply_dotted(c, key, value)
  except (AttributeError, KeyError, TypeError) as e:
    msg = str(e)
    parts = key.split(".")
    # The message names the part of the key that does not exist or the field
    # whose type does not fit.
    assert any(repr(p) in msg or f'"{p}"' in msg for p in parts) or (
        "has no attribute" in msg), (key, value, msg)
  else:
    assert key in flat, (key, value)  # only existing fields can be set
    got = c
    for p in key.split("."):
      got = getattr(got, p)
    assert got is None if value is None else (got == value or (
        isinstance(value, float) and np.isnan(value)) or isinstance(value, list)
        or isinstance(flat[key], float)), (key, value, got)
  assert sorted(_flat(c)) == sorted(flat)  # locked: no field was added
  # A value of the field's own type is always accepted.
  c = _load(*which)
  k = data.draw(st.sampled_from(sorted(flat)), label="existing key")
  v = _same_type_value(data.draw, flat[k])
  apply_dotted(c, k, v)
  got = c
  for p in k.split("."):
    got = getattr(got, p)
  assert got == v


def test_type_mismatches_name_the_field():
  c = _load("cifar_macro", "search")
  for key, value in (("child.out_filters", "abc"), ("search.then_final", "yes"),
                     ("child.lr_max", "fast"), ("name", 3), ("data", 1)):
    with pytest.raises(TypeError, match=repr(key.split(".")[-1])):
      apply_dotted(c, key, value)
  with pytest.raises(AttributeError, match="out_filterz"):
    apply_dotted(c, "child.out_filterz", 3)
  with pytest.raises(AttributeError, match="chlid"):
    apply_dotted(c, "chlid.out_filters", 3)


def _main_cli(*args):
  return subprocess.run([sys.executable, "-m", "enas_jax.main", *args], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("config, flag, key", [
    ("cifar_macro.py:smoke", "--config.child.out_filters=abc", "out_filters"),
    ("cifar_micro.py:smoke", "--config.search.then_final=maybe", "then_final"),
    ("ptb.py:smoke", "--config.data.no_such_field=1", "no_such_field"),
    ("ptb.py:smoke", "--config.child=3", "config.child"),
])
def test_cli_malformed_config_flags(tmp_path, config, flag, key):
  r = _main_cli(f"--config=configs/{config}", flag, f"--workdir={tmp_path / 'w'}")
  assert r.returncode != 0
  assert key in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(tmp_path / "w")  # refused before any run started


@pytest.mark.parametrize("config, arc, message", [
    ("cifar_macro.py:final", "0 1 7", "cifar_macro: wrong arc length 3"),
    ("cifar_micro.py:final", "0 9 " + " ".join(["0"] * 38),
     r"cifar_micro: token 1 (normal cell, node 2's op 1) is 9"),
    ("ptb.py:final", "0 0 x", "token 2 is 'x'"),
])
def test_cli_bad_arc_exit_2_without_traceback(tmp_path, config, arc, message):
  r = _main_cli(f"--config=configs/{config}", f"--config.arc={arc}",
                f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 2, r.stderr[-3000:]
  assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


# ============================================================================
# NaN in a CIFAR run; a full disk during a run.


def test_nan_in_cifar_run_stops_with_restorable_checkpoint(tmp_path):
  # test_cifar_pipeline's macro run (smoke) without its final stage: the fault
  # step and the dispatch size are traced, so both runs' search programs are
  # one compilation (shared through the compilation cache).
  cfg = tiny_cifar_config("cifar_macro", "smoke", **{
      "search.then_final": False, "debug.inject_nan_at_step": 5, "checkpoint_every": 4,
      "log_every": 2, "search.steps_per_dispatch": 2})
  with pytest.raises(common.NonFiniteError, match=r"child step 5\b") as e:
    run_lib.run(cfg, str(tmp_path))
  with ckpt_lib.Checkpointer(os.path.join(str(tmp_path), "checkpoints")) as ck:
    last = ck.latest_step()
    assert last is not None and last <= 5
    assert f"newest checkpoint (step {last})" in str(e.value)
    state, meta = ck.restore(Targets(cfg).search())
  assert int(state.child.step) == last and meta["step"] == last
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.child.params))


def _full_disk_on_save(monkeypatch, failing_save):
  """Makes orbax's ``failing_save``-th save hit ENOSPC while writing its files."""
  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.path import async_path
  count = {"saves": 0, "failing": False, "hit": []}
  orig_save, orig_write = ocp.CheckpointManager.save, async_path.write_text

  def save(self, step, *args, **kwargs):
    count["saves"] += 1
    count["failing"] = count["saves"] == failing_save
    try:
      return orig_save(self, step, *args, **kwargs)
    finally:
      count["failing"] = False

  async def write_text(path, text):
    if count["failing"]:
      count["hit"].append(str(path))
      raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return await orig_write(path, text)
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  monkeypatch.setattr(async_path, "write_text", write_text)
  return count


def test_full_disk_during_a_run_keeps_previous_checkpoint(tmp_path, monkeypatch):
  cfg = tiny_ptb_config(**{"search.then_final": False, "search.num_epochs": 1,
                           "checkpoint_every": 20, "log_every": 10,
                           "search.steps_per_dispatch": 10})
  wd = str(tmp_path / "run")
  count = _full_disk_on_save(monkeypatch, failing_save=2)  # steps 20 (ok), 40 (full)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    run_lib.run(cfg, wd)
  monkeypatch.undo()
  assert count["hit"], "the injected failure was never reached"
  msg = str(e.value)
  assert "step 40" in msg and "No space left on device" in msg
  assert "(step 20) is intact" in msg
  ckdir = os.path.join(wd, "checkpoints")
  assert sorted(os.listdir(ckdir)) == ["20"]  # the partial step-40 directory is gone
  with ckpt_lib.Checkpointer(ckdir) as ck:
    assert ck.all_steps() == [20]
    state, meta = ck.restore(Targets(cfg).search())
  assert int(state.child.step) == 20 and meta == {"stage": "child", "step": 20}
  # Space again: the same command resumes from step 20 and ends as an
  # uninterrupted run does.
  run_lib.run(cfg, wd)
  ref = str(tmp_path / "ref")
  run_lib.run(cfg, ref)
  assert _read(os.path.join(wd, "arcs.jsonl")) == _read(os.path.join(ref, "arcs.jsonl"))


# ============================================================================
# Script: python tests/test_faults.py --kills 10


def _main():
  ap = argparse.ArgumentParser(description="kill -9 a tiny PTB run at random moments, "
                               "rerun it, compare with an uninterrupted run.")
  ap.add_argument("--kills", type=int, default=10)
  ap.add_argument("--seed", type=int, default=1)
  ap.add_argument("--workdir", default=None, help="kept when given (default: a temp dir)")
  args = ap.parse_args()
  if args.kills < 1:
    ap.error("--kills must be >= 1")
  base = args.workdir or tempfile.mkdtemp(prefix="enas_kill_")
  os.makedirs(base, exist_ok=True)
  t0 = time.time()
  try:
    results, expected = kill_and_resume(base, args.kills, args.seed,
                                        log=lambda s: print(s, flush=True))
  finally:
    if args.workdir is None:
      shutil.rmtree(base, ignore_errors=True)
  ok = sum(r["resumed"] and r["same"] for r in results)
  print(f"reference: best arc {expected[0].strip()!r}, final test ppl {expected[2]:.6g}")
  print(f"{ok}/{len(results)} kills resumed to the same result ({time.time() - t0:.0f} s)")
  return 0 if ok == len(results) else 1


if __name__ == "__main__":
  sys.exit(_main())
