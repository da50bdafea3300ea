#!/usr/bin/env bash
# Train one PTB cell from scratch (the original's scripts/ptb_final.sh) and report
# test perplexity. Default arc: the paper's cell. Another arc:
#   scripts/ptb_final.sh --config.arc="0 0 0 1 1 2 ..."   or
#   scripts/ptb_final.sh --config.arc_file=runs/ptb_search/best_arc.txt
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m enas_jax.main --config=configs/ptb.py:final "$@"
