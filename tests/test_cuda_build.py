"""kernels/cuda builds with nvcc for sm_90a: the CMake library (compile and link only) exports the C ABI of
omni_fast_cuda.h, a C program that includes that header links against it, and each .cu compiles on its own. Needs
nvcc and cmake, not a GPU; skipped without them."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "kernels" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
# Every host launcher of the library (the C ABI): exported, and declared by omni_fast_cuda.h.
EXPORTED = ["omni_fast_mrope_bf16", "omni_fast_mrope_fp16", "omni_fast_mrope_fp32",
            "omni_fast_topk_softmax_fp32", "omni_fast_topk_softmax_fp16", "omni_fast_topk_softmax_bf16",
            "omni_fast_moe_align_block_size", "omni_fast_moe_align_num_blocks",
            "omni_fast_sample_launch"]

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("nvcc or cmake not installed")
    build = tmp_path_factory.mktemp("cmake") / "build"
    _run(["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", str(build), "-j", "2"])
    return build


def test_cmake_builds_shared_library_with_c_abi(cmake_build):
    lib = cmake_build / "libomni_fast_cuda.so"
    assert lib.is_file()
    symbols = _run(["nm", "-D", "--defined-only", str(lib)])
    exported = set(re.findall(r" T (omni_fast_\w+)$", symbols, re.M))
    # Exactly the launchers listed above: a new launcher must be added here (and so to the C link test below).
    assert exported == set(EXPORTED), f"exported C symbols differ from EXPORTED: {sorted(exported ^ set(EXPORTED))}"


def _cuda_include_dirs(build: Path) -> list[str]:
    """The CUDA toolkit's include directories, as CMake found them (for cuda_runtime_api.h)."""
    found = []
    for f in build.glob("CMakeFiles/*/CMakeCUDACompiler.cmake"):
        m = re.search(r'set\(CMAKE_CUDA_TOOLKIT_INCLUDE_DIRECTORIES "([^"]*)"\)', f.read_text())
        if m:
            found += [d for d in m.group(1).split(";") if d]
    return found


def test_c_program_including_the_header_links_against_the_library(cmake_build, tmp_path):
    """omni_fast_cuda.h declares every exported launcher, in C: a C99 program that includes only that header and
    takes each launcher's address compiles (-Werror: an undeclared name is an error) and links against the
    library. That the declarations match the definitions is checked by the compiler in the library build itself:
    each .cu that defines launchers includes the header declaring them (tested below), and extern "C" functions
    cannot overload, so a mismatch is a compile error."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "abi.c"
    src.write_text('#include "omni_fast_cuda.h"\n#include <stdio.h>\n\nint main(void) {\n'
                   + "".join(f'  printf("%p\\n", (void *)&{name});\n' for name in EXPORTED)
                   + "  return 0;\n}\n")
    incs = [f"-I{d}" for d in [str(CUDA_DIR)] + _cuda_include_dirs(cmake_build)]
    _run([cc, "-std=c99", "-Wall", "-Werror", "-pedantic", "-Wno-pedantic", *incs, str(src), f"-L{cmake_build}",
          "-lomni_fast_cuda", "-o", str(tmp_path / "abi")])


def _local_includes(path: Path, seen: set[str] | None = None) -> set[str]:
    """The kernels/cuda headers that ``path`` includes, transitively."""
    seen = set() if seen is None else seen
    for name in re.findall(r'#include "([^"]+)"', path.read_text()):
        if name not in seen and (CUDA_DIR / name).is_file():
            seen.add(name)
            _local_includes(CUDA_DIR / name, seen)
    return seen


def test_each_launcher_is_defined_against_the_public_header():
    """omni_fast_cuda.h reaches the declaration of every launcher, and each .cu defining a launcher includes a
    header declaring it (so the compiler checks the definition against the public declaration)."""
    public = _local_includes(CUDA_DIR / "omni_fast_cuda.h") | {"omni_fast_cuda.h"}
    public_text = "".join((CUDA_DIR / h).read_text() for h in public)
    for name in EXPORTED:
        assert re.search(rf"\b{name}\(", public_text), f"{name} not declared by omni_fast_cuda.h"
    for src in SOURCES:
        included = _local_includes(src)
        declared = "".join((CUDA_DIR / h).read_text() for h in included & public)
        for name in [n for n in EXPORTED if re.search(rf"\b{n}\b", src.read_text())]:
            assert re.search(rf"\b{name}\(", declared), f"{src.name} defines {name} without its declaration"


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_each_source_compiles_for_sm90a_without_spills(source, tmp_path):
    """Each .cu compiles on its own for sm_90a, and ptxas -v reports 0 bytes of spills for every kernel."""
    res = subprocess.run(["nvcc", "--std=c++17", "-arch=sm_90a", "-Xptxas", "-v", "-c", str(source), "-o",
                          str(tmp_path / "out.o")], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    entries = re.findall(r"Compiling entry function '(\w+)'", res.stderr)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    assert entries and len(spills) == len(entries), res.stderr[-3000:]
    assert all(st == "0" and ld == "0" for st, ld in spills), res.stderr[-3000:]


def test_cmake_defaults_to_sm90a_before_project():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert text.index("set(CMAKE_CUDA_ARCHITECTURES 90a") < text.index("project(omni_fast")
