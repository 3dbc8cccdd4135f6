#!/usr/bin/env bash
# Download the benchmark's third-party peers (bench/peers.py: PEER_WHEELS) as wheels into .whl/, for carrying to a
# GPU machine that has no package index. Pure-Python wheels only: nothing here pulls torch or CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
# PEER_WHEELS is read with ast (no torch needed to run this script).
specs=$("$PY" - <<'PYEOF'
import ast
tree = ast.parse(open("bench/peers.py").read())
for node in tree.body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PEER_WHEELS":
        print(" ".join(f"{k}=={v}" for k, v in ast.literal_eval(node.value).items()))
PYEOF
)
# shellcheck disable=SC2086
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $specs
ls -l .whl
