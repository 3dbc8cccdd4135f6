"""Pure-PyTorch reference for Qwen2.5-Omni's Token2Wav DiT: the AdaLN modulation (:func:`ada_layer_norm`).

transformers' ``Qwen2_5_OmniAdaLayerNormZero`` / ``..._Final`` and the ``ff_norm`` step of ``DiTDecoderLayer`` all
compute ``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` with a LayerNorm without affine weights (eps
1e-6), where shift / scale come from a linear layer on the timestep embedding. Written with the same torch calls,
in the same order and dtype, as transformers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ada_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x ``[B, T, C]``, shift / scale ``[B, C]`` -> ``[B, T, C]`` in x's dtype."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]


def gated_ada_layer_norm(x: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                         scale: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``DiTDecoderLayer``'s gated residual then the next AdaLN: ``h = x + gate[:, None] * delta`` and
    :func:`ada_layer_norm` of h. x / delta ``[B, T, C]``, gate / shift / scale ``[B, C]`` -> (h, modulated h)."""
    h = x + gate.unsqueeze(1) * delta
    return h, ada_layer_norm(h, shift, scale, eps)


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int):
    """transformers' ``DiTAttention`` from its projections to the attention call, on the concatenated projection
    ``qkv [B, S, 3 * H * D]`` (q | k | v): RoPE on the first head of q and k only (interleaved pairs, the result in
    the half-split layout ``deinterleave_head_dim`` gives), cos / sin ``[B or 1, S, D]``. Returns q, k, v ``[B, S,
    H, D]`` contiguous (transformers' ``[B, H, S, D]`` transposed)."""
    B, S, three_hd = qkv.shape
    D = three_hd // 3 // heads
    q, k, v = (t.reshape(B, S, heads, D).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    q, k = q.clone(), k.clone()

    def rotate_half(t):
        return torch.cat((-t[..., D // 2:], t[..., :D // 2]), dim=-1)

    def deinterleave(t):
        return torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)

    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q0, k0 = deinterleave(q[:, :1]), deinterleave(k[:, :1])
    q[:, :1], k[:, :1] = (q0 * c) + (rotate_half(q0) * s), (k0 * c) + (rotate_half(k0) * s)
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))
