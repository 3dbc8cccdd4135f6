"""Model-level modules built from omni-fast ops (one import line per module)."""

from .code2wav import Code2Wav
from .code_predictor import CodePredictor
from .positions import PositionSpec, audio_tokens, rope_positions
from .presets import full_qwen3_omni_config, tiny_qwen2_5_omni_config, tiny_qwen3_omni_config
from .qwen3_omni import Event, Qwen3Omni, Request, RequestTiming
from .qwen25_omni import Qwen25Omni
from .talker_step import TalkerStep, install_on_talker
from .text_decoder import MoeTextDecoder

__all__ = [
    "Code2Wav",
    "CodePredictor",
    "Event",
    "MoeTextDecoder",
    "PositionSpec",
    "Qwen25Omni",
    "Qwen3Omni",
    "Request",
    "RequestTiming",
    "TalkerStep",
    "audio_tokens",
    "full_qwen3_omni_config",
    "install_on_talker",
    "rope_positions",
    "tiny_qwen2_5_omni_config",
    "tiny_qwen3_omni_config",
]
