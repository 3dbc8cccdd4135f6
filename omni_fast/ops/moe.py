"""Native MoE ops: routing, block alignment, fused experts, the whole sparse block.

- :func:`route_topk`: router logits ``[T, E]`` -> fp32 weights ``[T, k]``, int32 ids ``[T, k]``.
- :func:`align_moe_blocks`: group (token, slot) pairs by expert in runs padded to ``block_size``.
- :func:`moe_experts`: the routed SwiGLU experts, ``w13 [E, 2I, H]`` (gate rows then up rows), ``w2 [E, H, I]``.
- :func:`moe_block`: router GEMM + routing + fused experts + optional sigmoid-gated shared expert (Qwen3-Omni's
  thinker and talker sparse MoE blocks).

The names are not vLLM's on purpose: a function that carries a peer's name behaves like the peer's (issue 14).
vLLM's ``topk_softmax`` / ``moe_align_block_size`` (``omni_fast.ops`` re-exports them), ``fused_experts``,
``fused_topk`` and ``moe_sum`` live in :mod:`omni_fast.compat.vllm`, built on these.

Backends: ``reference`` and ``triton`` for all four; ``cuda`` (CUDA C++ through CuPy) for ``route_topk`` and
``align_moe_blocks``. The ``torch.library`` op names (``omni_fast::topk_softmax``,
``omni_fast::moe_align_block_size``, ``omni_fast::fused_moe_``) are kept: internal, and in our namespace, not vLLM's.
Semantics: :mod:`omni_fast.reference.moe`. Everything is CUDA-graph safe (fixed output sizes, no host sync); value
checks of index tensors run only where they cost no sync (CPU tensors, outside tracing).
"""

from __future__ import annotations

import math

import torch

from ..reference import moe as ref
from ..validation import (FLOAT_DTYPES, INT32_MAX, INT_DTYPES, check_bool, check_index_range, check_inference_only,
                          check_output, check_positive_int, check_same_dtype, check_tensor)
from ._dispatch import dispatched_op
from .moe_quant import fused_moe_quantized, moe_block_quantized
from .quant import QuantizedExperts

ACTIVATIONS = ref.ACTIVATIONS
# Size bounds the kernels honour (checked before any allocation): the alignment kernel holds every expert's count
# in one program, and its int32 outputs index up to max_padded_tokens(T*k, E, block_size).
MAX_EXPERTS = 4096
MAX_BLOCK_SIZE = 4096


# --- route_topk --------------------------------------------------------------------------------------------------


def _topk_softmax_fake(router_logits, top_k, renormalize, backend):
    T = router_logits.shape[0]
    return (router_logits.new_empty((T, top_k), dtype=torch.float32),
            router_logits.new_empty((T, top_k), dtype=torch.int32))


