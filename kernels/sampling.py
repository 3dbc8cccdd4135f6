"""Token sampling in Triton: transformers' processors + a counter-based Gumbel race, one program per row.

No sort, no host sync, no data-dependent shape: the top-k and top-p thresholds are found by a 16-way search over
the ORDERED INTEGER KEYS of the fp32 scores (``key = bits ^ 0x7FFFFFFF`` for negatives: monotone in the float
order): each pass evaluates 16 candidate thresholds at once, so at most 8 passes cover the 32-bit key, fewer
when the search range (top-k: [min, max]; top-p: [k-th largest, max]) is narrower. The search is exact: the top-k threshold is the k-th largest score itself, and the top-p
threshold is the smallest score whose cumulative mass (of all kept scores <= it) exceeds ``1 - top_p``. The draw is
``argmax(s + Gumbel)`` with the noise from a 32-bit integer hash of (seed, offset, stream, id), bit-identical to
:mod:`omni_fast.reference.sampling` (stream = the row index for one shared seed, 0 for per-row seeds).

Shapes: logits ``[B, V]`` (unit stride in V; fp32/fp16/bf16), seed/offset int64 ``[1]`` or ``[B]``, prev_ids int64
``[B, L]``, suppress int64 ``[R, 2]`` ranges ``[lo, hi)``; out int64 ``[B]``. NaN logits are -inf (converted in
:func:`row_scores`, where every kernel here, the chunked sampler and the persistent frame read them). The row is
streamed in blocks of ``BLOCK`` ids; when V <= BLOCK (the MTP's V = 2048) every pass re-reads one block from L1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, static_case

NWAY = 16  # candidate thresholds per search pass: 4 bits of the 32-bit key per pass


@triton.jit
def fmix32(x):
    """MurmurHash3's 32-bit finaliser on uint32 (wrapping multiplies)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    x = x ^ (x >> 16)
    return x


@triton.jit
def row_key(seed, offset, row):
    """uint32 key of one row's draw; seed/offset int64 scalars, row int32: the stream index (the row index for a
    shared seed, 0 for per-row seeds; see reference.sampling.row_key / stream_index)."""
    k = fmix32((seed & 0xFFFFFFFF).to(tl.uint32) + 0x9E3779B9)
    k = fmix32(k ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    k = fmix32(k ^ (offset & 0xFFFFFFFF).to(tl.uint32))
    k = fmix32(k ^ ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32))
    return fmix32(k ^ row.to(tl.uint32))


@triton.jit
def gumbel(key, offs):
    """fp32 Gumbel(0, 1) noise for ids ``offs`` of the row with ``key``: ``-log(-log(u))``, u in (0, 1)."""
    j = fmix32(offs.to(tl.uint32) + 0x7F4A7C15)
    bits = fmix32(key ^ j)
    u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23; exact, u < 1 (see reference)
    return -tl.log(-tl.log(u))


@triton.jit
def ordered_key(x):
    """int64 key, monotone in the fp32 order of ``x`` (callers turn -0.0 into +0.0 first)."""
    xi = x.to(tl.int32, bitcast=True)
    return tl.where(xi < 0, xi ^ 0x7FFFFFFF, xi).to(tl.int64)


@triton.jit
def row_scores(row_ptr, offs, V, prev_row_ptr, n_prev, penalty, inv_penalty, sup_ptr, n_sup, inv_temperature,
               PENALTY: tl.constexpr, TEMPERATURE: tl.constexpr):
    """fp32 scores of ids ``offs`` after penalty, suppression and temperature; -inf outside [0, V) and for NaN
    logits (the samplers' one load of the logits: a NaN is -inf for every pass, reference.sampling's rule)."""
    valid = offs < V
    x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)  # NaN -> -inf before the penalty, as the reference
    if PENALTY:
        hit = offs < 0
        for l in range(n_prev):
            hit = hit | (offs == tl.load(prev_row_ptr + l))
        x = tl.where(hit, tl.where(x < 0, x * penalty, x * inv_penalty), x)
    for r in range(n_sup):
        lo = tl.load(sup_ptr + 2 * r)
        hi = tl.load(sup_ptr + 2 * r + 1)
        x = tl.where((offs >= lo) & (offs < hi), float("-inf"), x)
    if TEMPERATURE:
        x = x * inv_temperature
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0 so ordered keys agree with float equality
    return tl.where(valid, x, float("-inf"))


