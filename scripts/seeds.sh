#!/usr/bin/env bash
# Several seeds of a search and of its random-search baseline, then a table
# (mean ± sample std per sampler, per-seed values) in runs/<name>_<variant>_seeds.
# Usage: scripts/seeds.sh CONFIG[:VARIANT] NUM_SEEDS [--baseline=False] [--workdir=DIR] [--config.x=y ...]
# e.g.   scripts/seeds.sh configs/ptb.py:smoke 3
# Rerunning the same command skips finished seeds and resumes unfinished ones.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/seeds.sh CONFIG[:VARIANT] NUM_SEEDS [flags]"
config="${1:?$usage}"
num_seeds="${2:?$usage}"
shift 2
exec python -m enas_jax.seeds --config="$config" --num_seeds="$num_seeds" "$@"
