"""vLLM fused-MoE entry points on omni-fast kernels (unquantized, FP8 W8A8 and INT4 W4A16).

Signatures of vLLM 0.34.0 (PyPI, 2026-11-16, commit ``62d4bc3c7``; read from its sdist:
``vllm/model_executor/layers/fused_moe/fused_moe.py``, ``router/fused_topk_router.py``, ``moe_align_block_size.py``,
``vllm/_custom_ops.py`` and the kernels in ``csrc/moe/``). The v0.11 line (commit ``13cb3e4``) calls still work
where that is unambiguous (``docs/compat.md`` lists what changed):

- ``fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, activation=MoEActivation.SILU,
  apply_router_weight_on_input=False, global_num_experts=-1, expert_map=None, quant_config=None, *,
  inplace=False, allow_deep_gemm=False)`` (the two keyword-only ones: v0.11's, kept; see :mod:`.vllm_calls`)
- ``fused_topk(hidden_states, gating_output, topk, renormalize, indices_type=None, scoring_func="softmax")`` ->
  ``(topk_weights, topk_ids, token_expert_indices)``
- ``topk_softmax(topk_weights, topk_ids, token_expert_indices, gating_output, renormalize=False,
  e_score_correction_bias=None, is_padding=None)`` -> None, the ``_custom_ops`` out-parameter form
- ``moe_align_block_size(topk_ids, block_size, num_experts, expert_map=None, pad_sorted_ids=False,
  ignore_invalid_experts=False, return_scatter_idx=False)`` -> ``(sorted_ids, expert_ids, num_tokens_post_pad
  [, scatter_idx])`` with vLLM's sizes and sentinels
- ``moe_sum(input, output, topk_ids=None, expert_map=None)`` -> None
- the ``quant_config`` builders of ``fused_moe/config.py`` (0.34's signatures): :mod:`omni_fast.compat.vllm_config`

Weights: ``w1`` ``[E, 2I, H]`` (gate rows then up rows, vLLM's ``w13``), ``w2`` ``[E, H, I]``. Quantized MoE:
``quant_config`` with ``use_fp8_w8a8`` (block-scaled, per-channel or per-tensor) or ``use_int4_w4a16`` and vLLM's
scale / zero-point layouts (:mod:`omni_fast.compat.vllm_quant`); other quantized schemes and biases raise
``NotImplementedError``. Differences to vLLM are listed in ``docs/compat.md``.
"""

from __future__ import annotations

import torch

from ..ops import moe as _moe  # the native forms (route_topk, align_moe_blocks, moe_experts); not ``ops``: it
# re-exports this module's topk_softmax / moe_align_block_size and imports it while it initialises
from . import vllm_quant as _vq
from .vllm_calls import MoEActivation, activation_name, resolve_v011_call
from .vllm_config import (FUSED_MOE_UNQUANTIZED_CONFIG, FusedMoEQuantConfig, FusedMoEQuantDesc, GroupShape,
                          biased_moe_quant_config, fp8_w8a8_moe_quant_config, int4_w4a16_moe_quant_config,
                          int8_w8a8_moe_quant_config, int8_w8a16_moe_quant_config, mxfp4_w4a4_moe_quant_config,
                          nvfp4_moe_quant_config)
from ..validation import (FLOAT_DTYPES, INT_DTYPES, check_bool, check_inference_only, check_output, check_positive_int,
                          check_tensor)

VLLM_VERSION = "0.34.0"  # the release whose signatures these are (v0.11-style calls still work)

def fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, activation=MoEActivation.SILU,
                  apply_router_weight_on_input=False, global_num_experts=-1, expert_map=None, quant_config=None, *,
                  inplace=False, allow_deep_gemm=False):
    """``out[t] = sum_j w[t,j] * w2_e(act(w1_e x[t]))`` over the routed experts ``e = topk_ids[t, j]``.

    hidden_states ``[T, H]``; topk_weights fp32 / topk_ids int ``[T, k]`` (global expert ids; ids outside
    ``[0, global_num_experts)``, e.g. the -1 of padding rows, contribute zero, as vLLM 0.34 skips them);
    ``expert_map`` int32 ``[global_num_experts]`` maps global ids to local rows of w1/w2 (-1 = not here: zero).
    ``activation``: a ``MoEActivation`` (vLLM's enum or ours) or its string; ``SILU`` runs.
    ``apply_router_weight_on_input``: the router weight scales the expert's input instead of its output (any
    top-k, as vLLM 0.34). ``quant_config``: a ``FusedMoEQuantConfig`` (or any object with its attributes) with
    ``use_fp8_w8a8`` / ``use_int4_w4a16`` and vLLM's layouts (:mod:`omni_fast.compat.vllm_quant`). Returns a
    new ``[T, H]`` tensor.

    v0.11 calls: ``inplace`` (the result is also written into hidden_states, which is returned) and
    ``allow_deep_gemm`` (no effect) are keyword-only; a positional v0.11 call (a bool where ``activation`` is) is
    read by :func:`omni_fast.compat.vllm_calls.resolve_v011_call`.
    """
    if isinstance(activation, bool):  # v0.11's positional inplace: never an activation
        if inplace:
            raise TypeError("fused_experts: inplace given twice (positionally, v0.11 order, and by keyword)")
        call = resolve_v011_call(activation, dict(apply_router_weight_on_input=apply_router_weight_on_input,
                                                  global_num_experts=global_num_experts, expert_map=expert_map,
                                                  quant_config=quant_config))
        inplace, activation = call["inplace"], call["activation"]
        apply_router_weight_on_input, global_num_experts = (call["apply_router_weight_on_input"],
                                                            call["global_num_experts"])
        expert_map, quant_config = call["expert_map"], call["quant_config"]
    activation = activation_name(activation)
    check_inference_only("fused_experts", hidden_states=hidden_states, w1=w1, w2=w2, topk_weights=topk_weights)
    check_tensor("hidden_states", hidden_states, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    check_tensor("w1", w1, ndim=3)
    experts = _vq.experts_from_vllm(w1, w2, quant_config) if _vq.is_quantized(quant_config) else None
    if isinstance(global_num_experts, bool) or not isinstance(global_num_experts, int):
        raise TypeError(f"global_num_experts must be an int, got {type(global_num_experts).__name__}")
    expected = expert_map.numel() if isinstance(expert_map, torch.Tensor) else w1.shape[0]
    if global_num_experts not in (-1, expected):
        raise ValueError(f"global_num_experts must be -1 or {expected} (the "
                         f"{'expert_map size' if expert_map is not None else 'number of experts in w1'}), got "
                         f"{global_num_experts}")
    check_tensor("topk_ids", topk_ids, dtypes=INT_DTYPES, ndim=2)
    check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, shape=tuple(topk_ids.shape))
    hidden_in, topk_weights, topk_ids, fold = hidden_states, topk_weights, topk_ids, 0
    if check_bool("apply_router_weight_on_input", apply_router_weight_on_input):
        hidden_in, topk_weights, topk_ids, fold = _weights_on_input(hidden_states, topk_weights, topk_ids)
    # check_ids=False: pairs whose id is outside [0, expected) (vLLM 0.34's skipped ids) contribute exactly zero
    # inside every backend of the native op (no masking launches, no host sync; see omni_fast.ops.moe._experts)
    out = _moe._experts(hidden_in, experts if experts is not None else w1, None if experts is not None else w2,
                        topk_weights, topk_ids, activation, expert_map, check_ids=False)
    if fold:  # one row per (token, slot): sum each token's k rows
        out = out.view(hidden_states.shape[0], fold, hidden_states.shape[1]).sum(1)
    if check_bool("inplace", inplace):  # computed apart, then copied: out never aliases the input it reads
        return hidden_states.copy_(out)
    return out


