"""Reference flash attention: the exact mask, then softmax attention as transformers' eager path computes it.

FlashAttention-2 (>= 2.1) semantics, which the Triton kernels in :mod:`omni_fast.kernels.flash_attn` reproduce:

- varlen packing: sequence ``b`` owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key rows
  ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``; queries never see another sequence's keys (block-diagonal mask);
- positions are aligned **bottom-right**: query ``i`` of a sequence with ``Lq`` queries and ``Lk`` keys sits at key
  position ``i + Lk - Lq`` (so the last query sees the last key, as in decoding against a cache);
- ``window_size=(left, right)``: query at key position ``p`` sees keys ``p - left <= j <= p + right`` (``-1`` =
  unbounded); ``causal=True`` is ``right = 0``;
- GQA: query head ``h`` reads key/value head ``h // (Hq // Hk)``;
- a query row that sees no key (empty window, empty key sequence) outputs zeros and has ``lse = -inf``.

Malformed index values (which the public ops check only on the CPU or with ``check_values=True``) get the kernels'
memory-safe meaning here too: sequence bounds from cu_seqlens are clamped into ``[0, total]`` (an end before its
start = empty), cache lengths into ``[0, capacity]``, page numbers into ``[0, num_blocks)`` for reading, and appended
tokens that fall outside the capacity or on an out-of-range page are dropped.

Arithmetic follows transformers' ``eager_attention_forward`` in the inputs' dtype: ``(q @ k^T) * scale`` in the
input dtype, masked, softmax in fp32, probabilities cast back to the input dtype, ``p @ v`` in the input dtype. Run on
fp64 inputs it is the exact answer that kernels are measured against. ``lse`` (natural log, fp32) is the
log-sum-exp of the scaled scores over the visible keys.
"""

from __future__ import annotations

import math

import torch


def normalize_window(causal: bool, window_size) -> tuple[int, int]:
    """``(left, right)`` with ``-1`` for unbounded; ``causal`` forces ``right = 0`` (FlashAttention's rule)."""
    left, right = (int(w) for w in window_size)
    if causal:
        right = 0
    return left, right


def visible(Lq: int, Lk: int, left: int, right: int, device=None) -> torch.Tensor:
    """bool ``[Lq, Lk]``: which keys each query of one sequence sees (bottom-right aligned)."""
    pos = torch.arange(Lq, device=device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=device)[None, :]
    mask = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= pos - left
    if right >= 0:
        mask &= j <= pos + right
    return mask


def varlen_mask(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *, causal: bool = False,
                window_size=(-1, -1)) -> torch.Tensor:
    """The whole packed mask: bool ``[Tq, Tk]``, block-diagonal over sequences, causal/window inside each block."""
    left, right = normalize_window(causal, window_size)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    mask = torch.zeros(cq[-1], ck[-1], dtype=torch.bool, device=cu_seqlens_q.device)
    for b in range(len(cq) - 1):
        mask[cq[b]:cq[b + 1], ck[b]:ck[b + 1]] = visible(cq[b + 1] - cq[b], ck[b + 1] - ck[b], left, right,
                                                         cu_seqlens_q.device)
    return mask


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q ``[Lq, Hq, D]`` over k, v ``[Lk, Hk, D]`` with a bool mask ``[Lq, Lk]`` (or ``[Hq, Lq, Lk]``).

    Returns (out ``[Lq, Hq, D]`` in q's dtype, lse fp32 ``[Hq, Lq]``); rows without a visible key give zeros and
    ``-inf``.
    """
    Lq, Hq, D = q.shape
    Lk, Hk, _ = k.shape
    group = Hq // Hk
    kk = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Lk, D]
    vv = v.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), kk.transpose(1, 2)) * scale  # [Hq, Lq, Lk] in the input dtype
    stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = scores.to(stat_dtype)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where nothing is visible
    # torch's softmax, as eager attention; an all-masked row would be NaN there, here it is zeros.
    p = torch.where(torch.isfinite(lse)[..., None], torch.softmax(s, dim=-1), 0.0)
    out = torch.matmul(p.to(q.dtype), vv)  # [Hq, Lq, D]
    return out.transpose(0, 1).contiguous(), lse.to(torch.float32)


def default_scale(head_dim: int, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def _bounds(cu: list[int], b: int, total: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of sequence ``b``, clamped into ``[0, total]`` (end < start = empty), as the kernel."""
    start = min(max(cu[b], 0), total)
    return start, min(max(cu[b + 1], start), total)


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                      softmax_scale: float | None = None, causal: bool = False, window_size=(-1, -1),
                      return_lse: bool = False):
    """Packed variable-length attention: q ``[Tq, Hq, D]``, k/v ``[Tk, Hk, D]``, cu_seqlens int32 ``[B + 1]``.

    Returns out ``[Tq, Hq, D]`` (q's dtype), and with ``return_lse`` also lse fp32 ``[Hq, Tq]``. ``max_seqlen_*``
    are accepted for API compatibility (the reference does not need them). One sequence at a time, so memory stays
    ``O(Hq * Lq * Lk)`` of the largest sequence, not of the whole pack.
    """
    del max_seqlen_q, max_seqlen_k
    scale = default_scale(q.shape[-1], softmax_scale)
    left, right = normalize_window(causal, window_size)
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        (q0, q1), (k0, k1) = _bounds(cq, b, q.shape[0]), _bounds(ck, b, k.shape[0])
        if q1 == q0 or k1 == k0:
            continue
        mask = visible(q1 - q0, k1 - k0, left, right, q.device)
        out[q0:q1], lse[:, q0:q1] = masked_attention(q[q0:q1], k[k0:k1], v[k0:k1], mask, scale)
    return (out, lse) if return_lse else out


