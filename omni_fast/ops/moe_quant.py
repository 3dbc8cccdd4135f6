"""Fused MoE on quantized experts: what :func:`omni_fast.ops.moe_experts` / :func:`omni_fast.ops.moe_block` run when
``w13`` is a :class:`~omni_fast.ops.quant.QuantizedExperts` (``w2`` is then None).

One custom op ``omni_fast::fused_moe_quant_`` (backends ``reference``: dequantize then the float reference, see
:mod:`omni_fast.reference.moe_quant`; ``triton``: :mod:`omni_fast.kernels.moe_gemm_quant`). The container is
passed through the op as its tensors plus (format, block_n, group_k, dynamic_scale; symmetric = no zero points) so
the op stays traceable and CUDA-graph capturable. Activations are fp16, bf16 or fp32 (fp32: CPU runs and tests).
Routing, alignment, ``expert_map`` and the deterministic combine are the float path's.
"""

from __future__ import annotations

import math

import torch

from ..reference import moe_quant as ref_quant
from ..validation import check_positive_int, check_tensor
from ._dispatch import dispatched_op
from .quant import QuantizedExperts

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rebuild(w13, w2, w13_scale, w2_scale, w13_zero, w2_zero, fmt, block_n, group_k, a13=None,
             a2=None, dynamic_scale="per_token") -> QuantizedExperts:
    if fmt == "fp8_block":
        return QuantizedExperts.fp8_block(w13, w2, w13_scale, w2_scale, (block_n, group_k))
    if fmt == "fp8_channel":
        return QuantizedExperts.fp8_channel(w13, w2, w13_scale, w2_scale, a13, a2, dynamic_scale)
    return QuantizedExperts.int4(w13, w2, w13_scale, w2_scale, group_k, w13_zero, w2_zero)


@dispatched_op("fused_moe_quant_", mutates_args=("out",))
def _fused_moe_quant_op(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor,
                        w2_scale: torch.Tensor, w13_zero: torch.Tensor | None, w2_zero: torch.Tensor | None,
                        fmt: str, block_n: int, group_k: int, w13_input_scale: torch.Tensor | None,
                        w2_input_scale: torch.Tensor | None, dynamic_scale: str, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, expert_map: torch.Tensor | None, add: torch.Tensor | None,
                        out: torch.Tensor, backend: str) -> None:
    """out = the routed quantized experts' weighted sum (+ add)."""


@_fused_moe_quant_op.impl("reference")
def _reference(x, w13, w2, s13, s2, z13, z2, fmt, block_n, group_k, a13, a2, dyn, topk_weights, topk_ids,
               expert_map, add, out):
    experts = _rebuild(w13, w2, s13, s2, z13, z2, fmt, block_n, group_k, a13, a2, dyn)
    y = ref_quant.fused_moe(x, experts, topk_weights, topk_ids, "silu", expert_map)
    out.copy_(y if add is None else y + add)


@_fused_moe_quant_op.impl("triton")
def _triton(x, w13, w2, s13, s2, z13, z2, fmt, block_n, group_k, a13, a2, dyn, topk_weights, topk_ids, expert_map,
            add, out):
    from ..kernels import moe_gemm_quant

    experts = _rebuild(w13, w2, s13, s2, z13, z2, fmt, block_n, group_k, a13, a2, dyn)
    moe_gemm_quant.fused_moe(x, experts, topk_weights, topk_ids, "silu", expert_map, out, add=add)


def check_quantized(name: str, experts, w2, hidden_states: torch.Tensor) -> None:
    """``experts`` is a QuantizedExperts (already self-consistent) on the device of ``hidden_states`` ``[..., H]``
    with hidden size H; w2 None. Raises ValueError naming ``name`` otherwise."""
    if w2 is not None:
        raise ValueError(f"w2 must be None when {name} is a QuantizedExperts (it holds both expert GEMMs)")
    if experts.device != hidden_states.device:
        raise ValueError(f"{name} must be on device {hidden_states.device}, got {experts.device}")
    if experts.hidden_size != hidden_states.shape[-1]:
        raise ValueError(f"{name} has hidden size {experts.hidden_size}, hidden_states has {hidden_states.shape[-1]}")


def _call(x, experts: QuantizedExperts, topk_weights, topk_ids, expert_map, add, out, backend) -> torch.Tensor:
    q = experts
    block_n = q.block[0] if q.format == "fp8_block" else 1
    group_k = {"fp8_block": (q.block or (0, 0))[1], "int4_w4a16": q.group_size}.get(q.format, 0)
    be = _fused_moe_quant_op.resolve((x,) + q.tensors(), backend)
    _fused_moe_quant_op(x, q.w13, q.w2, q.w13_scale, q.w2_scale, q.w13_zero, q.w2_zero, q.format, block_n,
                        group_k, q.w13_input_scale, q.w2_input_scale, q.dynamic_scale, topk_weights, topk_ids,
                        expert_map, add, out, be)
    return out


