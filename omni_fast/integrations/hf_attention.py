"""transformers ``AttentionInterface`` entry for omni-fast's flash attention (name ``"omni_fast"``).

:func:`register` adds :func:`omni_fast_attention_forward` to transformers' ``AttentionInterface`` and, for the same
name, :func:`omni_fast_mask` (transformers' FlashAttention mask rule, plus static-cache tails) to the
``AttentionMaskInterface``: models then hand the attention function either no mask (pure causal / sliding-window /
bidirectional pattern, which the kernel applies itself) or the 2-D padding mask ``[B, kv_len]``.

What the function handles (query ``[B, Hq, Sq, D]``, key/value ``[B, Hk, Sk, D]``, output ``[B, Sq, Hq, D]``):

- **no mask**: causal (``is_causal`` kwarg, else ``module.is_causal``) aligned bottom-right, so keys that include a
  transformers ``Cache``'s past work for chunked prefill and decoding; ``sliding_window=w`` means the last ``w``
  keys up to and including the query's own position (``window_size=(w - 1, 0)``; bidirectional ``(w-1, w-1)``);
- **2-D padding mask** (bool/int ``[B, L]``, 1 = real token): the batch runs in its padded layout with the mask as
  the kernel's key padding mask (:func:`omni_fast.ops.flash_attn_with_kvcache` with ``key_padding_mask``; no
  unpadding gather, no host sync); padded query rows return zeros (eager returns an average over masked keys
  there, a meaningless value either way). A mask shorter than the keys (a static cache's unused tail) limits the
  keys to its length;
- **packed sequences**: ``cu_seq_lens_q``/``cu_seq_lens_k`` (transformers' FlashAttention kwargs, with
  ``max_length_q``/``max_length_k``) or ``cu_seqlens`` with batch 1: block-diagonal varlen attention; without
  them, batch-1 ``position_ids`` that restart at 0 (FlashAttention's packing rule in transformers, applied when
  queries and keys have the same length) split the row into sequences;
- **any other mask** (a 4-D bool or additive float mask built by the caller): not expressible as FlashAttention
  parameters, so it falls back to the masked reference computation (eager arithmetic with that mask).

Autograd: the kernels have no backward. A call that autograd records (grad enabled and query/key/value requiring
grad: a model from ``from_pretrained`` called outside ``torch.no_grad``, or fine-tuning through a patched model)
returns the kernel's output and, only if a backward runs, recomputes the same masks in pure PyTorch from the saved
q/k/v (the reference's masked attention; one host sync for cu_seqlens) and backpropagates through that.

Backend: the one :func:`omni_fast.patch` pinned on the calling module (``module._omni_fast_backend``, from
``patch(model, backend=...)``), else the ambient choice (``use_backend`` block, ``OMNI_FAST_BACKEND``, auto).

Note: the Qwen-Omni audio and vision encoders only pass ``cu_seq_lens_*`` to implementations whose name contains
"flash"; under ``"omni_fast"`` transformers' own forward splits the packed sequence per window on the host and
calls this function once per window (correct, one launch per window). :func:`omni_fast.patch` swaps those
attention forwards for one that calls this function once with ``cu_seq_lens_*``: one varlen launch per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import pinned_backend
from ..validation import records_grad
from .hf_compat import is_paged_cache

_UNSUPPORTED = ("softcap", "s_aux", "position_bias")


def _window(sliding_window: int | None, causal: bool) -> tuple[int, int]:
    if sliding_window is None or sliding_window <= 0:
        return (-1, 0) if causal else (-1, -1)
    w = int(sliding_window) - 1
    return (w, 0) if causal else (w, w)


def _cu_from_kwargs(kwargs: dict):
    cu_q = kwargs.get("cu_seq_lens_q", kwargs.get("cu_seqlens_q", kwargs.get("cu_seqlens")))
    cu_k = kwargs.get("cu_seq_lens_k", kwargs.get("cu_seqlens_k", kwargs.get("cu_seqlens", cu_q)))
    return cu_q, cu_k


def _max_len(given) -> int | None:
    """The longest sequence when the caller gave it as a Python int, else None: the varlen launch is then sized from
    the token count, so no host sync is spent computing the maximum (transformers' 4.57-era encoders passed it as a
    0-d device tensor)."""
    return int(given) if isinstance(given, int) and not isinstance(given, bool) else None


def _cu_from_positions(position_ids, T: int):
    """cu_seqlens of sequences packed in one row (positions restarting at 0), or None if not packed.

    FlashAttention's rule in transformers: batch 1, several increasing runs, each starting at position 0.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape != (1, T):
        return None
    p = position_ids[0]
    if torch.equal(p, torch.arange(T, device=p.device) + p[0]):
        return None
    starts = (p == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        return None
    return torch.cat([starts, starts.new_tensor([T])]).to(torch.int32)


def _packed(query, key, value, cu_q, cu_k, kwargs, scale, window, backend=None):
    """Batch-1 packed sequences: [1, H, T, D] -> varlen over cu_seqlens."""
    from ..ops import flash_attn_varlen

    if query.shape[0] != 1:
        raise ValueError(f"cu_seqlens attention expects batch 1 (packed tokens), got batch {query.shape[0]}")
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    out = flash_attn_varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k,
                            _max_len(kwargs.get("max_length_q")), _max_len(kwargs.get("max_length_k")),
                            softmax_scale=scale, window_size=window, backend=backend)
    return out[None]


