"""Tests for enas_jax.data: PTB tokenisation/loading/batching and the synthetic corpus."""

import os
import pathlib
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from enas_jax import data
from enas_jax.data import ptb, synthetic


def _write_ptb(d, train, valid, test):
  for name, text in zip(ptb.PTB_FILES, (train, valid, test)):
    (d / name).write_text(text)
  return d


def test_tokenize_eos_placement():
  assert ptb.tokenize(" a b \n c \n") == ["a", "b", "<eos>", "c", "<eos>"]
  # Lines without surrounding spaces (not PTB style) still give a separate <eos>.
  assert ptb.tokenize("a b\nc") == ["a", "b", "<eos>", "c", "<eos>"]
  assert ptb.tokenize("a\r\nb\r\n") == ["a", "<eos>", "b", "<eos>"]


def test_load_ptb_tiny(tmp_path):
  _write_ptb(tmp_path, " the cat <unk> \n a dog \n", " the zebra \n", " dog the \n")
  c = data.load_ptb(str(tmp_path))
  assert c.vocab == ["<eos>", "<unk>", "a", "cat", "dog", "the"]
  assert c.vocab_size == 6 and c.name == "ptb"
  w = {v: i for i, v in enumerate(c.vocab)}
  np.testing.assert_array_equal(
      c.train, [w[t] for t in "the cat <unk> <eos> a dog <eos>".split()])
  np.testing.assert_array_equal(c.valid, [w["the"], w["<unk>"], w["<eos>"]])
  np.testing.assert_array_equal(c.test, [w["dog"], w["the"], w["<eos>"]])
  assert all(a.dtype == np.int32 for a in (c.train, c.valid, c.test))


def test_load_ptb_oov_without_unk(tmp_path):
  _write_ptb(tmp_path, " a b \n", " a b \n", " a zebra \n")
  with pytest.raises(ValueError, match=r"'zebra'.*ptb\.test\.txt"):
    data.load_ptb(tmp_path)


def test_load_ptb_empty_file(tmp_path):
  _write_ptb(tmp_path, " a b \n", " \n\n", " a \n")
  with pytest.raises(ValueError, match=r"ptb\.valid\.txt is empty"):
    data.load_ptb(tmp_path)


def test_load_ptb_missing_files(tmp_path):
  (tmp_path / "ptb.train.txt").write_text(" a \n")
  with pytest.raises(FileNotFoundError) as e:
    data.load_ptb(str(tmp_path))
  msg = str(e.value)
  for s in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt", str(tmp_path.resolve()),
            "simple-examples", "--config.data.data_dir="):
    assert s in msg
  assert "missing ptb.valid.txt, ptb.test.txt in" in msg


def test_batchify_layout_and_errors():
  b = data.batchify(np.arange(11), 3)
  np.testing.assert_array_equal(b, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
  assert b.dtype == np.int32
  assert data.batchify(list(range(4)), 2).shape == (2, 2)
  with pytest.raises(ValueError, match=r"3 tokens .* batch_size 2: need at least 4"):
    data.batchify(np.arange(3), 2)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 300), b=st.integers(1, 20))
