"""Datasets: Penn Treebank and a synthetic language-model corpus."""

from __future__ import annotations

import os

from enas_jax.data.ptb import PTB_FILES, Corpus, batchify, load_ptb, num_windows, tokenize
from enas_jax.data.synthetic import synthetic_corpus

SOURCES = ("ptb", "synthetic")  # "cifar10" to come.

__all__ = ["PTB_FILES", "SOURCES", "Corpus", "batchify", "default_ptb_dir", "load_corpus",
           "load_ptb", "num_windows", "synthetic_corpus", "tokenize"]


def default_ptb_dir() -> str:
  """First existing of ``$ENAS_JAX_DATA/ptb``, ``./data/ptb``, ``../shared/data/ptb``.

  Relative paths are relative to the working directory; falls back to
  ``data/ptb`` when none exists.
  """
  local = os.path.join("data", "ptb")
  candidates = [local, os.path.join("..", "shared", "data", "ptb")]
  if os.environ.get("ENAS_JAX_DATA"):
    candidates.insert(0, os.path.join(os.environ["ENAS_JAX_DATA"], "ptb"))
  return next((c for c in candidates if os.path.isdir(c)), local)


def load_corpus(data_cfg) -> Corpus:
  """Builds the corpus that ``data_cfg.source`` names.

  ``"ptb"`` reads ``data_cfg.data_dir`` (:func:`default_ptb_dir` if empty);
  ``"synthetic"`` reads ``vocab_size``, ``num_train_tokens``,
  ``num_valid_tokens``, ``num_test_tokens`` and ``seed``.
  """
  source = data_cfg.source
  if source == "ptb":
    return load_ptb(data_cfg.data_dir or default_ptb_dir())
  if source == "synthetic":
    return synthetic_corpus(
        vocab_size=data_cfg.vocab_size, num_train=data_cfg.num_train_tokens,
        num_valid=data_cfg.num_valid_tokens, num_test=data_cfg.num_test_tokens,
        seed=data_cfg.seed)
  raise ValueError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}.")
