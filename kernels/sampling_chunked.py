"""Two-stage sampling for large vocabularies: several CTAs per row, one pass over the logits.

:func:`.sampling.sample_row` runs one CTA per row and up to ~17 serial passes over the row (max, up to 8 top-k
search passes, the top-p mass, up to 8 top-p search passes, the race). With top-k on (``0 < top_k <= KC``) or
greedy, and a vocabulary of several chunks (the thinker's 152064 ids), this module instead runs:

1. :func:`sample_chunk_topk_kernel`, grid ``(cdiv(V, CHUNK), B)``: each program scores its ``CHUNK`` ids (penalty,
   suppression, temperature: :func:`.sampling.row_scores`) and writes its ``KC`` largest as packed int64 keys
   ``ordered_key(s) << 32 | (2^32 - 1 - id)`` (sorted by score, then lowest id first) to a workspace ``[B, n_chunks,
   KC]``; greedy writes the chunk's largest key only. One pass over the logits, ``n_chunks`` CTAs per row.
2. :func:`sample_combine_kernel`, grid ``(B,)``: the ``KC`` largest of the ``n_chunks * KC`` candidates. Every id of the
   row's top-k is among its chunk's ``KC`` candidates (``k <= KC``), so the k-th largest candidate is the row's k-th
   largest score exactly, and the kept set (``s >= kth``) is among the candidates -- unless ties at the threshold
   overflow: a chunk whose smallest candidate still reaches the threshold (it may hold more), or more than ``KC``
   kept candidates. Those rows (ties at the k-th score; all but fewer than k ids suppressed) take the multi-pass
   :func:`.sampling.sample_row` in the same program, so the result never depends on the path. Otherwise top-p runs
   over the ``KC`` survivors (``F(t)`` = the kept mass at scores ``<= s_t``, a ``KC x KC`` comparison) and the race
   over them, with the same Gumbel noise per id as the reference.

The kept set, the noise and the tie rules are the reference's (omni_fast.reference.sampling), so the draws equal
the single-CTA kernel's and the reference's for every seed (the top-p mass is summed in another order: as for the
single-CTA kernel, a cumulative mass within fp32 rounding of ``1 - top_p`` may flip one boundary id). No host sync,
fixed shapes: graph-safe; deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, static_case
from .sampling import gumbel, ordered_key, row_key, row_scores, sample_row

FALLBACK = True  # tests: False marks overflowing rows with -1 instead of sampling them (sample_combine_kernel)
KC = 64  # candidates kept per chunk: the largest top_k this path serves (a power of two: tl.topk)
CHUNK = 4096  # ids per stage-1 program (= the single-CTA kernel's block)


@triton.jit
def _packed(x, offs):
    """int64 key ordering by score, then lowest id first (``x`` fp32 with -0.0 -> +0.0, ``offs`` int32 ids)."""
    return (ordered_key(x) << 32) | (4294967295 - offs.to(tl.int64))


@triton.jit
def _unpack(p):
    """(fp32 score, int32 id) of packed keys: the inverse of :func:`_packed`."""
    k = (p >> 32).to(tl.int32)
    xi = tl.where(k < 0, k ^ 0x7FFFFFFF, k)
    return xi.to(tl.float32, bitcast=True), (4294967295 - (p & 4294967295)).to(tl.int32)


@triton.jit
def sample_chunk_topk_kernel(
    logits_ptr, stride_row, V, ws_ptr, n_chunks,
    prev_ptr, stride_prev, n_prev, penalty, inv_penalty, sup_ptr, n_sup, inv_temperature,
    GREEDY: tl.constexpr, PENALTY: tl.constexpr, TEMPERATURE: tl.constexpr, CHUNK: tl.constexpr, KC: tl.constexpr,
):
    """Stage 1 (module doc): chunk ``program_id(0)`` of row ``program_id(1)`` -> ``ws[row, chunk, :KC]`` (greedy:
    ``ws[row, chunk, 0]``, the chunk's largest key)."""
    c = tl.program_id(0)
    row = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = row_scores(logits_ptr + row.to(tl.int64) * stride_row, offs, V, prev_ptr + row.to(tl.int64) * stride_prev,
                   n_prev, penalty, inv_penalty, sup_ptr, n_sup, inv_temperature, PENALTY, TEMPERATURE)
    p = _packed(x, offs)
    out = ws_ptr + (row.to(tl.int64) * n_chunks + c) * KC
    if GREEDY:
        tl.store(out, tl.max(p, 0))
    else:
        tl.store(out + tl.arange(0, KC), tl.topk(p, KC))


@triton.jit
def sample_combine_kernel(
    ws_ptr, n_chunks, logits_ptr, stride_row, V, out_ptr,
    seed_ptr, seed_stride, offset_ptr, offset_stride,
    prev_ptr, stride_prev, n_prev, penalty, inv_penalty,
    sup_ptr, n_sup, inv_temperature, top_k, one_minus_top_p,
    GREEDY: tl.constexpr, PENALTY: tl.constexpr, TEMPERATURE: tl.constexpr, TOP_P: tl.constexpr,
    KC: tl.constexpr, NCAND: tl.constexpr, NCH: tl.constexpr, BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr,
    NWAY: tl.constexpr, FALLBACK: tl.constexpr = True,
):
    """Stage 2 (module doc): one row per program. ``NCAND`` = next power of two of ``n_chunks * KC``, ``NCH`` of
    ``n_chunks``; ``BLOCK`` / ``NUM_BLOCKS`` / ``NWAY``: the fallback's (:func:`.sampling.sample_row`).
    ``FALLBACK=False`` (tests only) stores -1 for an overflowing row instead, so a test sees which path ran."""
    row = tl.program_id(0)
    ws = ws_ptr + row.to(tl.int64) * n_chunks * KC
    if GREEDY:
        ch = tl.arange(0, NCH)
        best = tl.max(tl.load(ws + ch * KC, mask=ch < n_chunks, other=-9223372036854775807 - 1), 0)
        tl.store(out_ptr + row, _unpack(best)[1].to(tl.int64))
    else:
        i = tl.arange(0, NCAND)
        cand = tl.load(ws + i, mask=i < n_chunks * KC, other=-9223372036854775807 - 1)
        top = tl.topk(cand, KC)  # the KC largest, largest first
        v, ids = _unpack(top)
        j = tl.arange(0, KC)
        kth = tl.max(tl.where(j == top_k - 1, v, float("-inf")), 0)
        # Overflow (module doc): a chunk's smallest candidate reaches the threshold, or more than KC kept.
        ch = tl.arange(0, NCH)
        last = tl.load(ws + ch * KC + (KC - 1), mask=ch < n_chunks, other=-9223372036854775807 - 1)
        full = tl.sum(((_unpack(last)[0] >= kth) & (ch < n_chunks)).to(tl.int32), 0)
        n_kept = tl.sum(((_unpack(cand)[0] >= kth) & (i < n_chunks * KC)).to(tl.int32), 0)
        if (full > 0) | (n_kept > KC):
            if not FALLBACK:
                tl.store(out_ptr + row, -1)
            else:
                sample_row(row, logits_ptr, stride_row, V, out_ptr, seed_ptr, seed_stride, offset_ptr,
                           offset_stride, prev_ptr, stride_prev, n_prev, penalty, inv_penalty, sup_ptr, n_sup,
                           inv_temperature, top_k, one_minus_top_p, False, PENALTY, TEMPERATURE, True, TOP_P, BLOCK,
                           NUM_BLOCKS, NWAY)
        else:
            kept = v >= kth
            if TOP_P:
                m = tl.max(v, 0)
                e = tl.where(kept, tl.exp(v - m), 0.0)
                thr = one_minus_top_p * tl.sum(e, 0)
                # F(t): the kept mass at scores <= s_t (all of t's tie group: ties share one fate)
                F = tl.sum(tl.where(v[None, :] <= v[:, None], e[None, :], 0.0), 1)
                kept = kept & ((F > thr) | (v == m))
            stream = tl.where(seed_stride == 0, row, 0)
            key = row_key(tl.load(seed_ptr + row * seed_stride), tl.load(offset_ptr + row * offset_stride), stream)
            r = tl.where(kept, v + gumbel(key, ids), float("-inf"))
            bm = tl.max(r, 0)
            tl.store(out_ptr + row, tl.min(tl.where(r == bm, ids, 2147483647), 0).to(tl.int64))


def applies(V: int, top_k: int, greedy: bool) -> bool:
    """Whether :func:`sample` serves a call: several chunks, and greedy or ``0 < top_k <= KC``."""
    return V > CHUNK and (greedy or 0 < top_k <= KC)


def sample(logits, *, out, seed, offset, penalty_args: tuple, sup: tuple, inv_temperature: float, top_k: int,
           one_minus_top_p: float, flags: dict, fallback: dict) -> torch.Tensor:
    """Fill ``out`` int64 ``[B]`` (see :func:`.sampling.sample`, which prepares the arguments). ``penalty_args``:
    ``(prev_ptr, stride_prev, n_prev, penalty, inv_penalty)``; ``sup``: ``(sup_ptr, n_sup)``; ``flags``: GREEDY,
    PENALTY, TEMPERATURE, TOP_P; ``fallback``: BLOCK, NUM_BLOCKS, NWAY of the single-CTA kernel."""
    B, V = logits.shape
    n_chunks = triton.cdiv(V, CHUNK)
    ws = torch.empty(B, n_chunks, KC, dtype=torch.int64, device=logits.device)
    common = dict(GREEDY=flags["GREEDY"], PENALTY=flags["PENALTY"], TEMPERATURE=flags["TEMPERATURE"])
    launch(sample_chunk_topk_kernel, (n_chunks, B), logits, logits.stride(0), V, ws, n_chunks, *penalty_args, *sup,
           inv_temperature, **common, CHUNK=CHUNK, KC=KC, num_warps=8, device=logits.device)
    launch(sample_combine_kernel, (B,), ws, n_chunks, logits, logits.stride(0), V, out,
           seed, 1 if seed.numel() > 1 else 0, offset, 1 if offset.numel() > 1 else 0, *penalty_args, *sup,
           inv_temperature, top_k, one_minus_top_p, **common, TOP_P=flags["TOP_P"], KC=KC,
           NCAND=triton.next_power_of_2(n_chunks * KC), NCH=triton.next_power_of_2(n_chunks), **fallback,
           FALLBACK=FALLBACK, num_warps=8, device=logits.device)
    return out


def _register_static_cases() -> None:
    """sm_90a cases at the thinker's vocabulary (152064 ids: 38 chunks), fp32 / bf16 logits."""
    n_chunks = triton.cdiv(152064, CHUNK)
    s1 = {"logits_ptr": None, "stride_row": "i32", "V": "i32", "ws_ptr": "*i64", "n_chunks": "i32",
          "prev_ptr": "*i64", "stride_prev": "i32", "n_prev": "i32", "penalty": "fp32", "inv_penalty": "fp32",
          "sup_ptr": "*i64", "n_sup": "i32", "inv_temperature": "fp32", "GREEDY": "constexpr",
          "PENALTY": "constexpr", "TEMPERATURE": "constexpr", "CHUNK": "constexpr", "KC": "constexpr"}
    s2 = {"ws_ptr": "*i64", "n_chunks": "i32", "logits_ptr": None, "stride_row": "i32", "V": "i32", "out_ptr": "*i64",
          "seed_ptr": "*i64", "seed_stride": "i32", "offset_ptr": "*i64", "offset_stride": "i32",
          "prev_ptr": "*i64", "stride_prev": "i32", "n_prev": "i32", "penalty": "fp32", "inv_penalty": "fp32",
          "sup_ptr": "*i64", "n_sup": "i32", "inv_temperature": "fp32", "top_k": "i32", "one_minus_top_p": "fp32",
          **{n: "constexpr" for n in ("GREEDY", "PENALTY", "TEMPERATURE", "TOP_P", "KC", "NCAND", "NCH", "BLOCK",
                                      "NUM_BLOCKS", "NWAY", "FALLBACK")}}
    for dt in ("fp32", "bf16"):
        for greedy in (False, True):
            tag = "greedy" if greedy else "topk,topp"
            static_case(f"sampling_chunked.chunk_topk[{dt},V152064,{tag}]", sample_chunk_topk_kernel,
                        dict(s1, logits_ptr=f"*{dt}"),
                        dict(GREEDY=greedy, PENALTY=False, TEMPERATURE=True, CHUNK=CHUNK, KC=KC), num_warps=8)
            static_case(f"sampling_chunked.combine[{dt},V152064,{tag}]", sample_combine_kernel,
                        dict(s2, logits_ptr=f"*{dt}"),
                        dict(GREEDY=greedy, PENALTY=False, TEMPERATURE=True, TOP_P=True, KC=KC,
                             NCAND=triton.next_power_of_2(n_chunks * KC), NCH=triton.next_power_of_2(n_chunks),
                             BLOCK=4096, NUM_BLOCKS=n_chunks, NWAY=16, FALLBACK=True), num_warps=8)


_register_static_cases()
