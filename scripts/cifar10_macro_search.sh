#!/usr/bin/env bash
# ENAS macro search on CIFAR-10 (the original's scripts/cifar10_macro_search.sh), then derive.
# Hyperparameters live in configs/cifar_macro.py (search variant); extra flags pass through,
# e.g. scripts/cifar10_macro_search.sh --config.data.data_dir=/data/cifar10 --workdir=runs/macro
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m enas_jax.main --config=configs/cifar_macro.py:search "$@"
