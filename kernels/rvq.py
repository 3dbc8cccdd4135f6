"""RVQ codebook embedding in Triton: gather one row per codebook and sum / average them in one pass.

Tables are addressed through per-group ELEMENT offsets from one base pointer plus per-group row strides, so the
same kernel serves one big table with row offsets (Code2Wav) and a list of separate tables (the Talker input: the
list's tensors are addressed relative to the first one's data pointer; Triton pointers are plain addresses).

Shapes: codes int ``[N, G]`` (any strides), group element offsets / row strides int64 ``[G]``, out ``[N, D]``.
fp32 accumulation in group order, one rounding on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, static_case


@triton.jit
def rvq_embed_kernel(
    codes_ptr, table_ptr, group_base_ptr, group_stride_ptr, group_rows_ptr, out_ptr,
    D, stride_cn, stride_cg, stride_on, scale,
    G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rvq_tile(tl.program_id(0), tl.program_id(1), codes_ptr, table_ptr, group_base_ptr, group_stride_ptr,
             group_rows_ptr, out_ptr, D, stride_cn, stride_cg, stride_on, scale, G, BLOCK_D)


@triton.jit
def rvq_tile(
    n, pid_d, codes_ptr, table_ptr, group_base_ptr, group_stride_ptr, group_rows_ptr, out_ptr,
    D, stride_cn, stride_cg, stride_on, scale,
    G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row ``n``, D block ``pid_d`` of :func:`rvq_embed_kernel` (shared with the persistent frame kernel).

    Bounded by construction: whatever value a code load returns (a garbage id, or in the persistent frame's drain a
    racy read of an id a late sampler is storing: not a value anyone need have written), every address formed,
    masked lane or not, lies in group ``g``'s rows ``[0, group_rows[g])`` (a table of at least one row)."""
    n = n.to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for g in range(G):
        code = tl.load(codes_ptr + n * stride_cn + g * stride_cg).to(tl.int64)
        rows = tl.load(group_rows_ptr + g)
        # an out-of-range code (unchecked on CUDA: no host sync) adds nothing (the mask) ...
        valid = (code >= 0) & (code < rows)
        # ... and the row gathered is the code clamped to [0, rows): the address depends on ONE use of the loaded
        # value, so it stays in bounds even if the compiler re-read the code for the mask (a racy read may differ)
        safe = tl.maximum(tl.minimum(code, rows - 1), 0)
        row = tl.load(group_base_ptr + g) + safe * tl.load(group_stride_ptr + g)
        acc += tl.load(table_ptr + row + offs_d, mask=offs_d < tl.where(valid, D, 0), other=0.0).to(tl.float32)
    tl.store(out_ptr + n * stride_on + offs_d, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


def rvq_embed(codes: torch.Tensor, table: torch.Tensor, group_base: torch.Tensor, group_stride: torch.Tensor,
              group_rows: torch.Tensor, mean: bool, out: torch.Tensor) -> None:
    """Write ``out[n] = reduce_g table_flat[group_base[g] + codes[n, g] * group_stride[g] + :D]``.

    codes ``[N, G]``; table: the tensor ``group_base`` counts from (element offsets, int64 ``[G]``); out ``[N, D]``.
    """
    N, G = codes.shape
    D = out.shape[1]
    block_d = min(triton.next_power_of_2(max(D, 16)), 1024)
    launch(
        rvq_embed_kernel, (N, triton.cdiv(D, block_d)),
        codes, table, group_base, group_stride, group_rows, out,
        D, codes.stride(0), codes.stride(1), out.stride(0), (1.0 / G) if mean else 1.0,
        G=G, BLOCK_D=block_d, num_warps=4, device=out.device,
    )


for _dt in ("bf16", "fp16"):
    for _g in (16,):
        static_case(
            f"rvq_embed_kernel[{_dt},G{_g},D1024]", rvq_embed_kernel,
            signature={
                "codes_ptr": "*i64", "table_ptr": f"*{_dt}", "group_base_ptr": "*i64", "group_stride_ptr": "*i64",
                "group_rows_ptr": "*i64",
                "out_ptr": f"*{_dt}", "D": "i32", "stride_cn": "i32", "stride_cg": "i32", "stride_on": "i32",
                "scale": "fp32", "G": "constexpr", "BLOCK_D": "constexpr",
            },
            constexprs={"G": _g, "BLOCK_D": 1024},
        )
