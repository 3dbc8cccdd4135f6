"""The one CUDA-graph capture routine of the model modules (MTP frame, text decode step, Code2Wav stream step)."""

from __future__ import annotations

from typing import Callable

import torch


def capture(fn: Callable[[], object], device: torch.device | str | None = None, *, warmup: int = 2, pool=None,
            after_warmup: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run ``fn`` ``warmup`` times on a side stream, then capture one call of it; returns ``(graph, outputs)``.

    The warm-up keeps everything a capture forbids outside it: Triton JIT compiles and autotuning, cuBLAS handle
    creation, lazily built constant tensors. ``after_warmup`` undoes what the warm-up calls changed in the caller's
    state (it runs on the current stream, before the capture). ``outputs`` are ``fn``'s return values during the
    capture: the static buffers each replay rewrites. ``pool``: a ``torch.cuda.graph_pool_handle()`` shared by
    graphs that never replay concurrently.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
