"""Model-level modules built from omni-fast ops (one import line per module)."""

from .code2wav import Code2Wav
from .code_predictor import CodePredictor
from .talker_step import TalkerStep, install_on_talker

__all__ = [
    "Code2Wav",
    "CodePredictor",
    "TalkerStep",
    "install_on_talker",
]