def fused_moe_quantized(hidden_states, experts, w2, topk_weights, topk_ids, *, activation="silu", expert_map=None,
                        out=None, backend=None, check_ids: bool = True) -> torch.Tensor:
    """:func:`omni_fast.ops.moe_experts` with ``w13`` = QuantizedExperts (see there): hidden_states ``[T, H]``
    (fp16/bf16/fp32), topk_weights float ``[T, k]``, topk_ids int32/int64 ``[T, k]``; returns out ``[T, H]`` in
    hidden_states' dtype.
    ``check_ids=False``: ids outside ``[0, E_global)`` contribute zero instead of raising (see
    :func:`omni_fast.ops.moe._experts`)."""
    from .moe import ACTIVATIONS, _check_expert_map, _check_out, _check_routing

    check_tensor("hidden_states", hidden_states, dtypes=ACT_DTYPES, ndim=2, last_dim_contiguous=True)
    check_quantized("w13", experts, w2, hidden_states)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    num_global = experts.num_experts
    if expert_map is not None:
        _check_expert_map(expert_map, None, experts.num_experts, hidden_states.device)
        num_global = expert_map.numel()
    _check_routing(topk_weights, topk_ids, hidden_states.shape[0], num_global, hidden_states.device, check_ids)
    out = _check_out(out, hidden_states, topk_weights=topk_weights, topk_ids=topk_ids, expert_map=expert_map,
                     **experts.named_tensors())
    return _call(hidden_states, experts, topk_weights.contiguous(), topk_ids.contiguous(), expert_map, None, out,
                 backend)


def moe_block_quantized(hidden_states, gate_weight, experts, w2, top_k, *, renormalize=True, shared_w13=None,
                        shared_w2=None, shared_gate_weight=None, activation="silu", expert_map=None, out=None,
                        backend=None) -> torch.Tensor:
    """:func:`omni_fast.ops.moe_block` with ``w13`` = QuantizedExperts: router GEMM, :func:`~omni_fast.ops.
    route_topk`, the talker's float shared expert (a one-expert :func:`~omni_fast.ops.moe_experts`), then the
    quantized routed experts with the shared output added in the combine's fp32 sum."""
    from . import moe as float_moe

    check_tensor("hidden_states", hidden_states, dtypes=ACT_DTYPES, last_dim_contiguous=True)
    if hidden_states.dim() < 1:
        raise ValueError("hidden_states must have a hidden dimension")
    shape = hidden_states.shape
    x = hidden_states.reshape(math.prod(shape[:-1]), shape[-1])  # (-1 is ambiguous when H = 0)
    check_quantized("w13", experts, w2, x)
    num_global = experts.num_experts
    if expert_map is not None:
        float_moe._check_expert_map(expert_map, None, experts.num_experts, x.device)
        num_global = expert_map.numel()
    check_tensor("gate_weight", gate_weight, dtypes=(x.dtype,), shape=(num_global, x.shape[1]), device=x.device,
                 last_dim_contiguous=True)
    check_positive_int("top_k", top_k, maximum=num_global)
    if activation not in float_moe.ACTIVATIONS:
        raise ValueError(f"activation must be one of {float_moe.ACTIVATIONS}, got {activation!r}")
    if out is not None:
        check_tensor("out", out, dtypes=(x.dtype,), shape=tuple(shape), device=x.device, contiguous=True)
        out = out.view(-1, x.shape[1])
    out = float_moe._check_out(out, x, gate_weight=gate_weight, shared_w13=shared_w13, shared_w2=shared_w2,
                               shared_gate_weight=shared_gate_weight, expert_map=expert_map, **experts.named_tensors())
    logits = torch.nn.functional.linear(x, gate_weight)
    weights, ids = float_moe.route_topk(logits, top_k, renormalize, backend=backend)
    weights = weights.to(x.dtype)  # transformers rounds the routing weights to the model dtype
    add = None
    if any(s is not None for s in (shared_w13, shared_w2, shared_gate_weight)):
        if any(s is None for s in (shared_w13, shared_w2, shared_gate_weight)):
            raise ValueError("shared_w13, shared_w2 and shared_gate_weight must be given together")
        # The float shared expert as a one-expert fused MoE whose routing weight is its sigmoid gate (validated
        # there); its output joins the routed sum before the one rounding (reference: added in the model dtype).
        gate = torch.sigmoid(torch.nn.functional.linear(x, shared_gate_weight))
        zero_ids = torch.zeros(x.shape[0], 1, dtype=torch.int32, device=x.device)
        add = float_moe.moe_experts(x, shared_w13.unsqueeze(0), shared_w2.unsqueeze(0), gate, zero_ids,
                                    activation=activation, backend=backend)
    return _call(x, experts, weights, ids, expert_map, add, out, backend).reshape(shape)
