#!/usr/bin/env bash
# Trains a NAS-Bench-201 cell from scratch with the benchmark's recipe (200 epochs, batch 256).
# Default arc: the benchmark's ResNet cell. Another one: --config.arc="3 3 3 1 3 3" (or a
# NAS-Bench-201 string '|nor_conv_3x3~0|+|...') or --config.arc_file=runs/.../best_arc.txt
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m enas_jax.main --config=configs/cifar_nb201.py:final "$@"