@triton.jit
def sample_kernel(
    logits_ptr, stride_row, V, out_ptr,
    seed_ptr, seed_stride, offset_ptr, offset_stride,
    prev_ptr, stride_prev, n_prev, penalty, inv_penalty,
    sup_ptr, n_sup, inv_temperature, top_k, one_minus_top_p,
    GREEDY: tl.constexpr, PENALTY: tl.constexpr, TEMPERATURE: tl.constexpr, TOP_K: tl.constexpr,
    TOP_P: tl.constexpr, BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr, NWAY: tl.constexpr,
):
    """Grid ``(B,)``: one program samples one row (:func:`sample_row`; shapes in the module doc). ``logits_ptr``
    ``[B, V]`` fp32/fp16/bf16 (row stride ``stride_row``), ``out_ptr`` int64 ``[B]``, ``seed_ptr`` / ``offset_ptr``
    int64 ``[1]`` (stride 0) or ``[B]`` (stride 1), ``prev_ptr`` int64 ``[B, n_prev]``, ``sup_ptr`` int64
    ``[n_sup, 2]``. Constexprs switch the passes: ``GREEDY`` (argmax only), ``PENALTY``, ``TEMPERATURE``, ``TOP_K``,
    ``TOP_P``; the row is read in ``NUM_BLOCKS`` blocks of ``BLOCK`` ids; ``NWAY`` thresholds per search pass."""
    sample_row(tl.program_id(0), logits_ptr, stride_row, V, out_ptr, seed_ptr, seed_stride, offset_ptr, offset_stride,
               prev_ptr, stride_prev, n_prev, penalty, inv_penalty, sup_ptr, n_sup, inv_temperature, top_k,
               one_minus_top_p, GREEDY, PENALTY, TEMPERATURE, TOP_K, TOP_P, BLOCK, NUM_BLOCKS, NWAY)


@triton.jit
def topk_key(row_ptr, base, ways, V, prev_row_ptr, n_prev, penalty, inv_penalty, sup_ptr, n_sup, inv_temperature,
             lowest, m, top_k, PENALTY: tl.constexpr, TEMPERATURE: tl.constexpr, BLOCK: tl.constexpr,
             NUM_BLOCKS: tl.constexpr, NWAY: tl.constexpr):
    """:func:`sample_row`'s top-k threshold: the ordered key of the k-th largest score (``lowest`` / ``m``: the
    row's min and max scores); ids with a key at or above it are kept."""
    # Largest key t with count(key >= t) >= k (the k-th largest score; ties at it all kept): an NWAY-ary
    # search over [key(min), key(max)], NWAY candidate thresholds counted per pass; P(lo) holds, P(hi) not.
    lo = ordered_key(lowest)
    hi = ordered_key(m) + 1
    while hi - lo > 1:
        step = (hi - lo + NWAY - 1) // NWAY
        t = lo + ways * step
        cnt = tl.zeros([NWAY], dtype=tl.int32)
        for b in range(NUM_BLOCKS):
            offs = b * BLOCK + base
            x = row_scores(row_ptr, offs, V, prev_row_ptr, n_prev, penalty, inv_penalty, sup_ptr, n_sup,
                           inv_temperature, PENALTY, TEMPERATURE)
            ge = (ordered_key(x)[None, :] >= t[:, None]) & (offs < V)[None, :]
            cnt += tl.sum(ge.to(tl.int32), 1)
        i = tl.max(tl.where((cnt >= top_k) & (t < hi), ways, 0), 0)
        new_lo = lo + i * step
        hi = tl.minimum(hi, new_lo + step)
        lo = new_lo
    return lo


@triton.jit
def topp_key(row_ptr, base, ways, V, prev_row_ptr, n_prev, penalty, inv_penalty, sup_ptr, n_sup, inv_temperature,
             m, m_exp, kth, one_minus_top_p, PENALTY: tl.constexpr, TEMPERATURE: tl.constexpr, BLOCK: tl.constexpr,
             NUM_BLOCKS: tl.constexpr, NWAY: tl.constexpr):
    """:func:`sample_row`'s top-p threshold among the top-k survivors (keys ``>= kth``): the smallest ordered key
    whose kept mass at or below it exceeds ``(1 - top_p)`` of the total; ids with a key at or above it are kept."""
    z = tl.full([], 0.0, tl.float32)
    for b in range(NUM_BLOCKS):
        offs = b * BLOCK + base
        x = row_scores(row_ptr, offs, V, prev_row_ptr, n_prev, penalty, inv_penalty, sup_ptr, n_sup,
                       inv_temperature, PENALTY, TEMPERATURE)
        z += tl.sum(tl.where(ordered_key(x) >= kth, tl.exp(x - m_exp), 0.0), 0)
    thr = one_minus_top_p * z
    # Smallest key u with mass(kept, key <= u) > thr, searched in [kth, key(max)]: P(kth - 1) fails (nothing
    # kept lies below kth) and the max itself is always kept (P(hi) holds).
    lo = kth - 1
    hi = ordered_key(m)
    while hi - lo > 1:
        step = (hi - lo + NWAY - 1) // NWAY
        t = tl.minimum(lo + (ways + 1) * step, hi)
        mass = tl.zeros([NWAY], dtype=tl.float32)
        for b in range(NUM_BLOCKS):
            offs = b * BLOCK + base
            x = row_scores(row_ptr, offs, V, prev_row_ptr, n_prev, penalty, inv_penalty, sup_ptr, n_sup,
                           inv_temperature, PENALTY, TEMPERATURE)
            k = ordered_key(x)
            e = tl.where(k >= kth, tl.exp(x - m_exp), 0.0)
            mass += tl.sum(tl.where(k[None, :] <= t[:, None], e[None, :], 0.0), 1)
        i = tl.min(tl.where((mass > thr) | (t >= hi), ways, NWAY - 1), 0)
        new_lo = lo + i * step
        hi = tl.minimum(new_lo + step, hi)
        lo = new_lo
    return hi