@dispatched_op("topk_softmax", fake=_topk_softmax_fake)
def _topk_softmax_op(router_logits: torch.Tensor, top_k: int, renormalize: bool, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 softmax over experts, top-k (ties to the lowest index), optional renormalisation."""


@_topk_softmax_op.impl("reference")
def _topk_softmax_reference(router_logits, top_k, renormalize):
    return ref.topk_softmax(router_logits, top_k, renormalize)


@_topk_softmax_op.impl("triton")
def _topk_softmax_triton(router_logits, top_k, renormalize):
    from ..kernels import moe_routing

    return moe_routing.topk_softmax(router_logits, top_k, renormalize)


@_topk_softmax_op.impl("cuda")
def _topk_softmax_cuda(router_logits, top_k, renormalize):
    from ..kernels import cuda_moe

    return cuda_moe.topk_softmax(router_logits, top_k, renormalize)


def route_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool = True, *, backend: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``[T, E]`` (fp16/bf16/fp32) -> (weights fp32 ``[T, k]``, ids int32 ``[T, k]``).

    Softmax in fp32 over all E experts, the k largest (largest first, ties to the lowest expert index), divided by
    their sum when ``renormalize`` (Qwen3-Omni's ``norm_topk_prob``).
    """
    check_tensor("router_logits", router_logits, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    E = router_logits.shape[1]
    if E == 0:
        raise ValueError("router_logits must have at least one expert column")
    top_k = check_positive_int("top_k", top_k, maximum=E)
    renormalize = check_bool("renormalize", renormalize)
    be = _topk_softmax_op.resolve((router_logits,), backend)
    return _topk_softmax_op(router_logits, top_k, renormalize, be)


# --- align_moe_blocks --------------------------------------------------------------------------------------------


def _align_fake(topk_ids, block_size, num_experts, expert_map, backend):
    n = topk_ids.numel()
    blocks = -(-ref.max_padded_tokens(n, num_experts, block_size) // block_size)
    return (topk_ids.new_empty((blocks * block_size,), dtype=torch.int32),
            topk_ids.new_empty((blocks,), dtype=torch.int32), topk_ids.new_empty((1,), dtype=torch.int32))


@dispatched_op("moe_align_block_size", fake=_align_fake)
def _align_op(topk_ids: torch.Tensor, block_size: int, num_experts: int, expert_map: torch.Tensor | None,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group pairs by expert in runs padded to ``block_size``."""


@_align_op.impl("reference")
def _align_reference(topk_ids, block_size, num_experts, expert_map):
    return ref.moe_align_block_size(topk_ids, block_size, num_experts, expert_map)


@_align_op.impl("triton")
def _align_triton(topk_ids, block_size, num_experts, expert_map):
    from ..kernels import moe_align

    return moe_align.moe_align_block_size(topk_ids, block_size, num_experts, expert_map)


@_align_op.impl("cuda")
def _align_cuda(topk_ids, block_size, num_experts, expert_map):
    from ..kernels import cuda_moe

    return cuda_moe.moe_align_block_size(topk_ids, block_size, num_experts, expert_map)


def _check_expert_map(expert_map, num_global: int | None, num_local: int | None, device) -> None:
    check_tensor("expert_map", expert_map, dtypes=(torch.int32,), ndim=1, device=device, contiguous=True)
    if num_global is not None and expert_map.numel() != num_global:
        raise ValueError(f"expert_map must have one entry per global expert ({num_global}), got {expert_map.numel()}")
    # -1 = remote; without a local count (alignment) the local ids are at most the global ones
    check_index_range("expert_map", expert_map, -1, num_local if num_local is not None else expert_map.numel())


def align_moe_blocks(topk_ids: torch.Tensor, block_size: int, num_experts: int,
                     expert_map: torch.Tensor | None = None, *, backend: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids int ``[T, k]`` -> (sorted_token_ids, expert_ids, num_tokens_post_padded), all int32.

    ``sorted_token_ids`` ``[max_padded]``: the flat pair indices ``t*k + j`` grouped by expert, each expert's
    run padded to a multiple of ``block_size`` with the sentinel ``T*k``; ``expert_ids`` ``[max_padded /
    block_size]``: each block's expert (local id through ``expert_map``, -1 for remote experts and unused
    blocks); ``num_tokens_post_padded`` ``[1]``. ``max_padded = T*k + min(E, T*k)*(block_size-1)`` rounded up to
    a block: sizes depend on shapes only. The order of pairs inside one expert's run is unspecified (the
    Triton kernel claims rows with integer atomics; the reference keeps ascending order).
    """
    return _align(topk_ids, block_size, num_experts, expert_map, backend)


def _align(topk_ids, block_size, num_experts, expert_map, backend, check_ids: bool = True):
    """:func:`align_moe_blocks`; ``check_ids=False`` (vLLM's ``ignore_invalid_experts``) skips the range check of
    topk_ids: the kernels drop pairs whose id is outside ``[0, num_experts)``."""
    check_tensor("topk_ids", topk_ids, dtypes=INT_DTYPES, ndim=(1, 2))
    block_size = check_positive_int("block_size", block_size, maximum=MAX_BLOCK_SIZE)
    num_experts = check_positive_int("num_experts", num_experts, maximum=MAX_EXPERTS)
    n = topk_ids.numel()
    padded = -(-ref.max_padded_tokens(n, num_experts, block_size) // block_size) * block_size
    if padded > INT32_MAX:  # the outputs hold int32 pair indices (and the sentinel T*k)
        raise ValueError(f"topk_ids has {n} entries: padded to blocks of {block_size} over {num_experts} experts "
                         f"that is {padded} rows, more than the int32 outputs can index ({INT32_MAX})")
    if check_ids:
        check_index_range("topk_ids", topk_ids, 0, num_experts)
    if expert_map is not None:
        _check_expert_map(expert_map, num_experts, None, topk_ids.device)
    topk_ids = topk_ids.contiguous()
    be = _align_op.resolve((topk_ids,), backend)
    return _align_op(topk_ids, block_size, num_experts, expert_map, be)


# --- moe_experts -------------------------------------------------------------------------------------------------


@dispatched_op("fused_moe_", mutates_args=("out",))
def _fused_moe_op(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str, expert_map: torch.Tensor | None, out: torch.Tensor,
                  backend: str) -> None:
    """out = the routed experts' weighted sum (see :func:`moe_experts`)."""


@_fused_moe_op.impl("reference")
def _fused_moe_reference(hidden_states, w13, w2, topk_weights, topk_ids, activation, expert_map, out):
    out.copy_(ref.fused_moe(hidden_states, w13, w2, topk_weights, topk_ids, activation, expert_map))


@_fused_moe_op.impl("triton")
def _fused_moe_triton(hidden_states, w13, w2, topk_weights, topk_ids, activation, expert_map, out):
    from ..kernels import moe_gemm

    moe_gemm.fused_moe(hidden_states, w13, w2, topk_weights, topk_ids, activation, expert_map, out)


def _check_experts(hidden_states, w13, w2, activation, expert_map) -> tuple[int, int, int]:
    """Validate x ``[T, H]`` and the expert weights; returns (E_local, E_global, I)."""
    check_tensor("hidden_states", hidden_states, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    H = hidden_states.shape[1]
    dev = hidden_states.device
    check_tensor("w13", w13, ndim=3, device=dev, last_dim_contiguous=True)
    E, two_i, _ = w13.shape
    check_tensor("w13", w13, shape=(E, two_i, H))
    if E == 0 or two_i == 0 or two_i % 2:
        raise ValueError(f"w13 must be [E, 2I, H] with E >= 1 and an even, non-zero 2I, got {list(w13.shape)}")
    inter = two_i // 2
    check_tensor("w2", w2, ndim=3, shape=(E, H, inter), device=dev, last_dim_contiguous=True)
    check_same_dtype(hidden_states=hidden_states, w13=w13, w2=w2)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    num_global = E
    if expert_map is not None:
        _check_expert_map(expert_map, None, E, dev)
        num_global = expert_map.numel()
    return E, num_global, inter


def _check_routing(topk_weights, topk_ids, T: int, num_global: int, dev, check_ids: bool = True) -> None:
    """topk_ids int / topk_weights float ``[T, k]`` on ``dev``, ``1 <= k <= num_global``; with ``check_ids`` the
    ids' values lie in ``[0, num_global)`` (where values are checkable: see :func:`_experts`)."""
    check_tensor("topk_ids", topk_ids, dtypes=INT_DTYPES, ndim=2, device=dev)
    k = topk_ids.shape[1]
    check_tensor("topk_ids", topk_ids, shape=(T, k))
    check_positive_int("top_k (topk_ids.shape[1])", k, maximum=num_global)
    check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, shape=(T, k), device=dev)
    if check_ids:
        check_index_range("topk_ids", topk_ids, 0, num_global)


def _check_out(out, hidden_states, **inputs) -> torch.Tensor:
    """``out=``: x's shape and dtype, no self-overlap (an expanded buffer would sum rows onto each other), and no
    memory shared with x or any other input (``inputs``)."""
    if out is None:
        return torch.empty_like(hidden_states)
    check_tensor("out", out, dtypes=(hidden_states.dtype,), shape=tuple(hidden_states.shape),
                 device=hidden_states.device, last_dim_contiguous=True)
    check_output("out", out, hidden_states=hidden_states, **inputs)
    return out


def moe_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, *, activation: str = "silu", expert_map: torch.Tensor | None = None,
                out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """The routed SwiGLU experts: ``out[t] = sum_j w[t,j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))``, e = ids[t,j].

    hidden_states ``[T, H]`` (fp16/bf16/fp32), w13 ``[E, 2I, H]`` (gate rows then up rows; transformers'
    ``gate_up_proj``), w2 ``[E, H, I]`` (``down_proj``), same dtype; topk_weights float ``[T, k]``; topk_ids int
    ``[T, k]`` global expert ids. ``expert_map`` (int32 ``[E_global]``, values in ``[-1, E)``) maps global ids to
    the rows of w13/w2 held here; pairs routed to -1 contribute zero. Ids outside ``[0, E_global)`` raise
    ``ValueError`` where values are checkable (CPU tensors; vLLM's ``fused_experts`` skips them instead, through
    the internal :func:`_experts`). Returns ``out`` ``[T, H]``. Inference-only: inputs that require grad (with
    grad mode on) raise ``ValueError``.

    Quantized experts: ``w13`` a :class:`~omni_fast.ops.quant.QuantizedExperts` (FP8 block W8A8 or INT4 W4A16)
    and ``w2=None`` (:mod:`omni_fast.ops.moe_quant`).
    """
    return _experts(hidden_states, w13, w2, topk_weights, topk_ids, activation, expert_map, out, backend)


def _experts(hidden_states, w13, w2, topk_weights, topk_ids, activation="silu", expert_map=None, out=None,
             backend=None, *, check_ids: bool = True) -> torch.Tensor:
    """:func:`moe_experts`, with the internal switch ``check_ids``.

    ``check_ids=True`` (the native op): ids outside ``[0, E_global)`` raise ``ValueError`` where values are
    checkable (CPU tensors outside tracing). ``check_ids=False`` (vLLM's ``fused_experts``,
    :mod:`omni_fast.compat.vllm`): such pairs (e.g. the -1 of padding rows) contribute exactly zero, whatever their
    weight, with no extra launch and no host sync, because every backend of the op already drops them: Triton
    (float and quantized: the alignment does not count them, the combine skips their rows), reference (float and
    quantized: :func:`omni_fast.reference.moe.fused_moe` leaves them out), and ``"cuda"`` (this op has no CUDA C++
    twin: it runs the Triton path).
    """
    # the output is written into a fresh (or given) buffer outside autograd: grads would be lost without a word
    check_inference_only("moe_experts", hidden_states=hidden_states, w13=w13, w2=w2, topk_weights=topk_weights)
    if isinstance(w13, QuantizedExperts):
        return fused_moe_quantized(hidden_states, w13, w2, topk_weights, topk_ids, activation=activation,
                                   expert_map=expert_map, out=out, backend=backend, check_ids=check_ids)
    E, num_global, _ = _check_experts(hidden_states, w13, w2, activation, expert_map)
    T = hidden_states.shape[0]
    _check_routing(topk_weights, topk_ids, T, num_global, hidden_states.device, check_ids)
    out = _check_out(out, hidden_states, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids,
                     expert_map=expert_map)
    topk_weights, topk_ids = topk_weights.contiguous(), topk_ids.contiguous()
    be = _fused_moe_op.resolve((hidden_states, w13, w2, topk_weights, topk_ids), backend)
    _fused_moe_op(hidden_states, w13, w2, topk_weights, topk_ids, activation, expert_map, out, be)
    return out


# --- moe_block ---------------------------------------------------------------------------------------------------


@dispatched_op("moe_block_", mutates_args=("out",))
def _moe_block_op(hidden_states: torch.Tensor, gate_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  top_k: int, renormalize: bool, shared_w13: torch.Tensor | None, shared_w2: torch.Tensor | None,
                  shared_gate_weight: torch.Tensor | None, activation: str, expert_map: torch.Tensor | None,
                  out: torch.Tensor, backend: str) -> None:
    """out = the sparse MoE block of x ``[T, H]`` (see :func:`moe_block`)."""


@_moe_block_op.impl("reference")
def _moe_block_reference(x, gate_weight, w13, w2, top_k, renormalize, sw13, sw2, sg, activation, expert_map, out):
    out.copy_(ref.moe_block(x, gate_weight, w13, w2, top_k, renormalize, sw13, sw2, sg, activation, expert_map))


@_moe_block_op.impl("triton")
def _moe_block_triton(x, gate_weight, w13, w2, top_k, renormalize, sw13, sw2, sg, activation, expert_map, out):
    from ..kernels import moe_gemm, moe_routing

    logits = torch.nn.functional.linear(x, gate_weight)  # router GEMM (cuBLAS), logits in the model dtype
    weights, ids = moe_routing.topk_softmax(logits, top_k, renormalize)
    weights = weights.to(x.dtype)  # transformers rounds the routing weights to the model dtype
    shared = None
    if sw13 is not None:
        # The shared expert is a one-expert grouped GEMM whose "routing weight" is its sigmoid gate; its output
        # is added in the combine's fp32 sum.
        gate = torch.sigmoid(torch.nn.functional.linear(x, sg))
        zero_ids = torch.zeros(x.shape[0], 1, dtype=torch.int32, device=x.device)
        shared = moe_gemm.fused_moe(x, sw13.unsqueeze(0), sw2.unsqueeze(0), gate, zero_ids, activation)
    moe_gemm.fused_moe(x, w13, w2, weights, ids, activation, expert_map, out, add=shared)


def moe_block(hidden_states: torch.Tensor, gate_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              top_k: int, *, renormalize: bool = True, shared_w13: torch.Tensor | None = None,
              shared_w2: torch.Tensor | None = None, shared_gate_weight: torch.Tensor | None = None,
              activation: str = "silu", expert_map: torch.Tensor | None = None, out: torch.Tensor | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Qwen3-Omni's sparse MoE block on x ``[..., H]``; returns ``[..., H]``.

    gate_weight ``[E_global, H]`` (the router), w13/w2 as in :func:`moe_experts`. Routing as transformers: logits in
    the model dtype, fp32 softmax + top-k (+ renormalisation), weights rounded to the model dtype. With
    ``shared_w13 [2Is, H]`` (shared gate_proj rows then up_proj rows), ``shared_w2 [H, Is]`` and
    ``shared_gate_weight [1, H]`` adds the talker's shared expert ``sigmoid(x @ g.T) * SwiGLU_shared(x)``.
    ``w13`` may be a :class:`~omni_fast.ops.quant.QuantizedExperts` with ``w2=None`` (shared expert in float).
    Inference-only: inputs that require grad (with grad mode on) raise ``ValueError``.
    """
    check_inference_only("moe_block", hidden_states=hidden_states, gate_weight=gate_weight, w13=w13, w2=w2,
                         shared_w13=shared_w13, shared_w2=shared_w2, shared_gate_weight=shared_gate_weight)
    if isinstance(w13, QuantizedExperts):
        return moe_block_quantized(hidden_states, gate_weight, w13, w2, top_k, renormalize=renormalize,
                                   shared_w13=shared_w13, shared_w2=shared_w2, shared_gate_weight=shared_gate_weight,
                                   activation=activation, expert_map=expert_map, out=out, backend=backend)
    check_tensor("hidden_states", hidden_states, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if hidden_states.dim() < 1:
        raise ValueError("hidden_states must have a hidden dimension")
    shape = hidden_states.shape
    x = hidden_states.reshape(math.prod(shape[:-1]), shape[-1])  # (-1 is ambiguous when H = 0)
    E, num_global, _ = _check_experts(x, w13, w2, activation, expert_map)
    H = x.shape[1]
    check_tensor("gate_weight", gate_weight, dtypes=(x.dtype,), shape=(num_global, H), device=x.device,
                 last_dim_contiguous=True)
    top_k = check_positive_int("top_k", top_k, maximum=num_global)
    renormalize = check_bool("renormalize", renormalize)
    shared = (shared_w13, shared_w2, shared_gate_weight)
    if any(s is not None for s in shared):
        if any(s is None for s in shared):
            raise ValueError("shared_w13, shared_w2 and shared_gate_weight must be given together")
        check_tensor("shared_w13", shared_w13, dtypes=(x.dtype,), ndim=2, device=x.device, last_dim_contiguous=True)
        two_is = shared_w13.shape[0]
        if two_is == 0 or two_is % 2 or shared_w13.shape[1] != H:
            raise ValueError(f"shared_w13 must be [2Is, H={H}] with an even, non-zero 2Is, "
                             f"got {list(shared_w13.shape)}")
        check_tensor("shared_w2", shared_w2, dtypes=(x.dtype,), shape=(H, two_is // 2), device=x.device,
                     last_dim_contiguous=True)
        check_tensor("shared_gate_weight", shared_gate_weight, dtypes=(x.dtype,), shape=(1, H), device=x.device,
                     last_dim_contiguous=True)
    if out is not None:
        check_tensor("out", out, dtypes=(x.dtype,), shape=tuple(shape), device=x.device, contiguous=True)
        out = out.view(-1, H)
    out = _check_out(out, x, gate_weight=gate_weight, w13=w13, w2=w2, shared_w13=shared_w13, shared_w2=shared_w2,
                     shared_gate_weight=shared_gate_weight, expert_map=expert_map)
    be = _moe_block_op.resolve((x, gate_weight, w13, w2), backend)
    _moe_block_op(x, gate_weight, w13, w2, top_k, renormalize, shared_w13, shared_w2, shared_gate_weight,
                  activation, expert_map, out, be)
    return out.reshape(shape)


__all__ = ["align_moe_blocks", "moe_block", "moe_experts", "route_topk"]
