"""BigVGAN's anti-aliased SnakeBeta (upsample FIR -> SnakeBeta -> low-pass FIR + decimate) as ONE Triton kernel.

transformers runs it as four launches with two intermediates at ``ratio`` times the input rate (replicate pad,
depthwise conv_transpose1d, SnakeBeta, replicate pad + depthwise strided conv1d). Here each program computes a
``[BLOCK_C, BLOCK_T]`` tile of the output straight from the input (the formula of
:mod:`omni_fast.reference.bigvgan`): for each of the ``K_down`` low-pass taps it rebuilds the upsampled sample it
needs from ``K_up / ratio`` input taps (replicate padding = clamped indices), applies SnakeBeta in fp32 and
accumulates; the result is rounded once. HBM traffic: the input once (neighbouring taps hit L1/L2) and the output
once, instead of ~5x the input size through the two high-rate intermediates. The price is recomputation: each
upsampled sample is rebuilt (and its sin evaluated) by the ``K_down / ratio`` outputs that read it (6x for the
12-tap, ratio-2 filters), which is cheap next to the memory saved on a bandwidth-bound op.

The SnakeBeta helpers are the Code2Wav kernels' (:mod:`omni_fast.kernels.code2wav`), not copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .code2wav import _snake, _snake_mode, _snake_params
from .launch import clamp, interpreting, launch, static_case


@triton.jit
def aa_snake_kernel(x_ptr, alpha_ptr, beta_ptr, fup_ptr, fdown_ptr, out_ptr, lens_ptr, n_ch, t_in, t_out,
                    stride_xb, stride_xc, stride_xt, stride_ob, stride_oc, stride_ot,
                    RATIO: tl.constexpr, K_UP: tl.constexpr, K_DOWN: tl.constexpr, P_X: tl.constexpr,
                    P_U: tl.constexpr, P_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
                    MODE: tl.constexpr, HAS_LENS: tl.constexpr):
    """Grid ``(cdiv(t_out, BLOCK_T), cdiv(C, BLOCK_C), B)``; x ``[B, C, t_in]`` -> out ``[B, C, t_out]``.
    HAS_LENS (``t_out == t_in``): row b is ``lens[b]`` samples long (clamped to ``[1, t_in]``): the replicate
    padding starts there and the outputs past it are zeros."""
    b = tl.program_id(2).to(tl.int64)
    if HAS_LENS:
        t_in = clamp(tl.load(lens_ptr + b).to(tl.int32), 1, t_in)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_c = offs_c < n_ch
    mask_t = offs_t < t_out
    a, inv_b = _snake_params(alpha_ptr, beta_ptr, offs_c, mask_c)
    x_rows = x_ptr + b * stride_xb + offs_c.to(tl.int64) * stride_xc  # 64-bit row pointers
    t_up = RATIO * t_in
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    # a runtime loop over the low-pass taps (unrolled, Triton 3.6 keeps all 72 tap loads live: 255 registers and
    # 3.4 KB of spills); the up taps inside stay unrolled
    for kd in range(K_DOWN):
        # the upsampled sample this low-pass tap reads (replicate padding at both ends: clamped)
        m_raw = RATIO * offs_t + (kd - P_D)
        lo, hi = m_raw < 0, m_raw > t_up - 1
        m = clamp(m_raw, 0, t_up - 1)
        u = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
        # The up taps k with (m + P_U - k) % RATIO == 0 are phase, phase + RATIO, ...: inside the signal the phase
        # is a constant of kd; only a clamped m (the first / last upsampled sample) has another one.
        for i in tl.static_range(K_UP // RATIO):
            k_mid = (kd - P_D + P_U + RATIO * K_DOWN) % RATIO + i * RATIO
            k_lo = P_U % RATIO + i * RATIO
            k_hi = (P_U - 1 + RATIO) % RATIO + i * RATIO
            f = tl.where(lo, tl.load(fup_ptr + k_lo), tl.where(hi, tl.load(fup_ptr + k_hi), tl.load(fup_ptr + k_mid)))
            k = tl.where(lo, k_lo, tl.where(hi, k_hi, k_mid))
            src = clamp((m + P_U - k) // RATIO - P_X, 0, t_in - 1)  # (m + P_U - k >= 0)
            v = tl.load(x_rows[:, None] + (src * stride_xt)[None, :], mask=mask_c[:, None] & mask_t[None, :],
                        other=0.0).to(tl.float32)
            u += f.to(tl.float32)[None, :] * v
        act = _snake(u * RATIO, a, inv_b, MODE)
        acc += tl.load(fdown_ptr + kd).to(tl.float32) * act
    if HAS_LENS:  # (the next conv's zero padding at the real end)
        acc = tl.where((offs_t < t_in)[None, :], acc, 0.0)
    out_rows = out_ptr + b * stride_ob + offs_c.to(tl.int64) * stride_oc
    tl.store(out_rows[:, None] + (offs_t * stride_ot)[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_c[:, None] & mask_t[None, :])


# Under the interpreter each program costs a fixed overhead: fewer, larger tiles (tests shrink them).
_INTERP_TILE = (32, 64)
_GPU_TILE = (4, 128)  # 72 registers, no spills on sm_90a (8 x 128: 255 + 2.4 KB of spills)


def anti_aliased_snake(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, f_up: torch.Tensor,
                       f_down: torch.Tensor, ratio: int, *, tile: tuple[int, int] | None = None,
                       seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Arguments as :func:`omni_fast.reference.bigvgan.anti_aliased_snake` (validated by the op); FIRs fp32;
    seq_lens int ``[B]`` (only where the output length is T)."""
    from ..reference.bigvgan import output_length, pads

    B, C, T = x.shape
    k_up, k_down = f_up.numel(), f_down.numel()
    p_x, p_u, p_d, _ = pads(ratio, k_up, k_down)
    t_out = output_length(T, ratio, k_down) if T else 0
    out = x.new_empty(B, C, t_out)
    bc, bt = tile or (_INTERP_TILE if interpreting() else _GPU_TILE)
    launch(aa_snake_kernel, (triton.cdiv(t_out, bt), triton.cdiv(C, bc), B), x, alpha, beta, f_up, f_down, out,
           x if seq_lens is None else seq_lens, C, T, t_out, *x.stride(), *out.stride(), RATIO=ratio, K_UP=k_up,
           K_DOWN=k_down, P_X=p_x, P_U=p_u, P_D=p_d, BLOCK_C=bc, BLOCK_T=bt, MODE=_snake_mode(x, True),
           HAS_LENS=seq_lens is not None, num_warps=4, device=x.device)
    return out


