"""MoE block alignment in Triton: histogram -> prefix sum -> scatter, on device, fixed output sizes.

Groups the ``n = T*k`` (token, slot) pairs by expert so the grouped GEMM can give every ``BLOCK_M``-row tile a
single expert (see :func:`omni_fast.reference.moe.moe_align_block_size` for the exact outputs):

1. ``_align_count_kernel`` (one program per ``CHUNK`` pairs): per-expert counts with integer atomics.
2. ``_align_prefix_kernel`` (one program): pads each count to a multiple of ``block_size``, an exclusive prefix
   sum gives each expert's first row, ``num_tokens_post_padded`` is the total; every block looks up its expert
   (through ``expert_map``; -1 past the total), and each expert's first row goes to a separate write-cursor
   buffer (not over the counts, which other warps of the program may still be reading).
3. ``_align_scatter_kernel`` (one program per ``CHUNK`` pairs): each pair claims a row of its expert with an
   integer ``atomic_add`` on the cursor and writes its flat index there.

Pairs whose id is outside ``[0, E)`` (not value-checked on CUDA: that would sync) are dropped by every pass:
no count, no row, no out-of-bounds atomic; negative ``expert_map`` values come out as -1. Padding rows hold the
sentinel ``n`` (pre-filled). Only integer atomics are used; the order of pairs *inside*
one expert's run depends on scheduling, but every pair's GEMM row is computed independently and the combine
reads rows by pair index, so the MoE output does not depend on it. No host sync: every size depends on shapes.

Decode (``n <= SMALL = 64`` pairs, e.g. up to 8 thinker tokens): ``_align_small_kernel`` does all of it in one
program and one launch (no pre-fill either): counts and in-expert ranks from a one-hot ``[n, E]`` tile and its
cumulative sum (ascending pair order, exactly the reference's output), the padding rows written by the same
program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, static_case

CHUNK = 1024  # pairs per program in the count / scatter passes
BLOCK_B = 64  # blocks per iteration of the expert lookup
SMALL = 64  # at most this many pairs (decode: T*k <= 64): one program does everything, in a stable order
FILL = 64  # rows per iteration of the single-program padding fill


def max_padded_tokens(num_entries: int, num_experts: int, block_size: int) -> int:
    """``T*k + min(E, T*k) * (block_size - 1)``: the most rows the padded runs can need."""
    return num_entries + min(num_experts, num_entries) * (block_size - 1)


@triton.jit
def _valid_pairs(ids_ptr, offs, num_entries, num_experts):
    """(ids, mask): the pairs at ``offs`` that exist and whose id lies in ``[0, num_experts)``.

    Ids are compared in their loaded type (an int64 id of 2**32 + 3 must not pass as 3). A pair outside the range
    is dropped like a pair of a remote expert: no row, no count, no out-of-bounds access (the CUDA path skips
    the host-syncing value check); the combine skips it too.
    """
    mask = offs < num_entries
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    mask = mask & (ids >= 0) & (ids < num_experts)
    return tl.where(mask, ids, 0).to(tl.int32), mask


@triton.jit
def _align_count_kernel(ids_ptr, counts_ptr, num_entries, num_experts, CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    ids, mask = _valid_pairs(ids_ptr, offs, num_entries, num_experts)
    tl.atomic_add(counts_ptr + ids, tl.full((CHUNK,), 1, tl.int32), mask=mask)


@triton.jit
def _align_prefix_kernel(counts_ptr, cursor_ptr, expert_ids_ptr, npost_ptr, expert_map_ptr, num_experts,
                         num_blocks, block_size, HAS_MAP: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_B: tl.constexpr):
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < num_experts
    counts = tl.load(counts_ptr + offs_e, mask=mask_e, other=0)
    padded = (counts + block_size - 1) // block_size * block_size
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    total = tl.sum(padded, axis=0)
    tl.store(npost_ptr, total)
    # The cursors go to their own buffer: when BLOCK_E is smaller than the program's threads, several warps hold
    # (and load) the same counts, and without a barrier a lagging warp could read a cursor stored over its count.
    tl.store(cursor_ptr + offs_e, start, mask=mask_e)
    # Padding experts end at +inf so they never count as "ended before" a block.
    end = tl.where(mask_e, end, 2147483647)
    for b0 in range(0, num_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        row = offs_b * block_size
        # The expert owning a block = how many experts end at or before its first row.
        expert = tl.sum((end[None, :] <= row[:, None]).to(tl.int32), axis=1)
        used = row < total
        if HAS_MAP:
            expert = tl.load(expert_map_ptr + expert, mask=used, other=-1)
        # Every negative map value reads as "remote" (-1); values >= E_local are the GEMM's to drop.
        expert = tl.where(used & (expert >= 0), expert, -1)
        tl.store(expert_ids_ptr + offs_b, expert, mask=offs_b < num_blocks)


@triton.jit
def _align_scatter_kernel(ids_ptr, cursor_ptr, sorted_ptr, num_entries, num_experts, CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    ids, mask = _valid_pairs(ids_ptr, offs, num_entries, num_experts)
    row = tl.atomic_add(cursor_ptr + ids, tl.full((CHUNK,), 1, tl.int32), mask=mask)
    tl.store(sorted_ptr + row, offs, mask=mask)


@triton.jit
def _align_small_kernel(ids_ptr, sorted_ptr, expert_ids_ptr, npost_ptr, expert_map_ptr, num_entries, num_experts,
                        num_blocks, block_size, HAS_MAP: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, FILL: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < num_experts
    ids, mask_n = _valid_pairs(ids_ptr, offs_n, num_entries, num_experts)
    onehot = ((ids[:, None] == offs_e[None, :]) & mask_n[:, None]).to(tl.int32)
    counts = tl.sum(onehot, axis=0)
    padded = (counts + block_size - 1) // block_size * block_size
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    total = tl.sum(padded, axis=0)
    tl.store(npost_ptr, total)
    # Stable rank of each pair inside its expert: how many earlier pairs chose the same expert.
    rank = tl.sum((tl.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
    row = tl.sum(start[None, :] * onehot, axis=1) + rank
    tl.store(sorted_ptr + row, offs_n, mask=mask_n)
    end = tl.where(mask_e, end, 2147483647)
    fill_end = end - padded + counts  # rows at or past this (within the expert's run) are padding
    for b0 in range(0, num_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        first = offs_b * block_size
        expert = tl.sum((end[None, :] <= first[:, None]).to(tl.int32), axis=1)
        used = first < total
        local = expert
        if HAS_MAP:
            local = tl.load(expert_map_ptr + expert, mask=used, other=-1)
        tl.store(expert_ids_ptr + offs_b, tl.where(used & (local >= 0), local, -1), mask=offs_b < num_blocks)
    # Padding rows: past the real pairs of their expert's run, or past the total. Disjoint from the rows the
    # scatter above wrote, so no barrier is needed.
    for r0 in range(0, num_blocks * block_size, FILL):
        offs_r = r0 + tl.arange(0, FILL)
        owner = tl.sum((end[None, :] <= offs_r[:, None]).to(tl.int32), axis=1)
        real_end = tl.sum(tl.where(offs_e[None, :] == owner[:, None], fill_end[None, :], 0), axis=1)
        pad = (offs_r >= real_end) | (offs_r >= total)
        tl.store(sorted_ptr + offs_r, tl.full((FILL,), 0, tl.int32) + num_entries,
                 mask=pad & (offs_r < num_blocks * block_size))


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int,
                         expert_map: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids int ``[T, k]`` (contiguous) -> (sorted_token_ids, expert_ids, num_tokens_post_padded), all int32."""
    device = topk_ids.device
    ids = topk_ids.reshape(-1)
    n = ids.numel()
    num_blocks = triton.cdiv(max_padded_tokens(n, num_experts, block_size), block_size)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    if n == 0:
        return (torch.empty(0, dtype=torch.int32, device=device), expert_ids,
                torch.zeros(1, dtype=torch.int32, device=device))
    npost = torch.empty(1, dtype=torch.int32, device=device)
    emap = expert_map if expert_map is not None else expert_ids
    if n <= SMALL:
        sorted_ids = torch.empty(num_blocks * block_size, dtype=torch.int32, device=device)
        launch(_align_small_kernel, (1,), ids, sorted_ids, expert_ids, npost, emap, n, num_experts, num_blocks,
               block_size, HAS_MAP=expert_map is not None, BLOCK_N=max(16, triton.next_power_of_2(n)),
               BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_B=FILL, FILL=FILL, num_warps=8, device=device)
        return sorted_ids, expert_ids, npost
    sorted_ids = torch.full((num_blocks * block_size,), n, dtype=torch.int32, device=device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=device)
    grid = (triton.cdiv(n, CHUNK),)
    launch(_align_count_kernel, grid, ids, counts, n, num_experts, CHUNK=CHUNK, num_warps=4, device=device)
    launch(_align_prefix_kernel, (1,), counts, cursor, expert_ids, npost, emap,
           num_experts, num_blocks, block_size, HAS_MAP=expert_map is not None,
           BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_B=BLOCK_B, num_warps=4, device=device)
    launch(_align_scatter_kernel, grid, ids, cursor, sorted_ids, n, num_experts, CHUNK=CHUNK, num_warps=4,
           device=device)
    return sorted_ids, expert_ids, npost