def _cache_rows(cache: torch.Tensor, block_table: torch.Tensor | None, b: int, n: int) -> torch.Tensor:
    """The first ``n`` token rows ``[n, Hk, D]`` of sequence ``b``'s cache (a view when contiguous)."""
    if block_table is None:
        return cache[b, :n]
    page = cache.shape[1]
    pages = block_table[b, : (n + page - 1) // page].long().clamp(0, cache.shape[0] - 1)
    return cache[pages].reshape(-1, *cache.shape[2:])[:n]


def _capacity(cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    return cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)


def append_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, block_table: torch.Tensor | None = None) -> None:
    """Write new k/v ``[B, Sq, Hk, D]`` into the caches at rows ``cache_seqlens[b] ..`` (in place).

    Tokens beyond the capacity (or before row 0, or on a page outside the cache) are dropped."""
    B, Sq = k.shape[:2]
    lens = cache_seqlens.tolist()
    page = k_cache.shape[1]
    for b in range(B):
        for s in range(Sq):
            t = lens[b] + s
            if not 0 <= t < _capacity(k_cache, block_table):
                continue
            if block_table is None:
                k_cache[b, t], v_cache[b, t] = k[b, s], v[b, s]
            else:
                blk = int(block_table[b, t // page])
                if 0 <= blk < k_cache.shape[0]:
                    k_cache[blk, t % page], v_cache[blk, t % page] = k[b, s], v[b, s]


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_seqlens: torch.Tensor, *, k: torch.Tensor | None = None,
                            v: torch.Tensor | None = None, causal: bool = True, window_size=(-1, -1),
                            softmax_scale: float | None = None, block_table: torch.Tensor | None = None,
                            key_padding_mask: torch.Tensor | None = None, return_lse: bool = False):
    """Append new k/v to the cache (in place), then attend: q ``[B, Sq, Hq, D]`` -> out ``[B, Sq, Hq, D]``.

    Caches are ``[B, S, Hk, D]`` or paged ``[num_blocks, block_size, Hk, D]`` with ``block_table`` int32
    ``[B, max_blocks]``; ``cache_seqlens`` int32 ``[B]`` counts the tokens already cached (not updated here, as in
    FlashAttention). Sequence ``b`` attends to its ``cache_seqlens[b] (+ Sq when k is given)`` keys, the queries
    aligned bottom-right (the new queries are the last positions). lse (with ``return_lse``) is fp32 ``[B, Hq, Sq]``.
    ``key_padding_mask`` bool ``[B, >= keys]`` (False = padding, an extension of FlashAttention's API): padding keys
    are never attended, and a query whose own key position is padding gives zeros and ``lse = -inf``.
    """
    if k is not None:
        append_kv(k_cache, v_cache, cache_seqlens, k, v, block_table)
    B, Sq, Hq, D = q.shape
    scale = default_scale(D, softmax_scale)
    left, right = normalize_window(causal, window_size)
    extra = Sq if k is not None else 0
    out = q.new_zeros(q.shape)  # contiguous, as the kernel's output
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    for b, n in enumerate(cache_seqlens.tolist()):
        n = min(max(n + extra, 0), _capacity(k_cache, block_table))
        if n == 0 or Sq == 0:
            continue
        kb, vb = _cache_rows(k_cache, block_table, b, n), _cache_rows(v_cache, block_table, b, n)
        mask = visible(Sq, n, left, right, q.device)
        if key_padding_mask is not None:
            real = key_padding_mask[b, :n].bool()
            pos = torch.arange(Sq, device=q.device) + (n - Sq)  # the queries' key positions
            q_real = torch.where(pos >= 0, real[pos.clamp(min=0)], False)
            mask = mask & real[None, :] & q_real[:, None]
        out[b], lse[b] = masked_attention(q[b], kb, vb, mask, scale)
    return (out, lse) if return_lse else out


__all__ = ["append_kv", "flash_attn_varlen", "flash_attn_with_kvcache", "masked_attention", "normalize_window",
           "varlen_mask", "visible"]
