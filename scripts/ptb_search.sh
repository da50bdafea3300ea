#!/usr/bin/env bash
# ENAS search on Penn Treebank (the original's scripts/ptb_search.sh), then derive.
# Hyperparameters live in configs/ptb.py (search variant); extra flags pass through,
# e.g. scripts/ptb_search.sh --config.search.num_epochs=50 --workdir=runs/ptb_search_50
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m enas_jax.main --config=configs/ptb.py:search "$@"