@triton.jit
def sample_row(
    row, logits_ptr, stride_row, V, out_ptr,
    seed_ptr, seed_stride, offset_ptr, offset_stride,
    prev_ptr, stride_prev, n_prev, penalty, inv_penalty,
    sup_ptr, n_sup, inv_temperature, top_k, one_minus_top_p,
    GREEDY: tl.constexpr, PENALTY: tl.constexpr, TEMPERATURE: tl.constexpr, TOP_K: tl.constexpr,
    TOP_P: tl.constexpr, BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr, NWAY: tl.constexpr,
):
    """Row ``row`` of :func:`sample_kernel` (shared with the persistent frame kernel, :mod:`.mtp_persistent`)."""
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    prev_row_ptr = prev_ptr + row.to(tl.int64) * stride_prev
    base = tl.arange(0, BLOCK)

    # Pass 1: the row max (= the greedy pick; lowest id on ties) and min.
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    lowest = tl.full([], float("inf"), tl.float32)
    for b in range(NUM_BLOCKS):
        offs = b * BLOCK + base
        x = row_scores(row_ptr, offs, V, prev_row_ptr, n_prev, penalty, inv_penalty, sup_ptr, n_sup,
                       inv_temperature, PENALTY, TEMPERATURE)
        lowest = tl.minimum(lowest, tl.min(tl.where(offs < V, x, float("inf")), 0))
        bm = tl.max(x, 0)
        bi = tl.min(tl.where(x == bm, offs, 2147483647), 0)
        best_idx = tl.where(bm > best, bi, best_idx)
        best = tl.maximum(best, bm)

    if GREEDY:
        # (every id stored below is clamped into [0, V): a pick is an id whose score equals the block max, so it is
        # in range by construction, but the clamp keeps that true whatever the floating-point max does with NaN or
        # denormal scores; the ids index embedding tables next, where out of range means an illegal read)
        tl.store(out_ptr + row, tl.minimum(best_idx, V - 1).to(tl.int64))
    else:
        m = best
        m_exp = tl.where(m == float("-inf"), 0.0, m)  # every id suppressed: no NaN from exp(-inf - -inf)
        kth = tl.full([], -2147483649, tl.int64)  # keep everything unless top-k narrows it
        ways = tl.arange(0, NWAY).to(tl.int64)
        if TOP_K:
            kth = topk_key(row_ptr, base, ways, V, prev_row_ptr, n_prev, penalty, inv_penalty, sup_ptr, n_sup,
                           inv_temperature, lowest, m, top_k, PENALTY, TEMPERATURE, BLOCK, NUM_BLOCKS, NWAY)
        pth = tl.full([], -2147483649, tl.int64)
        if TOP_P:
            pth = topp_key(row_ptr, base, ways, V, prev_row_ptr, n_prev, penalty, inv_penalty, sup_ptr, n_sup,
                           inv_temperature, m, m_exp, kth, one_minus_top_p, PENALTY, TEMPERATURE, BLOCK, NUM_BLOCKS,
                           NWAY)
        # The race: argmax(s + Gumbel) over the kept ids, lowest id on ties.
        # per-row seeds (seed_stride 1): the row index stays out of the key, so a row draws the same ids wherever it
        # sits in the batch; one shared seed (stride 0): the row index tells the rows apart
        stream = tl.where(seed_stride == 0, row, 0)
        key = row_key(tl.load(seed_ptr + row * seed_stride), tl.load(offset_ptr + row * offset_stride), stream)
        best = tl.full([], float("-inf"), tl.float32)
        best_idx = tl.full([], 0, tl.int32)
        for b in range(NUM_BLOCKS):
            offs = b * BLOCK + base
            x = row_scores(row_ptr, offs, V, prev_row_ptr, n_prev, penalty, inv_penalty, sup_ptr, n_sup,
                           inv_temperature, PENALTY, TEMPERATURE)
            k = ordered_key(x)
            kept = (offs < V) & (k >= kth) & (k >= pth)
            r = tl.where(kept, x + gumbel(key, offs), float("-inf"))
            bm = tl.max(r, 0)
            bi = tl.min(tl.where(r == bm, offs, 2147483647), 0)
            best_idx = tl.where(bm > best, bi, best_idx)
            best = tl.maximum(best, bm)
        tl.store(out_ptr + row, tl.minimum(best_idx, V - 1).to(tl.int64))


