"""MoE routing and alignment through the CUDA C++ kernels in ``kernels/cuda/moe_routing.cu`` (NVRTC via CuPy).

:func:`topk_softmax` and :func:`moe_align_block_size` have the signatures of the Triton versions in
:mod:`omni_fast.kernels.moe_routing` / :mod:`omni_fast.kernels.moe_align` (backend ``"cuda"`` of the ops). The
kernels run on torch's current stream with raw ``data_ptr()`` values; outputs and scratch are allocated with torch
(shape-only sizes), nothing is synchronised, so calls can be captured in CUDA graphs once the module is compiled
(the first call compiles it: make that call before capturing).

Every kernel launch goes through :func:`_run` (and the device check through :func:`_check_device`), so the
``test_cuda_*_logic_emulated`` tests in ``tests/test_moe_cuda.py`` run this module's host code unchanged, with the
kernels on the CPU emulator (``tests/cuda_emu``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .launch import cupy_stream
from .moe_align import max_padded_tokens

SOURCE = Path(__file__).resolve().parent / "cuda" / "moe_routing.cu"
MAX_EXPERTS_TOPK = 256  # OF_MOE_MAX_E_PER_LANE * 32
MAX_TOP_K = 32
MAX_EXPERTS_ALIGN = 1024  # OF_MOE_ALIGN_THREADS
_TOPK = {torch.float32: "omni_fast_topk_softmax_kernel_fp32", torch.float16: "omni_fast_topk_softmax_kernel_fp16",
         torch.bfloat16: "omni_fast_topk_softmax_kernel_bf16"}
_IDS = {torch.int32: "i32", torch.int64: "i64"}


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise ImportError("backend 'cuda' runs the CUDA C++ kernels through CuPy, which is not installed: pip "
                          "install cupy-cuda12x or cupy-cuda13x (matching the CUDA runtime), or use backend='triton'"
                          ) from exc
    return cupy


@functools.lru_cache(maxsize=None)
def _module():
    return _cupy().RawModule(code=SOURCE.read_text(), options=("--std=c++17",))


@functools.lru_cache(maxsize=None)
def _kernel(name: str, device_index: int):
    with _cupy().cuda.Device(device_index):
        return _module().get_function(name)


def _run(name: str, device: torch.device, grid, block, args) -> None:
    _cupy()  # (the clear error when CuPy is missing)
    with cupy_stream(device) as index:
        _kernel(name, index)(grid, block, args)


def _check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got {name} on {t.device}")


def _ptr(t: torch.Tensor | None):
    import numpy as np

    return np.uint64(t.data_ptr() if t is not None else 0)


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits ``[T, E]`` -> (fp32 weights ``[T, k]``, int32 ids ``[T, k]``), as the Triton kernel."""
    import numpy as np

    T, E = router_logits.shape
    _check_device("router_logits", router_logits)
    if E > MAX_EXPERTS_TOPK or top_k > MAX_TOP_K:
        raise ValueError(f"backend 'cuda' supports E <= {MAX_EXPERTS_TOPK} and top_k <= {MAX_TOP_K}, got E={E}, "
                         f"top_k={top_k} (use backend='triton')")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    if T == 0:
        return weights, ids
    warps = 4
    args = (_ptr(router_logits), np.int64(router_logits.stride(0)), _ptr(weights), _ptr(ids), np.int64(T),
            np.int32(E), np.int32(top_k), np.int32(bool(renormalize)))
    _run(_TOPK[router_logits.dtype], router_logits.device, ((T + warps - 1) // warps,), (32 * warps,), args)
    return weights, ids


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int,
                         expert_map: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids int ``[T, k]`` (contiguous) -> (sorted_token_ids, expert_ids, num_tokens_post_padded), all int32."""
    import numpy as np

    dev = topk_ids.device
    _check_device("topk_ids", topk_ids)
    if num_experts > MAX_EXPERTS_ALIGN:
        raise ValueError(f"backend 'cuda' supports num_experts <= {MAX_EXPERTS_ALIGN}, got {num_experts}")
    n = topk_ids.numel()
    num_blocks = -(-max_padded_tokens(n, num_experts, block_size) // block_size)
    sorted_ids = torch.full((num_blocks * block_size,), n, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    npost = torch.zeros(1, dtype=torch.int32, device=dev)
    if n == 0:
        return sorted_ids, expert_ids, npost
    cursor = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    suffix = _IDS[topk_ids.dtype]
    threads = 256
    grid = (min(4096, (n + threads - 1) // threads),)
    _run(f"omni_fast_moe_align_count_{suffix}", dev, grid, (threads,),
         (_ptr(topk_ids), np.int64(n), np.int32(num_experts), _ptr(cursor)))
    _run("omni_fast_moe_align_prefix", dev, (1,), (MAX_EXPERTS_ALIGN,),
         (_ptr(cursor), np.int32(num_experts), np.int32(block_size), np.int32(num_blocks), _ptr(expert_map),
          _ptr(expert_ids), _ptr(npost)))
    _run(f"omni_fast_moe_align_scatter_{suffix}", dev, grid, (threads,),
         (_ptr(topk_ids), np.int64(n), np.int32(num_experts), _ptr(cursor), _ptr(sorted_ids)))
    return sorted_ids, expert_ids, npost
