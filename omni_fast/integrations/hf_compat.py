"""What differs between the transformers releases omni-fast supports (5.17, the GPU image's, to the newest).

- The KV cache keyword: transformers 5.24 renamed ``past_key_values`` to ``cache`` (model forwards, attention module
  forwards, ``prepare_inputs_for_generation``) and the outputs' ``past_key_values`` field to ``cache``; the old names
  still work there with a FutureWarning until 5.40. omni-fast passes and reads whichever the installed release
  defines, found from the model outputs' fields (no version-number parsing).
- ``generate``'s attention mask: transformers >= 5.2x drops an all-ones mask before the model's first forward
  (5.17 passes it through): see :func:`generate_drops_all_ones_mask`.
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


_CACHE_KEYWORD: list[str] = []  # memo (not functools.lru_cache: torch.compile of a patched forward warned about it)


def cache_keyword() -> str:
    """``"cache"`` on transformers >= 5.24, else ``"past_key_values"``: the keyword that carries the KV cache."""
    if not _CACHE_KEYWORD:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        fields = getattr(BaseModelOutputWithPast, "__dataclass_fields__", {})
        _CACHE_KEYWORD.append("cache" if "cache" in fields else "past_key_values")
    return _CACHE_KEYWORD[0]


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


def carries_paged_cache(kwargs: dict) -> bool:
    """Whether a forward's keywords carry a ``PagedAttentionCache`` (continuous batching), under either name a
    release passes it by (5.24+: ``cache``; 5.17: ``past_key_values``)."""
    return is_paged_cache(kwargs.get("cache")) or is_paged_cache(kwargs.get("past_key_values"))


@functools.lru_cache(maxsize=None)
def generate_drops_all_ones_mask() -> bool:
    """Whether ``GenerationMixin.generate`` drops an all-ones (no padding) ``attention_mask`` before calling the
    model (decoder-only models, unless flash attention runs on a static cache): True on transformers 5.25, False on
    5.17, which passes the mask to every forward. Models whose forward does something only when it gets a mask see
    the difference: the Qwen2.5-Omni talker adds the codec pad / BOS embeddings to its last two prompt rows only
    then. Detected by the ``GenerationConfig._mask_length`` slot that came with the drop (generate records the
    dropped mask's length there), not by the version number; tests/test_pipeline_qwen25.py checks it against
    ``generate`` itself."""
    from transformers import GenerationConfig

    return any("_mask_length" in getattr(c, "__annotations__", {}) for c in GenerationConfig.__mro__)


def generate_passes_mask(mask) -> bool:
    """Whether ``generate``, given the 2-D 0/1 ``attention_mask`` ``mask`` ``[B, S]``, hands the model a mask at all
    (False only for an all-ones mask on a release that drops it; reads ``mask`` back to the host once then)."""
    return not generate_drops_all_ones_mask() or not bool(mask.all())


def thinker_text_model(thinker):
    """The thinker's text decoder: ``thinker.model.language_model`` (transformers >= 5.2x, where ``thinker.model`` is
    the multimodal ``*ThinkerModel``) or ``thinker.model`` itself (earlier 5.x, e.g. 5.17)."""
    return getattr(thinker.model, "language_model", thinker.model)


def thinker_multimodal(thinker):
    """The module holding the encoders (``audio_tower``, ``visual``) and ``get_rope_index``: ``thinker.model`` on
    transformers >= 5.2x, the thinker itself on earlier 5.x (where ``thinker.model`` is the text model)."""
    return thinker.model if hasattr(thinker.model, "audio_tower") else thinker


__all__ = ["MIN_TRANSFORMERS", "cache_keyword", "carries_paged_cache", "check_transformers_version",
           "generate_drops_all_ones_mask", "generate_passes_mask", "is_paged_cache", "output_cache", "pop_cache",
           "thinker_multimodal", "thinker_text_model", "with_cache"]
