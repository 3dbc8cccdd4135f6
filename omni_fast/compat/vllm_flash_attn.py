"""vLLM's FlashAttention fork (``vllm.vllm_flash_attn``) entry points on omni-fast kernels.

vLLM's FlashAttention backend does not call flash-attn 2.8 but its own fork, the package ``vllm_flash_attn`` of
github.com/vllm-project/flash-attention (file ``vllm_flash_attn/flash_attn_interface.py``), with other signatures:
``max_seqlen_q`` before ``cu_seqlens_q``, ``cu_seqlens_k`` optional beside ``seqused_k``, ``window_size=None``,
``out=``, ``fa_version``, FA3-only arguments. This module has the fork's public functions with its exact parameter
lists, defaults and return arity as vLLM 0.34.0 ships it (``vllm/vllm_flash_attn/flash_attn_interface.py`` of the
0.34.0 sdist, built from the fork at ``d8dca8f0``; earlier read at ``617264c1``, 2026-08-06);
:func:`flash_attn_with_kvcache`, which the fork removed in its PR #107 (2025-11-13; vLLM releases built before
then, the v0.11 line, ship it), as it was at ``8e1b01d5`` just before. vLLM itself imports
``flash_attn_varlen_func`` and ``get_scheduler_metadata`` (``vllm/v1/attention/backends/fa_utils.py``) and the
two version helpers (``is_fa_version_supported``, ``fa_version_unsupported_reason``); the fork's own
``get_flash_attn_version`` does not exist (vLLM's is in ``fa_utils``). vLLM 0.34 also imports
``compile_flash_attn_varlen_func_from_specs`` (FA4's ahead-of-time compile; raises here, FA4 is not offered) and
the package exports ``FA2_AVAILABLE`` / ``FA3_AVAILABLE``.

Semantics (the fork's): returns ``out``, or ``(out, softmax_lse)`` with ``return_softmax_lse=True`` (lse fp32
``[Hq, Tq]`` for varlen, ``[B, Hq, Sq]`` for the KV cache); ``return_attn_probs`` is ignored, as there.
``out=`` is written in place by the kernel and returned (shape/dtype/device of q, no memory shared with an input).
``window_size=None`` means ``(-1, -1)``. Paged keys: ``block_table`` with ``seqused_k`` (and no
``cu_seqlens_k``), as vLLM calls it. ``fa_version`` 2 or 3 run the same kernels; the version decides what the fork
decides: FA2 returns flash-attn 2.8's lse (``+inf`` for rows that see no key), rejects ``num_splits > 1`` and
``s_aux``, and runs no dropout (``dropout_p > 0`` raises here: inference only); FA3 returns ``-inf`` for such rows
(its ``softmax.h``), rejects ALiBi and ignores ``dropout_p`` (it takes none), ``num_splits`` is a hint, and
``s_aux`` ``[Hq]`` adds attention sinks: one logit per head (natural log, not scaled) joins the softmax
denominator as a key with a zero value, inside the kernel (FA3's ``finalize_aux``: out and lse include it, a row
without keys gets zeros and ``lse = s_aux[h]``); the fork wants it bf16, any float dtype is accepted here.
``scheduler_metadata`` is accepted and ignored (it only schedules FA3's CTAs); ``q_descale`` / ``k_descale`` /
``v_descale`` are ignored for fp16/bf16 tensors (FA3 reads them only for fp8 ones; vLLM always passes them).

Not implemented (``NotImplementedError`` naming the argument): fp8 q/k/v (FA3's descaled fp8 attention),
``q_v``, context parallelism (``cp_world_size > 1``), ``fa_version=4``, the sparse functions. Differences to the
fork are listed in ``docs/compat.md``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from .. import ops
from .flash_attn import _contiguous_last  # the fork's maybe_contiguous, as flash-attn's
from .flash_attn import _fa_bool, _fa_causal, _fa_softcap  # the fork's ops take them as flash-attn's (bool / softcap > 0)
from ..validation import FLOAT_DTYPES, check_float, check_inference_only, check_positive_int, check_tensor

__version__ = "2.7.2.post1"  # the fork's package version at the commits named above
VLLM_FLASH_ATTN_COMMIT = "d8dca8f06c7458a0c0e79dd9400c0446a4e77b9c"  # vLLM 0.34.0's pin (its cmake)
KVCACHE_COMMIT = "8e1b01d56210dc72030a2d0d41c2d8d266ba6309"  # the last with flash_attn_with_kvcache
DEFAULT_FA_VERSION = 2
FA_VERSIONS = (2, 3)  # what the fork's flash_attn_varlen_func runs (4 is a separate CuTe DSL package)
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))


# --- version helpers (vLLM: ``vllm.vllm_flash_attn.flash_attn_interface``) ---------------------------------------


def _version(fa_version) -> int:
    """The fork's ``assert fa_version in [2, 3, 4]`` as a ValueError naming the argument."""
    v = check_positive_int("fa_version", fa_version, minimum=0)
    if v not in (2, 3, 4):
        raise ValueError(f"fa_version must be 2, 3 or 4, got {v}")
    return v


