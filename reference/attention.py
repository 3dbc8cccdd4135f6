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

flash-attn 2.8's own lse conventions (what ``omni_fast.compat.flash_attn`` returns), with ``fa_lse=True``: rows
that see no key have ``lse = +inf``; ``alibi_lse_shift=True`` (flash-attn's *causal* kernel, which adds the bias
``slope * (j - k_lo)`` instead of ``-slope * (p - j)``) adds ``slope * (p - k_lo)`` to the lse of every row that
saw a key. The output is the same either way.

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
                     scale: float, *, softcap: float = 0.0, bias: torch.Tensor | None = None,
                     sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q ``[Lq, Hq, D]`` over k, v ``[Lk, Hk, D]`` with a bool mask ``[Lq, Lk]`` (or ``[Hq, Lq, Lk]``).

    ``softcap > 0``: scores become ``softcap * tanh(scores / softcap)``; ``bias`` (fp32 ``[Hq, Lq, Lk]``, e.g.
    ALiBi) is added after the cap, before the mask (FlashAttention's order). ``sinks`` ``[Hq]`` (FA3's ``s_aux``):
    one more logit per head, never masked, whose value is zero: a virtual key that only enlarges the softmax
    denominator (and the lse). Returns (out ``[Lq, Hq, D]`` in q's dtype, lse fp32 ``[Hq, Lq]``); rows without a
    visible key give zeros and ``-inf`` (the sink's logit with ``sinks``).
    """
    Lq, Hq, D = q.shape
    Lk, Hk, _ = k.shape
    group = Hq // Hk
    kk = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Lk, D]
    vv = v.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), kk.transpose(1, 2)) * scale  # [Hq, Lq, Lk] in the input dtype
    stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = scores.to(stat_dtype)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(stat_dtype)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:  # the virtual key, last column; its probability is dropped with its zero value
        s = torch.cat([s, sinks.to(stat_dtype)[:, None, None].expand(Hq, Lq, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)  # -inf where nothing is visible
    # torch's softmax, as eager attention; an all-masked row would be NaN there, here it is zeros.
    p = torch.where(torch.isfinite(lse)[..., None], torch.softmax(s, dim=-1), 0.0)[..., :Lk]
    out = torch.matmul(p.to(q.dtype), vv)  # [Hq, Lq, D]
    return out.transpose(0, 1).contiguous(), lse.to(torch.float32)


def alibi_bias(slopes: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """ALiBi as FlashAttention documents it: fp32 ``[Hq, Lq, Lk]`` = ``-slope[h] * |qpos[i] - kpos[j]|``
    (query/key positions in the same, key-aligned coordinates)."""
    dist = (qpos[:, None] - kpos[None, :]).abs().to(torch.float32)
    return -slopes.to(torch.float32)[:, None, None] * dist[None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """FlashAttention's rotary: x ``[L, H, D]`` rotated by ``cos/sin[pos[l]]`` (tables ``[S, R/2]``) on its first R
    dims, GPT-NeoX halves or (``interleaved``) GPT-J pairs; in fp32, rounded back to x's dtype."""
    rd = 2 * cos.shape[1]
    pos = pos.long().clamp(0, cos.shape[0] - 1)
    c, s = cos[pos].float()[:, None, :], sin[pos].float()[:, None, :]  # [L, 1, R/2]
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)


def default_scale(head_dim: int, softmax_scale: float | None) -> float:
    """The softmax scale: ``softmax_scale`` when given, else ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def _bounds(cu: list[int], b: int, total: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of sequence ``b``, clamped into ``[0, total]`` (end < start = empty), as the kernel."""
    start = min(max(cu[b], 0), total)
    return start, min(max(cu[b + 1], start), total)


def _slopes(alibi_slopes: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """Sequence ``b``'s ALiBi slopes ``[Hq]`` from ``[Hq]`` or ``[B, Hq]``."""
    if alibi_slopes is None:
        return None
    return alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes


def _attend(q, kb, vb, b, left, right, scale, softcap, alibi_slopes, k_lo: int = 0, extra_mask=None,
            alibi_lse_shift: bool = False, sinks=None):
    """One sequence: q ``[Lq, Hq, D]`` against keys ``kb`` ``[Lk, Hk, D]`` (positions 0..Lk-1, bottom-right
    aligned), keys before ``k_lo`` (left padding) invisible; returns (out, lse) (``alibi_lse_shift``: see the
    module docstring)."""
    Lq, Lk = q.shape[0], kb.shape[0]
    mask = visible(Lq, Lk, left, right, q.device)
    mask[:, :k_lo] = False
    if extra_mask is not None:
        mask = mask & extra_mask
    slopes = _slopes(alibi_slopes, b)
    bias = None
    if slopes is not None:
        bias = alibi_bias(slopes, torch.arange(Lq, device=q.device) + (Lk - Lq), torch.arange(Lk, device=q.device))
    out, lse = masked_attention(q, kb, vb, mask, scale, softcap=softcap, bias=bias, sinks=sinks)
    if slopes is not None and alibi_lse_shift:
        qpos = torch.arange(Lq, device=q.device) + (Lk - Lq - k_lo)
        lse = lse + slopes.to(torch.float32)[:, None] * qpos.to(torch.float32)[None, :]
    return out, lse


def _empty_lse(lse: torch.Tensor, fa_lse: bool) -> torch.Tensor:
    """flash-attn's ``+inf`` for rows that see no key when ``fa_lse`` (else the native ``-inf``)."""
    return lse.masked_fill(lse == float("-inf"), float("inf")) if fa_lse else lse


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                      softmax_scale: float | None = None, causal: bool = False, window_size=(-1, -1),
                      return_lse: bool = False, softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                      block_table: torch.Tensor | None = None, seqused_k: torch.Tensor | None = None,
                      fa_lse: bool = False, alibi_lse_shift: bool = False, sinks: torch.Tensor | None = None):
    """Packed variable-length attention: q ``[Tq, Hq, D]``, k/v ``[Tk, Hk, D]``, cu_seqlens int32 ``[B + 1]``.

    Returns out ``[Tq, Hq, D]`` (q's dtype), and with ``return_lse`` also lse fp32 ``[Hq, Tq]``. ``max_seqlen_*``
    are accepted for API compatibility (the reference does not need them). One sequence at a time, so memory stays
    ``O(Hq * Lq * Lk)`` of the largest sequence, not of the whole pack. FlashAttention's extras: ``softcap``,
    ``alibi_slopes`` fp32 ``[Hq]`` / ``[B, Hq]``, ``block_table`` (k/v are pages ``[num_blocks, page, Hk, D]``,
    sequence b's keys its logical rows ``0 .. cu_k[b+1] - cu_k[b]``), ``seqused_k`` int32 ``[B]`` (key counts).
    ``fa_lse`` / ``alibi_lse_shift``: flash-attn's lse conventions (module docstring). ``sinks`` ``[Hq]``: FA3's
    attention sinks (see :func:`masked_attention`; a sequence without keys then gets zeros and ``lse = sink``).
    """
    del max_seqlen_q, max_seqlen_k
    scale = default_scale(q.shape[-1], softmax_scale)
    left, right = normalize_window(causal, window_size)
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    used = seqused_k.tolist() if seqused_k is not None else None
    for b in range(len(cq) - 1):
        q0, q1 = _bounds(cq, b, q.shape[0])
        if block_table is not None:
            n = min(max(used[b] if used is not None else ck[b + 1] - ck[b], 0), _capacity(k, block_table))
            kb, vb = _cache_rows(k, block_table, b, n), _cache_rows(v, block_table, b, n)
        else:
            k0, k1 = _bounds(ck, b, k.shape[0])
            if used is not None:
                k1 = min(k0 + max(used[b], 0), k.shape[0])
            kb, vb = k[k0:k1], v[k0:k1]
        if q1 == q0 or (kb.shape[0] == 0 and sinks is None):
            continue
        out[q0:q1], lse[:, q0:q1] = _attend(q[q0:q1], kb, vb, b, left, right, scale, softcap, alibi_slopes,
                                            alibi_lse_shift=alibi_lse_shift, sinks=sinks)
    lse = _empty_lse(lse, fa_lse)
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
              v: torch.Tensor, block_table: torch.Tensor | None = None, cache_batch_idx: torch.Tensor | None = None,
              rotary: tuple | None = None) -> None:
    """Write new k/v ``[B, Snew, Hk, D]`` into the caches at rows ``cache_seqlens[b] ..`` (in place).

    The cache row of sequence b is ``cache_batch_idx[b]`` (contiguous caches) or b. ``rotary = (cos, sin,
    interleaved)`` rotates k at positions ``cache_seqlens[b] + s`` first. Tokens beyond the capacity (or before
    row 0, or on a page outside the cache) are dropped."""
    B, Snew = k.shape[:2]
    lens = cache_seqlens.tolist()
    page = k_cache.shape[1]
    rows = cache_batch_idx.tolist() if cache_batch_idx is not None else list(range(B))
    for b in range(B):
        kb = k[b]
        if rotary is not None and Snew:
            kb = apply_rotary(kb, rotary[0], rotary[1], torch.arange(Snew, device=k.device) + lens[b], rotary[2])
        for s in range(Snew):
            t = lens[b] + s
            if not 0 <= t < _capacity(k_cache, block_table):
                continue
            if block_table is None:
                cb = min(max(rows[b], 0), k_cache.shape[0] - 1)
                k_cache[cb, t], v_cache[cb, t] = kb[s], v[b, s]
            else:
                blk = int(block_table[b, t // page])
                if 0 <= blk < k_cache.shape[0]:
                    k_cache[blk, t % page], v_cache[blk, t % page] = kb[s], v[b, s]


def kvcache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cache_seqlens: torch.Tensor | None, k_extra: int, *, causal: bool = False,
                      window_size=(-1, -1), softmax_scale: float | None = None,
                      block_table: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                      cache_batch_idx: torch.Tensor | None = None, cache_leftpad: torch.Tensor | None = None,
                      softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                      rotary: tuple | None = None, fa_lse: bool = False,
                      alibi_lse_shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend q ``[B, Sq, Hq, D]`` to the caches' first ``cache_seqlens[b] + k_extra`` keys (``k_extra`` alone when
    ``cache_seqlens`` is None), the caches only read. Returns (out ``[B, Sq, Hq, D]``, lse fp32 ``[B, Hq, Sq]``).

    Queries are the last positions (bottom-right). ``cache_leftpad[b]``: keys before it are not attended (positions
    stay absolute). ``rotary = (cos, sin, interleaved, causal)``: q rotated at ``cache_seqlens[b] + i`` (causal) or
    ``cache_seqlens[b]``. ``key_padding_mask`` bool ``[B, >= keys]`` (False = padding, an extension of
    FlashAttention's API): padding keys are never attended, and a query whose own key position is padding gives
    zeros and ``lse = -inf``. ``fa_lse`` / ``alibi_lse_shift``: flash-attn's lse conventions (module docstring).
    """
    B, Sq, Hq, D = q.shape
    scale = default_scale(D, softmax_scale)
    left, right = normalize_window(causal, window_size)
    out = q.new_zeros(q.shape)  # contiguous, as the kernel's output
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    lens = cache_seqlens.tolist() if cache_seqlens is not None else [0] * B
    rows = cache_batch_idx.tolist() if cache_batch_idx is not None else list(range(B))
    pads = cache_leftpad.tolist() if cache_leftpad is not None else [0] * B
    for b in range(B):
        n = min(max(lens[b] + k_extra, 0), _capacity(k_cache, block_table))
        if n == 0 or Sq == 0:
            continue
        if block_table is None:
            cb = min(max(rows[b], 0), k_cache.shape[0] - 1)
            kb, vb = k_cache[cb, :n], v_cache[cb, :n]
        else:
            kb, vb = _cache_rows(k_cache, block_table, b, n), _cache_rows(v_cache, block_table, b, n)
        qb = q[b]
        if rotary is not None:
            pos = torch.full((Sq,), lens[b], device=q.device)
            qb = apply_rotary(qb, rotary[0], rotary[1], pos + torch.arange(Sq, device=q.device) * bool(rotary[3]),
                              rotary[2])
        extra = None
        if key_padding_mask is not None:
            real = key_padding_mask[b, :n].bool()
            pos = torch.arange(Sq, device=q.device) + (n - Sq)  # the queries' key positions
            q_real = torch.where(pos >= 0, real[pos.clamp(min=0)], False)
            extra = real[None, :] & q_real[:, None]
        out[b], lse[b] = _attend(qb, kb, vb, b, left, right, scale, softcap, alibi_slopes,
                                 k_lo=min(max(pads[b], 0), n), extra_mask=extra, alibi_lse_shift=alibi_lse_shift)
    return out, _empty_lse(lse, fa_lse)


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_seqlens: torch.Tensor, *, k: torch.Tensor | None = None,
                            v: torch.Tensor | None = None, causal: bool = True, window_size=(-1, -1),
                            softmax_scale: float | None = None, block_table: torch.Tensor | None = None,
                            key_padding_mask: torch.Tensor | None = None, return_lse: bool = False, **features):
    """Append new k/v to the cache (in place), then attend: q ``[B, Sq, Hq, D]`` -> out ``[B, Sq, Hq, D]``.

    Caches are ``[B, S, Hk, D]`` or paged ``[num_blocks, block_size, Hk, D]`` with ``block_table`` int32
    ``[B, max_blocks]``; ``cache_seqlens`` int32 ``[B]`` counts the tokens already cached (not updated here, as in
    FlashAttention). Sequence ``b`` attends to its ``cache_seqlens[b] (+ Snew when k is given)`` keys, the queries
    aligned bottom-right (the new queries are the last positions). lse (with ``return_lse``) is fp32 ``[B, Hq, Sq]``.
    ``features``: ``cache_batch_idx``, ``cache_leftpad``, ``softcap``, ``alibi_slopes``, ``rotary = (cos, sin,
    interleaved)`` (q is rotated causally when ``causal`` or a window is set, as FlashAttention) - see
    :func:`kvcache_attention`. (This reference keeps its own positional order; the FlashAttention-exact one is
    :func:`omni_fast.compat.flash_attn.flash_attn_with_kvcache`.)
    """
    rotary = features.pop("rotary", None)
    if k is not None:
        append_kv(k_cache, v_cache, cache_seqlens, k, v, block_table, features.get("cache_batch_idx"),
                  rotary[:3] if rotary is not None else None)
    if rotary is not None and len(rotary) == 3:
        local = causal or any(w >= 0 for w in window_size)
        rotary = (*rotary, local)
    out, lse = kvcache_attention(q, k_cache, v_cache, cache_seqlens, k.shape[1] if k is not None else 0,
                                 causal=causal, window_size=window_size, softmax_scale=softmax_scale,
                                 block_table=block_table, key_padding_mask=key_padding_mask, rotary=rotary,
                                 **features)
    return (out, lse) if return_lse else out


__all__ = ["alibi_bias", "append_kv", "apply_rotary", "flash_attn_varlen", "flash_attn_with_kvcache",
           "kvcache_attention", "masked_attention", "normalize_window", "varlen_mask", "visible"]
