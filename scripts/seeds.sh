#!/usr/bin/env bash
# Several seeds of a search and of its random-search baseline, then a table
# (mean ± sample std per sampler, per-seed values) in runs/<name>_<variant>_seeds.
# Usage: scripts/seeds.sh CONFIG[:VARIANT] NUM_SEEDS [--baseline=False] [--workdir=DIR] [--config.x=y ...]
# e.g.   scripts/seeds.sh configs/ptb.py:smoke 3
# Rerunning the same command skips finished seeds and resumes unfinished ones.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() {
  cat <<'EOF'
usage: scripts/seeds.sh CONFIG[:VARIANT] NUM_SEEDS [--baseline=False] [--workdir=DIR] [--config.KEY=VALUE ...]
  CONFIG[:VARIANT]  config file (first argument, no flag name), e.g. configs/ptb.py or configs/ptb.py:smoke
  NUM_SEEDS         seeds per sampler, 0 .. NUM_SEEDS-1 (second argument), e.g. 5
Runs the search (ENAS) and, unless --baseline=False, the random-search baseline for
every seed, then writes a mean ± std table to runs/<name>_<variant>_seeds (or DIR).
Rerunning the same command skips finished seeds and resumes unfinished ones.
e.g. scripts/seeds.sh configs/ptb.py 5
     scripts/seeds.sh configs/ptb.py:smoke 2 --baseline=False --workdir=runs/seeds_try
EOF
}
case "${1:-}" in
  -h | --help | -help) usage; exit 0 ;;
esac
if [[ $# -lt 2 || "$1" == -* || "$2" == -* ]]; then
  if [[ "${1:-}" == --config=* ]]; then
    n=NUM_SEEDS
    for a in "$@"; do [[ "$a" == --num_seeds=* ]] && n="${a#--num_seeds=}"; done
    echo "error: CONFIG and NUM_SEEDS are the first two arguments, without flag names:" \
         "scripts/seeds.sh ${1#--config=} $n (not --config=... --num_seeds=...)." >&2
  else
    echo "error: scripts/seeds.sh needs CONFIG[:VARIANT] and NUM_SEEDS as its first two" \
         "arguments (got: ${*:-nothing})." >&2
  fi
  usage >&2
  exit 2
fi
config="$1"
num_seeds="$2"
shift 2
exec python -m enas_jax.seeds --config="$config" --num_seeds="$num_seeds" "$@"