def fa_version_unsupported_reason(fa_version: int, *, device=None) -> Optional[str]:
    """None when ``fa_version`` runs here (2 and 3, on any device the omni-fast backends run on), else why not.
    ``device``: the pre-0.34 fork's second parameter, keyword-only now (vLLM 0.34's takes ``fa_version`` only)."""
    if _version(fa_version) == 4:
        return ("FA4 (the CuTe DSL kernels for Blackwell) is not offered by omni_fast.compat.vllm_flash_attn; "
                "fa_version 2 and 3 run the same omni-fast kernels")
    return None


def is_fa_version_supported(fa_version: int, *, device=None) -> bool:
    """Whether :func:`flash_attn_varlen_func` runs with this ``fa_version`` (2 and 3: yes; 4: no)."""
    return fa_version_unsupported_reason(fa_version, device=device) is None


FA2_AVAILABLE = True  # the fork's flags (vLLM 0.34's package __init__ imports the first two)
FA3_AVAILABLE = True
FA4_AVAILABLE = False


def compile_flash_attn_varlen_func_from_specs(
    *, q_shape, k_shape, v_shape, q_dtype, v_stride=None, k_stride=None, cu_seqlens_q_shape=None,
    cu_seqlens_k_shape=None, max_seqlen_q=None, max_seqlen_k=None, dropout_p: float = 0.0, softmax_scale=None,
    causal=False, window_size: Optional[List[int]] = None, deterministic=False, return_softmax_lse=False,
    num_splits: int = 0, fa_version: int = DEFAULT_FA_VERSION, seqused_k_shape=None, page_table_shape=None,
    softcap: Optional[float] = None,
) -> None:
    """vLLM 0.34's FA4 ahead-of-time compile: ``ValueError`` for ``fa_version != 4`` (as the fork), else
    ``NotImplementedError`` (FA4 is not offered; vLLM only calls this after ``is_fa_version_supported(4)``)."""
    if _version(fa_version) != 4:
        raise ValueError(f"Compile-only FlashAttention is only supported for FA4, got fa_version={fa_version}")
    raise NotImplementedError("compile_flash_attn_varlen_func_from_specs: FA4 (the CuTe DSL kernels) is not offered "
                              "by omni_fast.compat.vllm_flash_attn")


def _varlen_version(fa_version) -> int:
    v = check_positive_int("fa_version", fa_version, minimum=0)
    if v not in FA_VERSIONS:  # the fork's varlen: ValueError("Unsupported FA version")
        raise ValueError(f"Unsupported FA version: fa_version must be 2 or 3, got {v}")
    return v


# --- the FA3 scheduler ----------------------------------------------------------------------------------------


