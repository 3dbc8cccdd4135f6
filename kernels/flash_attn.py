"""Flash attention forward in Triton: one kernel for packed varlen sequences and for KV caches (contiguous/paged).

Semantics are FlashAttention-2's (see :mod:`omni_fast.reference.attention`): block-diagonal packing through
``cu_seqlens``, bottom-right aligned causal masks and sliding windows, GQA, zeros and ``lse = -inf`` for rows that
see no key.

Design
- **Packed GQA.** One program handles one key/value head and ``BLOCK_M`` query *rows*, a row being a (token, query
  head of the group) pair: ``row = token * GROUP + g``. Every K/V tile is loaded once for all ``GROUP`` query heads
  that share it, which is what makes decode (one token, GROUP 2..8 heads) read the cache once.
- **Online softmax in base 2.** Scores are scaled by ``softmax_scale * log2(e)`` so ``exp2`` replaces ``exp``; the
  running max is clamped to 0 for rows that have seen nothing yet, so fully masked rows never produce NaN.
- **Key range per block.** Each program visits only the key blocks its rows can see (causal / window bounds,
  intersected with its split of the keys). Blocks that every row sees entirely run without the per-element mask;
  only the edge blocks (diagonal, window edges, the sequence end) pay for it.
- **Split-KV.** With ``SPLIT`` the keys are cut into ``num_splits`` chunks handled by different programs, each
  writing an unnormalised-free partial (normalised output + lse, fp32) that :func:`combine_kernel` merges.
- **Dtypes.** fp16/bf16 operands go to ``tl.dot`` as they are (fp32 accumulation) on a GPU; under the Triton CPU
  interpreter, whose bf16 dot is wrong, they are upcast to fp32 first (the ``UPCAST`` constexpr). fp32 inputs use
  IEEE fp32 dots (no TF32) so fp32 results stay fp32-accurate.
- Non-power-of-two head dims (72, 96) are padded to ``BLOCK_D`` by masked loads (zeros do not change the dots).

Shapes: q/out ``[Tq, Hq, D]`` (token and head strides free, unit stride in D), lse fp32 ``[Hq, Tq]``; keys either
packed ``[Tk, Hk, D]`` with ``cu_seqlens_k`` or per-sequence caches ``[B, S, Hk, D]`` / pages
``[num_blocks, page, Hk, D]`` with lengths ``seqused_k[b] + k_extra``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import fast_paths
from .flash_attn_parts import LOG2E, add_sink, attend_range, clamped_span, packed_block, rotary_rows
from .launch import clamp, interpreting, launch

UNBOUNDED = 1 << 30  # window bound meaning "no limit" (keeps int32 arithmetic far from overflow)
MAX_HEAD_DIM = 256
# Split head dims (72 = 64 + 16 instead of a 128-wide padded tile, see head_tiles): opt-in until a GPU run passes
# tests/test_attention_kvcache.py's gpu-marked split-head-dim test (project rule for new fast paths): the
# "split_head_dim" fast path of omni_fast.fast_paths (OMNI_FAST_SPLIT_HEAD_DIM=1).


# Stays long: its key set-up, q load or key range as jit helpers moved sm_90a registers (d256 decode 200 -> 158).
@triton.jit
def attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    cu_q_ptr, cu_k_ptr, seqused_k_ptr, bt_ptr, km_ptr, cbi_ptr, lp_ptr, alibi_ptr, sink_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lh, stride_os, stride_ls, stride_bt, stride_km, stride_ab, stride_cos, stride_sin,
    seqlen_q, k_extra, page_size, win_left, win_right, qk_scale, softcap_log2, split_len, num_seqs, search_steps,
    total_q, kv_limit, num_blocks, rot_len, empty_lse, alibi_lse_shift,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, PAGED: tl.constexpr, PACKED_GRID: tl.constexpr,
    KEY_MASK: tl.constexpr, SEQUSED: tl.constexpr, CACHE_IDX: tl.constexpr, LEFTPAD: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, SINK: tl.constexpr, ROT_DIM: tl.constexpr,
    ROT_INTERLEAVED: tl.constexpr, ROT_CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr, ALIGN_BYTES: tl.constexpr,
):
    """Grid ``(cdiv(max_seqlen_q * GROUP, BLOCK_M), B, Hk * NUM_SPLITS)``, or with PACKED_GRID (VARLEN_Q only)
    ``((Tq * GROUP) // BLOCK_M + B, 1, Hk * NUM_SPLITS)``: see :func:`packed_block`.

    Queries of sequence b: rows ``cu_q[b]..cu_q[b+1]`` (VARLEN_Q) or ``b*seqlen_q ..`` (fixed length). Key count:
    ``cu_k[b+1] - cu_k[b]`` (VARLEN_K), replaced by ``seqused_k[b] + k_extra`` with SEQUSED, else ``k_extra``.
    Key rows: packed from ``cu_k[b]`` (VARLEN_K, not PAGED), paged through ``bt_ptr`` (PAGED: logical rows from 0),
    or cache row ``b`` (``cache_batch_idx[b]`` with CACHE_IDX) of a contiguous ``[B, S, Hk, D]`` cache. With
    NUM_SPLITS > 1, o/lse are fp32 partial buffers with a leading split dimension (strides stride_os / stride_ls).
    ALIGN (elements) / ALIGN_BYTES: the host checked that every base pointer is ALIGN_BYTES-aligned and every
    row/head/batch stride a multiple of ALIGN, so the kernel may promise it to the compiler.
    KEY_MASK (caches only): ``km_ptr`` bytes ``[B, capacity]`` (row stride ``stride_km``), 0 = padding: padding keys
    are never attended, and query rows whose own (key-aligned) position is padding give zeros and ``lse = -inf``.
    FlashAttention features: LEFTPAD (keys before ``lp_ptr[b]`` are not attended; positions stay absolute),
    SOFTCAP (``cap * tanh(s / cap)``), ALIBI (``-slope[b, h] * |p - j|``, slopes row stride ``stride_ab``, 0 for
    one row), ROT_DIM > 0 (q rotated in-kernel by ``cos/sin[seqused_k[b] (+ token with ROT_CAUSAL)]``). SINK
    (FA3's attention sinks, NUM_SPLITS == 1 only): ``sink_ptr[h]`` (natural-log logit, any float dtype) joins the
    softmax denominator as a key with a zero value: out and lse include it, a row without keys gets lse = sink.

    LSE conventions (runtime values, no extra specialisation): rows that see no key store ``empty_lse`` (-inf,
    or +inf as flash-attn 2.8 stores it; split-KV partials always get -inf, the combine writes ``empty_lse``);
    ``alibi_lse_shift`` = 1 adds ``slope * (p - k_lo)`` to the lse of every row that saw a key: flash-attn's
    causal kernel adds the bias ``slope * (j - k_lo)`` instead of ``-slope * (p - j)`` (equal under a causal mask
    up to that per-row constant, so the output is the same and only the lse moves).

    Memory safety without value checks: sequence bounds read from ``cu_q`` (``cu_k``) are clamped into
    ``[0, total_q]`` (``[0, kv_limit]`` = Tk), an end before its start meaning an empty sequence; key counts into
    ``[0, kv_limit]`` (= the cache capacity), left padding into ``[0, len_k]``, page numbers and cache rows into
    ``[0, num_blocks)``, rotary positions into the table. Malformed values give defined results, never
    out-of-bounds accesses.
    """
    pid_z = tl.program_id(2)
    if PACKED_GRID:
        b, pid_m = packed_block(cu_q_ptr, tl.program_id(0), num_seqs, search_steps, GROUP, BLOCK_M)
    else:
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
    kvh = pid_z // NUM_SPLITS
    split = pid_z % NUM_SPLITS

    if VARLEN_Q:
        q_start, len_q = clamped_span(cu_q_ptr, b, total_q)
    else:
        q_start = b * seqlen_q
        len_q = seqlen_q
    # pid_m < 0: only from the packed grid's search over a decreasing (malformed) cu_seqlens_q
    if (pid_m < 0) | (pid_m * BLOCK_M >= len_q * GROUP):
        return
    k_start = b * 0
    key_room = kv_limit + b * 0
    len_k = k_extra + b * 0
    if VARLEN_K:
        if PAGED:  # cu_seqlens_k only gives the lengths; every sequence's keys start at logical row 0
            len_k = tl.load(cu_k_ptr + b + 1) - tl.load(cu_k_ptr + b)
        else:
            k_start, len_k = clamped_span(cu_k_ptr, b, kv_limit)
            key_room = kv_limit - k_start
    if SEQUSED:
        len_k = tl.load(seqused_k_ptr + b) + k_extra
    len_k = clamp(len_k, 0, key_room)
    if PAGED:
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh
    elif VARLEN_K:
        k_base = k_ptr + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
        v_base = v_ptr + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
    else:
        cb = b
        if CACHE_IDX:
            cb = clamp(tl.load(cbi_ptr + b), 0, num_blocks - 1)
        k_base = k_ptr + cb.to(tl.int64) * stride_kb + kvh * stride_kh
        v_base = v_ptr + cb.to(tl.int64) * stride_vb + kvh * stride_vh
    k_lo = b * 0
    if LEFTPAD:
        k_lo = clamp(tl.load(lp_ptr + b), 0, len_k)
    bt_row_ptr = bt_ptr + b.to(tl.int64) * stride_bt
    km_row_ptr = km_ptr + b.to(tl.int64) * stride_km
    if ALIGN > 1:
        k_base = tl.multiple_of(k_base, [ALIGN_BYTES])
        v_base = tl.multiple_of(v_base, [ALIGN_BYTES])

    # Rows of this block: (token, head-in-group) pairs.
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = offs_r // GROUP
    head = kvh * GROUP + offs_r % GROUP
    mask_r = tok < len_q
    qpos = tok + (len_k - len_q)  # bottom-right alignment
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    q_base = q_ptr + q_start.to(tl.int64) * stride_qt
    q_rows = tok.to(tl.int64) * stride_qt + head * stride_qh
    if ALIGN > 1:
        q_base = tl.multiple_of(q_base, [ALIGN_BYTES])
        q_rows = tl.multiple_of(q_rows, [ALIGN])
    q = tl.load(q_base + q_rows[:, None] + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
    if ROT_DIM > 0:  # FlashAttention's kvcache rotary: q sits at cache_seqlens[b] (+ its token index if causal)
        rpos = tl.load(seqused_k_ptr + b) + tok * 0
        if ROT_CAUSAL:
            rpos += tok
        q = rotary_rows(q_base + q_rows, q, rpos, cos_ptr, sin_ptr, stride_cos, stride_sin, rot_len, offs_d,
                        mask_r, ROT_DIM, ROT_INTERLEAVED)
    if UPCAST:
        q = q.to(tl.float32)
    # Split head dim (BLOCK_D2 > 0, e.g. d 72 = 64 + 16 instead of one 128-wide padded tile): the second tile
    offs_d2 = None
    mask_d2 = None
    q2 = None
    acc2 = tl.zeros([1], dtype=tl.float32)  # placeholder: Triton 3.6 cannot return None from attend_range
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        mask_d2 = offs_d2 < HEAD_DIM
        q2 = tl.load(q_base + q_rows[:, None] + offs_d2[None, :], mask=mask_r[:, None] & mask_d2[None, :],
                     other=0.0)
        if UPCAST:
            q2 = q2.to(tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ALIBI:
        slope = tl.load(alibi_ptr + b.to(tl.int64) * stride_ab + head, mask=mask_r, other=0.0) * 1.4426950408889634

    # Keys this block can see: [first row's left edge, last row's right edge] within [k_lo, len_k) and this split.
    tok_lo = (pid_m * BLOCK_M) // GROUP
    tok_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, len_q - 1)
    lo = tl.maximum(tok_lo + (len_k - len_q) - win_left, k_lo)
    hi = tl.minimum(tok_hi + (len_k - len_q) + win_right + 1, len_k)
    if NUM_SPLITS > 1:
        lo = tl.maximum(lo, split * split_len)
        hi = tl.minimum(hi, (split + 1) * split_len)
    lo = (lo // BLOCK_N) * BLOCK_N  # aligned start; the mask drops the rows before the true edge
    # Key blocks that every (real) row of this block sees entirely, [full_lo, full_hi), need no mask: cut
    # [lo, hi) into masked [lo, mid_lo) + unmasked [mid_lo, mid_hi) + masked [mid_hi, hi).
    full_lo = tl.maximum(tok_hi + (len_k - len_q) - win_left, k_lo)
    full_lo = ((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(tok_lo + (len_k - len_q) + win_right + 1, len_k)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    mid_lo = clamp(full_lo, lo, hi)
    mid_hi = clamp(full_hi, mid_lo, hi)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # masked edge [lo, mid_lo), unmasked interior [mid_lo, mid_hi), masked edge [mid_hi, hi)
    # the key-side arguments are spelled out in each call: Triton 3.6 (the GPU image's) cannot compile a starred
    # tuple followed by more positional arguments
    acc, m_i, l_i, acc2 = attend_range(
        acc, m_i, l_i, q, qpos, lo, mid_lo, k_base, v_base, bt_row_ptr, km_row_ptr, stride_kb, stride_kt, stride_vb,
        stride_vt, page_size, num_blocks, len_k, k_lo, win_left, win_right, qk_scale, softcap_log2, slope, offs_d,
        mask_d, acc2, q2, offs_d2, mask_d2,
        BLOCK_N, PAGED, UPCAST, PREC, True, ALIGN, KEY_MASK, SOFTCAP, ALIBI, BLOCK_D2)
    acc, m_i, l_i, acc2 = attend_range(
        acc, m_i, l_i, q, qpos, mid_lo, mid_hi, k_base, v_base, bt_row_ptr, km_row_ptr, stride_kb, stride_kt, stride_vb,
        stride_vt, page_size, num_blocks, len_k, k_lo, win_left, win_right, qk_scale, softcap_log2, slope, offs_d,
        mask_d, acc2, q2, offs_d2, mask_d2,
        BLOCK_N, PAGED, UPCAST, PREC, False, ALIGN, KEY_MASK, SOFTCAP, ALIBI, BLOCK_D2)
    acc, m_i, l_i, acc2 = attend_range(
        acc, m_i, l_i, q, qpos, mid_hi, hi, k_base, v_base, bt_row_ptr, km_row_ptr, stride_kb, stride_kt, stride_vb,
        stride_vt, page_size, num_blocks, len_k, k_lo, win_left, win_right, qk_scale, softcap_log2, slope, offs_d,
        mask_d, acc2, q2, offs_d2, mask_d2,
        BLOCK_N, PAGED, UPCAST, PREC, True, ALIGN, KEY_MASK, SOFTCAP, ALIBI, BLOCK_D2)

    if SINK:  # the sink as one more key (value 0)
        acc, acc2, m_i, l_i = add_sink(acc, acc2, m_i, l_i, sink_ptr, head, mask_r, BLOCK_D2)
    seen = l_i > 0.0
    if KEY_MASK:  # a padding query: zeros, as a row that sees no key
        q_real = tl.load(km_row_ptr + qpos, mask=mask_r & (qpos >= 0), other=0) != 0
        seen = seen & q_real
        acc = tl.where(q_real[:, None], acc, 0.0)
        if BLOCK_D2 > 0:
            acc2 = tl.where(q_real[:, None], acc2, 0.0)
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse2 = m_i + tl.math.log2(tl.where(seen, l_i, 1.0))
    if ALIBI:  # slope is in base 2 here, like m_i
        lse2 += (alibi_lse_shift * (qpos - k_lo)).to(tl.float32) * slope
    lse = tl.where(seen, lse2 / 1.4426950408889634, empty_lse)
    o_base = o_ptr + q_start.to(tl.int64) * stride_ot + split * stride_os
    o_rows = tok.to(tl.int64) * stride_ot + head * stride_oh
    if ALIGN > 1:
        o_base = tl.multiple_of(o_base, [ALIGN_BYTES])
        o_rows = tl.multiple_of(o_rows, [ALIGN])
    tl.store(o_base + o_rows[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_d[None, :])
    if BLOCK_D2 > 0:
        out2 = acc2 / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(o_base + o_rows[:, None] + offs_d2[None, :], out2.to(o_ptr.dtype.element_ty),
                 mask=mask_r[:, None] & mask_d2[None, :])
    tl.store(lse_ptr + split * stride_ls + head.to(tl.int64) * stride_lh + q_start + tok, lse, mask=mask_r)


@triton.jit
def combine_kernel(part_o_ptr, part_lse_ptr, o_ptr, lse_ptr,
                   stride_pos, stride_pot, stride_poh, stride_pls, stride_plh,
                   stride_ot, stride_oh, stride_lh, empty_lse,
                   HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """Merge split-KV partials of one (row, head, BLOCK_D-wide slice of D): ``out = sum_s w_s o_s``,
    ``w_s = exp(lse_s - lse)``.

    Grid ``(Tq, Hq, cdiv(D, BLOCK_D))``: at decode (few rows x heads) D is cut into slices so the grid still fills
    the SMs; every slice recomputes the split weights (NUM_SPLITS values) and the first one stores the lse. Partials: o fp32 ``[NUM_SPLITS, Tq, Hq, D]`` (normalised per split), lse fp32
    ``[NUM_SPLITS, Hq, Tq]``; splits that saw no key have lse = -inf and weight 0; a row no split saw gets zeros
    and ``empty_lse``.
    """
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    c = tl.program_id(2)
    offs_s = tl.arange(0, SPLITS_P2)
    mask_s = offs_s < NUM_SPLITS
    lse_s = tl.load(part_lse_ptr + offs_s * stride_pls + h * stride_plh + t, mask=mask_s, other=float("-inf"))
    m = tl.max(lse_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    total = tl.sum(w, axis=0)
    offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    po = tl.load(part_o_ptr + offs_s[:, None] * stride_pos + t * stride_pot + h * stride_poh + offs_d[None, :],
                 mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    seen = total > 0.0
    out = tl.sum(po * w[:, None], axis=0) / tl.where(seen, total, 1.0)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=mask_d)
    if c == 0:
        tl.store(lse_ptr + h * stride_lh + t, tl.where(seen, m_safe + tl.log(tl.where(seen, total, 1.0)), empty_lse))


# --- launch helpers ----------------------------------------------------------------------------------------------


def window_bounds(causal: bool, window_size) -> tuple[int, int]:
    """FlashAttention window ``(left, right)`` (-1 unbounded, causal -> right 0) as kernel ints."""
    left, right = (int(w) for w in window_size)
    if causal:
        right = 0
    # Clamp huge finite bounds too (callers pass INT_MAX for "no limit"): the kernel adds them to token indices.
    return (UNBOUNDED if left < 0 else min(left, UNBOUNDED)), (UNBOUNDED if right < 0 else min(right, UNBOUNDED))


def block_sizes(rows_per_seq: int, head_dim: int, elem_size: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a launch; small blocks under the interpreter (fewer numpy ops).

    ``rows_per_seq`` = query tokens x GROUP: decode-like launches (few rows) use BLOCK_M 16 and longer key tiles.
    fp32 inputs (``elem_size`` 4) get 16x32 tiles on 8 warps, 2 stages (see :func:`gpu_block_sizes`).
    """
    if interpreting():
        return 16, 16, 4, 1
    return gpu_block_sizes(rows_per_seq, head_dim, elem_size)


def gpu_block_sizes(rows_per_seq: int, head_dim: int, elem_size: int = 2) -> tuple[int, int, int, int]:
    """The GPU launch config (see :func:`block_sizes`); also used for the sm_90a static cases.

    Padded head dims (72, 96: BLOCK_D > HEAD_DIM) carry per-element D masks, which push the 128-row config past
    255 registers (spills on sm_90a), so they use 64-row blocks with one warpgroup. fp32 (IEEE dots, no tensor-core
    path on sm_90a) spills with any tile of 32+ rows at 4 warps (sm_90a static check: 64x32 spills 1.6 KB per thread
    at d 64, 9 KB at d 128, 220 KB at d 256; 32x32 at 8 warps still 1 KB at d 128, 52 KB at d 256), so it uses
    16x32 tiles on 8 warps at every head dim (74-78 registers at d 128 and d 256, no spills).
    """
    if elem_size > 2:
        return 16, 32, 8, 2
    if rows_per_seq <= 16:
        return 16, 128 if head_dim <= 128 else 64, 4, 3
    if head_dim > 128:  # 128x32 on 8 warps spills 1.8 KB at d 256 under Triton 3.6 (the GPU image's); 64x64 needs
        return 64, 32, 8, 3  # 224 KB of shared memory
    if rows_per_seq <= 64 or head_dim != triton.next_power_of_2(head_dim):
        return 64, 64, 4, 3
    return 128, 64, 8, 3


def head_tiles(head_dim: int, split: bool | None = None) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): the head dim's tile widths (powers of two, tl.arange needs them).

    One tile (BLOCK_D2 = 0) padded to the next power of two, unless ``split`` (default: the ``split_head_dim`` fast path) and two
    tiles are narrower: the largest power of two below D plus the next power of two (>= 16, tl.dot's minimum K)
    of the rest. d 72 / 80: 64 + 16 = 80 columns instead of 128; d 96: 64 + 32; d 160: 128 + 32. Every dot over D
    (q.k) then costs two dots that sum, every dot into D (p.v) two accumulators.
    """
    full = max(16, triton.next_power_of_2(head_dim))
    if not (fast_paths.enabled("split_head_dim") if split is None else split) or full == head_dim:
        return full, 0
    first = full // 2
    second = max(16, triton.next_power_of_2(head_dim - first))
    return (first, second) if first + second < full else (full, 0)


def alignment(tensors, strides) -> int:
    """Largest ALIGN (elements, <= 16 bytes) dividing every tensor's data pointer and every given stride."""
    elem = tensors[0].element_size()
    align = max(1, 16 // elem)
    while align > 1 and (any(t.data_ptr() % (align * elem) for t in tensors if t.numel())
                         or any(int(s) % align for s in strides)):
        align //= 2
    return align


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` (the ``PREC`` constexpr) for q's dtype: "ieee" for fp32 (exact fp32 products),
    "tf32" otherwise (it only affects fp32 operands, so fp16/bf16 dots are unchanged)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _key_layout(k: torch.Tensor, v: torch.Tensor, cu_k, block_table) -> tuple[int, tuple[int, ...]]:
    """(the most keys a sequence can have, the k/v strides ``(kb, kt, kh, vb, vt, vh)``) of :func:`attn_fwd`'s keys:
    packed ``[Tk, Hk, D]`` (``cu_k`` without ``block_table``: the key count, no batch stride) or a cache
    ``[B|blocks, S|page, Hk, D]`` (its capacity, contiguous or paged)."""
    if cu_k is not None and block_table is None:
        return k.shape[0], (0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1))
    capacity = k.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    return capacity, (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
             batch: int, rows_per_seq: int, cu_q: torch.Tensor | None, seqlen_q: int,
             cu_k: torch.Tensor | None, seqused_k: torch.Tensor | None, k_extra: int,
             block_table: torch.Tensor | None, softmax_scale: float, causal: bool, window_size,
             num_splits: int = 1, split_len: int = 0, packed_grid: bool = False,
             key_mask: torch.Tensor | None = None, cache_batch_idx: torch.Tensor | None = None,
             leftpad: torch.Tensor | None = None, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
             rotary: tuple | None = None, empty_lse: float = float("-inf"),
             alibi_lse_shift: bool = False, sinks: torch.Tensor | None = None) -> None:
    """Launch :func:`attn_fwd_kernel` (see its docstring); shared by the varlen and the KV-cache entry points.

    q/out are ``[Tq, Hq, D]`` views; k/v ``[Tk, Hk, D]`` (packed varlen) or ``[B|blocks, S|page, Hk, D]`` (caches,
    or paged varlen with ``cu_k`` giving only the lengths). Key count per sequence: ``cu_k`` differences, replaced
    by ``seqused_k[b] + k_extra`` when ``seqused_k`` is given, else ``k_extra``.
    With ``num_splits > 1``, out/lse are fp32 partial buffers ``[splits, Tq, Hq, D]`` / ``[splits, Hq, Tq]``.
    ``packed_grid`` (needs ``cu_q``): size the grid from the token count instead of ``rows_per_seq`` (which then
    only picks the block sizes). ``key_mask`` (caches only): uint8 ``[B, capacity]``, 0 = padding key/query.
    ``cache_batch_idx`` int32 ``[B]`` (contiguous caches): the cache row of each sequence. ``leftpad`` int32 ``[B]``:
    first key of each sequence. ``softcap`` > 0: tanh soft-capping. ``alibi_slopes`` fp32 ``[Hq]`` or ``[B, Hq]``.
    ``rotary``: ``(cos, sin, interleaved, causal)`` to rotate q at ``seqused_k[b] (+ token if causal)``.
    ``empty_lse`` (the lse of rows that see no key; split partials always use -inf) and ``alibi_lse_shift``
    (flash-attn's causal-ALiBi lse): see :func:`attn_fwd_kernel`. ``sinks`` ``[Hq]`` (unit stride): attention
    sinks, without split-KV.
    """
    if sinks is not None and num_splits > 1:
        raise ValueError("sinks need num_splits == 1 (the split-KV combine has no sink)")
    Hq, D = q.shape[1], q.shape[2]
    Hk = k.shape[-2]
    group = Hq // Hk
    block_m, block_n, warps, stages = block_sizes(rows_per_seq, D, q.element_size())
    block_d, block_d2 = head_tiles(D, None if rotary is None else False)  # rotary works on one tile
    varlen_k = cu_k is not None
    paged = block_table is not None
    kv_limit, (stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh) = _key_layout(k, v, cu_k, block_table)
    left, right = window_bounds(causal, window_size)
    dummy = next(t for t in (cu_q, cu_k, seqused_k, block_table, cache_batch_idx) if t is not None) \
        if any(t is not None for t in (cu_q, cu_k, seqused_k, block_table, cache_batch_idx)) else q
    split = num_splits > 1
    if packed_grid:
        grid = ((q.shape[0] * group) // block_m + batch, 1, Hk * num_splits)
    else:
        grid = (triton.cdiv(rows_per_seq, block_m), batch, Hk * num_splits)
    align = alignment((q, k, v, out), (q.stride(0), q.stride(1), stride_kb, stride_kt, stride_kh, stride_vb,
                                       stride_vt, stride_vh, out.stride(-3), out.stride(-2),
                                       out.stride(0) if split else 0))
    softcap = float(softcap)
    cos, sin, interleaved, rot_causal = rotary if rotary is not None else (None, None, False, False)
    opt = (lambda t: dummy if t is None else t)  # noqa: E731 - unused pointers (compiled out by the constexprs)
    launch(
        attn_fwd_kernel, grid,
        q, k, v, out, lse,
        opt(cu_q), opt(cu_k), opt(seqused_k), opt(block_table), opt(key_mask), opt(cache_batch_idx), opt(leftpad),
        opt(alibi_slopes), opt(sinks), opt(cos), opt(sin),
        q.stride(0), q.stride(1), stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        out.stride(-3), out.stride(-2), lse.stride(-2), out.stride(0) if split else 0, lse.stride(0) if split else 0,
        block_table.stride(0) if paged else 0, key_mask.stride(0) if key_mask is not None else 0,
        alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
        cos.stride(0) if cos is not None else 0, sin.stride(0) if sin is not None else 0,
        seqlen_q, k_extra, k.shape[1] if paged else 1, left, right,
        float(softmax_scale) / softcap if softcap > 0 else float(softmax_scale) * LOG2E, softcap * LOG2E,
        split_len if split else 0, batch, batch.bit_length() if packed_grid else 0,
        q.shape[0], kv_limit, k.shape[0] if (paged or cache_batch_idx is not None) else 1,
        cos.shape[0] if cos is not None else 1, float("-inf") if split else float(empty_lse), int(alibi_lse_shift),
        HEAD_DIM=D, GROUP=group, NUM_SPLITS=num_splits, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, BLOCK_D2=block_d2, VARLEN_Q=cu_q is not None, VARLEN_K=varlen_k, PAGED=paged,
        PACKED_GRID=packed_grid, KEY_MASK=key_mask is not None, SEQUSED=seqused_k is not None,
        CACHE_IDX=cache_batch_idx is not None, LEFTPAD=leftpad is not None, SOFTCAP=softcap > 0,
        ALIBI=alibi_slopes is not None, SINK=sinks is not None, ROT_DIM=2 * cos.shape[1] if cos is not None else 0,
        ROT_INTERLEAVED=bool(interleaved), ROT_CAUSAL=bool(rot_causal),
        UPCAST=interpreting(), PREC=dot_precision(q.dtype), ALIGN=align, ALIGN_BYTES=align * q.element_size(),
        num_warps=warps, num_stages=stages, device=q.device,
    )


def combine(part_o: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
            empty_lse: float = float("-inf")) -> None:
    """Merge split partials ``[S, Tq, Hq, D]`` / ``[S, Hq, Tq]`` into out ``[Tq, Hq, D]`` and lse ``[Hq, Tq]``
    (``empty_lse`` for rows that no split saw)."""
    splits, T, Hq, D = part_o.shape
    block_d = combine_block_d(T * Hq, D, splits)
    launch(combine_kernel, (T, Hq, triton.cdiv(D, block_d)), part_o, part_lse, out, lse,
           part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
           out.stride(0), out.stride(1), lse.stride(0), float(empty_lse),
           HEAD_DIM=D, NUM_SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits),
           BLOCK_D=block_d, num_warps=4, device=out.device)


COMBINE_TARGET_CTAS = 128  # about one CTA per SM of an H100 (132): what the combine's grid aims at
COMBINE_MAX_TILE = 4096  # partial elements one program holds (4 warps: 32 fp32 values a thread; 64 x 128 took 168
                         # registers on sm_90a, 64 x 64 takes 80)


def combine_block_d(rows: int, head_dim: int, splits: int = 1) -> int:
    """Width of the D slice one combine program merges: all of D (padded to a power of two) when ``rows``
    (tokens x query heads) alone give COMBINE_TARGET_CTAS programs, else narrower (down to 16) so that
    ``rows x slices`` does (decode at B = 1 has 32 rows on the thinker, 16 on the talker); also narrow enough
    that the ``[splits, slice]`` tile stays within COMBINE_MAX_TILE elements. From shapes only."""
    block_d = triton.next_power_of_2(head_dim)
    slices = triton.next_power_of_2(triton.cdiv(COMBINE_TARGET_CTAS, max(rows, 1)))
    block_d = min(block_d // slices, max(COMBINE_MAX_TILE // triton.next_power_of_2(splits), 16))
    return max(16, block_d)


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                      causal: bool, window_left: int, window_right: int, softcap: float = 0.0,
                      alibi_slopes: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                      seqused_k: torch.Tensor | None = None, fa_lse: bool = False,
                      alibi_lse_shift: bool = False, sinks: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed varlen attention (validated inputs): returns (out ``[Tq, Hq, D]``, lse fp32 ``[Hq, Tq]``).

    ``max_seqlen_q`` (>= every sequence's query length, or -1 when unknown) sizes the grid and picks the block
    sizes; ``max_seqlen_k`` is unused (the key loop bounds come from cu_seqlens_k on the device). The grid is the
    packed one (:func:`packed_block`: sized by the token count) when ``max_seqlen_q`` is unknown or when it has
    fewer programs than ``cdiv(max_seqlen_q * GROUP, BLOCK_M) * B`` (unequal lengths, many sequences).
    With ``block_table`` k/v are pages ``[num_blocks, page, Hk, D]`` (sequence b's keys are its logical rows
    ``0 .. cu_k[b+1] - cu_k[b]``); ``seqused_k`` int32 ``[B]`` replaces the key counts; softcap / alibi_slopes as
    :func:`attn_fwd`. ``fa_lse``: +inf (flash-attn's value) instead of -inf for rows that see no key;
    ``alibi_lse_shift``: flash-attn's causal-ALiBi lse (see :func:`attn_fwd_kernel`). ``sinks`` ``[Hq]``: FA3's
    attention sinks. ``out``: ``[Tq, Hq, D]`` of q's dtype (unit stride in D) to store into instead of a new tensor.
    """
    del max_seqlen_k
    Tq, Hq, D = q.shape
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(Hq, Tq, dtype=torch.float32, device=q.device)
    group = Hq // k.shape[-2]
    batch = cu_seqlens_q.numel() - 1
    rows = (max_seqlen_q if max_seqlen_q >= 0 else Tq) * group
    block_m = block_sizes(rows, D, q.element_size())[0]
    packed = max_seqlen_q < 0 or (Tq * group) // block_m + batch < triton.cdiv(rows, block_m) * batch
    attn_fwd(q, k, v, out, lse, batch=batch, rows_per_seq=rows,
             cu_q=cu_seqlens_q, seqlen_q=0, cu_k=cu_seqlens_k, seqused_k=seqused_k, k_extra=0,
             block_table=block_table, softmax_scale=softmax_scale, causal=causal,
             window_size=(window_left, window_right), packed_grid=packed, softcap=softcap, alibi_slopes=alibi_slopes,
             empty_lse=float("inf") if fa_lse else float("-inf"), alibi_lse_shift=alibi_lse_shift, sinks=sinks)
    return out, lse


# the sm_90a static compile cases of attn_fwd_kernel / combine_kernel (registered on import)
from . import flash_attn_static  # noqa: E402,F401

__all__ = ["MAX_HEAD_DIM", "attn_fwd", "attn_fwd_kernel", "combine", "combine_kernel", "flash_attn_varlen",
           "window_bounds"]
