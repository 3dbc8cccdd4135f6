"""Model-level pipelines built from omni-fast ops."""

from .code2wav import Code2Wav

__all__ = ["Code2Wav"]
