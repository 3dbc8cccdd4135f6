"""Register omni-fast with transformers' extension points.

:func:`register_transformers` (idempotent) adds omni-fast as an experts implementation (``ExpertsInterface``,
name ``"omni_fast"``) and as an attention implementation (``AttentionInterface``, name ``"omni_fast"``). A model
then runs on omni-fast with ``config._experts_implementation = "omni_fast"`` / ``config._attn_implementation =
"omni_fast"``; :func:`omni_fast.patch` sets those for a whole Qwen-Omni model.
"""

from __future__ import annotations

EXPERTS_NAME = "omni_fast"
ATTENTION_NAME = "omni_fast"

_registered = False


def register_transformers() -> None:
    """Register omni-fast's experts and attention functions with transformers (safe to call many times)."""
    global _registered
    if _registered:
        return
    from . import hf_attention, hf_experts
    from .hf_compat import check_transformers_version

    check_transformers_version()

    hf_experts.register(EXPERTS_NAME)
    hf_attention.register(ATTENTION_NAME)
    _registered = True
