"""Attention against a KV cache in Triton: append the new keys/values, then attend (chunked prefill or decode).

The attention itself is :func:`omni_fast.kernels.flash_attn.attn_fwd_kernel` (the same kernel and inner loop as
the varlen path), launched with per-sequence caches instead of packed keys. This module adds

- :func:`append_kv_kernel`: writes new k/v ``[B, Sq, Hk, D]`` at rows ``cache_seqlens[b] + s`` of contiguous
  ``[B, S, Hk, D]`` or paged ``[num_blocks, page, Hk, D]`` caches;
- the split-KV choice: when few programs would run (small batch, decode) and the cache is long, the keys are cut
  into chunks processed in parallel and merged by :func:`omni_fast.kernels.flash_attn.combine_kernel`.

Everything stays on the device (no host sync): the number of splits depends on the cache *capacity*, not on the
current lengths, so the launch is CUDA-graph capturable.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .flash_attn import attn_fwd, block_sizes, combine
from .flash_attn_parts import rotary_rows
from .launch import clamp, interpreting, launch, static_case

SPLIT_ALIGN = 128  # split boundaries are multiples of every BLOCK_N, so no key is visited by two splits
MAX_SPLITS = 64  # the combine kernel holds [MAX_SPLITS, BLOCK_D] fp32 partials (64 x 128: 64 registers a thread)
# The split choice's time model (H100 SXM, the same figures as bench/costmodel/constants.py): HBM bandwidth and the
# fixed cost of the extra combine kernel (one CUDA-graph node, ~1.3 us, plus its short run).
HBM_BYTES_PER_S = 3.0e12
COMBINE_FIXED_S = 2.0e-6
SPLIT_SLACK = 0.05  # prefer fewer splits when the modelled time is within 5 % of the best


@triton.jit
def append_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, seqlens_ptr, bt_ptr, cbi_ptr, cos_ptr, sin_ptr,
                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                     stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch, stride_bt,
                     stride_cos, stride_sin,
                     seqlen_new, n_heads, page_size, capacity, num_blocks, rot_len,
                     HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
                     CACHE_IDX: tl.constexpr, ROT_DIM: tl.constexpr, ROT_INTERLEAVED: tl.constexpr):
    """Grid ``(B * Snew,)``: copy token s of sequence b (all heads) to cache row ``cache_seqlens[b] + s``.

    The cache row of sequence b is ``cache_batch_idx[b]`` with CACHE_IDX (contiguous caches), else b. With
    ROT_DIM > 0 the key is rotated by ``cos/sin[cache_seqlens[b] + s]`` first (FlashAttention's kvcache rotary;
    v is copied as is). Rows outside ``[0, capacity)``, pages outside ``[0, num_blocks)`` are not written (cache
    rows are clamped): cache_seqlens, block_table and cache_batch_idx values are not checked on the GPU (that would
    sync the host), and an overflowing sequence must not overwrite its neighbour's rows (contiguous) or memory past
    the cache (paged). The tokens that do not fit are dropped.
    """
    pid = tl.program_id(0)
    b = pid // seqlen_new
    s = pid % seqlen_new
    pos = tl.load(seqlens_ptr + b) + s
    ok = (pos >= 0) & (pos < capacity)
    t = clamp(pos, 0, capacity - 1)  # in range for the address arithmetic; the store is masked
    if PAGED:
        blk = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + t // page_size)
        ok = ok & (blk >= 0) & (blk < num_blocks)
        blk = clamp(blk, 0, num_blocks - 1).to(tl.int64)
        row_k = blk * stride_kcb + (t % page_size) * stride_kct
        row_v = blk * stride_vcb + (t % page_size) * stride_vct
    else:
        cb = b
        if CACHE_IDX:
            cb = clamp(tl.load(cbi_ptr + b), 0, num_blocks - 1)
        row_k = cb.to(tl.int64) * stride_kcb + t.to(tl.int64) * stride_kct
        row_v = cb.to(tl.int64) * stride_vcb + t.to(tl.int64) * stride_vct
    heads = tl.where(ok, n_heads, 0)  # none when the row is out of range (a vector mask: the interpreter needs it)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < heads) & (offs_d[None, :] < HEAD_DIM)
    src_k = k_ptr + b.to(tl.int64) * stride_kb + s * stride_ks + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = v_ptr + b.to(tl.int64) * stride_vb + s * stride_vs + offs_h[:, None] * stride_vh + offs_d[None, :]
    k = tl.load(src_k, mask=mask)
    if ROT_DIM > 0:
        k_rows = k_ptr + b.to(tl.int64) * stride_kb + s * stride_ks + offs_h * stride_kh
        k = rotary_rows(k_rows, k, pos + offs_h * 0, cos_ptr, sin_ptr, stride_cos, stride_sin, rot_len, offs_d,
                        offs_h < heads, ROT_DIM, ROT_INTERLEAVED)
    tl.store(kc_ptr + row_k + offs_h[:, None] * stride_kch + offs_d[None, :], k, mask=mask)
    tl.store(vc_ptr + row_v + offs_h[:, None] * stride_vch + offs_d[None, :], tl.load(src_v, mask=mask), mask=mask)


def append_kv(k_cache, v_cache, cache_seqlens, k, v, block_table=None, cache_batch_idx=None, rotary=None) -> None:
    """Write k/v ``[B, Snew, Hk, D]`` into the caches at ``cache_seqlens[b] + s`` (validated shapes; rows outside
    the cache's capacity and out-of-range pages are skipped, see :func:`append_kv_kernel`). ``cache_batch_idx``
    int32 ``[B]``: cache row per sequence (contiguous caches); ``rotary``: ``(cos, sin, interleaved)`` rotates k."""
    B, Snew, Hk, D = k.shape
    paged = block_table is not None
    capacity = k_cache.shape[1] * (block_table.shape[1] if paged else 1)
    cos, sin, interleaved = rotary if rotary is not None else (None, None, False)
    opt = (lambda t: cache_seqlens if t is None else t)  # noqa: E731 - unused pointers are compiled out
    launch(append_kv_kernel, (B * Snew,), k, v, k_cache, v_cache, cache_seqlens, opt(block_table),
           opt(cache_batch_idx), opt(cos), opt(sin),
           k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
           v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
           block_table.stride(0) if paged else 0, cos.stride(0) if cos is not None else 0,
           sin.stride(0) if sin is not None else 0, Snew, Hk, k_cache.shape[1] if paged else 1, capacity,
           k_cache.shape[0] if (paged or cache_batch_idx is not None) else 1, cos.shape[0] if cos is not None else 1,
           HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(Hk), BLOCK_D=triton.next_power_of_2(D), PAGED=paged,
           CACHE_IDX=cache_batch_idx is not None, ROT_DIM=2 * cos.shape[1] if cos is not None else 0,
           ROT_INTERLEAVED=bool(interleaved), num_warps=4, device=k.device)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def effective_splits(capacity: int, splits: int) -> tuple[int, int]:
    """(splits that hold keys, split length): ``splits`` chunks of ``capacity`` keys rounded to SPLIT_ALIGN; asking
    for more chunks than there are SPLIT_ALIGN blocks, or a count whose last chunks would be empty, gives fewer."""
    blocks = triton.cdiv(max(capacity, 1), SPLIT_ALIGN)
    per_split = triton.cdiv(blocks, max(1, min(splits, blocks)))
    return triton.cdiv(blocks, per_split), per_split * SPLIT_ALIGN


def split_time(programs: int, splits: int, sms: int, kv_bytes: int, part_bytes: int) -> float:
    """Modelled seconds of a split-KV launch: ``kv_bytes`` (all programs' keys and values) plus ``splits`` x
    ``part_bytes`` of fp32 partials (written and read back) at HBM speed times the wave efficiency (one CTA per SM,
    the decode config's occupancy), plus the combine's fixed cost when ``splits > 1``."""
    ctas = programs * splits
    waves = triton.cdiv(ctas, sms)
    efficiency = ctas / (waves * sms)
    t = (kv_bytes + (splits * part_bytes if splits > 1 else 0)) / (HBM_BYTES_PER_S * efficiency)
    return t + (COMBINE_FIXED_S if splits > 1 else 0.0)


def choose_splits(device: torch.device, programs: int, capacity: int, *, kv_bytes: int = 0,
                  part_bytes: int = 0) -> int:
    """How many key chunks to process in parallel (flash-decoding): fill the GPU's SMs when ``programs`` alone
    would not.

    ``capacity`` is the most keys a sequence can have (the cache size), so the choice is static for a cache: no
    cache_seqlens value is read (no host sync, CUDA-graph safe). Among the split counts that give distinct chunk
    lengths (:func:`effective_splits`, at most MAX_SPLITS), the one with the least :func:`split_time` wins:
    ``kv_bytes`` the keys/values every program reads at full capacity, ``part_bytes`` the partial (o, lse) bytes one
    split adds (0: only the fill counts). The fewest splits within SPLIT_SLACK of the best time win (more
    CTAs than one wave, e.g. 33 x 32 at B = 8 instead of 4 x 32, buy little and cost partial bytes).
    """
    if device.type != "cuda" or interpreting():
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    programs = max(programs, 1)
    if programs >= sms:
        return 1
    counts = sorted({effective_splits(capacity, want)[0] for want in range(1, MAX_SPLITS + 1)})
    times = {n: split_time(programs, n, sms, kv_bytes, part_bytes) for n in counts}
    best = min(times.values())
    return next(n for n in counts if times[n] <= best * (1 + SPLIT_SLACK))


def kvcache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cache_seqlens: torch.Tensor | None, k_extra: int, block_table: torch.Tensor | None,
                      softmax_scale: float, causal: bool, window_left: int, window_right: int, num_splits: int = 0,
                      key_padding_mask: torch.Tensor | None = None, *, cache_batch_idx: torch.Tensor | None = None,
                      cache_leftpad: torch.Tensor | None = None, softcap: float = 0.0,
                      alibi_slopes: torch.Tensor | None = None,
                      rotary: tuple | None = None, empty_lse: float = float("-inf"),
                      alibi_lse_shift: bool = False, out: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend q ``[B, Sq, Hq, D]`` to ``cache_seqlens[b] + k_extra`` cached keys (validated inputs; caches only read).

    ``cache_seqlens`` None: every sequence has ``k_extra`` keys. Returns (out ``[B, Sq, Hq, D]``, lse fp32
    ``[Hq, B, Sq]``: head-major, as the kernels write it; a caller that wants ``[B, Hq, Sq]`` transposes). ``num_splits``: 0 picks automatically (see :func:`choose_splits`), 1 disables split-KV, n > 1
    asks for n chunks (of SPLIT_ALIGN-multiple lengths; fewer when the capacity has fewer such chunks or the last
    ones would be empty, see :func:`effective_splits`). ``key_padding_mask``: bool ``[B, capacity]`` (unit stride), False = padding (never attended;
    a padding query gives zeros). ``cache_batch_idx`` / ``cache_leftpad`` int32 ``[B]``, ``softcap``,
    ``alibi_slopes``, ``rotary = (cos, sin, interleaved, causal)``: FlashAttention's, see
    :func:`omni_fast.kernels.flash_attn.attn_fwd`; ``empty_lse`` (lse of rows that see no key) and
    ``alibi_lse_shift`` (flash-attn's causal-ALiBi lse) as there. ``out``: ``[B, Sq, Hq, D]`` of q's dtype to
    write into (stored into directly when B and Sq collapse into one token dimension, else copied once).
    """
    B, Sq, Hq, D = q.shape
    Hk = k_cache.shape[2]
    group = Hq // Hk
    capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    if num_splits <= 0:
        rows = Sq * group
        block_m = block_sizes(rows, D, q.element_size())[0]
        num_splits = choose_splits(q.device, triton.cdiv(rows, block_m) * B * Hk, capacity,
                                   kv_bytes=2 * B * Hk * capacity * D * k_cache.element_size(),
                                   part_bytes=2 * B * Sq * Hq * (D + 1) * 4)
    num_splits, split_len = effective_splits(capacity, num_splits)
    q2 = q.reshape(B * Sq, Hq, D)
    given = out
    try:  # the caller's buffer as the kernel's [tokens, Hq, D] view (fails for a layout B, Sq do not collapse in)
        out = given.view(B * Sq, Hq, D) if given is not None else None
    except RuntimeError:
        out = None
    if out is None:
        out = torch.empty(B * Sq, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(Hq, B * Sq, dtype=torch.float32, device=q.device)
    common = dict(batch=B, rows_per_seq=Sq * group, cu_q=None, seqlen_q=Sq, cu_k=None, seqused_k=cache_seqlens,
                  k_extra=k_extra, block_table=block_table, softmax_scale=softmax_scale,
                  causal=causal, window_size=(window_left, window_right),
                  key_mask=None if key_padding_mask is None else key_padding_mask.view(torch.uint8),
                  cache_batch_idx=cache_batch_idx, leftpad=cache_leftpad, softcap=softcap, alibi_slopes=alibi_slopes,
                  rotary=rotary, alibi_lse_shift=alibi_lse_shift)
    if num_splits == 1:
        attn_fwd(q2, k_cache, v_cache, out, lse, empty_lse=empty_lse, **common)
    else:
        part_o = torch.empty(num_splits, B * Sq, Hq, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_splits, Hq, B * Sq, dtype=torch.float32, device=q.device)
        attn_fwd(q2, k_cache, v_cache, part_o, part_lse, num_splits=num_splits, split_len=split_len, **common)
        combine(part_o, part_lse, out, lse, empty_lse)
    lse = lse.view(Hq, B, Sq)
    if given is not None:
        if given.data_ptr() != out.data_ptr():
            given.copy_(out.view(B, Sq, Hq, D))
        return given, lse
    return out.view(B, Sq, Hq, D), lse


def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, block_table, softmax_scale: float,
                            causal: bool, window_left: int, window_right: int, num_splits: int = 0):
    """Append k/v (if given) at ``cache_seqlens``, then :func:`kvcache_attention` over the grown caches. Returns
    (out ``[B, Sq, Hq, D]``, lse fp32 ``[Hq, B, Sq]``: head-major, as :func:`kvcache_attention`)."""
    if k is not None:
        append_kv(k_cache, v_cache, cache_seqlens, k, v, block_table)
    return kvcache_attention(q, k_cache, v_cache, cache_seqlens, k.shape[1] if k is not None else 0, block_table,
                             softmax_scale, causal, window_left, window_right, num_splits)


for _dt in ("bf16", "fp16"):
    for _paged in (False, True):
        static_case(
            f"append_kv_kernel[{_dt},Hk4,d128,paged={_paged}]", append_kv_kernel,
            {"k_ptr": f"*{_dt}", "v_ptr": f"*{_dt}", "kc_ptr": f"*{_dt}", "vc_ptr": f"*{_dt}",
             "seqlens_ptr": "*i32", "bt_ptr": "*i32", "cbi_ptr": "*i32", "cos_ptr": f"*{_dt}", "sin_ptr": f"*{_dt}",
             **{n: "i32" for n in ("stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh",
                                   "stride_kcb", "stride_kct", "stride_kch", "stride_vcb", "stride_vct",
                                   "stride_vch", "stride_bt", "stride_cos", "stride_sin", "seqlen_new", "n_heads",
                                   "page_size", "capacity", "num_blocks", "rot_len")},
             **{n: "constexpr" for n in ("HEAD_DIM", "BLOCK_H", "BLOCK_D", "PAGED", "CACHE_IDX", "ROT_DIM",
                                         "ROT_INTERLEAVED")}},
            {"HEAD_DIM": 128, "BLOCK_H": 4, "BLOCK_D": 128, "PAGED": _paged, "CACHE_IDX": False,
             "ROT_DIM": 0 if _paged else 128, "ROT_INTERLEAVED": False}, num_warps=4, num_stages=1)

__all__ = ["append_kv", "append_kv_kernel", "choose_splits", "effective_splits", "split_time", "flash_attn_with_kvcache", "kvcache_attention"]
