"""Public flash-attention ops, FlashAttention-2 semantics: :func:`flash_attn_varlen`, :func:`flash_attn_with_kvcache`.

The semantics of ``flash_attn.flash_attn_varlen_func`` / ``flash_attn_with_kvcache`` (forward only; the latter with
flash-attn's positional order and defaults, the FlashAttention-exact entry points are
:mod:`omni_fast.compat.flash_attn`): packed sequences through int32 ``cu_seqlens``, GQA, causal masks aligned
bottom-right, sliding windows ``window_size=(left, right)`` (``-1`` unbounded), KV caches contiguous or paged,
softcap, ALiBi, rotary, left padding, ``cache_batch_idx``. See :mod:`omni_fast.reference.attention` for the exact
rule and ``docs/attention.md`` for the design.

Value checks (cu_seqlens monotonic and ending at the token count, ``max_seqlen_q``, ``cache_seqlens + Sq`` within
the capacity, ``block_table`` in range) read the index tensors on the host: they run by default only when those
tensors live on the CPU, never while ``torch.compile`` traces or a CUDA graph captures. ``check_values=True`` runs
them on any device at the price of one host sync (one device-to-host copy of all index tensors); ``False`` skips
them. Unchecked malformed values are harmless: the kernels clamp sequence bounds, cache lengths and page numbers
into the buffers and drop appended tokens that do not fit (see :func:`omni_fast.kernels.flash_attn.attn_fwd_kernel`),
so they give defined results (zeros for rows that see no key), never out-of-bounds reads or writes.
"""

from __future__ import annotations

import torch

from ..reference import attention as ref
from ..validation import (FLOAT_DTYPES, INT32_MAX, INT_DTYPES, as_int, check_bool, check_cu_seqlens, check_float,
                          check_index_range, check_inference_only, check_output, check_positive_int, check_same_dtype,
                          check_tensor, check_varlen_keys, host_copies, values_checkable)
from ._dispatch import dispatched_op

MAX_HEAD_DIM = 256


# --- ops ------------------------------------------------------------------------------------------------------


def _fake_varlen(q, *args):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@dispatched_op("flash_attn_varlen", fake=_fake_varlen)
def _varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
               causal: bool, window_left: int, window_right: int, softcap: float, alibi_slopes: torch.Tensor | None,
               block_table: torch.Tensor | None, seqused_k: torch.Tensor | None, fa_lse: bool, alibi_lse_shift: bool,
               sinks: torch.Tensor | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed varlen attention: (out ``[Tq, Hq, D]``, lse fp32 ``[Hq, Tq]``); ``max_seqlen_*`` -1 = unknown;
    ``fa_lse`` / ``alibi_lse_shift``: flash-attn's lse conventions (see :mod:`omni_fast.reference.attention`);
    ``sinks`` ``[Hq]``: attention sinks (FA3's ``s_aux``)."""


@_varlen_op.impl("reference")
def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, left, right, softcap, alibi_slopes,
                      block_table, seqused_k, fa_lse, alibi_lse_shift, sinks):
    return ref.flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal,
                                 window_size=(left, right), return_lse=True, softcap=softcap,
                                 alibi_slopes=alibi_slopes, block_table=block_table, seqused_k=seqused_k,
                                 fa_lse=fa_lse, alibi_lse_shift=alibi_lse_shift, sinks=sinks)


@_varlen_op.impl("triton")
def _varlen_triton(*args):
    from ..kernels import flash_attn

    return flash_attn.flash_attn_varlen(*args)


def _fake_varlen_out(q, *args):
    return q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


# The out= form (vLLM's FlashAttention fork writes into the caller's buffer): the kernel stores into ``out`` itself,
# no copy. Same arguments as _varlen_op plus ``out``; returns the lse only (a custom op cannot return its input).
@dispatched_op("flash_attn_varlen_out", mutates_args=("out",), fake=_fake_varlen_out)
def _varlen_out_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                   causal: bool, window_left: int, window_right: int, softcap: float,
                   alibi_slopes: torch.Tensor | None, block_table: torch.Tensor | None,
                   seqused_k: torch.Tensor | None, fa_lse: bool, alibi_lse_shift: bool,
                   sinks: torch.Tensor | None, out: torch.Tensor, backend: str) -> torch.Tensor:
    """:func:`_varlen_op` writing out ``[Tq, Hq, D]`` (any strides with a unit stride in D) in place; returns lse."""


