"""Tests for enas_jax.data.cifar10: loading, split, statistics, augmentation, synthetic images."""

import hashlib
import json
import os
import pickle
import struct
import tarfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enas_jax import data
from enas_jax.data import cifar10


def _rows(images):
  """HWC images -> official rows: the R plane, then G, then B, each row-major."""
  return np.stack([np.concatenate([img[:, :, c].ravel() for c in range(3)]) for img in images])


def _py2_pickle(data, labels):
  """A batch pickled as Python 2's cPickle wrote the official files (protocol 2, str = bytes)."""
  def s(b):  # SHORT_BINSTRING / BINSTRING: Python-2 str, loaded as bytes
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)

  def k(v):
    return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

  n, m = data.shape
  dtype = (b"cnumpy\ndtype\n" + s(b"u1") + k(0) + k(1) + b"\x87R(" + k(3) + s(b"|")
           + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + k(0) + b"tb")
  array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + k(0) + b"\x85" + s(b"b")
           + b"\x87R(" + k(1) + k(n) + k(m) + b"\x86" + dtype + b"\x89" + s(data.tobytes()) + b"tb")
  labels = b"](" + b"".join(k(int(v)) for v in labels) + b"e"
  return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + labels + b"u."


def _write_batches(root, train_x, train_y, test_x, test_y, fmt="py2"):
  """Writes fake official python batches (5 train files + test) under root.

  ``fmt="py2"``: byte-for-byte the structure of the official Python-2 pickles;
  ``"py3"``: protocol 4 with bytes keys, as make_cifar10_batches.py writes.
  """
  d = root / cifar10.BATCHES_DIR
  d.mkdir(parents=True, exist_ok=True)
  per = len(train_x) // 5

  def dump(name, x, y):
    if fmt == "py2":
      blob = _py2_pickle(_rows(x), y)
    else:
      blob = pickle.dumps({b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                           b"data": _rows(x), b"filenames": [b"x.png"] * len(y)}, protocol=4)
    (d / name).write_bytes(blob)

  for i in range(5):
    sl = slice(i * per, (i + 1) * per)
    dump(f"data_batch_{i + 1}", train_x[sl], train_y[sl])
  dump("test_batch", test_x, test_y)
  return d


def _fake(n_train=10, n_test=2, seed=0):
  rng = np.random.default_rng(seed)
  tx = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
  ty = rng.integers(0, 10, n_train)
  sx = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
  sy = rng.integers(0, 10, n_test)
  return tx, ty, sx, sy


