#!/usr/bin/env bash
# Random-search baseline: the same shared training and derive as cifar10_macro_search.sh,
# with arcs drawn uniformly instead of by the controller.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m enas_jax.main --config=configs/cifar_macro.py:search --config.search.sampler=uniform \
  --workdir=runs/cifar_macro_random_search "$@"
