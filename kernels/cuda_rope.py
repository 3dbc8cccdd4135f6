"""TM-RoPE through the CUDA C++ kernel in ``kernels/cuda/rope.cu``, compiled at first use by NVRTC via CuPy.

:func:`mrope_` has the signature of :func:`omni_fast.kernels.rope.mrope_` (backend ``"cuda"`` of
``omni_fast.ops.mrope`` / ``qk_norm_mrope`` calls it). The kernel is launched on torch's current stream with raw
``data_ptr()`` values; nothing is allocated or synchronised, so it can be captured in CUDA graphs (compile it once,
by a first call, before capturing).

Shapes: q ``[T, Hq, D]``, k ``[T, Hk, D]`` (fp16/bf16/fp32, unit stride in D, D even and <= 256), positions int32/int64
``[3, T]`` or ``[T]``, inv_freq fp32 ``[D/2]``, optional norm weights ``[D]`` (fp32/fp16/bf16).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .launch import cupy_stream

SOURCE = Path(__file__).resolve().parent / "cuda" / "rope.cu"
MAX_HEAD_DIM = 256  # OF_MAX_HALF * 2 in rope.cu
_KERNELS = {torch.bfloat16: "omni_fast_mrope_kernel_bf16", torch.float16: "omni_fast_mrope_kernel_fp16",
            torch.float32: "omni_fast_mrope_kernel_fp32"}
_WEIGHT_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(
            "backend 'cuda' runs the CUDA C++ kernels through CuPy, which is not installed: pip install "
            "cupy-cuda12x or cupy-cuda13x (matching the CUDA runtime), or use backend='triton'") from exc
    return cupy


@functools.lru_cache(maxsize=None)
def _module():
    """The CuPy RawModule of rope.cu (NVRTC compiles it for the current device on first lookup)."""
    cupy = _cupy()
    return cupy.RawModule(code=SOURCE.read_text(), options=("--std=c++17",))


@functools.lru_cache(maxsize=None)
def _kernel(dtype: torch.dtype, device_index: int):
    with _cupy().cuda.Device(device_index):
        return _module().get_function(_KERNELS[dtype])


def mrope_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           mrope_section: list[int], interleaved: bool, attention_scaling: float,
           q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 0.0) -> None:
    """Rotate q and k in place (with weights: per-head RMSNorm first), as ``omni_fast.kernels.rope.mrope_``."""
    import numpy as np

    T, n_q, D = q.shape
    if q.device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got q on {q.device}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"backend 'cuda' supports head_dim <= {MAX_HEAD_DIM}, got {D} (use backend='triton')")
    if q.dtype not in _KERNELS:
        raise TypeError(f"backend 'cuda' supports q/k dtypes {list(_KERNELS)}, got {q.dtype}")
    if T == 0:
        return
    norm = q_weight is not None
    if norm and (q_weight.dtype != k_weight.dtype or q_weight.dtype not in _WEIGHT_DTYPE):
        # The kernel takes one weight dtype. Widening to fp32 is exact and changes no result: the kernel multiplies
        # the normalised value by the weight in fp32 either way.
        q_weight, k_weight = q_weight.float(), k_weight.float()
    _cupy()  # (the clear error when CuPy is missing)
    heads = n_q + k.shape[1]
    warps = min(heads, 8)  # one warp per head, at most 8 per block (as the C launcher)
    i32, i64 = np.int32, np.int64
    args = (
        np.uint64(q.data_ptr()), np.uint64(k.data_ptr()), np.uint64(positions.data_ptr()),
        i32(positions.dtype == torch.int32), np.uint64(inv_freq.data_ptr()),
        np.uint64(q_weight.data_ptr() if norm else 0), np.uint64(k_weight.data_ptr() if norm else 0),
        i32(_WEIGHT_DTYPE[q_weight.dtype] if norm else 0),
        i64(q.stride(0)), i64(q.stride(1)), i64(k.stride(0)), i64(k.stride(1)),
        i64(positions.stride(0) if positions.dim() == 2 else 0),
        i32(n_q), i32(k.shape[1]), i32(D // 2), i32(mrope_section[0]), i32(mrope_section[1]), i32(mrope_section[2]),
        i32(bool(interleaved)), np.float32(attention_scaling), np.float32(eps),
    )
    with cupy_stream(q.device) as index:
        _kernel(q.dtype, index)((T,), (32 * warps,), args)