def get_scheduler_metadata(
    batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
    cache_seqlens: torch.Tensor,
    qkv_dtype=torch.bfloat16,
    headdim_v=None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    page_size: Optional[int] = None,
    max_seqlen_k_new=0,
    causal=False,
    window_size=(-1, -1),
    has_softcap=False,
    num_splits=0,
    pack_gqa=None,
    sm_margin=0,
):
    """FA3's ahead-of-time tile schedule: the omni-fast kernels need none, so this returns None (as vLLM's ROCm
    stub does; vLLM passes None on as ``scheduler_metadata`` and skips its CUDA-graph copy of it). The arguments
    are checked for type only."""
    for name, value in (("batch_size", batch_size), ("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k),
                        ("num_heads_q", num_heads_q), ("num_heads_kv", num_heads_kv), ("headdim", headdim),
                        ("num_splits", num_splits), ("sm_margin", sm_margin)):
        check_positive_int(name, value, minimum=0)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    _window(window_size)
    return None


# --- attention ------------------------------------------------------------------------------------------------


def _window(window_size) -> Tuple[int, int]:
    """``None`` = ``(-1, -1)``; else a pair (the fork: ``assert len(window_size) == 2``)."""
    if window_size is None:
        return (-1, -1)
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be None or a pair (left, right), got {window_size!r}") from None
    return left, right


def _check_tensor_or_none(**named) -> None:
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")


def _not_implemented(q, k, q_v, cp_world_size, cp_rank, cp_tot_seqused_k) -> None:
    """What the omni-fast kernels do not compute, whatever fa_version: a NotImplementedError naming it."""
    if q_v is not None:
        raise NotImplementedError("q_v (FA3's separate value-side query, for MLA) is not implemented in "
                                  "omni_fast.compat.vllm_flash_attn")
    cp_world_size = check_positive_int("cp_world_size", cp_world_size, minimum=1)
    cp_rank = check_positive_int("cp_rank", cp_rank, minimum=0)
    if cp_world_size != 1 or cp_rank != 0 or cp_tot_seqused_k is not None:
        raise NotImplementedError("context parallelism (cp_world_size, cp_rank, cp_tot_seqused_k) is not "
                                  "implemented in omni_fast.compat.vllm_flash_attn")
    for name, t in (("q", q), ("k", k)):
        if isinstance(t, torch.Tensor) and t.dtype in _FP8:
            raise NotImplementedError(f"fp8 {name} (FA3's fp8 attention with q_descale/k_descale/v_descale) is not "
                                      f"implemented in omni_fast.compat.vllm_flash_attn; pass fp16/bf16 tensors")


class FA2Unsupported(NotImplementedError, ValueError):
    """What the fork's FA2 path refuses (``s_aux``, ``num_splits > 1``, ...): the fork's NotImplementedError, and a
    ValueError too, as the refusal is of an argument combination (``fa_version=2`` with that argument)."""


def _fa2_rules(fa: int, scheduler_metadata, q_descale, k_descale, v_descale, s_aux, num_splits: int) -> None:
    """The fork's FA2 refusals (``fa_version=2``)."""
    if fa == 2:
        if scheduler_metadata is not None and q_descale is not None and k_descale is not None \
                and v_descale is not None:
            raise FA2Unsupported("FA2 (fa_version=2) does not support scheduler_metadata, q_descale, k_descale, "
                                 "v_descale (all four given)")
        if s_aux is not None:
            raise FA2Unsupported("FA2 (fa_version=2) does not support s_aux (attention sinks: use fa_version=3)")
        if num_splits > 1:
            raise FA2Unsupported(f"FA2 (fa_version=2) does not support num_splits > 1, got num_splits={num_splits}")


class FA4Only(NotImplementedError, ValueError):
    """An FA4-only argument of vLLM 0.34's varlen call given with ``fa_version`` 2 or 3: the fork asserts
    (``output_scale``, ``gather_kv_*``) or raises ``NotImplementedError`` (``mask_mod``, ``aux_tensors``) there, or
    ignores it (``block_sparse_tensors``, ``aux_tensor_leading_dims``, ``dynamic_causal``; refused here rather
    than silently dropped, as ``q_v``). Both a ``NotImplementedError`` and a ``ValueError``."""


def _fa4_only(fa: int, **named) -> None:
    """Non-None FA4-only arguments raise :class:`FA4Only` naming the first."""
    for arg, value in named.items():
        if value is not None:
            raise FA4Only(f"{arg} is only supported by FA4 (fa_version=4; not offered by "
                          f"omni_fast.compat.vllm_flash_attn), got fa_version={fa}")


def _dropout(fa: int, dropout_p) -> None:
    """FA2 would apply dropout (refused here: inference only); FA3 takes no dropout and ignores the value."""
    p = check_float("dropout_p", dropout_p, minimum=0.0, maximum=1.0)
    if fa == 2 and p != 0:
        raise ValueError(f"dropout_p must be 0.0: omni_fast.compat.vllm_flash_attn is inference-only (no dropout, "
                         f"no backward), got {p}")


def flash_attn_varlen_func(
    q,
    k,
    v,
    max_seqlen_q,
    cu_seqlens_q,
    max_seqlen_k,
    cu_seqlens_k=None,
    seqused_k=None,
    q_v=None,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size: Optional[List[int]] = None,
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
    return_softmax_lse=False,
    out=None,
    scheduler_metadata=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    num_splits: int = 0,
    output_scale=None,
    fa_version: int = DEFAULT_FA_VERSION,
    s_aux=None,
    cp_world_size=1,
    cp_rank=0,
    cp_tot_seqused_k=None,
    mask_mod=None,
    block_sparse_tensors=None,
    aux_tensors=None,
    aux_tensor_leading_dims=None,
    dynamic_causal=None,
    gather_kv_indices=None,
    gather_kv_valid_length=None,
):
    """Packed sequences, vLLM's call: q ``[Tq, Hq, D]``, cu_seqlens_q int32 ``[B + 1]``; keys either packed k/v
    ``[Tk, Hk, D]`` with ``cu_seqlens_k`` int32 ``[B + 1]``, or paged k/v ``[num_blocks, page, Hk, D]`` with
    ``block_table`` int32 ``[B, max_blocks]`` and ``seqused_k`` int32 ``[B]`` (keys of sequence b: its first
    ``seqused_k[b]`` logical rows). Causal masks and windows bottom-right, GQA/MQA, softcap, ALiBi (FA2),
    attention sinks ``s_aux`` (FA3).
    Returns out ``[Tq, Hq, D]`` (``out`` itself when given), with ``return_softmax_lse`` also lse fp32
    ``[Hq, Tq]``. See the module docstring for the fa_version rules and what is not implemented.
    """
    name = "flash_attn_varlen_func"
    fa = _varlen_version(fa_version)
    check_inference_only(name, q=q, k=k, v=v)
    _not_implemented(q, k, q_v, cp_world_size, cp_rank, cp_tot_seqused_k)
    _fa4_only(fa, output_scale=output_scale, gather_kv_indices=gather_kv_indices,
              gather_kv_valid_length=gather_kv_valid_length, mask_mod=mask_mod, aux_tensors=aux_tensors,
              block_sparse_tensors=block_sparse_tensors, aux_tensor_leading_dims=aux_tensor_leading_dims,
              dynamic_causal=dynamic_causal)
    _check_tensor_or_none(scheduler_metadata=scheduler_metadata, q_descale=q_descale, k_descale=k_descale,
                          v_descale=v_descale, s_aux=s_aux, out=out)
    num_splits = check_positive_int("num_splits", num_splits, minimum=0)
    _fa2_rules(fa, scheduler_metadata, q_descale, k_descale, v_descale, s_aux, num_splits)
    _dropout(fa, dropout_p)
    if cu_seqlens_k is None and seqused_k is None:
        raise ValueError("cu_seqlens_k or seqused_k must be provided")
    if cu_seqlens_k is not None and seqused_k is not None:
        raise ValueError("cu_seqlens_k and seqused_k cannot be provided at the same time")
    if block_table is not None and seqused_k is None:
        raise ValueError("seqused_k must be provided if block_table is provided")
    if seqused_k is not None and block_table is None:
        # the fork hands its kernel an uninitialised cu_seqlens_k here (key offsets undefined): refused
        raise ValueError("seqused_k without block_table: packed k/v need cu_seqlens_k (seqused_k is for paged k/v)")
    if s_aux is not None and isinstance(q, torch.Tensor) and q.dim() == 3:  # the fork's s_aux check, any float
        check_tensor("s_aux", s_aux, dtypes=FLOAT_DTYPES, shape=(q.shape[1],), device=q.device, contiguous=True)
    if fa == 3 and alibi_slopes is not None:
        raise ValueError("alibi_slopes is not supported with fa_version=3 (as in the fork: Alibi is not supported "
                         "in FA3); use fa_version=2")
    return_softmax_lse = _fa_bool("return_softmax_lse", return_softmax_lse)
    causal, softcap = _fa_causal(causal), _fa_softcap(softcap)
    q, k, v = (_contiguous_last(x) for x in (q, k, v))
    # paged: the kernel takes the key counts from seqused_k; cu_seqlens_q stands in for the unused cu_seqlens_k
    # (the fork passes an uninitialised tensor of its shape): no allocation, no launch
    res, lse = ops.flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, softmax_scale=softmax_scale, causal=causal,
                                     window_size=_window(window_size), return_lse=True, softcap=softcap,
                                     alibi_slopes=alibi_slopes, block_table=block_table, seqused_k=seqused_k,
                                     flash_attn_lse=fa == 2, out=out, sinks=s_aux)
    return (res, lse) if return_softmax_lse else res


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[(int, torch.Tensor)]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
    *,
    out=None,
    scheduler_metadata=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    fa_version: int = DEFAULT_FA_VERSION,
    s_aux=None,
    cp_world_size=1,
    cp_rank=0,
    cp_tot_seqused_k=None,
):
    """The fork's KV-cache call as of ``8e1b01d5`` (removed from the fork afterwards): flash-attn 2.8's positional
    parameters (:func:`omni_fast.compat.flash_attn.flash_attn_with_kvcache`: in-place append of k/v at
    ``cache_seqlens``, rotary, ``cache_batch_idx``, ``cache_leftpad``, paged caches, ``num_splits``) plus the
    keyword-only ``out=`` and FA3 arguments. The fork always ran its FA2 kernel here, whatever ``fa_version``:
    so do we (flash-attn 2.8's lse, ``s_aux`` refused, dropout n/a); ``fa_version`` must still be 2 or 3.
    q ``[B, Sq, Hq, D]``, caches ``[B_cache, S, Hk, D]`` (or paged ``[num_blocks, page, Hk, D]``), new k/v
    ``[B, Snew, Hk, D]``, one dtype (fp16, bf16 or fp32). Returns out ``[B, Sq, Hq, D]`` in q's dtype (``out``
    itself when given), with ``return_softmax_lse`` also lse fp32 ``[B, Hq, Sq]``.
    """
    name = "flash_attn_with_kvcache"
    _varlen_version(fa_version)
    check_inference_only(name, q=q, k=k, v=v)
    _not_implemented(q, k_cache, None, cp_world_size, cp_rank, cp_tot_seqused_k)
    _check_tensor_or_none(scheduler_metadata=scheduler_metadata, q_descale=q_descale, k_descale=k_descale,
                          v_descale=v_descale, s_aux=s_aux, out=out)
    _fa2_rules(2, scheduler_metadata, q_descale, k_descale, v_descale, s_aux, 0)
    causal, softcap = _fa_causal(causal), _fa_softcap(softcap)
    rotary_interleaved = _fa_bool("rotary_interleaved", rotary_interleaved)
    return_softmax_lse = _fa_bool("return_softmax_lse", return_softmax_lse)
    q, k, v = (_contiguous_last(x) for x in (q, k, v))
    cache_batch_idx, block_table = _contiguous_last(cache_batch_idx), _contiguous_last(block_table)  # as the fork
    return ops.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                       cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                                       window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
                                       return_softmax_lse, flash_attn_lse=True, out=out)


