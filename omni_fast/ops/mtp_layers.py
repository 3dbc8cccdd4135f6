"""Fused layer ops of the MTP code predictor (decode-sized), used by :mod:`omni_fast.models.code_predictor`.

- :func:`add_rms_norm_`: ``h += delta`` in place, then Qwen3 RMSNorm of ``h`` (transformers' residual add +
  ``Qwen3OmniMoeRMSNorm``, same roundings);
- :func:`silu_mul`: ``silu(gate) * up`` from the fused gate/up projection;
- :func:`cached_attention`: write the new k/v into a static per-frame KV cache and attend (GQA, causal) over it,
  optionally after the per-head q/k RMSNorm + 1-D RoPE (replacing ``qk_norm_mrope`` in a decode step);
- :func:`norm_linear`: RMSNorm + linear (+ SwiGLU) in one skinny-M GEMV kernel (qkv, gate/up, lm_head);
- :func:`linear_residual_`: ``resid += x @ W^T`` in one kernel (o-proj, down-proj).

Not exported from :mod:`omni_fast.ops` (they are the code predictor's building blocks); each has reference and
Triton implementations behind the dispatch layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.rope import rms_norm
from ..validation import (FLOAT_DTYPES, INT_DTYPES, check_float, check_index_range, check_output, check_positive_int,
                          check_same_dtype, check_tensor)
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
    """``h`` ``[N, H]`` (row-contiguous; fp16/bf16/fp32, delta ``[N, H]`` and weight ``[H]`` in h's dtype):
    ``h += delta`` in place (skipped when None); returns RMSNorm(h) * weight ``[N, H]`` in h's dtype."""
    check_tensor("h", h, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    N, H = h.shape
    if delta is not None:
        check_tensor("delta", delta, dtypes=FLOAT_DTYPES, shape=(N, H), device=h.device, last_dim_contiguous=True)
        check_same_dtype(h=h, delta=delta)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, shape=(H,), device=h.device, contiguous=True)
    check_same_dtype(h=h, weight=weight)
    eps = check_float("eps", eps, minimum=0.0)
    check_output("h", h, delta=delta, weight=weight)  # written in place while they are read
    be = _add_rms_norm_op.resolve((h, weight), backend)
    return _add_rms_norm_op(h, delta, weight, eps, be)


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
    """``gu`` ``[N, 2I]`` (fp16/bf16/fp32; gate columns, then up columns) -> ``silu(gate) * up`` ``[N, I]`` in gu's
    dtype (transformers' MLP)."""
    check_tensor("gu", gu, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    if gu.shape[1] % 2:
        raise ValueError(f"gu must have an even number of columns (gate and up), got {tuple(gu.shape)}")
    be = _silu_mul_op.resolve((gu,), backend)
    return _silu_mul_op(gu, be)


def _fake_attn(q, k, v, k_cache, v_cache, start, scale, q_norm, k_norm, cos, sin, eps, backend):
    return q.new_empty(q.shape)


@dispatched_op("mtp_cached_attention", mutates_args=("k_cache", "v_cache"), fake=_fake_attn)
def _attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             start: int, scale: float, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
             cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float, backend: str) -> torch.Tensor:
    """Optional q/k norm + 1-D RoPE; write k/v into the caches at start; causal GQA attention of q over the cache."""


@_attn_op.impl("reference")
def _attn_reference(q, k, v, k_cache, v_cache, start, scale, q_norm=None, k_norm=None, cos=None, sin=None,
                    eps=0.0):
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    end = start + T
    if q_norm is not None:
        # transformers' q_norm / k_norm, then apply_rotary_pos_emb in the model dtype (token t at position start + t).
        c = torch.cat((cos[start:end], cos[start:end]), -1)[None, :, None]  # [1, T, 1, D]
        s = torch.cat((sin[start:end], sin[start:end]), -1)[None, :, None]
        q, k = (_rope(rms_norm(x, w, eps).to(x.dtype), c, s) for x, w in ((q, q_norm), (k, k_norm)))
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


def _rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def rope_tables(positions: int, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin ``[positions, d/2]`` in ``dtype`` for 1-D positions 0..positions-1 (inv_freq fp32 ``[d/2]``),
    computed as transformers' rotary embedding does (fp32 angles and trigonometry, then cast): the tables
    :func:`cached_attention` takes."""
    pos = torch.arange(positions, device=inv_freq.device)
    freqs = pos[:, None].float() * inv_freq.float()[None, :]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


@_attn_op.impl("triton")
def _attn_triton(*args):
    from ..kernels import mtp_layers

    return mtp_layers.cached_attention(*args)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, *, start: int, scale: float | None = None,
                     q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, eps: float = 1e-6,
                     backend: str | None = None) -> torch.Tensor:
    """Decode attention over a static KV cache.

    q ``[B, T, Hq, d]``, k / v ``[B, T, Hk, d]`` (new tokens at positions start..start+T-1, unit stride in d),
    k_cache / v_cache ``[B, Hk, L, d]`` (contiguous in d; ``start + T <= L``, L <= 64; decode-sized steps:
    ``T * Hq / Hk <= 32``, the query rows one program holds). Writes k/v into the caches, returns the causal
    attention output ``[B, T, Hq, d]``; ``scale`` defaults to ``d ** -0.5``.

    With ``q_norm`` and ``k_norm`` (``[d]``) and the RoPE tables ``cos`` / ``sin`` (``[P, d/2]``, P >= start + T,
    row p = position p, see :func:`rope_tables`; all in the model dtype), q and the new k first get Qwen3's per-head
    RMSNorm (``eps``) and 1-D rotate-half RoPE at position ``start + t`` (the cache slot), as transformers'
    attention does before its cache update (the MTP code predictor: positions = cache slots); k is cached
    normalised and rotated, q/k/v themselves are not modified.
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
    if T * (Hq // max(Hk, 1)) > 32:  # the kernel holds a [T * group, L, D/2] tile per program in registers
        raise ValueError(f"cached_attention is for decode-sized steps: T * (q heads / k heads) must be <= 32, got "
                         f"T = {T} with {Hq} q heads and {Hk} k heads")
    start = check_positive_int("start", start, minimum=0)
    if start + T > L:
        raise ValueError(f"start must be an int with 0 <= start and start + T <= L ({L}), got start={start!r}, T={T}")
    scale = D**-0.5 if scale is None else check_float("scale", scale)
    eps = check_float("eps", eps, minimum=0.0)
    given = [n for n, t in (("q_norm", q_norm), ("k_norm", k_norm), ("cos", cos), ("sin", sin)) if t is not None]
    if given and len(given) != 4:
        raise ValueError(f"q_norm, k_norm, cos and sin go together (the fused norm + RoPE), got only {given}")
    if given:
        if D % 2:
            raise ValueError(f"head_dim must be even for rotate-half RoPE, got {D}")
        check_tensor("q_norm", q_norm, dtypes=FLOAT_DTYPES, shape=(D,), device=q.device, contiguous=True)
        check_tensor("k_norm", k_norm, dtypes=FLOAT_DTYPES, shape=(D,), device=q.device, contiguous=True)
        check_tensor("cos", cos, dtypes=FLOAT_DTYPES, shape=(None, D // 2), device=q.device, contiguous=True)
        check_tensor("sin", sin, dtypes=FLOAT_DTYPES, shape=tuple(cos.shape), device=q.device, contiguous=True)
        check_same_dtype(q=q, q_norm=q_norm, k_norm=k_norm, cos=cos, sin=sin)
        if cos.shape[0] < start + T:
            raise ValueError(f"cos/sin need a row per position up to start + T = {start + T}, got {cos.shape[0]}")
    inputs = dict(q=q, k=k, v=v, q_norm=q_norm, k_norm=k_norm, cos=cos, sin=sin)
    check_output("k_cache", k_cache, **inputs)  # the caches are written while the inputs are read
    check_output("v_cache", v_cache, k_cache=k_cache, **inputs)
    be = _attn_op.resolve((q, k, v, k_cache, v_cache), backend)
    return _attn_op(q, k, v, k_cache, v_cache, start, scale, q_norm, k_norm, cos, sin, eps, be)


# --- skinny-M linear layers with fused norm / SwiGLU / residual (decode GEMV) -----------------------------------


def _fake_norm_linear(x, norm_weight, weight, eps, swiglu, rows, gathered, backend):
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    return x.new_empty(x.shape[0] if rows is None else rows.shape[0], n)


@dispatched_op("mtp_norm_linear", mutates_args=("gathered",), fake=_fake_norm_linear)
def _norm_linear_op(x: torch.Tensor, norm_weight: torch.Tensor | None, weight: torch.Tensor, eps: float,
                    swiglu: bool, rows: torch.Tensor | None, gathered: torch.Tensor | None,
                    backend: str) -> torch.Tensor:
    """rms_norm(x[rows]) @ weight^T (optional norm and gather), optionally followed by silu(gate) * up."""


@_norm_linear_op.impl("reference")
def _norm_linear_reference(x, norm_weight, weight, eps, swiglu, rows=None, gathered=None):
    if rows is not None:
        x = F.embedding(rows, x)
        if gathered is not None:
            gathered.copy_(x)
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    y = F.linear(x, weight)
    if swiglu:
        gate, up = y.chunk(2, -1)
        y = F.silu(gate) * up
    return y


@_norm_linear_op.impl("triton")
def _norm_linear_triton(*args):
    from ..kernels import mtp_gemv

    return mtp_gemv.norm_linear(*args)


def _check_linear(x: torch.Tensor, weight: torch.Tensor, n_rows: int | None = None) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, shape=(n_rows, x.shape[1]), device=x.device,
                 last_dim_contiguous=True)
    check_same_dtype(x=x, weight=weight)


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor | None, weight: torch.Tensor, *, eps: float = 1e-6,
                swiglu: bool = False, rows: torch.Tensor | None = None, gathered: torch.Tensor | None = None,
                check_values: bool | None = None, backend: str | None = None) -> torch.Tensor:
    """``F.linear(rms_norm(x) * norm_weight, weight)`` in one kernel (decode-sized ``M``; no norm when None).

    x ``[M, K]`` (unit stride in K; any row stride, e.g. the last token of each sequence), norm_weight ``[K]``,
    weight ``[N, K]``; returns ``[M, N]`` in x's dtype. ``swiglu``: weight is the fused ``[gate; up]`` ``[2I, K]``
    and the result is transformers' MLP activation ``silu(gate) * up`` ``[M, I]``. Roundings as transformers'
    RMSNorm + ``nn.Linear`` (+ ``act_fn(gate) * up``).

    ``rows`` (int32/int64 ``[M]``): x is an embedding table ``[V, K]`` and the input is ``F.embedding(rows, x)``,
    gathered in the kernel's prologue (the next codebook's embedding of a decode step); ``gathered`` ``[M, K]``
    (optional) receives those rows, un-normalised (the step's residual stream). Row ids are range checked on CPU
    tensors (or with ``check_values=True``).
    """
    _check_linear(x, weight)
    M = x.shape[0]
    if rows is not None:
        check_tensor("rows", rows, dtypes=INT_DTYPES, ndim=1, device=x.device, contiguous=True)
        check_index_range("rows", rows, 0, x.shape[0], check_values=check_values)
        M = rows.shape[0]
    if gathered is not None:
        if rows is None:
            raise ValueError("gathered needs rows (it receives the gathered input rows)")
        check_tensor("gathered", gathered, dtypes=FLOAT_DTYPES, shape=(M, x.shape[1]), device=x.device,
                     last_dim_contiguous=True)
        check_same_dtype(x=x, gathered=gathered)
        check_output("gathered", gathered, x=x, rows=rows, weight=weight, norm_weight=norm_weight)
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, dtypes=FLOAT_DTYPES, shape=(x.shape[1],), device=x.device,
                     contiguous=True)
        check_same_dtype(x=x, norm_weight=norm_weight)
    if swiglu and weight.shape[0] % 2:
        raise ValueError(f"weight must have an even number of rows (gate and up) for swiglu, got "
                         f"{tuple(weight.shape)}")
    eps = check_float("eps", eps, minimum=0.0)
    be = _norm_linear_op.resolve((x, weight), backend)
    return _norm_linear_op(x, norm_weight, weight, eps, bool(swiglu), rows, gathered, be)


@dispatched_op("mtp_linear_residual_", mutates_args=("resid",))
def _linear_residual_op(resid: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, backend: str) -> None:
    """resid += x @ weight^T (in place)."""


@_linear_residual_op.impl("reference")
def _linear_residual_reference(resid, x, weight):
    resid.copy_(resid + F.linear(x, weight))


@_linear_residual_op.impl("triton")
def _linear_residual_triton(*args):
    from ..kernels import mtp_gemv

    mtp_gemv.linear_residual_(*args)


def linear_residual_(resid: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, *,
                     backend: str | None = None) -> torch.Tensor:
    """``resid += F.linear(x, weight)`` in place (o-proj / down-proj + the residual add); returns ``resid``.

    resid ``[M, N]``, x ``[M, K]``, weight ``[N, K]`` (unit stride in the last dims). The product is rounded to the
    model dtype before the add and the sum rounded again, as transformers' ``residual + self.o_proj(...)``.
    """
    _check_linear(x, weight)
    check_tensor("resid", resid, dtypes=FLOAT_DTYPES, shape=(x.shape[0], weight.shape[0]), device=x.device,
                 last_dim_contiguous=True)
    check_same_dtype(x=x, resid=resid)
    check_output("resid", resid, x=x, weight=weight)
    be = _linear_residual_op.resolve((resid, x, weight), backend)
    _linear_residual_op(resid, x, weight, be)
    return resid


__all__ = ["add_rms_norm_", "silu_mul", "cached_attention", "rope_tables", "norm_linear", "linear_residual_"]
