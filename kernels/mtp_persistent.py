"""The MTP frame as ONE persistent Triton kernel: a grid of co-resident programs executes an instruction queue.

The queue (an int64 ``[n_items, W]`` table built by :mod:`omni_fast.models.persistent`) lists the frame's work
items in one global topological order: GEMV tile groups (qkv, gate/up, o, down, lm_head; norm / gather / SwiGLU /
residual as in :mod:`.mtp_gemv`), attention per (sequence, kv head), sampling per row, the next-input sum per row.
Program ``p`` of ``P`` takes items ``p, p + P, p + 2P, ...``. Before an item it waits until each of its (at most
two) counters reaches its target (an acquire read of the counter); after it, every thread of the program passes a
barrier and one release ``atomic_add`` bumps the item's counter. A wait that spins more than ``spin_limit`` times
(or sees another program's error) writes ``item index + 1`` into the error flag and the program exits: the kernel
never hangs. The last item zeroes the counters for the next launch.

Every item reuses the tile function of today's one-op kernels (:func:`.mtp_gemv.gemv_tile`,
:func:`.mtp_layers.attention_tile`, :func:`.sampling.sample_row`, :func:`.rvq.rvq_tile`), so each output element is
computed by the same instructions as on the graph-of-kernels path. Deadlock freedom and memory ordering:
docs/persistent.md. With a grid of ONE program (the CPU interpreter) the items simply run in queue order.

Item row layout (``W`` int64 fields): 0 op, 1/2 first wait (counter, target; counter -1: none), 3/4 second wait,
5 the counter to signal (-1: none), 6.. the op's arguments (pointers are raw addresses): see :data:`FIELDS`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import static_case
from .mtp_gemv import PLAIN, RESIDUAL, SWIGLU, gemv_tile
from .mtp_layers import attention_tile
from .rvq import rvq_tile
from .sampling import sample_row

W = 24  # int64 fields per item
OPS = ("prefill", "norm", "gather", "swiglu", "o", "down", "attn_prefill", "attn_decode", "sample", "rvq", "reset")
OP = {name: i for i, name in enumerate(OPS)}
# Argument fields (from 6) per op family.
FIELDS = {
    "gemv": ("x", "nw", "w", "out", "idx", "xg", "M", "N", "K", "stride_xm", "stride_om", "pid_m", "pid_n",
             "n_tiles"),
    "attn": ("qkv", "kc", "vc", "out", "qw", "kw", "b", "h", "start", "T"),
    "prefill": ("row", "c0_embed"),
    "sample": ("logits", "row", "out", "offset"),
    "rvq": ("row", "pid_d"),
    "reset": ("n_counters",),
}


@triton.jit
def _ptr(row, f: tl.constexpr, DT: tl.constexpr):
    return tl.load(row + f).to(tl.pointer_type(DT))


@triton.jit
def _wait(ctr_ptr, err_ptr, row, f: tl.constexpr, item, spin_limit):
    """1 when counter ``row[f]`` (none if < 0) reaches ``row[f + 1]`` (acquire), 0 after ``spin_limit`` spins or
    once another program has flagged an error (then the error flag holds the first failing item + 1)."""
    c = tl.load(row + f)
    target = tl.load(row + f + 1).to(tl.int32)
    ok = 1
    if c >= 0:
        v = tl.atomic_add(ctr_ptr + c, 0, sem="acquire", scope="gpu")
        e = tl.load(err_ptr, volatile=True)
        n = 0
        while (v < target) & (n < spin_limit) & (e == 0):
            v = tl.atomic_add(ctr_ptr + c, 0, sem="acquire", scope="gpu")
            e = tl.load(err_ptr, volatile=True)
            n += 1
        if v < target:
            tl.atomic_cas(err_ptr, 0, (item + 1).to(tl.int32), sem="relaxed", scope="gpu")
            ok = 0
    return ok


@triton.jit
def _gemv(row, eps, DT: tl.constexpr, HAS_NORM: tl.constexpr, EPILOGUE: tl.constexpr, GATHER: tl.constexpr,
          BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    K = tl.load(row + 14)
    pid_n = tl.load(row + 18).to(tl.int32)
    for t in range(tl.load(row + 19).to(tl.int32)):
        gemv_tile(tl.load(row + 17).to(tl.int32), pid_n + t, _ptr(row, 6, DT), _ptr(row, 7, DT), _ptr(row, 8, DT),
                  _ptr(row, 9, DT), _ptr(row, 10, tl.int64), _ptr(row, 11, DT),
                  tl.load(row + 12).to(tl.int32), tl.load(row + 13).to(tl.int32), K.to(tl.int32),
                  tl.load(row + 15).to(tl.int32), K.to(tl.int32), tl.load(row + 16).to(tl.int32), K.to(tl.int32),
                  eps, HAS_NORM, EPILOGUE, GATHER, GATHER, 16, 16, BLOCK_K, UPCAST, DOT_PRECISION)


@triton.jit
def _attention(row, cos_ptr, sin_ptr, stride_cs, n_q, n_kv, L, scale, eps, DT: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
               BLOCK_HALF: tl.constexpr):
    """q/k/v are column ranges of the ``[B*T, (n_q + 2 n_kv) D]`` qkv buffer, the caches ``[B, n_kv, L, D]``, the
    output ``[B*T, n_q D]``: the strides of :func:`.mtp_layers.cached_attention` for these contiguous buffers."""
    T = tl.load(row + 15).to(tl.int32)
    cols = (n_q + 2 * n_kv) * D
    q = _ptr(row, 6, DT)
    attention_tile(tl.load(row + 12), tl.load(row + 13), q, q + n_q * D, q + (n_q + n_kv) * D,
                   _ptr(row, 7, DT), _ptr(row, 8, DT), _ptr(row, 9, DT), _ptr(row, 10, DT), _ptr(row, 11, DT),
                   cos_ptr, sin_ptr, T * cols, cols, D, T * cols, cols, D, T * cols, cols, D,
                   n_kv * L * D, L * D, D, T * n_q * D, n_q * D, D, stride_cs,
                   tl.load(row + 14).to(tl.int32), T, scale, eps, GROUP, BLOCK_Q, BLOCK_L, D, HALF, BLOCK_HALF, True)


@triton.jit
def _prefill(row, x_ptr, c0_ptr, c0e_ptr, table_ptr, resid_ptr, e0_ptr, codes_ptr, H,
             BLOCK_H: tl.constexpr):
    """Frame row r: residual rows 2r, 2r+1 = ``h[r]``, codebook-0 embedding (``table[c0[r]]`` or ``c0_embed[r]``,
    also kept in ``e0`` for the next-input sum); ``codes[0, r]`` = the row's group-0 index for that sum."""
    r = tl.load(row + 6)
    given = tl.load(row + 7)
    offs = tl.arange(0, BLOCK_H)
    m = offs < H
    c0 = tl.load(c0_ptr + r)
    tl.store(resid_ptr + 2 * r * H + offs, tl.load(x_ptr + r * H + offs, mask=m), mask=m)
    if given != 0:
        e = tl.load(c0e_ptr + r * H + offs, mask=m)
        tl.store(e0_ptr + r * H + offs, e, mask=m)
        tl.store(codes_ptr + r, r)
    else:
        e = tl.load(table_ptr + c0 * H + offs, mask=m)
        tl.store(codes_ptr + r, c0)
    tl.store(resid_ptr + (2 * r + 1) * H + offs, e, mask=m)


