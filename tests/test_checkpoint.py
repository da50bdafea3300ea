"""Tests for enas_jax.checkpoint (orbax-backed pytree checkpoints)."""

import errno
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.path import async_path

from conftest import xla_flags

from enas_jax.checkpoint import Checkpointer, CheckpointError

TMP_MARK = '.orbax-checkpoint-tmp'

# After a failed tensorstore read/write, orbax closes its private event loop
# while tensorstore still posts a callback to it ("Event loop is closed").
# Harmless, but pytest reports it as an unraisable-exception warning.
pytestmark = pytest.mark.filterwarnings(
    r'ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning')


def make_state(scale=1.0):
  """A nested state like the search loop's: params, optax states, keys, counters."""
  params = {'lstm': {'w': jnp.full((3, 4), scale, jnp.float32),
                     'b': jnp.arange(4, dtype=jnp.float32) * scale},
            'emb': jnp.ones((5, 2), jnp.bfloat16) * scale}
  return {
      'child': {'params': params, 'opt': optax.adam(1e-3).init(params)},
      'ctrl': {'params': {'v': jnp.array([scale, 2.0])},
               'opt': optax.sgd(0.1).init({'v': jnp.zeros(2)})},
      'raw_key': jax.random.PRNGKey(int(scale)),  # uint32[2]
      'typed_key': jax.random.key(int(scale) + 7),
      'ids': np.arange(6, dtype=np.int32) * int(scale),
      'hash': np.array([2**32 - 1, int(scale)], np.uint32),
      'step': int(scale) * 100,
      'baseline': float(scale) / 3,
  }


def assert_same(a, b):
  """Same tree structure (incl. namedtuples), dtypes and values."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert y.dtype == x.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
    if hasattr(x, 'dtype'):
      assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def bump_adam(state):
  """Makes the adam state non-trivial so a round trip can't pass by accident."""
  tx = optax.adam(1e-3)
  grads = jax.tree.map(jnp.ones_like, state['child']['params'])
  _, state['child']['opt'] = tx.update(grads, state['child']['opt'],
                                       state['child']['params'])
  return state


def test_round_trip_with_optax_states_keys_and_meta(tmp_path):
  state = bump_adam(make_state(3.0))
  meta = {'arc': '0 1 2', 'epoch': 4, 'ppl': 81.5, 'nested': {'a': [1, 2]}}
  with Checkpointer(tmp_path / 'ckpt') as ck:
    assert ck.latest_step() is None and ck.all_steps() == []
    ck.save(5, state, meta)
    assert ck.latest_step() == 5
    restored, rmeta = ck.restore(make_state(0.0))
  assert_same(state, restored)
  assert rmeta == meta
  count = restored['child']['opt'][0].count
  assert type(restored['child']['opt'][0]).__name__ == 'ScaleByAdamState'
  assert int(count) == 1
  assert restored['ctrl']['opt'] == (optax.EmptyState(), optax.EmptyState())


def test_meta_defaults_to_empty_and_must_be_json(tmp_path):
  with Checkpointer(tmp_path) as ck:
    ck.save(1, {'x': jnp.ones(2)})
    assert ck.restore({'x': jnp.zeros(2)})[1] == {}
    with pytest.raises(TypeError):
      ck.save(2, {'x': jnp.ones(2)}, {'bad': object()})
    assert ck.all_steps() == [1]


def test_keep_n_and_restore_specific_step(tmp_path):
  target = make_state(0.0)
  with Checkpointer(tmp_path, max_to_keep=2) as ck:
    for s in (1, 2, 3, 4):
      ck.save(s * 10, make_state(float(s)), {'s': s})
    assert ck.all_steps() == [30, 40]
    assert sorted(os.listdir(tmp_path)) == ['30', '40']
    state, meta = ck.restore(target, step=30)
    assert meta == {'s': 3}
    assert_same(make_state(3.0), state)
    assert ck.restore(target)[1] == {'s': 4}
    with pytest.raises(CheckpointError, match='step 10'):
      ck.restore(target, step=10)
  # A fresh instance sees the same steps (nothing cached only in memory).
  with Checkpointer(tmp_path, max_to_keep=2) as ck:
    assert ck.all_steps() == [30, 40]