def _padded(query, key, value, mask2d, scale, window, backend=None):
    """A padded batch in its own layout: the 2-D mask becomes the kernel's key padding mask (no unpadding).

    Keys are the first ``L = min(mask length, Sk)`` rows of each batch row (a mask shorter than the keys: a static
    cache's unfilled tail), the queries their last ``Sq`` positions, so causal and sliding windows count positions
    in the padded layout exactly as eager does. Padding queries give zeros (eager returns an average over masked
    keys there, a meaningless value either way). No host sync: no ``nonzero``, no ``max``.
    """
    from ..ops import flash_attn_with_kvcache

    B, Hq, Sq, D = query.shape
    Sk = key.shape[2]
    L = min(mask2d.shape[1], Sk)
    real = mask2d[:, mask2d.shape[1] - L:].bool()  # (not [:, -L:], which is the whole mask when L = 0)
    if L < Sk:
        real = F.pad(real, (0, Sk - L), value=False)
    lens = torch.full((B,), L, dtype=torch.int32, device=query.device)
    return flash_attn_with_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                   cache_seqlens=lens, causal=window[1] == 0, window_size=window, softmax_scale=scale,
                                   key_padding_mask=real, backend=backend)


def _masked_fallback(query, key, value, mask, scale):
    """Eager arithmetic with an arbitrary 4-D mask (bool: True = attend; float: additive)."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, k.transpose(2, 3)) * scale
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(p, v).transpose(1, 2).contiguous()


def _differentiable(query, key, value, attention_mask, cu_q, cu_k, scale, window):
    """The same attention in pure PyTorch (the reference's masked attention), for calls that autograd records: the
    kernels have no backward. Masks as the kernel paths read them (cu_seqlens, a 2-D padding mask in the padded
    layout, none); a 4-D mask takes :func:`_masked_fallback`, itself differentiable."""
    from ..reference.attention import masked_attention, varlen_mask, visible

    def one(q, k, v, mask):  # [Hq, Sq, D] / [Hk, Sk, D] -> [Sq, Hq, D]
        # a query without a visible key (left padding) sees every key instead: its output is meaningless either
        # way (the kernel gives zeros, eager an average), and an all-masked softmax row would send NaN gradients
        mask = mask | ~mask.any(-1, keepdim=True)
        return masked_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask, scale)[0]

    causal = window[1] == 0
    if cu_q is not None:
        return one(query[0], key[0], value[0], varlen_mask(cu_q, cu_k, causal=causal, window_size=window))[None]
    B, _, Sq, _ = query.shape
    Sk = key.shape[2]
    pattern = visible(Sq, Sk, window[0], 0 if causal else window[1], query.device)
    if attention_mask is not None and attention_mask.dim() == 2:  # padded keys, as :func:`_padded` reads them
        L = min(attention_mask.shape[1], Sk)
        real = F.pad(attention_mask[:, attention_mask.shape[1] - L:].bool(), (0, Sk - L), value=False)
        return torch.stack([one(query[b], key[b], value[b], pattern & real[b][None]) for b in range(B)])
    return torch.stack([one(query[b], key[b], value[b], pattern) for b in range(B)])


def omni_fast_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query ``[B, Hq, Sq, D]``, key/value ``[B, Hk, Sk, D]`` -> (``[B, Sq, Hq, D]``,
    None). See the module docstring for the masks it accepts."""
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"omni_fast attention does not support {name!r}")
    # transformers >= 5.24 may hand the layer's KV cache on as ``cache=`` (already updated by the caller: key/value
    # include the past). Only the continuous-batching paged cache changes what key/value mean.
    if is_paged_cache(kwargs.get("cache")):
        raise NotImplementedError("omni_fast attention does not support transformers' continuous batching "
                                  "(PagedAttentionCache); use omni_fast.ops.flash_attn_with_kvcache with a block_table")
    if dropout and module.training:
        raise ValueError("omni_fast attention is inference-only (dropout > 0 in training mode)")
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = _window(sliding_window, causal)
    backend = pinned_backend(module)

    cu_q, cu_k = _cu_from_kwargs(kwargs)
    if cu_q is not None and attention_mask is not None:
        raise ValueError("omni_fast attention takes either cu_seqlens or an attention_mask, not both")
    if cu_q is None and attention_mask is None and query.shape[0] == 1 and 1 < query.shape[2] == key.shape[2]:
        # several sequences packed in one row, told apart by their position ids (no max lengths given then)
        cu_q = cu_k = _cu_from_positions(kwargs.get("position_ids"), query.shape[2])
        kwargs = {}
    if attention_mask is not None and attention_mask.dim() != 2:
        return _masked_fallback(query, key, value, attention_mask, scale), None  # (pure PyTorch: differentiable)

    def kernel(q, k, v):
        return _kernel_attention(q, k, v, attention_mask, cu_q, cu_k, kwargs, scale, window, backend)

    if records_grad(query, key, value):
        def recompute(q, k, v):
            return _differentiable(q, k, v, attention_mask, cu_q, cu_k, scale, window)
        return _KernelWithRecomputedGrad.apply(query, key, value, kernel, recompute), None
    return kernel(query, key, value), None


