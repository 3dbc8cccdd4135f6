"""Fused MoE in Triton: one grouped-GEMM kernel for both expert GEMMs, and a deterministic combine.

Pipeline of :func:`fused_moe` (x ``[T, H]``, w13 ``[E, 2I, H]``, w2 ``[E, H, I]``, k routed experts per token):

1. :func:`omni_fast.kernels.moe_align.moe_align_block_size` groups the ``T*k`` (token, slot) pairs by expert in
   runs padded to ``BLOCK_SIZE_M`` rows, so every M tile of the grouped GEMM belongs to one expert.
2. ``moe_gemm_kernel`` with ``GATED``: ``act[i] = silu(x[i // k] @ w13[e, :I].T) * (x[i // k] @ w13[e, I:].T)``
   for each pair ``i = t*k + j``: each program loads the A rows of its tile (gathered by token), and the gate and
   the up tile of w13 (rows ``n`` and ``I + n``), keeps two fp32 accumulators and applies SwiGLU in the fp32
   epilogue; ``act`` ``[T*k, I]`` is stored in the model dtype (it feeds the next tensor-core GEMM).
3. ``moe_gemm_kernel`` with ``MUL_ROUTED_WEIGHT``: ``y[i] = (act[i] @ w2[e].T) * topk_weights[i]`` into
   ``[T*k, H]`` (model dtype).
4. ``moe_combine_kernel``: ``out[t] = sum_j y[t*k + j]`` in fp32, in slot order ``j = 0..k-1`` (plus an optional
   addend, e.g. the shared expert), one rounding. No float atomics: the result is bitwise reproducible.

Grouped program ordering: the ``(m, n)`` tile grid is walked in groups of ``GROUP_SIZE_M`` M tiles per N tile, so
consecutive programs reuse the same weight tile (same expert) from L2. Tiles past ``num_tokens_post_padded``
exit at once; tiles of an expert not on this rank (``expert_ids == -1``) write zeros. Sizes depend only on shapes
(no host sync; CUDA-graph safe).

Weight tiles come through pointer loads or, with ``USE_TMA`` in the launch config, through a host-side TMA tensor
descriptor over the ``[E*N, K]`` view of the weights (:mod:`omni_fast.kernels.tma`; pointers wherever the layout
does not allow one). The A rows are a gather (scattered tokens) and always use pointers.

Operands are fed to ``tl.dot`` in their own dtype (fp16/bf16 tensor cores, fp32 accumulation; fp32 inputs use
``input_precision="ieee"``). Under the CPU interpreter, whose bf16/fp16 dot is not trustworthy, ``UPCAST`` converts
the loaded tiles to fp32 first; compiled kernels never set it.

Launch configs come from tuned JSON files (:func:`get_config`), else from :func:`default_config`.
"""

from __future__ import annotations

import copy
import functools
import glob
import json
import os
import re

import torch
import triton
import triton.language as tl

