"""The MTP frame as ONE persistent Triton kernel: a grid of co-resident programs executes an instruction queue.

The queue (an int64 ``[n_items, W]`` table built by :mod:`omni_fast.models.persistent`) lists the frame's work
items in one global topological order: GEMV tile groups (qkv, gate/up, o, down, lm_head; norm / gather / SwiGLU /
residual as in :mod:`.mtp_gemv`), attention per (sequence, kv head), sampling per row, the next-input sum per row.
Program ``p`` of ``P`` takes items ``p, p + P, p + 2P, ...``. Before an item it waits until each of its (at most
two) counters reaches its target (an acquire read of the counter); after it, every thread of the program passes a
barrier and one release ``atomic_add`` bumps the item's counter. A wait that spins more than ``spin_limit`` times
writes ``item index + 1`` into the error flag; from then on (and in a launch that starts with the flag set) every
wait returns at once and the programs DRAIN: they walk their remaining items running only the ``rvq`` items, which
write the call's outputs from the codes buffer (every entry written is a valid code; a drained read may race a
late sampler's store, so every id is clamped where it forms an address or leaves the kernel), signal nothing and
exit. So the kernel never hangs, and a tripped launch still returns defined, in-range codes (no uninitialised ids
reach the embedding gathers downstream). The last item zeroes the counters for the next launch (drained too after
a trip: ``PersistentFrame.reset``).

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
from .mtp_gemv import PLAIN as _PLAIN, RESIDUAL as _RESIDUAL, SWIGLU as _SWIGLU, gemv_tile
from .mtp_layers import attention_tile
from .rvq import rvq_tile
from .sampling import sample_row

W = 24  # int64 fields per item
# Frame constants (int64 ``prm`` array): workspace / table addresses and sizes.
PARAMS = ("table", "resid", "e0", "codes", "B", "H", "cos", "sin", "stride_cs", "n_q", "n_kv", "L", "V", "top_k",
          "gb", "gs", "gr", "seed_stride")
(P_TABLE, P_RESID, P_E0, P_CODES, P_B, P_H, P_COS, P_SIN, P_STRIDE_CS, P_NQ, P_NKV, P_L, P_V, P_TOP_K, P_GB, P_GS,
 P_GR, P_SEED_STRIDE) = (tl.constexpr(i) for i in range(len(PARAMS)))
PLAIN, SWIGLU, RESIDUAL = tl.constexpr(_PLAIN), tl.constexpr(_SWIGLU), tl.constexpr(_RESIDUAL)  # GEMV epilogues
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
def _ptr(row, f: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Field ``f`` of the item as a pointer to ``DT``. ``ALIGNED``: the host checked that it is 16-byte aligned;
    telling the compiler so keeps the 16-byte vector loads and cp.async pipelining of the one-op kernels (a pointer
    made from an integer is otherwise assumed unaligned)."""
    p = tl.load(row + f).to(tl.pointer_type(DT))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _int(row, f: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Field ``f`` as int32 (``ALIGNED``: a multiple of 16, checked by the host: sizes and strides of rows)."""
    v = tl.load(row + f).to(tl.int32)
    if ALIGNED:
        v = tl.multiple_of(v, 16)
    return v


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
        if e != 0:
            ok = 0
    return ok


@triton.jit(noinline=True)
def _gemv(row, eps, DT: tl.constexpr, HAS_NORM: tl.constexpr, EPILOGUE: tl.constexpr, GATHER: tl.constexpr,
          BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr):
    K = _int(row, 14, ALIGNED)
    pid_n = _int(row, 18)
    for t in range(_int(row, 19)):
        # (the code-index pointer of a gather item is never claimed aligned: it points at row (step-1)*B of the
        # int64 codes, 8-byte aligned for odd B; 16 scalar index loads per tile need no vectorising)
        gemv_tile(_int(row, 17), pid_n + t, _ptr(row, 6, DT, ALIGNED), _ptr(row, 7, DT, ALIGNED),
                  _ptr(row, 8, DT, ALIGNED), _ptr(row, 9, DT, ALIGNED), _ptr(row, 10, tl.int64),
                  _ptr(row, 11, DT, ALIGNED), _int(row, 12), _int(row, 13), K, _int(row, 15, ALIGNED), K,
                  _int(row, 16, ALIGNED), K, eps, HAS_NORM, EPILOGUE, GATHER, GATHER, 16, 16, BLOCK_K, UPCAST,
                  DOT_PRECISION)


@triton.jit
def _prefetch_weights(row, DT: tl.constexpr, UP: tl.constexpr, LINES: tl.constexpr):
    """L2 prefetch of a GEMV item's weight rows (its 16 x n_tiles rows, and with ``UP`` the matching up rows of the
    fused gate/up weight), one ``prefetch.global.L2::evict_last`` per 128-byte line. Issued BEFORE the item's wait:
    the weights depend on no counter, so HBM keeps streaming while the previous phase drains (docs/persistent.md).
    ``LINES``: 128-byte lines per weight row, rounded up to a power of two."""
    w = _ptr(row, 8, DT)
    N = _int(row, 13)
    K = _int(row, 14)
    n0 = _int(row, 18) * 16
    per_line: tl.constexpr = 1024 // DT.primitive_bitwidth  # elements per 128-byte line
    for t in range(_int(row, 19)):
        r = n0 + t * 16 + tl.arange(0, 16)
        c = tl.arange(0, LINES) * per_line
        ok = (r < N)[:, None] & (c < K)[None, :]
        offs = tl.where(ok, r.to(tl.int64)[:, None] * K + c[None, :], 0)
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [w + offs],
                                  dtype=tl.int32, is_pure=False, pack=1)
        if UP:
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l",
                                      [w + N.to(tl.int64) * K + offs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _attention(row, prm, scale, eps, DT: tl.constexpr, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_L: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
               A: tl.constexpr):
    """q/k/v are column ranges of the ``[B*T, (n_q + 2 n_kv) D]`` qkv buffer, the caches ``[B, n_kv, L, D]``, the
    output ``[B*T, n_q D]``: the strides of :func:`.mtp_layers.cached_attention` for these contiguous buffers."""
    n_q = _int(prm, P_NQ)
    n_kv = _int(prm, P_NKV)
    L = _int(prm, P_L)
    T = _int(row, 15)
    cols = (n_q + 2 * n_kv) * D
    q = _ptr(row, 6, DT, A)
    attention_tile(tl.load(row + 12), tl.load(row + 13), q, q + n_q * D, q + (n_q + n_kv) * D,
                   _ptr(row, 7, DT, A), _ptr(row, 8, DT, A), _ptr(row, 9, DT, A), _ptr(row, 10, DT, A),
                   _ptr(row, 11, DT, A), _ptr(prm, P_COS, DT, A), _ptr(prm, P_SIN, DT, A),
                   T * cols, cols, D, T * cols, cols, D, T * cols, cols, D,
                   n_kv * L * D, L * D, D, T * n_q * D, n_q * D, D, _int(prm, P_STRIDE_CS),
                   _int(row, 14), T, scale, eps, GROUP, BLOCK_Q, BLOCK_L, D, HALF, BLOCK_HALF, True)


@triton.jit
def _prefill(row, prm, x_ptr, c0_ptr, c0e_ptr, DT: tl.constexpr, BLOCK_H: tl.constexpr):
    """Frame row r: residual rows 2r, 2r+1 = ``h[r]``, codebook-0 embedding (``table[c0[r]]`` or ``c0_embed[r]``,
    also kept in ``e0`` for the next-input sum); ``codes[0, r]`` = the row's group-0 index for that sum."""
    r = tl.load(row + 6)
    H = tl.load(prm + P_H)
    resid = _ptr(prm, P_RESID, DT)
    codes = _ptr(prm, P_CODES, tl.int64)
    offs = tl.arange(0, BLOCK_H)
    m = offs < H
    c0 = tl.load(c0_ptr + r)
    tl.store(resid + 2 * r * H + offs, tl.load(x_ptr + r * H + offs, mask=m), mask=m)
    if tl.load(row + 7) != 0:
        e = tl.load(c0e_ptr + r * H + offs, mask=m)
        tl.store(_ptr(prm, P_E0, DT) + r * H + offs, e, mask=m)
        tl.store(codes + r, r)
    else:
        # the caller's id (value-checked only on the CPU: no host sync) gathers inside codebook 0 whatever it is: this
        # item waits on nothing, so it runs in a drained launch too (docs/persistent.md, Watchdog)
        c0 = tl.maximum(tl.minimum(c0, tl.load(_ptr(prm, P_GR, tl.int64)) - 1), 0)
        e = tl.load(_ptr(prm, P_TABLE, DT) + c0 * H + offs, mask=m)
        tl.store(codes + r, c0)
    tl.store(resid + (2 * r + 1) * H + offs, e, mask=m)


