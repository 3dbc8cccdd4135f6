"""Fused layer ops of the MTP code predictor (decode-sized), used by :mod:`omni_fast.models.code_predictor`.

- :func:`add_rms_norm_`: ``h += delta`` in place, then Qwen3 RMSNorm of ``h`` (transformers' residual add +
  ``Qwen3OmniMoeRMSNorm``, same roundings);
- :func:`silu_mul`: ``silu(gate) * up`` from the fused gate/up projection;
- :func:`cached_attention`: write the new k/v into a static per-frame KV cache and attend (GQA, causal) over it.

Not exported from :mod:`omni_fast.ops` (they are the code predictor's building blocks); each has reference and
Triton implementations behind the dispatch layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.rope import rms_norm
from ..validation import FLOAT_DTYPES, check_same_dtype, check_tensor
from ._dispatch import dispatched_op


def _fake_norm(h, delta, weight, eps, backend):
    return torch.empty_like(h)


@dispatched_op("mtp_add_rms_norm_", mutates_args=("h",), fake=_fake_norm)
def _add_rms_norm_op(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     backend: str) -> torch.Tensor:
    """h += delta (in place); returns rms_norm(h) * weight."""


@_add_rms_norm_op.impl("reference")
def _add_rms_norm_reference(h, delta, weight, eps):
    if delta is not None:
        h.copy_(h + delta)
    return rms_norm(h, weight, eps)


@_add_rms_norm_op.impl("triton")
def _add_rms_norm_triton(*args):
    from ..kernels import mtp_layers

    return mtp_layers.add_rms_norm_(*args)


def add_rms_norm_(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, *, eps: float = 1e-6,
                  backend: str | None = None) -> torch.Tensor:
    """``h`` ``[N, H]`` (row-contiguous): ``h += delta`` in place (skipped when None); returns RMSNorm(h) ``[N, H]``."""
    check_tensor("h", h, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    N, H = h.shape
    if delta is not None:
        check_tensor("delta", delta, dtypes=FLOAT_DTYPES, shape=(N, H), device=h.device, last_dim_contiguous=True)
        check_same_dtype(h=h, delta=delta)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, shape=(H,), device=h.device, contiguous=True)
    check_same_dtype(h=h, weight=weight)
    be = _add_rms_norm_op.resolve((h, weight), backend)
    return _add_rms_norm_op(h, delta, weight, float(eps), be)


def _fake_silu(gu, backend):
    return gu.new_empty(gu.shape[0], gu.shape[1] // 2)


@dispatched_op("mtp_silu_mul", fake=_fake_silu)
def _silu_mul_op(gu: torch.Tensor, backend: str) -> torch.Tensor:
    """silu(gu[:, :I]) * gu[:, I:]."""


@_silu_mul_op.impl("reference")
def _silu_mul_reference(gu):
    gate, up = gu.chunk(2, -1)
    return F.silu(gate) * up


@_silu_mul_op.impl("triton")
def _silu_mul_triton(gu):
    from ..kernels import mtp_layers

    return mtp_layers.silu_mul(gu)


def silu_mul(gu: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``gu`` ``[N, 2I]`` (gate columns, then up columns) -> ``silu(gate) * up`` ``[N, I]`` (transformers' MLP)."""
    check_tensor("gu", gu, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    if gu.shape[1] % 2:
        raise ValueError(f"gu must have an even number of columns (gate and up), got {tuple(gu.shape)}")
    be = _silu_mul_op.resolve((gu,), backend)
    return _silu_mul_op(gu, be)


def _fake_attn(q, k, v, k_cache, v_cache, start, scale, backend):
    return q.new_empty(q.shape)


@dispatched_op("mtp_cached_attention", mutates_args=("k_cache", "v_cache"), fake=_fake_attn)
def _attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             start: int, scale: float, backend: str) -> torch.Tensor:
    """Write k/v into the caches at start; causal GQA attention of q over the cache."""


@_attn_op.impl("reference")
def _attn_reference(q, k, v, k_cache, v_cache, start, scale):
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    end = start + T
    k_cache[:, :, start:end] = k.transpose(1, 2)
    v_cache[:, :, start:end] = v.transpose(1, 2)
    qh = q.transpose(1, 2)
    mask = None
    if T > 1 and start > 0:
        pos = torch.arange(end, device=q.device)
        mask = pos[None, :] <= (start + torch.arange(T, device=q.device))[:, None]
    out = F.scaled_dot_product_attention(qh, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask,
                                         is_causal=T > 1 and start == 0, scale=scale, enable_gqa=Hq != Hk)
    return out.transpose(1, 2).contiguous()


@_attn_op.impl("triton")
def _attn_triton(*args):
    from ..kernels import mtp_layers

    return mtp_layers.cached_attention(*args)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, *, start: int, scale: float | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Decode attention over a static KV cache.

    q ``[B, T, Hq, d]``, k / v ``[B, T, Hk, d]`` (new tokens at positions start..start+T-1, unit stride in d),
    k_cache / v_cache ``[B, Hk, L, d]`` (contiguous in d; ``start + T <= L``, L <= 64). Writes k/v into the caches,
    returns the causal attention output ``[B, T, Hq, d]``; ``scale`` defaults to ``d ** -0.5``.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4, last_dim_contiguous=True)
    B, T, Hq, D = q.shape
    check_tensor("k", k, dtypes=FLOAT_DTYPES, shape=(B, T, None, D), device=q.device, last_dim_contiguous=True)
    Hk = k.shape[2]
    check_tensor("v", v, dtypes=FLOAT_DTYPES, shape=(B, T, Hk, D), device=q.device, last_dim_contiguous=True)
    check_tensor("k_cache", k_cache, dtypes=FLOAT_DTYPES, shape=(B, Hk, None, D), device=q.device,
                 last_dim_contiguous=True)
    L = k_cache.shape[2]
    check_tensor("v_cache", v_cache, dtypes=FLOAT_DTYPES, shape=(B, Hk, L, D), device=q.device,
                 last_dim_contiguous=True)
    check_same_dtype(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k heads ({Hk})")
    if L > 64:
        raise ValueError(f"cached_attention is for short caches (L <= 64), got L = {L}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0 or start + T > L:
        raise ValueError(f"start must be an int with 0 <= start and start + T <= L ({L}), got start={start!r}, T={T}")
    be = _attn_op.resolve((q, k, v, k_cache, v_cache), backend)
    return _attn_op(q, k, v, k_cache, v_cache, int(start), float(D**-0.5 if scale is None else scale), be)


__all__ = ["add_rms_norm_", "silu_mul", "cached_attention"]
