#!/usr/bin/env bash
# The package as a user installs it: `pip wheel .` and `pip install .` (isolated builds), each installed into a fresh
# venv with the local torch, then `python -m omni_fast.selftest` (one op per family vs the reference) run from
# outside the repository, so nothing of the source tree is on the path.
#   bash scripts/test_wheel.sh [PYTHON]     (PYTHON: the project venv's, to learn the torch to use)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${1:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)")
TORCH_DIR=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
VENV_ARGS=()
case "$TORCH_DIR" in
  "$REPO"/*) ;;                                    # torch lives in the project venv: install the same one
  *) VENV_ARGS=(--system-site-packages) ;;         # a GPU image's torch: let the fresh venv see it
esac
"$PY" -m venv "${VENV_ARGS[@]}" "$WORK/venv"
VPY="$WORK/venv/bin/python"
PIP=("$VPY" -m pip install -q --disable-pip-version-check)
echo "torch==${TORCH_VERSION%%+*}" >"$WORK/constraints.txt"
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "${PIP[@]}" "torch==${TORCH_VERSION%%+*}"        # the local CPU wheel on the project's machines
fi

# Built from a copy of the tree (what a clean clone holds: the files git tracks or would add, not the venvs, caches
# and build folders): setuptools' scratch folder (.pybuild, setup.py) then starts empty and is not shared with the
# suite's own wheel test, which scripts/test_all.sh runs at the same time. The list comes from git (the suite keeps
# writing caches: a plain tar of the tree could see a file change or vanish); a file listed but gone is skipped.
SRC="$WORK/src"
mkdir -p "$SRC"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$REPO" ls-files -z --cached --others --exclude-standard >"$WORK/files"
  # exit 1 is tar's "a file changed as we read it" (a listed file the suite rewrites): the copy is still whole
  tar -C "$REPO" --null --ignore-failed-read -T "$WORK/files" -cf "$WORK/src.tar" || [ $? -eq 1 ]
  tar -C "$SRC" -xf "$WORK/src.tar"
else
  tar -C "$REPO" --exclude=./.venv --exclude=./.compat --exclude=./.pybuild --exclude=./build --exclude=./dist \
    --exclude=./.whl --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis \
    --exclude=.benchmarks -cf - . | tar -C "$SRC" -xf -
fi
echo "[wheel] pip wheel ."
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$WORK/dist" "$SRC"
WHEEL=$(ls "$WORK"/dist/omni_fast-*.whl)
echo "[wheel] built $(basename "$WHEEL"); installing it into a fresh venv"
"${PIP[@]}" -c "$WORK/constraints.txt" "$WHEEL"
(cd "$WORK" && "$VPY" -m omni_fast.selftest)
(cd "$WORK" && "$VPY" -c "import omni_fast.bench.static_check, omni_fast.kernels.cuda_rope as c; assert c.SOURCE.is_file(), c.SOURCE")
(cd "$WORK" && "$WORK/venv/bin/omni-fast" --help >/dev/null)

echo "[wheel] pip install . (from the source tree's copy)"
"${PIP[@]}" --no-deps --force-reinstall "$SRC"
(cd "$WORK" && "$VPY" -m omni_fast.selftest)
echo "[wheel] PASS: pip wheel . and pip install . both install a working package"
