"""FlashAttention-2 (flash-attn 2.8, ``flash_attn.flash_attn_interface``) entry points on omni-fast kernels.

Every function has flash-attn 2.8's parameter names, positional order and defaults, and returns what it returns:
``out``; with ``return_attn_probs=True`` ``(out, softmax_lse, S_dmask)`` where ``S_dmask`` is the empty tensor
flash-attn returns without dropout; ``flash_attn_with_kvcache`` with ``return_softmax_lse=True`` ``(out,
softmax_lse)``. lse is fp32, ``[B, Hq, Sq]`` (fixed-length and KV-cache calls) or ``[Hq, Tq]`` (varlen).

Semantics (one kernel family, :mod:`omni_fast.kernels.flash_attn`): causal masks and windows aligned bottom-right
(``-1`` = unbounded), GQA/MQA, ``softcap`` (``cap * tanh(s / cap)``), ``alibi_slopes`` fp32 ``[Hq]`` or
``[B, Hq]`` (bias ``-slope * |i + Lk - Lq - j|``), paged keys through ``block_table`` (any page size), the KV-cache
call's in-place append of k/v of any length, ``cache_batch_idx``, ``cache_leftpad``, rotary embedding of q and the
new k (``rotary_cos``/``rotary_sin``/``rotary_interleaved``), ``num_splits``. All of it happens inside the
kernels: no extra launch, no host sync.

Inference only: ``dropout_p > 0`` raises ``ValueError``; so does a call autograd would record (inputs that
require grad with grad mode on), as there is no backward. ``deterministic`` is accepted and has no effect (the
forward is deterministic). Differences to flash-attn are listed in ``docs/compat.md``.

The lse is flash-attn 2.8's exactly (``flash_attn_lse=True`` of the native ops, inside the kernels, no extra
launch): rows that see no key give zeros and ``lse = +inf`` (fixed-length, varlen and KV-cache calls, split-KV
or not); under flash-attn's causal rule (``causal=True``, or ``window_size=(-1, 0)``, with windows at least as
long as the keys counting as unbounded) its kernel adds the ALiBi bias as ``slope * (j - cache_leftpad)``
instead of the documented ``-slope * |i + Lk - Lq - j|``: the same output, an lse larger by
``slope * (i + Lk - Lq - cache_leftpad)``, which is what is returned here too. Non-causal ALiBi (windows
included) uses the documented bias in both.
"""

from __future__ import annotations

import torch

from .. import ops
from ..validation import FLOAT_DTYPES, check_float, check_inference_only, check_same_dtype, check_tensor

FLASH_ATTN_VERSION = "2.8"
# flash-attn's package attribute: code that gets this module as ``flash_attn`` (docs/compat.md's module swap) reads
# ``flash_attn.__version__`` for its version gates: the newest release (PyPI, checked 2026-12-07), whose
# ``flash_attn_interface.py`` is 2.8.3's and 2.8.3.post1's, byte for byte (the post releases changed the backward
# kernels and the build only).
__version__ = "2.8.3.post2"


def _contiguous_last(x):
    """flash-attn's ``maybe_contiguous`` (applied to q, k, v by every 2.8 function, and by vLLM's fork): a copy
    only when the last dimension is strided; anything else as it is (the checks below name it)."""
    return x.contiguous() if isinstance(x, torch.Tensor) and x.dim() > 0 and x.stride(-1) != 1 else x


def _fa_bool(name: str, value) -> bool:
    """A flash-attn flag (``causal``, ``rotary_interleaved``, ``return_softmax_lse``, ``return_attn_probs``,
    ``deterministic``) as flash-attn converts it: ``causal`` / ``rotary_interleaved`` reach a C++ ``bool`` (torch's
    op schema for the fixed-length and varlen calls, pybind11 for the KV-cache call, and vLLM's fork's ops), which
    converts any object with a truth value through the number protocol: ``1``, ``0.0``, a numpy scalar, ``None``
    (False), a one-element tensor (a host sync, as there); the return flags are read as Python truth values. A str,
    a list/tuple or a tensor of another size is refused here (TypeError naming ``name``): flash-attn's C++ refuses
    them, and a non-empty list taken as True would be a silent surprise."""
    if value is None:
        return False
    if hasattr(type(value), "__bool__"):  # str, list, tuple, dict have none (their truth is their length)
        try:
            return bool(value)
        except (RuntimeError, ValueError):  # a tensor / array of more or fewer than one element
            pass
    shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
    raise TypeError(f"{name} must be a bool (or a value with a truth value, as flash-attn converts it), got "
                    f"{type(value).__name__}{shape} ({value!r})")


def _fa_causal(causal) -> bool:
    """flash-attn's ``causal`` (:func:`_fa_bool`)."""
    return _fa_bool("causal", causal)


def _fa_softcap(softcap) -> float:
    """flash-attn's ``softcap``: a finite real number; its kernels cap only when it is > 0, so a negative value is
    off, as 0.0 (returned as 0.0 for the native ops, which refuse negatives)."""
    return max(check_float("softcap", softcap), 0.0)


def _inference_only(name: str, dropout_p, **tensors) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0:
        raise ValueError(f"dropout_p must be 0.0: omni_fast.compat.flash_attn.{name} is inference-only (no dropout, "
                         f"no backward), got {dropout_p}")
    check_inference_only(name, **tensors)


