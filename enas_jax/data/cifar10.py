"""CIFAR-10: loading, train/valid split, normalisation and on-device augmentation.

Follows the original's ``src/cifar10/data_utils.py`` and ``models.py``
(reference notes §4):

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
``download=True`` -- a download of that archive. Loading the python batches
(50,000 + 10,000 images) takes about 0.5 s (2 CPU cores, files in the page
cache), so nothing is cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import tarfile
import time
import urllib.request

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
DOWNLOAD_TIMEOUT_S = 20
SOURCES = ("auto", "python", "tfds", "archive")
CUTOUT_ANCHORS = ("corner", "centre")
# Run from the repository root; rebuilds the python batches from the JPEG copy.
MAKE_BATCHES = "python ../shared/data/cifar10/make_cifar10_batches.py"


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
  mean, std = [], []
  for c in range(images.shape[-1]):
    hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
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
                     "and provide the official file.")


def _extract(path: str, data_dir: str):
  """Extracts the ``cifar-10-batches-py/`` regular files of the archive into ``data_dir``."""
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
      tar.extractall(data_dir, members=members, **kwargs)
  except (tarfile.TarError, EOFError, OSError) as e:
    raise ValueError(f"CIFAR-10 archive {path} could not be extracted: {e}") from e


def _load_archive(data_dir: str, download: bool, tried: list[str]):
  path = os.path.join(data_dir, ARCHIVE)
  if not os.path.isfile(path):
    if not download:
      raise _SourceUnavailable(f"{path} does not exist (and download=False)")
    tried.append(f"archive: {path} does not exist; downloading it")
    _download(path)
  _check_md5(path)
  _extract(path, data_dir)
  x, y, test_x, test_y, _ = _load_python(data_dir)
  desc = f"python batches at {os.path.join(data_dir, BATCHES_DIR)} (extracted from {path})"
  return x, y, test_x, test_y, desc


def _download(path: str):
  """One attempt, short socket timeout; writes ``path`` only if complete and md5-correct."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  part = path + ".part"
  start = time.time()
  try:
    with urllib.request.urlopen(URL, timeout=DOWNLOAD_TIMEOUT_S) as r, open(part, "wb") as f:
      shutil.copyfileobj(r, f, 1 << 20)
  except OSError as e:  # URLError, timeouts and HTTP errors are OSErrors.
    if os.path.exists(part):
      os.remove(part)
    raise _SourceUnavailable(f"download of {URL} failed after {time.time() - start:.0f} s "
                             f"({type(e).__name__}: {e})") from e
  got = _md5(part)
  if got != ARCHIVE_MD5:
    os.remove(part)
    raise ValueError(f"downloaded {URL} has md5 {got}, expected {ARCHIVE_MD5}; not kept.")
  os.replace(part, path)


def _missing_message(data_dir: str, tried: list[str]) -> str:
  lines = [f"CIFAR-10 not found for data_dir={data_dir}. Tried:"]
  lines += [f"  - {t}" for t in tried]
  lines.append("Provide it in one of these ways (then pass --config.data.data_dir=DIR, here "
               f"DIR = {data_dir}):")
  lines.append(f"  1. the python batches DIR/{BATCHES_DIR}/ (data_batch_1..5, test_batch). In "
               f"this project a JPEG-substitute copy is built in ~10 s with `{MAKE_BATCHES} DIR` "
               "(run from the repository root; needs numpy and Pillow; lossy, accuracies a few "
               "points low).")
  lines.append(f"  2. the official archive DIR/{ARCHIVE} (md5 {ARCHIVE_MD5}) from {URL}; it is "
               "md5-checked and extracted. With internet, load_cifar10(..., download=True) "
               "(--config.data.download=True) fetches it.")
  lines.append("  3. TFDS cifar10 in array_record format under DIR: `pip install tensorflow` then "
               "`tfds build cifar10 --data_dir=DIR --file_format=array_record` (reading it needs "
               "no TensorFlow).")
  return "\n".join(lines)


def load_cifar10(data_dir: str, source: str = "auto", num_valid: int = 5000,
                 download: bool = False) -> ImageData:
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
    download: allow one download attempt of the official archive (20 s socket
      timeout, no retries).

  Returns:
    An :class:`ImageData`; mean/std are from the training part only.

  Raises:
    FileNotFoundError: no source has the data; the message lists every source
      and path tried, why each failed, and how to provide the data.
    ValueError: a present file is corrupt (pickle, shapes, labels, md5), or a
      bad ``source`` / ``num_valid``.
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
        loaded = _load_archive(data_dir, download, tried)
    except _SourceUnavailable as e:
      tried.append(f"{name}: {e}")
      continue
    x, y, test_x, test_y, desc = loaded
    return split_train_valid(x, y, test_x, test_y, num_valid, desc)
  raise FileNotFoundError(_missing_message(data_dir, tried))


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
