"""Quantized-experts reference: quantize / dequantize the formats of :class:`omni_fast.ops.quant.QuantizedExperts`,
and the routed experts on them (dequantize, then :func:`omni_fast.reference.moe.fused_moe`).

- ``fp8_block``: weight value ``w * scale[n // bn, k // bk]``; activations quantized per token and per ``bk``-wide
  K group (:func:`fake_quant_fp8_groups`): e4m3 with scale ``max(amax, 1e-10) / 448``, round to nearest even.
  The reference runs each expert on the fake-quantized activations (what the W8A8 kernel multiplies), so it
  models the format, not just the weights.
- ``fp8_channel``: weight value ``w * scale[n]`` (per output channel; a per-tensor scale is the same on every row);
  activations fake-quantized with the expert's static per-tensor ``input_scale`` (:func:`fake_quant_fp8_static`),
  or dynamically: per token over the whole K row (``dynamic_scale="per_token"``, :func:`fake_quant_fp8_groups`
  with one group) or per tensor (``"per_tensor"``, vLLM's ``scaled_fp8_quant`` without a scale: one scale
  ``amax(|A|) / 448`` over the GEMM's whole input, :func:`per_tensor_scale`; the gate/up GEMM's input is every
  hidden_states row, the down GEMM's every routed (token, expert) row of the SwiGLU output in the model dtype).
- ``int4_w4a16``: weight value ``(q - zero) * scale[n, k // g]``, ``q`` unpacked from compressed-tensors'
  ``pack-quantized`` int32 words (value ``k`` in bits ``4*(k % 8)``, stored ``q + 8``). Activations stay 16-bit.

:func:`quantize_experts` builds containers from float weights (tests, benchmarks): fp8 scales ``amax / 448`` per
block; int4 symmetric ``scale = amax / 7.5``, asymmetric ``(max - min) / 15`` with an integer zero point. Any scale
makes a valid checkpoint; what must match the libraries is the dequantization, which the tests compare against
compressed-tensors' own ``dequantize`` and ``unpack_from_int32``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import moe as ref

FP8_MAX = 448.0
FP8_EPS = 1e-10  # floor of a group's amax: an all-zero group quantizes to zeros, not NaN


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- FP8 block ----------------------------------------------------------------------------------------------------


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, bn: int, bk: int) -> torch.Tensor:
    """``[..., ceil(rows/bn), ceil(cols/bk)]`` block scales -> ``[..., rows, cols]`` per element."""
    return scale.repeat_interleave(bn, dim=-2)[..., :rows, :].repeat_interleave(bk, dim=-1)[..., :cols]


def dequantize_fp8_block(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp8 ``[..., N, K]`` with fp32 block scales ``[..., ceil(N/bn), ceil(K/bk)]`` -> fp32 ``[..., N, K]``."""
    N, K = w.shape[-2:]
    return w.float() * _expand_blocks(scale.float(), N, K, *block)


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """float ``[..., N, K]`` -> (e4m3 ``[..., N, K]``, fp32 scale ``[..., ceil(N/bn), ceil(K/bk)]``), amax/448."""
    bn, bk = block
    N, K = w.shape[-2:]
    nb, kb = _cdiv(N, bn), _cdiv(K, bk)
    padded = F.pad(w.float().abs(), (0, kb * bk - K, 0, nb * bn - N))
    amax = padded.reshape(*w.shape[:-2], nb, bn, kb, bk).amax(dim=(-3, -1))
    scale = amax.clamp(min=FP8_EPS) / FP8_MAX
    q = (w.float() / _expand_blocks(scale, N, K, bn, bk)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fake_quant_fp8_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """Dynamic per-token, per-``group``-column e4m3 quantization of x ``[n, K]``, dequantized: fp32 ``[n, K]``.

    Each row's columns ``[g*group, (g+1)*group)`` (the last group may be short) share the scale
    ``max(amax, 1e-10) / 448``; values are ``x / scale`` rounded to e4m3 (nearest even), times the scale.
    """
    n, K = x.shape
    kb = _cdiv(K, group)
    xf = x.float()
    amax = F.pad(xf.abs(), (0, kb * group - K)).reshape(n, kb, group).amax(dim=-1)
    scale = (amax.clamp(min=FP8_EPS) / FP8_MAX).repeat_interleave(group, dim=-1)[:, :K]
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def fake_quant_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x ``[n, K]`` quantized to e4m3 with one per-tensor fp32 scale ``s`` (0-d or ``[1]``; static, or dynamic from
    :func:`per_tensor_scale`), dequantized: fp32 ``[n, K]``.

    vLLM's per-tensor quantization (``static_scaled_fp8_quant`` and ``dynamic_scaled_fp8_quant`` in its
    ``csrc/quantization/w8a8/fp8/common.cu``): ``q = e4m3(clamp(x * (1 / s), -448, 448))``, the reciprocal taken
    once in fp32, round to nearest even. ``s = 0`` (an all-zero input): vLLM's ``0 * inf`` NaNs clamp to 448, and
    the GEMM's ``acc * 0`` gives 0; here ``1 / s`` is taken as 0, so ``q = 0`` and the product is the same 0.
    """
    s = scale.float().reshape(())
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return (x.float() * inv).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s


def per_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """vLLM's dynamic per-tensor fp8 scale of x ``[n, K]``: fp32 0-d ``amax(|x|) / 448`` (no floor; its kernel
    takes ``max`` over rows of ``row_amax / 448``, the same value; an empty x gives 0, which nothing reads)."""
    amax = x.float().abs().amax() if x.numel() else torch.zeros((), device=x.device)
    return amax / FP8_MAX


# --- FP8 per channel / per tensor ---------------------------------------------------------------------------------


def dequantize_fp8_channel(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 ``[..., N, K]`` with fp32 scales ``[..., N, 1]`` (per channel) or ``[..., 1]`` / broadcastable (per
    tensor) -> fp32 ``[..., N, K]``."""
    return w.float() * scale.float()