for _idt in ("i32", "i64"):
    static_case(f"_align_count_kernel[{_idt}]", _align_count_kernel,
                signature={"ids_ptr": f"*{_idt}", "counts_ptr": "*i32", "num_entries": "i32", "num_experts": "i32",
                           "CHUNK": "constexpr"},
                constexprs={"CHUNK": CHUNK})
    static_case(f"_align_scatter_kernel[{_idt}]", _align_scatter_kernel,
                signature={"ids_ptr": f"*{_idt}", "cursor_ptr": "*i32", "sorted_ptr": "*i32", "num_entries": "i32",
                           "num_experts": "i32", "CHUNK": "constexpr"},
                constexprs={"CHUNK": CHUNK})
for _idt in ("i32", "i64"):
    for _map in (False, True):
        static_case(f"_align_small_kernel[{_idt},E128,map={_map}]", _align_small_kernel,
                    signature={"ids_ptr": f"*{_idt}", "sorted_ptr": "*i32", "expert_ids_ptr": "*i32",
                               "npost_ptr": "*i32", "expert_map_ptr": "*i32", "num_entries": "i32",
                               "num_experts": "i32", "num_blocks": "i32", "block_size": "i32",
                               "HAS_MAP": "constexpr", "BLOCK_N": "constexpr", "BLOCK_E": "constexpr",
                               "BLOCK_B": "constexpr", "FILL": "constexpr"},
                    constexprs={"HAS_MAP": _map, "BLOCK_N": SMALL, "BLOCK_E": 128, "BLOCK_B": FILL, "FILL": FILL},
                    num_warps=8)
