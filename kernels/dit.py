"""Qwen2.5-Omni Token2Wav DiT: the AdaLN modulation ``LayerNorm(x) * (1 + scale) + shift`` as ONE Triton kernel.

transformers runs it as a LayerNorm launch plus three elementwise launches (``1 + scale``, the product, the sum),
reading and writing ``[B, T, C]`` activations three times more than needed. Here one program normalises one row
``[C]`` (fp32 mean and biased variance, as ``nn.LayerNorm``) and applies its batch's shift / scale before the single
store: x read once, the output written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, static_case


@triton.jit
def ada_layer_norm_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, T, C, eps, stride_xr, stride_or, stride_mb,
                          BLOCK_C: tl.constexpr):
    """Grid ``(B * T,)``: row ``r`` of x ``[B*T, C]`` with shift / scale row ``r // T`` (``[B, C]``)."""
    r = tl.program_id(0).to(tl.int64)
    b = r // T
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    x = tl.load(x_ptr + r * stride_xr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(d * d, axis=0) / C
    y = d * (1.0 / tl.sqrt(var + eps))
    shift = tl.load(shift_ptr + b * stride_mb + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_mb + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * stride_or + offs, (y * (1.0 + scale) + shift).to(out_ptr.dtype.element_ty), mask=mask)


def ada_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x ``[B, T, C]`` contiguous, shift / scale ``[B, C]`` contiguous (x's dtype) -> ``[B, T, C]``."""
    B, T, C = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(max(C, 1))
    launch(ada_layer_norm_kernel, (B * T,), x, shift, scale, out, T, C, float(eps), C, C, C,
           device=x.device, BLOCK_C=block, num_warps=4 if block <= 1024 else 8)
    return out


# Qwen2.5-Omni's DiT: hidden 1024, fp32 (transformers runs Token2Wav in fp32)
static_case("dit.ada_layer_norm[fp32,C=1024]", ada_layer_norm_kernel,
            dict(x_ptr="*fp32", shift_ptr="*fp32", scale_ptr="*fp32", out_ptr="*fp32", T="i32", C="i32",
                 eps="fp32", stride_xr="i32", stride_or="i32", stride_mb="i32", BLOCK_C="constexpr"),
            dict(BLOCK_C=1024))
