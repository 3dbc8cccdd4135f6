# omni-fast: `make demo` runs the main job, `make test` runs the tests (each creates or reuses .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.omni-fast-installed

.PHONY: setup demo bench test test-gpu static selftest cuda-lib peer-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py requirements-dev.txt scripts/setup_env.sh
	PYTHON=$(PYTHON) bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

demo: setup
	$(PY) -m omni_fast demo

bench: setup
	$(PY) -m omni_fast.bench

# The whole suite: kernels vs references (Triton interpreter on a CPU, native on a GPU), references vs
# transformers, the sm_90a static check and the CMake/nvcc build of kernels/cuda; beside it (second core, printed
# after the suite: scripts/test_all.sh) the transformers-facing tests again on the GPU image's transformers and the
# static check compiled by its Triton (scripts/test_compat.sh), then the package as a user installs it
# (scripts/test_wheel.sh: pip wheel . and pip install . into a fresh venv, selftest from outside the repository).
# The versions used are printed first (the newest pip resolved). OMNI_FAST_TEST_SERIAL=1: one part after another.
test: setup
	$(PY) scripts/print_versions.py
	bash scripts/test_all.sh $(PY)

# Only the GPU-marked tests (bf16, CUDA C++ through CuPy, CUDA graphs, real shapes); they skip without CUDA.
test-gpu: setup
	$(PY) -m pytest -q -ra -m gpu tests

static: setup
	$(PY) -m omni_fast.bench.static_check

# One op per family against the reference: does this installation work?
selftest: setup
	$(PY) -m omni_fast.selftest

# Third-party peers for the GPU benchmark, as wheels in .whl/ (carried to the GPU machine; see BENCHMARKS.md).
peer-wheels:
	bash scripts/peer_wheels.sh

cuda-lib:
	cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j 2

clean:
	rm -rf build dist *.egg-info .pytest_cache
