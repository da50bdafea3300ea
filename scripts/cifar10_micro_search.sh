#!/usr/bin/env bash
# ENAS micro search on CIFAR-10 (the original's scripts/cifar10_micro_search.sh), then derive.
# Hyperparameters live in configs/cifar_micro.py (search variant); extra flags pass through,
# e.g. scripts/cifar10_micro_search.sh --config.data.data_dir=/data/cifar10 --workdir=runs/micro
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m enas_jax.main --config=configs/cifar_micro.py:search "$@"
