"""The ``compile`` providers' ``torch.compile``, shared by the case modules (not a family: discovery skips ``_*``).

Timed runs on CUDA: inductor, as configured by the caller (``mode``, ``dynamic``). On a CPU, and inside
:func:`tracing_only` (the smoke run, on any device): dynamo with the ``aot_eager`` backend and static shapes, so the
provider's graph capture (dynamo and AOTAutograd tracing, graph breaks, guards) is exercised in seconds, without
inductor's code generation, which takes ~10 s per graph on a CPU (and says nothing about the GPU's Triton code
there); ``mode`` (``reduce-overhead``: CUDA graphs) and ``dynamic`` then do not apply.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_TRACING_ONLY = [False]


@contextlib.contextmanager
def tracing_only() -> Iterator[None]:
    """Compile providers made inside the block trace with ``aot_eager`` on any device (see the module docstring)."""
    before = _TRACING_ONLY[0]
    _TRACING_ONLY[0] = True
    try:
        yield
    finally:
        _TRACING_ONLY[0] = before


def _raise_recompile_limits() -> None:
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):  # one specialisation per benchmarked shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))


def _compile(fn, inductor: bool, mode: str | None, dynamic: bool | None):
    # Not cached per fn: setups pass fresh closures that hold a case copy's inputs and weights, which a cache
    # would keep alive for the whole run (dynamo already caches compiled code per code object).
    _raise_recompile_limits()
    if inductor:
        return torch.compile(fn, dynamic=dynamic, **({"mode": mode} if mode else {}))
    # static shapes: cases sharing a function (one code object) would otherwise turn dynamic on the first
    # recompile and trace symbolically, which costs seconds more per case
    return torch.compile(fn, dynamic=False, backend="aot_eager")


def compiled(fn, device: torch.device | str, *, mode: str | None = None, dynamic: bool | None = False):
    """``torch.compile(fn)`` for ``device`` (see the module docstring)."""
    inductor = torch.device(device).type == "cuda" and not _TRACING_ONLY[0]
    return _compile(fn, inductor, mode if inductor else None, dynamic if inductor else False)