@triton.jit
def _finish_row(row, B, c0_ptr, codes_ptr, codes_out_ptr, G: tl.constexpr, BLOCK_G: tl.constexpr):
    """``codes_out[r] = (c0[r], codes[1, r], ..., codes[G-1, r])`` (the caller's ``[B, G]`` result)."""
    r = tl.load(row + 6)
    g = tl.arange(0, BLOCK_G)
    c = tl.load(codes_ptr + g * B + r, mask=(g > 0) & (g < G), other=0)
    c = tl.where(g == 0, tl.load(c0_ptr + r), c)
    tl.store(codes_out_ptr + r * G + g, c, mask=g < G)


@triton.jit
def mtp_frame_kernel(
    items_ptr, n_items, ctr_ptr, err_ptr, spin_limit,
    x_ptr, c0_ptr, c0e_ptr, seed_ptr, seed_stride, codes_out_ptr, next_ptr,
    table_ptr, resid_ptr, e0_ptr, codes_ptr, B, H, eps,
    cos_ptr, sin_ptr, stride_cs, n_q, n_kv, L, scale,
    V, inv_temperature, top_k, one_minus_top_p,
    gb_ptr, gs_ptr, gr_ptr, rvq_table_ptr,
    BK_H: tl.constexpr, BK_O: tl.constexpr, BK_I: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_Q1: tl.constexpr, BLOCK_Q2: tl.constexpr, BLOCK_L: tl.constexpr, D: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    GREEDY: tl.constexpr, TEMPERATURE: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
    S_BLOCK: tl.constexpr, S_NUM_BLOCKS: tl.constexpr, NWAY: tl.constexpr,
    G: tl.constexpr, BLOCK_G: tl.constexpr, RVQ_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One frame (see the module doc). Pointers in the items are raw addresses of the model dtype (``resid_ptr``'s)
    or int64 (ids); ``x``/``c0``/``c0e``/``seed`` are this call's inputs, ``codes_out`` ``[B, G]`` / ``next``
    ``[B, H]`` its outputs; the rest is the frame's workspace and constants."""
    DT: tl.constexpr = resid_ptr.dtype.element_ty
    i = tl.program_id(0)
    step = tl.num_programs(0)
    while i < n_items:
        row = items_ptr + i.to(tl.int64) * 24
        ok = _wait(ctr_ptr, err_ptr, row, 1, i, spin_limit)
        if ok != 0:
            ok = _wait(ctr_ptr, err_ptr, row, 3, i, spin_limit)
        if ok != 0:
            op = tl.load(row)
            if op == 0:
                _prefill(row, x_ptr, c0_ptr, c0e_ptr, table_ptr, resid_ptr, e0_ptr, codes_ptr, H, BLOCK_H)
            elif op == 1:
                _gemv(row, eps, DT, True, PLAIN, False, BK_H, UPCAST, DOT_PRECISION)
            elif op == 2:
                _gemv(row, eps, DT, True, PLAIN, True, BK_H, UPCAST, DOT_PRECISION)
            elif op == 3:
                _gemv(row, eps, DT, True, SWIGLU, False, BK_H, UPCAST, DOT_PRECISION)
            elif op == 4:
                _gemv(row, eps, DT, False, RESIDUAL, False, BK_O, UPCAST, DOT_PRECISION)
            elif op == 5:
                _gemv(row, eps, DT, False, RESIDUAL, False, BK_I, UPCAST, DOT_PRECISION)
            elif op == 6:
                _attention(row, cos_ptr, sin_ptr, stride_cs, n_q, n_kv, L, scale, eps, DT, GROUP, BLOCK_Q2, BLOCK_L,
                           D, HALF, BLOCK_HALF)
            elif op == 7:
                _attention(row, cos_ptr, sin_ptr, stride_cs, n_q, n_kv, L, scale, eps, DT, GROUP, BLOCK_Q1, BLOCK_L,
                           D, HALF, BLOCK_HALF)
            elif op == 8:
                sample_row(tl.load(row + 7).to(tl.int32), _ptr(row, 6, DT), V, V, _ptr(row, 8, tl.int64),
                           seed_ptr, seed_stride, _ptr(row, 9, tl.int64), 0, codes_ptr, 0, 0, 1.0, 1.0, codes_ptr, 0,
                           inv_temperature, top_k, one_minus_top_p, GREEDY, False, TEMPERATURE, TOP_K, TOP_P,
                           S_BLOCK, S_NUM_BLOCKS, NWAY)
            elif op == 9:
                rvq_tile(tl.load(row + 6), tl.load(row + 7).to(tl.int32), codes_ptr, rvq_table_ptr, gb_ptr, gs_ptr,
                         gr_ptr, next_ptr, H, 1, B, H, 1.0, G, RVQ_BLOCK)
                if tl.load(row + 7) == 0:
                    _finish_row(row, B, c0_ptr, codes_ptr, codes_out_ptr, G, BLOCK_G)
            elif op == 10:
                n_ctr = tl.load(row + 6)
                for j in range(0, n_ctr, 1024):
                    offs = j + tl.arange(0, 1024)
                    tl.store(ctr_ptr + offs, 0, mask=offs < n_ctr)
            # every thread's writes of this item happen before the release below (CTA barrier, then a gpu-scope
            # release by the signalling thread: cumulative over what the barrier ordered)
            tl.debug_barrier()
            sig = tl.load(row + 5)
            if sig >= 0:
                tl.atomic_add(ctr_ptr + sig, 1, sem="release", scope="gpu")
            i += step
        else:
            i = n_items  # watchdog: leave (the error flag says which item timed out)
