"""Model-level building blocks assembled from omni_fast ops."""

from .code_predictor import CodePredictor
from .talker_step import TalkerStep, install_on_talker

__all__ = ["CodePredictor", "TalkerStep", "install_on_talker"]
