"""CUDA C++ sampling kernel (``kernels/cuda/sampling.cu``) loaded through CuPy (NVRTC), for CUDA tensors.

Same algorithm, RNG and rounding steps as :mod:`omni_fast.kernels.sampling` (Triton); registered as the ``"cuda"``
implementation of :func:`omni_fast.ops.sample`. Launches on torch's current stream, so it captures in CUDA graphs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from .launch import cupy_stream

_SRC = Path(__file__).resolve().parent / "cuda" / "sampling.cu"
_THREADS = 256
_NAMES = {torch.float32: "omni_fast_sample_f32", torch.float16: "omni_fast_sample_f16",
          torch.bfloat16: "omni_fast_sample_bf16"}


@functools.lru_cache(maxsize=None)
def _module(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=_SRC.read_text(), options=("-std=c++17", f"-I{_SRC.parent}"))


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, suppress: torch.Tensor | None,
           repetition_penalty: float, prev_ids: torch.Tensor | None, seed: torch.Tensor, offset: torch.Tensor,
           greedy: bool) -> torch.Tensor:
    """int64 ``[B]`` ids drawn from ``logits`` ``[B, V]`` (validated by omni_fast.ops.sample)."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    penalty_on = prev_ids is not None and prev_ids.numel() > 0 and repetition_penalty != 1.0
    n_sup = 0 if suppress is None else suppress.shape[0]
    dummy = out.data_ptr()
    args = (
        np.uint64(logits.data_ptr()), np.uint64(out.data_ptr()), np.int64(logits.stride(0)), np.int32(V),
        np.uint64(seed.data_ptr()), np.int32(1 if seed.numel() > 1 else 0), np.uint64(offset.data_ptr()),
        np.int32(1 if offset.numel() > 1 else 0),
        np.uint64(prev_ids.data_ptr() if penalty_on else dummy), np.int64(prev_ids.stride(0) if penalty_on else 0),
        np.int32(prev_ids.shape[1] if penalty_on else 0), np.float32(repetition_penalty),
        np.float32(1.0 / repetition_penalty), np.uint64(suppress.data_ptr() if n_sup else dummy), np.int32(n_sup),
        np.float32(1.0 / temperature), np.int32(top_k), np.float32(1.0 - top_p), np.int32(bool(greedy)),
        np.int32(penalty_on), np.int32(temperature != 1.0 and not greedy), np.int32(0 < top_k < V),
        np.int32(top_p < 1.0),
    )
    with cupy_stream(logits.device) as index:
        _module(index).get_function(_NAMES[logits.dtype])((B,), (_THREADS,), args)
    return out
