"""Public BigVGAN ops (Qwen2.5-Omni's Token2Wav vocoder): :func:`anti_aliased_snake`, :func:`padded_conv1d`.

Tensors are channels-first ``[B, C, T]`` like ``nn.Conv1d``. The semantics are transformers'
``Qwen2_5OmniAntiAliasedActivation1d(Qwen2_5OmniSnakeBeta(C))``; see :mod:`omni_fast.reference.bigvgan`.
:func:`conv1d` is ``nn.Conv1d`` with symmetric zero padding (BigVGAN's same-length convs) on the Code2Wav conv
kernels (:mod:`omni_fast.kernels.code2wav`, non-causal padding as a launch parameter), with an optional fused
output residual.
"""

from __future__ import annotations

import torch

import torch.nn.functional as F

from ..reference import bigvgan as ref
from ..validation import FLOAT_DTYPES, check_positive_int, check_same_dtype, check_tensor
from ._dispatch import dispatched_op
from .code2wav import MAX_CONV_SPAN, _check_bias, _check_kernel_size, _check_x


def _aa_fake(x, alpha, beta, f_up, f_down, ratio, seq_lens, backend):
    B, C, T = x.shape
    return x.new_empty(B, C, ref.output_length(T, ratio, f_down.numel()) if T else 0)


@dispatched_op("anti_aliased_snake", fake=_aa_fake)
def _aa_op(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, f_up: torch.Tensor, f_down: torch.Tensor,
           ratio: int, seq_lens: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Upsample FIR -> SnakeBeta -> low-pass FIR + decimate of x ``[B, C, T]`` (rows ``seq_lens[b]`` long)."""


@_aa_op.impl("reference")
def _aa_reference(x, alpha, beta, f_up, f_down, ratio, seq_lens):
    if seq_lens is None:
        return ref.anti_aliased_snake(x, alpha, beta, f_up, f_down, ratio)
    out = torch.zeros_like(x)  # each row as the unpadded signal it is, zeros past it
    for b, n in enumerate(seq_lens.clamp(1, x.shape[-1]).tolist()):
        out[b, :, :n] = ref.anti_aliased_snake(x[b:b + 1, :, :n], alpha, beta, f_up, f_down, ratio)[0]
    return out


@_aa_op.impl("triton")
def _aa_triton(x, alpha, beta, f_up, f_down, ratio, seq_lens):
    from ..kernels import bigvgan as kernels

    return kernels.anti_aliased_snake(x, alpha, beta, f_up, f_down, ratio, seq_lens=seq_lens)


def anti_aliased_snake(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, up_filter: torch.Tensor,
                       down_filter: torch.Tensor, *, ratio: int = 2, seq_lens: torch.Tensor | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """BigVGAN's anti-aliased SnakeBeta of x ``[B, C, T]`` (fp16/bf16/fp32), computed in fp32, rounded once.

    alpha/beta ``[C]`` (log space, x's dtype); ``up_filter`` ``[K_up]`` / ``down_filter`` ``[K_down]`` float32 FIRs
    (transformers' ``upsample.filter`` / ``downsample.filter``, any shape with that many elements), ``K_up`` a
    multiple of ``ratio``. Returns ``[B, C, T_out]`` (``T_out = T`` for the even BigVGAN filters) in x's dtype.

    ``seq_lens`` (int32/int64 ``[B]`` on x's device, values in ``[1, T]``, only where ``T_out = T``; optional): row
    ``b`` is a signal of ``seq_lens[b]`` samples padded to T: its output there equals the unpadded signal's (the
    replicate padding starts at the real end), and is ZERO past it (the zero padding the next conv expects). Read
    on the device only in the Triton kernel (CUDA-graph safe)."""
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
    if seq_lens is not None:
        check_tensor("seq_lens", seq_lens, dtypes=(torch.int32, torch.int64), shape=(x.shape[0],), device=x.device,
                     contiguous=True)
        if x.shape[-1] and ref.output_length(x.shape[-1], int(ratio), filters[1].numel()) != x.shape[-1]:
            raise ValueError("seq_lens needs filters whose output length is the input's (down_filter taps even)")
    be = _aa_op.resolve((x, alpha, beta), backend)
    return _aa_op(x, alpha, beta, filters[0], filters[1], int(ratio), seq_lens, be)


def _conv_fake(x, weight, bias, padding, stride, dilation, groups, residual, backend):
    B, _, T = x.shape
    return x.new_empty(B, weight.shape[0], max((T + 2 * padding - (weight.shape[-1] - 1) * dilation - 1)
                                               // stride + 1, 0))


@dispatched_op("conv1d_padded", fake=_conv_fake)
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, stride: int,
             dilation: int, groups: int, residual: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Zero-padded (non-causal) conv1d (+ residual out)."""


@_conv_op.impl("reference")
def _conv_reference(x, weight, bias, padding, stride, dilation, groups, residual):
    y = F.conv1d(x.float(), weight.float(), None if bias is None else bias.float(), stride=stride, padding=padding,
                 dilation=dilation, groups=groups)
    return (y if residual is None else y + residual.float()).to(x.dtype)


@_conv_op.impl("triton")
def _conv_triton(x, weight, bias, padding, stride, dilation, groups, residual):
    from ..kernels import code2wav as kernels

    return kernels.causal_conv1d(x, weight, bias, stride, dilation, groups, None, None, residual, None,
                                 padding=padding)[0]


def padded_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, padding: int,
           stride: int = 1, dilation: int = 1, groups: int = 1, residual: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """``nn.Conv1d(padding=padding)`` (zeros on both sides) of x ``[B, C_in, T]``, weight ``[C_out, C_in/groups,
    k]``, bias ``[C_out]``; ``residual`` ``[B, C_out, T_out]`` added to the output (fp32, one rounding). All floats
    in one dtype; fp32 accumulation. Returns ``[B, C_out, T_out]``, ``T_out = (T + 2p - (k-1)*dilation - 1) //
    stride + 1``; ``T = 0`` or ``T_out < 1`` raise ``ValueError`` (as ``nn.Conv1d``)."""
    _check_x(x)
    B, c_in, T = x.shape
    # bounded before anything is sized from them, as the causal convs' (MAX_CONV_SPAN)
    padding = check_positive_int("padding", padding, minimum=0, maximum=MAX_CONV_SPAN)
    stride = check_positive_int("stride", stride, maximum=MAX_CONV_SPAN)
    dilation = check_positive_int("dilation", dilation, maximum=MAX_CONV_SPAN)
    groups = check_positive_int("groups", groups)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=3, device=x.device)
    check_same_dtype(x=x, weight=weight)
    c_out, ci_g, k = weight.shape
    if c_in % groups or c_out % groups or ci_g * groups != c_in:
        raise ValueError(f"channel mismatch: weight [{c_out}, {ci_g}, {k}] with groups={groups} does not fit "
                         f"x's C_in={c_in}")
    _check_kernel_size(k)
    _check_bias(bias, c_out, x)
    t_out = (T + 2 * padding - (k - 1) * dilation - 1) // stride + 1
    if (T == 0 or t_out < 1) and x.shape[0]:  # (nn.Conv1d refuses both; the backends disagreed)
        raise ValueError(f"x has {T} samples: padded by {padding} on each side that is shorter than the kernel's span "
                         f"{(k - 1) * dilation + 1} (or empty), so there is no output sample")
    t_out = max(t_out, 0)
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES, shape=(B, c_out, t_out), device=x.device)
        check_same_dtype(x=x, residual=residual)
    be = _conv_op.resolve((x, weight), backend)
    return _conv_op(x, weight, bias, padding, stride, dilation, groups, residual, be)
