"""Mixture-of-experts reference: routing, block alignment, expert MLPs, the whole sparse block.

Computes exactly what transformers' Qwen3-Omni modules compute, in the same dtypes and the same order:

- :func:`topk_softmax`: ``Qwen3OmniMoe*TextTopKRouter`` minus the router GEMM (fp32 softmax over all experts,
  ``torch.topk``, optional renormalisation; weights stay fp32 here, ids are int32).
- :func:`fused_moe`: ``Qwen3OmniMoeThinkerTextExperts.forward`` (== the talker's): per expert
  ``down(silu(gate(x)) * up(x)) * w`` in the model dtype, ``index_add_`` into a model-dtype output in
  ascending expert order.
- :func:`moe_block`: ``Qwen3OmniMoeThinkerTextSparseMoeBlock`` / ``Qwen3OmniMoeTalkerTextSparseMoeBlock``.
- :func:`moe_align_block_size`: the vLLM-style expert alignment the grouped-GEMM kernels consume.

Weight layout (transformers' fused experts): ``w13 [E, 2I, H]`` (gate rows ``0..I-1``, then up rows),
``w2 [E, H, I]``. ``expert_map`` (int32 ``[E_global]``) maps a global expert id to this rank's local id, or -1 for
an expert held elsewhere (its tokens then contribute zero here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu",)


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``[T, E]`` (any float dtype) -> (weights fp32 ``[T, k]``, ids int32 ``[T, k]``).

    fp32 softmax over all E experts, top-k (largest first; ties to the lowest index), then division by
    the sum of the k selected probabilities when ``renormalize``. Both outputs are contiguous. NaN ranks first:
    a row with a NaN or +inf logit, or only -inf logits, gets ids ``0..k-1`` and NaN weights.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    # A stable descending sort is torch.topk with a defined tie order (torch.topk's own order on ties differs
    # between CPU and CUDA); without ties both select the same experts in the same order.
    # torch.sort (as torch.topk) ranks NaN above every number: a row whose softmax is NaN (a NaN or +inf logit, or
    # all -inf) selects experts 0..k-1 with NaN weights.
    weights, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    # Contiguous [T, k] (the fake impl's layout), not views into the [T, E] sort buffers.
    weights, ids = weights[..., :top_k].contiguous(), ids[..., :top_k].to(torch.int32).contiguous()
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def max_padded_tokens(num_entries: int, num_experts: int, block_size: int) -> int:
    """Worst-case length of ``sorted_token_ids`` for ``num_entries = T * k`` routed pairs.

    Each expert with at least one entry pads up to a multiple of ``block_size``; at most ``min(E, T*k)`` experts
    are hit, so ``T*k + min(E, T*k) * (block_size - 1)`` (vLLM's bound, tightened for decode where T*k < E).
    """
    return num_entries + min(num_experts, num_entries) * (block_size - 1)


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int,
                         expert_map: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the ``T*k`` (token, slot) pairs by expert, each expert's run padded to a multiple of ``block_size``.

    topk_ids: int ``[T, k]`` global expert ids in ``[0, num_experts)``. Returns

    - ``sorted_token_ids`` int32 ``[max_padded]``: flat pair indices ``t*k + j``, grouped by ascending expert,
      ascending pair index within an expert; padding and the unused tail hold the sentinel ``T*k``.
    - ``expert_ids`` int32 ``[max_padded / block_size]``: the expert of each block (the local id through
      ``expert_map``; -1 for an expert not on this rank and for blocks past ``num_tokens_post_padded``).
    - ``num_tokens_post_padded`` int32 ``[1]``: the used length of ``sorted_token_ids``.

    ``max_padded`` is :func:`max_padded_tokens` rounded up to a whole block; all sizes depend on shapes only.

    Unchecked bad input (the ops check values only where that costs no host sync): a pair whose id is outside
    ``[0, num_experts)`` is dropped (no row, not counted), and negative ``expert_map`` values read as -1, as in the
    kernels.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    n = flat.numel()
    num_blocks = -(-max_padded_tokens(n, num_experts, block_size) // block_size)
    rows = num_blocks * block_size
    # Out-of-range ids go to an extra bucket `num_experts`: sorted last, never given a row.
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    counts_all = torch.zeros(num_experts + 1, dtype=torch.int64, device=device).scatter_add_(
        0, key, torch.ones_like(key))
    counts = counts_all[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    end = torch.cumsum(padded, 0)
    start = end - padded
    total = end[-1:] if num_experts else torch.zeros(1, dtype=torch.int64, device=device)
    # Stable sort: within one expert, pairs keep ascending flat order.
    order = torch.sort(key, stable=True).indices
    k_sorted = key[order]
    first_of_expert = torch.cumsum(counts_all, 0) - counts_all
    rank = torch.arange(n, device=device) - first_of_expert[k_sorted]
    # Dropped pairs write to one spare slot past the end, cut off below.
    start_all = torch.cat([start, torch.full((1,), rows, dtype=start.dtype, device=device)])
    row = torch.where(k_sorted < num_experts, start_all[k_sorted] + rank, rows)
    sorted_ids = torch.full((rows + 1,), n, dtype=torch.int32, device=device)
    sorted_ids[row] = order.to(torch.int32)
    sorted_ids = sorted_ids[:rows]
    block_start = torch.arange(num_blocks, device=device) * block_size
    block_expert = torch.searchsorted(end, block_start, right=True)
    used = block_start < total
    block_expert = block_expert.clamp(max=max(num_experts - 1, 0))
    if expert_map is not None:
        block_expert = expert_map.long()[block_expert]
    expert_ids = torch.where(used & (block_expert >= 0), block_expert, torch.full_like(block_expert, -1))
    return sorted_ids, expert_ids.to(torch.int32), total.to(torch.int32)


def _swiglu_expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` for one expert: x ``[n, H]``, w13 ``[2I, H]``, w2 ``[H, I]``."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def fused_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu", expert_map: torch.Tensor | None = None, *,
              expert=_swiglu_expert) -> torch.Tensor:
    """The routed experts: x ``[T, H]``, w13 ``[E, 2I, H]``, w2 ``[E, H, I]``, weights ``[T, k]``, ids ``[T, k]``.

    Exactly ``Qwen3OmniMoeThinkerTextExperts.forward``: for each hit expert in ascending order, the SwiGLU MLP of
    its tokens in the model dtype, times the routing weight (``topk_weights`` as given: transformers passes them
    already rounded to the model dtype), accumulated with ``index_add_`` into a model-dtype ``[T, H]`` output.
    Pairs whose expert maps to -1 through ``expert_map`` contribute nothing. Returns ``[T, H]``.

    Unchecked bad input (as the kernels treat it): ids outside ``[0, E_global)`` and ``expert_map`` values outside
    ``[-1, E_local)`` act like a remote expert (the pair contributes nothing).

    ``expert(x_rows, w13[e], w2[e])`` computes one expert's MLP (the quantized reference swaps in one that
    quantizes its activations, :mod:`omni_fast.reference.moe_quant`).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    out = torch.zeros_like(hidden_states)
    ids = topk_ids.long()
    num_global = expert_map.numel() if expert_map is not None else w13.shape[0]
    valid = (ids >= 0) & (ids < num_global)
    ids = torch.where(valid, ids, -1)
    if expert_map is not None:
        ids = torch.where(valid, expert_map.long()[ids.clamp(min=0)], -1)
    ids = torch.where(ids < w13.shape[0], ids, -1)
    for e in torch.unique(ids[ids >= 0]).tolist():
        slot, token_idx = torch.where(ids.T == e)  # transformers' (slot, token) order: identical GEMM rows
        # an expert function with ``takes_index`` also gets e (per-expert static activation scales)
        y = expert(hidden_states[token_idx], w13[e], w2[e], *((e,) if getattr(expert, "takes_index", False) else ()))
        y = y * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def router(hidden_states: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' top-k router: logits in the model dtype, fp32 routing, weights cast back to the model dtype.

    Returns (weights ``[T, k]`` in ``hidden_states.dtype``, ids int32 ``[T, k]``).
    """
    logits = F.linear(hidden_states, gate_weight)
    weights, ids = topk_softmax(logits, top_k, renormalize)
    return weights.to(logits.dtype), ids


def shared_expert(hidden_states: torch.Tensor, shared_w13: torch.Tensor, shared_w2: torch.Tensor,
                  shared_gate_weight: torch.Tensor) -> torch.Tensor:
    """The talker's gated shared expert: ``sigmoid(x @ g.T) * down(silu(gate(x)) * up(x))``.

    shared_w13 ``[2Is, H]`` (gate_proj rows then up_proj rows), shared_w2 ``[H, Is]``, gate weight ``[1, H]``.
    """
    inter = shared_w13.shape[0] // 2
    # Two linears, as transformers' gate_proj and up_proj (a fused GEMM may sum in another order).
    gate = F.linear(hidden_states, shared_w13[:inter])
    up = F.linear(hidden_states, shared_w13[inter:])
    y = F.linear(F.silu(gate) * up, shared_w2)
    return torch.sigmoid(F.linear(hidden_states, shared_gate_weight)) * y


def moe_block(hidden_states: torch.Tensor, gate_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              top_k: int, renormalize: bool = True, shared_w13: torch.Tensor | None = None,
              shared_w2: torch.Tensor | None = None, shared_gate_weight: torch.Tensor | None = None,
              activation: str = "silu", expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """The whole sparse MoE block on x ``[..., H]``: router, routed experts, optional gated shared expert.

    gate_weight ``[E, H]`` is the router; without shared weights this is the thinker's block, with them the
    talker's (``routed + sigmoid(x @ g.T) * shared(x)``, added in the model dtype as transformers does).
    """
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    weights, ids = router(x, gate_weight, top_k, renormalize)
    out = fused_moe(x, w13, w2, weights, ids, activation, expert_map)
    if shared_w13 is not None:
        out = out + shared_expert(x, shared_w13, shared_w2, shared_gate_weight)
    return out.reshape(shape)