@_varlen_out_op.impl("reference")
def _varlen_out_reference(*args):
    o, lse = _varlen_reference(*args[:-1])
    args[-1].copy_(o)
    return lse


@_varlen_out_op.impl("triton")
def _varlen_out_triton(*args):
    from ..kernels import flash_attn

    return flash_attn.flash_attn_varlen(*args[:-1], out=args[-1])[1]


@dispatched_op("append_kv_cache_", mutates_args=("k_cache", "v_cache"))
def _append_op(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, block_table: torch.Tensor | None, cache_batch_idx: torch.Tensor | None,
               rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None, rotary_interleaved: bool,
               backend: str) -> None:
    """In place: write k (rotated when cos/sin are given) / v ``[B, Snew, Hk, D]`` at rows ``cache_seqlens[b] ..``."""


def _rotary(cos, sin, interleaved, *more):
    return None if cos is None else (cos, sin, interleaved, *more)


@_append_op.impl("reference")
def _append_reference(k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, cos, sin, interleaved):
    ref.append_kv(k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, _rotary(cos, sin, interleaved))


@_append_op.impl("triton")
def _append_triton(k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, cos, sin, interleaved):
    from ..kernels import flash_attn_kvcache

    flash_attn_kvcache.append_kv(k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx,
                                 _rotary(cos, sin, interleaved))


def _fake_kvcache(q, *args):
    B, Sq, Hq, _ = q.shape
    # contiguous like the kernel's output, whatever q's strides (inductor checks the fake's layout); lse head-major
    return q.new_empty(q.shape), q.new_empty((Hq, B, Sq), dtype=torch.float32)


