"""Call-form helpers of :mod:`omni_fast.compat.vllm`: vLLM's ``MoEActivation`` enum and the reading of v0.11-style
``fused_experts`` calls under the newest signature.

vLLM 0.34.0 (``vllm/model_executor/layers/fused_moe/fused_moe.py``) has ``fused_experts(hidden_states, w1, w2,
topk_weights, topk_ids, activation=MoEActivation.SILU, apply_router_weight_on_input=False, global_num_experts=-1,
expert_map=None, quant_config=None)``: no ``inplace`` (the result is always a new tensor) and no
``allow_deep_gemm``, and ``activation`` is an enum (``activation.value`` is what the op takes). The v0.11 line had
``(..., topk_ids, inplace=False, activation="silu", apply_router_weight_on_input=False, global_num_experts=-1,
expert_map=None, quant_config=None, allow_deep_gemm=False)``.

A v0.11 call still works here: ``inplace`` / ``allow_deep_gemm`` are keyword-only extensions, and a positional
v0.11 call puts a bool where the newest signature has ``activation``. A bool is never an activation, so that call
is recognised and its later positional values are read by their types, which differ at every position between
the two orders (activation: str/enum; apply_router_weight_on_input: bool; global_num_experts: int; expert_map:
tensor; quant_config: a config object). :func:`resolve_v011_call` does that.
"""

from __future__ import annotations

from enum import Enum

import torch


class MoEActivation(Enum):
    """vLLM's MoE activations (``vllm.model_executor.layers.fused_moe.activation.MoEActivation``, 0.34.0): same
    member names and values. ``fused_experts`` runs ``SILU`` (gate rows then up rows of w1); the others raise
    ``ValueError`` there, as any other unsupported activation."""

    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    RELU2 = "relu2"
    SWIGLUOAI = "swigluoai"
    SITU = "situ"
    SWIGLUOAI_UNINTERLEAVE = "swigluoai_uninterleave"
    SWIGLUSTEP = "swiglustep"
    SILU_NO_MUL = "silu_no_mul"
    GELU_NO_MUL = "gelu_no_mul"
    GELU_TANH_NO_MUL = "gelu_tanh_no_mul"
    RELU2_NO_MUL = "relu2_no_mul"

    @property
    def is_gated(self) -> bool:
        """True for ``act(gate) * up`` activations (w1 holds 2I rows), False for the ``*_no_mul`` ones."""
        return not self.value.endswith("_no_mul")

    def without_mul(self) -> "MoEActivation":
        """The non-gated (``*_no_mul``) variant where vLLM 0.34 has one (SILU, GELU, GELU_TANH, RELU2), else self."""
        return MoEActivation.__members__.get(f"{self.name}_NO_MUL", self)

    @classmethod
    def from_str(cls, s: str) -> "MoEActivation":
        """By value; vLLM 0.34's alias ``"gelu_pytorch_tanh"`` is ``GELU_TANH``."""
        s = {"gelu_pytorch_tanh": "gelu_tanh"}.get(s, s)
        for member in cls:
            if member.value == s:
                return member
        raise ValueError(f"Unknown MoE activation: {s!r}. Valid activations: {[m.value for m in cls]}")


def activation_name(activation) -> str:
    """A ``MoEActivation`` (ours or vLLM's: any Enum with a string value) or a string -> the activation's name."""
    if isinstance(activation, Enum) and isinstance(activation.value, str):
        return activation.value
    if isinstance(activation, str):
        return activation
    raise TypeError(f"activation must be a MoEActivation or a str, got {type(activation).__name__}")


_DEFAULTS = {"apply_router_weight_on_input": False, "global_num_experts": -1, "expert_map": None,
             "quant_config": None}


def _meaning(value) -> str:
    """Which parameter a value passed in a v0.11 call means, by its type (see the module docstring)."""
    if isinstance(value, (str, Enum)):
        return "activation"
    if isinstance(value, bool):
        return "apply_router_weight_on_input"
    if isinstance(value, int):
        return "global_num_experts"
    if isinstance(value, torch.Tensor):
        return "expert_map"
    return "quant_config"


def resolve_v011_call(inplace_value: bool, slots: dict) -> dict:
    """A call whose ``activation`` is a bool (v0.11's positional ``inplace``) -> the newest keyword arguments.

    ``slots``: the values bound to apply_router_weight_on_input, global_num_experts, expert_map and quant_config
    (each either shifted from the v0.11 order or given by keyword). Values equal to their slot's default carry
    nothing; the rest are assigned by type. Returns ``inplace``, ``activation`` and those four.
    """
    out = dict(_DEFAULTS, activation=MoEActivation.SILU, inplace=inplace_value)
    seen = set()
    for slot, value in slots.items():
        if value is None or (value is _DEFAULTS[slot] or (type(value) is type(_DEFAULTS[slot])
                                                          and value == _DEFAULTS[slot])):
            continue
        name = _meaning(value)
        if name in seen:
            raise TypeError(f"fused_experts: {name} given twice (a v0.11 positional call: inplace, activation, "
                            "apply_router_weight_on_input, global_num_experts, expert_map; pass keywords instead)")
        seen.add(name)
        out[name] = value
    return out


__all__ = ["MoEActivation", "activation_name", "resolve_v011_call"]
