"""The CuPy glue of the CUDA C++ kernels (``kernels/cuda/*.cu``, compiled at first use by NVRTC through CuPy).

One place for what :mod:`.cuda_moe`, :mod:`.cuda_rope` and :mod:`.cuda_sampling` need from CuPy, so a CuPy API
change is met once:

- :func:`cupy`: the import, with an error that says which wheel to install;
- :func:`kernel`: a ``RawModule`` function, compiled (on first lookup) for one device, cached per
  (source, options, name, device);
- :func:`run`: a kernel's launch on torch's current stream of the tensors' device (so calls order with torch's work
  and are captured in CUDA graphs once compiled), through :func:`torch_stream`.

:func:`torch_stream` wraps torch's ``cudaStream_t`` as a CuPy stream *without owning it*. CuPy 14 deprecated
``cupy.cuda.ExternalStream`` (a ``DeprecationWarning`` at every construction, so at every launch) for
``cupy.cuda.Stream.from_external(obj)``, which takes any object with the CUDA stream protocol's
``__cuda_stream__() -> (0, ptr)`` and keeps it as the stream's owner reference (the stream is then never destroyed
by CuPy). CuPy 13 has only ``ExternalStream`` (which never destroys its stream either).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def cupy():
    """The ``cupy`` module; an ImportError naming the wheel when it is missing."""
    try:
        import cupy
    except ImportError as exc:
        raise ImportError("backend 'cuda' runs the CUDA C++ kernels through CuPy, which is not installed: pip "
                          "install cupy-cuda12x or cupy-cuda13x (matching the CUDA runtime), or use backend='triton'"
                          ) from exc
    return cupy


@functools.lru_cache(maxsize=None)
def _module(source: str, options: tuple[str, ...]):
    # (no compile here: CuPy compiles a RawModule for the current device when a function is first looked up)
    return cupy().RawModule(code=Path(source).read_text(), options=options)


@functools.lru_cache(maxsize=None)
def kernel(source: str | Path, options: tuple[str, ...], name: str, device_index: int):
    """The ``extern "C"`` kernel ``name`` of the CUDA C++ file ``source`` (NVRTC ``options``), looked up with
    device ``device_index`` current (CuPy compiles and loads the module for that device there)."""
    with cupy().cuda.Device(device_index):
        return _module(str(source), tuple(options)).get_function(name)


class _StreamHandle:
    """A raw ``cudaStream_t`` seen through the CUDA stream protocol (what ``Stream.from_external`` reads)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = int(ptr)

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.ptr


def torch_stream(cp, ptr: int):
    """A CuPy stream over the ``cudaStream_t`` ``ptr`` (torch's), which CuPy neither owns nor destroys:
    ``Stream.from_external`` where it exists (CuPy >= 14), else ``ExternalStream`` (see the module docstring).
    Enter it with the stream's device current (CuPy checks that on entry)."""
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_StreamHandle(ptr))
    return cp.cuda.ExternalStream(int(ptr))


def run(source: str | Path, options: tuple[str, ...], name: str, device: torch.device, grid: tuple, block: tuple,
        args: tuple) -> None:
    """Launch kernel ``name`` of ``source`` (see :func:`kernel`) with ``grid`` / ``block`` / ``args`` on torch's
    current stream of the CUDA ``device`` (index None: the current device), that device current. Nothing is
    synchronised; the first call per (kernel, device) compiles, so make it before a CUDA-graph capture."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    fn = kernel(source, options, name, index)
    cp = cupy()
    with cp.cuda.Device(index), torch_stream(cp, torch.cuda.current_stream(device).cuda_stream):
        fn(grid, block, args)


def compile_check() -> str:
    """``"ok"`` when CuPy compiles and loads a one-line kernel on the current device, else why not (one line):
    the GPU session's env step records it, because CuPy >= 14 refuses every NVRTC compile when it finds no CUDA
    headers (``cuda.pathfinder``: a ``nvidia-cuda-runtime`` wheel, ``CUDA_PATH`` / ``CUDA_HOME`` or a toolkit),
    which would otherwise show as each ``cuda``-backend test failing on its own."""
    try:
        mod = cupy().RawModule(code='extern "C" __global__ void omni_fast_compile_check(int* x) { *x = 1; }')
        mod.get_function("omni_fast_compile_check")
    except Exception as exc:  # noqa: BLE001 - recorded, never raised: the env step goes on
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
    return "ok"