# Reads the caches only (the append is its own mutating op), so torch.compile never copies a cache for it.
@dispatched_op("kvcache_attention", fake=_fake_kvcache)
def _kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor | None,
                k_extra: int, block_table: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                cache_batch_idx: torch.Tensor | None, cache_leftpad: torch.Tensor | None,
                alibi_slopes: torch.Tensor | None, rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None,
                softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                rotary_interleaved: bool, rotary_causal: bool, num_splits: int, fa_lse: bool, alibi_lse_shift: bool,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend to ``cache_seqlens[b] + k_extra`` cached keys (``k_extra`` without cache_seqlens): (out
    ``[B, Sq, Hq, D]``, lse fp32 ``[Hq, B, Sq]``, the kernel's head-major layout: the public function transposes it
    only when asked, so decode steps at B > 1 pay no copy launch per layer); fa_lse, alibi_lse_shift as _varlen_op."""


@_kvcache_op.impl("reference")
def _kvcache_reference(q, k_cache, v_cache, cache_seqlens, k_extra, block_table, key_padding_mask, cache_batch_idx,
                       cache_leftpad, alibi_slopes, cos, sin, scale, causal, left, right, softcap, interleaved,
                       rot_causal, num_splits, fa_lse, alibi_lse_shift):
    out, lse = ref.kvcache_attention(q, k_cache, v_cache, cache_seqlens, k_extra, causal=causal,
                                     window_size=(left, right), softmax_scale=scale, block_table=block_table,
                                     key_padding_mask=key_padding_mask, cache_batch_idx=cache_batch_idx,
                                     cache_leftpad=cache_leftpad, softcap=softcap, alibi_slopes=alibi_slopes,
                                     rotary=_rotary(cos, sin, interleaved, rot_causal), fa_lse=fa_lse,
                                     alibi_lse_shift=alibi_lse_shift)
    return out, lse.transpose(0, 1).contiguous()  # the op's head-major lse


@_kvcache_op.impl("triton")
def _kvcache_triton(q, k_cache, v_cache, cache_seqlens, k_extra, block_table, key_padding_mask, cache_batch_idx,
                    cache_leftpad, alibi_slopes, cos, sin, scale, causal, left, right, softcap, interleaved,
                    rot_causal, num_splits, fa_lse, alibi_lse_shift, out=None):
    from ..kernels import flash_attn_kvcache

    return flash_attn_kvcache.kvcache_attention(
        q, k_cache, v_cache, cache_seqlens, k_extra, block_table, scale, causal, left, right, num_splits,
        key_padding_mask=key_padding_mask, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
        softcap=softcap, alibi_slopes=alibi_slopes, rotary=_rotary(cos, sin, interleaved, rot_causal),
        empty_lse=float("inf") if fa_lse else float("-inf"), alibi_lse_shift=alibi_lse_shift, out=out)


def _fake_kvcache_out(q, *args):
    B, Sq, Hq, _ = q.shape
    return q.new_empty((Hq, B, Sq), dtype=torch.float32)  # head-major, as _kvcache_op's


# The out= form of _kvcache_op (vLLM's fork): same arguments plus ``out``; returns the lse.
@dispatched_op("kvcache_attention_out", mutates_args=("out",), fake=_fake_kvcache_out)
def _kvcache_out_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cache_seqlens: torch.Tensor | None, k_extra: int, block_table: torch.Tensor | None,
                    key_padding_mask: torch.Tensor | None, cache_batch_idx: torch.Tensor | None,
                    cache_leftpad: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
                    rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None, softmax_scale: float,
                    causal: bool, window_left: int, window_right: int, softcap: float, rotary_interleaved: bool,
                    rotary_causal: bool, num_splits: int, fa_lse: bool, alibi_lse_shift: bool, out: torch.Tensor,
                    backend: str) -> torch.Tensor:
    """:func:`_kvcache_op` writing out ``[B, Sq, Hq, D]`` in place (the kernel stores into it when B and Sq
    collapse into one token dimension, else one copy); returns the head-major lse ``[Hq, B, Sq]``."""


@_kvcache_out_op.impl("reference")
def _kvcache_out_reference(*args):
    o, lse = _kvcache_reference(*args[:-1])
    args[-1].copy_(o)
    return lse


@_kvcache_out_op.impl("triton")
def _kvcache_out_triton(*args):
    return _kvcache_triton(*args[:-1], out=args[-1])[1]


# --- validation -----------------------------------------------------------------------------------------------


def _window(window_size) -> tuple[int, int]:
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    return (check_positive_int("window_size[0]", left, minimum=-1, maximum=INT32_MAX),
            check_positive_int("window_size[1]", right, minimum=-1, maximum=INT32_MAX))


def _scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    return check_float("softmax_scale", softmax_scale)  # NaN / inf: backends would disagree


def _cache_seqlens(value, B: int, device) -> torch.Tensor:
    """int32 ``[B]`` cache lengths from a tensor ``[B]``, a 0-d integer tensor or an int (numpy ints too)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and value.dtype in INT_DTYPES:  # one length for the batch, without a host sync
            check_index_range("cache_seqlens", value, 0, INT32_MAX + 1)  # CPU only: no sync
            return value.to(device=device, dtype=torch.int32).reshape(1).expand(B).contiguous()
        return value
    n = check_positive_int("cache_seqlens", value, minimum=0, maximum=INT32_MAX)
    return torch.full((B,), n, dtype=torch.int32, device=device)


def _check_heads(q_name: str, hq: int, k_name: str, hk: int, head_dim: int) -> None:
    if hq == 0 or hk == 0:
        raise ValueError(f"{q_name} and {k_name} need at least one head, got {hq} and {hk}")
    if hq % hk:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of key/value heads "
                         f"({hk}) for GQA")
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")


def _fa_causal_alibi(alibi_slopes, causal: bool, left: int, right: int, seqlen_k: int | None) -> bool:
    """Whether flash-attn 2.8 runs its *causal* kernel, whose ALiBi bias is ``slope * (j - leftpad)`` (the lse then
    differs from the documented bias's by ``slope * (i + Lk - Lq - leftpad)`` per row).

    flash-attn's host rule (``flash_api.cpp``): a window bound ``>= seqlen_k`` (the key tensor's length, the cache
    capacity, or ``max_seqlen_k``) is unbounded, ``causal`` sets the right bound to 0, and the attention is causal
    when the left bound is unbounded and the right one 0 (``causal=False`` with ``window_size=(-1, 0)`` too).
    """
    if alibi_slopes is None:
        return False
    if seqlen_k is not None:
        left = -1 if left >= seqlen_k else left
        right = -1 if right >= seqlen_k else right
    if causal:
        right = 0
    return left < 0 and right == 0


