"""Datasets: Penn Treebank, a synthetic language-model corpus, CIFAR-10 and synthetic images."""

from __future__ import annotations

import os

from enas_jax.data.cifar10 import (ImageData, augment, default_cifar10_dir, load_cifar10,
                                   normalize, synthetic_cifar)
from enas_jax.data.ptb import PTB_FILES, Corpus, batchify, load_ptb, num_windows, tokenize
from enas_jax.data.synthetic import synthetic_corpus

SOURCES = ("ptb", "synthetic", "cifar10")  # "synthetic" serves both tasks (corpus or images).

__all__ = ["PTB_FILES", "SOURCES", "Corpus", "ImageData", "augment", "batchify",
           "default_cifar10_dir", "default_ptb_dir", "load", "load_cifar10", "load_corpus",
           "load_images", "load_ptb", "normalize", "num_windows", "synthetic_cifar",
           "synthetic_corpus", "tokenize"]


def default_ptb_dir() -> str:
  """First existing of ``$ENAS_JAX_DATA/ptb`` and ``./data/ptb`` (relative to the
  working directory); ``data/ptb`` when neither exists."""
  local = os.path.join("data", "ptb")
  candidates = [local]
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
  if source == "cifar10":
    raise ValueError("data source 'cifar10' holds images, not a corpus: use load_images().")
  raise ValueError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}.")


def load_images(data_cfg) -> ImageData:
  """Builds the image data set that ``data_cfg.source`` names.

  ``"cifar10"`` calls :func:`load_cifar10` with ``data_cfg.data_dir``
  (:func:`default_cifar10_dir` if empty), ``num_valid`` (default 5000),
  ``download`` (default True, as in the CIFAR configs), ``download_url``
  (default: the official URL) and ``cifar10_source`` (default ``"auto"``);
  ``"synthetic"`` calls :func:`synthetic_cifar` with ``num_train``,
  ``num_test``, ``seed`` and ``num_valid``. Missing optional fields take the
  defaults shown.
  """
  source = data_cfg.source
  get = lambda name, default: getattr(data_cfg, name, default)
  if source == "cifar10":
    return load_cifar10(data_cfg.data_dir or default_cifar10_dir(),
                        source=get("cifar10_source", "auto"), num_valid=get("num_valid", 5000),
                        download=get("download", True),
                        download_url=get("download_url", "") or "")
  if source == "synthetic":
    return synthetic_cifar(num_train=get("num_train", 512), num_test=get("num_test", 128),
                           seed=get("seed", 0), num_valid=get("num_valid", 0))
  raise ValueError(f"unknown image data source {source!r}; valid: cifar10, synthetic.")


# The loaders by the kind of data a search space trains on (its registry entry's
# ``dataset``); ``data.source`` then names the data set.
LOADERS = {"corpus": load_corpus, "images": load_images}


def load(kind: str, data_cfg):
  """``LOADERS[kind](data_cfg)``: ``"corpus"`` (:func:`load_corpus`) or
  ``"images"`` (:func:`load_images`)."""
  if kind not in LOADERS:
    raise ValueError(f"unknown kind of data {kind!r}; valid: {', '.join(LOADERS)}.")
  return LOADERS[kind](data_cfg)
