"""What differs between the transformers releases omni-fast supports (5.17, the GPU image's, to the newest).

- The KV cache keyword: transformers 5.24 renamed ``past_key_values`` to ``cache`` (model forwards, attention module
  forwards, ``prepare_inputs_for_generation``) and the outputs' ``past_key_values`` field to ``cache``; the old names
  still work there with a FutureWarning until 5.40. omni-fast passes and reads whichever the installed release
  defines, found from the model outputs' fields (no version-number parsing).
- The supported floor: :func:`check_transformers_version` (called by :func:`omni_fast.patch` and
  :func:`omni_fast.register_transformers`) refuses an older release with one error naming both versions.
"""

from __future__ import annotations

import functools
import re

MIN_TRANSFORMERS = (5, 17)


def _release(version: str) -> tuple[int, ...]:
    """``"5.25.0.dev0"`` -> ``(5, 25, 0)``: the leading numeric release fields."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def check_transformers_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` naming the installed and the supported versions when transformers is older than the
    floor (``version``: the one to check, default the installed ``transformers.__version__``)."""
    if version is None:
        import transformers

        version = transformers.__version__
    if _release(version)[:2] < MIN_TRANSFORMERS:
        floor = ".".join(map(str, MIN_TRANSFORMERS))
        raise RuntimeError(f"omni-fast needs transformers >= {floor} (tested from {floor} to the newest release); "
                           f"transformers {version} is installed: pip install -U 'transformers>={floor}'")


@functools.lru_cache(maxsize=None)
def cache_keyword() -> str:
    """``"cache"`` on transformers >= 5.24, else ``"past_key_values"``: the keyword that carries the KV cache."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" if "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def with_cache(cache, **kwargs) -> dict:
    """``kwargs`` plus the cache under the installed release's keyword (for a model or layer call)."""
    kwargs[cache_keyword()] = cache
    return kwargs


def output_cache(outputs):
    """The KV cache a transformers model output carries (``outputs.cache`` or ``outputs.past_key_values``)."""
    return getattr(outputs, cache_keyword())


def pop_cache(kwargs: dict):
    """Remove and return the cache from a forward's keyword arguments, under either name (None when absent)."""
    new, old = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    return new if new is not None else old


def is_paged_cache(cache) -> bool:
    """True for transformers' continuous-batching ``PagedAttentionCache`` (by class name: importing the
    continuous-batching module would cost every call, and its path moved between releases)."""
    return any(c.__name__ == "PagedAttentionCache" for c in type(cache).__mro__)


__all__ = ["MIN_TRANSFORMERS", "cache_keyword", "check_transformers_version", "is_paged_cache", "output_cache",
           "pop_cache", "with_cache"]


def thinker_text_model(thinker):
    """The thinker's text decoder: ``thinker.model.language_model`` (transformers >= 5.2x, where ``thinker.model`` is
    the multimodal ``*ThinkerModel``) or ``thinker.model`` itself (earlier 5.x, e.g. 5.17)."""
    return getattr(thinker.model, "language_model", thinker.model)


def thinker_multimodal(thinker):
    """The module holding the encoders (``audio_tower``, ``visual``) and ``get_rope_index``: ``thinker.model`` on
    transformers >= 5.2x, the thinker itself on earlier 5.x (where ``thinker.model`` is the text model)."""
    return thinker.model if hasattr(thinker.model, "audio_tower") else thinker
