#!/usr/bin/env bash
# GPU check: every space's benchmark rows on one GPU, float32 and bfloat16,
# op_select switch and mask, in under 8 minutes; JSON rows into a folder.
#
#   tools/gpu_check.sh [OUT_DIR] [WHEELS_DIR]
#
# OUT_DIR: where the rows go (default: $OUT if set, else runs/gpu_check). Per
#   run: <space>_<dtype>_<op_select>.jsonl (the benchmark's JSON lines), a .log
#   of its stderr, env.txt (GPU, jax, versions) and summary.txt (what ran, what
#   failed, seconds each).
# WHEELS_DIR: a folder of wheels installed with `pip install --no-index
#   --no-deps --target` into OUT_DIR/deps, for machines that cannot reach a
#   package registry. The benchmark needs jax (with CUDA), flax, optax,
#   orbax-checkpoint, absl-py, numpy and ml-collections (+ PyYAML); it needs no
#   tensorboardX and no tensorflow-datasets. Make the folder on a connected
#   machine, e.g.  pip download --no-deps -d wheels ml-collections==1.1.0 PyYAML
#   (PyYAML's wheel must match the GPU machine's Python).
#
# The checkout is put on PYTHONPATH (no install). Sizes are the smoke configs'
# (small networks, synthetic data) so that the 24 rows, each in its own process
# with its own compilation, fit the time limit; ENAS_GPU_CHECK_SIZE=full runs
# the spaces' real search sizes instead (much longer). ENAS_GPU_CHECK_STEPS sets
# the timed steps per row (default 20), ENAS_GPU_CHECK_SPACES the spaces (default
# "ptb cifar_macro cifar_micro"). A row that fails is recorded in
# summary.txt and the check goes on; the exit status is 1 if any row failed.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/runs/gpu_check}}"
WHEELS="${2:-}"
SIZE="${ENAS_GPU_CHECK_SIZE:-smoke}"
STEPS="${ENAS_GPU_CHECK_STEPS:-20}"
BUDGET_S="${ENAS_GPU_CHECK_BUDGET_S:-450}"  # stop starting rows after this many seconds
PY="${PYTHON:-python3}"

case "$SIZE" in
  smoke) VARIANT=":smoke" ;;
  full) VARIANT="" ;;
  *) echo "ENAS_GPU_CHECK_SIZE must be smoke or full, got '$SIZE'" >&2; exit 2 ;;
esac
mkdir -p "$OUT_DIR" || { echo "cannot create $OUT_DIR" >&2; exit 2; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "$WHEELS" ]; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "WHEELS_DIR '$WHEELS' holds no .whl files" >&2; exit 2
  fi
  "$PY" -m pip install --quiet --no-index --no-deps --target "$OUT_DIR/deps" "$WHEELS"/*.whl \
    || { echo "pip install --target $OUT_DIR/deps failed" >&2; exit 2; }
  export PYTHONPATH="$OUT_DIR/deps:$PYTHONPATH"
fi

missing=$("$PY" - <<'EOF'
import importlib.util
need = ["jax", "flax", "optax", "orbax.checkpoint", "absl", "numpy", "ml_collections", "yaml"]
print(" ".join(m for m in need if importlib.util.find_spec(m.split(".")[0]) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "missing Python modules: $missing (pass a WHEELS_DIR with their wheels; see the header)" >&2
  exit 2
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  else
    echo "no nvidia-smi"
  fi
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__); print('backend', jax.default_backend(), jax.devices())" 2>&1
  git -C "$ROOT" log -1 --format="commit %H %s" 2>/dev/null || true
  echo "size $SIZE, steps $STEPS"
} > "$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt"

SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
FAILED=0

# run NAME ARGS...: one benchmark invocation, its JSON lines to NAME.jsonl.
run() {
  local name="$1"; shift
  local now=$(( $(date +%s) - START ))
  if [ "$now" -ge "$BUDGET_S" ]; then
    echo "$name skipped (time budget ${BUDGET_S}s spent)" | tee -a "$SUMMARY"; return
  fi
  local t0=$(date +%s)
  local deadline=$(( START + BUDGET_S + 60 ))
  # In a session of its own, so that a timeout also stops the rows' subprocesses.
  setsid "$PY" -m enas_jax.benchmark "$@" --steps="$STEPS" \
    > "$OUT_DIR/$name.out" 2> "$OUT_DIR/$name.log" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "timed out" >> "$OUT_DIR/$name.log"
      kill -TERM -- "-$pid" 2>/dev/null; sleep 3; kill -KILL -- "-$pid" 2>/dev/null
      break
    fi
    sleep 1
  done
  wait "$pid"
  local rc=$?
  grep '^{' "$OUT_DIR/$name.out" > "$OUT_DIR/$name.jsonl" || true
  rm -f "$OUT_DIR/$name.out"
  local status="ok"
  if [ "$rc" -ne 0 ]; then status="FAILED (exit $rc, see $name.log)"; FAILED=1; fi
  echo "$name $status $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
}

for space in ${ENAS_GPU_CHECK_SPACES:-ptb cifar_macro cifar_micro}; do
  for dtype in float32 bfloat16; do
    common=(--config="$ROOT/configs/$space.py$VARIANT" --config.child.compute_dtype="$dtype")
    # switch: all rows (shared, fixed, shared on the fixed arc, their ratio).
    run "${space}_${dtype}_switch" "${common[@]}" --config.child.op_select=switch
    # mask: only the shared step depends on it.
    run "${space}_${dtype}_mask" "${common[@]}" --config.child.op_select=mask --row=shared
  done
done

echo "total $(( $(date +%s) - START ))s; rows in $OUT_DIR" | tee -a "$SUMMARY"
exit "$FAILED"
