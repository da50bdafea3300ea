"""CIFAR-10: loading, train/valid split, normalisation and on-device augmentation.

Follows the original's ``src/cifar10/data_utils.py`` and ``models.py``:

* images are NHWC, pixels in [0, 1] (``/ 255``);
* with ``num_valid > 0`` (search: 5,000) the LAST ``num_valid`` images of the
  concatenated training set (the end of ``data_batch_5``) are the validation
  set; ``num_valid = 0`` (final training) keeps all 50,000 for training;
* per-channel mean and (population) std are computed on the training part only
  and applied to train, valid and test;
* training augmentation, per image, on the *normalised* image: zero-pad 4 px
  (40 x 40; the zero is the mean pixel), random 32 x 32 crop, random horizontal
  flip, optional cutout (the square is set to 0, again the mean pixel).

Images are kept as uint8 on the host (150 MB for all 60,000); :func:`augment`
and :func:`normalize` are pure JAX functions meant to run inside the jitted
train / eval steps, on batches already on the device.

Sources :func:`load_cifar10` tries, in order: the official python batches
(``cifar-10-batches-py/``), TFDS ``cifar10`` prepared in array_record format
(read with ``tfds.data_source``, no TensorFlow needed), the official archive
``cifar-10-python.tar.gz`` (md5-checked, extracted), and -- only with
``download=True`` (the CIFAR configs' default) -- one download of that archive
into the data folder. Downloads and extractions go to temporary ``.*.part``
names in that folder and are renamed into place only when complete and
md5-correct, so an interrupted one never looks complete; the next run removes
such leftovers once they are ``STALE_S`` old (a concurrent download into a
shared folder is left alone). Each process downloads into its own
``data_dir`` when nothing is there (on TPU VMs every host has its own disk).
Loading the python batches (50,000 + 10,000 images) takes about 0.5 s, so
nothing is cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import zlib

import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CONNECT_TIMEOUT_S = 10  # download: seconds for name lookup, connect and headers, together
READ_TIMEOUT_S = 10  # download: a stall this long aborts it (no retries)
PROGRESS_EVERY_S = 5.0  # download: seconds between progress lines when stderr is not a terminal
STALE_S = 600  # a temporary file of a download/extraction untouched this long is a leftover
SOURCES = ("auto", "python", "tfds", "archive")
CUTOUT_ANCHORS = ("corner", "centre")


@dataclasses.dataclass
class ImageData:
  """An image-classification dataset: uint8 NHWC images, int32 labels.

  ``valid_x`` / ``valid_y`` may be empty (shapes ``[0, 32, 32, 3]`` / ``[0]``).
  ``mean`` and ``std`` are float32 ``[3]`` per-channel statistics of the
  training part, in [0, 1] pixel units (``normalize(x) = (x / 255 - mean) / std``).
  ``source`` says where the data came from.
  """
  train_x: np.ndarray
  train_y: np.ndarray
  valid_x: np.ndarray
  valid_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  source: str = ""
  num_classes: int = NUM_CLASSES

  def __post_init__(self):
    for split in ("train", "valid", "test"):
      x = np.asarray(getattr(self, f"{split}_x"))
      y = np.asarray(getattr(self, f"{split}_y"))
      if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"{split}_x must be uint8 [N, H, W, C], got {x.dtype} {x.shape}.")
      y = y.reshape(-1).astype(np.int32)
      if len(y) != len(x):
        raise ValueError(f"{split}: {len(x)} images but {len(y)} labels.")
      if y.size and (y.min() < 0 or y.max() >= self.num_classes):
        raise ValueError(f"{split}_y has labels outside [0, {self.num_classes}).")
      setattr(self, f"{split}_x", x)
      setattr(self, f"{split}_y", y)
    self.mean = np.asarray(self.mean, np.float32).reshape(-1)
    self.std = np.asarray(self.std, np.float32).reshape(-1)

  @property
  def num_train(self) -> int:
    """Number of training images."""
    return len(self.train_y)

  @property
  def num_valid(self) -> int:
    """Number of validation images (0 in final training)."""
    return len(self.valid_y)

  @property
  def num_test(self) -> int:
    """Number of test images."""
    return len(self.test_y)


# ------------------------------------------------------------------ helpers


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and population std of uint8 NHWC images, in [0, 1] units.

  Exact (from per-channel 256-bin histograms, float64), float32 results.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or not images.size:
    raise ValueError(f"need non-empty uint8 [N, H, W, C] images, got {images.dtype} "
                     f"{images.shape}.")
  values = np.arange(256, dtype=np.float64) / 255.0
  channels = images.shape[-1]
  # One histogram of (channel, value) pairs, over slices of images: np.bincount
  # converts its input to int64, and all 45,000 training images at once made
  # ~370 MB of fresh temporaries per channel (7.6 s of a restart on a host
  # with slow first-touch memory; ~0.5 s this way).
  offsets = (np.arange(channels, dtype=np.int32) * 256)
  hists = np.zeros(channels * 256, np.int64)
  rows = max(1, (1 << 20) // max(1, images[0].size))  # ~1 M values per slice
  for i in range(0, len(images), rows):
    block = images[i:i + rows].reshape(-1, channels).astype(np.int32) + offsets
    hists += np.bincount(block.ravel(), minlength=channels * 256)
  mean, std = [], []
  for c in range(channels):
    hist = hists[c * 256:(c + 1) * 256].astype(np.float64)
    n = hist.sum()
    m = (hist * values).sum() / n
    var = (hist * (values - m) ** 2).sum() / n
    mean.append(m)
    std.append(np.sqrt(var))
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def split_train_valid(x, y, test_x, test_y, num_valid: int, source: str) -> ImageData:
  """Holds out the LAST ``num_valid`` training images and computes train statistics."""
  n = len(x)
  if not 0 <= num_valid < n:
    raise ValueError(f"num_valid={num_valid} must be in [0, {n}) (there are {n} training "
                     "images; 5000 for search, 0 for final training).")
  cut = n - num_valid
  train_x, valid_x = x[:cut], x[cut:]
  train_y, valid_y = y[:cut], y[cut:]
  mean, std = channel_stats(train_x)
  if np.any(std <= 0):
    raise ValueError(f"training images from {source} have a constant channel (std {std}).")
  return ImageData(train_x=train_x, train_y=train_y, valid_x=valid_x, valid_y=valid_y,
                   test_x=test_x, test_y=test_y, mean=mean, std=std, source=source)


class _BatchUnpickler(pickle.Unpickler):
  """Unpickles CIFAR batch dicts only: numpy arrays, no arbitrary callables."""
  _ALLOWED = frozenset({
      ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
      ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")})

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
    if module.startswith("numpy.core."):  # Python-2 era name; numpy >= 2 calls it numpy._core.
      module = "numpy._core." + module[len("numpy.core."):]
    return super().find_class(module, name)


def _get(d, key):
  """``d[b"key"]`` or ``d["key"]`` (Python-2 pickles give bytes keys)."""
  if key.encode() in d:
    return d[key.encode()]
  return d.get(key)


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one official python batch file into (uint8 [N, 32, 32, 3], int32 [N]).

  The file is a pickled dict with ``b"data"`` (``N x 3072`` uint8, each row the
  red, green then blue 32 x 32 planes, row-major) and ``b"labels"`` (N ints).

  Raises:
    ValueError: naming the file, if it is not such a pickle or the shapes,
      dtype or labels are wrong.
  """
  try:
    with open(path, "rb") as f:
      batch = _BatchUnpickler(f, encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
          ImportError, IndexError, KeyError) as e:
    raise ValueError(f"CIFAR-10 batch {path} is corrupt or not a python-version batch "
                     f"pickle: {type(e).__name__}: {e}") from e
  if not isinstance(batch, dict):
    raise ValueError(f"CIFAR-10 batch {path} holds a {type(batch).__name__}, "
                     "expected a dict with b'data' and b'labels'.")
  data, labels = _get(batch, "data"), _get(batch, "labels")
  if data is None or labels is None:
    raise ValueError(f"CIFAR-10 batch {path} lacks b'data' or b'labels' "
                     f"(keys: {sorted(map(repr, batch))}).")
  data = np.asarray(data)
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    raise ValueError(f"CIFAR-10 batch {path}: b'data' is {data.dtype} {data.shape}, "
                     "expected uint8 [N, 3072].")
  try:
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
  except (TypeError, ValueError) as e:
    raise ValueError(f"CIFAR-10 batch {path}: b'labels' are not integers ({e}).") from e
  if len(labels) != len(data):
    raise ValueError(f"CIFAR-10 batch {path}: {len(data)} images but {len(labels)} labels.")
  if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise ValueError(f"CIFAR-10 batch {path}: labels outside [0, {NUM_CLASSES}) "
                     f"(min {labels.min()}, max {labels.max()}).")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC
  return np.ascontiguousarray(images), labels.astype(np.int32)


