"""Peer-exact entry points: the signatures other libraries' users already call, on omni-fast kernels.

- :mod:`omni_fast.compat.flash_attn`: FlashAttention-2 (flash-attn 2.8) ``flash_attn_func``,
  ``flash_attn_varlen_func``, ``flash_attn_with_kvcache`` and the ``*kvpacked*`` / ``*qkvpacked*`` variants;
- :mod:`omni_fast.compat.vllm`: vLLM's fused-MoE functions (``fused_experts``, ``fused_topk``, ``topk_softmax``,
  ``moe_align_block_size``, ``moe_sum``);
- :mod:`omni_fast.compat.vllm_flash_attn`: vLLM's FlashAttention fork (``vllm.vllm_flash_attn``):
  ``flash_attn_varlen_func`` (vLLM's order, ``out=``, ``fa_version``), ``flash_attn_with_kvcache``,
  ``get_scheduler_metadata`` and the version helpers vLLM's backend imports.

Same parameter names, positional order, defaults and return arity as the peer; the differences are listed in
``docs/compat.md``. Inference only: a call autograd would record raises, as does ``dropout_p > 0``.
"""

from . import flash_attn, vllm, vllm_flash_attn

__all__ = ["flash_attn", "vllm", "vllm_flash_attn"]