def block_size(V: int) -> int:
    """Ids per block: the whole row up to 4096, else 4096-id blocks."""
    return min(triton.next_power_of_2(max(V, 16)), 4096)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, suppress: torch.Tensor | None,
           repetition_penalty: float, prev_ids: torch.Tensor | None, seed: torch.Tensor, offset: torch.Tensor,
           greedy: bool) -> torch.Tensor:
    """int64 ``[B]`` ids drawn from ``logits`` ``[B, V]`` (validated by omni_fast.ops.sample)."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    blk = block_size(V)
    penalty_on = prev_ids is not None and prev_ids.numel() > 0 and repetition_penalty != 1.0
    n_sup = 0 if suppress is None else suppress.shape[0]
    flags = dict(GREEDY=bool(greedy), PENALTY=penalty_on, TEMPERATURE=float(temperature) != 1.0 and not greedy,
                 TOP_K=0 < int(top_k) < V, TOP_P=float(top_p) < 1.0)
    penalty_args = (prev_ids if penalty_on else out, prev_ids.stride(0) if penalty_on else 0,
                    prev_ids.shape[1] if penalty_on else 0, float(repetition_penalty), 1.0 / float(repetition_penalty))
    from . import sampling_chunked  # (imports this module)

    if B and sampling_chunked.applies(V, int(top_k) if flags["TOP_K"] else 0, bool(greedy)):
        # several CTAs per row, one pass over the logits (kernels/sampling_chunked.py)
        return sampling_chunked.sample(
            logits, out=out, seed=seed, offset=offset, penalty_args=penalty_args,
            sup=(suppress if n_sup else out, n_sup),
            inv_temperature=1.0 / float(temperature), top_k=int(top_k), one_minus_top_p=1.0 - float(top_p),
            flags=flags, fallback=dict(BLOCK=blk, NUM_BLOCKS=triton.cdiv(V, blk), NWAY=NWAY))
    launch(
        sample_kernel, (B,),
        logits, logits.stride(0), V, out,
        seed, 1 if seed.numel() > 1 else 0, offset, 1 if offset.numel() > 1 else 0,
        prev_ids if penalty_on else out, prev_ids.stride(0) if penalty_on else 0,
        prev_ids.shape[1] if penalty_on else 0, float(repetition_penalty), 1.0 / float(repetition_penalty),
        suppress if n_sup else out, n_sup, 1.0 / float(temperature), int(top_k), 1.0 - float(top_p),
        **flags, BLOCK=blk, NUM_BLOCKS=triton.cdiv(V, blk), NWAY=NWAY,
        num_warps=8 if blk >= 2048 else 4, device=logits.device,
    )
    return out


for _dt, _greedy in (("bf16", False), ("fp16", False), ("fp32", False), ("bf16", True)):
    static_case(
        f"sample_kernel[{_dt},V2048,{'greedy' if _greedy else 'topk,topp'}]", sample_kernel,
        signature={
            "logits_ptr": f"*{_dt}", "stride_row": "i32", "V": "i32", "out_ptr": "*i64",
            "seed_ptr": "*i64", "seed_stride": "i32", "offset_ptr": "*i64", "offset_stride": "i32",
            "prev_ptr": "*i64", "stride_prev": "i32", "n_prev": "i32", "penalty": "fp32", "inv_penalty": "fp32",
            "sup_ptr": "*i64", "n_sup": "i32", "inv_temperature": "fp32", "top_k": "i32", "one_minus_top_p": "fp32",
            "GREEDY": "constexpr", "PENALTY": "constexpr", "TEMPERATURE": "constexpr", "TOP_K": "constexpr",
            "TOP_P": "constexpr", "BLOCK": "constexpr", "NUM_BLOCKS": "constexpr", "NWAY": "constexpr",
        },
        constexprs={"GREEDY": _greedy, "PENALTY": False, "TEMPERATURE": False, "TOP_K": True, "TOP_P": True,
                    "BLOCK": 2048, "NUM_BLOCKS": 1, "NWAY": NWAY},
        num_warps=8,
    )
