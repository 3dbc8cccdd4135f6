#!/usr/bin/env bash
# The versions of the GPU image, next to (not over) the venv's newer ones, installed with --no-deps into .compat/:
# - the transformers-facing tests against its transformers (requirements-compat.txt);
# - the sm_90a static check compiled by its Triton (TRITON_COMPAT below): register use and spills differ between
#   Triton versions, and the GPU sessions compile with this one; before it, tests/test_gpu_api.py with that Triton
#   (the launch options, compiled-kernel fields and helpers that only GPU code paths use).
#   bash scripts/test_compat.sh [PYTHON]
# Without network (nothing to install and none installed before) it says so and exits 0: the main suite has run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
TRITON_COMPAT=${TRITON_COMPAT:-triton==3.6.0}

# install_once DIR PIP_ARGS...: pip install --no-deps --target DIR (kept while DIR/.ok exists); fails when offline
install_once() {
  local dir=$1
  shift
  [ -f "$dir/.ok" ] && return 0
  rm -rf "$dir"
  if ! "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$dir" "$@"; then
    rm -rf "$dir"
    return 1
  fi
  touch "$dir/.ok"
}

DIR=.compat/$(sha1sum requirements-compat.txt | cut -c1-12)
if ! install_once "$DIR" -r requirements-compat.txt; then
  echo "[compat] could not install requirements-compat.txt (offline?): transformers-compat tests NOT run"
  exit 0
fi
VERSION=$(PYTHONPATH="$DIR" "$PY" -c "import transformers; print(transformers.__version__)")
echo "[compat] transformers $VERSION"
# minus the tests marked hf_free (kernels against omni-fast's own reference: the same under any transformers; the
# mark is checked by tests/test_compat_selection.py)
# OMNI_FAST_COMPAT_PART=1: tests/test_bench_smoke.py calls only the providers that run transformers' code where the
# others run omni-fast's alone (its COMPAT_PROVIDERS; the balance part of scripts/test_all.sh calls them all)
OMNI_FAST_COMPAT_PART=1 PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -ra -p no:cacheprovider \
  --durations=25 -m 'not hf_free' tests/test_patch.py tests/test_patch_extra.py tests/test_pipeline.py \
  tests/test_pipeline_requests.py \
  tests/test_text_decoder.py tests/test_mtp.py \
  tests/test_encoder_varlen.py tests/test_hf_attention.py tests/test_moe_transformers.py tests/test_demo.py \
  tests/test_positions.py tests/test_moe_reference.py tests/test_bench_smoke.py \
  tests/test_bigvgan.py tests/test_dit.py tests/test_token2wav.py tests/test_quant_loading.py \
  tests/test_patch_qwen25.py tests/test_pipeline_qwen25.py tests/test_fused_step.py tests/test_patch_qwen3_talker.py \
  tests/test_graph_bodies.py tests/test_docs.py tests/test_reliability_checkpoint.py tests/test_reliability_models.py \
  tests/test_reliability_lifecycle.py tests/test_pipeline_serving.py \
  tests/test_packaging.py::test_cache_keyword_matches_installed_transformers \
  tests/test_packaging.py::test_patch_refuses_an_old_transformers

TDIR=.compat/${TRITON_COMPAT//[^A-Za-z0-9.]/_}
if ! install_once "$TDIR" "$TRITON_COMPAT"; then
  echo "[compat] could not install $TRITON_COMPAT (offline?): static check with it NOT run"
  exit 0
fi
echo "[compat] sm_90a static check with $(PYTHONPATH="$TDIR" "$PY" -c 'import triton; print("triton", triton.__version__)')"
# the Triton APIs only GPU paths use (launch options, compiled-kernel fields, host-side helpers): this Triton has them
PYTHONPATH="$TDIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_gpu_api.py
PYTHONPATH="$TDIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m omni_fast.bench.static_check | grep -v " ok$"
