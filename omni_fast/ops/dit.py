"""Qwen2.5-Omni Token2Wav DiT ops: :func:`block_attention`, the DiT's attention with its block mask in ONE launch.

transformers' ``DiTDecoderLayer`` lets query ``i`` see key ``j`` iff ``-look_backward <= j // bs - i // bs <=
look_ahead`` (``bs`` = ``block_size``). A token window cannot express that exactly (the allowed offsets ``j - i``
depend on ``i mod bs``), but the existing flash-attention kernel's varlen-query + paged-key mode can, with no new
masking and no copy: every DiT block of queries is one varlen "sequence" (``cu_seqlens_q``), every DiT block of
keys one KV page (K/V ``[B, S, H, D]`` viewed as ``[B * S / bs, bs, H, D]`` pages), and the block table row of
query block ``i`` lists the pages ``i - look_backward .. i + look_ahead`` that exist, with ``seqused_k`` their key
count (the last block may be partial). Non-causal, no window. When ``S`` is not a multiple of ``bs`` the keys and
values are copied once into whole pages (the padding rows are never read: ``seqused_k`` stops before them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import FLOAT_DTYPES, check_float, check_positive_int, check_same_dtype, check_tensor
from ._dispatch import dispatched_op
from .attention import _scale

MAX_BLOCK = 2**16  # bound on block_size / look_backward / look_ahead (Qwen2.5-Omni's DiT: block 24, look 1-2)


def block_mask(seq_len: int, block_size: int, look_backward: int, look_ahead: int, device=None) -> torch.Tensor:
    """bool ``[S, S]``: transformers' DiT rule (query row, key column)."""
    blk = torch.arange(seq_len, device=device) // block_size
    diff = blk[None, :] - blk[:, None]
    return (diff >= -look_backward) & (diff <= look_ahead)


