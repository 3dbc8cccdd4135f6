"""Qwen-Omni models on omni-fast: the thin pipeline, its position builder and model presets."""

from .positions import PositionSpec, audio_tokens, rope_positions
from .presets import full_qwen3_omni_config, tiny_qwen2_5_omni_config, tiny_qwen3_omni_config
from .qwen3_omni import Event, Qwen3Omni, Request, RequestTiming
