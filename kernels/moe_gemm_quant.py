"""Fused MoE on quantized experts (:class:`omni_fast.ops.quant.QuantizedExperts`): FP8 W8A8 block-scaled and INT4
W4A16, in the pipeline of :mod:`omni_fast.kernels.moe_gemm` (same alignment, tile order, SwiGLU / routed-weight
epilogue and deterministic combine: :func:`~omni_fast.kernels.moe_gemm.run_experts`); only the K loop differs.

``fp8_block`` (``FORMAT="fp8"``): ``BLOCK_SIZE_K`` = the weight block's ``bk`` (= the activation group), so each K
tile is one activation group and one weight-scale column. Per tile, the A rows are quantized in registers: scale
``a_s = max(amax_row, 1e-10) / 448``, ``a_q = e4m3(a / a_s)`` (no separate quantization launch, no A copy); the
e4m3 x e4m3 dot (FP8 wgmma on sm_90a) gives fp32 partial sums that are scaled by ``a_s[m] * w_s[n // bn]`` and
added to the fp32 accumulator. (The scale differs per K tile, so the partial product cannot accumulate inside
the dot.)

``int4_w4a16`` (``FORMAT="int4"``): ``BLOCK_SIZE_K`` divides the group, so one scale (and zero point) per column
per tile. The packed words are read straight from compressed-tensors' layout (``[N, K/8]`` int32, value ``k`` in
bits ``4*(k % 8)``), each nibble is unpacked with integer shifts, ``(q - 8 - zero) * scale`` in fp32, rounded to
the activation dtype and fed to the fp16/bf16 tensor cores.

``fp8_channel`` (``FORMAT="fp8c"``): one weight scale per output row and one activation scale per A row that
are constant along K, so the e4m3 x e4m3 partial products accumulate inside the dot (fp32) over the whole K and
are scaled once at the end by ``a_s[m] * w_s[n]`` (the fp8_block path's K loop with a degenerate group of the
whole K would re-scale every tile for nothing). Dynamic activations: a first pass over the K tiles of the
program's A rows finds each row's amax (per token for gate/up, per (token, expert) row for down; A is re-read,
from L2 at decode sizes), ``a_s = max(amax, 1e-10) / 448``; ``STATIC_A``: ``a_s`` = the expert's input scale.

Under the CPU interpreter (``UPCAST``), A and dequantized B are fp32; the interpreter's fp32 -> e4m3 conversion
does not carry a mantissa round-up into the exponent (7.94 -> 4, not 8), so ``EMULATE_FP8`` first rounds to the
e4m3 grid with exact fp32 arithmetic, which makes the conversion exact. Compiled kernels never set either.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import clamp, interpreting, launch, static_case
from .moe_gemm import _KEYS, _grouped_tile, _split, _store_tile, _tile_rows, default_config, run_experts

FP8_MAX = 448.0
_FORMATS = {"fp8_block": "fp8", "int4_w4a16": "int4", "fp8_channel": "fp8c"}


@triton.jit
def _round_e4m3(x):
    """x (fp32, |x| <= 448) rounded to the nearest e4m3 value (ties to even), exactly, in fp32 arithmetic.

    The step of x's binade is ``2^(e - 3)`` (3 mantissa bits), ``e`` = max(exponent, -6) (subnormals share the
    step of the lowest binade); adding and subtracting ``1.5 * 2^23`` rounds ``x / step`` to an integer.
    """
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23
    return ((x / step + magic) - magic) * step


@triton.jit
def _quant_a_fp8(a, EMULATE_FP8: tl.constexpr):
    """A tile ``[BM, BK]`` (one activation group per row) -> (e4m3 tile, fp32 row scales ``[BM]``)."""
    a = a.to(tl.float32)
    a_s = tl.maximum(tl.max(tl.abs(a), axis=1), 1e-10) / 448.0
    x = clamp(a / a_s[:, None], -448.0, 448.0)
    if EMULATE_FP8:
        x = _round_e4m3(x)
    return x.to(tl.float8e4nv), a_s


@triton.jit
def _quant_a_rows(a, a_s, a_inv, STATIC_A: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """A tile ``[BM, BK]`` with fixed fp32 row scales ``[BM]`` -> e4m3 tile (fp8_channel): per-tensor (STATIC_A)
    ``a * a_inv`` (vLLM's per-tensor quantization multiplies by the reciprocal), per-token ``a / a_s``."""
    if STATIC_A:
        x = clamp(a.to(tl.float32) * a_inv[:, None], -448.0, 448.0)
    else:
        x = clamp(a.to(tl.float32) / a_s[:, None], -448.0, 448.0)
    if EMULATE_FP8:
        x = _round_e4m3(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _row_amax_scale(a_rows, row_mask, offs_k, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dynamic per-row activation scale: ``max(amax over the K row, 1e-10) / 448`` (fp32 ``[BM]``)."""
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_mask[:, None] & (offs_k < K - k0)[None, :]
        a = tl.load(a_rows[:, None] + (k0 + offs_k)[None, :], mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=1))
    return tl.maximum(amax, 1e-10) / 448.0


@triton.jit
def amax_scale_kernel(a_ptr, rows_ptr, npost_ptr, part_ptr, num_rows, K, stride_am, num_valid,
                      INDIRECT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial per-tensor fp8 scales: program p writes ``part[p] = amax(|A[r, :]|) / 448`` over its rows ``r``
    (grid-stride by ``BLOCK_R``; 0 when it has none), so ``max(part)`` is vLLM's ``amax(|A|) / 448`` (its kernel
    also takes the max of per-row ``amax / 448``; the division is IEEE, as there).

    Direct: rows ``0 .. num_rows-1`` of A. INDIRECT: the rows the gate/up GEMM wrote, ``rows_ptr[i]`` (the
    alignment's sorted ids) for ``i < min(npost, num_rows)`` with ``rows_ptr[i] < num_valid`` (padding sentinels and
    never-written rows are left out). No atomics, no zero-initialised buffer: the reader takes the max.
    """
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_R
    n = num_rows
    if INDIRECT:
        n = tl.minimum(tl.load(npost_ptr), num_rows)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for r0 in range(pid * BLOCK_R, n, step):
        r_mask = r0 + offs_r < n
        rows = r0 + offs_r
        if INDIRECT:
            rows = tl.load(rows_ptr + r0 + offs_r, mask=r_mask, other=0)
            r_mask = r_mask & (rows >= 0) & (rows < num_valid)
        for k0 in range(0, K, BLOCK_K):
            mask = r_mask[:, None] & (offs_k < K - k0)[None, :]
            a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * stride_am + (k0 + offs_k)[None, :], mask=mask,
                        other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=1))
    tl.store(part_ptr + pid, tl.math.div_rn(tl.max(amax, axis=0), 448.0))


@triton.jit
def _quant_b_tile(b_base, s_base, z_base, row0, srow0, k0, offs_k, offs_n, mask_k, mask_n, K, stride_bn,
                  stride_sn, BLOCK_K: tl.constexpr, FORMAT: tl.constexpr, QUANT_N: tl.constexpr,
                  GROUP_K: tl.constexpr, HAS_ZERO: tl.constexpr, UPCAST: tl.constexpr, A_DTYPE: tl.constexpr):
    """The ``[BK, BN]`` weight tile of rows ``row0 + offs_n`` at K offset ``k0``, and its per-column scale.

    fp8: (e4m3 tile, fp32 scale ``[BN]`` of block row ``srow0 + n // QUANT_N``, column ``k0 // GROUP_K``).
    fp8c: (e4m3 tile, 1.0): its per-row scales are applied after the K loop.
    int4: (dequantized tile in A's dtype, or fp32 with UPCAST; the fp32 scale, already applied): scales / zero
    points are per row ``row0 + n`` and group ``k0 // GROUP_K``.
    """
    b_mask = mask_k[:, None] & mask_n[None, :]
    rows = row0 + offs_n
    g = k0 // GROUP_K
    if FORMAT == "fp8":
        b = tl.load(b_base + rows[None, :] * stride_bn + (k0 + offs_k)[:, None], mask=b_mask, other=0.0)
        scale = tl.load(s_base + (srow0 + offs_n // QUANT_N) * stride_sn + g, mask=mask_n, other=0.0)
    elif FORMAT == "fp8c":  # the row scales are applied once after the K loop
        b = tl.load(b_base + rows[None, :] * stride_bn + (k0 + offs_k)[:, None], mask=b_mask, other=0.0)
        scale = 1.0
    else:
        # One load of the BK/8 packed words per column, unpacked in registers: word w holds K rows 8w..8w+7.
        offs_w = tl.arange(0, BLOCK_K // 8)
        w_mask = (offs_w * 8 < K - k0)[:, None] & mask_n[None, :]
        words = tl.load(b_base + rows[None, :] * stride_bn + (k0 // 8 + offs_w)[:, None], mask=w_mask, other=0)
        shifts = tl.arange(0, 8) * 4
        q = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # arithmetic shift: the mask drops the sign bits
        q = tl.reshape(q, (BLOCK_K, q.shape[2])) - 8
        if HAS_ZERO:
            zero = tl.load(z_base + rows * stride_sn + g, mask=mask_n, other=0).to(tl.int32)
            q = q - zero[None, :]
        scale = tl.load(s_base + rows * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
        b = q.to(tl.float32) * scale[None, :]
        if not UPCAST:
            b = b.to(A_DTYPE)
    return b, scale


@triton.jit
def moe_gemm_quant_kernel(
    a_ptr, b_ptr, s_ptr, z_ptr, as_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, npost_ptr,
    N, K, num_valid, num_pid_m, top_k, num_experts,
    stride_am, stride_be, stride_bn, stride_se, stride_sn, stride_ase, stride_cm, up_srow,
    FORMAT: tl.constexpr, QUANT_N: tl.constexpr, GROUP_K: tl.constexpr, HAS_ZERO: tl.constexpr,
    STATIC_A: tl.constexpr, A_PARTS: tl.constexpr,
    GATED: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, A_PER_TOKEN: tl.constexpr, UPCAST: tl.constexpr,
    EMULATE_FP8: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
):
    """:func:`omni_fast.kernels.moe_gemm.moe_gemm_kernel` on quantized B (see the module docstring).

    B ``[E, N(x2), K]`` e4m3 (fp8) or ``[E, N(x2), K/8]`` int32 (int4), element strides ``stride_be``,
    ``stride_bn``; scales (and int4 zero points, same shape) ``[E, rows, K/GROUP_K]`` with strides ``stride_se``,
    ``stride_sn`` (unit stride along groups). GATED: up rows start at row N of B and at scale row ``up_srow``
    (fp8: ``ceil(N / QUANT_N)``; int4, fp8c: N). fp8c: scales ``[E, rows, 1]`` (any strides: per-tensor scales
    are stride-0 views); STATIC_A: the activation scale is ``as_ptr[expert * stride_ase]``, else per A row.
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_SIZE_N), GROUP_SIZE_M)
    if pid_m * BLOCK_SIZE_M >= tl.load(npost_ptr):
        return
    pair, row_mask, offs_n, mask_n, c_ptrs, c_mask, expert = _tile_rows(
        c_ptr, sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n, N, num_valid, stride_cm, BLOCK_SIZE_M, BLOCK_SIZE_N)
    if (expert < 0) | (expert >= num_experts):  # held elsewhere (or out of range): zeros, no weight read
        tl.store(c_ptrs, tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=c_ptr.dtype.element_ty), mask=c_mask)
        return
    a_rows = a_ptr + (pair // top_k if A_PER_TOKEN else pair) * stride_am
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    b_base = b_ptr + expert * stride_be
    s_base = s_ptr + expert * stride_se
    z_base = z_ptr + expert * stride_se
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)  # unused (and dropped) unless GATED
    row_s = tl.zeros((BLOCK_SIZE_M,), dtype=tl.float32)  # fp8c's activation scales (loop-invariant)
    row_inv = row_s  # their IEEE reciprocals (per-tensor scales; 0 for a zero scale)
    if FORMAT == "fp8c":
        if STATIC_A:
            if A_PARTS == 1:
                row_s += tl.load(as_ptr + expert * stride_ase)
            else:
                row_s += tl.max(tl.load(as_ptr + tl.arange(0, A_PARTS)), axis=0)
            positive = row_s > 0  # (1 / 0 is never taken: the where would keep an inf's warnings and NaNs away)
            row_inv = tl.where(positive, tl.math.div_rn(tl.full((BLOCK_SIZE_M,), 1.0, tl.float32),
                                                        tl.where(positive, row_s, 1.0)), 0.0)
        else:
            row_s = _row_amax_scale(a_rows, row_mask, offs_k, K, BLOCK_SIZE_M, BLOCK_SIZE_K)
    for k0 in range(0, K, BLOCK_SIZE_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_rows[:, None] + (k0 + offs_k)[None, :], mask=row_mask[:, None] & mask_k[None, :], other=0.0)
        if FORMAT == "fp8":
            a_q, a_s = _quant_a_fp8(a, EMULATE_FP8)
        elif FORMAT == "fp8c":
            a_q = _quant_a_rows(a, row_s, row_inv, STATIC_A, EMULATE_FP8)
        elif UPCAST:
            a = a.to(tl.float32)
        b, b_s = _quant_b_tile(b_base, s_base, z_base, 0, 0, k0, offs_k, offs_n, mask_k, mask_n, K, stride_bn,
                               stride_sn, BLOCK_SIZE_K, FORMAT, QUANT_N, GROUP_K, HAS_ZERO, UPCAST,
                               a_ptr.dtype.element_ty)
        if FORMAT == "fp8":
            acc += tl.dot(a_q, b) * (a_s[:, None] * b_s[None, :])
        elif FORMAT == "fp8c":
            acc = tl.dot(a_q, b, acc)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            b, b_s = _quant_b_tile(b_base, s_base, z_base, N, up_srow, k0, offs_k, offs_n, mask_k, mask_n, K,
                                   stride_bn, stride_sn, BLOCK_SIZE_K, FORMAT, QUANT_N, GROUP_K, HAS_ZERO, UPCAST,
                                   a_ptr.dtype.element_ty)
            if FORMAT == "fp8":
                acc_up += tl.dot(a_q, b) * (a_s[:, None] * b_s[None, :])
            elif FORMAT == "fp8c":
                acc_up = tl.dot(a_q, b, acc_up)
            else:
                acc_up = tl.dot(a, b, acc_up, input_precision=DOT_PRECISION)
    if FORMAT == "fp8c":  # the constant-along-K scales, once: a_s per row, then w_s per output column (gate, up),
        # in vLLM's order (``accumulator * a_scale * b_scale``)
        w_s = tl.load(s_base + offs_n * stride_sn, mask=mask_n, other=0.0)
        acc = acc * row_s[:, None] * w_s[None, :]
        if GATED:
            w_s = tl.load(s_base + (up_srow + offs_n) * stride_sn, mask=mask_n, other=0.0)
            acc_up = acc_up * row_s[:, None] * w_s[None, :]
    _store_tile(acc, acc_up, c_ptrs, c_mask, topk_weights_ptr, pair, row_mask, GATED, MUL_ROUTED_WEIGHT)


# --- launch -------------------------------------------------------------------------------------------------------


def _group_k(experts) -> int:
    """The K granularity of the scales (fp8_channel: none; 0 stands for "the whole K")."""
    return {"fp8_block": (experts.block or (0, 0))[1], "int4_w4a16": experts.group_size}.get(experts.format, 0)


def adjust_config(experts, up_cfg: dict, down_cfg: dict) -> None:
    """K tiles follow the quantization: fp8 ``BLOCK_SIZE_K`` = the block's ``bk`` (one activation group per
    tile); int4 ``BLOCK_SIZE_K`` = min(tile K, group) (one scale per column per tile); fp8_channel keeps the float
    heuristic's K tile. No TMA (pointer loads)."""
    gk = _group_k(experts)
    for cfg in (up_cfg, down_cfg):
        if experts.format != "fp8_channel":  # fp8_channel: scales constant along K, the float K tile stays
            cfg["BLOCK_SIZE_K"] = gk if experts.format == "fp8_block" else min(cfg["BLOCK_SIZE_K"], gk)
        cfg["USE_TMA"] = False


# Programs of amax_scale_kernel = partial scales each GEMM program reads: 256 on a device (about two CTAs per SM of
# an H100, 8 KB of bf16 loads each per step: the reduction runs near bandwidth at prefill; 1 KB of partials per
# GEMM program, from L2); 16 under the interpreter, whose programs run one after another.
SCALE_PARTS = 16 if interpreting() else 256


def per_tensor_scale(a: torch.Tensor, rows: torch.Tensor | None = None, npost: torch.Tensor | None = None,
                     num_valid: int = 0) -> torch.Tensor:
    """vLLM's dynamic per-tensor fp8 scale of A ``[n, K]`` (16/32-bit, unit stride along K) as
    :data:`SCALE_PARTS` fp32 partials (the scale is their max; one launch, no host sync, no zero fill): over all
    rows, or with ``rows`` (int32 sorted ids) / ``npost`` (int32 ``[1]``) over the rows ``rows[i] < num_valid``,
    ``i < npost`` (what the gate/up GEMM wrote)."""
    part = torch.empty(SCALE_PARTS, dtype=torch.float32, device=a.device)
    indirect = rows is not None
    launch(amax_scale_kernel, (SCALE_PARTS,), a, rows if indirect else part, npost if indirect else part, part,
           rows.numel() if indirect else a.shape[0], a.shape[1], a.stride(0), num_valid, INDIRECT=indirect,
           BLOCK_R=16, BLOCK_K=256, num_warps=4, device=a.device)
    return part


def _gemm_for(experts):
    """The ``gemm`` launcher :func:`run_experts` calls, bound to ``experts`` (``b`` is "w13" or "w2")."""
    fmt = _FORMATS[experts.format]

    def gemm(a, which, c, topk_weights, sorted_ids, expert_ids, npost, N, K, num_valid, top_k, *, gated,
             mul_weight, a_per_token, cfg):
        b, s = getattr(experts, which), getattr(experts, which + "_scale")
        z = getattr(experts, which + "_zero")
        a_scale, a_parts = getattr(experts, which + "_input_scale"), 1
        if a_scale is None and experts.dynamic_scale == "per_tensor":
            # the gate/up GEMM's input: all of hidden_states (vLLM quantizes it whole); the down GEMM's: the rows
            # the gate/up GEMM wrote (the rest of ``a`` was never written)
            a_scale = per_tensor_scale(a) if a_per_token else per_tensor_scale(a, sorted_ids, npost, num_valid)
            a_parts = SCALE_PARTS
        quant_n = experts.block[0] if fmt == "fp8" else 1
        up_srow = -(-N // quant_n) if fmt == "fp8" else N
        num_pid_m = expert_ids.numel()
        grid = (num_pid_m * triton.cdiv(N, cfg["BLOCK_SIZE_N"]),)
        launch(moe_gemm_quant_kernel, grid, a, b, s, z if z is not None else s,
               a_scale if a_scale is not None else s, c, topk_weights, sorted_ids,
               expert_ids, npost, N, K, num_valid, num_pid_m, top_k, b.shape[0],
               a.stride(0), b.stride(0), b.stride(1), s.stride(0), s.stride(1),
               a_scale.stride(0) if a_scale is not None else 0, c.stride(0), up_srow,
               FORMAT=fmt, QUANT_N=quant_n, GROUP_K=max(_group_k(experts), 1), HAS_ZERO=z is not None,
               STATIC_A=a_scale is not None, A_PARTS=a_parts, GATED=gated,
               MUL_ROUTED_WEIGHT=mul_weight, A_PER_TOKEN=a_per_token, UPCAST=interpreting(),
               EMULATE_FP8=interpreting(), DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
               BLOCK_SIZE_M=cfg["BLOCK_SIZE_M"], BLOCK_SIZE_N=cfg["BLOCK_SIZE_N"],
               BLOCK_SIZE_K=cfg["BLOCK_SIZE_K"], GROUP_SIZE_M=cfg["GROUP_SIZE_M"], num_warps=cfg["num_warps"],
               num_stages=cfg["num_stages"], device=a.device)

    return gemm


def config_key(experts) -> str:
    """The format's tag in the tuned-config file names (vLLM's ``dtype=`` / ``block_shape=`` spelling):
    ``fp8_w8a8,block_shape=[bn,bk]`` (fp8_block), ``fp8_w8a8`` (fp8_channel), ``int4_w4a16`` (any group size: the K
    tile follows the group in :func:`adjust_config`). Looked up by :func:`omni_fast.kernels.moe_gemm.get_config`
    exactly as the bf16 files (``configs/moe/E=..,N=..,dtype=<key>,device=..,triton=...json``; untuned starting
    points only with ``OMNI_FAST_MOE_STARTING_CONFIGS=1``); no file: the bf16 heuristic (never the bf16 files, whose
    tiles were chosen for 16-bit weights)."""
    if experts.format == "fp8_block":
        return "fp8_w8a8,block_shape=[{},{}]".format(*experts.block)
    return "fp8_w8a8" if experts.format == "fp8_channel" else "int4_w4a16"


def fused_moe(hidden_states: torch.Tensor, experts, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation: str = "silu", expert_map: torch.Tensor | None = None, out: torch.Tensor | None = None,
              *, add: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """:func:`omni_fast.kernels.moe_gemm.fused_moe` with quantized experts (validated inputs): x ``[T, H]``
    fp16/bf16/fp32 (int4 tiles are dequantized to x's dtype; fp32 dots in IEEE precision), ``experts`` a
    QuantizedExperts of ``E_local`` experts; returns ``out [T, H]`` in x's dtype. Launch configs: the format's tuned
    file (:func:`config_key`), else the float heuristic (:func:`~omni_fast.kernels.moe_gemm.default_config`, keyed on
    bf16), with K tiles set by the format (:func:`adjust_config`)."""
    assert activation == "silu"
    return run_experts(hidden_states, "w13", "w2", topk_weights, topk_ids, experts.num_experts,
                       experts.intermediate_size, _gemm_for(experts), config_key(experts), expert_map, out, add=add,
                       config=config, adjust=lambda up, down: adjust_config(experts, up, down))


# --- static compile cases (sm_90a) ----------------------------------------------------------------------------------

def _signature(dt: str, fmt: str, scale_dt: str, w_dt: str) -> dict:
    b_dt = "fp8e4nv" if fmt in ("fp8", "fp8c") else "i32"
    sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{b_dt}", "s_ptr": f"*{scale_dt}", "z_ptr": "*i8" if fmt == "int4" else
           f"*{scale_dt}", "as_ptr": "*fp32", "c_ptr": f"*{dt}", "topk_weights_ptr": f"*{w_dt}",
           "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "npost_ptr": "*i32"}
    for name in ("N", "K", "num_valid", "num_pid_m", "top_k", "num_experts", "stride_am", "stride_be", "stride_bn",
                 "stride_se", "stride_sn", "stride_ase", "stride_cm", "up_srow"):
        sig[name] = "i32"
    for name in ("FORMAT", "QUANT_N", "GROUP_K", "HAS_ZERO", "STATIC_A", "A_PARTS", "GATED", "MUL_ROUTED_WEIGHT", "A_PER_TOKEN", "UPCAST",
                 "EMULATE_FP8", "DOT_PRECISION", "BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M"):
        sig[name] = "constexpr"
    return sig


class _Spec:
    """The launch-relevant facts of a container, for :func:`adjust_config` in the static cases."""

    def __init__(self, fmt: str, group_k: int):
        self.format = fmt
        self.block = (128, group_k) if fmt == "fp8_block" else None
        self.group_size = group_k if fmt == "int4_w4a16" else None


# The thinker's shapes (E128, H2048, I768; the talker's I384 shares every compile: shapes are runtime arguments)
# at the T of each default_config tier. fp8: 128x128 blocks; int4: group 128 asymmetric (the general case: zero
# points) and group 32 symmetric; fp8_channel: per-channel weights, dynamic per-token activations, and (gk = -1)
# dynamic per-tensor ones (A_PARTS partial scales). Strides and N/K are multiples of 16 at run time (``aligned``),
# as in moe_gemm.
_QUANT_TIERS = ((1, "decode"), (400, "rows<=32"), (1024, "rows<=128"), (4096, "prefill"))
for _fmt, _gk, _zero, _tiers in (("fp8_block", 128, False, _QUANT_TIERS), ("int4_w4a16", 128, True, _QUANT_TIERS),
                                 ("int4_w4a16", 32, False, _QUANT_TIERS[::3]),
                                 ("fp8_channel", 0, False, _QUANT_TIERS[::3]),
                                 ("fp8_channel", -1, False, _QUANT_TIERS[::3])):
    for _T, _tier in _tiers:
        _up, _down = _split(default_config(_T, 128, 8, 2048, 768, torch.bfloat16))
        adjust_config(_Spec(_fmt, _gk), _up, _down)
        for _part, _c, _gated in (("gate_up", _up, True), ("down", _down, False)):
            _k = _FORMATS[_fmt]
            _consts = dict(FORMAT=_k, QUANT_N=128 if _k == "fp8" else 1, GROUP_K=max(_gk, 1), HAS_ZERO=_zero,
                           STATIC_A=_gk < 0, A_PARTS=SCALE_PARTS if _gk < 0 else 1, GATED=_gated,
                           MUL_ROUTED_WEIGHT=not _gated, A_PER_TOKEN=_gated, UPCAST=False, EMULATE_FP8=False,
                           DOT_PRECISION="tf32",
                           **{k: _c[k] for k in _KEYS[:4]})
            _label = {"int4": f"g{_gk}{',asym' if _zero else ''}", "fp8": "block128x128"}.get(
                _k, "channel,per-tensor dynamic" if _gk < 0 else "channel,dynamic")
            static_case(f"moe_gemm_quant_kernel[{_fmt},bf16,{_label},{_tier},{_part}]", moe_gemm_quant_kernel,
                        _signature("bf16", _k, "bf16" if _k == "int4" else "fp32", "bf16" if _gated else "fp32"),
                        _consts, num_warps=_c["num_warps"], num_stages=_c["num_stages"],
                        aligned=("N", "K", "stride_am", "stride_be", "stride_bn", "stride_se", "stride_cm"))
for _indirect in (False, True):  # the per-tensor scale's reduction: over hidden_states, over the rows GEMM1 wrote
    static_case(f"amax_scale_kernel[bf16,{'sorted rows' if _indirect else 'all rows'}]", amax_scale_kernel,
                {"a_ptr": "*bf16", "rows_ptr": "*i32", "npost_ptr": "*i32", "part_ptr": "*fp32", "num_rows": "i32",
                 "K": "i32", "stride_am": "i32", "num_valid": "i32", "INDIRECT": "constexpr", "BLOCK_R": "constexpr",
                 "BLOCK_K": "constexpr"}, dict(INDIRECT=_indirect, BLOCK_R=16, BLOCK_K=256), num_warps=4,
                aligned=("K", "stride_am"))
