"""kernels/cuda builds with nvcc for sm_90a: the CMake library (compile and link only) exports the C ABI of
omni_fast_cuda.h, and each .cu compiles on its own. Needs nvcc and cmake, not a GPU; skipped without them."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "kernels" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
# Every launcher declared in the header must be exported by the library.
EXPORTED = ["omni_fast_mrope_bf16", "omni_fast_mrope_fp16", "omni_fast_mrope_fp32"]

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@needs_nvcc
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_builds_shared_library_with_c_abi(tmp_path):
    build = tmp_path / "build"
    _run(["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", str(build), "-j", "2"])
    lib = build / "libomni_fast_cuda.so"
    assert lib.is_file()
    symbols = _run(["nm", "-D", "--defined-only", str(lib)])
    for name in EXPORTED:
        assert f" T {name}\n" in symbols, f"{name} not exported by {lib.name}"
    header = (CUDA_DIR / "omni_fast_cuda.h").read_text()
    assert all(f"int {name}(" in header for name in EXPORTED)


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_each_source_compiles_for_sm90a(source, tmp_path):
    _run(["nvcc", "--std=c++17", "-arch=sm_90a", "-c", str(source), "-o", str(tmp_path / "out.o")])


def test_cmake_defaults_to_sm90a_before_project():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert text.index("set(CMAKE_CUDA_ARCHITECTURES 90a") < text.index("project(omni_fast")