@triton.jit(noinline=True)
def _sample(row, prm, seed_ptr, inv_temperature, one_minus_top_p, DT: tl.constexpr, GREEDY: tl.constexpr,
            TEMPERATURE: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, S_BLOCK: tl.constexpr,
            S_NUM_BLOCKS: tl.constexpr, NWAY: tl.constexpr):
    V = _int(prm, P_V)
    out = _ptr(row, 8, tl.int64)
    # no repetition penalty, no suppression (the MTP's generate): prev / suppress point at `out`, never read
    sample_row(_int(row, 7), _ptr(row, 6, DT), V, V, out, seed_ptr, _int(prm, P_SEED_STRIDE),
               _ptr(row, 9, tl.int64), 0, out, 0, 0, 1.0, 1.0, out, 0, inv_temperature, _int(prm, P_TOP_K),
               one_minus_top_p, GREEDY, False, TEMPERATURE, TOP_K, TOP_P, S_BLOCK, S_NUM_BLOCKS, NWAY)


@triton.jit
def _rvq(row, prm, c0_ptr, codes_out_ptr, next_ptr, DT: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
         RVQ_BLOCK: tl.constexpr):
    """Row r, D block j of the next Talker input; block 0 also writes ``codes_out[r] = (c0[r], codes[1:, r])``.
    Both bounded whatever the codes buffer yields (a drained item's read may race a late sampler's store): the
    gathers by :func:`.rvq.rvq_tile`'s clamp, the ids copied out clamped to ``[0, V)`` (the samplers' own range, so
    a no-op on every value a sampler stores)."""
    r = tl.load(row + 6)
    j = _int(row, 7)
    B = tl.load(prm + P_B)
    H = _int(prm, P_H)
    codes = _ptr(prm, P_CODES, tl.int64)
    rvq_tile(r, j, codes, _ptr(prm, P_TABLE, DT), _ptr(prm, P_GB, tl.int64), _ptr(prm, P_GS, tl.int64),
             _ptr(prm, P_GR, tl.int64), next_ptr, H, 1, 1, 0, B.to(tl.int32), H, 1.0, 0, 0, G, RVQ_BLOCK, False)
    if j == 0:
        g = tl.arange(0, BLOCK_G)
        c = tl.load(codes + g * B + r, mask=(g > 0) & (g < G), other=0)
        c = tl.maximum(tl.minimum(c, tl.load(prm + P_V) - 1), 0)
        c = tl.where(g == 0, tl.load(c0_ptr + r), c)
        tl.store(codes_out_ptr + r * G + g, c, mask=g < G)