def _probs(out, lse, q, return_attn_probs: bool):
    """flash-attn's return arity: ``out`` or ``(out, lse, S_dmask)`` (S_dmask empty without dropout)."""
    if not _fa_bool("return_attn_probs", return_attn_probs):
        return out
    return out, lse, torch.empty((0,), dtype=q.dtype, device=q.device)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hk, D]`` (one dtype: fp16, bf16 or fp32) -> out ``[B, Sq, Hq, D]`` in
    q's dtype (lse fp32 ``[B, Hq, Sq]``).

    Runs as a KV-cache attention over k/v with no lengths (every sequence sees all Sk keys): no copy of k/v.
    """
    _inference_only("flash_attn_func", dropout_p, q=q, k=k, v=v)
    causal, softcap = _fa_causal(causal), _fa_softcap(softcap)
    q, k, v = (_contiguous_last(t) for t in (q, k, v))
    # named here as flash-attn names them (the KV-cache op below would call them k_cache / v_cache)
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4, last_dim_contiguous=True)
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4, device=q.device, last_dim_contiguous=True)
    check_tensor("k", k, shape=(q.shape[0], None, None, q.shape[3]))
    check_tensor("v", v, dtypes=FLOAT_DTYPES, shape=tuple(k.shape), device=q.device, last_dim_contiguous=True)
    check_same_dtype(q=q, k=k, v=v)
    out, lse = ops.flash_attn_with_kvcache(q, k, v, softmax_scale=softmax_scale, causal=causal,
                                           window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                           return_softmax_lse=True, flash_attn_lse=True)
    return _probs(out, lse, q, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv ``[B, S, 3, H, D]`` (fp16/bf16/fp32) -> out ``[B, S, H, D]`` in qkv's dtype (q/k/v are views of qkv, no
    copy)."""
    _check_packed("qkv", qkv, 5, 3)
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q ``[B, Sq, Hq, D]``, kv ``[B, Sk, 2, Hk, D]`` (one dtype: fp16/bf16/fp32) -> out ``[B, Sq, Hq, D]`` in q's
    dtype."""
    _check_packed("kv", kv, 5, 2)
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, seqused_k=None):
    """Packed sequences: q ``[Tq, Hq, D]``, k/v ``[Tk, Hk, D]`` (or pages ``[num_blocks, page, Hk, D]`` with
    ``block_table`` int32 ``[B, max_blocks]``), one dtype (fp16, bf16 or fp32), cu_seqlens int32 ``[B + 1]`` -> out
    ``[Tq, Hq, D]`` in q's dtype (lse fp32 ``[Hq, Tq]``).

    ``seqused_k`` (keyword-only, not in flash-attn 2.8's Python signature; its C++ op and vLLM's fork take it):
    int32 ``[B]`` key counts replacing ``cu_seqlens_k``'s. ``max_seqlen_q`` may also be None (omni-fast extension:
    the grid is then sized by the token count, no host sync).
    """
    _inference_only("flash_attn_varlen_func", dropout_p, q=q, k=k, v=v)
    causal, softcap = _fa_causal(causal), _fa_softcap(softcap)
    q, k, v = (_contiguous_last(t) for t in (q, k, v))
    out, lse = ops.flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                     return_lse=True, softcap=softcap, alibi_slopes=alibi_slopes,
                                     block_table=block_table, seqused_k=seqused_k, flash_attn_lse=True)
    return _probs(out, lse, q, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv ``[T, 3, H, D]`` (fp16/bf16/fp32), one cu_seqlens (int32 ``[B + 1]``) for queries and keys -> out
    ``[T, H, D]`` in qkv's dtype."""
    _check_packed("qkv", qkv, 4, 3)
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q ``[Tq, Hq, D]``, kv ``[Tk, 2, Hk, D]`` (one dtype: fp16/bf16/fp32), cu_seqlens_q/k int32 ``[B + 1]`` -> out
    ``[Tq, Hq, D]`` in q's dtype."""
    _check_packed("kv", kv, 4, 2)
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Append k/v ``[B, Snew, Hk, D]`` (any length, rotated by rotary_cos/sin when given) to the caches
    ``[B_cache, S, Hk, D]`` (or pages ``[num_blocks, page, Hk, D]`` with ``block_table`` int32 ``[B, max_blocks]``)
    at ``cache_seqlens`` (int32 ``[B]`` or an int) in place, then attend q ``[B, Sq, Hq, D]`` to keys
    ``cache_leftpad[b] .. cache_seqlens[b] + Snew`` -> out ``[B, Sq, Hq, D]`` in q's dtype (lse fp32
    ``[B, Hq, Sq]``). q, k/v and the caches share one dtype (fp16, bf16 or fp32). See
    :func:`omni_fast.ops.flash_attn_with_kvcache`."""
    check_inference_only("flash_attn_with_kvcache", q=q, k=k, v=v)
    causal, softcap = _fa_causal(causal), _fa_softcap(softcap)
    rotary_interleaved = _fa_bool("rotary_interleaved", rotary_interleaved)
    return_softmax_lse = _fa_bool("return_softmax_lse", return_softmax_lse)
    q, k, v = (_contiguous_last(t) for t in (q, k, v))  # (not the caches: written in place, flash-attn asserts)
    # ... and, as flash-attn 2.8 here, the index tensors (a strided block_table / cache_batch_idx is copied)
    cache_batch_idx, block_table = _contiguous_last(cache_batch_idx), _contiguous_last(block_table)
    return ops.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                       cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                                       window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
                                       return_softmax_lse, flash_attn_lse=True)


def _check_packed(name: str, t, ndim: int, n: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim or t.shape[-3] != n:
        dims = ("B, S, " if ndim == 5 else "T, ") + f"{n}, H, D"
        raise ValueError(f"{name} must have shape [{dims}], got {list(t.shape)}")


__all__ = ["FLASH_ATTN_VERSION", "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_with_kvcache"]
