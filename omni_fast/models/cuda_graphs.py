"""The one CUDA-graph capture routine of the model modules (MTP frame, text decode step, Code2Wav stream step), and
the weights identity (:func:`weights_key`) their graph caches are keyed on."""

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


def weights_key(*modules: torch.nn.Module) -> tuple:
    """Identity of the modules' current weights (storage, dtype, device, in-place version of every tensor): a model
    built from them (a :class:`CodePredictor`, a ``Code2Wav``), or a CUDA graph that reads them by address, is
    stale once this changes (``.to()``, ``load_state_dict``, an in-place update)."""
    # inference tensors (made under torch.inference_mode) have no version counter and cannot change in place
    return tuple((t.data_ptr(), t.dtype, t.device, 0 if t.is_inference() else t._version)
                 for m in modules for t in (*m.parameters(), *m.buffers()))