@pytest.mark.parametrize("fmt", ["py2", "py3"])
def test_layout_labels_and_split(tmp_path, fmt):
  tx, ty, sx, sy = _fake()
  # Image 0: constant channels R=10, G=20, B=30 except R=255 at (row 1, col 2),
  # which is byte 1 * 32 + 2 = 34 of the official row (R plane first).
  tx[0] = np.array([10, 20, 30], np.uint8)
  tx[0, 1, 2, 0] = 255
  tx[-3:] = 250  # the validation part is bright: statistics must ignore it
  d = _write_batches(tmp_path, tx, ty, sx, sy, fmt=fmt)
  assert _rows(tx[:1])[0, 34] == 255 and _rows(tx[:1])[0, 1024] == 20

  full = cifar10.load_cifar10(str(tmp_path), num_valid=0)
  np.testing.assert_array_equal(full.train_x, tx)
  assert full.train_x[0, 1, 2].tolist() == [255, 20, 30]
  assert full.train_x[0, 0, 0].tolist() == [10, 20, 30]
  np.testing.assert_array_equal(full.train_y, ty)
  np.testing.assert_array_equal(full.test_x, sx)
  np.testing.assert_array_equal(full.test_y, sy)
  assert full.valid_x.shape == (0, 32, 32, 3) and full.valid_y.shape == (0,)
  assert full.train_x.dtype == np.uint8 and full.train_y.dtype == np.int32
  assert full.num_classes == 10 and full.source == f"python batches at {d}"

  split = cifar10.load_cifar10(str(tmp_path), num_valid=3)
  np.testing.assert_array_equal(split.train_x, tx[:7])
  np.testing.assert_array_equal(split.valid_x, tx[7:])
  np.testing.assert_array_equal(split.train_y, ty[:7])
  np.testing.assert_array_equal(split.valid_y, ty[7:])
  unit = tx[:7].astype(np.float64) / 255
  np.testing.assert_allclose(split.mean, unit.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(split.std, unit.std(axis=(0, 1, 2)), rtol=1e-6)
  assert split.mean.dtype == np.float32 and split.mean.shape == (3,)
  assert np.all(full.mean > split.mean + 0.05)  # the bright valid images count only in `full`
  with pytest.raises(ValueError, match="num_valid"):
    cifar10.load_cifar10(str(tmp_path), num_valid=10)


def test_missing_data_lists_everything(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    cifar10.load_cifar10(str(tmp_path / "nowhere"))
  msg = str(e.value)
  root = str(tmp_path / "nowhere")
  for part in (os.path.join(root, "cifar-10-batches-py"), os.path.join(root, "cifar10"),
               os.path.join(root, "cifar-10-python.tar.gz"), "python:", "tfds:", "archive:",
               "download=False", "--config.data.download=True", "--config.data.data_dir=",
               cifar10.URL, cifar10.ARCHIVE_MD5, "pip install tensorflow", "tfds build cifar10"):
    assert part in msg, part
  assert "shared" not in msg and ".py" not in msg  # nothing outside the repository
  assert not os.path.exists(root)  # looking creates nothing


def test_named_source_only_and_partial_dir(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    cifar10.load_cifar10(str(tmp_path), source="python")
  msg = str(e.value)
  assert "python:" in msg and "tfds:" not in msg and "archive:" not in msg
  assert os.path.join(str(tmp_path), "cifar-10-batches-py") + " does not exist" in msg
  d = _write_batches(tmp_path, *_fake())
  os.remove(d / "data_batch_3")
  with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
    cifar10.load_cifar10(str(tmp_path), source="python")
  with pytest.raises(ValueError, match="unknown CIFAR-10 source"):
    cifar10.load_cifar10(str(tmp_path), source="cifar")


def test_tfds_in_wrong_format_says_so(tmp_path):
  v = tmp_path / "cifar10" / "3.0.2"
  v.mkdir(parents=True)
  (v / "dataset_info.json").write_text(json.dumps({"name": "cifar10", "fileFormat": "tfrecord"}))
  with pytest.raises(FileNotFoundError) as e:
    cifar10.load_cifar10(str(tmp_path), source="tfds")
  assert "prepared only as tfrecord" in str(e.value)
  assert "--file_format=array_record" in str(e.value)


@pytest.mark.parametrize("problem", ["garbage", "shape", "labels", "global"])
def test_corrupt_batch_is_value_error(tmp_path, problem):
  d = _write_batches(tmp_path, *_fake())
  bad = d / "data_batch_2"
  if problem == "garbage":
    bad.write_bytes(b"not a pickle at all")
  elif problem == "shape":
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}))
  elif problem == "labels":
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
  else:  # a pickle that would call os.system must be refused, not run
    bad.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
  with pytest.raises(ValueError, match="data_batch_2"):
    cifar10.load_cifar10(str(tmp_path))


def _fake_archive(tmp_path):
  src = tmp_path / "src"
  tx, ty, sx, sy = _fake(seed=3)
  _write_batches(src, tx, ty, sx, sy)
  out = tmp_path / "dir"
  out.mkdir()
  path = out / cifar10.ARCHIVE
  with tarfile.open(path, "w:gz") as tar:
    tar.add(src / cifar10.BATCHES_DIR, arcname=cifar10.BATCHES_DIR)
  return out, path, tx


def test_archive_md5_mismatch_is_value_error(tmp_path):
  out, path, _ = _fake_archive(tmp_path)
  with pytest.raises(ValueError, match="md5") as e:
    cifar10.load_cifar10(str(out))
  assert str(path) in str(e.value) and cifar10.ARCHIVE_MD5 in str(e.value)
  assert not (out / cifar10.BATCHES_DIR).exists()  # nothing extracted


def test_archive_is_extracted_when_md5_matches(tmp_path, monkeypatch):
  out, path, tx = _fake_archive(tmp_path)
  monkeypatch.setattr(cifar10, "ARCHIVE_MD5", hashlib.md5(path.read_bytes()).hexdigest())
  d = cifar10.load_cifar10(str(out), num_valid=2)
  np.testing.assert_array_equal(d.train_x, tx[:8])
  assert "extracted from" in d.source
  assert (out / cifar10.BATCHES_DIR / "test_batch").is_file()


