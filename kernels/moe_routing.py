"""MoE routing in Triton: fp32 softmax over the experts, top-k, renormalisation, in one kernel.

One program routes ``BLOCK_T`` tokens: it loads their ``[BLOCK_T, E]`` logits (upcast to fp32), takes the
softmax, then picks the k largest probabilities one at a time (max, then the lowest index holding it, then
masks it out), so ties go to the lowest expert index. The k picked values are kept in registers and divided by
their sum (summed in selection order) when renormalising.

NaN ranks above every probability, as in ``torch.sort`` / ``torch.topk``: a row whose softmax is NaN (a NaN or
+inf logit, or every logit -inf) gets ids ``0..k-1`` and NaN weights, exactly as the reference; ids are always
in ``[0, E)``.

Shapes: logits ``[T, E]`` (any float dtype, unit stride in E), weights fp32 ``[T, k]``, ids int32 ``[T, k]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, static_case


@triton.jit
def topk_softmax_rows(x, mask_t, offs_e, mask_e, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Softmax + top-k (+ renormalisation) of fp32 logits ``x`` ``[BLOCK_T, BLOCK_E]`` (padding experts -inf):
    returns (fp32 weights, int32 ids) ``[BLOCK_T, BLOCK_K]`` (see the module doc). Shared by
    :func:`topk_softmax_kernel` and the talker's fused MoE phase (:mod:`.talker_fused`)."""
    x = tl.where(mask_t[:, None], x, 0.0)  # rows past T: finite values, no inf - inf
    x_max = tl.max(x, axis=1)
    p = tl.exp(x - x_max[:, None])
    p = tl.where(mask_e[None, :], p, 0.0)
    p = p / tl.sum(p, axis=1)[:, None]
    # Selection keys: a NaN probability (the whole row is NaN when a logit is NaN or +inf, or all are -inf) ranks
    # above every probability, as torch.sort / torch.topk rank NaN: such a row picks experts 0..k-1 with NaN
    # weights, like the reference. No NaN reaches the max / == below (max's NaN handling is unspecified and
    # NaN == NaN is false, which would leave no hit and an id >= E). Padding experts get -1 (below every
    # probability) so they are never picked; picked experts get -2. The key 2.0 (above every probability, <= 1)
    # stands for NaN.
    p = tl.where(p == p, p, 2.0)
    p = tl.where(mask_e[None, :], p, -1.0)
    offs_k = tl.arange(0, BLOCK_K)
    vals = tl.zeros((x.shape[0], BLOCK_K), dtype=tl.float32)
    idxs = tl.zeros((x.shape[0], BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)
        hit = p == best[:, None]
        arg = tl.min(tl.where(hit, offs_e[None, :], BLOCK_E), axis=1)
        val = tl.where(best == 2.0, float("nan"), best)
        vals = tl.where(offs_k[None, :] == j, val[:, None], vals)
        idxs = tl.where(offs_k[None, :] == j, arg[:, None], idxs)
        p = tl.where(offs_e[None, :] == arg[:, None], -2.0, p)
    if RENORMALIZE:
        vals = vals / tl.sum(vals, axis=1)[:, None]
    return vals, idxs


@triton.jit
def topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, num_tokens, stride_lt, num_experts,
                        TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid ``(cdiv(T, BLOCK_T),)``: one program routes ``BLOCK_T`` tokens (see the module doc).

    ``logits_ptr`` ``[T, E]`` (fp32/fp16/bf16, row stride ``stride_lt``, unit stride in E), ``weights_ptr`` fp32 and
    ``ids_ptr`` int32 ``[T, TOP_K]`` (contiguous). ``BLOCK_E`` = next power of 2 >= E, ``BLOCK_K`` = next power of 2
    >= ``TOP_K``; ``RENORMALIZE`` divides the k picked weights by their sum."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    mask_t = offs_t < num_tokens
    mask_e = offs_e < num_experts
    rows = offs_t.to(tl.int64)
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + offs_e[None, :],
                mask=mask_t[:, None] & mask_e[None, :], other=float("-inf")).to(tl.float32)
    vals, idxs = topk_softmax_rows(x, mask_t, offs_e, mask_e, TOP_K, RENORMALIZE, BLOCK_E, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    out_off = rows[:, None] * TOP_K + offs_k[None, :]
    out_mask = mask_t[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(weights_ptr + out_off, vals, mask=out_mask)
    tl.store(ids_ptr + out_off, idxs, mask=out_mask)


def _block_t(block_e: int) -> int:
    # About 2K logits per program: 16 tokens of 128 experts.
    return max(1, min(64, 2048 // block_e))


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits ``[T, E]`` -> (fp32 weights ``[T, k]``, int32 ids ``[T, k]``); see the module docstring."""
    T, E = router_logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    block_e = triton.next_power_of_2(E)
    block_t = _block_t(block_e)
    launch(topk_softmax_kernel, (triton.cdiv(T, block_t),), router_logits, weights, ids, T,
           router_logits.stride(0), E, TOP_K=top_k, RENORMALIZE=bool(renormalize), BLOCK_T=block_t,
           BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k), num_warps=4, device=router_logits.device)
    return weights, ids


for _dt in ("bf16", "fp16", "fp32"):
    for _k in (8, 6):
        static_case(
            f"topk_softmax_kernel[{_dt},E128,k{_k}]", topk_softmax_kernel,
            signature={"logits_ptr": f"*{_dt}", "weights_ptr": "*fp32", "ids_ptr": "*i32", "num_tokens": "i32",
                       "stride_lt": "i32", "num_experts": "i32", "TOP_K": "constexpr", "RENORMALIZE": "constexpr",
                       "BLOCK_T": "constexpr", "BLOCK_E": "constexpr", "BLOCK_K": "constexpr"},
            constexprs={"TOP_K": _k, "RENORMALIZE": True, "BLOCK_T": 16, "BLOCK_E": 128, "BLOCK_K": 8},
        )
