"""RVQ codebook embedding in Triton: gather one row per codebook and sum / average them in one pass.

Two table layouts (both Qwen3-Omni's), chosen by the constexpr ``OFFSETS``:

- ``OFFSETS=False``: per-group ELEMENT offsets from one base pointer plus per-group row strides and row counts, so
  the kernel serves a list of separate tables (the Talker input: the list's tensors are addressed relative to the
  first one's data pointer; Triton pointers are plain addresses);
- ``OFFSETS=True``: one big table with per-group FIRST ROWS (Code2Wav's ``codes + code_offset``), read straight
  from the caller's offsets tensor with the table's row stride and row count as scalars: no per-call set-up
  tensors, so Code2Wav's embedding is one launch.

Codes are addressed as ``[A, T, G]`` with any strides (output row ``n = a * T + t``), so Code2Wav's ``[B, G, T]``
codes are read through a transposed view without a copy; 2-D ``[N, G]`` codes are ``A = N, T = 1``.
Out ``[N, D]``. fp32 accumulation in group order, one multiplication by ``scale`` (1 or 1/G), one rounding on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, static_case


@triton.jit
def rvq_embed_kernel(
    codes_ptr, table_ptr, group_base_ptr, group_stride_ptr, group_rows_ptr, out_ptr,
    D, T, stride_ca, stride_ct, stride_cg, stride_on, scale, row_stride, n_rows,
    G: tl.constexpr, BLOCK_D: tl.constexpr, OFFSETS: tl.constexpr = False,
):
    """Grid ``(N, cdiv(D, BLOCK_D))``: one program sums the G gathered rows of output row ``n`` over one block of D
    (:func:`rvq_tile`; the layouts in the module doc). ``codes_ptr`` int32/int64 ``[A, T, G]`` (strides
    ``stride_ca/ct/cg``), ``table_ptr`` fp32/fp16/bf16, ``group_*_ptr`` integer ``[G]``, ``out_ptr`` ``[N, D]`` (the
    table's dtype; row stride ``stride_on``, unit stride in D); ``scale`` 1 or 1/G; ``G``: codebooks per row."""
    rvq_tile(tl.program_id(0), tl.program_id(1), codes_ptr, table_ptr, group_base_ptr, group_stride_ptr,
             group_rows_ptr, out_ptr, D, T, stride_ca, stride_ct, stride_cg, stride_on, scale, row_stride, n_rows,
             G, BLOCK_D, OFFSETS)


@triton.jit
def rvq_tile(
    n, pid_d, codes_ptr, table_ptr, group_base_ptr, group_stride_ptr, group_rows_ptr, out_ptr,
    D, T, stride_ca, stride_ct, stride_cg, stride_on, scale, row_stride, n_rows,
    G: tl.constexpr, BLOCK_D: tl.constexpr, OFFSETS: tl.constexpr,
):
    """Row ``n``, D block ``pid_d`` of :func:`rvq_embed_kernel` (shared with the persistent frame kernel).
    ``OFFSETS``: ``group_base_ptr`` holds each group's first row (``group_stride_ptr`` / ``group_rows_ptr`` unused;
    ``row_stride`` / ``n_rows`` are the table's: group ``g`` owns rows ``first_g ..`` to the table's end); otherwise
    element offsets, row strides and row counts per group.

    Bounded by construction: whatever value a code load returns (a garbage id, or in the persistent frame's drain a
    racy read of an id a late sampler is storing: not a value anyone need have written), every address formed,
    masked lane or not, lies in group ``g``'s rows ``[0, group_rows[g])`` (a table of at least one row; with
    ``OFFSETS`` the first row is clamped into the table too, and a group whose first row lies outside it adds
    nothing)."""
    n = n.to(tl.int64)
    c_row = codes_ptr + (n // T) * stride_ca + (n % T) * stride_ct
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for g in range(G):
        code = tl.load(c_row + g * stride_cg).to(tl.int64)
        if OFFSETS:  # group g: table rows first .. the end; an (unchecked) first outside the table: no rows
            given = tl.load(group_base_ptr + g).to(tl.int64)
            first = tl.maximum(tl.minimum(given, n_rows - 1), 0)
            rows = tl.where(given == first, n_rows - first, 0)
            base = first * row_stride
            stride = row_stride
        else:
            rows = tl.load(group_rows_ptr + g)
            base = tl.load(group_base_ptr + g)
            stride = tl.load(group_stride_ptr + g)
        # an out-of-range code (unchecked on CUDA: no host sync) adds nothing (the mask) ...
        valid = (code >= 0) & (code < rows)
        # ... and the row gathered is the code clamped to [0, rows): the address depends on ONE use of the loaded
        # value, so it stays in bounds even if the compiler re-read the code for the mask (a racy read may differ)
        safe = tl.maximum(tl.minimum(code, rows - 1), 0)
        row = base + safe * stride
        acc += tl.load(table_ptr + row + offs_d, mask=offs_d < tl.where(valid, D, 0), other=0.0).to(tl.float32)
    tl.store(out_ptr + n * stride_on + offs_d, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


def rvq_embed(codes: torch.Tensor, table: torch.Tensor, group_base: torch.Tensor, group_stride: torch.Tensor | None,
              group_rows: torch.Tensor | None, mean: bool, out: torch.Tensor) -> None:
    """Write ``out[n] = reduce_g table_flat[group_base[g] + codes[n, g] * group_stride[g] + :D]``, or with
    ``group_stride=None`` (the offsets layout) ``reduce_g table[group_base[g] + codes[n, g]]``.

    codes ``[A, T, G]`` (any strides; ``N = A * T`` output rows) or ``[N, G]``; table: the tensor ``group_base``
    counts from (element offsets, int64 ``[G]``), or with ``group_stride=None`` the one table ``[V, D]`` and
    ``group_base`` its groups' first rows (int ``[G]``); out ``[N, D]``.
    """
    if codes.dim() == 2:
        codes = codes.unsqueeze(1)
    A, T, G = codes.shape
    D = out.shape[1]
    offsets = group_stride is None
    block_d = min(triton.next_power_of_2(max(D, 16)), 1024)
    launch(
        rvq_embed_kernel, (A * T, triton.cdiv(D, block_d)),
        codes, table, group_base, group_base if offsets else group_stride, group_base if offsets else group_rows,
        out, D, T, *codes.stride(), out.stride(0), (1.0 / G) if mean else 1.0,
        table.stride(0) if offsets else 0, table.shape[0] if offsets else 0,
        G=G, BLOCK_D=block_d, OFFSETS=offsets, num_warps=4, device=out.device,
    )


for _dt in ("bf16", "fp16"):
    for _offsets in (False, True):  # the Talker's list of tables; Code2Wav's one table with row offsets
        _sig = {
            "codes_ptr": "*i64", "table_ptr": f"*{_dt}", "group_base_ptr": "*i64", "group_stride_ptr": "*i64",
            "group_rows_ptr": "*i64", "out_ptr": f"*{_dt}", "D": "i32", "T": "i32", "stride_ca": "i32",
            "stride_ct": "i32", "stride_cg": "i32", "stride_on": "i32", "scale": "fp32", "row_stride": "i32",
            "n_rows": "i32", "G": "constexpr", "BLOCK_D": "constexpr", "OFFSETS": "constexpr",
        }
        # the JIT makes an integer argument equal to 1 a constant: 2-D codes have T = 1 (the Talker), Code2Wav's
        # transposed [B, G, T] codes a unit time stride (T stays general: a push of several frames)
        _one = "stride_ct" if _offsets else "T"
        _sig[_one] = "constexpr"
        static_case(f"rvq_embed_kernel[{_dt},G16,D1024" + (",offsets]" if _offsets else "]"), rvq_embed_kernel,
                    signature=_sig, constexprs={"G": 16, "BLOCK_D": 1024, "OFFSETS": _offsets, _one: 1})
