"""transformers ``ExpertsInterface`` entry for omni-fast's fused MoE.

After :func:`register` (called by :func:`omni_fast.register_transformers`), any transformers experts module
decorated with ``@use_experts_implementation`` runs :func:`experts_forward` when its config has
``_experts_implementation = "omni_fast"``: one :func:`omni_fast.ops.moe_experts` call (routing alignment, the two
grouped GEMMs with SwiGLU and the routed weight fused, the deterministic combine) instead of the per-expert loop.

Supported layout: transformers' default fused experts (``gate_up_proj [E, 2I, H]`` with gate rows then up rows,
``down_proj [E, H, I]``, no bias, not transposed, no post-expert norm, SiLU). Other layouts fall back to the
module's own (eager) forward, and so does any call that needs gradients (the fused op is inference-only: run
models under ``torch.no_grad()`` / ``torch.inference_mode()``, as ``generate`` does). Under transformers' expert
parallelism, the sentinel id ``num_experts`` marks a pair owned by another rank; it is mapped to -1 through an
``expert_map`` so it contributes zero.
"""

from __future__ import annotations

import torch

from ..backend import pinned_backend
from ..validation import records_grad


def _supported(module) -> bool:
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or getattr(getattr(module, "config", None), "hidden_act", None) == "silu"
    return (
        silu
        and getattr(module, "has_gate", True)
        and not getattr(module, "has_bias", False)
        and not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "has_post_expert_norm", False)
        and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(module, "down_proj", None), torch.Tensor)
    )


def _eager_forward(module):
    """The module's original forward (``use_experts_implementation`` wraps it with functools.wraps)."""
    forward = type(module).forward
    return getattr(forward, "__wrapped__", forward)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts forward with transformers' signature: x ``[T, H]``, ids ``[T, k]``, weights ``[T, k]`` -> ``[T, H]``."""
    from ..models.quantized import quantized_experts

    quant = quantized_experts(self)
    if quant is not None:  # quantized experts (models.quantized): only the fused op can run them
        return _fused(self, hidden_states, top_k_index, top_k_weights, quant, None, quant.num_experts)
    if records_grad(hidden_states, top_k_weights, self.gate_up_proj, self.down_proj) or not _supported(self):
        # The fused op has no autograd formula: training (or an unsupported layout) takes the eager loop.
        return _eager_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    return _fused(self, hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                  self.gate_up_proj.shape[0])


def _fused(self, hidden_states, top_k_index, top_k_weights, w13, w2, num_local: int) -> torch.Tensor:
    """One :func:`omni_fast.ops.moe_experts` call (w13 a tensor or a QuantizedExperts with w2 None)."""
    from .. import ops

    expert_map = None
    if getattr(self, "_is_expert_parallel", False):
        # ids [0, num_local) are this rank's; the EP sentinel id (== num_local) contributes zero. At least top_k
        # entries: several off-rank pairs of a token share the sentinel, so top_k may exceed num_local + 1.
        size = max(num_local + 1, top_k_index.shape[-1])
        expert_map = torch.arange(size, dtype=torch.int32, device=hidden_states.device)
        expert_map[num_local:] = -1
    # omni_fast.patch(model, backend=...) pins the backend on the module; otherwise the ambient one (use_backend/env)
    return ops.moe_experts(hidden_states, w13, w2, top_k_weights, top_k_index,
                           activation="silu", expert_map=expert_map,
                           backend=pinned_backend(self))


def register(name: str) -> None:
    """Register :func:`experts_forward` as the transformers experts implementation ``name``."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(name, experts_forward)
