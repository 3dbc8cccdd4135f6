#!/usr/bin/env bash
# `make test` after the version print: the suite in the foreground and, on the second core, the GPU image's versions
# (scripts/test_compat.sh) then the package as users install it (scripts/test_wheel.sh), logged to a file and printed
# after the suite. Every part runs whatever the others did; the exit status is non-zero when any part failed.
#   bash scripts/test_all.sh [PYTHON]
# Why in parallel: the suite is mostly the single-threaded Triton interpreter, and the compat + wheel parts were ~15
# of the ~35 minutes of a sequential run on 2 cores. The wheel test builds from a copy of the tree (test_wheel.sh), so
# it never shares setuptools' scratch folder with the suite's own wheel test. OMNI_FAST_TEST_SERIAL=1 runs the three
# parts one after another instead (the output is then in order as it comes).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
# Suite files the side part runs last (in this venv), not the suite: compat + wheel took ~12 of the suite's ~21
# minutes, so the second core idled for the rest. These are self-contained (their own subprocesses or compiles,
# counters, tiny models; ~6 min together on one thread); they keep both cores busy to the end. Each part prints its
# time: move a file when one part ends minutes before the other.
BALANCE=(tests/test_static_sm90.py tests/test_gpu_session_dry_run.py tests/test_persistent.py
         tests/test_persistent_watchdog.py tests/test_cost_model.py tests/test_bench_smoke.py tests/test_long_running.py)

side() {  # the compat and wheel parts, then BALANCE; non-zero when any failed
  local rc=0 t0=$SECONDS
  bash scripts/test_compat.sh "$PY" || rc=$?
  echo "[side] compat part: $((SECONDS - t0)) s"; t0=$SECONDS
  bash scripts/test_wheel.sh "$PY" || rc=$?
  echo "[side] wheel part: $((SECONDS - t0)) s"; t0=$SECONDS
  if [ "${1:-}" = balance ]; then
    echo "[side] suite files run here to balance the cores: ${BALANCE[*]}"
    "$PY" -m pytest -q -ra -p no:cacheprovider --durations=25 "${BALANCE[@]}" || rc=$?
    echo "[side] balance part: $((SECONDS - t0)) s"
  fi
  return "$rc"
}

if [ "${OMNI_FAST_TEST_SERIAL:-0}" = 1 ]; then
  rc=0
  "$PY" -m pytest -q -ra --durations=25 tests || rc=$?
  side || rc=$?
  exit "$rc"
fi

LOG=$(mktemp)
SIDE=
# On exit (an interrupted run included) the side part goes too: it runs in its own process group (set -m), killed
# whole; a non-interactive shell would otherwise leave its pytest / pip running after a Ctrl-C.
trap '[ -n "$SIDE" ] && kill -- -"$SIDE" 2>/dev/null; rm -f "$LOG"' EXIT
trap 'exit 130' INT TERM
# One thread for the side part: the suite keeps torch's own thread count (its tensor ops are the multi-threaded part).
set -m
(OMP_NUM_THREADS=1 side balance >"$LOG" 2>&1) &
SIDE=$!
set +m
suite_rc=0
T0=$SECONDS
"$PY" -m pytest -q -ra --durations=25 tests "${BALANCE[@]/#/--ignore=}" || suite_rc=$?
echo "[suite] $((SECONDS - T0)) s"
side_rc=0
wait "$SIDE" || side_rc=$?
SIDE=
echo "==== transformers / Triton of the GPU image (scripts/test_compat.sh), then the wheel (scripts/test_wheel.sh) ===="
cat "$LOG"
echo "==== suite exit status $suite_rc, compat + wheel exit status $side_rc ===="
[ "$suite_rc" -eq 0 ] && [ "$side_rc" -eq 0 ]
