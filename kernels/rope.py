"""TM-RoPE in Triton: multimodal rotary embedding, optionally fused with Qwen3's per-head q/k RMSNorm.

One program per token rotates every q and k head of that token in place. cos/sin are computed in the kernel from
the token's positions and the fp32 inverse frequencies (no cos/sin cache is materialised), scaled, rounded to the
activation dtype as transformers does, and applied in fp32 with a single rounding on store.

Shapes: q ``[T, Hq, D]``, k ``[T, Hk, D]`` (unit stride in D; any token/head strides), positions int32/int64
``[3, T]`` (or ``[T]``: row stride 0), inv_freq fp32 ``[D/2]``, norm weights ``[D]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, static_case


@triton.jit
def norm_rope_halves(x1_raw, x2_raw, w1, w2, cos, sin, eps, HEAD_DIM: tl.constexpr, NORM: tl.constexpr):
    """Optional Qwen3 per-head RMSNorm, then neox rotate-half RoPE, of heads given as two halves.

    ``x1_raw`` / ``x2_raw`` ``[rows, half]`` (the activation dtype: elements j and j + D/2 of each head row; masked
    lanes 0), ``w1`` / ``w2`` fp32 ``[half]`` norm weight halves, ``cos`` / ``sin`` fp32 broadcastable to the
    halves. Returns the rotated halves in fp32, not yet rounded (the caller rounds once on store).
    """
    x1 = x1_raw.to(tl.float32)
    x2 = x2_raw.to(tl.float32)
    if NORM:
        # Qwen3 RMSNorm: fp32 statistics over the whole head, cast to the activation dtype, then * weight
        # (a bf16 x bf16 product is exact in fp32, so one rounding after it equals transformers' bf16 multiply).
        ms = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
        r = tl.rsqrt(ms + eps)[:, None]
        x1 = ((x1 * r).to(x1_raw.dtype).to(tl.float32) * w1[None, :]).to(x1_raw.dtype).to(tl.float32)
        x2 = ((x2 * r).to(x2_raw.dtype).to(tl.float32) * w2[None, :]).to(x2_raw.dtype).to(tl.float32)
    # neox rotate-half: out[j] = x[j] cos - x[j+D/2] sin, out[j+D/2] = x[j+D/2] cos + x[j] sin
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotate_heads(x_ptr, stride_h, n_heads, weight_ptr, eps, cos, sin, offs_j, mask_j,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr, NORM: tl.constexpr):
    """Rotate (and optionally RMS-normalise) ``n_heads`` heads starting at ``x_ptr``, in place."""
    w1 = cos  # placeholders when NORM is off (unused)
    w2 = sin
    if NORM:
        w1 = tl.load(weight_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)
        w2 = tl.load(weight_ptr + HALF + offs_j, mask=mask_j, other=0.0).to(tl.float32)
    for h0 in range(0, n_heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h[:, None] < n_heads) & mask_j[None, :]
        ptr1 = x_ptr + offs_h[:, None] * stride_h + offs_j[None, :]
        x1_raw = tl.load(ptr1, mask=mask, other=0.0)
        x2_raw = tl.load(ptr1 + HALF, mask=mask, other=0.0)
        o1, o2 = norm_rope_halves(x1_raw, x2_raw, w1, w2, cos[None, :], sin[None, :], eps, 2 * HALF, NORM)
        tl.store(ptr1, o1.to(x1_raw.dtype), mask=mask)
        tl.store(ptr1 + HALF, o2.to(x2_raw.dtype), mask=mask)


@triton.jit
def mrope_cos_sin(pos_ptr, stride_pos_row, tok, inv_freq_ptr, offs_j, mask_j, scaling, act_dtype: tl.constexpr,
                  SEC_T: tl.constexpr, SEC_H: tl.constexpr, SEC_W: tl.constexpr, INTERLEAVED: tl.constexpr):
    """TM-RoPE cos/sin fp32 ``[BLOCK_J]`` of token ``tok`` (positions ``[3, T]``, row stride ``stride_pos_row``),
    scaled and rounded to ``act_dtype`` as transformers does (shared by :func:`mrope_kernel` and the talker's fused
    qkv phase, :mod:`.talker_fused`)."""
    # The position row that drives each frequency (0 = t, 1 = h, 2 = w).
    if INTERLEAVED:
        row = tl.where((offs_j % 3 == 1) & (offs_j < 3 * SEC_H), 1,
                       tl.where((offs_j % 3 == 2) & (offs_j < 3 * SEC_W), 2, 0))
    else:
        row = tl.where(offs_j < SEC_T, 0, tl.where(offs_j < SEC_T + SEC_H, 1, 2))
    pos = tl.load(pos_ptr + row * stride_pos_row + tok, mask=mask_j, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + offs_j, mask=mask_j, other=0.0)
    angle = pos * inv_freq  # one fp32 product, as transformers' position.float() * inv_freq
    # cos/sin in fp32, scaled, then rounded to the activation dtype before use (transformers' cos.to(x.dtype)).
    cos = (tl.cos(angle) * scaling).to(act_dtype).to(tl.float32)
    sin = (tl.sin(angle) * scaling).to(act_dtype).to(tl.float32)
    return cos, sin


@triton.jit
def mrope_kernel(
    q_ptr, k_ptr, pos_ptr, inv_freq_ptr, qw_ptr, kw_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_pos_row,
    n_q_heads, n_k_heads, scaling, eps,
    SEC_T: tl.constexpr, SEC_H: tl.constexpr, SEC_W: tl.constexpr, INTERLEAVED: tl.constexpr,
    HALF: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr, NORM: tl.constexpr,
):
    """Grid ``(T,)``: one program rotates (with ``NORM``: RMS-normalises first) every q and k head of one token, in
    place. ``q_ptr`` ``[T, Hq, D]`` / ``k_ptr`` ``[T, Hk, D]`` (fp16/bf16, unit stride in D), ``pos_ptr`` int32/int64
    ``[3, T]`` (row stride ``stride_pos_row``; 0 for ``[T]``), ``inv_freq_ptr`` fp32 ``[HALF]``, ``qw_ptr`` /
    ``kw_ptr`` ``[D]`` (unused without ``NORM``). ``SEC_T/H/W``: the mrope sections (frequencies per position row),
    ``INTERLEAVED``: Qwen3's interleaved section layout; ``HALF = D / 2``, ``BLOCK_J`` >= HALF, ``BLOCK_H``: heads
    per inner step."""
    tok = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_J)
    mask_j = offs_j < HALF
    cos, sin = mrope_cos_sin(pos_ptr, stride_pos_row, tok, inv_freq_ptr, offs_j, mask_j, scaling,
                             q_ptr.dtype.element_ty, SEC_T, SEC_H, SEC_W, INTERLEAVED)
    _rotate_heads(q_ptr + tok * stride_qt, stride_qh, n_q_heads, qw_ptr, eps, cos, sin, offs_j, mask_j,
                  HALF, BLOCK_H, BLOCK_J, NORM)
    _rotate_heads(k_ptr + tok * stride_kt, stride_kh, n_k_heads, kw_ptr, eps, cos, sin, offs_j, mask_j,
                  HALF, BLOCK_H, BLOCK_J, NORM)


def mrope_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           mrope_section: list[int], interleaved: bool, attention_scaling: float,
           q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 0.0) -> None:
    """Rotate q ``[T, Hq, D]`` and k ``[T, Hk, D]`` in place; with weights, RMS-normalise each head first."""
    T, n_q, D = q.shape
    half = D // 2
    norm = q_weight is not None
    block_j = triton.next_power_of_2(half)
    # Keep about 2K elements of each half in flight per head block.
    block_h = max(1, min(triton.next_power_of_2(max(n_q, k.shape[1])), 2048 // block_j))
    pos_row_stride = positions.stride(0) if positions.dim() == 2 else 0
    launch(
        mrope_kernel, (T,),
        q, k, positions, inv_freq, q_weight if norm else q, k_weight if norm else k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), pos_row_stride,
        n_q, k.shape[1], float(attention_scaling), float(eps),
        SEC_T=int(mrope_section[0]), SEC_H=int(mrope_section[1]), SEC_W=int(mrope_section[2]),
        INTERLEAVED=bool(interleaved), HALF=half, BLOCK_J=block_j, BLOCK_H=block_h, NORM=norm,
        num_warps=4, device=q.device,
    )


_MROPE_SIGNATURE = {
    "q_ptr": "*{dt}", "k_ptr": "*{dt}", "pos_ptr": "*i64", "inv_freq_ptr": "*fp32", "qw_ptr": "*{dt}",
    "kw_ptr": "*{dt}", "stride_qt": "i32", "stride_qh": "i32", "stride_kt": "i32", "stride_kh": "i32",
    "stride_pos_row": "i32", "n_q_heads": "i32", "n_k_heads": "i32", "scaling": "fp32", "eps": "fp32",
    "SEC_T": "constexpr", "SEC_H": "constexpr", "SEC_W": "constexpr", "INTERLEAVED": "constexpr",
    "HALF": "constexpr", "BLOCK_J": "constexpr", "BLOCK_H": "constexpr", "NORM": "constexpr",
}

for _dt in ("bf16", "fp16"):
    # Code2Wav's pre-transformer: 1-D positions (one section), 16 q and 16 k heads of 64
    static_case(f"mrope_kernel[{_dt},D64,1-D,code2wav]", mrope_kernel,
                signature={k: v.format(dt=_dt) for k, v in _MROPE_SIGNATURE.items()},
                constexprs={"SEC_T": 32, "SEC_H": 0, "SEC_W": 0, "INTERLEAVED": False, "HALF": 32, "BLOCK_J": 32,
                            "BLOCK_H": 16, "NORM": False})
    for _norm in (False, True):
        static_case(
            f"mrope_kernel[{_dt},D128,norm={_norm}]", mrope_kernel,
            signature={k: v.format(dt=_dt) for k, v in _MROPE_SIGNATURE.items()},
            constexprs={"SEC_T": 24, "SEC_H": 20, "SEC_W": 20, "INTERLEAVED": True, "HALF": 64, "BLOCK_J": 64,
                        "BLOCK_H": 32, "NORM": _norm},
        )