def test_save_same_step_twice_overwrites(tmp_path):
  with Checkpointer(tmp_path) as ck:
    ck.save(7, {'x': jnp.ones(2)}, {'v': 1})
    ck.save(7, {'x': jnp.full(2, 5.0)}, {'v': 2})
    assert ck.all_steps() == [7]
    state, meta = ck.restore({'x': jnp.zeros(2)})
  assert meta == {'v': 2}
  np.testing.assert_array_equal(state['x'], [5.0, 5.0])


def test_restore_without_checkpoints_raises(tmp_path):
  with Checkpointer(tmp_path) as ck:
    with pytest.raises(CheckpointError, match='No checkpoint'):
      ck.restore({'x': jnp.zeros(2)})


def test_restore_into_another_layout_says_so_and_keeps_the_checkpoint(tmp_path):
  with Checkpointer(tmp_path) as ck:
    ck.save(1, {'w': [jnp.zeros(2), jnp.ones(2)]})
  with Checkpointer(tmp_path) as ck:
    with pytest.raises(CheckpointError, match='laid out differently.*new --workdir'):
      ck.restore({'w': jnp.zeros((2, 2))})
    state, _ = ck.restore({'w': [jnp.zeros(2), jnp.zeros(2)]})  # still there, still readable
  np.testing.assert_array_equal(state['w'][1], [1.0, 1.0])


def _enospc_on(predicate):
  """A replacement for orbax's ``async_path.write_text`` that fails like a full disk."""
  orig = async_path.write_text

  async def write_text(path, text):
    if predicate(str(path)):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await orig(path, text)
  return write_text


@pytest.mark.parametrize('where', [
    # Array metadata, written while the arrays of the step are being saved.
    lambda p: 'array_metadatas' in p,
    # The last write before the rename: all data is on disk, commit marker fails.
    lambda p: p.endswith('2' + TMP_MARK + '/commit_success.txt'),
], ids=['mid_write', 'commit_marker'])
def test_full_disk_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
  calls = []
  failing = _enospc_on(where)

  async def spy(path, text):
    calls.append(str(path))
    return await failing(path, text)
  target = make_state(0.0)
  ck = Checkpointer(tmp_path)
  ck.save(1, make_state(1.0), {'s': 1})
  monkeypatch.setattr(async_path, 'write_text', spy)
  with pytest.raises(CheckpointError) as info:
    ck.save(2, make_state(2.0), {'s': 2})
  monkeypatch.undo()
  assert any(where(c) for c in calls), 'injection point was never reached'
  msg = str(info.value)
  assert 'step 2' in msg and 'No space left' in msg and '(step 1) is intact' in msg
  assert isinstance(info.value.__cause__, OSError)
  assert ck.latest_step() == 1 and ck.all_steps() == [1]
  assert os.listdir(tmp_path) == ['1']  # the partial step-2 directory is gone
  state, meta = ck.restore(target)
  assert meta == {'s': 1}
  assert_same(make_state(1.0), state)
  # The disk has space again: saving works and the new step is the latest.
  ck.save(2, make_state(2.0), {'s': 2})
  assert ck.restore(target)[1] == {'s': 2}
  ck.close()


def test_full_disk_on_first_save_says_no_earlier_checkpoint(tmp_path, monkeypatch):
  ck = Checkpointer(tmp_path)
  monkeypatch.setattr(async_path, 'write_text', _enospc_on(lambda p: True))
  with pytest.raises(CheckpointError, match='step 3.*no earlier checkpoint'):
    ck.save(3, {'x': jnp.ones(2)})
  monkeypatch.undo()
  assert ck.latest_step() is None
  ck.close()


