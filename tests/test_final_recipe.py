"""The corrected final-training recipe: variable-length windows in fixed buckets,
iterate averaging and its trigger, evaluation with carried state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_ptb_config
from enas_jax import data as data_lib
from enas_jax import parallel
from enas_jax.spaces import ptb_child as pc
from enas_jax.train.final import should_start_averaging
from enas_jax.train import lm as lm_lib
from enas_jax.train.lm import LMTask

ARC = np.array([0, 0, 1, 1, 2, 0, 3], np.int32)  # 4 nodes


def _task(**over):
  cfg = tiny_ptb_config("final", **over)
  return LMTask(cfg, data_lib.load_corpus(cfg.data), parallel.make_mesh(), shared=False), cfg


def test_averaging_trigger_is_the_corrected_nonmonotone_rule():
  hist = [100, 90, 80, 85, 86, 87]
  assert not should_start_averaging(hist, 1000.0, nonmono=10)  # not enough history
  assert not should_start_averaging(hist[:3], 95.0, nonmono=3)  # exactly nonmono values
  assert should_start_averaging(hist, 91.0, nonmono=3)  # worse than min(100, 90, 80)=80
  assert not should_start_averaging(hist, 79.0, nonmono=3)  # better than 80
  assert not should_start_averaging(hist, 80.0, nonmono=3)  # equal is not worse


def test_sample_length_distribution_and_epoch_end():
  task, _ = _task(**{"data.bptt": 35, "data.bptt_buckets": (20, 30, 35, 40, 45),
                     "data.num_train_tokens": 20000})
  keys = jax.random.split(jax.random.key(0), 4000)
  lens, ends = jax.vmap(lambda k: task.sample_length(k, jnp.int32(0)))(keys)
  lens = np.asarray(lens)
  assert lens.min() >= 1 and lens.max() <= 44  # truncated at 2 sd
  assert 32.5 < lens.mean() < 34.7  # the corrected code's mean length ~33.6
  assert (lens < 28).mean() > 0.03  # the 5% short windows (base 17.5) exist
  assert not np.asarray(ends).any()
  # Near the end of a row the length is cut to what is left, and the epoch ends.
  left = task.row_len - 1
  ln, end = task.sample_length(jax.random.key(1), jnp.int32(left - 5))
  assert int(ln) <= 5 and bool(end)


def test_padded_window_equals_unpadded_window():
  task, _ = _task()
  cc = task.cc
  params = pc.init_fixed(jax.random.key(0), cc)
  x = jax.random.randint(jax.random.key(1), (4, 16), 0, cc.vocab_size)
  y = jax.random.randint(jax.random.key(2), (4, 16), 0, cc.vocab_size)
  h0 = jax.random.normal(jax.random.key(3), (4, cc.hidden_size)) * 0.1
  L = 11
  # Jitted value and gradient: one compile each (eagerly, the gradient ran op by op).
  vg = lambda x, y, **kw: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda p: pc.loss(p, ARC, x, y, h0, None, cc, True, **kw), has_aux=True))(params)
  (full, aux_full), g_full = vg(x, y, length=jnp.int32(L))
  (short, aux_short), g_short = vg(x[:, :L], y[:, :L])
  np.testing.assert_allclose(full, short, rtol=1e-6)
  np.testing.assert_allclose(aux_full["h"], aux_short["h"], rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_short)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_variable_length_chunk_compiles_once_and_stops_at_epoch_end():
  task, _ = _task()
  assert task.random_bptt and task.buckets == (4, 8, 16)
  chunk = task.make_train_chunk(arc_static=ARC)
  st = task.init_child(jax.random.key(0))
  seen_pos, steps, ends = [], 0, 0
  for i in range(12):
    st, acc = chunk(st, {}, jax.random.key(7), jnp.int32(25))
    acc = jax.device_get(acc)
    assert int(acc["first_bad"]) == -1
    steps += int(acc["n"])
    if acc["epoch_end"]:
      ends += 1
      assert int(st.pos) == 0  # the next window starts a new pass
    seen_pos.append(int(st.pos))
  assert int(st.step) == steps
  assert ends >= 1  # tiny rows: several passes
  assert chunk._cache_size() == 1  # every length, every bucket: one compilation
  # Lengths vary: the tokens per step are not a constant.
  assert len(set(seen_pos)) > 3


def test_averaging_is_the_uniform_mean_of_iterates_since_start():
  task, _ = _task()
  assert task.average
  chunk = task.make_train_chunk(arc_static=ARC)
  st = task.init_child(jax.random.key(0))
  st, _ = chunk(st, {}, jax.random.key(1), jnp.int32(3))  # not active: avg untouched
  assert int(st.avg["n"]) == 0
  np.testing.assert_array_equal(np.asarray(st.avg["params"]["w0"]), 0.0)
  st = st.replace(avg=dict(st.avg, active=jnp.bool_(True)))
  seen = []
  for _ in range(4):
    st, _ = chunk(st, {}, jax.random.key(1), jnp.int32(1))
    seen.append(np.asarray(st.params["w0"]))
  assert int(st.avg["n"]) == 4
  np.testing.assert_allclose(np.asarray(st.avg["params"]["w0"]), np.mean(seen, axis=0),
                             rtol=1e-5, atol=1e-7)


def test_fixed_valid_carries_state_across_windows():
  task, _ = _task()
  params = pc.init_fixed(jax.random.key(0), task.cc)
  E = task.num_valid_batches
  carried = float(task.make_fixed_valid(ARC)(params))
  # One compile for every window (eager: ~10x slower).
  ce_fn = jax.jit(lambda p, col, h: lm_lib.window_ce(task, task.data, p, ARC, col, h, static=True))
  h = jnp.zeros((task.eval_batch_size, task.cc.hidden_size))
  tot_c, tot_r = 0.0, 0.0
  for w in range(E):
    s, h = ce_fn(params, w * task.bptt, h)
    tot_c += float(s)
    tot_r += float(ce_fn(params, w * task.bptt, jnp.zeros_like(h))[0])
  n = E * task.eval_batch_size * task.bptt
  np.testing.assert_allclose(carried, np.exp(tot_c / n), rtol=1e-5)
  assert abs(np.exp(tot_r / n) - carried) > 1e-6  # resetting per window is different


def test_averaging_trigger_with_nonmono_zero_compares_with_the_whole_history():
  # history[:-0] would be empty: nonmono = 0 means "worse than the best so far".
  assert should_start_averaging([100.0, 90.0], 95.0, nonmono=0)
  assert not should_start_averaging([100.0, 90.0], 89.0, nonmono=0)
  assert not should_start_averaging([], 89.0, nonmono=0)


# ----------------------------------------------------------------------------
# An empty average is never evaluated: averaging switched on at the last epoch,
# a budget that ends exactly at a pass boundary, eval_only on the trigger
# epoch's checkpoint. Each must evaluate the raw weights, as a run without
# averaging does (the empty average is all zeros: uniform logits, ppl = vocab).


def test_eval_params_skip_an_average_that_holds_no_step():
  from enas_jax.train.final import FinalSetup, uses_average
  from enas_jax.train.state import ChildState, FinalState, LMChildState
  raw, avg = {"w": jnp.ones(2)}, {"w": jnp.zeros(2)}

  def final_state(child):
    return FinalState(child=child, epochs_done=jnp.int32(0), best_valid=jnp.float32(0),
                      valid_history=jnp.zeros(1))

  def state(active, n):
    return final_state(LMChildState(
        params=raw, opt_state=(), step=jnp.int32(0), batch_stats={}, h=jnp.zeros(1),
        pos=jnp.int32(0), avg={"params": avg, "active": jnp.bool_(active), "n": jnp.int32(n)}))

  pick = lambda st: FinalSetup.eval_params(None, st)  # noqa: E731 (uses no attribute)
  assert pick(state(True, 0)) is raw and not uses_average(state(True, 0))
  assert pick(state(False, 0)) is raw
  assert pick(state(True, 1)) is avg and uses_average(state(True, 1))
  plain = final_state(ChildState(params=raw, opt_state=(), step=jnp.int32(0), batch_stats={}))
  assert pick(plain) is raw and not uses_average(plain)


def _final_run(monkeypatch, workdir, average, **over):
  from enas_jax.train import final as final_lib
  from enas_jax.train import run as run_lib
  cfg = tiny_ptb_config("final", arc="0 0 1 1 2 0 3", **{"final.average": average}, **over)
  last = int(cfg.final.num_epochs)
  # Switch averaging on at the last epoch's end only (the real rule needs more
  # than nonmono epochs and a worse one).
  monkeypatch.setattr(final_lib, "should_start_averaging",
                      lambda hist, ppl, nonmono: len(hist) + 1 == last)
  return run_lib.run(cfg, str(workdir))


def _assert_raw(result, reference, vocab=40):
  assert result["averaged"] is False
  for k in ("valid_ppl", "test_ppl"):
    np.testing.assert_allclose(result[k], reference[k], rtol=1e-6, err_msg=k)
    assert abs(result[k] - vocab) > 0.5, (k, result[k])  # not the all-zero average


@pytest.mark.slow  # three tiny runs: ~60 s on 2 loaded cores
def test_average_switched_on_at_the_last_epoch_then_eval_only(monkeypatch, tmp_path):
  over = {"data.random_bptt": False, "final.num_epochs": 1}
  ref = _final_run(monkeypatch, tmp_path / "plain", False, **over)
  out = _final_run(monkeypatch, tmp_path / "avg", True, **over)
  _assert_raw(out, ref)
  # The checkpoint of that epoch holds averaging on with no step averaged.
  again = _final_run(monkeypatch, tmp_path / "avg", True, eval_only=True, **over)
  _assert_raw(again, ref)


@pytest.mark.slow  # two tiny runs
def test_average_switched_on_when_the_budget_ends_at_a_pass_boundary(monkeypatch, tmp_path):
  # Rows of 4 tokens and bptt 3: every window ends its pass (fewer than 3 tokens
  # are left after it), so the budget of 12 x 1 steps ends exactly at a pass
  # boundary: the run evaluates the last pass, switches averaging on, then stops.
  over = {"data.random_bptt": True, "data.num_train_tokens": 16, "data.bptt": 3,
          "final.num_epochs": 12}
  ref = _final_run(monkeypatch, tmp_path / "plain", False, **over)
  out = _final_run(monkeypatch, tmp_path / "avg", True, **over)
  assert out["step"] == 12
  _assert_raw(out, ref)
