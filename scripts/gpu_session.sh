#!/usr/bin/env bash
# One GPU-session stage per device call (each fits the device tool's 10-minute limit); see BENCHMARKS.md.
#
#   bash scripts/gpu_session.sh STAGE [ARGS...]
#
# The two prepared sessions (one device call each; python -m omni_fast.bench.session, see BENCHMARKS.md):
#   first-light [--dry-run] [--steps N,M] [--time-scale F]
#                       ~8 min: versions/device, static sm_90a check, tests/gpu_first_light.txt, the quick bench
#                       of moe/attention/mtp/code2wav/rope with all peers and the two ceilings, the full-shape
#                       pipeline at concurrency 1 and 4, the cost-model calibration; each step time-boxed, all
#                       of it in $OUT/first-light.tar.gz + $OUT/summary.{json,md}. --dry-run: the CPU wiring check
#   second-light [--dry-run]
#                       ~6.5 min, after a clean first light: MoE tuning N=768 and 384 (reduced T grid and search),
#                       compute-sanitizer memcheck over tests/gpu_memcheck.txt, then the fp8 block-scaled experts'
#                       tuning N=768 and 384 (same grid, sm_90a static prune)
#
# Single stages (run from the repository root on the GPU machine; logs and results go under $OUT, default ./gpu_out):
#   env                 versions, GPU (the two ceilings are measured by the bench itself)
#   static              the sm_90a static check with the image's Triton (first: a compile failure shows in seconds)
#   tests [PYTEST...]   the gpu-marked tests natively (bf16, CuPy CUDA C++, CUDA graphs, real shapes), 8 workers;
#                       the rest of the suite is CPU/interpreter-designed and runs in CI
#   sanitize [K...]     compute-sanitizer memcheck over each kernel family's small-shape gpu tests (racecheck for
#                       the shared-memory kernels), one family per K (default: all); graph and real-shape tests are
#                       left out (capture with the caching allocator off fails; 10-100x slower kernels)
#   smoke [OPS...]      python -m omni_fast.bench OPS --preset smoke: every provider once at tiny shapes on the GPU (no
#                       timing), the pre-flight that catches device-only provider bugs before `bench`
#   bench [OPS...]      python -m omni_fast.bench OPS --preset full  (results under $OUT/results/<device>/)
#   tune [N...]         bench/tune_moe.py for the given expert intermediate sizes (default 768 384 192);
#                       TUNE_FORMAT=fp8_block|fp8_channel|int4_w4a16 tunes the quantized experts instead
#   pipeline [ARGS...]  python -m omni_fast.bench.cases.pipeline (concurrency 1, 4, 6)
#
# Set-up without a package index: the image's python3 already has torch, triton, transformers, cupy, pytest,
# hypothesis, pytest-benchmark, pytest-xdist; omni-fast itself is installed editable with --no-deps, and carried
# peer wheels (.whl/, `make peer-wheels`) go to /tmp/site. Nothing here changes the GPU's settings.
set -uo pipefail
STAGE=${1:?stage: first-light|second-light|env|static|tests|sanitize|smoke|bench|tune|pipeline}
shift
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # (it went on to pip-install omni-fast into that python and failed on its setuptools, far from the cause)
  echo "gpu_session.sh: $PY cannot import torch; set PYTHON to a python that has torch (e.g. PYTHON=.venv/bin/python," \
    "the one make setup creates)" >&2
  exit 2
fi
if ! "$PY" -c "import omni_fast.kernels" >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$OUT/install.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

case "$STAGE" in
  first-light|second-light)
    exec "$PY" -m omni_fast.bench.session "$STAGE" --out "$OUT" "$@"
    ;;
  env)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/env.txt"
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"
    ;;
  static)
    "$PY" -m omni_fast.bench.static_check 2>&1 | tee "$OUT/static.log" | tail -30
    exit "${PIPESTATUS[0]}"
    ;;
  tests)
    "$PY" -m pytest -q -ra -n 8 -m gpu -p no:cacheprovider tests "$@" 2>&1 | tee "$OUT/tests.log" | tail -40
    exit "${PIPESTATUS[0]}"
    ;;
  sanitize)
    # memcheck needs the caching allocator off to see out-of-bounds accesses inside pooled blocks.
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    families=("$@")
    [ ${#families[@]} -eq 0 ] && families=(rope moe attention sampling mtp code2wav)
    rc=0
    for f in "${families[@]}"; do
      tool=memcheck
      case "$f" in attention|moe|code2wav) tool=racecheck ;; esac
      for t in memcheck $([ "$tool" = racecheck ] && echo racecheck); do
        echo "== $f: $t"
        compute-sanitizer --tool "$t" --error-exitcode 99 --target-processes all \
          "$PY" -m pytest -q -x -m gpu -k "$f and not graph and not real" -p no:cacheprovider tests >"$OUT/sanitize_${f}_${t}.log" 2>&1
        r=$?; tail -3 "$OUT/sanitize_${f}_${t}.log"; [ $r -ne 0 ] && rc=$r
      done
    done
    exit $rc
    ;;
  smoke)
    "$PY" -m omni_fast.bench "$@" --preset smoke 2>&1 | tee "$OUT/smoke.log" | tail -60
    exit "${PIPESTATUS[0]}"
    ;;
  bench)
    "$PY" -m omni_fast.bench "$@" --preset full --out "$OUT/results" 2>&1 | tee "$OUT/bench_$(IFS=_; echo "${*:-all}").log" | tail -60
    exit "${PIPESTATUS[0]}"
    ;;
  tune)
    ns=("$@"); [ ${#ns[@]} -eq 0 ] && ns=(768 384 192)
    "$PY" -m omni_fast.bench.tune_moe --n "${ns[@]}" ${TUNE_FORMAT:+--format "$TUNE_FORMAT"} --out-dir "$OUT/configs" \
      2>&1 | tee "$OUT/tune${TUNE_FORMAT:+_$TUNE_FORMAT}.log" | tail -30
    exit "${PIPESTATUS[0]}"
    ;;
  pipeline)
    "$PY" -m omni_fast.bench.cases.pipeline --out "$OUT/results" "$@" 2>&1 | tee "$OUT/pipeline.log" | tail -40
    exit "${PIPESTATUS[0]}"
    ;;
  *) echo "unknown stage $STAGE"; exit 2 ;;
esac
