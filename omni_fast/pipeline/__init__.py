"""The streaming pipelines' shared parts: requests and timing (:mod:`.requests`), device plumbing (:mod:`.device`),
the model-family independent streaming scheduler (:mod:`.scheduler`), and one stage adapter per model family
(:mod:`.qwen3` for Qwen3-Omni; import adapters by module: they build on :mod:`omni_fast.models`)."""

from .requests import Event, Request, RequestTiming
from .scheduler import StreamOptions, StreamRun, TextDecode

__all__ = ["Event", "Request", "RequestTiming", "StreamOptions", "StreamRun", "TextDecode"]