def test_leftover_partial_directory_is_ignored(tmp_path):
  target = make_state(0.0)
  with Checkpointer(tmp_path) as ck:
    ck.save(1, make_state(1.0), {'s': 1})
  # What a process killed mid-save leaves behind: a tmp dir with (some) files
  # but no commit. Make it look as complete as possible.
  partial = tmp_path / ('2' + TMP_MARK)
  shutil.copytree(tmp_path / '1', partial)
  (partial / 'commit_success.txt').unlink()
  with Checkpointer(tmp_path) as ck:
    assert ck.all_steps() == [1] and ck.latest_step() == 1
    state, meta = ck.restore(target)
    assert meta == {'s': 1}
    assert partial.exists()  # readers never delete anything
    ck.save(3, make_state(3.0), {'s': 3})  # the writer cleans up
    assert not partial.exists()
    assert ck.all_steps() == [1, 3]


@pytest.mark.parametrize('damage', ['truncate_data', 'delete_manifest', 'delete_meta'])
def test_corrupt_newest_falls_back_to_older(tmp_path, caplog, damage):
  target = make_state(0.0)
  with Checkpointer(tmp_path) as ck:
    ck.save(1, make_state(1.0), {'s': 1})
    ck.save(2, make_state(2.0), {'s': 2})
  newest = tmp_path / '2'
  if damage == 'truncate_data':
    for root, _, files in os.walk(newest / 'state'):
      for f in files:
        if os.path.basename(root) == 'd':
          open(os.path.join(root, f), 'w').close()
  elif damage == 'delete_manifest':
    (newest / 'state' / 'manifest.ocdbt').unlink()
  else:
    (newest / 'meta' / 'metadata').unlink()
  with Checkpointer(tmp_path) as ck:
    assert ck.latest_step() == 2
    state, meta = ck.restore(target)
    assert meta == {'s': 1}
    assert_same(make_state(1.0), state)
    assert 'Could not read checkpoint step 2' in caplog.text
    with pytest.raises(CheckpointError, match='step 2'):
      ck.restore(target, step=2)  # an explicit step never falls back


def test_all_checkpoints_unreadable_raises(tmp_path):
  with Checkpointer(tmp_path) as ck:
    ck.save(1, {'x': jnp.ones(2)})
    ck.save(2, {'x': jnp.ones(2)})
    for s in ('1', '2'):
      shutil.rmtree(tmp_path / s / 'state')
    with pytest.raises(CheckpointError, match='No readable checkpoint.*step 2.*step 1'):
      ck.restore({'x': jnp.zeros(2)})


def test_restore_uses_target_shardings(tmp_path):
  """Restored arrays take the target's shardings (4 fake CPU devices, subprocess)."""
  code = textwrap.dedent(f'''
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from enas_jax.checkpoint import Checkpointer
      mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ('data', 'model'))
      def sh(*spec):
        return NamedSharding(mesh, P(*spec))
      state = {{'w': jax.device_put(jnp.arange(16.).reshape(4, 4), sh('data', None)),
                'k': jax.device_put(jax.random.key(0), sh())}}
      with Checkpointer({str(tmp_path)!r}) as ck:
        ck.save(1, state)
        target = {{'w': jax.device_put(jnp.zeros((4, 4)), sh(None, 'model')),
                   'k': jax.device_put(jax.random.key(1), sh())}}
        out, _ = ck.restore(target)
      assert out['w'].sharding == target['w'].sharding, out['w'].sharding
      np.testing.assert_array_equal(out['w'], state['w'])
      assert out['k'].dtype == state['k'].dtype
      np.testing.assert_array_equal(jax.random.key_data(out['k']),
                                    jax.random.key_data(state['k']))
      print('OK')
  ''')
  env = dict(os.environ, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=4'),
             JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
  res = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                       text=True, timeout=120, check=False)
  assert res.returncode == 0 and 'OK' in res.stdout, res.stderr[-3000:]
