"""vLLM fused-MoE entry points on omni-fast kernels (unquantized, FP8 W8A8 and INT4 W4A16).

Signatures of vLLM's current release line (read from ``vllm/model_executor/layers/fused_moe/fused_moe.py``,
``moe_align_block_size.py`` and ``vllm/_custom_ops.py``, v0.11-era sources, commit ``13cb3e4``):

- ``fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, inplace=False, activation="silu",
  apply_router_weight_on_input=False, global_num_experts=-1, expert_map=None, quant_config=None,
  allow_deep_gemm=False)``
- ``fused_topk(hidden_states, gating_output, topk, renormalize, indices_type=None)`` ->
  ``(topk_weights, topk_ids, token_expert_indices)``
- ``topk_softmax(topk_weights, topk_ids, token_expert_indices, gating_output, renormalize=False)`` -> None, the
  ``_custom_ops`` out-parameter form (fills the three tensors)
- ``moe_align_block_size(topk_ids, block_size, num_experts, expert_map=None, pad_sorted_ids=False,
  ignore_invalid_experts=False)`` -> ``(sorted_ids, expert_ids, num_tokens_post_pad)`` with vLLM's sizes
- ``moe_sum(input, output)`` -> None
- the ``quant_config`` builders of ``fused_moe/config.py`` (``fp8_w8a8_moe_quant_config``,
  ``int4_w4a16_moe_quant_config``, ``FusedMoEQuantConfig``, ...): :mod:`omni_fast.compat.vllm_config`

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
from .vllm_config import (FUSED_MOE_UNQUANTIZED_CONFIG, FusedMoEQuantConfig, FusedMoEQuantDesc, GroupShape,
                          biased_moe_quant_config, fp8_w8a8_moe_quant_config, int4_w4a16_moe_quant_config,
                          int8_w8a8_moe_quant_config, int8_w8a16_moe_quant_config, mxfp4_w4a4_moe_quant_config,
                          nvfp4_moe_quant_config)
from ..validation import FLOAT_DTYPES, INT_DTYPES, check_bool, check_output, check_positive_int, check_tensor

VLLM_VERSION = "0.11"

def fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, inplace=False, activation="silu",
                  apply_router_weight_on_input=False, global_num_experts=-1, expert_map=None, quant_config=None,
                  allow_deep_gemm=False):
    """``out[t] = sum_j w[t,j] * w2_e(act(w1_e x[t]))`` over the routed experts ``e = topk_ids[t, j]``.

    hidden_states ``[T, H]``; topk_weights fp32 / topk_ids int ``[T, k]`` (global expert ids); ``expert_map``
    int32 ``[global_num_experts]`` maps global ids to local rows of w1/w2 (-1 = not here: contributes zero).
    ``inplace``: the result is written into hidden_states (and returned). ``apply_router_weight_on_input``
    (top-1 only, as vLLM): the router weight scales the expert's input instead of its output.
    ``allow_deep_gemm`` has no effect (DeepGEMM is an fp8 path). ``quant_config``: a ``FusedMoEQuantConfig`` (or
    any object with its attributes) with ``use_fp8_w8a8`` / ``use_int4_w4a16`` and vLLM's layouts, mapped onto
    :class:`omni_fast.ops.QuantizedExperts` (:mod:`omni_fast.compat.vllm_quant`); w1 is then vLLM's quantized
    ``[E, 2I, H]`` (int4: ``[E, 2I, H/2]`` bytes).
    """
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
    if apply_router_weight_on_input:
        check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, ndim=2)
        if topk_weights.shape[1] != 1:
            raise ValueError(f"apply_router_weight_on_input needs top-1 routing (topk_weights [T, 1]), got "
                             f"{list(topk_weights.shape)}")
        # linear first GEMM: (w * x) W1 == w * (x W1); the output side then gets weight 1
        hidden_in = hidden_states * topk_weights.to(hidden_states.dtype)
        topk_weights = torch.ones_like(topk_weights)
    else:
        hidden_in = hidden_states
    if experts is not None:  # the container holds both GEMMs' weights
        out = _moe.moe_experts(hidden_in, experts, None, topk_weights, topk_ids, activation=activation,
                               expert_map=expert_map)
    else:
        out = _moe.moe_experts(hidden_in, w1, w2, topk_weights, topk_ids, activation=activation,
                               expert_map=expert_map)
    if inplace:  # computed apart, then copied: out never aliases the input it reads
        return hidden_states.copy_(out)
    return out


def topk_softmax(topk_weights, topk_ids, token_expert_indices, gating_output, renormalize=False):
    """Fill topk_weights fp32 ``[T, k]``, topk_ids int ``[T, k]`` and token_expert_indices int32 ``[T, k]``
    (``j * T + t``, vLLM's "source row") from gating_output ``[T, E]``: softmax over all experts, the k largest
    (ties to the lower index), divided by their sum with ``renormalize``. Returns None."""
    check_tensor("gating_output", gating_output, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    T, dev = gating_output.shape[0], gating_output.device
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2, device=dev)
    k = topk_weights.shape[1]
    check_tensor("topk_weights", topk_weights, shape=(T, k))
    check_tensor("topk_ids", topk_ids, dtypes=INT_DTYPES, shape=(T, k), device=dev)
    check_tensor("token_expert_indices", token_expert_indices, dtypes=(torch.int32,), shape=(T, k), device=dev)
    outs = dict(topk_weights=topk_weights, topk_ids=topk_ids, token_expert_indices=token_expert_indices)
    for name, t in outs.items():  # written in place: no self-overlap, nothing shared with the input or each other
        check_output(name, t, gating_output=gating_output, **{o: v for o, v in outs.items() if o != name})
    weights, ids = _moe.route_topk(gating_output, k, check_bool("renormalize", renormalize))
    topk_weights.copy_(weights)
    topk_ids.copy_(ids)
    token_expert_indices.copy_(torch.arange(T * k, dtype=torch.int32, device=dev).view(k, T).t())


def fused_topk(hidden_states, gating_output, topk, renormalize, indices_type=None):
    """Router top-k: returns (topk_weights fp32, topk_ids int32 or ``indices_type``, token_expert_indices int32),
    each ``[T, topk]``."""
    check_tensor("hidden_states", hidden_states, ndim=2)
    check_tensor("gating_output", gating_output, dtypes=FLOAT_DTYPES, ndim=2)
    if hidden_states.shape[0] != gating_output.shape[0]:
        raise ValueError(f"gating_output must have one row per token of hidden_states ({hidden_states.shape[0]}), "
                         f"got {gating_output.shape[0]}")
    check_positive_int("topk", topk, maximum=max(gating_output.shape[1], 1))
    T, dev = hidden_states.shape[0], hidden_states.device
    weights = torch.empty(T, topk, dtype=torch.float32, device=dev)
    ids = torch.empty(T, topk, dtype=torch.int32 if indices_type is None else indices_type, device=dev)
    tei = torch.empty(T, topk, dtype=torch.int32, device=dev)
    topk_softmax(weights, ids, tei, gating_output, renormalize)
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
                         ignore_invalid_experts=False):
    """Group the ``T*k`` routed pairs by expert, each run padded to a multiple of block_size.

    Returns ``sorted_ids`` int32 ``[L]`` (flat pair indices ``t*k + j``; padding = ``T*k``), ``expert_ids`` int32
    ``[cdiv(L, block_size)]`` (each block's expert, local through ``expert_map`` with -1 for remote experts;
    blocks past the used length 0, as vLLM's wrapper) and ``num_tokens_post_pad`` int32 ``[1]``, with
    ``L = numel + E * (block_size - 1)`` (see :func:`_padded_length`). ``ignore_invalid_experts``: pairs whose id
    is outside ``[0, num_experts)`` (e.g. -1) are skipped instead of rejected.
    """
    ignore = check_bool("ignore_invalid_experts", ignore_invalid_experts)
    sorted_ids, expert_ids, npost = _moe._align(topk_ids, block_size, num_experts, expert_map, None,
                                                check_ids=not ignore)
    block_size, num_experts = int(block_size), int(num_experts)  # checked by _align (python ints, numpy, 0-d)
    length = _padded_length(topk_ids.numel(), num_experts, block_size, check_bool("pad_sorted_ids", pad_sorted_ids))
    sorted_ids = sorted_ids[:length]  # ours is rounded up to a whole block: same contents, vLLM's length
    blocks = -(-length // block_size)
    starts = torch.arange(blocks, dtype=torch.int32, device=topk_ids.device) * block_size
    expert_ids = torch.where(starts < npost, expert_ids[:blocks], 0)
    return sorted_ids, expert_ids, npost


def moe_sum(input, output):  # noqa: A002 - vLLM's parameter name
    """``output[t] = sum_j input[t, j]``: input ``[T, k, H]``, output ``[T, H]`` (same dtype). Returns None."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("output", output, dtypes=(input.dtype,), shape=(input.shape[0], input.shape[2]),
                 device=input.device)
    torch.sum(input, dim=1, out=output)


__all__ = ["VLLM_VERSION", "fused_experts", "fused_topk", "moe_align_block_size", "moe_sum", "topk_softmax",
           # vLLM's quant_config builders (vllm/model_executor/layers/fused_moe/config.py): omni_fast.compat.vllm_config
           "FUSED_MOE_UNQUANTIZED_CONFIG", "FusedMoEQuantConfig", "FusedMoEQuantDesc", "GroupShape",
           "biased_moe_quant_config", "fp8_w8a8_moe_quant_config", "int4_w4a16_moe_quant_config",
           "int8_w8a8_moe_quant_config", "int8_w8a16_moe_quant_config", "mxfp4_w4a4_moe_quant_config",
           "nvfp4_moe_quant_config"]