@triton.jit
def mtp_frame_kernel(
    items_ptr, n_items, ctr_ptr, err_ptr, spin_limit, prm,
    x_ptr, c0_ptr, c0e_ptr, seed_ptr, codes_out_ptr, next_ptr,
    eps, scale, inv_temperature, one_minus_top_p,
    BK_H: tl.constexpr, BK_O: tl.constexpr, BK_I: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_Q1: tl.constexpr, BLOCK_Q2: tl.constexpr, BLOCK_L: tl.constexpr, D: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    GREEDY: tl.constexpr, TEMPERATURE: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
    S_BLOCK: tl.constexpr, S_NUM_BLOCKS: tl.constexpr, NWAY: tl.constexpr,
    G: tl.constexpr, BLOCK_G: tl.constexpr, RVQ_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, ALIGNED: tl.constexpr,
    PREFETCH: tl.constexpr, PF_LINES: tl.constexpr,
):
    """One frame (see the module doc). ``prm``: int64 ``[N_PARAMS]`` frame constants (workspace addresses, sizes;
    loaded where used, so they do not hold registers across the loop). ``x``/``c0``/``c0e``/``seed`` are this
    call's inputs (``x`` in the model dtype), ``codes_out`` ``[B, G]`` / ``next`` ``[B, H]`` its outputs."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    i = tl.program_id(0)
    step = tl.num_programs(0)
    while i < n_items:
        row = items_ptr + i.to(tl.int64) * 24
        if PREFETCH:
            pf = tl.load(row)
            if pf == 3:
                _prefetch_weights(row, DT, True, PF_LINES)
            elif (pf >= 1) & (pf <= 5):
                _prefetch_weights(row, DT, False, PF_LINES)
        ok = _wait(ctr_ptr, err_ptr, row, 1, i, spin_limit)
        if ok != 0:
            ok = _wait(ctr_ptr, err_ptr, row, 3, i, spin_limit)
        if ok != 0:
            op = tl.load(row)
            if op == 0:
                _prefill(row, prm, x_ptr, c0_ptr, c0e_ptr, DT, BLOCK_H)
            elif op == 1:
                _gemv(row, eps, DT, True, PLAIN, False, BK_H, UPCAST, DOT_PRECISION, ALIGNED)
            elif op == 2:
                _gemv(row, eps, DT, True, PLAIN, True, BK_H, UPCAST, DOT_PRECISION, ALIGNED)
            elif op == 3:
                _gemv(row, eps, DT, True, SWIGLU, False, BK_H, UPCAST, DOT_PRECISION, ALIGNED)
            elif op == 4:
                _gemv(row, eps, DT, False, RESIDUAL, False, BK_O, UPCAST, DOT_PRECISION, ALIGNED)
            elif op == 5:
                _gemv(row, eps, DT, False, RESIDUAL, False, BK_I, UPCAST, DOT_PRECISION, ALIGNED)
            elif op == 6:
                _attention(row, prm, scale, eps, DT, GROUP, BLOCK_Q2, BLOCK_L, D, HALF, BLOCK_HALF, ALIGNED)
            elif op == 7:
                _attention(row, prm, scale, eps, DT, GROUP, BLOCK_Q1, BLOCK_L, D, HALF, BLOCK_HALF, ALIGNED)
            elif op == 8:
                _sample(row, prm, seed_ptr, inv_temperature, one_minus_top_p, DT, GREEDY, TEMPERATURE, TOP_K, TOP_P,
                        S_BLOCK, S_NUM_BLOCKS, NWAY)
            elif op == 9:
                _rvq(row, prm, c0_ptr, codes_out_ptr, next_ptr, DT, G, BLOCK_G, RVQ_BLOCK)
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
            # drain (the wait timed out, or the error flag is set): no waiting; only the items that write the
            # call's outputs run, so a tripped frame still returns defined, in-range outputs
            if tl.load(row) == 9:
                _rvq(row, prm, c0_ptr, codes_out_ptr, next_ptr, DT, G, BLOCK_G, RVQ_BLOCK)
                tl.debug_barrier()
            i += step


def _static_signature(dt: str) -> dict:
    sig = {"items_ptr": "*i64", "n_items": "i32", "ctr_ptr": "*i32", "err_ptr": "*i32", "spin_limit": "i32",
           "prm": "*i64", "x_ptr": f"*{dt}", "c0_ptr": "*i64", "c0e_ptr": f"*{dt}", "seed_ptr": "*i64",
           "codes_out_ptr": "*i64", "next_ptr": f"*{dt}", "eps": "fp32", "scale": "fp32", "inv_temperature": "fp32",
           "one_minus_top_p": "fp32"}
    sig.update({n: "constexpr" for n in ("BK_H", "BK_O", "BK_I", "UPCAST", "DOT_PRECISION", "GROUP", "BLOCK_Q1",
                                         "BLOCK_Q2", "BLOCK_L", "D", "HALF", "BLOCK_HALF", "GREEDY", "TEMPERATURE",
                                         "TOP_K", "TOP_P", "S_BLOCK", "S_NUM_BLOCKS", "NWAY", "G", "BLOCK_G",
                                         "RVQ_BLOCK", "BLOCK_H", "ALIGNED", "PREFETCH",
                                         "PF_LINES")})
    return sig


for _dt in ("bf16",):  # fp16 compiles to the same code (checked once: 255 registers, no spills); keeps the check short
    for _greedy in (False, True):
        # the real MTP: hidden 1024, 16 q / 8 kv heads of 128, SwiGLU 3072 (K 1024 / 2048 / 3072: BLOCK_K 256),
        # 16 groups x 2048 ids
        static_case(f"mtp_frame_kernel[persistent,{_dt},{'greedy' if _greedy else 'topk,topp'}]", mtp_frame_kernel,
                    signature=_static_signature(_dt),
                    constexprs=dict(BK_H=256, BK_O=256, BK_I=256, UPCAST=False, DOT_PRECISION="tf32", GROUP=2,
                                    BLOCK_Q1=2, BLOCK_Q2=4, BLOCK_L=16, D=128, HALF=64, BLOCK_HALF=64,
                                    GREEDY=_greedy, TEMPERATURE=False, TOP_K=not _greedy, TOP_P=not _greedy,
                                    S_BLOCK=2048, S_NUM_BLOCKS=1, NWAY=16, G=16, BLOCK_G=16, RVQ_BLOCK=1024,
                                    BLOCK_H=1024, ALIGNED=True, PREFETCH=True, PF_LINES=64),
                    num_warps=4)