def quantize_fp8_channel(w: torch.Tensor, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """float ``[..., N, K]`` -> (e4m3, fp32 scale ``[..., N, 1]`` amax/448 per row, or ``[..., 1, 1]`` per tensor
    over the last two dims)."""
    dims = (-2, -1) if per_tensor else (-1,)
    scale = w.float().abs().amax(dim=dims, keepdim=True).clamp(min=FP8_EPS) / FP8_MAX
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


# --- INT4 pack-quantized ------------------------------------------------------------------------------------------


def unpack_int4(packed: torch.Tensor, K: int) -> torch.Tensor:
    """compressed-tensors ``weight_packed`` int32 ``[..., ceil(K/8)]`` -> int8 ``[..., K]`` values in [-8, 7]."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nib = (packed.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift, then the low 4 bits: sign does not leak
    return (nib.reshape(*packed.shape[:-1], -1)[..., :K] - 8).to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7] ``[..., K]`` -> int32 ``[..., ceil(K/8)]`` (compressed-tensors' layout, K padded)."""
    K = q.shape[-1]
    nib = F.pad(q.to(torch.int64) + 8, (0, _cdiv(K, 8) * 8 - K)).reshape(*q.shape[:-1], -1, 8)
    word = (nib << torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)).sum(-1)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)  # two's complement wrap


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                    K: int) -> torch.Tensor:
    """packed int32 ``[..., N, ceil(K/8)]``, scale ``[..., N, K/g]``, zero int8 ``[..., N, K/g]`` or None ->
    fp32 ``[..., N, K]`` = ``(q - zero) * scale``."""
    q = unpack_int4(packed, K).float()
    if zero is not None:
        q = q - zero.float().repeat_interleave(group, dim=-1)
    return q * scale.float().repeat_interleave(group, dim=-1)