class _SourceUnavailable(Exception):
  """A source is absent (not broken): try the next one, report why at the end."""


# ------------------------------------------------------------------ sources


def _load_python(data_dir: str):
  root = os.path.join(data_dir, BATCHES_DIR)
  if not os.path.isdir(root):
    raise _SourceUnavailable(f"{root} does not exist")
  missing = [f for f in TRAIN_FILES + (TEST_FILE,) if not os.path.isfile(os.path.join(root, f))]
  if missing:
    raise _SourceUnavailable(f"{root} lacks {', '.join(missing)}")
  parts = [read_batch(os.path.join(root, f)) for f in TRAIN_FILES]
  x = np.concatenate([p[0] for p in parts])
  y = np.concatenate([p[1] for p in parts])
  test_x, test_y = read_batch(os.path.join(root, TEST_FILE))
  return x, y, test_x, test_y, f"python batches at {root}"


def _tfds_split(ds, split: str, path: str):
  n = len(ds)
  xs = np.empty((n,) + IMAGE_SHAPE, np.uint8)
  ys = np.empty((n,), np.int32)
  ids = []
  chunk = 1000
  for start in range(0, n, chunk):
    idx = list(range(start, min(n, start + chunk)))
    try:  # batched reads are faster; tfds.testing.mock_data's data source lacks them.
      rows = ds.__getitems__(idx)
    except (AttributeError, TypeError):
      rows = [ds[i] for i in idx]
    for i, row in zip(idx, rows):
      img = np.asarray(row["image"])
      if img.shape != IMAGE_SHAPE or img.dtype != np.uint8:
        raise ValueError(f"TFDS cifar10 at {path}, split {split}, record {i}: image is "
                         f"{img.dtype} {img.shape}, expected uint8 {IMAGE_SHAPE}.")
      xs[i] = img
      ys[i] = int(row["label"])
      rid = row.get("id", b"")
      ids.append(rid.decode() if isinstance(rid, bytes) else str(rid))
  # TFDS shuffles records when preparing; its ids ("train_00042") are the
  # positions in the official batches, so sorting by them restores that order
  # (and makes the last-num_valid split the original's).
  try:
    order = np.argsort([int(i.rsplit("_", 1)[1]) for i in ids], kind="stable")
  except (IndexError, ValueError):
    order = None
  if order is not None and len(set(order.tolist())) == n:
    xs, ys = xs[order], ys[order]
  return xs, ys, order is not None


