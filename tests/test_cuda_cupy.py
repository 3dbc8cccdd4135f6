"""kernels/cuda_cupy.py, the CuPy glue of the CUDA C++ kernels, against fake CuPy modules of the two API
generations (CuPy 13: ``ExternalStream`` only; CuPy 14: ``Stream.from_external``, ``ExternalStream`` deprecated
with a warning per construction), so the launch path the GPU image runs (cupy-cuda13x 14.x) is exercised on a CPU."""

from __future__ import annotations

import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_fast.kernels import cuda_cupy

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


class _FakeCuPy:
    """A ``cupy`` module: records compiles, lookups (with the device current then), stream entries and launches."""

    def __init__(self, v14: bool):
        self.log: list[tuple] = []
        self.current = [0]
        fake = self

        class Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                fake.current.append(self.index)

            def __exit__(self, *exc):
                fake.current.pop()

        class _Stream:
            def __init__(self, ptr):
                self.ptr = ptr

            def __enter__(self):
                fake.log.append(("stream", self.ptr, fake.current[-1]))

            def __exit__(self, *exc):
                fake.log.append(("stream_exit", self.ptr))

        class Stream(_Stream):
            pass

        if v14:
            def from_external(obj):
                version, ptr = obj.__cuda_stream__()  # the CUDA stream protocol, as CuPy 14 reads it
                assert version == 0 and isinstance(ptr, int)
                return Stream(ptr)

            Stream.from_external = staticmethod(from_external)

        class ExternalStream(_Stream):
            def __init__(self, ptr, device_id=-1):
                if v14:
                    warnings.warn("ExternalStream is deprecated. Use Stream.from_external() instead",
                                  DeprecationWarning, stacklevel=2)
                super().__init__(ptr)

        class RawModule:
            def __init__(self, *, code, options=()):
                fake.log.append(("compile", options))

            def get_function(self, name):
                fake.log.append(("lookup", name, fake.current[-1]))
                return lambda grid, block, args: fake.log.append(("launch", name, grid, block, args,
                                                                  fake.current[-1]))

        self.module = types.SimpleNamespace(
            RawModule=RawModule, cuda=types.SimpleNamespace(Device=Device, Stream=Stream,
                                                            ExternalStream=ExternalStream))


@pytest.fixture(params=["cupy14", "cupy13"])
def fake_cupy(request, monkeypatch):
    fake = _FakeCuPy(v14=request.param == "cupy14")
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(cuda_stream=0x5000 + (torch.device(device).index or 0)))
    cuda_cupy.kernel.cache_clear()
    cuda_cupy._module.cache_clear()
    yield fake
    cuda_cupy.kernel.cache_clear()
    cuda_cupy._module.cache_clear()


def test_launch_runs_on_torchs_stream_of_the_tensors_device_without_a_deprecation_warning(fake_cupy):
    """The MoE router's host code (any ``cuda`` backend launch) on CuPy 13 and 14: the kernel is looked up with
    its device current, launched inside that device and torch's stream of it, and no warning is raised (CuPy 14
    warned ``ExternalStream is deprecated`` at every launch)."""
    from omni_fast.kernels import cuda_moe

    args = (np.uint64(0x1000), np.int64(7), np.int32(-1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            cuda_moe._run("omni_fast_moe_fill_i32", torch.device("cuda", 1), (2,), (256,), args)
    log = fake_cupy.log
    assert log.count(("compile", ("--std=c++17",))) == 1  # compiled once, looked up once per device
    assert log.count(("lookup", "omni_fast_moe_fill_i32", 1)) == 1
    launches = [e for e in log if e[0] == "launch"]
    assert launches == [("launch", "omni_fast_moe_fill_i32", (2,), (256,), args, 1)] * 2
    assert [e for e in log if e[0] == "stream"] == [("stream", 0x5001, 1)] * 2
    assert log.index(("stream", 0x5001, 1)) < log.index(launches[0]) < log.index(("stream_exit", 0x5001))


def test_device_index_none_means_the_current_device(fake_cupy):
    cuda_cupy.run(KERNELS / "cuda" / "rope.cu", ("--std=c++17",), "k", torch.device("cuda"), (1,), (32,), ())
    assert ("lookup", "k", 0) in fake_cupy.log and ("stream", 0x5000, 0) in fake_cupy.log


def test_torch_stream_never_owns_the_stream(fake_cupy):
    """CuPy 14 keeps the protocol object as the stream's owner reference (it never destroys such a stream); CuPy 13
    gets ExternalStream (the same promise). Either way the handle is torch's pointer."""
    s = cuda_cupy.torch_stream(fake_cupy.module, 0x1234)
    assert s.ptr == 0x1234
    v14 = hasattr(fake_cupy.module.cuda.Stream, "from_external")
    assert isinstance(s, fake_cupy.module.cuda.Stream if v14 else fake_cupy.module.cuda.ExternalStream)


def test_compile_check_reports_instead_of_raising(monkeypatch):
    def refuse(**kw):
        raise RuntimeError("Failed to find CUDA headers. Please install CUDA toolkit headers\n(more)")

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=refuse))
    assert cuda_cupy.compile_check() == "RuntimeError: Failed to find CUDA headers. Please install CUDA toolkit headers"


def test_compile_check_ok(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _FakeCuPy(v14=True).module)
    assert cuda_cupy.compile_check() == "ok"


def test_missing_cupy_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(ImportError, match="CuPy, which is not installed: pip install cupy-cuda12x or cupy-cuda13x"):
        cuda_cupy.cupy()


def test_no_other_module_talks_to_cupy_streams_or_modules_directly():
    """One place meets CuPy's API (its stream wrapper changed in 14): the CUDA kernel modules go through it."""
    offenders = [p.name for p in sorted(KERNELS.glob("*.py")) if p.name != "cuda_cupy.py"
                 and re.search(r"ExternalStream|from_external|RawModule\(|cuda\.Device\(", p.read_text())]
    assert offenders == []


def test_installed_cupy_has_a_stream_wrapper():
    """On a machine with CuPy (the GPU image: cupy-cuda13x 14.x): the API :func:`torch_stream` picks exists."""
    cupy = pytest.importorskip("cupy")
    assert callable(getattr(cupy.cuda.Stream, "from_external", None)) or hasattr(cupy.cuda, "ExternalStream")
