"""Public TM-RoPE ops: :func:`mrope` and the fused :func:`qk_norm_mrope`.

Both rotate q ``[T, Hq, D]`` and k ``[T, Hk, D]`` with Qwen-Omni's multimodal rotary embedding; positions are int
``[3, T]`` (rows t, h, w) or ``[T]`` (plain 1-D RoPE, as the MTP code predictor and Code2Wav use). See
:mod:`omni_fast.reference.rope` for the exact rule.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..reference import rope as ref
from ..validation import (FLOAT_DTYPES, INT_DTYPES, as_int, check_bool, check_float, check_inference_only,
                          check_output, check_same_dtype, check_tensor)
from ._dispatch import dispatched_op


@dispatched_op("mrope_", mutates_args=("q", "k"))
def _mrope_op(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
              mrope_section: list[int], interleaved: bool, attention_scaling: float,
              q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, backend: str) -> None:
    """In place: optional per-head RMSNorm, then TM-RoPE, on q and k."""


@_mrope_op.impl("reference")
def _mrope_reference(q, k, positions, inv_freq, mrope_section, interleaved, attention_scaling, q_weight, k_weight,
                     eps):
    kw = dict(mrope_section=mrope_section, interleaved=interleaved, attention_scaling=attention_scaling,
              inplace=True, inv_freq=inv_freq)
    if q_weight is None:
        ref.mrope(q, k, positions, **kw)
    else:
        ref.qk_norm_mrope(q, k, q_weight, k_weight, positions, eps=eps, **kw)


@_mrope_op.impl("triton")
def _mrope_triton(*args):
    from ..kernels import rope as kernels_rope

    kernels_rope.mrope_(*args)


@_mrope_op.impl("cuda")
def _mrope_cuda(*args):
    from ..kernels import cuda_rope

    cuda_rope.mrope_(*args)


def _validate(q, k, positions, mrope_section) -> tuple[torch.Tensor, list[int]]:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3, last_dim_contiguous=True)
    T, _, D = q.shape
    check_tensor("k", k, dtypes=FLOAT_DTYPES, shape=(T, None, D), device=q.device, last_dim_contiguous=True)
    check_same_dtype(q=q, k=k)
    if D % 2:
        raise ValueError(f"q head_dim must be even for rotate-half RoPE, got {D}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k need at least one head, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if isinstance(positions, torch.Tensor) and positions.is_floating_point():
        raise TypeError(f"positions must be an integer tensor (int32 or int64), got {positions.dtype}")
    check_tensor("positions", positions, dtypes=INT_DTYPES, ndim=(1, 2), device=q.device)
    if positions.dim() == 2 and positions.shape[0] != 3:
        raise ValueError(f"positions must have 3 rows (t, h, w) or be 1-D, got shape {tuple(positions.shape)}")
    if positions.shape[-1] != T:
        raise ValueError(f"positions must have one entry per token (T={T}), got shape {tuple(positions.shape)}")
    if isinstance(mrope_section, torch.Tensor) and mrope_section.dim() == 1:
        mrope_section = mrope_section.tolist()
    if isinstance(mrope_section, (str, bytes, torch.Tensor)) or not hasattr(mrope_section, "__len__"):
        raise TypeError(f"mrope_section must be a sequence of 3 ints (t, h, w), got {mrope_section!r}")
    if len(mrope_section) != 3:
        raise ValueError(f"mrope_section must be 3 non-negative ints (t, h, w), got {list(mrope_section)}")
    try:
        section = [as_int(f"mrope_section[{i}]", s) for i, s in enumerate(mrope_section)]
    except TypeError:
        section = [-1]
    if any(s < 0 for s in section):
        raise ValueError(f"mrope_section must be 3 non-negative ints (t, h, w), got {list(mrope_section)}")
    if sum(section) != D // 2:
        raise ValueError(f"mrope_section must sum to head_dim/2 = {D // 2}, got {section} (sum {sum(section)})")
    return positions.contiguous(), section


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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TM-RoPE on q ``[T, Hq, D]`` and k ``[T, Hk, D]`` (fp16/bf16/fp32); returns (q, k).

    positions: int32/int64 ``[3, T]`` (t, h, w rows) or ``[T]`` (1-D RoPE). ``interleaved=True`` is Qwen3-Omni's
    layout, ``False`` Qwen2.5-Omni's contiguous sections. ``inv_freq`` (fp32 ``[D/2]``) overrides the default
    ``1 / theta**(2j/D)``, e.g. for scaled RoPE variants. With ``inplace`` q and k are rotated in place.
    """
    positions, section = _validate(q, k, positions, mrope_section)
    inv_freq = _inv_freq(q, theta, inv_freq)
    interleaved, scaling = check_bool("interleaved", interleaved), check_float("attention_scaling", attention_scaling)
    check_inference_only("mrope", q=q, k=k)
    q, k = _writable(q, k, check_bool("inplace", inplace), positions=positions, inv_freq=inv_freq)
    be = _mrope_op.resolve((q, k, positions), backend)
    _mrope_op(q, k, positions, inv_freq, section, interleaved, scaling, None, None, 0.0, be)
    return q, k


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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head RMSNorm of q ``[T, Hq, D]`` and k ``[T, Hk, D]`` (one dtype: fp16/bf16/fp32; weights
    ``[D]`` fp16/bf16/fp32, ``eps``) and TM-RoPE in one pass; positions and the rest as :func:`mrope`. Returns
    (q, k)."""
    positions, section = _validate(q, k, positions, mrope_section)
    D = q.shape[-1]
    check_tensor("q_weight", q_weight, dtypes=FLOAT_DTYPES, shape=(D,), device=q.device, contiguous=True)
    check_tensor("k_weight", k_weight, dtypes=FLOAT_DTYPES, shape=(D,), device=q.device, contiguous=True)
    eps = check_float("eps", eps, minimum=0.0)
    inv_freq = _inv_freq(q, theta, inv_freq)
    interleaved, scaling = check_bool("interleaved", interleaved), check_float("attention_scaling", attention_scaling)
    check_inference_only("qk_norm_mrope", q=q, k=k, q_weight=q_weight, k_weight=k_weight)
    q, k = _writable(q, k, check_bool("inplace", inplace), positions=positions, inv_freq=inv_freq, q_weight=q_weight,
                     k_weight=k_weight)
    be = _mrope_op.resolve((q, k, positions), backend)
    _mrope_op(q, k, positions, inv_freq, section, interleaved, scaling, q_weight, k_weight, eps, be)
    return q, k


def _writable(q: torch.Tensor, k: torch.Tensor, inplace: bool, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the kernel writes them: in place, each free of self-overlap and disjoint from the other and from
    every input (``q is k`` would be rotated twice by one backend and once by another); else fresh copies."""
    if not inplace:
        return q.clone(), k.clone()
    check_output("q", q, **inputs)
    check_output("k", k, q=q, **inputs)
    return q, k


def _inv_freq(q: torch.Tensor, theta: float, inv_freq: torch.Tensor | None) -> torch.Tensor:
    half = q.shape[-1] // 2
    if inv_freq is None:
        theta = check_float("theta", theta, minimum=0.0, min_open=True)
        return ref.rope_inv_freq(q.shape[-1], theta, q.device)
    check_tensor("inv_freq", inv_freq, dtypes=(torch.float32,), shape=(half,), device=q.device, contiguous=True)
    return inv_freq


__all__ = ["mrope", "qk_norm_mrope"]
