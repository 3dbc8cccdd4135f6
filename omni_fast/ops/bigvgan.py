"""Public BigVGAN ops (Qwen2.5-Omni's Token2Wav vocoder): :func:`anti_aliased_snake`.

Tensors are channels-first ``[B, C, T]`` like ``nn.Conv1d``. The semantics are transformers'
``Qwen2_5OmniAntiAliasedActivation1d(Qwen2_5OmniSnakeBeta(C))``; see :mod:`omni_fast.reference.bigvgan`.
"""

from __future__ import annotations

import torch

from ..reference import bigvgan as ref
from ..validation import FLOAT_DTYPES, check_positive_int, check_same_dtype, check_tensor
from ._dispatch import dispatched_op


def _aa_fake(x, alpha, beta, f_up, f_down, ratio, backend):
    B, C, T = x.shape
    return x.new_empty(B, C, ref.output_length(T, ratio, f_down.numel()) if T else 0)


@dispatched_op("anti_aliased_snake", fake=_aa_fake)
def _aa_op(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, f_up: torch.Tensor, f_down: torch.Tensor,
           ratio: int, backend: str) -> torch.Tensor:
    """Upsample FIR -> SnakeBeta -> low-pass FIR + decimate of x ``[B, C, T]``."""


@_aa_op.impl("reference")
def _aa_reference(x, alpha, beta, f_up, f_down, ratio):
    return ref.anti_aliased_snake(x, alpha, beta, f_up, f_down, ratio)


@_aa_op.impl("triton")
def _aa_triton(x, alpha, beta, f_up, f_down, ratio):
    from ..kernels import bigvgan as kernels

    return kernels.anti_aliased_snake(x, alpha, beta, f_up, f_down, ratio)


def anti_aliased_snake(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, up_filter: torch.Tensor,
                       down_filter: torch.Tensor, *, ratio: int = 2, backend: str | None = None) -> torch.Tensor:
    """BigVGAN's anti-aliased SnakeBeta of x ``[B, C, T]`` (fp16/bf16/fp32), computed in fp32, rounded once.

    alpha/beta ``[C]`` (log space, x's dtype); ``up_filter`` ``[K_up]`` / ``down_filter`` ``[K_down]`` float32 FIRs
    (transformers' ``upsample.filter`` / ``downsample.filter``, any shape with that many elements), ``K_up`` a
    multiple of ``ratio``. Returns ``[B, C, T_out]`` (``T_out = T`` for the even BigVGAN filters) in x's dtype.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3)
    C = x.shape[1]
    check_tensor("alpha", alpha, dtypes=FLOAT_DTYPES, shape=(C,), device=x.device, contiguous=True)
    check_tensor("beta", beta, dtypes=FLOAT_DTYPES, shape=(C,), device=x.device, contiguous=True)
    check_same_dtype(x=x, alpha=alpha, beta=beta)
    check_positive_int("ratio", ratio)
    filters = []
    for name, f in (("up_filter", up_filter), ("down_filter", down_filter)):
        check_tensor(name, f, dtypes=(torch.float32,), device=x.device)
        if f.numel() < 1:
            raise ValueError(f"{name} must have at least one tap")
        filters.append(f.reshape(-1).contiguous())
    k_up = filters[0].numel()
    # (K_up - ratio) // 2 >= ratio - 1 keeps every up tap's source index non-negative (BigVGAN: 12 taps, ratio 2)
    if k_up % ratio or (k_up - ratio) // 2 < ratio - 1:
        raise ValueError(f"up_filter has {k_up} taps: it needs a multiple of ratio={ratio}, at least "
                         f"{3 * ratio - 2}")
    be = _aa_op.resolve((x, alpha, beta), backend)
    return _aa_op(x, alpha, beta, filters[0], filters[1], int(ratio), be)
