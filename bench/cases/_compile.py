"""The ``compile`` providers' ``torch.compile``, shared by the case modules (not a family: discovery skips ``_*``).

On CUDA: inductor, as configured by the caller (``mode``, ``dynamic``). On a CPU (the smoke preset): dynamo with the
``aot_eager`` backend, so the provider's graph capture (dynamo and AOTAutograd tracing, graph breaks, guards) is
exercised in seconds, without inductor's C++ code generation, which takes ~10 s per graph on a CPU and says nothing
about the GPU's Triton code; shapes are static there, and ``mode`` (``reduce-overhead``: CUDA graphs) and
``dynamic`` apply on CUDA only.
"""

from __future__ import annotations

import functools

import torch


def _raise_recompile_limits() -> None:
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):  # one specialisation per benchmarked shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))


@functools.lru_cache(maxsize=None)
def _cached(fn, device_type: str, mode: str | None, dynamic: bool | None):
    _raise_recompile_limits()
    if device_type == "cuda":
        return torch.compile(fn, dynamic=dynamic, **({"mode": mode} if mode else {}))
    # static shapes: cases sharing a function (one code object) would otherwise turn dynamic on the first
    # recompile and trace symbolically, which costs seconds more per case on a CPU
    return torch.compile(fn, dynamic=False, backend="aot_eager")


def compiled(fn, device: torch.device | str, *, mode: str | None = None, dynamic: bool | None = False):
    """``torch.compile(fn)`` for ``device`` (see the module docstring); one wrapper per (fn, device type, mode)."""
    return _cached(fn, torch.device(device).type, mode, dynamic)