def _weights_on_input(hidden_states, topk_weights, topk_ids):
    """``apply_router_weight_on_input``: the weight scales the expert's input (the first GEMM is linear:
    ``(w x) W1 == w (x W1)``, which is where vLLM 0.34 applies it) and the output side gets weight 1. Pairs with
    an invalid id keep it: the experts drop them (a NaN weight there scales a row nobody reads).
    Top-1: the input is scaled in place of a copy (one elementwise launch). Top-k > 1 (vLLM 0.34 accepts it; each
    pair has its own weight): one scaled row per pair, ``[T*k, H]``, routed top-1, summed back by the caller
    (``fold = k``; k times the activation bytes, 2 extra launches). Returns (hidden_in, weights, ids, fold)."""
    check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, ndim=2)
    (T, k), H = topk_weights.shape, hidden_states.shape[1]  # shapes spelled out: T may be 0
    scaled = hidden_states[:, None, :] * topk_weights.to(hidden_states.dtype)[:, :, None]  # [T, k, H]
    ones = torch.ones(T * k, 1, dtype=topk_weights.dtype, device=topk_weights.device)
    if k == 1:
        return scaled.view(T, H), ones, topk_ids, 0
    return scaled.view(T * k, H), ones, topk_ids.reshape(T * k, 1), k


def topk_softmax(topk_weights, topk_ids, token_expert_indices, gating_output, renormalize=False,
                 e_score_correction_bias=None, is_padding=None):
    """Fill topk_weights fp32 ``[T, k]``, topk_ids int ``[T, k]`` and token_expert_indices int32 ``[T, k]``
    (``j * T + t``, vLLM's "source row") from gating_output ``[T, E]``: softmax over all experts, the k largest
    (ties to the lower index), divided by their sum with ``renormalize``. Returns None.

    vLLM 0.34: ``e_score_correction_bias`` fp32 ``[E]`` is added to the probabilities for the choice only (the
    weights are the unbiased probabilities, renormalised over those); ``is_padding`` bool ``[T]`` marks rows whose
    ids become -1 (their weights and source rows are still written). Either runs the routing in PyTorch ops
    (a handful of small launches) instead of the fused kernel."""
    check_tensor("gating_output", gating_output, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    T, E, dev = gating_output.shape[0], gating_output.shape[1], gating_output.device
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2, device=dev)
    k = topk_weights.shape[1]
    check_tensor("topk_weights", topk_weights, shape=(T, k))
    check_tensor("topk_ids", topk_ids, dtypes=INT_DTYPES, shape=(T, k), device=dev)
    check_tensor("token_expert_indices", token_expert_indices, dtypes=(torch.int32,), shape=(T, k), device=dev)
    if e_score_correction_bias is not None:  # vLLM's op: float32, 1-D, one per expert, contiguous
        check_tensor("e_score_correction_bias", e_score_correction_bias, dtypes=(torch.float32,), shape=(E,),
                     device=dev, contiguous=True)
    if is_padding is not None:
        check_tensor("is_padding", is_padding, dtypes=(torch.bool,), shape=(T,), device=dev, contiguous=True)
    outs = dict(topk_weights=topk_weights, topk_ids=topk_ids, token_expert_indices=token_expert_indices)
    for name, t in outs.items():  # written in place: no self-overlap, nothing shared with the inputs or each other
        check_output(name, t, gating_output=gating_output, **{o: v for o, v in outs.items() if o != name})
    renormalize = check_bool("renormalize", renormalize)
    if e_score_correction_bias is None:
        weights, ids = _moe.route_topk(gating_output, k, renormalize)
    else:
        weights, ids = _biased_topk(gating_output.float().softmax(-1), e_score_correction_bias, k, renormalize)
    topk_weights.copy_(weights)
    topk_ids.copy_(ids if is_padding is None else ids.masked_fill(is_padding[:, None], -1))
    token_expert_indices.copy_(torch.arange(T * k, dtype=torch.int32, device=dev).view(k, T).t())


