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