def _register_static_cases():
    # contiguous activations (time stride 1, as the JIT specialises it), BigVGAN's 12-tap ratio-2 filters
    names = ["x_ptr", "alpha_ptr", "beta_ptr", "fup_ptr", "fdown_ptr", "out_ptr", "lens_ptr", "n_ch", "t_in",
             "t_out", "stride_xb", "stride_xc", "stride_xt", "stride_ob", "stride_oc", "stride_ot"]
    for dt, lens in (("bf16", False), ("fp16", False), ("fp32", True)):
        sig = {n: (f"*{dt}" if n.endswith("_ptr") else "i32") for n in names}
        sig.update(fup_ptr="*fp32", fdown_ptr="*fp32", lens_ptr="*i32", stride_xt="constexpr",
                   stride_ot="constexpr")
        cx = dict(stride_xt=1, stride_ot=1, RATIO=2, K_UP=12, K_DOWN=12, P_X=5, P_U=15, P_D=5,
                  BLOCK_C=_GPU_TILE[0], BLOCK_T=_GPU_TILE[1], MODE=2, HAS_LENS=lens)
        sig.update({k: "constexpr" for k in cx})
        static_case(f"bigvgan.aa_snake[{dt},12 taps{',seq_lens' if lens else ''}]", aa_snake_kernel, sig, cx,
                    num_warps=4)


_register_static_cases()
