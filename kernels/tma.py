"""Host-side tensor descriptors (Hopper TMA) for Triton kernels, with the layout checks TMA needs.

A kernel that takes a descriptor instead of a pointer loads whole tiles with ``desc.load([row, col])``: on sm_90
the copy is one ``cp.async.bulk.tensor`` issued by one thread into shared memory (no per-element address
registers), and the tile's out-of-bounds part is zero-filled by the hardware. The descriptor is built on the host at
launch (``triton.tools.tensor_descriptor.TensorDescriptor``, in Triton >= 3.3 with the same constructor in 3.6 and
3.9), so no device scratch memory and no ``triton.set_allocator`` are involved; a CUDA graph captures the encoded
descriptor by value, exactly as it captures a pointer argument. Without TMA hardware (before sm_90) Triton lowers
the descriptor to ordinary pointer loads; the CPU interpreter emulates it (zero fill included).

TMA constraints (checked here; a layout that breaks one gets ``None`` and the caller keeps its pointer path):
16-byte aligned base address, row stride a multiple of 16 bytes, unit stride in the last dimension, every block
dimension a power of two and at most 256 elements, the block's inner extent at least 16 bytes, and sizes that fit
the descriptor's int32 shape.
"""

from __future__ import annotations

import torch

try:  # Triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: every caller falls back to pointers
    TensorDescriptor = None

_MAX_BOX = 256  # TMA box size limit per dimension (elements)
_INT32_MAX = 2**31 - 1
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def matrix_descriptor(base: torch.Tensor, rows: int, cols: int, row_stride: int,
                      block_shape: tuple[int, int]):
    """A descriptor over the row-major matrix ``[rows, cols]`` (row stride ``row_stride`` elements, unit column
    stride) that starts at ``base.data_ptr()``, loading ``block_shape`` tiles; ``None`` when TMA cannot address it.

    ``base`` is any tensor whose memory holds the matrix (e.g. expert weights ``[E, N, K]`` seen as
    ``[E*N, K]``); the caller guarantees the matrix lies inside ``base``'s storage.
    """
    if TensorDescriptor is None or base.dtype not in _DTYPES:
        return None
    elem = base.element_size()
    block_rows, block_cols = (int(b) for b in block_shape)
    if not (0 < rows <= _INT32_MAX and 0 < cols <= _INT32_MAX and row_stride >= cols):
        return None
    if base.data_ptr() % 16 or (row_stride * elem) % 16:
        return None
    for b in (block_rows, block_cols):
        if b <= 0 or b & (b - 1) or b > _MAX_BOX:
            return None
    if block_cols * elem < 16:
        return None
    return TensorDescriptor(base, [int(rows), int(cols)], [int(row_stride), 1], [block_rows, block_cols])


def stacked_matrix_descriptor(weights: torch.Tensor, block_shape: tuple[int, int]):
    """A descriptor over ``weights`` ``[E, N, K]`` seen as the 2-D matrix ``[E*N, K]`` (row ``e*N + n`` is
    ``weights[e, n]``), or ``None`` when that view does not exist (experts not evenly spaced rows, last dimension
    not unit-stride) or breaks a TMA constraint (see :func:`matrix_descriptor`)."""
    if weights.dim() != 3 or weights.numel() == 0:
        return None
    E, N, K = weights.shape
    s_e, s_n, s_k = weights.stride()
    if s_k != 1 and K > 1:
        return None
    # Stride between consecutive rows of the [E*N, K] view (size-1 dimensions may carry any stride).
    if N > 1:
        row_stride = s_n
        if E > 1 and s_e != N * s_n:
            return None
    else:
        row_stride = s_e if E > 1 else K
    return matrix_descriptor(weights, E * N, K, row_stride, block_shape)
