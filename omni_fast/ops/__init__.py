"""Public ops of omni-fast: one entry point per op, each picking triton | cuda | reference.

See :mod:`omni_fast.backend` for how the backend is chosen and :mod:`omni_fast.ops._dispatch` for the
``torch.library`` registration that makes every op traceable by ``torch.compile`` and capturable in CUDA graphs.
"""

from .attention import flash_attn_varlen, flash_attn_with_kvcache
from .code2wav import causal_conv1d, causal_conv_transpose1d, snake_beta
from .moe import fused_moe, moe_align_block_size, moe_block, topk_softmax
from .quant import QuantizedExperts
from .rope import mrope, qk_norm_mrope
from .rvq import rvq_embed
from .sampling import sample

__all__ = [
    "QuantizedExperts",
    "causal_conv1d",
    "causal_conv_transpose1d",
    "flash_attn_varlen",
    "flash_attn_with_kvcache",
    "fused_moe",
    "moe_align_block_size",
    "moe_block",
    "mrope",
    "qk_norm_mrope",
    "rvq_embed",
    "sample",
    "snake_beta",
    "topk_softmax",
]