def block_pages(batch: int, seq_len: int, block_size: int, look_backward: int, look_ahead: int, device):
    """``(cu_seqlens_q [B*nb + 1] int32, block_table [B*nb, lb + la + 1] int32, seqused_k [B*nb] int32)`` built on
    ``device`` without a host sync (``nb = ceil(S / bs)`` query blocks per sequence)."""
    nb = -(-seq_len // block_size)
    qb = torch.arange(batch * nb, device=device)
    b, i = qb // nb, qb % nb
    lo, hi = (i - look_backward).clamp_min(0), (i + look_ahead).clamp_max(nb - 1)
    cols = torch.arange(look_backward + look_ahead + 1, device=device)
    table = b[:, None] * nb + torch.minimum(lo[:, None] + cols[None, :], hi[:, None])  # valid pages first
    tail = nb * block_size - seq_len  # the missing keys of the last (partial) page
    used = (hi - lo + 1) * block_size - torch.where(hi == nb - 1, tail, 0)
    q_len = torch.clamp(seq_len - i * block_size, max=block_size)
    cu = F.pad(q_len.cumsum(0), (1, 0))
    return cu.to(torch.int32), table.to(torch.int32), used.to(torch.int32)


def _fake(q, k, v, block_size, look_backward, look_ahead, softmax_scale, seq_lens, backend):
    return torch.empty_like(q)


@dispatched_op("dit_block_attention", fake=_fake)
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, look_backward: int, look_ahead: int,
        softmax_scale: float, seq_lens: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Block-masked attention over ``[B, S, H, D]`` (keys at or past ``seq_lens[b]`` masked when given)."""


def _lens_clamped(seq_lens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``seq_lens`` clamped into ``[1, S]`` on the device (no host sync: the values are never read on the host)."""
    return seq_lens.long().clamp(1, max(seq_len, 1))


@_op.impl("reference")
def _reference(q, k, v, block_size, look_backward, look_ahead, softmax_scale, seq_lens):
    mask = block_mask(q.shape[1], block_size, look_backward, look_ahead, q.device)
    if seq_lens is not None:  # [B, 1, S, S]: padding keys masked; a query row left with no key sees every key
        pos = torch.arange(q.shape[1], device=q.device)
        mask = mask[None] & (pos[None, None, :] < _lens_clamped(seq_lens, q.shape[1])[:, None, None])
        mask = (mask | ~mask.any(-1, keepdim=True))[:, None]
    rep = q.shape[2] // k.shape[2]  # GQA: each k/v head serves `rep` query heads
    k, v = (t.repeat_interleave(rep, dim=2).transpose(1, 2).float() for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k, v, attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2).to(q.dtype).contiguous()


@_op.impl("triton")
def _triton(q, k, v, block_size, look_backward, look_ahead, softmax_scale, seq_lens):
    from ..kernels import flash_attn as kernels

    B, S, H, D = q.shape
    nb = -(-S // block_size)
    if S % block_size:  # whole pages: one copy, padding rows unread
        k, v = (F.pad(t, (0, 0, 0, 0, 0, nb * block_size - S)) for t in (k, v))
    cu, table, used = block_pages(B, S, block_size, look_backward, look_ahead, q.device)
    if seq_lens is not None:  # pages lo..hi are contiguous keys: the valid ones are the first len - lo * bs
        lo = table[:, 0].long() - torch.arange(B * nb, device=q.device) // nb * nb
        valid = _lens_clamped(seq_lens, S).repeat_interleave(nb) - lo * block_size
        used = torch.minimum(used, valid.clamp_min(1).to(torch.int32))  # >= 1: a padding block stays finite
    out = torch.empty(B * S, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(H, B * S, device=q.device, dtype=torch.float32)
    pages = (B * nb, block_size, k.shape[2], D)
    kernels.attn_fwd(q.reshape(B * S, H, D), k.reshape(pages), v.reshape(pages), out, lse, batch=B * nb,
                     rows_per_seq=block_size * (H // k.shape[2]), cu_q=cu, seqlen_q=0, cu_k=None, seqused_k=used,
                     k_extra=0, block_table=table, softmax_scale=softmax_scale, causal=False,
                     window_size=(-1, -1))
    return out.view(B, S, H, D)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, look_backward: int = 0,
                    look_ahead: int = 0, softmax_scale: float | None = None, seq_lens: torch.Tensor | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """The DiT's block-masked, non-causal attention: q/k/v ``[B, S, H, D]`` (contiguous, one float dtype; k/v may
    have fewer heads, GQA) -> ``[B, S, H, D]``. Query ``i`` sees key ``j`` iff ``-look_backward <= j // block_size
    - i // block_size <= look_ahead``. One kernel launch for the whole batch (see the module docstring).

    ``seq_lens`` (int32/int64 ``[B]`` on q's device, values in ``[1, S]``; optional): sequence ``b`` is padded past
    ``seq_lens[b]``: its keys there are masked out, so rows ``i < seq_lens[b]`` equal the attention of the unpadded
    sequence; rows past it are finite but unspecified. Read on the device only (no host sync: CUDA-graph safe)."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4, contiguous=True)
    B, S, H, D = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, shape=(B, S, None, D), device=q.device, contiguous=True)
    check_same_dtype(q=q, k=k, v=v)
    if k.shape[2] != v.shape[2] or k.shape[2] < 1 or H % k.shape[2]:
        raise ValueError(f"k/v heads ({k.shape[2]}, {v.shape[2]}) must be equal and divide q's {H}")
    # bounded before the block table is sized from them (a huge block or look-around would allocate TBs)
    block_size = check_positive_int("block_size", block_size, maximum=MAX_BLOCK)
    look_backward = check_positive_int("look_backward", look_backward, minimum=0, maximum=MAX_BLOCK)
    look_ahead = check_positive_int("look_ahead", look_ahead, minimum=0, maximum=MAX_BLOCK)
    if seq_lens is not None:
        check_tensor("seq_lens", seq_lens, dtypes=(torch.int32, torch.int64), shape=(B,), device=q.device)
    scale = _scale(softmax_scale, D)
    if B * S == 0:
        return torch.empty_like(q)
    be = _op.resolve((q, k, v), backend)
    return _op(q, k, v, block_size, look_backward, look_ahead, scale, seq_lens, be)


def _ada_fake(x, shift, scale, eps, backend):
    return torch.empty_like(x)


@dispatched_op("dit_ada_layer_norm", fake=_ada_fake)
def _ada_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` over ``[B, T, C]``."""


@_ada_op.impl("reference")
def _ada_reference(x, shift, scale, eps):
    from ..reference import dit as ref

    return ref.ada_layer_norm(x, shift, scale, eps)


@_ada_op.impl("triton")
def _ada_triton(x, shift, scale, eps):
    from ..kernels import dit as kernels

    return kernels.ada_layer_norm(x, shift, scale, eps)


MAX_ADA_CHANNELS = 8192  # one row per program in registers (Qwen2.5-Omni's DiT: 1024)


def ada_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, eps: float = 1e-6,
                   backend: str | None = None) -> torch.Tensor:
    """The DiT's AdaLN modulation in one launch: ``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` (LayerNorm
    without affine weights, fp32 statistics, as transformers' ``Qwen2_5_OmniAdaLayerNormZero`` / ``_Final`` and
    the decoder layer's ``ff_norm``). x ``[B, T, C]`` contiguous (fp16/bf16/fp32); shift / scale ``[B, C]``
    contiguous, x's dtype. Returns a new ``[B, T, C]`` tensor in x's dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3, contiguous=True)
    B, T, C = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, shape=(B, C), device=x.device, contiguous=True)
    check_same_dtype(x=x, shift=shift, scale=scale)
    check_positive_int("C (x.shape[-1])", C, maximum=MAX_ADA_CHANNELS)
    eps = check_float("eps", eps, minimum=0.0)
    if B * T == 0:
        return torch.empty_like(x)
    be = _ada_op.resolve((x, shift, scale), backend)
    return _ada_op(x, shift, scale, eps, be)