def _check_out(out, q, **inputs) -> None:
    """``out=``: q's shape, dtype and device, a unit stride in D, no self-overlap, nothing shared with an input."""
    check_tensor("out", out, dtypes=(q.dtype,), shape=tuple(q.shape), device=q.device, last_dim_contiguous=True)
    check_output("out", out, q=q, **inputs)


def _softcap(softcap) -> float:
    """FlashAttention's softcap: a finite float >= 0 (0 = off)."""
    return check_float("softcap", softcap, minimum=0.0)


def _check_alibi(alibi_slopes, B: int, Hq: int, device) -> None:
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,), ndim=(1, 2), device=device,
                     last_dim_contiguous=True)
        if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
            raise ValueError(f"alibi_slopes must have shape [{Hq}] or [{B}, {Hq}], got {list(alibi_slopes.shape)}")


def _check_block_table(block_table, B: int, n_pages: int, device) -> None:
    # unit stride in the last dim: the kernels read page j of row b at ``b * stride(0) + j`` (a strided table gave
    # other rows' pages, silently); flash-attn 2.8's varlen checks the same, its kvcache call copies it (compat)
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, device=device, last_dim_contiguous=True)
    if block_table.shape[0] != B:
        raise ValueError(f"block_table must have shape [{B}, max_blocks], got {list(block_table.shape)}")
    if n_pages == 0 and block_table.numel() > 0:  # the kernels clamp page numbers into [0, n_pages)
        raise ValueError("the paged cache has no pages (shape[0] == 0) but block_table names some")


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table, seqused_k,
                  alibi_slopes, sinks, flash_attn_lse, check_values) -> tuple[int | None, int | None]:
    """Validate :func:`flash_attn_varlen`'s tensors (values as ``check_values`` says); returns
    (max_seqlen_q, max_seqlen_k) as ints or None."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3, last_dim_contiguous=True)
    Tq, Hq, D = q.shape
    paged = block_table is not None
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4 if paged else 3, device=q.device, last_dim_contiguous=True)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, shape=tuple(k.shape), device=q.device, last_dim_contiguous=True)
    check_same_dtype(q=q, k=k, v=v)
    if k.shape[-1] != D:
        raise ValueError(f"k must have head_dim {D} like q, got shape {list(k.shape)}")
    _check_heads("q", Hq, "k", k.shape[-2], D)
    B = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, Tq, device=q.device, check_values=False)
    Bk = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], device=q.device, check_values=False)
    if max_seqlen_q is not None:
        max_seqlen_q = check_positive_int("max_seqlen_q", max_seqlen_q, minimum=0, maximum=INT32_MAX)
    if max_seqlen_k is not None:
        max_seqlen_k = check_positive_int("max_seqlen_k", max_seqlen_k, minimum=0, maximum=INT32_MAX)
    if paged:
        _check_block_table(block_table, B, k.shape[0], q.device)
    if seqused_k is not None:
        check_tensor("seqused_k", seqused_k, dtypes=(torch.int32,), shape=(B,), device=q.device, contiguous=True)
    _check_alibi(alibi_slopes, B, Hq, q.device)
    if sinks is not None:
        check_tensor("sinks", sinks, dtypes=FLOAT_DTYPES, shape=(Hq,), device=q.device, contiguous=True)
        if check_bool("flash_attn_lse", flash_attn_lse):
            raise ValueError("sinks cannot be combined with flash_attn_lse=True (flash-attn 2.8 has no sinks)")
    if values_checkable(cu_seqlens_q, check_values):
        cu_q, cu_k, *ix = host_copies(cu_seqlens_q, cu_seqlens_k, *filter(torch.is_tensor, (block_table, seqused_k)))
        check_cu_seqlens("cu_seqlens_q", cu_q, Tq, check_values=True)
        # paged: cu_seqlens_k only counts keys (its total is not k's first dim)
        check_cu_seqlens("cu_seqlens_k", cu_k, int(cu_k[-1]) if paged else k.shape[0], check_values=True)
        check_varlen_keys(cu_k, ix[0] if paged else None, ix[-1] if seqused_k is not None else None, k.shape[0],
                          k.shape[1])
        if max_seqlen_q is not None and B > 0:
            longest = int((cu_q[1:] - cu_q[:-1]).max())
            if longest > max_seqlen_q:
                raise ValueError(f"max_seqlen_q ({max_seqlen_q}) is smaller than the longest query sequence "
                                 f"({longest})")
    if Bk != B:
        raise ValueError(f"cu_seqlens_k must have {B + 1} entries like cu_seqlens_q, got {cu_seqlens_k.numel()}")
    return max_seqlen_q, max_seqlen_k


def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    check_values: bool | None = None,
    backend: str | None = None,
    flash_attn_lse: bool = False,
    out: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
):
    """Attention over packed variable-length sequences (FlashAttention-2's ``flash_attn_varlen_func``, forward;
    the FlashAttention-exact signature is :func:`omni_fast.compat.flash_attn.flash_attn_varlen_func`).

    q ``[Tq, Hq, D]``, k/v ``[Tk, Hk, D]`` (fp16/bf16/fp32, one dtype, unit stride in D; Hq a multiple of Hk,
    D <= 256); cu_seqlens_q/k int32 ``[B + 1]`` prefix sums of the per-sequence lengths; ``max_seqlen_q`` at least
    the longest query sequence, or None when unknown (an extension of FlashAttention's API: the launch grid is then
    sized from the token count, so callers holding cu_seqlens on the GPU need no host sync to get the maximum);
    ``max_seqlen_k`` is not needed (None allowed). ``softmax_scale`` defaults to ``D ** -0.5``; causal
    masks and windows are aligned bottom-right. ``softcap > 0``: scores ``softcap * tanh(s / softcap)``;
    ``alibi_slopes`` fp32 ``[Hq]`` or ``[B, Hq]``: bias ``-slope * |i + Lk - Lq - j|``. ``block_table`` int32
    ``[B, max_blocks]``: k/v are pages ``[num_blocks, page, Hk, D]`` and sequence b's keys are its logical rows
    ``0 .. cu_seqlens_k[b+1] - cu_seqlens_k[b]``; ``seqused_k`` int32 ``[B]`` replaces those key counts (vLLM's
    paged prefill). Returns out ``[Tq, Hq, D]`` (q's dtype), and with ``return_lse``
    ``(out, lse)`` with lse fp32 ``[Hq, Tq]`` (natural log; ``-inf`` for rows that see no key, whose output is 0).
    ``check_values``: None checks the cu_seqlens values and ``max_seqlen_q`` only on CPU tensors, True on any
    device (one host sync), False never (see the module docstring: unchecked bad values are memory-safe; query
    rows outside every sequence, or beyond a too-small ``max_seqlen_q``, are then left unwritten).
    ``flash_attn_lse=True``: the lse exactly as flash-attn 2.8 returns it (``+inf`` for rows that see no key; under
    a causal mask with ALiBi, flash-attn's kernel bias ``slope * j``, which moves each row's lse by
    ``slope * (i + Lk - Lq)``); the output is the same. :mod:`omni_fast.compat.flash_attn` sets it.
    ``out``: a ``[Tq, Hq, D]`` tensor of q's dtype (unit stride in D, sharing no memory with an input) the kernel
    writes the result into and that is returned (vLLM's ``out=``); no extra copy. ``sinks`` ``[Hq]`` (any float
    dtype, unit stride): attention sinks as FA3's ``s_aux``, one logit per head joining the softmax denominator
    with a zero value (out and lse include it; a row that sees no key gives zeros and ``lse = sink``); not with
    ``flash_attn_lse`` (flash-attn 2.8 has none).
    """
    max_seqlen_q, max_seqlen_k = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                               block_table, seqused_k, alibi_slopes, sinks, flash_attn_lse,
                                               check_values)
    left, right = _window(window_size)
    scale = _scale(softmax_scale, q.shape[2])
    causal = check_bool("causal", causal)
    fa_lse = check_bool("flash_attn_lse", flash_attn_lse)
    if out is not None:
        _check_out(out, q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, block_table=block_table,
                   seqused_k=seqused_k, alibi_slopes=alibi_slopes, sinks=sinks)
    be = _varlen_op.resolve((q, k, v, cu_seqlens_q, cu_seqlens_k), backend)
    # -1 = unknown (custom-op schemas take no Optional[int] here without a schema change for every backend)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, -1 if max_seqlen_q is None else int(max_seqlen_q),
            -1 if max_seqlen_k is None else int(max_seqlen_k), scale, causal, left, right, _softcap(softcap),
            alibi_slopes, block_table, seqused_k, fa_lse,
            fa_lse and _fa_causal_alibi(alibi_slopes, causal, left, right, max_seqlen_k), sinks)
    if out is None:
        out, lse = _varlen_op(*args, be)
    else:
        lse = _varlen_out_op(*args, out, be)
    return (out, lse) if return_lse else out


def _check_rotary(rotary_cos, rotary_sin, q, k, capacity: int) -> None:
    """FlashAttention's rotary rules: both tables or none, only with new k/v, ``[>= capacity, R/2]`` in q's dtype,
    ``R`` a multiple of 16 and at most head_dim."""
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together (or both left out)")
    if rotary_cos is None:
        return
    if k is None:
        raise ValueError("rotary_cos/rotary_sin need new k and v to append (FlashAttention rotates q and the new k)")
    check_tensor("rotary_cos", rotary_cos, dtypes=(q.dtype,), ndim=2, device=q.device, last_dim_contiguous=True)
    check_tensor("rotary_sin", rotary_sin, dtypes=(q.dtype,), shape=tuple(rotary_cos.shape), device=q.device,
                 last_dim_contiguous=True)
    rot_dim = 2 * rotary_cos.shape[1]
    if rot_dim % 16 or not 0 < rot_dim <= q.shape[-1]:
        raise ValueError(f"rotary_cos must be [seqlen_ro, rotary_dim / 2] with rotary_dim a multiple of 16 and at "
                         f"most head_dim {q.shape[-1]}, got shape {list(rotary_cos.shape)}")
    if rotary_cos.shape[0] < capacity:
        raise ValueError(f"rotary_cos must have at least as many rows ({rotary_cos.shape[0]}) as the cache "
                         f"capacity ({capacity})")


def _check_kvcache_index(name, t, B: int, device) -> None:
    if t is not None:
        check_tensor(name, t, dtypes=(torch.int32,), shape=(B,), device=device, contiguous=True)


def _check_kvcache_values(named: dict, n_slots: int, capacity: int, appended: int) -> None:
    """Value checks of the KV-cache index tensors (one device-to-host copy for all of them)."""
    host = dict(zip(named, host_copies(*named.values())))
    for name in ("block_table", "cache_batch_idx"):
        if name in host:
            check_index_range(name, host[name], 0, n_slots, check_values=True)
    if "cache_seqlens" in host:
        lo, hi = int(host["cache_seqlens"].min()), int(host["cache_seqlens"].max())
        if lo < 0 or hi + appended > capacity:
            raise ValueError(f"cache too small: cache_seqlens (in [{lo}, {hi}]) + {appended} appended tokens "
                             f"must fit the cache's {capacity} tokens per sequence")


def _check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                   block_table, alibi_slopes, key_padding_mask, check_values):
    """Validate :func:`flash_attn_with_kvcache`'s tensors; returns (cache_seqlens as a tensor or None, capacity,
    appended token count, the index tensors that choose the backend)."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4, last_dim_contiguous=True)
    B, Sq, Hq, D = q.shape
    check_tensor("k_cache", k_cache, dtypes=FLOAT_DTYPES, ndim=4, device=q.device, last_dim_contiguous=True)
    check_tensor("v_cache", v_cache, dtypes=FLOAT_DTYPES, shape=tuple(k_cache.shape), device=q.device,
                 last_dim_contiguous=True)
    check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    n_slots, slot_len, Hk, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"k_cache must have head_dim {D} like q, got shape {list(k_cache.shape)}")
    _check_heads("q", Hq, "k_cache", Hk, D)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or both left out)")
    if cache_seqlens is not None:
        cache_seqlens = _cache_seqlens(cache_seqlens, B, q.device)  # an int or a 0-d tensor: one length for all
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when new k/v are appended (where to write them)")
    else:
        check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), shape=(B,), device=q.device,
                     contiguous=True)
    if k is not None:
        check_tensor("k", k, dtypes=FLOAT_DTYPES, shape=(B, None, Hk, D), device=q.device, last_dim_contiguous=True)
        check_tensor("v", v, dtypes=FLOAT_DTYPES, shape=tuple(k.shape), device=q.device, last_dim_contiguous=True)
        check_same_dtype(q=q, k=k, v=v)
    _check_kvcache_index("cache_batch_idx", cache_batch_idx, B, q.device)
    _check_kvcache_index("cache_leftpad", cache_leftpad, B, q.device)
    if block_table is not None:
        _check_block_table(block_table, B, n_slots, q.device)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx is not supported with a paged cache (block_table), as in FlashAttention")
        if cache_leftpad is not None:
            raise ValueError("cache_leftpad is not supported with a paged cache (block_table), as in FlashAttention")
        capacity = block_table.shape[1] * slot_len
    else:
        if cache_batch_idx is None and n_slots != B:
            raise ValueError(f"k_cache must have shape [{B}, S, {Hk}, {D}] (one row per sequence; or pass "
                             f"cache_batch_idx), got {list(k_cache.shape)}")
        if cache_batch_idx is not None and n_slots == 0 and B > 0:
            raise ValueError("k_cache has no rows (shape[0] == 0) but cache_batch_idx names some")
        capacity = slot_len
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,), shape=(B, capacity), device=q.device,
                     last_dim_contiguous=True)
    _check_alibi(alibi_slopes, B, Hq, q.device)
    _check_rotary(rotary_cos, rotary_sin, q, k, capacity)
    appended = k.shape[1] if k is not None else 0
    if capacity - appended < 0:
        raise ValueError(f"the cache holds {capacity} tokens per sequence, too few for the {appended} appended ones")
    named = {n: t for n, t in (("cache_seqlens", cache_seqlens), ("block_table", block_table),
                               ("cache_batch_idx", cache_batch_idx)) if t is not None}
    if named and values_checkable(next(iter(named.values())), check_values) and B > 0:
        _check_kvcache_values(named, n_slots, capacity, appended)
    return cache_seqlens, capacity, appended, tuple(named.values())