def _biased_topk(scores, bias, k: int, renormalize: bool):
    """Choose the k largest ``scores + bias`` (ties to the lower expert: a stable descending sort); weights are the
    unbiased scores, divided by their sum (1 where it is not positive, as vLLM's kernel) with ``renormalize``."""
    ids = torch.sort(scores + bias, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = scores.gather(1, ids)
    if renormalize:
        total = weights.sum(-1, keepdim=True)
        weights = weights / torch.where(total > 0, total, 1.0)
    return weights, ids.to(torch.int32)


def fused_topk(hidden_states, gating_output, topk, renormalize, indices_type=None, scoring_func="softmax"):
    """Router top-k: returns (topk_weights fp32, topk_ids int32 or ``indices_type``, token_expert_indices int32),
    each ``[T, topk]``. ``scoring_func`` (vLLM 0.34): ``"softmax"`` (the fused kernel) or ``"sigmoid"`` (per-expert
    sigmoid scores, the k largest, renormalised by their sum with ``renormalize``; PyTorch ops)."""
    check_tensor("hidden_states", hidden_states, ndim=2)
    check_tensor("gating_output", gating_output, dtypes=FLOAT_DTYPES, ndim=2)
    if hidden_states.shape[0] != gating_output.shape[0]:
        raise ValueError(f"gating_output must have one row per token of hidden_states ({hidden_states.shape[0]}), "
                         f"got {gating_output.shape[0]}")
    if scoring_func not in ("softmax", "sigmoid"):
        raise ValueError(f"Unsupported scoring function: scoring_func must be 'softmax' or 'sigmoid', got "
                         f"{scoring_func!r}")
    check_positive_int("topk", topk, maximum=max(gating_output.shape[1], 1))
    T, dev = hidden_states.shape[0], hidden_states.device
    weights = torch.empty(T, topk, dtype=torch.float32, device=dev)
    ids = torch.empty(T, topk, dtype=torch.int32 if indices_type is None else indices_type, device=dev)
    tei = torch.empty(T, topk, dtype=torch.int32, device=dev)
    if scoring_func == "softmax":
        topk_softmax(weights, ids, tei, gating_output, renormalize)
    else:
        zero = torch.zeros(gating_output.shape[1], dtype=torch.float32, device=dev)
        w, i = _biased_topk(gating_output.float().sigmoid(), zero, topk, check_bool("renormalize", renormalize))
        weights.copy_(w)
        ids.copy_(i)
        tei.copy_(torch.arange(T * topk, dtype=torch.int32, device=dev).view(topk, T).t())
    return weights, ids, tei


def _padded_length(numel: int, num_experts: int, block_size: int, pad_sorted_ids: bool) -> int:
    """vLLM's ``sorted_ids`` length: ``numel + E * (block - 1)``, rounded up to a block with ``pad_sorted_ids``,
    and at most ``numel * block`` when there are fewer routed pairs than experts."""
    n = numel + num_experts * (block_size - 1)
    if pad_sorted_ids:
        n = -(-n // block_size) * block_size
    if numel < num_experts:
        n = min(numel * block_size, n)
    return n


def moe_align_block_size(topk_ids, block_size, num_experts, expert_map=None, pad_sorted_ids=False,
                         ignore_invalid_experts=False, return_scatter_idx=False):
    """Group the ``T*k`` routed pairs by expert, each run padded to a multiple of block_size (vLLM 0.34).

    Returns ``sorted_ids`` int32 ``[L]`` (flat pair indices ``t*k + j``; padding = ``T*k``), ``expert_ids`` int32
    ``[cdiv(L, block_size)]`` and ``num_tokens_post_pad`` int32 ``[1]``, with ``L = numel + E * (block_size - 1)``
    (see :func:`_padded_length`); with ``return_scatter_idx`` also ``scatter_idx`` int32 ``[numel, 1]`` (``i`` for
    a pair that is counted, -1 otherwise). Pairs whose id is outside ``[0, num_experts)`` (e.g. -1) are skipped.
    ``expert_map`` without ``ignore_invalid_experts``: every valid pair is counted and each block's expert is read
    through the map (-1 = remote); with it: pairs of remote experts are skipped too and blocks hold local ids.
    Blocks past the used length are -1 (``expert_map[-1]`` when the map is applied afterwards, as vLLM indexes
    it).
    """
    ignore = check_bool("ignore_invalid_experts", ignore_invalid_experts)
    scatter = check_bool("return_scatter_idx", return_scatter_idx)
    if scatter and expert_map is not None and not ignore:
        raise ValueError("return_scatter_idx with expert_map requires ignore_invalid_experts=True")
    check_tensor("topk_ids", topk_ids, dtypes=INT_DTYPES, ndim=(1, 2))
    block_size = check_positive_int("block_size", block_size, maximum=_moe.MAX_BLOCK_SIZE)
    num_experts = check_positive_int("num_experts", num_experts, maximum=_moe.MAX_EXPERTS)
    ids, valid = topk_ids, None
    if scatter or (expert_map is not None and ignore):  # else the kernels skip invalid ids on their own
        valid = (ids >= 0) & (ids < num_experts)
    if expert_map is not None and ignore:  # the kernel maps first: remote pairs are not counted at all
        check_tensor("expert_map", expert_map, dtypes=(torch.int32,), shape=(num_experts,), device=ids.device)
        local = expert_map[torch.where(valid, ids, 0).long()]
        valid = valid & (local >= 0)
        ids = torch.where(valid, local, -1)
    mapped = expert_map if (expert_map is not None and not ignore) else None
    sorted_ids, expert_ids, npost = _moe._align(ids, block_size, num_experts, mapped, None, check_ids=False)
    length = _padded_length(topk_ids.numel(), num_experts, block_size, check_bool("pad_sorted_ids", pad_sorted_ids))
    sorted_ids = sorted_ids[:length]  # ours is rounded up to a whole block: same contents, vLLM's length
    blocks = -(-length // block_size)
    starts = torch.arange(blocks, dtype=torch.int32, device=topk_ids.device) * block_size
    fill = mapped[-1] if mapped is not None and mapped.numel() else -1
    expert_ids = torch.where(starts < npost, expert_ids[:blocks], fill)
    if not scatter:
        return sorted_ids, expert_ids, npost
    rows = torch.arange(topk_ids.numel(), dtype=torch.int32, device=topk_ids.device)
    return sorted_ids, expert_ids, npost, torch.where(valid.reshape(-1), rows, -1).view(-1, 1)


def moe_sum(input, output, topk_ids=None, expert_map=None):  # noqa: A002 - vLLM's parameter name
    """``output[t] = sum_j input[t, j]``: input ``[T, k, H]``, output ``[T, H]`` contiguous (same dtype). With
    ``topk_ids`` int ``[T, k]`` (vLLM 0.34's pad-aware sum) slots whose id is negative, or whose ``expert_map`` int32
    entry is negative, are left out. Returns None."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("output", output, dtypes=(input.dtype,), shape=(input.shape[0], input.shape[2]),
                 device=input.device, contiguous=True)
    check_output("output", output, input=input)
    if topk_ids is None:
        torch.sum(input, dim=1, out=output)
        return
    check_tensor("topk_ids", topk_ids, dtypes=INT_DTYPES, shape=tuple(input.shape[:2]), device=input.device)
    skip = topk_ids < 0
    if expert_map is not None:
        check_tensor("expert_map", expert_map, dtypes=(torch.int32,), ndim=1, device=input.device)
        skip = skip | (expert_map[torch.where(skip, 0, topk_ids).long()] < 0)
    torch.sum(torch.where(skip[..., None], 0, input), dim=1, out=output)


__all__ = ["VLLM_VERSION", "MoEActivation", "fused_experts", "fused_topk", "moe_align_block_size", "moe_sum",
           "topk_softmax",
           # vLLM's quant_config builders (vllm/model_executor/layers/fused_moe/config.py): omni_fast.compat.vllm_config
           "FUSED_MOE_UNQUANTIZED_CONFIG", "FusedMoEQuantConfig", "FusedMoEQuantDesc", "GroupShape",
           "biased_moe_quant_config", "fp8_w8a8_moe_quant_config", "int4_w4a16_moe_quant_config",
           "int8_w8a8_moe_quant_config", "int8_w8a16_moe_quant_config", "mxfp4_w4a4_moe_quant_config",
           "nvfp4_moe_quant_config"]