def quantize_int4(w: torch.Tensor, group: int, symmetric: bool = True, scale_dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """float ``[..., N, K]`` -> (packed int32, scale ``[..., N, K/g]``, zero int8 or None), group-wise along K."""
    *lead, N, K = w.shape
    g = w.float().reshape(*lead, N, K // group, group)
    if symmetric:
        scale = (g.abs().amax(-1) / 7.5).clamp(min=1e-8).to(scale_dtype)
        zero = None
        q = torch.round(g / scale.float().unsqueeze(-1)).clamp(-8, 7)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8).to(scale_dtype)
        zero = torch.round(-8 - lo / scale.float()).clamp(-8, 7).to(torch.int8)
        q = (torch.round(g / scale.float().unsqueeze(-1)) + zero.float().unsqueeze(-1)).clamp(-8, 7)
    return pack_int4(q.reshape(*lead, N, K)), scale, zero


# --- containers -----------------------------------------------------------------------------------------------------


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor, format: str, *, block=(128, 128), group_size: int = 128,
                     symmetric: bool = True, scale_dtype: torch.dtype = torch.float32, per_tensor: bool = False,
                     input_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                     dynamic_scale: str = "per_token"):
    """Float experts w13 ``[E, 2I, H]`` / w2 ``[E, H, I]`` -> :class:`QuantizedExperts` of ``format``.

    fp8_block quantizes gate_proj and up_proj separately (their own block grids, as a checkpoint holds them).
    fp8_channel: per row, or with ``per_tensor`` one scale per linear (gate, up, down) held as broadcast views;
    ``input_scales`` = (w13 ``[E]``, w2 ``[E]``) static activation scales (either may be None), else dynamic
    (``dynamic_scale`` "per_token" or "per_tensor").
    """
    from omni_fast.ops.quant import QuantizedExperts

    inter = w13.shape[1] // 2
    if format == "fp8_block":
        (qg, sg), (qu, su) = (quantize_fp8_block(w13[:, :inter], block), quantize_fp8_block(w13[:, inter:], block))
        q2, s2 = quantize_fp8_block(w2, block)
        return QuantizedExperts.fp8_block(torch.cat([qg, qu], 1), q2, torch.cat([sg, su], 1).contiguous(),
                                          s2.contiguous(), block)
    if format == "fp8_channel":
        inter = w13.shape[1] // 2
        parts = [quantize_fp8_channel(w, per_tensor) for w in (w13[:, :inter], w13[:, inter:], w2)]
        if per_tensor:  # one scale per linear, broadcast over its rows (a view: no per-row copy)
            s13 = torch.cat([parts[0][1].expand(-1, inter, 1), parts[1][1].expand(-1, inter, 1)], 1)
            s2 = parts[2][1].expand(-1, w2.shape[1], 1)
        else:
            s13, s2 = torch.cat([parts[0][1], parts[1][1]], 1), parts[2][1]
        a13, a2 = (None, None) if input_scales is None else input_scales
        return QuantizedExperts.fp8_channel(torch.cat([parts[0][0], parts[1][0]], 1), parts[2][0], s13, s2, a13, a2,
                                            dynamic_scale)
    if format == "int4_w4a16":
        p13, s13, z13 = quantize_int4(w13, group_size, symmetric, scale_dtype)
        p2, s2, z2 = quantize_int4(w2, group_size, symmetric, scale_dtype)
        return QuantizedExperts.int4(p13, p2, s13, s2, group_size, z13, z2, symmetric=symmetric)
    raise ValueError(f"format must be 'fp8_block', 'fp8_channel' or 'int4_w4a16', got {format!r}")


def dequantize_experts(q, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`QuantizedExperts` -> (w13 ``[E, 2I, H]``, w2 ``[E, H, I]``) in ``dtype`` (computed in fp32)."""
    E, inter, hidden = q.shape
    if q.format == "fp8_block":
        bn, bk = q.block
        nb = _cdiv(inter, bn)
        w13 = torch.cat([dequantize_fp8_block(q.w13[:, :inter], q.w13_scale[:, :nb], q.block),
                         dequantize_fp8_block(q.w13[:, inter:], q.w13_scale[:, nb:], q.block)], 1)
        w2 = dequantize_fp8_block(q.w2, q.w2_scale, q.block)
    elif q.format == "fp8_channel":
        w13, w2 = dequantize_fp8_channel(q.w13, q.w13_scale), dequantize_fp8_channel(q.w2, q.w2_scale)
    else:
        w13 = dequantize_int4(q.w13, q.w13_scale, q.w13_zero, q.group_size, hidden)
        w2 = dequantize_int4(q.w2, q.w2_scale, q.w2_zero, q.group_size, inter)
    return w13.to(dtype), w2.to(dtype)


def _w8a8_expert(group: int):
    """One expert's SwiGLU MLP with both GEMM inputs fake-quantized per token group (the kernel's math)."""

    def expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(fake_quant_fp8_groups(x, group).to(x.dtype), w13).chunk(2, dim=-1)
        act = F.silu(gate) * up
        return F.linear(fake_quant_fp8_groups(act, group).to(x.dtype), w2)

    return expert


def _quant_rows(x: torch.Tensor, scales: torch.Tensor | None, e: int) -> torch.Tensor:
    """fp8_channel's activation quantization (in x's dtype): per token when ``scales`` is None, else expert e's
    per-tensor scale."""
    return (fake_quant_fp8_groups(x, max(x.shape[1], 1)) if scales is None else
            fake_quant_fp8_static(x, scales[e])).to(x.dtype)


def _w8a8_channel_expert(a13: torch.Tensor | None, a2: torch.Tensor | None, probe: list | None = None):
    """fp8_channel: activations per token over the whole row (dynamic) or with expert e's per-tensor scales.
    ``probe``: collect each expert's SwiGLU output amax (fp32 0-d) there and return zeros (the down GEMM's
    per-tensor scale needs every expert's intermediate first)."""

    def expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = F.linear(_quant_rows(x, a13, e), w13).chunk(2, dim=-1)
        act = F.silu(gate) * up
        if probe is not None:
            probe.append(per_tensor_scale(act))
            return torch.zeros(x.shape[0], w2.shape[0], dtype=x.dtype, device=x.device)
        return F.linear(_quant_rows(act, a2, e), w2)

    expert.takes_index = True
    return expert


