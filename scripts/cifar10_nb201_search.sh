#!/usr/bin/env bash
# ENAS on the NAS-Bench-201 cell space, CIFAR-10 (the benchmark's ENAS baseline settings), then derive.
# Hyperparameters live in configs/cifar_nb201.py (search variant); extra flags pass through,
# e.g. scripts/cifar10_nb201_search.sh --config.data.data_dir=/data/cifar10 --workdir=runs/nb201
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m enas_jax.main --config=configs/cifar_nb201.py:search "$@"
