#!/usr/bin/env bash
# Create (or reuse) the virtual environment for omni-fast and install it in editable mode.
#
# - A python that already imports torch (a GPU image, a CUDA workstation) is reused: the venv sees its packages
#   (--system-site-packages) and nothing torch-related is installed over them.
# - Otherwise torch==2.13.0 is installed; on the CPU machines of this project that resolves to the local CPU wheel,
#   so no CUDA torch or nvidia-* wheels are ever pulled here.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] reusing the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU build where no GPU torch is present)"
  "${PIP[@]}" torch==2.13.0
fi
# Never let a dependency replace the torch we have: constrain it to the installed version.
TORCH_VERSION=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
CONSTRAINTS=$(mktemp)
echo "torch==${TORCH_VERSION}" >"$CONSTRAINTS"
"${PIP[@]}" -c "$CONSTRAINTS" -r requirements-dev.txt
"${PIP[@]}" --no-deps --no-build-isolation -e .
rm -f "$CONSTRAINTS"
echo "[setup] ready (cuda: $("$VENV/bin/python" -c 'import torch; print(torch.cuda.is_available())'))"
"$VENV/bin/python" scripts/print_versions.py