# --- the sparse (vertical + slash) functions: exported by the fork, not implemented --------------------------


def sparse_attn_func(q, k, v, block_count, block_offset, column_count, column_index, dropout_p=0.0,
                     softmax_scale=None, causal=False, softcap=0.0, alibi_slopes=None, deterministic=False,
                     return_attn_probs=False, *, return_softmax_lse=False, out=None):
    """The fork's vertical-and-slash sparse attention (MInference): not implemented (importable for code that
    imports it with the module)."""
    raise NotImplementedError("sparse_attn_func (block_count/block_offset/column_count/column_index sparsity) is "
                              "not implemented in omni_fast.compat.vllm_flash_attn")


def sparse_attn_varlen_func(q, k, v, block_count, block_offset, column_count, column_index, cu_seqlens_q,
                            cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                            causal=False, softcap=0.0, alibi_slopes=None, deterministic=False,
                            return_attn_probs=False, *, return_softmax_lse=False, out=None):
    """The varlen form of :func:`sparse_attn_func`: not implemented."""
    raise NotImplementedError("sparse_attn_varlen_func (block_count/block_offset/column_count/column_index "
                              "sparsity) is not implemented in omni_fast.compat.vllm_flash_attn")


__all__ = ["DEFAULT_FA_VERSION", "FA2Unsupported", "FA4Only", "FA2_AVAILABLE", "FA3_AVAILABLE", "FA4_AVAILABLE",
           "VLLM_FLASH_ATTN_COMMIT", "compile_flash_attn_varlen_func_from_specs", "fa_version_unsupported_reason",
           "flash_attn_varlen_func", "flash_attn_with_kvcache", "get_scheduler_metadata", "is_fa_version_supported",
           "sparse_attn_func", "sparse_attn_varlen_func"]
