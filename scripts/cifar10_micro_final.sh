#!/usr/bin/env bash
# Trains a micro architecture from scratch (the original's scripts/cifar10_micro_final.sh).
# Default arc: the paper's. Another one: --config.arc="..." or --config.arc_file=runs/.../best_arc.txt
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m enas_jax.main --config=configs/cifar_micro.py:final "$@"
