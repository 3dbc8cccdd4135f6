"""TM-RoPE (Qwen3-Omni's multimodal rotary embedding) and Qwen3's per-head q/k RMSNorm, as transformers does them.

Shapes: q ``[T, Hq, D]``, k ``[T, Hk, D]`` (any float dtype), positions int ``[3, T]`` (rows t, h, w) or ``[T]``
(plain 1-D RoPE: all three rows equal). Frequencies ``inv_freq[j] = 1 / theta ** (2j / D)`` for ``j < D/2``.

Which position row drives frequency ``j``:

- interleaved (Qwen3-Omni, Qwen3-VL): ``j % 3 == 1 and j < 3*s_h`` -> h; ``j % 3 == 2 and j < 3*s_w`` -> w;
  otherwise t. With the checkpoint's sections (24, 20, 20) and D = 128: j < 60 cycles t, h, w; 60..63 take t.
- contiguous (Qwen2.5-Omni, Qwen2-VL): the first ``s_t`` frequencies take t, the next ``s_h`` h, the rest w.

cos/sin are computed in fp32, scaled by ``attention_scaling``, cast to the activation dtype, then applied with the
neox rotate-half pairing (``j`` with ``j + D/2``) in the activation dtype, exactly as
``Qwen3OmniMoeThinkerTextRotaryEmbedding`` + ``apply_rotary_pos_emb``.
"""

from __future__ import annotations

from typing import Sequence

import torch


_INV_FREQ_CACHE: dict[tuple[int, float, str], torch.Tensor] = {}


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 ``[D/2]`` inverse frequencies, computed exactly as transformers' default rope init.

    Cached per (D, theta, device) so repeated calls (and CUDA-graph captures) make no host-to-device copy.
    Treat the result as read-only.
    """
    key = (int(head_dim), float(theta), str(torch.device(device)))
    inv = _INV_FREQ_CACHE.get(key)
    if inv is None:
        inv = 1.0 / (key[1] ** (torch.arange(0, key[0], 2, dtype=torch.float) / key[0]))
        inv = _INV_FREQ_CACHE.setdefault(key, inv.to(key[2]))
    return inv


def mrope_row_of_frequency(half: int, mrope_section: Sequence[int], interleaved: bool) -> torch.Tensor:
    """int64 ``[D/2]``: which position row (0 = t, 1 = h, 2 = w) drives each frequency."""
    j = torch.arange(half)
    s_t, s_h, s_w = (int(s) for s in mrope_section)
    if interleaved:
        row = torch.zeros(half, dtype=torch.long)
        row[(j % 3 == 1) & (j < 3 * s_h)] = 1
        row[(j % 3 == 2) & (j < 3 * s_w)] = 2
        return row
    return torch.where(j < s_t, 0, torch.where(j < s_t + s_h, 1, 2))


_ROW_CACHE: dict[tuple, torch.Tensor] = {}


def _row_of_frequency_on(half: int, section: tuple, interleaved: bool, device: torch.device) -> torch.Tensor:
    # Cached per device: a host-to-device copy on every call could not be captured in a CUDA graph.
    key = (half, section, interleaved, str(device))
    row = _ROW_CACHE.get(key)
    if row is None:
        row = _ROW_CACHE.setdefault(key, mrope_row_of_frequency(half, section, interleaved).to(device))
    return row


def mrope_cos_sin(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
    interleaved: bool,
    attention_scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[T, D]`` in ``dtype`` for positions ``[3, T]`` or ``[T]``."""
    pos = positions if positions.dim() == 2 else positions.unsqueeze(0).expand(3, -1)
    freqs = pos[..., None].float() * inv_freq.to(device=pos.device, dtype=torch.float)  # [3, T, D/2]
    cos3 = freqs.cos() * attention_scaling
    sin3 = freqs.sin() * attention_scaling
    row = _row_of_frequency_on(inv_freq.numel(), tuple(int(x) for x in mrope_section), bool(interleaved), pos.device)
    pick = row.view(1, 1, -1).expand(1, pos.shape[1], -1)
    cos = torch.gather(cos3, 0, pick)[0]
    sin = torch.gather(sin3, 0, pick)[0]
    return torch.cat((cos, cos), -1).to(dtype), torch.cat((sin, sin), -1).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # [T, H, D] * [T, 1, D]: the same elementwise ops, in the same dtype, as transformers' apply_rotary_pos_emb.
    return (x * cos[:, None]) + (_rotate_half(x) * sin[:, None])


def mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    *,
    mrope_section: Sequence[int] = (24, 20, 20),
    interleaved: bool = True,
    theta: float = 1e6,
    attention_scaling: float = 1.0,
    inplace: bool = True,
    inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[T, Hq, D]`` and k ``[T, Hk, D]``; returns (q, k), written into q and k when ``inplace``."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(q.shape[-1], theta, q.device)
    cos, sin = mrope_cos_sin(positions, inv_freq, mrope_section, interleaved, attention_scaling, q.dtype)
    q_out, k_out = _apply(q, cos, sin), _apply(k, cos, sin)
    if inplace:
        q.copy_(q_out)
        k.copy_(k_out)
        return q, k
    return q_out, k_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3 RMSNorm over the last dim: fp32 statistics, cast back, then ``weight *`` in the weight's dtype."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


def qk_norm_mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,
    *,
    eps: float = 1e-6,
    mrope_section: Sequence[int] = (24, 20, 20),
    interleaved: bool = True,
    theta: float = 1e6,
    attention_scaling: float = 1.0,
    inplace: bool = True,
    inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (weights ``[D]``) followed by TM-RoPE, as Qwen3-Omni's attention does."""
    qn = rms_norm(q, q_weight, eps).to(q.dtype)
    kn = rms_norm(k, k_weight, eps).to(k.dtype)
    q_out, k_out = mrope(qn, kn, positions, mrope_section=mrope_section, interleaved=interleaved, theta=theta,
                         attention_scaling=attention_scaling, inplace=False, inv_freq=inv_freq)
    if inplace:
        q.copy_(q_out)
        k.copy_(k_out)
        return q, k
    return q_out, k_out
