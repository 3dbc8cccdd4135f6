"""The MoE text decoder's decode step (the talker's, and the thinker's) in THREE launches per layer.

Today's step runs ~24 kernels per layer (norm, q/k/v GEMMs, q/k norm + TM-RoPE, KV append, attention (+ split
combine), o GEMM, norm, router GEMM, top-k, alignment, 4 grouped GEMMs, combines, the shared gate). Here a layer is

1. :func:`qkv_phase_kernel`, grid ``(M tiles, n_q + 2 n_kv)``: one program per (16-row tile, head) computes the
   head's q, k or v columns with the input RMSNorm in the prologue (:func:`.mtp_gemv.gemv_tile`, ``BLOCK_N`` = head
   dim), then, per row, the per-head q/k RMSNorm + TM-RoPE (:func:`.rope.mrope_cos_sin`,
   :func:`.rope.norm_rope_halves`) and the KV-cache append at slot ``cache_seqlens[b]`` (k, v) or q in place. A
   program owns whole heads, so nothing crosses programs.
2. :func:`attn_phase_kernel`, grid ``(B, n_q)``: one program per (row, q head) attends over the row's
   ``cache_seqlens[b] + 1`` keys (:func:`.flash_attn_parts.attend_range`), then multiplies its head's output by its
   ``[H, D]`` slice of the o weight (``gemv_tile``) into an fp32 partial ``[H]``. The LAST program of the row to
   finish (a gpu-scope acq_rel counter: no program ever waits) sums the ``n_q`` partials in head order, rounds once
   (the o projection's rounding), adds the residual and resets the counter.
3. :func:`moe_phase_kernel`, grid ``(B, parts)``: every program of a row computes the post-attention RMSNorm and
   the router logits (``gemv_tile``) and the softmax top-k (:func:`.moe_routing.topk_softmax_rows`), the same
   instructions in every program, so all agree on the routing; then program ``p`` computes one ``BI``-wide chunk of
   the intermediate of one routed slot (or of the shared expert): SwiGLU of its gate/up rows (``gemv_tile``
   ``SWIGLU``) and the down projection of that chunk into an fp32 partial ``[H]``. The last program of the row
   combines: per slot ``round(sum_chunks * routing weight)``, plus ``round(sum_chunks * sigmoid(shared gate))``, one
   rounding, the residual add (transformers' roundings, as :func:`.moe_gemm.fused_moe` + combine).

No program waits on another (the "last block reduces" pattern of split-K semaphores), so there is no co-residency
requirement and no deadlock; every reduction runs in a fixed order in one program, so the result does not depend on
which program finished last (deterministic, and batch invariant: each row is computed by its own programs with
instructions that do not depend on the batch). Roundings differ from today's ops path only in fp32 summation order
(o projection split over heads, down projection over chunks, attention key blocks), i.e. an ulp of the model dtype
on the logits. Design, launches and predicted time: docs/persistent.md.

Programmatic dependent launch (opt-in fast path ``fused_pdl`` of :mod:`omni_fast.fast_paths`, ``OMNI_FAST_PDL=1``;
sm_90+): every phase starts with
:func:`.launch.pdl_enter` and is launched with ``launch_pdl``, so the next phase's launch and CTA rasterisation
overlap this one's tail instead of following its completion (the data dependence is unchanged: each phase waits
for the previous kernel's completion before its first data access), and each phase first streams its weights into
L2 (:func:`.launch.prefetch_l2`, a hint: weights only, plus the split's KV rows) so they arrive during that tail. Off by default until a GPU run passes
tests/test_fused_step.py's gpu-marked PDL test (the project's rule for new fast paths).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import fast_paths
from .flash_attn_parts import attend_range
from .launch import clamp, interpreting, launch, pdl_enter, pdl_meta, prefetch_l2, static_case
from .moe_routing import topk_softmax_rows
from .mtp_gemv import PLAIN as _PLAIN, SWIGLU as _SWIGLU, gemv_tile
from .rope import mrope_cos_sin, norm_rope_halves

PLAIN, SWIGLU = tl.constexpr(_PLAIN), tl.constexpr(_SWIGLU)
LOG2E = 1.4426950408889634
BLOCK_M = 16  # rows per program of the qkv phase (one tl.dot M tile)


@triton.jit
def qkv_phase_kernel(
    x_ptr, nw_ptr, wq_ptr, wk_ptr, wv_ptr, qkv_ptr, kc_ptr, vc_ptr, seqlens_ptr, pos_ptr, inv_freq_ptr, qw_ptr,
    kw_ptr, ctr_ptr, M, H, n_q, n_kv, stride_x, stride_qkv, stride_cb, stride_ct, stride_pos_row, capacity, scaling,
    eps,
    D: tl.constexpr, HALF: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    SEC_T: tl.constexpr, SEC_H: tl.constexpr, SEC_W: tl.constexpr, INTERLEAVED: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """x (the residual) ``[M, H]``; wq ``[n_q D, H]``, wk / wv ``[n_kv D, H]``; qkv ``[M, (n_q + 2 n_kv) D]``
    (q heads, k heads, v heads); caches ``[B, S, n_kv, D]`` (strides ``stride_cb`` / ``stride_ct``, unit head
    stride D); positions int ``[3, M]``; inv_freq fp32 ``[D/2]``; q/k norm weights ``[D]``; ctr int32
    ``[M tiles, n_q + 2 n_kv]`` (zero between launches). Program ``(pid_m, j * D/16 + t)`` computes the 16-column
    tile t of head j; the head's last tile to finish runs the per-row epilogue (norm, RoPE, cache append)."""
    pid_m = tl.program_id(0)
    TPH: tl.constexpr = D // 16  # 16-column GEMV tiles per head (every SM streams weights at B = 1)
    j = tl.program_id(1) // TPH  # q heads, then k heads, then v heads
    t = tl.program_id(1) % TPH
    DT: tl.constexpr = qkv_ptr.dtype.element_ty
    kind = (j >= n_q).to(tl.int32) + (j >= n_q + n_kv).to(tl.int32)  # 0 q, 1 k, 2 v
    n = j - tl.where(kind == 0, 0, tl.where(kind == 1, n_q, n_q + n_kv))  # head index within its projection
    sec = (j - n) * D  # the projection's first column in qkv
    width = tl.where(kind == 0, n_q, n_kv) * D
    w = wq_ptr
    nw = qw_ptr
    cache = vc_ptr
    if kind == 1:
        w = wk_ptr
        nw = kw_ptr
        cache = kc_ptr
    if kind == 2:
        w = wv_ptr
    if PDL:  # this program's 16 weight rows into L2 while the previous kernel drains (index math only above)
        if pid_m == 0:
            ES: tl.constexpr = DT.primitive_bitwidth // 8
            prefetch_l2(w + (n * TPH + t) * 16 * H, 16, H * ES, H * ES, 16, 16)
    pdl_enter(PDL)
    gemv_tile(pid_m, n * TPH + t, x_ptr, nw_ptr, w, qkv_ptr + sec, seqlens_ptr, x_ptr, M, width, H, stride_x, H,
              stride_qkv, 0, eps, True, PLAIN, False, False, 16, 16, BLOCK_K, UPCAST, DOT_PRECISION)
    # release this tile; the head's last tile (acquire: it sees every tile of the head) finishes the head
    tl.debug_barrier()
    head_ctr = ctr_ptr + pid_m * (tl.num_programs(1) // TPH) + j
    done = tl.atomic_add(head_ctr, 1, sem="acq_rel", scope="gpu")
    if done == TPH - 1:
        tl.debug_barrier()
        _qkv_epilogue(qkv_ptr, cache, nw, seqlens_ptr, pos_ptr, inv_freq_ptr, pid_m, M, kind, sec + n * D, n,
                      stride_qkv, stride_cb, stride_ct, stride_pos_row, capacity, scaling, eps, DT, HALF, BLOCK_J,
                      SEC_T, SEC_H, SEC_W, INTERLEAVED)
        tl.store(head_ctr, 0)


@triton.jit(noinline=True)
def _qkv_epilogue(qkv_ptr, cache, nw, seqlens_ptr, pos_ptr, inv_freq_ptr, pid_m, M, kind, col, n, stride_qkv,
                  stride_cb, stride_ct, stride_pos_row, capacity, scaling, eps, DT: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_J: tl.constexpr, SEC_T: tl.constexpr, SEC_H: tl.constexpr, SEC_W: tl.constexpr,
                  INTERLEAVED: tl.constexpr):
    """Rows of M tile ``pid_m``, one head (columns ``col..col + 2 HALF`` of qkv): q/k RMSNorm + TM-RoPE (kind 0 / 1),
    then q back in place, k / v (kind 1 / 2) into the cache at slot ``cache_seqlens[row]``."""
    offs_j = tl.arange(0, BLOCK_J)
    mask_j = offs_j < HALF
    w1 = tl.load(nw + offs_j, mask=mask_j, other=0.0).to(tl.float32)
    w2 = tl.load(nw + HALF + offs_j, mask=mask_j, other=0.0).to(tl.float32)
    for r in range(0, 16):
        row = pid_m * 16 + r
        if row < M:
            p = qkv_ptr + row.to(tl.int64) * stride_qkv + col + offs_j[None, :]
            x1 = tl.load(p, mask=mask_j[None, :], other=0.0)
            x2 = tl.load(p + HALF, mask=mask_j[None, :], other=0.0)
            if kind < 2:
                cos, sin = mrope_cos_sin(pos_ptr, stride_pos_row, row.to(tl.int64), inv_freq_ptr, offs_j, mask_j,
                                         scaling, DT, SEC_T, SEC_H, SEC_W, INTERLEAVED)
                o1, o2 = norm_rope_halves(x1, x2, w1, w2, cos[None, :], sin[None, :], eps, 2 * HALF, True)
                x1 = o1.to(DT)
                x2 = o2.to(DT)
            if kind == 0:
                tl.store(p, x1, mask=mask_j[None, :])
                tl.store(p + HALF, x2, mask=mask_j[None, :])
            else:
                # slot cache_seqlens[row]; a full cache drops the token (as append_kv_kernel), never overflows
                slot = tl.load(seqlens_ptr + row)
                slots = offs_j[None, :] * 0 + slot  # a vector mask (the interpreter needs it)
                ok = mask_j[None, :] & (slots >= 0) & (slots < capacity)
                slot = clamp(slot, 0, capacity - 1).to(tl.int64)
                c = cache + row.to(tl.int64) * stride_cb + slot * stride_ct + n * 2 * HALF + offs_j[None, :]
                tl.store(c, x1, mask=ok)
                tl.store(c + HALF, x2, mask=ok)


@triton.jit(noinline=True)
def _merge_heads_to_residual(part_ptr, lse_ptr, n_q, S, resid_ptr, H, DT: tl.constexpr, BLOCK_S: tl.constexpr,
                             BLOCK_H: tl.constexpr):
    """The last program of a row: ``resid = round(resid + round(sum_h sum_s w_hs y_hs))``, ``y_hs`` the fp32 o
    projection ``[H]`` of head h's split-s output (``part_ptr`` ``[n_q, S, H]``) and ``w_hs`` the split's softmax
    share (base-2 lse ``[n_q, S]``: ``2^(lse_s - max) / sum``; a split that saw no key has lse -inf, weight 0). In
    head, then split order: deterministic. With S = 1 every weight is exactly 1."""
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    offs_s = tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for h in range(n_q):
        lse = tl.load(lse_ptr + h * S + offs_s, mask=offs_s < S, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
        total = tl.sum(w, 0)
        w = w / tl.where(total > 0.0, total, 1.0)
        for s in range(S):
            ws = tl.sum(tl.where(offs_s == s, w, 0.0), 0)
            acc += ws * tl.load(part_ptr + (h * S + s) * H + offs, mask=mask, other=0.0)
    x = tl.load(resid_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(resid_ptr + offs, (x + acc.to(DT).to(tl.float32)).to(DT), mask=mask)


@triton.jit(noinline=True)
def _attn_prefetch(kc_ptr, vc_ptr, wo_ptr, b, h, s, S, lo, hi, H, n_q, stride_cb, stride_ct,
                   GROUP: tl.constexpr, D: tl.constexpr, DT: tl.constexpr):
    """PDL only: the program's keys/values ``[lo, hi)`` (one program per kv head) and, from row 0's programs, a
    1/S share of head h's ``[H, D]`` o-weight slice, into L2 before the wait."""
    ES: tl.constexpr = DT.primitive_bitwidth // 8
    if h % GROUP == 0:
        kv = b * stride_cb + lo * stride_ct + (h // GROUP) * D
        prefetch_l2(kc_ptr + kv, hi - lo, D * ES, stride_ct * ES, 64, 2)
        prefetch_l2(vc_ptr + kv, hi - lo, D * ES, stride_ct * ES, 64, 2)
    if b == 0:
        per = tl.cdiv(H, S)
        prefetch_l2(wo_ptr + (s * per) * (n_q * D) + h * D, tl.minimum(per, H - s * per), D * ES, n_q * D * ES, 64, 2)


@triton.jit
def attn_phase_kernel(
    qkv_ptr, kc_ptr, vc_ptr, seqlens_ptr, o_ptr, wo_ptr, part_ptr, lse_ptr, resid_ptr, ctr_ptr,
    H, n_q, stride_qkv, stride_resid, stride_cb, stride_ct, capacity, split_len, qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NO: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
):
    """Grid ``(B, n_q, S)``. q from the qkv buffer (after the qkv phase), caches ``[B, L, n_kv, D]`` already
    holding this token at ``cache_seqlens[b]``; program (b, h, s) attends to keys ``[s split_len, (s+1) split_len)``
    of the row's ``cache_seqlens[b] + 1`` and projects its (split-normalised) output by head h's ``[H, D]`` slice of
    wo ``[H, n_q D]`` (the o projection is linear, so the split merge can follow it). Scratch: o ``[B, S, n_q, D]``
    (model dtype), part fp32 ``[B, n_q, S, H]``, lse fp32 ``[B, n_q, S]``; ctr int32 ``[B]`` (zero between
    launches); resid ``[B, H]`` updated in place by the row's last program. ``qk_scale`` = scale * log2(e)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.program_id(2)
    S = tl.num_programs(2)
    DT: tl.constexpr = o_ptr.dtype.element_ty
    if PDL:  # the prefetch's key range from a read before the wait: a hint only, recomputed below after it
        pre_k = clamp(tl.load(seqlens_ptr + b) + 1, 1, capacity)
        pre_lo = tl.minimum(s * split_len, pre_k)
        _attn_prefetch(kc_ptr, vc_ptr, wo_ptr, b, h, s, S, pre_lo, tl.minimum(pre_lo + split_len, pre_k), H, n_q,
                       stride_cb, stride_ct, GROUP, D, DT)
    pdl_enter(PDL)
    len_k = clamp(tl.load(seqlens_ptr + b) + 1, 1, capacity)
    lo = tl.minimum(s * split_len, len_k)
    hi = tl.minimum(lo + split_len, len_k)
    offs_r = tl.arange(0, 16)  # one real query row (row 0): tl.dot's smallest M tile
    offs_d = tl.arange(0, D)
    mask_d = offs_d < D
    first = (offs_r == 0)[:, None] & mask_d[None, :]
    q = tl.load(qkv_ptr + b * stride_qkv + h * D + offs_r[:, None] * 0 + offs_d[None, :], mask=first, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qpos = offs_r * 0 + len_k - 1
    kv = b * stride_cb + (h // GROUP) * D
    acc = tl.zeros((16, D), dtype=tl.float32)
    m_i = tl.full((16,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((16,), dtype=tl.float32)
    acc, m_i, l_i, _ = attend_range(acc, m_i, l_i, q, qpos, lo, hi, kc_ptr + kv, vc_ptr + kv, seqlens_ptr,
                                    seqlens_ptr, 0, stride_ct, 0, stride_ct, 1, 1, len_k, 0, capacity, 0, qk_scale,
                                    0.0, tl.zeros((16,), dtype=tl.float32), offs_d, mask_d,
                                    tl.zeros((1,), dtype=tl.float32), None, None, None,  # no 2nd head-dim tile
                                    BLOCK_N, False, UPCAST, PREC, True, 1, False, False, False, 0)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    row = (b * n_q + h) * S + s  # this program's (row, head, split)
    tl.store(lse_ptr + row + offs_r * 0, lse, mask=offs_r == 0)
    o_row = o_ptr + ((b * S + s) * n_q + h) * D
    tl.store(o_row + offs_r[:, None] * 0 + offs_d[None, :], out.to(DT), mask=first)
    tl.debug_barrier()  # the head's output row is re-read by the o-projection below (other threads)
    for n in range(0, tl.cdiv(H, BLOCK_NO)):
        gemv_tile(0, n, o_row, wo_ptr, wo_ptr + h * D, part_ptr + row * H, seqlens_ptr, o_row, 1, H, D, D, n_q * D,
                  H, 0, 0.0, False, PLAIN, False, False, 16, BLOCK_NO, D, UPCAST, PREC)
    # every thread's partial is written before the release; the last program's acquire sees all of the row's
    tl.debug_barrier()
    done = tl.atomic_add(ctr_ptr + b, 1, sem="acq_rel", scope="gpu")
    if done == n_q * S - 1:
        tl.debug_barrier()
        _merge_heads_to_residual(part_ptr + b * n_q * S * H, lse_ptr + b * n_q * S, n_q, S,
                                 resid_ptr + b * stride_resid, H, DT, BLOCK_S, BLOCK_H)
        tl.store(ctr_ptr + b, 0)  # ready for the next layer / step (a kernel boundary orders it)


@triton.jit(noinline=True)
def _moe_combine_row(resid_row, nw_ptr, sg_ptr, lrow, part_ptr, H, stride_resid, n_chunks, n_shared, eps,
                     DT: tl.constexpr, TOP_K: tl.constexpr, SHARED: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_TK: tl.constexpr, BK_H: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
                     PREC: tl.constexpr):
    """The last program of a row: ``resid += round(sum_j round(y_j * w_j) + round(y_s * sigmoid(x.g)))`` with
    ``y`` the fp32 sums of the chunk partials (``part_ptr``: this row's ``[parts, H]``) and ``w_j`` the routing
    weights, already rounded to the model dtype, at ``lrow[BLOCK_E + 16 + j]`` (a noinline function takes scalars
    only: noinline keeps this tail's registers out of the main body, which spilled with it inlined)."""
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        wj = tl.load(lrow + BLOCK_E + 16 + j).to(tl.float32)
        s = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for c in range(n_chunks):
            s += tl.load(part_ptr + (j * n_chunks + c) * H + offs, mask=mask, other=0.0)
        acc += (s * wj).to(DT).to(tl.float32)
    if SHARED:
        # the shared expert's gate logit x.g (normalised x, rounded like F.linear), then sigmoid rounded to DT
        gemv_tile(0, 0, resid_row, nw_ptr, sg_ptr, lrow + BLOCK_E, sg_ptr, resid_row, 1, 1, H, stride_resid, H, 16,
                  0, eps, True, PLAIN, False, False, 16, 16, BK_H, UPCAST, PREC)
        tl.debug_barrier()
        g = tl.load(lrow + BLOCK_E).to(tl.float32)
        gate = (1.0 / (1.0 + tl.exp(-g))).to(DT).to(tl.float32)
        s = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for c in range(n_shared):
            s += tl.load(part_ptr + (TOP_K * n_chunks + c) * H + offs, mask=mask, other=0.0)
        acc += (s * gate).to(DT).to(tl.float32)
    x = tl.load(resid_row + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(resid_row + offs, (x + acc.to(DT).to(tl.float32)).to(DT), mask=mask)


@triton.jit(noinline=True)
def _moe_prefetch(router_ptr, b, p, P, H, E, DT: tl.constexpr):
    """PDL only, row 0's programs: a 1/P share of the router ``[E, H]`` into L2 before the wait. The routed experts
    are known only after routing; the shared expert's chunk is left out: a second prefetch call here makes the
    MoE phase spill 20 B on sm_90a (168 registers either way; inlined, 210 registers and one CTA less per SM)."""
    if b == 0:
        ES: tl.constexpr = DT.primitive_bitwidth // 8
        per = tl.cdiv(E, P)
        prefetch_l2(router_ptr + (p * per) * H, tl.minimum(per, E - p * per), H * ES, H * ES, 16, 16)


@triton.jit
def moe_phase_kernel(
    resid_ptr, nw_ptr, router_ptr, w13_ptr, w2_ptr, sw13_ptr, sw2_ptr, sg_ptr, logit_ptr, act_ptr, part_ptr, ctr_ptr,
    H, E, I, IS, stride_resid, n_chunks, n_shared, act_width, eps,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, SHARED: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_TK: tl.constexpr, BI: tl.constexpr, BK_H: tl.constexpr, BN_H: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
):
    """resid ``[B, H]`` (updated in place), post-attention norm weight ``[H]``, router ``[E, H]``, w13 ``[E, 2I, H]``,
    w2 ``[E, H, I]``, shared sw13 ``[2 IS, H]`` / sw2 ``[H, IS]`` / gate ``[1, H]``; scratch per (row, program):
    logits ``[BLOCK_E + 32]`` (model dtype), act ``[act_width]`` (model dtype), part fp32 ``[H]``; ctr int32 ``[B]``.
    Program ``p < TOP_K * n_chunks`` takes chunk ``p % n_chunks`` of slot ``p // n_chunks``, the others chunk
    ``p - TOP_K * n_chunks`` of the shared expert."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    DT: tl.constexpr = resid_ptr.dtype.element_ty
    if PDL:
        _moe_prefetch(router_ptr, b, p, P, H, E, DT)
    pdl_enter(PDL)
    x = resid_ptr + b * stride_resid
    slot = b * P + p
    lrow = logit_ptr + slot * (BLOCK_E + 32)  # E logits, the shared gate logit at BLOCK_E, weights at BLOCK_E + 16
    # 1. router logits of the normalised row (every program: the same instructions, the same routing)
    for n in range(0, tl.cdiv(E, 16)):
        gemv_tile(0, n, x, nw_ptr, router_ptr, lrow, router_ptr, x, 1, E, H, stride_resid, H, 16, 0, eps, True,
                  PLAIN, False, False, 16, 16, BK_H, UPCAST, PREC)
    tl.debug_barrier()
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    logits = tl.load(lrow + offs_e[None, :], mask=mask_e[None, :], other=float("-inf")).to(tl.float32)
    vals, ids = topk_softmax_rows(logits, tl.zeros((1,), dtype=tl.int32) == 0, offs_e, mask_e, TOP_K, RENORMALIZE,
                                  BLOCK_E, BLOCK_TK)
    offs_k = tl.arange(0, BLOCK_TK)
    # the routing weights, rounded to the model dtype as transformers does, for the combine (kept in this
    # program's scratch row rather than in registers across the expert work)
    tl.store(lrow + BLOCK_E + 16 + offs_k[None, :], vals.to(DT), mask=offs_k[None, :] < TOP_K)
    # 2. this program's chunk: SwiGLU of BI intermediate columns, then their share of the down projection
    c = p - TOP_K * n_chunks  # a shared-expert chunk ...
    w1 = sw13_ptr
    w2 = sw2_ptr
    width = IS
    if p < TOP_K * n_chunks:  # ... or chunk c of routed slot j
        j = p // n_chunks
        c = p % n_chunks
        e = tl.sum(tl.where(offs_k[None, :] == j, ids, 0)).to(tl.int64)
        w1 = w13_ptr + e * (2 * I * H)
        w2 = w2_ptr + e * (H * I)
        width = I
    arow = act_ptr + slot * act_width
    for t in range(0, BI // 16):  # 16-column tiles: the MTP GEMV's proven tile (16 x BK_H, two accumulators)
        gemv_tile(0, c * (BI // 16) + t, x, nw_ptr, w1, arow, w1, x, 1, width, H, stride_resid, H, act_width, 0,
                  eps, True, SWIGLU, False, False, 16, 16, BK_H, UPCAST, PREC)
    tl.debug_barrier()
    k_chunk = tl.minimum(width - c * BI, BI)
    prow = part_ptr + slot * H
    for n in range(0, tl.cdiv(H, BN_H)):
        gemv_tile(0, n, arow + c * BI, nw_ptr, w2 + c * BI, prow, w2, arow, 1, H, k_chunk, act_width, width, H, 0,
                  0.0, False, PLAIN, False, False, 16, BN_H, BI, UPCAST, PREC)
    # 3. the last program of the row combines (release of every thread's partial / acquire of all of them)
    tl.debug_barrier()
    done = tl.atomic_add(ctr_ptr + b, 1, sem="acq_rel", scope="gpu")
    if done == P - 1:
        tl.debug_barrier()
        _moe_combine_row(x, nw_ptr, sg_ptr, lrow, part_ptr + b * P * H, H, stride_resid, n_chunks, n_shared,
                         eps, DT, TOP_K, SHARED, BLOCK_E, BLOCK_TK, BK_H, BLOCK_H, UPCAST, PREC)
        tl.store(ctr_ptr + b, 0)


# --- launchers ---------------------------------------------------------------------------------------------------


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _bk(K: int) -> int:
    return max(16, min(256, triton.next_power_of_2(max(K, 1))))


def _moe_bk(H: int) -> int:
    """The MoE phase's K tile over the hidden size: 128 above H 1024 (the thinker's H 2048 at 256 needs 255
    registers on Triton 3.9 and spills 16 B on 3.6; 128: 167 registers, no spills); the talker keeps 256."""
    return _bk(H) if H <= 1024 else min(_bk(H), 128)


def qkv_phase(x, norm_weight, wq, wk, wv, qkv, k_cache, v_cache, cache_seqlens, positions, inv_freq, q_norm, k_norm,
              counters, eps: float, mrope_section, interleaved: bool, scaling: float) -> None:
    """Phase 1 (see the module doc). x ``[M, H]``, qkv ``[M, (n_q + 2 n_kv) D]`` (contiguous), caches
    ``[>= M, S, n_kv, D]`` (contiguous), cache_seqlens int32 ``[>= M]``, positions int64 ``[3, M]``, counters
    int32 ``[cdiv(M, 16) * (n_q + 2 n_kv)]`` (zero)."""
    M, H = x.shape
    D = q_norm.shape[0]
    n_q, n_kv = wq.shape[0] // D, wk.shape[0] // D
    launch(qkv_phase_kernel, (triton.cdiv(M, BLOCK_M), (n_q + 2 * n_kv) * (D // 16)), x, norm_weight, wq, wk, wv, qkv,
           k_cache, v_cache, cache_seqlens, positions, inv_freq, q_norm, k_norm, counters, M, H, n_q, n_kv,
           x.stride(0), qkv.stride(0),
           k_cache.stride(0), k_cache.stride(1), positions.stride(0), k_cache.shape[1], float(scaling), float(eps),
           D=D, HALF=D // 2, BLOCK_J=triton.next_power_of_2(D // 2), BLOCK_K=_bk(H),
           SEC_T=int(mrope_section[0]), SEC_H=int(mrope_section[1]), SEC_W=int(mrope_section[2]),
           INTERLEAVED=bool(interleaved), UPCAST=interpreting(), DOT_PRECISION=_prec(x.dtype), num_warps=4,
           device=x.device, **pdl_meta(fast_paths.enabled("fused_pdl"), x.device))


MAX_SPLITS = 8
MIN_KEYS_PER_SPLIT = 512
SPLIT_ALIGN = 64  # split boundaries are multiples of the key block: no key is visited by two splits


def attn_splits(capacity: int) -> tuple[int, int]:
    """(splits, keys per split) of the attention phase: from the cache CAPACITY only (not the batch, not the
    current lengths), so a row's result does not depend on the batch it shares a step with and the launch is static
    (graph-capturable). Up to 8 splits of >= 512 keys: B x n_q x S programs stream the KV cache (16 x 8 = 128 at
    B = 1 on the talker)."""
    splits = max(1, min(MAX_SPLITS, capacity // MIN_KEYS_PER_SPLIT))
    return splits, triton.cdiv(triton.cdiv(capacity, splits), SPLIT_ALIGN) * SPLIT_ALIGN


def attn_phase(qkv, k_cache, v_cache, cache_seqlens, o, wo, part, lse, resid, counters, scale: float) -> None:
    """Phase 2. o ``[M, S, n_q, D]``, part fp32 ``[M, n_q, S, H]``, lse fp32 ``[M, n_q, S]`` (S from
    :func:`attn_splits`), counters int32 ``[M]`` (zero), resid ``[M, H]``."""
    M, H = resid.shape
    n_q, S, D = part.shape[1], part.shape[2], k_cache.shape[3]
    capacity = k_cache.shape[1]
    splits, split_len = attn_splits(capacity)
    assert splits == S
    launch(attn_phase_kernel, (M, n_q, S), qkv, k_cache, v_cache, cache_seqlens, o, wo, part, lse, resid, counters,
           H, n_q, qkv.stride(0), resid.stride(0), k_cache.stride(0), k_cache.stride(1), capacity, split_len,
           float(scale) * LOG2E, GROUP=n_q // k_cache.shape[2], D=D, BLOCK_N=SPLIT_ALIGN,
           BLOCK_NO=min(64, max(16, triton.next_power_of_2(H))), BLOCK_S=triton.next_power_of_2(S),
           BLOCK_H=triton.next_power_of_2(H), UPCAST=interpreting(), PREC=_prec(resid.dtype), num_warps=4,
           device=resid.device, **pdl_meta(fast_paths.enabled("fused_pdl"), resid.device))


def moe_layout(top_k: int, inter: int, shared_inter: int, block_i: int) -> tuple[int, int, int]:
    """(routed chunks per slot, shared chunks, programs per row) for chunks of ``block_i`` intermediate columns."""
    n_chunks, n_shared = triton.cdiv(inter, block_i), triton.cdiv(shared_inter, block_i) if shared_inter else 0
    return n_chunks, n_shared, top_k * n_chunks + n_shared


def moe_block_i(inter: int, shared_inter: int) -> int:
    """Intermediate columns per program: 32 at the real shapes (talker I 384 / shared 768: 6 x 12 + 24 = 96 programs
    per row, enough to stream the experts on most SMs at B = 1; each program also re-reads the 256 KB router from
    L2, the price of agreeing on the routing without a wait), 16 when tiny."""
    return max(16, min(32, triton.next_power_of_2(max(inter, shared_inter or 1))))


def moe_phase(resid, norm_weight, router, w13, w2, shared_w13, shared_w2, shared_gate, top_k: int,
              renormalize: bool, logits, act, part, counters, eps: float) -> None:
    """Phase 3. Scratch from :func:`moe_scratch_shapes`; counters int32 ``[M]`` (zero)."""
    M, H = resid.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    shared = shared_w13 is not None
    shared_inter = shared_w13.shape[0] // 2 if shared else 0
    bi = moe_block_i(inter, shared_inter)
    n_chunks, n_shared, parts = moe_layout(top_k, inter, shared_inter, bi)
    launch(moe_phase_kernel, (M, parts), resid, norm_weight, router, w13, w2,
           shared_w13 if shared else w13, shared_w2 if shared else w2, shared_gate if shared else router,
           logits, act, part, counters, H, E, inter, shared_inter, resid.stride(0), n_chunks, n_shared,
           act.shape[-1], float(eps), TOP_K=int(top_k), RENORMALIZE=bool(renormalize), SHARED=shared,
           BLOCK_E=triton.next_power_of_2(E), BLOCK_TK=triton.next_power_of_2(top_k), BI=bi, BK_H=_moe_bk(H),
           BN_H=min(64, max(16, triton.next_power_of_2(H))), BLOCK_H=triton.next_power_of_2(H),
           UPCAST=interpreting(), PREC=_prec(resid.dtype), num_warps=4, device=resid.device,
           **pdl_meta(fast_paths.enabled("fused_pdl"), resid.device))


def moe_scratch_shapes(M: int, H: int, E: int, top_k: int, inter: int, shared_inter: int):
    """Shapes of (logits [model dtype], act [model dtype], part [fp32]) for :func:`moe_phase`."""
    bi = moe_block_i(inter, shared_inter)
    _, _, parts = moe_layout(top_k, inter, shared_inter, bi)
    width = triton.cdiv(max(inter, shared_inter), bi) * bi
    return (M, parts, triton.next_power_of_2(E) + 32), (M, parts, width), (M, parts, H)


# --- sm_90a static compile cases: the real talker (H 1024, 16 q / 2 kv heads of 128, 128 experts top-6, I 384,
# shared I 768) and thinker (H 2048, 32 / 4 heads, top-8, I 768, no shared expert) -------------------------------

def _sig(names_ptr: dict, ints: tuple, floats: tuple, consts: tuple) -> dict:
    sig = dict(names_ptr)
    sig.update({n: "i32" for n in ints})
    sig.update({n: "fp32" for n in floats})
    sig.update({n: "constexpr" for n in consts})
    return sig


def _register_static_cases() -> None:
    dt = "bf16"
    for part, H, nq, nk, E, k, inter, shared, pdl in (("talker", 1024, 16, 2, 128, 6, 384, 768, False),
                                                      ("thinker", 2048, 32, 4, 128, 8, 768, 0, False),
                                                      ("talker", 1024, 16, 2, 128, 6, 384, 768, True),
                                                      ("thinker", 2048, 32, 4, 128, 8, 768, 0, True)):
        tag = ",pdl" if pdl else ""  # the PDL variants: the same code behind griddepcontrol.wait / launch_dependents
        ptr = {n: f"*{dt}" for n in ("x_ptr", "nw_ptr", "wq_ptr", "wk_ptr", "wv_ptr", "qkv_ptr", "kc_ptr", "vc_ptr")}
        ptr.update(seqlens_ptr="*i32", pos_ptr="*i64", inv_freq_ptr="*fp32", qw_ptr=f"*{dt}", kw_ptr=f"*{dt}",
                   ctr_ptr="*i32")
        static_case(f"qkv_phase_kernel[{dt},{part} H{H} {nq}/{nk} d128{tag}]", qkv_phase_kernel,
                    _sig(ptr, ("M", "H", "n_q", "n_kv", "stride_x", "stride_qkv", "stride_cb", "stride_ct",
                               "stride_pos_row", "capacity"), ("scaling", "eps"),
                         ("D", "HALF", "BLOCK_J", "BLOCK_K", "SEC_T", "SEC_H", "SEC_W", "INTERLEAVED", "UPCAST",
                          "DOT_PRECISION", "PDL")),
                    dict(D=128, HALF=64, BLOCK_J=64, BLOCK_K=256, SEC_T=24, SEC_H=20, SEC_W=20, INTERLEAVED=True,
                         UPCAST=False, DOT_PRECISION="tf32", PDL=pdl),
                    aligned=("H", "stride_x", "stride_qkv", "stride_cb", "stride_ct"))
        ptr = {n: f"*{dt}" for n in ("qkv_ptr", "kc_ptr", "vc_ptr", "o_ptr", "wo_ptr", "resid_ptr")}
        ptr.update(seqlens_ptr="*i32", part_ptr="*fp32", lse_ptr="*fp32", ctr_ptr="*i32")
        static_case(f"attn_phase_kernel[{dt},{part} H{H} {nq}/{nk} d128,8 splits{tag}]", attn_phase_kernel,
                    _sig(ptr, ("H", "n_q", "stride_qkv", "stride_resid", "stride_cb", "stride_ct", "capacity",
                               "split_len"), ("qk_scale",),
                         ("GROUP", "D", "BLOCK_N", "BLOCK_NO", "BLOCK_S", "BLOCK_H", "UPCAST", "PREC", "PDL")),
                    dict(GROUP=nq // nk, D=128, BLOCK_N=64, BLOCK_NO=64, BLOCK_S=8, BLOCK_H=H, UPCAST=False,
                         PREC="tf32", PDL=pdl),
                    aligned=("H", "stride_qkv", "stride_resid", "stride_cb", "stride_ct", "split_len"))
        ptr = {n: f"*{dt}" for n in ("resid_ptr", "nw_ptr", "router_ptr", "w13_ptr", "w2_ptr", "sw13_ptr", "sw2_ptr",
                                     "sg_ptr", "logit_ptr", "act_ptr")}
        ptr.update(part_ptr="*fp32", ctr_ptr="*i32")
        static_case(f"moe_phase_kernel[{dt},{part} H{H} E{E} k{k} I{inter}{f' shared {shared}' if shared else ''}"
                    f"{tag}]", moe_phase_kernel,
                    _sig(ptr, ("H", "E", "I", "IS", "stride_resid", "n_chunks", "n_shared", "act_width"), ("eps",),
                         ("TOP_K", "RENORMALIZE", "SHARED", "BLOCK_E", "BLOCK_TK", "BI", "BK_H", "BN_H", "BLOCK_H",
                          "UPCAST", "PREC", "PDL")),
                    dict(TOP_K=k, RENORMALIZE=True, SHARED=bool(shared), BLOCK_E=E, BLOCK_TK=8, BI=32, BK_H=_moe_bk(H),
                         BN_H=64, BLOCK_H=H, UPCAST=False, PREC="tf32", PDL=pdl),
                    aligned=("H", "I", "IS", "stride_resid", "act_width"))


_register_static_cases()
