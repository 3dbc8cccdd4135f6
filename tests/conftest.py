"""Test set-up: without CUDA, every Triton kernel runs on the CPU interpreter.

TRITON_INTERPRET must be set before any ``triton.jit`` decorator runs (it is read at decoration time), so it is
set here, at import of the conftest, before the tests import omni_fast.kernels.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from omni_fast.testing import DEVICE  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: longer interpreter runs")
    config.addinivalue_line("markers", "hf_free: never reaches transformers (a kernel against omni-fast's reference); "
                            "scripts/test_compat.sh skips it (-m 'not hf_free'), tests/test_compat_selection.py "
                            "checks the claim")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds folder names (a "gpu" checkout)
            item.add_marker(skip)


@pytest.fixture(scope="session")
def build_cuda_emu(tmp_path_factory):
    """``build(source)``: ``tests/cuda_emu/<source>`` (a CUDA C++ kernel file included into the host emulator
    ``emu.h``) compiled for the CPU and loaded with ctypes; skips the test when there is no g++."""
    import ctypes
    import shutil
    import subprocess
    from pathlib import Path

    def build(source: str):
        cxx = shutil.which("g++")
        if cxx is None:
            pytest.skip("no g++ to build the CUDA-kernel emulator")
        here = Path(__file__).resolve().parent / "cuda_emu"
        so = tmp_path_factory.mktemp("cuda_emu") / (Path(source).stem + ".so")
        subprocess.run([cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", f"-I{here}",
                        str(here / source), "-o", str(so), "-lpthread"], check=True)
        return ctypes.CDLL(str(so))

    return build


@pytest.fixture
def cuda_like_validation():
    """The ops' CPU-only value checks off, as on CUDA tensors (there they are skipped, so they are neither syncs of
    a patched path nor in a CUDA-graph body): for :class:`omni_fast.testing.HostSyncs` checks on the CPU."""
    from omni_fast.testing import cuda_like_value_checks

    with cuda_like_value_checks():
        yield


@pytest.fixture
def fast_path():
    """``fast_path(name, on=True)``: switch an opt-in fast path (:mod:`omni_fast.fast_paths`) for this test only;
    every switch is undone, last first, when the test ends."""
    from omni_fast import fast_paths

    switches = []
    yield lambda name, on=True: switches.append(fast_paths.enable(name, on))
    for switch in reversed(switches):
        switch.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _ieee_fp32_on_gpu(request):
    """GPU tests compare fp32 results with transformers' fp32 modules: keep cuBLAS and cuDNN in IEEE fp32 (cuDNN
    convolutions default to TF32, ~1e-3 relative error, which the fp32 tolerances are not meant to absorb)."""
    if not HAS_CUDA or request.node.get_closest_marker("gpu") is None:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