from .. import fast_paths
from .launch import CONFIG_DIR, device_name, interpreting, launch, tuned_config
from .tile_counters import tile_counters
from .moe_align import moe_align_block_size
from .tma import stacked_matrix_descriptor

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
CONFIG_FAMILY = "moe"
_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_SIZE_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in the grouped order: GROUP_SIZE_M M tiles per N tile, column-major."""
    width = GROUP_SIZE_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_SIZE_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _tile_rows(c_ptr, sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n, N, num_valid, stride_cm,
               BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):
    """The rows and columns of tile (pid_m, pid_n) of a grouped GEMM (shared by the float and quantized kernels).

    Returns (pair int64 ``[BM]``: the (token, slot) pair of each row, row_mask, offs_n ``[BN]``, mask_n, c_ptrs /
    c_mask ``[BM, BN]`` of the output tile, expert int64: the tile's local expert, -1 when held elsewhere).
    """
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_mask = pair < num_valid
    pair = pair.to(tl.int64)
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    mask_n = offs_n < N
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :]
    c_mask = row_mask[:, None] & mask_n[None, :]
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    return pair, row_mask, offs_n, mask_n, c_ptrs, c_mask, expert


@triton.jit
def _store_tile(acc, acc_up, c_ptrs, c_mask, topk_weights_ptr, pair, row_mask,
                GATED: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr):
    """The fp32 epilogue: SwiGLU (GATED: silu(acc) * acc_up) or the routed weight, one rounding to C's dtype."""
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_ROUTED_WEIGHT:
        w = tl.load(topk_weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    tl.store(c_ptrs, acc.to(c_ptrs.dtype.element_ty), mask=c_mask)


@triton.jit
def _load_b_tiles(b_src, b_base, b_offs, b_up_off, tma_row, k0, mask_k, mask_n,
                  GATED: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` weight tile(s) at K offset ``k0``: (B, B_up) (B_up is B when not GATED).

    Pointer path: masked loads at ``b_base + k0 + b_offs`` (up tile ``b_up_off`` elements further). TMA path:
    ``b_src`` is a descriptor over the ``[E*N_rows, K]`` view; rows ``tma_row..+BLOCK_N`` (up tile ``b_up_off``
    rows further), transposed in shared memory for the dot. Its zero fill covers the K tail; rows past this expert's
    N belong to the next rows of the view (or are zero past the end) and only reach output columns that are
    never stored, since column ``n`` of ``A @ B`` reads only row ``n`` of the weights.
    """
    if USE_TMA:
        b = b_src.load([tma_row, k0]).T
        if GATED:
            b_up = b_src.load([tma_row + b_up_off, k0]).T
        else:
            b_up = b
    else:
        b_mask = mask_k[:, None] & mask_n[None, :]
        b = tl.load(b_base + k0 + b_offs, mask=b_mask, other=0.0)
        if GATED:
            b_up = tl.load(b_base + b_up_off + k0 + b_offs, mask=b_mask, other=0.0)
        else:
            b_up = b
    if UPCAST:
        b = b.to(tl.float32)
        b_up = b_up.to(tl.float32)
    return b, b_up


@triton.jit
def _split_k_fixup(acc, acc_up, ws_ptr, cnt_ptr, tile, pid_s, offs_ws, ws_mask, ws_stride,
                   SPLITS: tl.constexpr, GATED: tl.constexpr):
    """Split-K: store this program's fp32 partial(s) (``ws[s]``, and ``ws[SPLITS + s]`` for the up GEMM), then
    take a ticket on the tile's counter (CTA barrier, acq_rel gpu-scope atomic: cumulative over the barrier). The
    program that draws the last ticket gets the partials summed in split order (bitwise the same whoever finishes
    last) and resets the counter; returns (last, acc, acc_up)."""
    tl.store(ws_ptr + pid_s * ws_stride + offs_ws, acc, mask=ws_mask)
    if GATED:
        tl.store(ws_ptr + (SPLITS + pid_s) * ws_stride + offs_ws, acc_up, mask=ws_mask)
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = ticket == SPLITS - 1
    if last:
        acc = tl.zeros(acc.shape, dtype=tl.float32)
        acc_up = tl.zeros(acc.shape, dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(ws_ptr + s * ws_stride + offs_ws, mask=ws_mask, other=0.0, cache_modifier=".cg")
            if GATED:
                acc_up += tl.load(ws_ptr + (SPLITS + s) * ws_stride + offs_ws, mask=ws_mask, other=0.0,
                                  cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
    return last, acc, acc_up


@triton.jit
def moe_gemm_kernel(
    a_ptr, b_src, c_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, npost_ptr,
    N, K, num_valid, num_pid_m, top_k, num_experts,
    stride_am, stride_be, stride_bn, stride_cm,
    GATED: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, A_PER_TOKEN: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr, ws_ptr, cnt_ptr, k_split, SPLIT_K: tl.constexpr,
):
    """C[i, :N] for the pairs ``i`` of each expert tile: A rows ``[*, K]``, B = expert weights ``[E, N(x2), K]``.

    ``b_src`` is a pointer to B or, with USE_TMA, a tensor descriptor over its 2-D view ``[E*N(x2), K]`` with
    ``[BLOCK_SIZE_N, BLOCK_SIZE_K]`` blocks; its B strides then count rows of that view (``stride_be`` = rows
    per expert, ``stride_bn`` = 1) instead of elements.
    GATED: B holds gate rows ``0..N-1`` then up rows ``N..2N-1``; C = silu(A B_gate^T) * (A B_up^T).
    MUL_ROUTED_WEIGHT: C = (A B^T) * topk_weights[i]. A_PER_TOKEN: A row of pair i is ``i // top_k``.
    ``num_experts`` = E_local: tiles whose expert is outside ``[0, E_local)`` store zeros.
    ``SPLIT_K`` > 1 (opt-in, decode grid fill): the grid has SPLIT_K programs per tile (splits outermost), each
    over ``k_split`` of K, reduced by :func:`_split_k_fixup` into fp32 workspace ``ws`` ``[SPLIT_K (x2 GATED),
    num_pid_m * BLOCK_SIZE_M, N]`` before the same epilogue.
    """
    tiles = num_pid_m * tl.cdiv(N, BLOCK_SIZE_N)
    pid = tl.program_id(0)
    pid_s = pid // tiles
    pid_m, pid_n = _grouped_tile(pid % tiles, num_pid_m, tl.cdiv(N, BLOCK_SIZE_N), GROUP_SIZE_M)
    if pid_m * BLOCK_SIZE_M >= tl.load(npost_ptr):
        return
    pair, row_mask, offs_n, mask_n, c_ptrs, c_mask, expert = _tile_rows(
        c_ptr, sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n, N, num_valid, stride_cm, BLOCK_SIZE_M, BLOCK_SIZE_N)
    if (expert < 0) | (expert >= num_experts):
        # An expert held by another rank (-1): its pairs contribute zero here. So does an out-of-range expert_map
        # value (unchecked on CUDA, where the check would sync): no weight outside w13/w2 [E_local] is read.
        tl.store(c_ptrs, tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=c_ptr.dtype.element_ty), mask=c_mask)
        return
    a_row = pair // top_k if A_PER_TOKEN else pair
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    # Loop-carried state: one pointer per A row and, on the pointer path, a scalar base pointer for the expert's
    # weights and one offset tile that the gate and the up loads share (the up rows sit N rows after the gate
    # rows). The TMA path carries only the tile's first row in the 2-D view (int32, as descriptor coordinates).
    a_rows = a_ptr + a_row * stride_am
    if USE_TMA:
        b_base = b_src
        b_offs = 0
        tma_row = (expert * stride_be + pid_n * BLOCK_SIZE_N).to(tl.int32)
    else:
        b_base = b_src + expert * stride_be
        b_offs = offs_n[None, :] * stride_bn + offs_k[:, None]
        tma_row = 0
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)  # unused (and dropped) unless GATED
    k_lo, k_hi = 0, K
    if SPLIT_K > 1:
        k_lo = pid_s * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_SIZE_K):
        mask_k = offs_k < k_hi - k0
        a = tl.load(a_rows[:, None] + (k0 + offs_k)[None, :], mask=row_mask[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        b, b_up = _load_b_tiles(b_src, b_base, b_offs, N * stride_bn, tma_row, k0, mask_k, mask_n,
                                GATED, USE_TMA, UPCAST)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
    if SPLIT_K > 1:
        offs_ws = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M))[:, None] * N + offs_n[None, :]
        last, acc, acc_up = _split_k_fixup(acc, acc_up, ws_ptr, cnt_ptr, pid % tiles, pid_s, offs_ws, c_mask,
                                           num_pid_m * BLOCK_SIZE_M * N, SPLIT_K, GATED)
        if last:
            _store_tile(acc, acc_up, c_ptrs, c_mask, topk_weights_ptr, pair, row_mask, GATED, MUL_ROUTED_WEIGHT)
    else:
        _store_tile(acc, acc_up, c_ptrs, c_mask, topk_weights_ptr, pair, row_mask, GATED, MUL_ROUTED_WEIGHT)


@triton.jit
def moe_combine_kernel(y_ptr, ids_ptr, add_ptr, out_ptr, H, top_k, num_experts, stride_add, stride_out,
                       HAS_ADD: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t, h] = sum over j = 0..k-1 (in order) of y[t*k + j, h] (+ add[t, h]), fp32 sum, one rounding.

    Pairs whose global id ``ids[t*k + j]`` is outside ``[0, num_experts)`` are skipped: the alignment dropped them,
    so their y rows were never written.
    """
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in range(top_k):
        e = tl.load(ids_ptr + t * top_k + j) + tl.zeros((BLOCK_H,), dtype=tl.int32)  # the pair's id, per lane
        ok = mask & (e >= 0) & (e < num_experts)
        acc += tl.load(y_ptr + (t * top_k + j) * H + offs_h, mask=ok, other=0.0).to(tl.float32)
    if HAS_ADD:
        acc += tl.load(add_ptr + t * stride_add + offs_h, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + offs_h, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --- launch configs ----------------------------------------------------------------------------------------------


def config_file_stem(num_experts: int, inter: int, dtype: torch.dtype | str, device: torch.device | None,
                     triton_version: str | None = None) -> str:
    """``E=128,N=768,dtype=bf16,device=NVIDIA_H100_80GB_HBM3,triton=3.6.0``: one tuned file per shape/device.
    A str ``dtype`` is a quantized format's tag in vLLM's spelling, e.g. ``fp8_w8a8,block_shape=[128,128]``
    (:func:`omni_fast.kernels.moe_gemm_quant.config_key`): the same lookup, files of their own."""
    ver, tag = triton_version or triton.__version__, dtype if isinstance(dtype, str) else _DTYPE_NAMES[dtype]
    return f"E={num_experts},N={inter},dtype={tag},device={device_name(device)},triton={ver}"


# One program per SM of an H100 SXM (132 SMs): the decode tier shrinks its N tiles until a launch has this many.
TARGET_CTAS = 132
MIN_BLOCK_N = 16  # the narrowest tensor-core dot
# Then split K (deterministic last-arriver reduction, no extra launch) where 16-column tiles are still too few
# (the talker's one-expert shared expert). Opt-in until a GPU run passes tests/test_moe_fill.py's gpu split-K test:
# the fast path "moe_splitk" of omni_fast.fast_paths (OMNI_FAST_MOE_SPLITK=1, or fast_paths.enable("moe_splitk")).
MAX_SPLITS = 8


def fill_grid(cfg: dict, num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int) -> dict:
    """Grid fill at decode (``BLOCK_SIZE_M`` 16, the decode tier of :func:`default_config`): halve each GEMM's
    ``BLOCK_SIZE_N`` (64 -> 32 -> 16) until its launch has at least :data:`TARGET_CTAS` programs, and use 4 warps
    for a tile 32 or fewer columns wide (16-byte loads per thread). Edits and returns ``cfg``.

    The programs counted are the grid's: ``M tiles x N tiles`` with ``M tiles`` = the alignment's block count
    ``ceil(max_padded(T*k, E, 16) / 16)`` (= ``T*k`` when every pair can have its own expert, as at T = 1), an
    upper bound on the tiles with work that depends on shapes only. Narrower tiles read the same weight bytes
    (each program streams ``BLOCK_N`` rows of one expert), only spread over more SMs; every row's K reduction is
    unchanged (same ``BLOCK_SIZE_K`` steps), so results do not depend on the choice. At the real shapes
    (predicted by ``python -m omni_fast.bench.model``, not measured): talker T=1 routed gate/up 36 -> 144
    programs, down 96 -> 192, shared expert gate/up 12 -> 48, down 16 -> 64; thinker T=1 gate/up 96 -> 192.
    With the ``moe_splitk`` fast path (opt-in), a GEMM still short of the target also gets ``SPLIT_K`` (the fewest
    splits reaching it, whole ``BLOCK_SIZE_K`` steps; :func:`_split_k_fixup`): the shared expert's gate/up 48 -> 144
    (3 splits of K 1024), down 64 -> 192 (3 of 768). Deterministic, but the fp32 partials are added in another
    order than one program's sum.
    """
    if cfg["BLOCK_SIZE_M"] != 16:
        return cfg
    split_k = fast_paths.enabled("moe_splitk")  # read per call: a toggle applies to the next config
    pairs = num_tokens * top_k
    m_tiles = -(-(pairs + min(num_experts, pairs) * 15) // 16)
    for part, n, k in ((cfg, inter, hidden), (cfg["down"], hidden, inter)):
        bn = part["BLOCK_SIZE_N"]
        while bn > MIN_BLOCK_N and m_tiles * -(-n // bn) < TARGET_CTAS:
            bn //= 2
        if bn != part["BLOCK_SIZE_N"]:
            part["BLOCK_SIZE_N"] = bn
            part["num_warps"] = 4
        tiles = m_tiles * -(-n // bn)
        if split_k and tiles < TARGET_CTAS:
            splits = _k_splits(min(MAX_SPLITS, -(-TARGET_CTAS // tiles)), k, part["BLOCK_SIZE_K"])[0]
            if splits > 1:
                part["SPLIT_K"] = splits
    return cfg


def default_config(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int,
                   dtype: torch.dtype, fill: bool = False) -> dict:
    """The fallback heuristic when no tuned file matches (documented in docs/moe.md).

    Keyed on the mean rows per expert, ``T*k/E``; the top-level keys drive the gate/up GEMM (two B tiles and two
    accumulators: effectively twice BLOCK_SIZE_N wide), ``down`` the second GEMM:

    - <= 16 (decode): BLOCK_M 16 (the smallest tensor-core M); wide K tiles so each program streams long
      contiguous runs of one expert's weights: decode is weight-bandwidth bound.
    - <= 32: BLOCK_M 32. <= 128: BLOCK_M 64, 64x64 tiles, 8 warps, GROUP_SIZE_M 8 so consecutive programs
      share an expert's weight tile in L2.
    - > 128 (prefill): BLOCK_M 64, gate/up 64x128x64 (wgmma m64n64 instead of the shared-memory-bound m64n32 of
      64x64 tiles; 128x128 spills its two accumulators), down 64x256x64 (wgmma m64n128), 8 warps, 4 stages.
      vLLM's tuned H100 shape for E=128 at M=4096 uses 128-row tiles; with 64 rows the alignment pads half as
      much (12 % instead of 24 % extra MMA at T=4096 on the thinker), which the cost model
      (``python -m omni_fast.bench.costmodel.whatif``) predicts to be worth more (predicted, not measured).

    ``fill`` (the float experts): decode-tier N tiles narrowed so that every SM gets a program
    (:func:`fill_grid`). Every choice compiles for sm_90a without register spills
    (``python -m omni_fast.bench.static_check``). fp32 halves K.
    """
    rows = num_tokens * top_k / max(num_experts, 1)
    if rows <= 16:
        cfg = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=8, num_stages=4,
                   down=dict(BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=4))
    elif rows <= 32:
        cfg = dict(BLOCK_SIZE_M=32, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=4,
                   down=dict(BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=4))
    elif rows <= 128:
        cfg = dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=3,
                   down=dict(BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=3))
    else:  # 64x128 gate/up tiles: wgmma m64n64 (64x64 tiles issue m64n32: shared-memory bound), down 64x256
        cfg = dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=4,
                   down=dict(BLOCK_SIZE_N=256, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=4))
    if dtype == torch.float32:
        cfg["BLOCK_SIZE_K"] = max(32, cfg["BLOCK_SIZE_K"] // 2)
        cfg["down"]["BLOCK_SIZE_K"] = max(32, cfg["down"]["BLOCK_SIZE_K"] // 2)
    return fill_grid(cfg, num_tokens, num_experts, top_k, hidden, inter) if fill else cfg


# The shipped UNTUNED starting points (configs/moe/*.json with an "UNTUNED" provenance: public vLLM figures + the
# sm_90a static check, never run on a GPU) turn on the TMA weight path at large T, so they are opt-in until a GPU
# run passes their tests (the project rule for new fast paths: the "moe_starting_configs" fast path of
# omni_fast.fast_paths, OMNI_FAST_MOE_STARTING_CONFIGS=1); files written by bench.tune_moe are always used.


def _usable_config_file(stem: str, starting: bool) -> bool:
    path = CONFIG_DIR / CONFIG_FAMILY / f"{stem}.json"
    if starting or not path.is_file():
        return True
    with open(path) as f:
        return not str(json.load(f).get("provenance", "")).startswith("UNTUNED")


@functools.lru_cache(maxsize=4096)
def _find_tuned(num_experts: int, inter: int, dtype: torch.dtype, device: torch.device, num_tokens: int,
                starting: bool = False) -> dict | None:
    """Cached per call shape: the lookup touches the file system, which a decode step must not pay each time.
    ``starting``: the untuned starting-point files count too (the ``moe_starting_configs`` fast path; part of the
    cache key, so switching it applies to the next lookup)."""
    stem = config_file_stem(num_experts, inter, dtype, device)
    cfg = tuned_config(CONFIG_FAMILY, stem, num_tokens) if _usable_config_file(stem, starting) else None
    if cfg is not None:
        return cfg
    # A file tuned with another Triton version on the same device beats the heuristic: the newest version wins.
    prefix = stem.rsplit(",triton=", 1)[0] + ",triton="
    names = [os.path.basename(path)[:-len(".json")]
             for path in glob.glob(os.path.join(glob.escape(str(CONFIG_DIR / CONFIG_FAMILY)), "*.json"))]
    names = [name for name in names if name.startswith(prefix) and _usable_config_file(name, starting)]
    if not names:
        return None
    newest = max(names, key=lambda name: version_key(name[len(prefix):]))
    return tuned_config(CONFIG_FAMILY, newest, num_tokens)


def version_key(version: str) -> tuple[int, ...]:
    """``"3.10.0+git1a2b"`` -> ``(3, 10, 0)``: the leading numeric release, compared as numbers (3.10 > 3.9)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def get_config(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype | str,
               device: torch.device, fill: bool = False) -> dict:
    """Tuned config for (E, N=I, dtype, device, triton) and the nearest token bucket, else :func:`default_config`.

    A config has ``BLOCK_SIZE_M/N/K``, ``GROUP_SIZE_M``, ``num_warps``, ``num_stages`` for the gate/up GEMM and
    optionally a ``"down"`` dict overriding N/K/group/warps/stages for the down GEMM (BLOCK_SIZE_M is shared:
    it is the alignment block). ``fill``: the heuristic's decode tiles fill the SMs (:func:`fill_grid`); a tuned
    file is taken as it is.
    """
    if interpreting():
        # The interpreter runs one program at a time: the heuristic's small-T tiles keep tests fast.
        return default_config(num_tokens, num_experts, top_k, hidden, inter, dtype, fill)
    if device.type == "cuda":
        cfg = _find_tuned(num_experts, inter, dtype, device, num_tokens,
                          fast_paths.enabled("moe_starting_configs"))
        if cfg is not None:
            return copy.deepcopy(cfg)
    return default_config(num_tokens, num_experts, top_k, hidden, inter, dtype, fill)


def _split(cfg: dict) -> tuple[dict, dict]:
    up = {k: cfg[k] for k in _KEYS}
    up["USE_TMA"] = bool(cfg.get("USE_TMA", False))
    down = dict(up)
    down.update({k: v for k, v in cfg.get("down", {}).items() if k in _KEYS + ("USE_TMA",) and k != "BLOCK_SIZE_M"})
    up["SPLIT_K"], down["SPLIT_K"] = cfg.get("SPLIT_K", 1), cfg.get("down", {}).get("SPLIT_K", 1)
    return up, down


def weight_source(b: torch.Tensor, cfg: dict):
    """What the kernel reads the weights ``b`` ``[E, N(x2), K]`` through: a TMA descriptor over the ``[E*N, K]``
    view with ``[BLOCK_SIZE_N, BLOCK_SIZE_K]`` blocks when the config asks for ``USE_TMA`` and the layout allows
    one (:func:`omni_fast.kernels.tma.stacked_matrix_descriptor`), else ``b`` itself (the pointer path)."""
    if cfg.get("USE_TMA"):
        desc = stacked_matrix_descriptor(b, (cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]))
        if desc is not None:
            return desc
    return b


def _launch_gemm(a, b, c, topk_weights, sorted_ids, expert_ids, npost, N, K, num_valid, top_k, *, gated,
                 mul_weight, a_per_token, cfg):
    num_pid_m = expert_ids.numel()
    splits, k_split = _k_splits(cfg.get("SPLIT_K", 1), K, cfg["BLOCK_SIZE_K"])
    grid = (num_pid_m * triton.cdiv(N, cfg["BLOCK_SIZE_N"]) * splits,)
    ws, cnt = c, sorted_ids  # unused without SPLIT_K
    if splits > 1:
        ws = torch.empty((2 if gated else 1) * splits, num_pid_m * cfg["BLOCK_SIZE_M"], N, dtype=torch.float32,
                         device=a.device)
        cnt = tile_counters(a.device, grid[0] // splits)
    precision = "ieee" if (a.dtype == torch.float32 or interpreting()) else "tf32"
    b_src = weight_source(b, cfg)
    use_tma = b_src is not b
    # Descriptor coordinates count rows of the [E*N(x2), K] view: expert e starts at row e * b.shape[1].
    stride_be, stride_bn = (b.shape[1], 1) if use_tma else (b.stride(0), b.stride(1))
    launch(moe_gemm_kernel, grid, a, b_src, c, topk_weights, sorted_ids, expert_ids, npost,
           N, K, num_valid, num_pid_m, top_k, b.shape[0],
           a.stride(0), stride_be, stride_bn, c.stride(0),
           GATED=gated, MUL_ROUTED_WEIGHT=mul_weight, A_PER_TOKEN=a_per_token, UPCAST=interpreting(),
           DOT_PRECISION=precision, USE_TMA=use_tma, BLOCK_SIZE_M=cfg["BLOCK_SIZE_M"],
           BLOCK_SIZE_N=cfg["BLOCK_SIZE_N"], BLOCK_SIZE_K=cfg["BLOCK_SIZE_K"], GROUP_SIZE_M=cfg["GROUP_SIZE_M"],
           ws_ptr=ws, cnt_ptr=cnt, k_split=k_split, SPLIT_K=splits,
           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], device=a.device)


def _k_splits(want: int, K: int, block_k: int) -> tuple[int, int]:
    """(splits, K per split): at most ``want`` splits of whole ``block_k`` steps, none empty; (1, K) for 1."""
    k_blocks = triton.cdiv(K, block_k)
    want = max(1, min(want, k_blocks))
    if want == 1:
        return 1, K
    per = triton.cdiv(k_blocks, want)
    return triton.cdiv(k_blocks, per), per * block_k


def combine(y: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, out: torch.Tensor,
            add: torch.Tensor | None = None) -> torch.Tensor:
    """out ``[T, H]`` = per-token sum of the k rows of y ``[T*k, H]`` (+ add ``[T, H]``), deterministic; rows of
    pairs whose id in topk_ids (contiguous ``[T, k]``) is outside ``[0, num_experts)`` are skipped."""
    T, H = out.shape
    top_k = topk_ids.shape[1]
    block_h = min(1024, triton.next_power_of_2(max(H, 1)))
    launch(moe_combine_kernel, (T, triton.cdiv(H, block_h)), y, topk_ids, add if add is not None else out, out, H,
           top_k, num_experts, add.stride(0) if add is not None else 0, out.stride(0), HAS_ADD=add is not None, BLOCK_H=block_h,
           num_warps=4, device=out.device)
    return out


def fused_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu", expert_map: torch.Tensor | None = None,
              out: torch.Tensor | None = None, *, add: torch.Tensor | None = None, config: dict | None = None
              ) -> torch.Tensor:
    """Routed experts on validated inputs; see the module docstring. Returns out ``[T, H]``.

    hidden_states ``[T, H]`` (unit stride in H), w13 ``[E_local, 2I, H]``, w2 ``[E_local, H, I]`` (unit stride in
    the last dim), topk_weights ``[T, k]`` (any float dtype), topk_ids int ``[T, k]`` global expert ids,
    expert_map int32 ``[E_global]`` or None. ``add`` ``[T, H]`` is added before the final rounding (shared
    expert). ``config`` overrides the launch config (tests).
    """
    assert activation == "silu"
    E_local, two_i, _ = w13.shape
    return run_experts(hidden_states, w13, w2, topk_weights, topk_ids, E_local, two_i // 2, _launch_gemm,
                       hidden_states.dtype, expert_map, out, add=add, config=config, fill=True)


def run_experts(hidden_states, w13, w2, topk_weights, topk_ids, num_local: int, inter: int, gemm,
                config_dtype: torch.dtype | str, expert_map=None, out=None, *, add=None, config=None, adjust=None,
                fill: bool = False):
    """The fused-MoE pipeline around a grouped-GEMM launcher ``gemm`` (shared by the float and the quantized
    experts): launch config, alignment, gate/up GEMM + SwiGLU into ``act [T*k, I]``, down GEMM + routed weight
    into ``y [T*k, H]``, deterministic combine into ``out [T, H]``.

    ``gemm(a, b, c, topk_weights, sorted_ids, expert_ids, npost, N, K, num_valid, top_k, *, gated, mul_weight,
    a_per_token, cfg)`` with ``b`` = ``w13`` or ``w2`` as given (opaque here). ``config_dtype`` keys the launch
    config; ``adjust(up_cfg, down_cfg)``, when given, edits the split configs in place (e.g. BLOCK_SIZE_K = the
    quantization group) before the alignment, which uses ``up_cfg["BLOCK_SIZE_M"]``. ``fill``: decode tiles
    that fill the SMs when the heuristic chooses (:func:`fill_grid`; the float experts).
    """
    T, H = hidden_states.shape
    top_k = topk_ids.shape[1]
    E_global = expert_map.numel() if expert_map is not None else num_local
    if out is None:
        out = torch.empty_like(hidden_states)
    if T == 0:
        return out
    cfg = config or get_config(T, E_global, top_k, H, inter, config_dtype, hidden_states.device, fill)
    up_cfg, down_cfg = _split(cfg)
    if adjust is not None:
        adjust(up_cfg, down_cfg)
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    sorted_ids, expert_ids, npost = moe_align_block_size(topk_ids, up_cfg["BLOCK_SIZE_M"], E_global, expert_map)
    n = T * top_k
    act = torch.empty(n, inter, dtype=hidden_states.dtype, device=hidden_states.device)
    gemm(hidden_states, w13, act, topk_weights, sorted_ids, expert_ids, npost, inter, H, n, top_k,
         gated=True, mul_weight=False, a_per_token=True, cfg=up_cfg)
    y = torch.empty(n, H, dtype=hidden_states.dtype, device=hidden_states.device)
    gemm(act, w2, y, topk_weights, sorted_ids, expert_ids, npost, H, inter, n, top_k,
         gated=False, mul_weight=True, a_per_token=False, cfg=down_cfg)
    return combine(y, topk_ids, E_global, out, add)