def _kvcache_scalars(window_size, softmax_scale, head_dim: int, softcap, causal, rotary_interleaved,
                     return_softmax_lse, flash_attn_lse, num_splits) -> tuple:
    """:func:`flash_attn_with_kvcache`'s scalars, checked in order: (left, right, scale, softcap, causal, ...)."""
    return (*_window(window_size), _scale(softmax_scale, head_dim), _softcap(softcap), check_bool("causal", causal),
            check_bool("rotary_interleaved", rotary_interleaved),
            check_bool("return_softmax_lse", return_softmax_lse), check_bool("flash_attn_lse", flash_attn_lse),
            check_positive_int("num_splits", num_splits, minimum=0, maximum=INT32_MAX))


def _check_kvcache_writes(q, k_cache, v_cache, k, v, out, **index) -> None:
    """The caches when k/v are appended (no self-overlap, no grad: copied in outside autograd), then ``out=``."""
    if k is not None:
        check_inference_only("flash_attn_with_kvcache", k=k, v=v, k_cache=k_cache, v_cache=v_cache)
        check_output("k_cache", k_cache, q=q, k=k, v=v, **index)
        check_output("v_cache", v_cache, k_cache=k_cache, q=q, k=k, v=v, **index)
    if out is not None:
        _check_out(out, q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, **index)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | int | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    key_padding_mask: torch.Tensor | None = None,
    check_values: bool | None = None,
    backend: str | None = None,
    flash_attn_lse: bool = False,
    out: torch.Tensor | None = None,
):
    """Attention of new queries against a KV cache: FlashAttention-2's ``flash_attn_with_kvcache`` (forward), with
    its positional order and defaults (``causal=False``), plus keyword-only extensions.

    q ``[B, Sq, Hq, D]``; caches ``[B_cache, S, Hk, D]`` (row ``cache_batch_idx[b]``, default b, per sequence), or
    paged ``[num_blocks, page, Hk, D]`` with ``block_table`` int32 ``[B, max_blocks]``. ``cache_seqlens`` int32
    ``[B]`` or an int = tokens already cached (None: the whole capacity; required with k/v). New ``k``/``v``
    ``[B, Snew, Hk, D]`` (any Snew) are written at ``cache_seqlens[b]..`` (in place; cache_seqlens itself is not
    advanced) and attended to: sequence b sees keys ``cache_leftpad[b] .. cache_seqlens[b] + Snew``, the queries
    the last positions (bottom-right). ``rotary_cos/sin`` ``[>= S, R/2]``: the new k is rotated at
    ``cache_seqlens[b] + s`` and q at ``cache_seqlens[b] + i`` (causal or windowed) or ``cache_seqlens[b]``,
    GPT-J pairs with ``rotary_interleaved`` else GPT-NeoX halves. ``softcap``, ``alibi_slopes`` (fp32 ``[Hq]`` or
    ``[B, Hq]``), ``window_size`` as FlashAttention. ``num_splits``: 0 = auto split-KV for long caches at small
    batch, 1 = off, n = force n key chunks. Returns out ``[B, Sq, Hq, D]``, and with ``return_softmax_lse``
    ``(out, lse)``, lse fp32 ``[B, Hq, Sq]`` (``-inf`` for rows that see no key; FlashAttention stores ``+inf``: see
    ``flash_attn_lse``).

    Extensions (keyword-only): ``key_padding_mask`` bool ``[B, capacity]`` (unit stride along keys), False =
    padding: padding keys are never attended and a query whose own key position is padding gives zeros (a padded
    batch in its padded layout: no unpadding, no host sync). ``check_values``: None checks the cache_seqlens,
    cache_batch_idx and block_table values only on CPU tensors, True on any device (one host sync), False never
    (see the module docstring: unchecked, a sequence that overflows the cache drops the tokens that do not fit and
    attends to the capacity's keys; out-of-range pages and cache rows are clamped). ``backend`` as every op.
    ``flash_attn_lse=True``: the lse exactly as flash-attn 2.8 returns it (``+inf`` for rows that see no key; with
    ALiBi under flash-attn's causal rule, its kernel's bias ``slope * (j - cache_leftpad)``, which moves each row's
    lse by ``slope * (i + Lk - Lq - cache_leftpad)``; the output is the same). :mod:`omni_fast.compat.flash_attn`
    sets it. ``out``: a ``[B, Sq, Hq, D]`` tensor of q's dtype (unit stride in D, sharing no memory with an input
    or the caches) written in place and returned (vLLM's fork's ``out=``).
    """
    cache_seqlens, capacity, appended, index = _check_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
        alibi_slopes, key_padding_mask, check_values)
    left, right, scale, cap, causal, rotary_interleaved, return_softmax_lse, fa_lse, num_splits = _kvcache_scalars(
        window_size, softmax_scale, q.shape[3], softcap, causal, rotary_interleaved, return_softmax_lse,
        flash_attn_lse, num_splits)
    _check_kvcache_writes(q, k_cache, v_cache, k, v, out, cache_seqlens=cache_seqlens, block_table=block_table,
                          key_padding_mask=key_padding_mask, cache_batch_idx=cache_batch_idx,
                          cache_leftpad=cache_leftpad, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                          alibi_slopes=alibi_slopes)
    # FlashAttention rotates q causally (at cache_seqlens + i) when causal or local (a window >= the cache: unbounded)
    rot_causal = causal or 0 <= left < capacity or 0 <= right < capacity
    be = _kvcache_op.resolve((q, k_cache, v_cache) + index, backend)
    if k is not None:
        _append_op(k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, rotary_cos, rotary_sin,
                   rotary_interleaved, be)
    args = (q, k_cache, v_cache, cache_seqlens, appended if cache_seqlens is not None else capacity, block_table,
            key_padding_mask, cache_batch_idx, cache_leftpad, alibi_slopes, rotary_cos, rotary_sin, scale, causal,
            left, right, cap, rotary_interleaved, rot_causal, num_splits, fa_lse,
            fa_lse and _fa_causal_alibi(alibi_slopes, causal, left, right, capacity))
    if out is None:
        out, lse = _kvcache_op(*args, be)
    else:
        lse = _kvcache_out_op(*args, out, be)
    return (out, lse.transpose(0, 1).contiguous()) if return_softmax_lse else out


__all__ = ["MAX_HEAD_DIM", "flash_attn_varlen", "flash_attn_with_kvcache"]
