"""Pure-PyTorch references for Qwen2.5-Omni's BigVGAN vocoder (Token2Wav's mel -> waveform stage).

BigVGAN wraps every SnakeBeta in an anti-aliased activation (transformers' ``Qwen2_5OmniAntiAliasedActivation1d``):
upsample by ``ratio`` with a Kaiser-windowed sinc FIR (a transposed conv on the replicate-padded input, scaled by
``ratio``), SnakeBeta at the high rate, then a low-pass FIR and decimation by ``ratio`` (replicate padding again).
Written here as explicit index arithmetic, not as transformers' conv_transpose1d / conv1d calls, so the reference is
an independent statement of the same function, and the formula the fused kernel
(:mod:`omni_fast.kernels.bigvgan`) evaluates:

    u[m]   = ratio * sum_{k : (m + P_u - k) % ratio == 0} f_up[k] * x[clamp((m + P_u - k) / ratio - p_x, 0, T - 1)]
    out[t] = sum_k f_down[k] * snake(u[clamp(ratio * t + k - P_d, 0, ratio * T - 1)])

with ``p_x = K_up / ratio - 1`` (the replicate pad of the input), ``P_u = p_x * ratio + (K_up - ratio) // 2`` (the
crop of the transposed conv's output), ``P_d = K_down // 2 - (K_down even)`` (the low-pass filter's left pad).
"""

from __future__ import annotations

import math

import torch

SNAKE_EPS = 1e-9


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """A Kaiser-windowed sinc low-pass FIR ``[kernel_size]`` float32, normalised to unit DC gain (BigVGAN's
    ``kaiser_sinc_filter1d``: the window's beta from the Kaiser attenuation formula for a transition band of
    ``4 * half_width``)."""
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False, dtype=torch.float32)
    if kernel_size % 2 == 0:
        t = torch.arange(-half, half, dtype=torch.float32) + 0.5
    else:
        t = torch.arange(kernel_size, dtype=torch.float32) - half
    if cutoff == 0:
        return torch.zeros(kernel_size, dtype=torch.float32)
    f = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    return f / f.sum()


def resample_filters(ratio: int = 2, kernel_size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """BigVGAN's (up, down) filters for ``ratio``: both the same low-pass at cutoff ``0.5 / ratio``."""
    f = kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size)
    return f, f.clone()


def pads(ratio: int, k_up: int, k_down: int) -> tuple[int, int, int, int]:
    """``(p_x, P_u, P_d, p_d_right)`` of the module docstring's formula (``p_d_right``: the low-pass's right pad)."""
    p_x = k_up // ratio - 1
    return p_x, p_x * ratio + (k_up - ratio) // 2, k_down // 2 - int(k_down % 2 == 0), k_down // 2


def output_length(t_in: int, ratio: int, k_down: int) -> int:
    """Samples out of the anti-aliased activation for ``t_in`` in: ``ratio * t_in`` up, decimated back."""
    _, _, p_l, p_r = pads(ratio, 2 * ratio, k_down)
    return (ratio * t_in + p_l + p_r - k_down) // ratio + 1


def snake_beta(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """SnakeBeta ``x + sin(x * exp(alpha))**2 / (exp(beta) + 1e-9)`` of fp32 ``x [B, C, T]``, alpha/beta ``[C]``."""
    a = alpha.float().exp()[None, :, None]
    inv_b = 1.0 / (beta.float().exp()[None, :, None] + SNAKE_EPS)
    return x + inv_b * torch.sin(x * a) ** 2


def upsample(x: torch.Tensor, f_up: torch.Tensor, ratio: int) -> torch.Tensor:
    """fp32 ``x [B, C, T]`` -> ``u [B, C, ratio * T]`` (the formula's ``u``)."""
    T, k_up = x.shape[-1], f_up.numel()
    p_x, p_u, _, _ = pads(ratio, k_up, k_up)
    m = torch.arange(ratio * T, device=x.device)
    u = x.new_zeros(*x.shape[:-1], ratio * T)
    for k in range(k_up):
        num = m + p_u - k
        ok = (num % ratio == 0).to(x.dtype)
        src = (torch.div(num, ratio, rounding_mode="floor") - p_x).clamp(0, T - 1)
        u += float(f_up[k]) * ok * x[..., src]
    return ratio * u


def downsample(a: torch.Tensor, f_down: torch.Tensor, ratio: int) -> torch.Tensor:
    """fp32 ``a [B, C, ratio * T]`` -> ``[B, C, output_length(T)]``: replicate-padded low-pass, every ``ratio``-th."""
    n, k_down = a.shape[-1], f_down.numel()
    _, _, p_l, p_r = pads(ratio, 2 * ratio, k_down)
    t_out = (n + p_l + p_r - k_down) // ratio + 1
    t = torch.arange(t_out, device=a.device)
    out = a.new_zeros(*a.shape[:-1], t_out)
    for k in range(k_down):
        out += float(f_down[k]) * a[..., (ratio * t + k - p_l).clamp(0, n - 1)]
    return out


def anti_aliased_snake(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, f_up: torch.Tensor,
                       f_down: torch.Tensor, ratio: int = 2) -> torch.Tensor:
    """BigVGAN's anti-aliased SnakeBeta of ``x [B, C, T]`` (fp16/bf16/fp32; alpha/beta ``[C]`` log space; FIRs
    ``[K_up]`` / ``[K_down]``), computed in fp32 and rounded once to ``x.dtype``: ``[B, C, output_length(T)]``."""
    if x.shape[-1] == 0:
        return x.new_empty(*x.shape[:-1], 0)
    u = upsample(x.float(), f_up.float(), ratio)
    return downsample(snake_beta(u, alpha, beta), f_down.float(), ratio).to(x.dtype)


def amp_block(x: torch.Tensor, convs1, convs2, acts, f_up: torch.Tensor, f_down: torch.Tensor,
              ratio: int = 2) -> torch.Tensor:
    """BigVGAN's AMP block on fp32 ``x [B, C, T]``: per dilation ``x += conv2(act(conv1(act(x))))`` with
    same-padded ("non-causal") convs; ``convs1``/``convs2``: ``(weight, bias, dilation)`` triples; ``acts``:
    ``(alpha, beta)`` pairs, interleaved as transformers' ``activations`` (``[::2]`` before conv1)."""
    import torch.nn.functional as F

    for (w1, b1, d1), (w2, b2, d2), s1, s2 in zip(convs1, convs2, acts[::2], acts[1::2]):
        h = anti_aliased_snake(x, *s1, f_up, f_down, ratio)
        h = F.conv1d(h, w1, b1, dilation=d1, padding=d1 * (w1.shape[-1] - 1) // 2)
        h = anti_aliased_snake(h, *s2, f_up, f_down, ratio)
        h = F.conv1d(h, w2, b2, dilation=d2, padding=d2 * (w2.shape[-1] - 1) // 2)
        x = x + h
    return x
