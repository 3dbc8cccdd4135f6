"""Shared ``@triton.jit`` pieces of the flash-attention kernels (:mod:`omni_fast.kernels.flash_attn`,
:mod:`omni_fast.kernels.flash_attn_kvcache`): the key-tile loader, the online-softmax inner loop with its score
modifiers (softcap, ALiBi, left padding), the packed-grid search and the rotary embedding of a row tile.

Score rule (FlashAttention-2's, see :mod:`omni_fast.reference.attention`), for query row at key position ``p``
and key ``j``: ``s = scale * q.k``; with a softcap ``c > 0``: ``s = c * tanh(s / c)``; with ALiBi slope ``m``:
``s += -m * |p - j|``; then the mask (window, causal, sequence end, left padding ``j >= k_lo``, key padding).
Everything is carried in base 2 (``log2(e)`` folded into the scale, the cap and the slope) so ``exp2`` does the
softmax.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import clamp

LOG2E = 1.4426950408889634


@triton.jit
def kv_tile(base_ptr, bt_row_ptr, offs_n, mask_n, stride_blk, stride_t, page_size, num_blocks, offs_d, mask_d,
            PAGED: tl.constexpr, ALIGN: tl.constexpr):
    """Load a ``[BLOCK_N, BLOCK_D]`` tile of key/value rows ``offs_n`` of one head (zeros where masked).

    Contiguous: row ``n`` is at ``base + n * stride_t``. Paged: logical row ``n`` lives in physical block
    ``block_table[n // page]`` at offset ``n % page``; block numbers are clamped into ``[0, num_blocks)`` so a
    malformed table (its values are not checked on the GPU) reads some page of the cache, never memory outside it.
    """
    if PAGED:
        blk = tl.load(bt_row_ptr + offs_n // page_size, mask=mask_n, other=0)
        blk = clamp(blk, 0, num_blocks - 1).to(tl.int64)
        row_off = blk * stride_blk + (offs_n % page_size).to(tl.int64) * stride_t
    else:
        row_off = offs_n.to(tl.int64) * stride_t
    if ALIGN > 1:  # every row starts ALIGN-element aligned: lets the loads vectorise (16-byte accesses)
        row_off = tl.multiple_of(row_off, [ALIGN])
    ptrs = base_ptr + row_off[:, None] + offs_d[None, :]
    return tl.load(ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def tanh(x):
    """tanh, fp32: through exp2 for ``|x| >= 1/4`` (saturates to +-1 without NaN for large |x|), its odd Taylor
    series to ``x^9`` below, where ``1 - 2 / (e^2x + 1)`` cancels (an absolute error of an ulp of 1, so a relative
    one of ``eps / |x|``: a softcap far above the scores, e.g. 1e6, made ``cap * tanh(s / cap)`` lose all of s).
    Series truncation error at 1/4: ``1382/155925 x^10`` ~ 1e-8 relative."""
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    via_exp = 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)
    return tl.where(tl.abs(x) < 0.25, series, via_exp)


@triton.jit
def scores(q, k, q2, k2, qpos, offs_n, qk_scale, softcap_log2, slope,
           PREC: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BLOCK_D2: tl.constexpr):
    """Base-2 scores ``[BLOCK_M, BLOCK_N]`` of q against a key tile, softcap and ALiBi applied (unmasked).

    ``qk_scale``: ``scale * log2(e)``, or ``scale / cap`` with SOFTCAP (then ``softcap_log2 = cap * log2(e)``).
    ``slope``: fp32 ``[BLOCK_M]`` ALiBi slopes of the rows, already times ``log2(e)``. With ``BLOCK_D2 > 0`` the
    head dim is split in two tiles (q/k the first BLOCK_D dims, q2/k2 the next BLOCK_D2): two dots, one sum.
    """
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if BLOCK_D2 > 0:
        s = tl.dot(q2, tl.trans(k2), s, input_precision=PREC)
    s = s * qk_scale
    if SOFTCAP:
        s = softcap_log2 * tanh(s)
    if ALIBI:
        s -= slope[:, None] * tl.abs(qpos[:, None] - offs_n[None, :]).to(tl.float32)
    return s


@triton.jit
def attend_range(acc, m_i, l_i, q, qpos, lo, hi, k_base, v_base, bt_row_ptr, km_row_ptr,
                 stride_kblk, stride_kt, stride_vblk, stride_vt, page_size, num_blocks, seqlen_k, k_lo,
                 win_left, win_right, qk_scale, softcap_log2, slope, offs_d, mask_d, acc2, q2, offs_d2, mask_d2,
                 BLOCK_N: tl.constexpr, PAGED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                 MASKED: tl.constexpr, ALIGN: tl.constexpr, KEY_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                 ALIBI: tl.constexpr, BLOCK_D2: tl.constexpr):
    """The shared inner loop: fold key rows ``[lo, hi)`` into the online-softmax state (acc, m_i, l_i).

    q: ``[BLOCK_M, BLOCK_D]`` (already in the dot dtype); qpos: int32 ``[BLOCK_M]`` key-aligned query positions.
    acc fp32 ``[BLOCK_M, BLOCK_D]``, m_i (running max of base-2 scores) and l_i (running sum) fp32 ``[BLOCK_M]``.
    ``MASKED=False`` is for key blocks every row of the block sees entirely (no per-element mask needed).
    ``k_lo``: keys before it are left padding (never attended). ``KEY_MASK``: keys whose byte at
    ``km_row_ptr[n]`` is 0 (padding) are dropped, in every block. ``BLOCK_D2 > 0``: the head dim's second tile
    (dims ``offs_d2``; q2 and its accumulator acc2 ``[BLOCK_M, BLOCK_D2]``), else acc2/q2/offs_d2/mask_d2 are None.
    Returns (acc, m_i, l_i, acc2).
    """
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        k = kv_tile(k_base, bt_row_ptr, offs_n, mask_n, stride_kblk, stride_kt, page_size, num_blocks, offs_d,
                    mask_d, PAGED, ALIGN)
        v = kv_tile(v_base, bt_row_ptr, offs_n, mask_n, stride_vblk, stride_vt, page_size, num_blocks, offs_d,
                    mask_d, PAGED, ALIGN)
        k2 = None
        v2 = None
        if BLOCK_D2 > 0:
            k2 = kv_tile(k_base, bt_row_ptr, offs_n, mask_n, stride_kblk, stride_kt, page_size, num_blocks, offs_d2,
                         mask_d2, PAGED, ALIGN)
            v2 = kv_tile(v_base, bt_row_ptr, offs_n, mask_n, stride_vblk, stride_vt, page_size, num_blocks, offs_d2,
                         mask_d2, PAGED, ALIGN)
            if UPCAST:
                k2 = k2.to(tl.float32)
                v2 = v2.to(tl.float32)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = scores(q, k, q2, k2, qpos, offs_n, qk_scale, softcap_log2, slope, PREC, SOFTCAP, ALIBI, BLOCK_D2)
        if MASKED:
            ok = (offs_n[None, :] < seqlen_k) & (offs_n[None, :] >= k_lo) \
                & (offs_n[None, :] >= qpos[:, None] - win_left) & (offs_n[None, :] <= qpos[:, None] + win_right)
            s = tl.where(ok, s, float("-inf"))
        if KEY_MASK:
            real = tl.load(km_row_ptr + offs_n, mask=mask_n, other=0) != 0
            s = tl.where(real[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing stay at zero weight
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        if BLOCK_D2 > 0:
            acc2 = tl.dot(p.to(v2.dtype), v2, acc2 * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i, acc2


@triton.jit
def packed_block(cu_q_ptr, pid, num_seqs, search_steps, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """(sequence, row block in it) of program ``pid`` of a packed varlen grid, found on the device.

    Sequence ``b`` owns the programs ``first(b) = (cu_q[b] * GROUP) // BLOCK_M + b`` onwards. These ranges never
    overlap (``first(b + 1) - first(b) >= cdiv(len_b * GROUP, BLOCK_M)``) and all fit below
    ``(Tq * GROUP) // BLOCK_M + B``, so the grid depends on the token count only: no ``max_seqlen`` (no host sync
    to get it), and at most ``B`` idle programs however unequal the lengths. ``b`` is the last sequence with
    ``first(b) <= pid``: a binary search over ``cu_q`` (``search_steps = bit_length(B)`` halvings).
    """
    lo = pid * 0
    hi = lo + num_seqs - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        first = (tl.load(cu_q_ptr + mid) * GROUP) // BLOCK_M + mid
        take = first <= pid
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    first = (tl.load(cu_q_ptr + lo) * GROUP) // BLOCK_M + lo
    return lo, pid - first


@triton.jit
def rotary_rows(row_ptrs, x, pos, cos_ptr, sin_ptr, stride_cos, stride_sin, rot_len, offs_d, mask_rows,
                ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rotary embedding of a tile ``x`` ``[R, BLOCK_D]`` whose row ``r`` was loaded from ``row_ptrs[r] + d``.

    Row ``r`` is rotated by ``cos/sin[pos[r]]`` (tables ``[rot_len, ROT_DIM / 2]``; positions clamped into the
    table) on its first ``ROT_DIM`` dims: GPT-NeoX pairs ``(i, i + ROT_DIM/2)``, or with INTERLEAVED GPT-J pairs
    ``(2i, 2i + 1)``; the other dims pass through. Computed in fp32 and rounded to x's dtype, as FlashAttention.
    """
    in_rot = offs_d < ROT_DIM
    if INTERLEAVED:
        partner = offs_d ^ 1
        cidx = offs_d // 2
        first = (offs_d % 2) == 0
    else:
        first = offs_d < ROT_DIM // 2
        partner = tl.where(first, offs_d + ROT_DIM // 2, offs_d - ROT_DIM // 2)
        cidx = tl.where(first, offs_d, offs_d - ROT_DIM // 2)
    m = mask_rows[:, None] & in_rot[None, :]
    pos = clamp(pos, 0, rot_len - 1).to(tl.int64)
    xp = tl.load(row_ptrs[:, None] + partner[None, :], mask=m, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + pos[:, None] * stride_cos + cidx[None, :], mask=m, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + pos[:, None] * stride_sin + cidx[None, :], mask=m, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    rot = xf * c + tl.where(first[None, :], -xp, xp) * s
    return tl.where(m, rot, xf).to(x.dtype)


@triton.jit
def clamped_span(cu_ptr, b, limit):
    """(start, length) of sequence ``b`` from the prefix sums ``cu_ptr``, clamped into ``[0, limit]`` (an end before
    its start: an empty sequence), so malformed values never address outside the buffer."""
    start = clamp(tl.load(cu_ptr + b), 0, limit)
    length = clamp(tl.load(cu_ptr + b + 1), start, limit) - start
    return start, length


@triton.jit
def add_sink(acc, acc2, m_i, l_i, sink_ptr, head, mask_r, BLOCK_D2: tl.constexpr):
    """FA3's attention sink ``sink_ptr[head]`` (natural log) as one more key with a zero value: rescale to the new
    maximum and add its exp2 to the denominator. Returns (acc, acc2, m_i, l_i)."""
    sink = tl.load(sink_ptr + head, mask=mask_r, other=0.0).to(tl.float32) * 1.4426950408889634
    m_new = tl.maximum(m_i, sink)
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a -inf sink on a row without keys: no NaN
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.math.exp2(sink - m_new)
    acc = acc * alpha[:, None]
    if BLOCK_D2 > 0:
        acc2 = acc2 * alpha[:, None]
    return acc, acc2, m_new, l_i


__all__ = ["LOG2E", "add_sink", "attend_range", "clamped_span", "kv_tile", "packed_block", "rotary_rows", "scores",
           "tanh"]
