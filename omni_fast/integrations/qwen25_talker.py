"""Qwen2.5-Omni's talker decode on omni-fast: the ``Qwen2_5OmniTalkerModel`` family of the decode takeover
(:mod:`omni_fast.integrations.decode_takeover`, which holds the mechanism for every talker text model; this module
keeps the names the Qwen2.5 code and tests import).

The Qwen2.5 talker's decoder: dense SwiGLU, q/k/v bias, no q/k norm, contiguous M-RoPE (config switches of the one
decode step of :class:`omni_fast.models.MoeTextDecoder`); the phase-fused step does not apply (dense layers), so
the ``fused_step`` fast path leaves it on the ops path and the patch report says why.
"""

from __future__ import annotations

from .decode_takeover import FastTalkerCache, _decode_step, fast_decoder, install  # noqa: F401
from .decode_takeover import text_model_forward as talker_model_forward

__all__ = ["FastTalkerCache", "fast_decoder", "install", "talker_model_forward"]
