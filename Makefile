# omni-fast: `make demo` runs the main job, `make test` runs the tests (each creates or reuses .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.omni-fast-installed

.PHONY: setup demo bench test test-gpu static cuda-lib peer-wheels clean

setup: $(STAMP)

$(STAMP): setup.py requirements-dev.txt scripts/setup_env.sh
	PYTHON=$(PYTHON) bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

demo: setup
	$(PY) -m omni_fast demo

bench: setup
	$(PY) -m omni_fast.bench

# The whole suite: kernels vs references (Triton interpreter on a CPU, native on a GPU), references vs
# transformers, the sm_90a static check and the CMake/nvcc build of kernels/cuda; then the transformers-facing
# tests again on the GPU image's transformers, and the static check compiled by its Triton (scripts/test_compat.sh).
test: setup
	$(PY) -m pytest -q -ra tests
	bash scripts/test_compat.sh $(PY)

# Only the GPU-marked tests (bf16, CUDA C++ through CuPy, CUDA graphs, real shapes); they skip without CUDA.
test-gpu: setup
	$(PY) -m pytest -q -ra -m gpu tests

static: setup
	$(PY) -m omni_fast.bench.static_check

# Third-party peers for the GPU benchmark, as wheels in .whl/ (carried to the GPU machine; see BENCHMARKS.md).
peer-wheels:
	bash scripts/peer_wheels.sh

cuda-lib:
	cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j 2

clean:
	rm -rf build .pytest_cache
