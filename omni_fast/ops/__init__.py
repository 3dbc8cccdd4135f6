"""Public ops of omni-fast: one entry point per op, each picking triton | cuda | reference.

See :mod:`omni_fast.backend` for how the backend is chosen and :mod:`omni_fast.ops._dispatch` for the
``torch.library`` registration that makes every op traceable by ``torch.compile`` and capturable in CUDA graphs.

Names rule (issue 14): a function here that carries a peer's name behaves like the peer's. ``flash_attn_with_kvcache``
has FlashAttention-2's signature (plus keyword-only extensions); ``topk_softmax`` and ``moe_align_block_size`` are
vLLM's (the same objects as in :mod:`omni_fast.compat.vllm`). The native MoE forms carry their own names:
``route_topk`` (tuple return, ``renormalize=True``), ``align_moe_blocks`` (block-rounded sizes, -1 for unused
blocks), ``moe_experts`` (routed experts from given weights/ids). ``tests/test_compat_names.py`` fixes this.
"""

from .attention import flash_attn_varlen, flash_attn_with_kvcache
from .bigvgan import anti_aliased_snake, padded_conv1d
from .code2wav import causal_conv1d, causal_conv_transpose1d, snake_beta, update_conv_states
from .dit import ada_layer_norm, block_attention, block_attention_plan, dit_qkv_rope, gated_ada_layer_norm
from .moe import align_moe_blocks, moe_block, moe_experts, route_topk
from .quant import QuantizedExperts
from .rope import mrope, qk_norm_mrope
from .rvq import rvq_embed
from .sampling import sample
from ..compat.vllm import moe_align_block_size, topk_softmax  # vLLM's forms, after .moe (they are built on it)

# Former native names that now belong to a peer or were renamed: a clear error instead of a silent other behaviour.
_RENAMED = {
    "fused_moe": "omni_fast.ops.fused_moe was renamed omni_fast.ops.moe_experts (same arguments); vLLM's "
                 "fused_moe(hidden_states, w1, w2, gating_output, topk, renormalize, ...) is not offered (vLLM 0.11 "
                 "dropped it): use omni_fast.compat.vllm.fused_topk + fused_experts",
}


def __getattr__(name: str):
    if name in _RENAMED:
        raise AttributeError(_RENAMED[name])
    raise AttributeError(f"module 'omni_fast.ops' has no attribute {name!r}")


__all__ = [
    "anti_aliased_snake",
    "ada_layer_norm",
    "block_attention",
    "block_attention_plan",
    "dit_qkv_rope",
    "gated_ada_layer_norm",
    "padded_conv1d",
    "QuantizedExperts",
    "align_moe_blocks",
    "causal_conv1d",
    "causal_conv_transpose1d",
    "update_conv_states",
    "flash_attn_varlen",
    "flash_attn_with_kvcache",
    "moe_align_block_size",
    "moe_block",
    "moe_experts",
    "mrope",
    "qk_norm_mrope",
    "route_topk",
    "rvq_embed",
    "sample",
    "snake_beta",
    "topk_softmax",
]
