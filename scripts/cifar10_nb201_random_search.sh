#!/usr/bin/env bash
# Random-search baseline: the same shared training and derive as cifar10_nb201_search.sh,
# with arcs drawn uniformly instead of by the controller.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m enas_jax.main --config=configs/cifar_nb201.py:search --config.search.sampler=uniform \
  --workdir=runs/cifar_nb201_random_search "$@"