# moe_block's shared expert is a one-expert grouped GEMM: its pairs align with E = 1 (BLOCK_E = 1), at decode sizes
static_case("_align_small_kernel[i32,E1 shared expert,map=False]", _align_small_kernel,
            signature={"ids_ptr": "*i32", "sorted_ptr": "*i32", "expert_ids_ptr": "*i32", "npost_ptr": "*i32",
                       "expert_map_ptr": "*i32", "num_entries": "i32", "num_experts": "i32", "num_blocks": "i32",
                       "block_size": "i32", "HAS_MAP": "constexpr", "BLOCK_N": "constexpr", "BLOCK_E": "constexpr",
                       "BLOCK_B": "constexpr", "FILL": "constexpr"},
            constexprs={"HAS_MAP": False, "BLOCK_N": SMALL, "BLOCK_E": 1, "BLOCK_B": FILL, "FILL": FILL},
            num_warps=8)
for _map in (False, True):
    static_case(f"_align_prefix_kernel[E128,map={_map}]", _align_prefix_kernel,
                signature={"counts_ptr": "*i32", "cursor_ptr": "*i32", "expert_ids_ptr": "*i32",
                           "npost_ptr": "*i32", "expert_map_ptr": "*i32", "num_experts": "i32", "num_blocks": "i32",
                           "block_size": "i32",
                           "HAS_MAP": "constexpr", "BLOCK_E": "constexpr", "BLOCK_B": "constexpr"},
                constexprs={"HAS_MAP": _map, "BLOCK_E": 128, "BLOCK_B": BLOCK_B})
