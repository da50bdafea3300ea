"""Penn Treebank (Mikolov's language-modeling version): loading and batching.

Tokenisation and vocabulary follow enas_lm's ``process.py``; the batch layout
follows its ``data_utils.input_producer`` (row-major "batchify").

Loading all three real files (1.09M tokens) takes about 0.2 s, so nothing is
cached.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

PTB_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
EOS = "<eos>"
UNK = "<unk>"


@dataclasses.dataclass
class Corpus:
  """A tokenised corpus: three int32 id streams and the id -> word table."""
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  vocab: list[str]
  name: str = ""

  def __post_init__(self):
    for split in ("train", "valid", "test"):
      setattr(self, split, np.asarray(getattr(self, split), np.int32).reshape(-1))

  @property
  def vocab_size(self) -> int:
    """Number of distinct token ids."""
    return len(self.vocab)


def tokenize(text: str) -> list[str]:
  """Splits a PTB-style text into tokens, one ``<eos>`` per line.

  As ``process.py``: strip the whole text, turn every newline into ``<eos>``,
  split on single spaces, append a final ``<eos>``. The newline becomes
  ``" <eos> "`` and empty strings are dropped, so ``<eos>`` is a separate token
  even where a line does not end in a space; on the PTB files (every line is
  `` w1 ... wn \\n``) this gives exactly the original token list. ``\\r\\n`` is
  read as ``\\n``.
  """
  text = text.replace("\r\n", "\n").strip()
  tokens = [t for t in text.replace("\n", f" {EOS} ").split(" ") if t]
  return tokens + [EOS]


def _read_tokens(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if not text.strip():
    raise ValueError(f"PTB file {path} is empty (or only whitespace).")
  return tokenize(text)


def load_ptb(data_dir: str) -> Corpus:
  """Loads ``ptb.{train,valid,test}.txt`` from ``data_dir`` into a :class:`Corpus`.

  The vocabulary is the sorted set of train tokens (``<eos>`` = 43 and
  ``<unk>`` = 44 on the real files). A valid/test word missing from it maps to
  ``<unk>`` if the vocabulary has one, else a ValueError is raised.

  Raises:
    FileNotFoundError: if any of the three files is missing; the message says
      which, where it looked, and how to get them.
    ValueError: for an empty file or an out-of-vocabulary word with no ``<unk>``.
  """
  root = os.path.abspath(os.path.expanduser(str(data_dir)))
  missing = [f for f in PTB_FILES if not os.path.isfile(os.path.join(root, f))]
  if missing:
    where = root if os.path.isdir(root) else f"{root} (directory does not exist)"
    raise FileNotFoundError(
        f"PTB data not found: missing {', '.join(missing)} in {where}. Expected "
        f"{', '.join(PTB_FILES)}: Mikolov's PTB language-modeling files, found in "
        "the data/ folder of the `simple-examples` archive (simple-examples.tgz). "
        "Copy them into that directory, or point to another one with "
        "--config.data.data_dir=/path/to/ptb.")
  train, valid, test = (_read_tokens(os.path.join(root, f)) for f in PTB_FILES)
  vocab = sorted(set(train))
  word_to_id = {w: i for i, w in enumerate(vocab)}
  unk = word_to_id.get(UNK)

  def to_ids(tokens, fname):
    ids = np.fromiter((word_to_id.get(w, -1) for w in tokens), np.int32, len(tokens))
    oov = np.flatnonzero(ids < 0)
    if oov.size:
      if unk is None:
        raise ValueError(f"word {tokens[oov[0]]!r} in {fname} is not in the train "
                         f"vocabulary, which has no {UNK} token to map it to.")
      ids[oov] = unk
    return ids

  return Corpus(train=to_ids(train, PTB_FILES[0]), valid=to_ids(valid, PTB_FILES[1]),
                test=to_ids(test, PTB_FILES[2]), vocab=vocab, name="ptb")


def batchify(tokens, batch_size: int) -> np.ndarray:
  """Cuts a token stream into ``[batch_size, N // batch_size]`` int32, row-major.

  Row ``b`` is the contiguous slice ``tokens[b * n:(b + 1) * n]``; the last
  ``N mod batch_size`` tokens are dropped.
  """
  tokens = np.asarray(tokens).reshape(-1)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if tokens.size < 2 * batch_size:
    raise ValueError(f"{tokens.size} tokens are too few for batch_size {batch_size}: "
                     f"need at least {2 * batch_size} (2 per row).")
  n = tokens.size // batch_size
  return tokens[:batch_size * n].reshape(batch_size, n).astype(np.int32)


def num_windows(row_len: int, bptt: int) -> int:
  """Number of full ``bptt``-long input/target windows in a row: (row_len - 1) // bptt."""
  if bptt < 1:
    raise ValueError(f"bptt must be >= 1, got {bptt}.")
  n = (row_len - 1) // bptt
  if n < 1:
    raise ValueError(f"rows of {row_len} tokens hold no window of bptt={bptt} "
                     f"(need row_len >= bptt + 1 = {bptt + 1}); lower batch_size or bptt.")
  return n