def _load_tfds(data_dir: str):
  root = os.path.join(data_dir, "cifar10")
  if not os.path.isdir(root):
    raise _SourceUnavailable(f"TFDS cifar10 is not prepared under {data_dir} ({root} does "
                             "not exist)")
  infos = sorted(os.path.join(root, d, "dataset_info.json") for d in os.listdir(root))
  infos = [p for p in infos if os.path.isfile(p)]
  if not infos:
    raise _SourceUnavailable(f"TFDS cifar10 under {root} has no prepared version "
                             "(no <version>/dataset_info.json)")
  formats = []
  for p in infos:
    try:
      with open(p, encoding="utf-8") as f:
        formats.append(json.load(f).get("fileFormat", "tfrecord"))
    except (OSError, ValueError) as e:
      raise ValueError(f"TFDS metadata {p} is unreadable: {e}") from e
  if "array_record" not in formats:
    raise _SourceUnavailable(
        f"TFDS cifar10 under {root} is prepared only as {', '.join(sorted(set(formats)))}; "
        "reading it without TensorFlow needs the array_record format")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise _SourceUnavailable(f"tensorflow-datasets is not importable ({e})") from e
  try:
    splits = tfds.data_source("cifar10", data_dir=data_dir, download=False, try_gcs=False)
  except Exception as e:  # TFDS raises many kinds; report, don't crash.
    raise _SourceUnavailable(
        f"tfds.data_source('cifar10', data_dir={data_dir!r}) failed: "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
  if "train" not in splits or "test" not in splits:
    raise _SourceUnavailable(f"TFDS cifar10 under {root} has splits {sorted(splits)}, "
                             "expected train and test")
  x, y, sorted_train = _tfds_split(splits["train"], "train", root)
  test_x, test_y, _ = _tfds_split(splits["test"], "test", root)
  note = "" if sorted_train else " (record ids not parseable: TFDS order)"
  return x, y, test_x, test_y, f"tfds array_record at {root}{note}"


def _md5(path: str) -> str:
  h = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _check_md5(path: str):
  got = _md5(path)
  if got != ARCHIVE_MD5:
    raise ValueError(f"CIFAR-10 archive {path} has md5 {got}, expected {ARCHIVE_MD5} "
                     "(truncated or not the official cifar-10-python.tar.gz); delete it "
                     f"and provide the official file from {URL}.")


def _complete(root: str) -> bool:
  return all(os.path.isfile(os.path.join(root, f)) for f in TRAIN_FILES + (TEST_FILE,))


def _newest_mtime(path: str) -> float:
  newest = os.lstat(path).st_mtime
  for dirpath, dirnames, filenames in os.walk(path):
    for name in dirnames + filenames:
      try:
        newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
      except OSError:
        pass
  return newest


def _clean_leftovers(data_dir: str):
  """Removes temporary files of interrupted downloads / extractions (``.*.part``).

  Only those untouched for ``STALE_S``: a live download writes at least every
  ``READ_TIMEOUT_S``, so another process's transfer into a shared folder is kept.
  """
  if not os.path.isdir(data_dir):
    return
  for name in os.listdir(data_dir):
    ours = (name.startswith((f".{ARCHIVE}.", f".{BATCHES_DIR}.")) and name.endswith(".part")
            ) or name == ARCHIVE + ".part"  # the latter: the name older versions used
    path = os.path.join(data_dir, name)
    try:
      if not ours or time.time() - _newest_mtime(path) < STALE_S:
        continue
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
    except OSError:
      pass  # another process removed it, or we may not: it looks incomplete either way


def _install(new: str, target: str):
  """Moves the extracted folder ``new`` to ``target`` with one ``os.replace``."""
  if os.path.lexists(target):
    if os.path.isdir(target) and _complete(target):
      return  # another process installed it meanwhile; the same official files
    if not os.path.isdir(target) or os.path.islink(target):
      raise ValueError(f"{target} exists but is not a folder; remove it so the archive can "
                       "be extracted there.")
    aside = f"{target}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(target, aside)
    print(f"CIFAR-10: moved the incomplete {target} aside to {aside} (delete it when not "
          "needed).", file=sys.stderr, flush=True)
  os.replace(new, target)


def _extract(path: str, data_dir: str):
  """Extracts the archive's ``cifar-10-batches-py/`` regular files to ``data_dir``.

  Atomic: extracts into a temporary folder in ``data_dir``, checks that every
  batch is there, then renames it into place, so an interrupted extraction
  leaves no ``cifar-10-batches-py/`` (only a ``.part`` folder the next run removes).
  """
  tmp = tempfile.mkdtemp(dir=data_dir, prefix=f".{BATCHES_DIR}.", suffix=".part")
  try:
    try:
      with tarfile.open(path, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
          parts = m.name.replace("\\", "/").split("/")
          if parts[0] != BATCHES_DIR or ".." in parts or os.path.isabs(m.name):
            continue
          if m.isfile() or m.isdir():
            members.append(m)
        if not any(m.isfile() for m in members):
          raise ValueError(f"CIFAR-10 archive {path} holds no {BATCHES_DIR}/ files.")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, members=members, **kwargs)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
      raise ValueError(f"CIFAR-10 archive {path} could not be extracted: {e}") from e
    new = os.path.join(tmp, BATCHES_DIR)
    if not _complete(new):
      raise ValueError(f"CIFAR-10 archive {path} lacks some of {', '.join(TRAIN_FILES)}, "
                       f"{TEST_FILE} under {BATCHES_DIR}/.")
    _install(new, os.path.join(data_dir, BATCHES_DIR))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _load_archive(data_dir: str, download: bool, url: str):
  path = os.path.join(data_dir, ARCHIVE)
  _clean_leftovers(data_dir)
  if not os.path.isfile(path):
    if not download:
      raise _SourceUnavailable(f"{path} does not exist (and download=False)")
    try:
      _download(url, path)
    except _SourceUnavailable as e:
      raise _SourceUnavailable(f"{path} does not exist; {e}") from e
  else:
    _check_md5(path)
  _extract(path, data_dir)
  x, y, test_x, test_y, _ = _load_python(data_dir)
  desc = f"python batches at {os.path.join(data_dir, BATCHES_DIR)} (extracted from {path})"
  return x, y, test_x, test_y, desc


def _open_url(url: str):
  """``urlopen(url)`` with one deadline for name lookup, connect and headers.

  The socket timeout alone bounds neither the name lookup nor the sum over a
  host's addresses; a worker thread does. An abandoned attempt closes its
  response if it arrives later.
  """
  box, abandoned = {}, threading.Event()

  def attempt():
    try:
      r = urllib.request.urlopen(url, timeout=READ_TIMEOUT_S)
    except BaseException as e:  # handed to the caller below
      box["error"] = e
      return
    box["response"] = r
    if abandoned.is_set():
      r.close()

  worker = threading.Thread(target=attempt, name="cifar10-download", daemon=True)
  worker.start()
  worker.join(CONNECT_TIMEOUT_S)
  if worker.is_alive():
    abandoned.set()
    raise TimeoutError(f"no answer within {CONNECT_TIMEOUT_S} s")
  if "error" in box:
    raise box["error"]
  return box["response"]


class _Progress:
  """One progress line on stderr: rewritten with ``\\r`` on a terminal (at most
  twice a second), else a new line every ``PROGRESS_EVERY_S`` (logs stay short)."""

  def __init__(self, total):
    self.total = total
    self.start = self.last = time.monotonic()
    self.tty = sys.stderr.isatty()
    self.every = 0.5 if self.tty else PROGRESS_EVERY_S

  def _line(self, got, now):
    rate = got / 1e6 / max(now - self.start, 1e-6)
    size = f"{got / 1e6:.1f} MB"
    if self.total:
      size = f"{got / 1e6:.1f} / {self.total / 1e6:.1f} MB ({100 * got / self.total:.0f}%)"
    return f"CIFAR-10: {size}, {rate:.1f} MB/s"

  def update(self, got):
    now = time.monotonic()
    if now - self.last >= self.every:
      self.last = now
      print(("\r" if self.tty else "") + self._line(got, now), end="" if self.tty else "\n",
            file=sys.stderr, flush=True)

  def done(self, got):
    now = time.monotonic()
    print(("\r" if self.tty else "") + self._line(got, now) + f" in {now - self.start:.0f} s",
          file=sys.stderr, flush=True)


def _download(url: str, path: str):
  """Fetches ``url`` to ``path`` once: a temporary file in the same folder,
  md5-checked while it streams, renamed to ``path`` only when complete and right.

  Raises:
    _SourceUnavailable: no connection, an HTTP error, a stall longer than
      ``READ_TIMEOUT_S`` or a body shorter than its Content-Length.
    ValueError: a malformed ``url``, or a complete body with the wrong md5.
  """
  folder = os.path.dirname(path)
  created = not os.path.isdir(folder)
  os.makedirs(folder, exist_ok=True)
  print(f"CIFAR-10: downloading {url} to {path} (once; md5-checked; "
        "--config.data.download=False turns this off)", file=sys.stderr, flush=True)
  fd, part = tempfile.mkstemp(dir=folder, prefix=f".{ARCHIVE}.", suffix=".part")
  start, got, total, h = time.monotonic(), 0, None, hashlib.md5()

  def failed(e):
    return _SourceUnavailable(f"download of {url} failed after {time.monotonic() - start:.0f} "
                              f"s, {got} bytes in ({type(e).__name__}: {e})")
  try:
    with os.fdopen(fd, "wb") as f:
      try:
        r = _open_url(url)
      except ValueError as e:  # urllib: unknown url type, malformed URL
        raise ValueError(f"data.download_url={url!r} is not a URL urllib can fetch: {e}") from e
      except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts
        raise failed(e) from e
      with r:
        length = r.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        progress = _Progress(total)
        while True:
          try:
            block = r.read(1 << 20)
          except (OSError, http.client.HTTPException) as e:
            raise failed(e) from e
          if not block:
            break
          f.write(block)
          h.update(block)
          got += len(block)
          progress.update(got)
      progress.done(got)
    if total is not None and got != total:
      raise _SourceUnavailable(f"download of {url} ended after {got} of {total} bytes (the "
                               "connection closed early); nothing was kept")
    if h.hexdigest() != ARCHIVE_MD5:
      raise ValueError(f"CIFAR-10 download from {url} has md5 {h.hexdigest()}, expected "
                       f"{ARCHIVE_MD5} ({got} bytes; a damaged transfer, or a mirror serving "
                       "another file); nothing was kept. Run again to retry, or get the "
                       f"archive by hand from {URL} and put it at {path}.")
    os.replace(part, path)
  finally:
    if os.path.exists(part):
      os.remove(part)
      if created and not os.listdir(folder):
        os.rmdir(folder)  # a failed first try leaves the disk as it was


def _missing_message(data_dir: str, tried: list[str], download: bool) -> str:
  lines = [f"CIFAR-10 not found in {data_dir}. Looked for:"]
  lines += [f"  - {t}" for t in tried]
  lines.append(f"Get it by hand in one of these ways, with DIR = {data_dir} (or any folder, "
               "then run with --config.data.data_dir=DIR):")
  lines.append(f"  1. download {URL} (163 MiB, md5 {ARCHIVE_MD5}) and put it at "
               f"DIR/{ARCHIVE}; the next run md5-checks and extracts it.")
  lines.append(f"  2. or put the extracted folder at DIR/{BATCHES_DIR}/ (data_batch_1..5, "
               "test_batch, as in that archive).")
  lines.append("  3. or TFDS cifar10 in array_record format under DIR: `pip install tensorflow` "
               "then `tfds build cifar10 --data_dir=DIR --file_format=array_record` (reading it "
               "needs no TensorFlow).")
  if download:
    lines.append("The download is on by default (data.download=True; a mirror: "
                 "--config.data.download_url=URL). On a machine without internet turn it off "
                 "with --config.data.download=False.")
  else:
    lines.append("The download is off (data.download=False); with internet, "
                 "--config.data.download=True fetches the archive once.")
  return "\n".join(lines)


def load_cifar10(data_dir: str, source: str = "auto", num_valid: int = 5000,
                 download: bool = False, download_url: str = "") -> ImageData:
  """Loads CIFAR-10 from ``data_dir`` and splits off the validation set.

  Args:
    data_dir: directory holding (or to receive) the data.
    source: ``"auto"`` tries, in order, ``"python"`` (``data_dir/cifar-10-batches-py/``),
      ``"tfds"`` (TFDS cifar10 prepared as array_record under ``data_dir``, sorted
      back into the official order by record id) and ``"archive"``
      (``data_dir/cifar-10-python.tar.gz``, md5-checked and extracted into
      ``data_dir``; downloaded first if absent and ``download``). A named
      source is the only one tried.
    num_valid: the last ``num_valid`` training images become the validation
      set (5000 for search); 0 keeps all 50,000 for training (final).
    download: allow one download attempt of the archive, kept in ``data_dir``
      (no retries; ``CONNECT_TIMEOUT_S`` to get an answer, a stall of
      ``READ_TIMEOUT_S`` aborts). Off here; the CIFAR configs turn it on.
    download_url: where to download from; empty: the official :data:`URL`.

  Returns:
    An :class:`ImageData`; mean/std are from the training part only.

  Raises:
    FileNotFoundError: no source has the data (offline download included); the
      message lists every source and path tried, why each failed, and how to
      provide the data.
    ValueError: a present file is corrupt (pickle, shapes, labels, md5), a
      downloaded archive has the wrong md5, or a bad ``source`` / ``num_valid``.
  """
  if source not in SOURCES:
    raise ValueError(f"unknown CIFAR-10 source {source!r}; valid: {', '.join(SOURCES)}.")
  data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
  order = ("python", "tfds", "archive") if source == "auto" else (source,)
  tried = []
  for name in order:
    try:
      if name == "python":
        loaded = _load_python(data_dir)
      elif name == "tfds":
        loaded = _load_tfds(data_dir)
      else:
        loaded = _load_archive(data_dir, download, download_url or URL)
    except _SourceUnavailable as e:
      tried.append(f"{name}: {e}")
      continue
    x, y, test_x, test_y, desc = loaded
    return split_train_valid(x, y, test_x, test_y, num_valid, desc)
  raise FileNotFoundError(_missing_message(data_dir, tried, download))


def default_cifar10_dir() -> str:
  """First existing of ``$ENAS_JAX_DATA/cifar10`` and ``./data/cifar10``; else ``data/cifar10``."""
  local = os.path.join("data", "cifar10")
  candidates = [local]
  if os.environ.get("ENAS_JAX_DATA"):
    candidates.insert(0, os.path.join(os.environ["ENAS_JAX_DATA"], "cifar10"))
  return next((c for c in candidates if os.path.isdir(c)), local)


# ------------------------------------------------------------ augmentation


def _to_unit(images) -> jax.Array:
  """uint8 -> float32 / 255; floating inputs are taken as already in [0, 1]."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def normalize(images, mean, std) -> jax.Array:
  """``(images / 255 - mean) / std`` in float32 (eval path; no augmentation).

  uint8 images are divided by 255; float images are taken as already in [0, 1].
  ``mean`` and ``std`` broadcast over the last (channel) axis.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (_to_unit(images) - mean) / std


def augment(images, key, mean, std, *, pad: int = 4, flip: bool = True, cutout: int = 0,
            cutout_anchor: str = "corner") -> jax.Array:
  """Normalises a training batch and augments each image independently.

  Pure and jittable (static shapes, no Python loop over the batch); ``pad``,
  ``flip``, ``cutout`` and ``cutout_anchor`` must be static. Steps, as in the
  original (``models.py``), all on the normalised image:

  1. ``normalize`` (float32; uint8 / 255, float taken as [0, 1]);
  2. zero-pad ``pad`` px on each side -- 0 in normalised units, i.e. the
     training mean pixel -- and crop back to H x W at a uniform offset in
     ``[0, 2 * pad]^2`` (content shifts by at most ``pad`` px);
  3. with ``flip``, mirror left-right with probability 1/2;
  4. with ``cutout > 0``, set a ``cutout x cutout`` square to 0 (the mean
     pixel), clipped at the borders. ``cutout_anchor="corner"`` (default, the
     original's): top-left corner uniform in ``[0, H) x [0, W)``, so the square
     is often cut by the bottom/right border. ``"centre"`` (DeVries & Taylor):
     centre uniform in ``[0, H) x [0, W)``, square rows
     ``[cy - cutout // 2, cy - cutout // 2 + cutout)`` and likewise columns.

  Args:
    images: ``[B, H, W, C]`` uint8 or float in [0, 1].
    key: a PRNG key; all per-image randomness derives from it.
    mean, std: per-channel statistics (``ImageData.mean`` / ``.std``).

  Returns:
    float32 ``[B, H, W, C]``.
  """
  if cutout_anchor not in CUTOUT_ANCHORS:
    raise ValueError(f"cutout_anchor must be one of {CUTOUT_ANCHORS}, got {cutout_anchor!r}.")
  if pad < 0 or cutout < 0:
    raise ValueError(f"pad and cutout must be >= 0, got pad={pad}, cutout={cutout}.")
  x = normalize(images, mean, std)
  b, h, w, _ = x.shape
  k_crop, k_flip, k_cut = jax.random.split(key, 3)
  if pad:
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
    x = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(k_flip, 0.5, (b,))
    x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1, :], x)
  if cutout:
    ky, kx = jax.random.split(k_cut)
    y0 = jax.random.randint(ky, (b, 1), 0, h)
    x0 = jax.random.randint(kx, (b, 1), 0, w)
    if cutout_anchor == "centre":
      y0, x0 = y0 - cutout // 2, x0 - cutout // 2
    rows, cols = jnp.arange(h)[None, :], jnp.arange(w)[None, :]
    in_y = (rows >= y0) & (rows < y0 + cutout)  # [B, H]
    in_x = (cols >= x0) & (cols < x0 + cutout)  # [B, W]
    square = in_y[:, :, None] & in_x[:, None, :]
    x = jnp.where(square[..., None], 0.0, x)
  return x