def test_batchify_rows_are_contiguous(n, b):
  if n < 2 * b:
    with pytest.raises(ValueError):
      data.batchify(np.arange(n), b)
    return
  out = data.batchify(np.arange(n), b)
  assert out.shape == (b, n // b)
  np.testing.assert_array_equal(out.reshape(-1), np.arange(b * (n // b)))


def test_num_windows():
  assert data.num_windows(36, 35) == 1
  assert data.num_windows(71, 35) == 2
  assert data.num_windows(7262, 35) == 207  # enas_lm search, B = 128.
  with pytest.raises(ValueError, match="lower batch_size or bptt"):
    data.num_windows(35, 35)
  with pytest.raises(ValueError):
    data.num_windows(10, 0)


def test_synthetic_deterministic_and_shapes():
  a = data.synthetic_corpus(200, 5000, 600, 700, seed=3)
  b = data.synthetic_corpus(200, 5000, 600, 700, seed=3)
  c = data.synthetic_corpus(200, 5000, 600, 700, seed=4)
  for s in ("train", "valid", "test"):
    np.testing.assert_array_equal(getattr(a, s), getattr(b, s))
  assert not np.array_equal(a.train, c.train)
  assert (a.train.size, a.valid.size, a.test.size) == (5000, 600, 700)
  assert a.train.dtype == np.int32 and a.vocab_size == 200 and a.name == "synthetic"
  assert a.vocab[0] == "<eos>" and a.vocab[7] == "w7" and len(set(a.vocab)) == 200
  ids = np.concatenate([a.train, a.valid, a.test])
  assert ids.min() >= 0 and ids.max() < 200
  assert 0.03 < np.mean(ids == 0) < 0.08  # <eos> rate about 0.05.


def test_synthetic_is_learnable_but_not_trivial():
  v = 1000
  c = data.synthetic_corpus(vocab_size=v, seed=0)
  counts = np.full((v, v), 0.1)
  np.add.at(counts, (c.train[:-1], c.train[1:]), 1.0)
  probs = counts / counts.sum(1, keepdims=True)
  bigram = np.exp(-np.log(probs[c.valid[:-1], c.valid[1:]]).mean())
  uni = np.bincount(c.train, minlength=v) + 0.1
  unigram = np.exp(-np.log(uni[c.valid] / uni.sum()).mean())
  bayes, topic_known = synthetic._oracle_nll(c.valid, v, 0)
  # Hidden topics make the best predictor beat the bigram; noise keeps it far from 1.
  assert np.exp(topic_known) < np.exp(bayes) < bigram < v / 5 < unigram
  assert 4 < np.exp(bayes) < 15


def test_load_corpus_dispatch(tmp_path):
  cfg = types.SimpleNamespace(source="synthetic", vocab_size=50, num_train_tokens=1000,
                              num_valid_tokens=100, num_test_tokens=100, seed=1)
  c = data.load_corpus(cfg)
  assert c.vocab_size == 50 and c.train.size == 1000
  _write_ptb(tmp_path, " a b \n", " a \n", " b \n")
  assert data.load_corpus(types.SimpleNamespace(source="ptb", data_dir=str(tmp_path))).vocab == [
      "<eos>", "a", "b"]
  with pytest.raises(ValueError, match="ptb, synthetic"):
    data.load_corpus(types.SimpleNamespace(source="imagenet"))


def test_default_ptb_dir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv("ENAS_JAX_DATA", raising=False)
  assert data.default_ptb_dir() == os.path.join("data", "ptb")
  (tmp_path / "data" / "ptb").mkdir(parents=True)
  assert data.default_ptb_dir() == os.path.join("data", "ptb")
  (tmp_path / "env" / "ptb").mkdir(parents=True)
  monkeypatch.setenv("ENAS_JAX_DATA", str(tmp_path / "env"))
  assert data.default_ptb_dir() == str(tmp_path / "env" / "ptb")


# The real files, where a developer's machine has them ($ENAS_JAX_DATA/ptb or
# ./data/ptb); skipped elsewhere.
_REAL = [pathlib.Path(os.environ.get("ENAS_JAX_DATA", "data")) / "ptb", pathlib.Path("data/ptb"),
         pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"]
_REAL = next((p for p in _REAL if (p / "ptb.train.txt").is_file()), None)


@pytest.mark.skipif(_REAL is None, reason="real PTB files not available")
def test_real_ptb_counts():
  c = data.load_ptb(_REAL)
  assert (c.train.size, c.valid.size, c.test.size) == (929_589, 73_760, 82_430)
  assert c.vocab_size == 10_000
  assert c.vocab.index("<eos>") == 43 and c.vocab.index("<unk>") == 44
  assert data.num_windows(data.batchify(c.train, 128).shape[1], 35) == 207
  assert data.num_windows(data.batchify(c.valid, 64).shape[1], 35) == 32