def _per_tensor_inputs(hidden_states, experts, w13, w2, topk_weights, topk_ids, expert_map):
    """fp8_channel with ``dynamic_scale="per_tensor"``: the (w13, w2) input scales ``[E]`` of this call, vLLM's
    way: the gate/up GEMM's over all of hidden_states; the down GEMM's over the SwiGLU outputs of every routed
    pair (a first pass through the experts; pairs vLLM skips -- ids outside ``[0, E_global)``, remote experts --
    count as zeros: vLLM's intermediate cache holds never-written memory there). Static scales are kept."""
    E = experts.num_experts
    a13, a2 = experts.w13_input_scale, experts.w2_input_scale
    if a13 is None:
        a13 = per_tensor_scale(hidden_states).expand(E)
    if a2 is None:
        found = [torch.zeros((), device=hidden_states.device)]
        ref.fused_moe(hidden_states, w13, w2, topk_weights, topk_ids, "silu", expert_map,
                      expert=_w8a8_channel_expert(a13, None, probe=found))
        a2 = torch.stack(found).amax().expand(E)
    return a13, a2


def _expert_fn(experts, scales=None):
    if experts.format == "fp8_block":
        return _w8a8_expert(experts.block[1])
    if experts.format == "fp8_channel":
        return _w8a8_channel_expert(*(scales or (experts.w13_input_scale, experts.w2_input_scale)))
    return ref._swiglu_expert


def fused_moe(hidden_states: torch.Tensor, experts, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation: str = "silu", expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts on quantized weights, in ``hidden_states.dtype``: dequantize, then
    :func:`omni_fast.reference.moe.fused_moe` (fp8: with activations fake-quantized as the format says).

    Pass fp32 ``hidden_states`` for the "exact" result that the kernels' tolerances are measured against.
    """
    w13, w2 = dequantize_experts(experts, hidden_states.dtype)
    scales = None
    if experts.format == "fp8_channel" and experts.dynamic_scale == "per_tensor":
        scales = _per_tensor_inputs(hidden_states, experts, w13, w2, topk_weights, topk_ids, expert_map)
    return ref.fused_moe(hidden_states, w13, w2, topk_weights, topk_ids, activation, expert_map,
                         expert=_expert_fn(experts, scales))


def moe_block(hidden_states: torch.Tensor, gate_weight: torch.Tensor, experts, top_k: int,
              renormalize: bool = True, shared_w13: torch.Tensor | None = None,
              shared_w2: torch.Tensor | None = None, shared_gate_weight: torch.Tensor | None = None,
              activation: str = "silu", expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`omni_fast.reference.moe.moe_block` with quantized routed experts (shared expert in float)."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    weights, ids = ref.router(x, gate_weight, top_k, renormalize)
    out = fused_moe(x, experts, weights, ids, activation, expert_map)
    if shared_w13 is not None:
        out = out + ref.shared_expert(x, shared_w13, shared_w2, shared_gate_weight)
    return out.reshape(shape)
