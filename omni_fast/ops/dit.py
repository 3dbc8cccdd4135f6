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

from typing import NamedTuple

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


def _fake(q, k, v, block_size, look_backward, look_ahead, softmax_scale, seq_lens, cu, table, used, backend):
    return torch.empty_like(q)


@dispatched_op("dit_block_attention", fake=_fake)
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, look_backward: int, look_ahead: int,
        softmax_scale: float, seq_lens: torch.Tensor | None, cu: torch.Tensor | None, table: torch.Tensor | None,
        used: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Block-masked attention over ``[B, S, H, D]`` (keys at or past ``seq_lens[b]`` masked when given; cu / table /
    used: a :class:`BlockPlan`'s tables, or None)."""


def _lens_clamped(seq_lens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``seq_lens`` clamped into ``[1, S]`` on the device (no host sync: the values are never read on the host)."""
    return seq_lens.long().clamp(1, max(seq_len, 1))


@_op.impl("reference")
def _reference(q, k, v, block_size, look_backward, look_ahead, softmax_scale, seq_lens, cu, table, used):
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
def _triton(q, k, v, block_size, look_backward, look_ahead, softmax_scale, seq_lens, cu, table, used):
    from ..kernels import flash_attn as kernels

    B, S, H, D = q.shape
    nb = -(-S // block_size)
    if S % block_size:  # whole pages: one copy, padding rows unread
        k, v = (F.pad(t, (0, 0, 0, 0, 0, nb * block_size - S)) for t in (k, v))
    if cu is None:
        cu, table, used = _plan(B, S, block_size, look_backward, look_ahead, seq_lens, q.device)
    out = torch.empty(B * S, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(H, B * S, device=q.device, dtype=torch.float32)
    pages = (B * nb, block_size, k.shape[2], D)
    kernels.attn_fwd(q.reshape(B * S, H, D), k.reshape(pages), v.reshape(pages), out, lse, batch=B * nb,
                     rows_per_seq=block_size * (H // k.shape[2]), cu_q=cu, seqlen_q=0, cu_k=None, seqused_k=used,
                     k_extra=0, block_table=table, softmax_scale=softmax_scale, causal=False,
                     window_size=(-1, -1))
    return out.view(B, S, H, D)


def _plan(B, S, block_size, look_backward, look_ahead, seq_lens, device):
    """(cu_seqlens_q, block_table, seqused_k) of the paged launch, ``seq_lens`` folded into the key counts."""
    nb = -(-S // block_size)
    cu, table, used = block_pages(B, S, block_size, look_backward, look_ahead, device)
    if seq_lens is not None:  # pages lo..hi are contiguous keys: the valid ones are the first len - lo * bs
        lo = table[:, 0].long() - torch.arange(B * nb, device=device) // nb * nb
        valid = _lens_clamped(seq_lens, S).repeat_interleave(nb) - lo * block_size
        used = torch.minimum(used, valid.clamp_min(1).to(torch.int32))  # >= 1: a padding block stays finite
    return cu, table, used


MAX_PLAN_ROWS = 2**26  # bound on batch * seq_len and the block table's size (the real DiT: 2 * 8192 rows)


class BlockPlan(NamedTuple):
    """The launch tables of :func:`block_attention` for one (batch, length, block rule, ``seq_lens``), built once
    by :func:`block_attention_plan` and reused by every layer / step with that rule (the DiT's 22 layers have 3
    rules): ``cu_q [B*nb + 1]``, ``block_table [B*nb, lb + la + 1]``, ``used [B*nb]`` int32 on the device."""

    key: tuple  # (batch, seq_len, block_size, look_backward, look_ahead, seq_lens given)
    cu_q: torch.Tensor
    block_table: torch.Tensor
    used: torch.Tensor


def block_attention_plan(batch: int, seq_len: int, *, block_size: int, look_backward: int = 0, look_ahead: int = 0,
                         seq_lens: torch.Tensor | None = None, device=None) -> BlockPlan:
    """:func:`block_attention`'s tables for these arguments, built on ``device`` with no host sync (CUDA-graph
    safe: a plan built inside a captured region follows ``seq_lens``' contents on replay). Pass it as
    ``block_attention(..., plan=...)`` with the same arguments to skip rebuilding them (~20 small launches)."""
    batch = check_positive_int("batch", batch, maximum=MAX_PLAN_ROWS)
    seq_len = check_positive_int("seq_len", seq_len, maximum=MAX_PLAN_ROWS)
    block_size = check_positive_int("block_size", block_size, maximum=MAX_BLOCK)
    look_backward = check_positive_int("look_backward", look_backward, minimum=0, maximum=MAX_BLOCK)
    look_ahead = check_positive_int("look_ahead", look_ahead, minimum=0, maximum=MAX_BLOCK)
    entries = batch * -(-seq_len // block_size) * (look_backward + look_ahead + 1)
    if batch * seq_len > MAX_PLAN_ROWS or entries > MAX_PLAN_ROWS:  # (the tables would not fit int32 / memory)
        raise ValueError(f"batch * seq_len ({batch * seq_len}) and the block table's entries ({entries}) must be "
                         f"<= {MAX_PLAN_ROWS}")
    if seq_lens is not None:
        check_tensor("seq_lens", seq_lens, dtypes=(torch.int32, torch.int64), shape=(batch,), device=device)
        device = seq_lens.device
    tables = _plan(batch, seq_len, block_size, look_backward, look_ahead, seq_lens, device)
    return BlockPlan((batch, seq_len, block_size, look_backward, look_ahead, seq_lens is not None), *tables)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, look_backward: int = 0,
                    look_ahead: int = 0, softmax_scale: float | None = None, seq_lens: torch.Tensor | None = None,
                    plan: BlockPlan | None = None, backend: str | None = None) -> torch.Tensor:
    """The DiT's block-masked, non-causal attention: q/k/v ``[B, S, H, D]`` (contiguous, one float dtype; k/v may
    have fewer heads, GQA) -> ``[B, S, H, D]``. Query ``i`` sees key ``j`` iff ``-look_backward <= j // block_size
    - i // block_size <= look_ahead``. One kernel launch for the whole batch (see the module docstring).

    ``seq_lens`` (int32/int64 ``[B]`` on q's device, values in ``[1, S]``; optional): sequence ``b`` is padded past
    ``seq_lens[b]``: its keys there are masked out, so rows ``i < seq_lens[b]`` equal the attention of the unpadded
    sequence; rows past it are finite but unspecified. Read on the device only (no host sync: CUDA-graph safe).

    ``plan`` (optional): :func:`block_attention_plan` of the same batch, length, block rule and ``seq_lens`` (its
    tables are then not rebuilt)."""
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
    if plan is not None:
        if not isinstance(plan, BlockPlan):
            raise TypeError(f"plan must be a BlockPlan (ops.block_attention_plan), got {type(plan).__name__}")
        key = (B, S, block_size, look_backward, look_ahead, seq_lens is not None)
        if plan.key != key or plan.cu_q.device != q.device:
            raise ValueError(f"plan was built for (batch, seq_len, block_size, look_backward, look_ahead, seq_lens "
                             f"given) = {plan.key} on {plan.cu_q.device}, not {key} on {q.device}")
    if B * S == 0:
        return torch.empty_like(q)
    be = _op.resolve((q, k, v), backend)
    tables = (None, None, None) if plan is None else plan[1:]
    return _op(q, k, v, block_size, look_backward, look_ahead, scale, seq_lens, *tables, be)


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


def _modulation(x: torch.Tensor, **rows: torch.Tensor) -> list[torch.Tensor]:
    """Check the ``[B, C]`` modulation rows (x's dtype and device) and give them one layout the kernel reads with a
    single row stride and unit column stride: chunks of one modulation GEMM's output pass as they are (no copy)."""
    B, _, C = x.shape
    for name, t in rows.items():
        check_tensor(name, t, dtypes=FLOAT_DTYPES, shape=(B, C), device=x.device)
    check_same_dtype(x=x, **rows)
    ts = list(rows.values())
    if any(t.stride(1) != 1 or t.stride(0) != ts[0].stride(0) for t in ts) or ts[0].stride(0) < C:
        ts = [t.contiguous() for t in ts]
    return ts


def ada_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, eps: float = 1e-6,
                   backend: str | None = None) -> torch.Tensor:
    """The DiT's AdaLN modulation in one launch: ``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` (LayerNorm
    without affine weights, fp32 statistics, as transformers' ``Qwen2_5_OmniAdaLayerNormZero`` / ``_Final`` and
    the decoder layer's ``ff_norm``). x ``[B, T, C]`` contiguous (fp16/bf16/fp32); shift / scale ``[B, C]``, x's
    dtype (views into one modulation output, e.g. ``chunk`` pieces, are read in place). Returns a new ``[B, T, C]``
    tensor in x's dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3, contiguous=True)
    shift, scale = _modulation(x, shift=shift, scale=scale)
    check_positive_int("C (x.shape[-1])", x.shape[2], maximum=MAX_ADA_CHANNELS)
    eps = check_float("eps", eps, minimum=0.0)
    if x.numel() == 0:
        return torch.empty_like(x)
    be = _ada_op.resolve((x, shift, scale), backend)
    return _ada_op(x, shift, scale, eps, be)


def _gated_fake(x, delta, gate, shift, scale, eps, backend):
    return torch.empty_like(x), torch.empty_like(x)


@dispatched_op("dit_gated_ada_layer_norm", fake=_gated_fake)
def _gated_op(x: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
              eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + gate * delta``, then ``LayerNorm(h) * (1 + scale) + shift``."""


@_gated_op.impl("reference")
def _gated_reference(x, delta, gate, shift, scale, eps):
    from ..reference import dit as ref

    return ref.gated_ada_layer_norm(x, delta, gate, shift, scale, eps)


@_gated_op.impl("triton")
def _gated_triton(x, delta, gate, shift, scale, eps):
    from ..kernels import dit as kernels

    return kernels.ada_layer_norm(x, shift, scale, eps, delta=delta, gate=gate)


def gated_ada_layer_norm(x: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                         scale: torch.Tensor, *, eps: float = 1e-6,
                         backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT's gated residual and the next AdaLN modulation in one launch: ``h = x + gate[:, None] * delta``
    (``DiTDecoderLayer``'s ``hidden_states + gate.unsqueeze(1) * output``, in x's dtype) and
    :func:`ada_layer_norm` of h. x / delta ``[B, T, C]`` contiguous, one float dtype; gate / shift / scale
    ``[B, C]`` (views into one modulation output are read in place). Returns new tensors ``(h, modulated)``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3, contiguous=True)
    check_tensor("delta", delta, dtypes=FLOAT_DTYPES, shape=tuple(x.shape), device=x.device, contiguous=True)
    gate, shift, scale = _modulation(x, gate=gate, shift=shift, scale=scale)
    check_same_dtype(x=x, delta=delta)
    check_positive_int("C (x.shape[-1])", x.shape[2], maximum=MAX_ADA_CHANNELS)
    eps = check_float("eps", eps, minimum=0.0)
    if x.numel() == 0:
        return torch.empty_like(x), torch.empty_like(x)
    be = _gated_op.resolve((x, delta, gate, shift, scale), backend)
    return _gated_op(x, delta, gate, shift, scale, eps, be)


def _qkv_fake(qkv, cos, sin, heads, backend):
    B, S, three_hd = qkv.shape
    return qkv.new_empty(3, B, S, heads, three_hd // 3 // heads)


# (one [3, B, S, H, D] output: a custom op's outputs may not alias each other, and q / k / v are its planes)
@dispatched_op("dit_qkv_rope", fake=_qkv_fake)
def _qkv_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, backend: str) -> torch.Tensor:
    """Split ``[B, S, 3HD]`` into q, k, v (``[3, B, S, H, D]``) with RoPE on head 0 of q / k."""


@_qkv_op.impl("reference")
def _qkv_reference(qkv, cos, sin, heads):
    from ..reference import dit as ref

    return torch.stack(ref.qkv_rope(qkv, cos, sin, heads))


@_qkv_op.impl("triton")
def _qkv_triton(qkv, cos, sin, heads):
    from ..kernels import dit as kernels

    return kernels.qkv_rope(qkv, cos, sin, heads)


def dit_qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, heads: int,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' ``DiTAttention`` between its projections and the attention, on ONE fused projection: qkv
    ``[B, S, 3 * heads * D]`` contiguous (q | k | v columns, fp16/bf16/fp32, D even) -> q, k, v ``[B, S, heads,
    D]`` contiguous (:func:`block_attention`'s layout), RoPE applied to the FIRST head of q and k only (the
    checkpoint's quirk: interleaved pairs, the result in the half-split layout of ``deinterleave_head_dim``);
    cos / sin ``[B or 1, S, D]`` (``Qwen2_5OmniDiTRotaryEmbedding``'s output, qkv's dtype, unit last stride). One
    launch."""
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, ndim=3, contiguous=True)
    B, S, three_hd = qkv.shape
    heads = check_positive_int("heads", heads)
    if three_hd % (3 * heads) or (three_hd // (3 * heads)) % 2:
        raise ValueError(f"qkv's last dim ({three_hd}) must be 3 * heads ({heads}) * an even head dim")
    D = three_hd // 3 // heads
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=3, device=qkv.device, last_dim_contiguous=True)
        if t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (S, D):
            raise ValueError(f"{name} must have shape [{B} or 1, {S}, {D}], got {list(t.shape)}")
    check_same_dtype(qkv=qkv, cos=cos, sin=sin)
    if cos.stride() != sin.stride():  # the kernel reads both with cos' strides
        cos, sin = cos.contiguous(), sin.contiguous()
    if B * S == 0:
        return _qkv_fake(qkv, cos, sin, heads, None).unbind(0)
    be = _qkv_op.resolve((qkv, cos, sin), backend)
    return _qkv_op(qkv, cos, sin, heads, be).unbind(0)