def _kernel_attention(query, key, value, mask2d, cu_q, cu_k, kwargs, scale, window, backend):
    """The kernel launch for a packed batch (cu_seqlens), no mask, or a 2-D padding mask."""
    from ..ops import flash_attn_with_kvcache

    if cu_q is not None:
        return _packed(query, key, value, cu_q, cu_k, kwargs, scale, window, backend)
    if mask2d is None:
        # cache_seqlens None: every row attends to all Sk keys (no lengths tensor to build)
        return flash_attn_with_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                       causal=window[1] == 0, window_size=window, softmax_scale=scale,
                                       backend=backend)
    return _padded(query, key, value, mask2d, scale, window, backend)


class _KernelWithRecomputedGrad(torch.autograd.Function):
    """The kernel's output forward; backward recomputes the attention in pure PyTorch (:func:`_differentiable`)
    from the saved q/k/v and backpropagates through that (FlashAttention's recompute idea, with the reference's
    arithmetic): forward stays as fast as without autograd, and only a backward pays the O(S^2) recompute."""

    @staticmethod
    def forward(ctx, query, key, value, kernel, recompute):
        ctx.save_for_backward(query, key, value)
        ctx.recompute = recompute
        return kernel(query, key, value)

    @staticmethod
    def backward(ctx, grad_out):
        saved = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = ctx.recompute(*saved)
        wanted = [t for t in saved if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return tuple(next(grads) if t.requires_grad else None for t in saved) + (None, None)


def omni_fast_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                   mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers mask builder for ``"omni_fast"``: ``None`` (pure pattern) or a 2-D padding mask ``[B, L]``.

    transformers' FlashAttention rule (``flash_attention_mask``: the 2-D mask, or None when nothing is padded),
    plus one case FlashAttention leaves to the caller: keys longer than the tokens seen so far (the unfilled tail of
    a ``StaticCache``) get a mask of the filled length, so the kernel never attends to empty slots.
    """
    from transformers.masking_utils import flash_attention_mask

    mask = flash_attention_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                                attention_mask=attention_mask, **kwargs)
    if mask is None:
        filled = int(q_offset) + q_length - int(kv_offset)
        if 0 < filled < kv_length:
            mask = torch.ones(batch_size, filled, dtype=torch.bool, device=kwargs.get("device", "cpu"))
    return mask


def register(name: str) -> None:
    """Register :func:`omni_fast_attention_forward` and :func:`omni_fast_mask` under ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, omni_fast_attention_forward)
    AttentionMaskInterface.register(name, omni_fast_mask)


__all__ = ["omni_fast_attention_forward", "omni_fast_mask", "register"]
