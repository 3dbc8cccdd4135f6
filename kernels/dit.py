"""Qwen2.5-Omni Token2Wav DiT: the per-layer elementwise work around the GEMMs and the attention as ONE Triton kernel
per step.

- :func:`ada_layer_norm`: the AdaLN modulation ``LayerNorm(x) * (1 + scale) + shift`` (transformers: a LayerNorm
  launch plus three elementwise launches), optionally preceded by the DiT's gated residual ``h + gate * delta``
  (two more launches): one program normalises one row ``[C]`` (fp32 mean and biased variance, as ``nn.LayerNorm``)
  and applies its batch's gate / shift / scale before the stores: x read once, each output written once.
- :func:`qkv_rope`: the fused q/k/v projection's output ``[rows, 3 * H * D]`` split into contiguous q, k, v
  ``[rows, H, D]`` with the DiT's RoPE (the checkpoint's quirk: first head only, interleaved pairs, the result in
  the half-split layout) applied on the way (transformers: ~20 launches of slicing, ``cat``, ``neg``, products).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, static_case


@triton.jit
def ada_layer_norm_kernel(x_ptr, delta_ptr, gate_ptr, shift_ptr, scale_ptr, h_ptr, out_ptr, T, C, eps, stride_mb,
                          HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid ``(B * T,)``: row ``r`` of x ``[B*T, C]`` (contiguous rows) with gate / shift / scale row ``r // T``
    (``[B, C]``, row stride ``stride_mb``). HAS_RESIDUAL: ``h = x + gate * delta`` is stored to h and normalised;
    otherwise x is."""
    r = tl.program_id(0).to(tl.int64)
    b = r // T
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    x = tl.load(x_ptr + r * C + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # transformers: ``h + gate.unsqueeze(1) * delta`` in the activations' dtype (two roundings)
        g = tl.load(gate_ptr + b * stride_mb + offs, mask=mask, other=0.0)
        d = tl.load(delta_ptr + r * C + offs, mask=mask, other=0.0)
        x = x + (g * d).to(x.dtype)
        tl.store(h_ptr + r * C + offs, x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(d * d, axis=0) / C
    y = d * (1.0 / tl.sqrt(var + eps))
    shift = tl.load(shift_ptr + b * stride_mb + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_mb + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * C + offs, (y * (1.0 + scale) + shift).to(out_ptr.dtype.element_ty), mask=mask)


def ada_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, delta=None, gate=None):
    """x ``[B, T, C]`` contiguous; shift / scale (and gate) ``[B, C]`` with unit column stride and one row stride,
    x's dtype; delta (optional) like x. Returns the modulated ``[B, T, C]``, or ``(h, modulated)`` with delta."""
    B, T, C = x.shape
    out = torch.empty_like(x)
    res = delta is not None
    h = torch.empty_like(x) if res else out  # (unused without the residual)
    block = triton.next_power_of_2(max(C, 1))
    launch(ada_layer_norm_kernel, (B * T,), x, delta if res else x, gate if res else shift, shift, scale, h, out,
           T, C, float(eps), shift.stride(0), device=x.device, HAS_RESIDUAL=res, BLOCK_C=block,
           num_warps=4 if block <= 1024 else 8)
    return (h, out) if res else out


@triton.jit
def qkv_rope_kernel(qkv_ptr, cos_ptr, sin_ptr, out_ptr, rows, S, HD, stride_cb, stride_cs, D,
                    BLOCK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Grid ``(rows, 3)``: row ``r`` (``b = r // S``, position ``r % S``) of part ``p`` (q, k, v) of qkv ``[rows,
    3 * HD]`` -> row ``r`` of out ``[3, rows, HD]`` part ``p``; q and k get head 0 rotated (cos / sin ``[B, S,
    D]``)."""
    r = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    src = qkv_ptr + r * 3 * HD + p * HD
    dst = out_ptr + (p * rows + r) * HD
    rope = p < 2
    offs = tl.arange(0, BLOCK)
    first = tl.where(rope, D, 0)  # head 0 of q / k is written below, rotated
    keep = (offs < HD) & (offs >= first)
    tl.store(dst + offs, tl.load(src + offs, mask=keep), mask=keep)
    if rope:
        # deinterleave (x0, x1, x2, ...) -> (x0, x2, ... | x1, x3, ...) and rotate the halves:
        # out[j] = e * cos[j] - o * sin[j], out[j + D/2] = o * cos[j + D/2] + e * sin[j + D/2]
        half = D // 2
        j = tl.arange(0, BLOCK_HALF)
        m = j < half
        even = tl.load(src + 2 * j, mask=m).to(tl.float32)
        odd = tl.load(src + 2 * j + 1, mask=m).to(tl.float32)
        trig = (r // S) * stride_cb + (r % S) * stride_cs
        c_lo = tl.load(cos_ptr + trig + j, mask=m).to(tl.float32)
        s_lo = tl.load(sin_ptr + trig + j, mask=m).to(tl.float32)
        c_hi = tl.load(cos_ptr + trig + half + j, mask=m).to(tl.float32)
        s_hi = tl.load(sin_ptr + trig + half + j, mask=m).to(tl.float32)
        ty = out_ptr.dtype.element_ty
        tl.store(dst + j, (even * c_lo - odd * s_lo).to(ty), mask=m)
        tl.store(dst + half + j, (odd * c_hi + even * s_hi).to(ty), mask=m)


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int):
    """qkv ``[B, S, 3 * H * D]`` contiguous, cos / sin ``[B or 1, S, D]`` (unit last stride, qkv's dtype) ->
    ``[3, B, S, H, D]`` (q, k, v planes, each contiguous)."""
    B, S, three_hd = qkv.shape
    HD = three_hd // 3
    D = HD // heads
    out = torch.empty(3, B, S, heads, D, device=qkv.device, dtype=qkv.dtype)  # q, k, v: each contiguous
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    launch(qkv_rope_kernel, (B * S, 3), qkv, cos, sin, out, B * S, S, HD, cb, cos.stride(1), D,
           device=qkv.device, BLOCK=triton.next_power_of_2(HD), BLOCK_HALF=triton.next_power_of_2(max(D // 2, 1)),
           num_warps=4)
    return out


# Qwen2.5-Omni's DiT: hidden 1024, 16 heads x 64, fp32 (transformers runs Token2Wav in fp32)
_ADA_SIG = dict(x_ptr="*fp32", delta_ptr="*fp32", gate_ptr="*fp32", shift_ptr="*fp32", scale_ptr="*fp32",
                h_ptr="*fp32", out_ptr="*fp32", T="i32", C="i32", eps="fp32", stride_mb="i32",
                HAS_RESIDUAL="constexpr", BLOCK_C="constexpr")
static_case("dit.ada_layer_norm[fp32,C=1024]", ada_layer_norm_kernel, _ADA_SIG,
            dict(HAS_RESIDUAL=False, BLOCK_C=1024))
static_case("dit.ada_layer_norm[fp32,C=1024,residual]", ada_layer_norm_kernel, _ADA_SIG,
            dict(HAS_RESIDUAL=True, BLOCK_C=1024))
static_case("dit.qkv_rope[fp32,H=16,D=64]", qkv_rope_kernel,
            dict(qkv_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", out_ptr="*fp32", rows="i32", S="i32", HD="i32",
                 stride_cb="i32", stride_cs="i32", D="i32", BLOCK="constexpr", BLOCK_HALF="constexpr"),
            dict(BLOCK=1024, BLOCK_HALF=32))