# --------------------------------------------------------------- synthetic


def synthetic_cifar(num_train: int = 512, num_test: int = 128, seed: int = 0,
                    num_valid: int = 0) -> ImageData:
  """Generated 32 x 32 RGB images whose class is learnable; deterministic.

  Class ``c`` (of 10) has a fixed colour (hue ``c / 10``) and a fixed
  sinusoidal grating (orientation ``c * 18`` degrees, 2 + c % 3 cycles per
  image). Each image: ``0.5 + 0.4 * (colour - 0.5) + 0.15 * grating`` with a
  random grating phase, a random brightness offset (sd 0.05) and pixel noise
  (sd 0.08), clipped and quantised to uint8. Colour alone separates classes
  by a nearest-mean rule; the texture gives a conv net a second cue.

  ``num_train`` images are generated for training, of which the last
  ``num_valid`` become the validation set (as :func:`load_cifar10`); labels
  cycle through the classes in a seeded random order.
  """
  if num_train < 1 or num_test < 0:
    raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}.")
  rng = np.random.default_rng(seed)
  hue = np.arange(NUM_CLASSES) / NUM_CLASSES
  # HSV (h, 1, 1) -> RGB, per class.
  colour = np.clip(np.abs(((hue[:, None] * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)
  theta = np.deg2rad(np.arange(NUM_CLASSES) * 18.0)
  freq = 2.0 + np.arange(NUM_CLASSES) % 3
  yy, xx = np.meshgrid(np.arange(32) / 32.0, np.arange(32) / 32.0, indexing="ij")

  def make(n):
    labels = rng.permutation(np.arange(n) % NUM_CLASSES)
    phase = rng.uniform(0, 2 * np.pi, n)
    proj = (np.cos(theta[labels])[:, None, None] * xx + np.sin(theta[labels])[:, None, None] * yy)
    grating = np.sin(2 * np.pi * freq[labels][:, None, None] * proj + phase[:, None, None])
    img = (0.5 + 0.4 * (colour[labels] - 0.5)[:, None, None, :]
           + 0.15 * grating[..., None]
           + rng.normal(0, 0.05, (n, 1, 1, 1))
           + rng.normal(0, 0.08, (n, 32, 32, 3)))
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), labels.astype(np.int32)

  x, y = make(num_train)
  test_x, test_y = make(num_test)
  return split_train_valid(x, y, test_x, test_y, num_valid, f"synthetic_cifar(seed={seed})")