def test_download_fails_fast_and_is_reported(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    cifar10.load_cifar10(str(tmp_path), source="archive", download=True,
                         download_url="http://127.0.0.1:9/cifar-10-python.tar.gz")
  assert "download of http://127.0.0.1:9/" in str(e.value)
  assert not list(tmp_path.iterdir())  # no partial file left


class _FakeSource:
  """A list of TFDS-style records (TFDS stores CIFAR shuffled; ids give the official order)."""

  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def test_tfds_records_sorted_by_id():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  perm = rng.permutation(6)
  recs = [{"image": x[i], "label": np.int64(i), "id": f"train_{i:05d}".encode()} for i in perm]
  xs, ys, ok = cifar10._tfds_split(_FakeSource(recs), "train", "fake")
  assert ok
  np.testing.assert_array_equal(xs, x)
  np.testing.assert_array_equal(ys, np.arange(6))


def test_tfds_data_source_mock(tmp_path):
  """TFDS array_record source through tfds.testing.mock_data (no TensorFlow needed)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  try:
    info = tfds.builder("cifar10", data_dir=str(tmp_path / "unused")).info
    info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=n, shard_lengths=[k], num_bytes=0)
        for n, k in (("train", 5), ("test", 5))]))
    v = tmp_path / "cifar10" / str(info.version)
    v.mkdir(parents=True)
    info.write_to_directory(str(v))
  except Exception as e:  # noqa: BLE001
    pytest.skip(f"cannot write TFDS cifar10 metadata in this environment: {e}")
  meta = json.loads((v / "dataset_info.json").read_text())
  meta["fileFormat"] = "array_record"
  (v / "dataset_info.json").write_text(json.dumps(meta))
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=str(tmp_path)):
    d = cifar10.load_cifar10(str(tmp_path), source="tfds", num_valid=1)
  assert d.train_x.shape == (4, 32, 32, 3) and d.valid_x.shape == (1, 32, 32, 3)
  assert d.test_x.shape == (5, 32, 32, 3) and d.train_x.dtype == np.uint8
  assert d.source.startswith("tfds array_record at")


# ------------------------------------------------------------ augmentation

MEAN = np.array([0.4, 0.5, 0.6], np.float32) + 0.1234567 / 255  # no pixel normalises to 0
STD = np.array([0.25, 0.2, 0.3], np.float32)


def _images(b=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)


def test_normalize_and_identity_augment():
  x = _images(4)
  n = np.asarray(cifar10.normalize(x, MEAN, STD))
  np.testing.assert_allclose(n, (x / 255.0 - MEAN) / STD, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(cifar10.normalize(x / 255.0, MEAN, STD)), n, atol=1e-5)
  same = cifar10.augment(x, jax.random.key(0), MEAN, STD, pad=0, flip=False)
  np.testing.assert_array_equal(np.asarray(same), n)


def test_augment_shape_dtype_determinism():
  x = _images(8)
  a = cifar10.augment(x, jax.random.key(1), MEAN, STD, cutout=16)
  b = cifar10.augment(x, jax.random.key(1), MEAN, STD, cutout=16)
  c = cifar10.augment(x, jax.random.key(2), MEAN, STD, cutout=16)
  assert a.shape == x.shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_flip_some_not_others():
  x = _images(64)
  n = np.asarray(cifar10.normalize(x, MEAN, STD))
  out = np.asarray(cifar10.augment(x, jax.random.key(3), MEAN, STD, pad=0, flip=True))
  same = np.all(out == n, axis=(1, 2, 3))
  mirrored = np.all(out == n[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same ^ mirrored)
  assert 10 < mirrored.sum() < 54


def _shifted(img, dy, dx):
  """img moved down by dy and right by dx with zero fill (crop of the zero-padded image)."""
  out = np.zeros_like(img)
  h, w = img.shape[:2]
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
      img[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
  return out


def test_crop_shifts_at_most_pad():
  x = _images(48)
  n = np.asarray(cifar10.normalize(x, MEAN, STD))
  out = np.asarray(cifar10.augment(x, jax.random.key(4), MEAN, STD, pad=4, flip=False))
  shifts = []
  for i in range(len(x)):
    hits = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
            if np.array_equal(out[i], _shifted(n[i], dy, dx))]
    assert len(hits) == 1, i
    shifts.append(hits[0])
  # Padding is 0 in normalised units (the mean pixel), as in the original.
  dy, dx = np.array(shifts).T
  assert len(set(shifts)) > 15 and dy.min() < 0 < dy.max() and dx.min() < 0 < dx.max()


@pytest.mark.parametrize("anchor", ["corner", "centre"])
def test_cutout_square(anchor):
  size, x = 8, _images(64)
  n = np.asarray(cifar10.normalize(x, MEAN, STD))
  assert np.all(n != 0)
  out = np.asarray(cifar10.augment(x, jax.random.key(5), MEAN, STD, pad=0, flip=False,
                                   cutout=size, cutout_anchor=anchor))
  full = 0
  for i in range(len(x)):
    zero = out[i] == 0
    assert np.all(zero == zero[..., :1])  # all channels together
    rows, cols = np.flatnonzero(zero[:, :, 0].any(1)), np.flatnonzero(zero[:, :, 0].any(0))
    assert rows.size and cols.size
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    assert zero[r0:r1, c0:c1].all() and zero.sum() == (r1 - r0) * (c1 - c0) * 3  # a rectangle
    assert r1 - r0 <= size and c1 - c0 <= size
    if anchor == "corner":  # only the bottom/right borders clip
      assert r1 - r0 == min(size, 32 - r0) and c1 - c0 == min(size, 32 - c0)
    else:
      assert r1 - r0 == size or r0 == 0 or r1 == 32
    full += (r1 - r0 == size) and (c1 - c0 == size)
    np.testing.assert_array_equal(out[i][~zero], n[i][~zero])
  assert 10 < full < 64  # most squares whole, some clipped


def test_augment_jits_once():
  traces = []

  @jax.jit
  def step(images, key):
    traces.append(1)
    return cifar10.augment(images, key, MEAN, STD, cutout=16).sum()

  x = jnp.asarray(_images(4))
  values = [float(step(x, jax.random.key(k))) for k in range(4)]
  assert len(traces) == 1 and len(set(values)) > 1


# --------------------------------------------------------------- synthetic


def test_synthetic_cifar_deterministic_and_separable():
  a, b = cifar10.synthetic_cifar(seed=0), cifar10.synthetic_cifar(seed=0)
  for f in ("train_x", "train_y", "test_x", "test_y", "mean", "std"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  assert not np.array_equal(a.train_x, cifar10.synthetic_cifar(seed=1).train_x)
  assert a.train_x.shape == (512, 32, 32, 3) and a.test_x.shape == (128, 32, 32, 3)
  assert a.train_x.dtype == np.uint8 and np.bincount(a.train_y).min() >= 51
  means = np.stack([a.train_x[a.train_y == c].reshape(-1, 3072).mean(0, dtype=np.float64)
                    for c in range(10)])
  dist = ((a.test_x.reshape(-1, 1, 3072).astype(np.float64) - means) ** 2).sum(-1)
  assert (dist.argmin(1) == a.test_y).mean() > 0.8
  v = cifar10.synthetic_cifar(num_train=100, num_test=10, num_valid=20)
  assert (v.num_train, v.num_valid, v.num_test) == (80, 20, 10)
  np.testing.assert_array_equal(v.valid_x, cifar10.synthetic_cifar(num_train=100, num_test=10)
                                .train_x[80:])


def test_load_images_dispatch(tmp_path):
  _write_batches(tmp_path, *_fake())
  d = data.load_images(types.SimpleNamespace(source="cifar10", data_dir=str(tmp_path),
                                             num_valid=2))
  assert (d.num_train, d.num_valid, d.num_test) == (8, 2, 2)
  s = data.load_images(types.SimpleNamespace(source="synthetic", num_train=40, num_test=10,
                                             seed=0, num_valid=0))
  assert s.num_train == 40 and s.source == "synthetic_cifar(seed=0)"
  with pytest.raises(ValueError, match="load_images"):
    data.load_corpus(types.SimpleNamespace(source="cifar10"))
  with pytest.raises(ValueError, match="cifar10, synthetic"):
    data.load_images(types.SimpleNamespace(source="ptb"))
