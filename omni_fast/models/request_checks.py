"""Argument checks of the pipeline's entry points (issue 17, part 5): ``Qwen3Omni.stream`` / ``generate`` and the
fields of :class:`~omni_fast.models.Request`, before any work, with a TypeError/ValueError naming the argument or
``requests[i].<field>``.

These complement the pipeline's own checks (token ids against the vocabulary, tensor layouts and lengths, run by
the pipeline itself): they cover what those let through: the ``requests`` argument itself, flags that are not
bools, seeds, non-finite or unbounded numbers, a ``speaker`` that is not a string, non-finite media, and
``audio_in_video`` without both the audio and the video. Kept in their own module so that the pipeline's code can
move without them (one decorator line at each entry point: :func:`checked_stream`, :func:`checked_generate`).
"""

from __future__ import annotations

import functools
import inspect

import torch

from ..validation import check_bool, check_float, check_positive_int, check_seed

# Bounds of the stream's sizes: a text/codec budget, a chunk or a context of more than 2**20 tokens or frames is a
# typo, and a static KV cache sized from it would try to allocate it (prompt + max_new_tokens positions).
MAX_STREAM_TOKENS = 2**20
MAX_PREFILL_CHUNK = 2**31 - 1


def check_requests(requests) -> None:
    """``requests``: one :class:`Request` or a list/tuple of them (each checked by :func:`check_request`)."""
    from .qwen3_omni import Request

    if isinstance(requests, Request):
        requests = [requests]
    elif not isinstance(requests, (list, tuple)):
        raise TypeError(f"requests must be an omni_fast.models.Request or a list of them, got "
                        f"{type(requests).__name__}")
    for i, r in enumerate(requests):
        check_request(r, f"requests[{i}]")


def check_request(req, name: str = "request") -> None:
    """The fields of one request that the pipeline's own check lets through (see the module docstring)."""
    from .qwen3_omni import Request

    if not isinstance(req, Request):
        raise TypeError(f"{name} must be an omni_fast.models.Request, got {type(req).__name__}")
    in_video = check_bool(f"{name}.audio_in_video", req.audio_in_video)
    try:
        check_float(f"{name}.video_fps", req.video_fps, minimum=0.0, min_open=True)
    except ValueError:  # the pipeline's own wording (a non-number stays check_float's TypeError)
        raise ValueError(f"{name}.video_fps must be a positive number of frames per second, got "
                         f"{req.video_fps!r}") from None
    for kind in ("audio", "image", "video"):
        x = getattr(req, kind)
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}.{kind} must be a torch.Tensor, got {type(x).__name__}")
        # A NaN/inf sample or pixel gives a NaN encoder output and a garbage answer. The waveform goes through the
        # host anyway (mel features); images and videos are checked where that costs no device sync.
        if x is not None and x.is_floating_point() and (kind == "audio" or x.device.type == "cpu") \
                and x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}.{kind} has non-finite (NaN/inf) values")
    if in_video and (req.audio is None or req.video is None):
        missing = "audio" if req.audio is None else "video"
        raise ValueError(f"{name}.audio_in_video=True needs both an audio track and a video; {name}.{missing} is "
                         "None")


def check_stream_options(*, max_new_tokens, talker_max_new_tokens, speaker, do_sample, talker_do_sample,
                         talker_repetition_penalty, first_chunk, chunk, left_context, prefill_chunk, static_cache,
                         graph_decode, seed, talker_min_new_tokens=0) -> dict:
    """The keyword arguments of ``stream`` (see :meth:`omni_fast.models.Qwen3Omni.stream`), returned as plain Python
    values (numpy and 0-d tensor numbers accepted, as everywhere: see :mod:`omni_fast.validation`)."""
    if not isinstance(speaker, str):
        raise TypeError(f"speaker must be a str (a voice name), got {type(speaker).__name__}")
    sizes = dict(max_new_tokens=max_new_tokens, talker_max_new_tokens=talker_max_new_tokens,
                 first_chunk=first_chunk, chunk=chunk)
    out = {name: check_positive_int(name, v, maximum=MAX_STREAM_TOKENS) for name, v in sizes.items()}
    out["talker_min_new_tokens"] = check_positive_int("talker_min_new_tokens", talker_min_new_tokens, minimum=0,
                                                      maximum=MAX_STREAM_TOKENS)
    out["left_context"] = check_positive_int("left_context", left_context, minimum=0, maximum=MAX_STREAM_TOKENS)
    out["prefill_chunk"] = None if prefill_chunk is None else check_positive_int(
        "prefill_chunk", prefill_chunk, maximum=MAX_PREFILL_CHUNK)
    out["talker_repetition_penalty"] = check_float("talker_repetition_penalty", talker_repetition_penalty,
                                                   minimum=0.0, min_open=True)
    for name, flag in (("do_sample", do_sample), ("talker_do_sample", talker_do_sample),
                       ("static_cache", static_cache)):
        out[name] = check_bool(name, flag)
    out["graph_decode"] = None if graph_decode is None else check_bool("graph_decode", graph_decode)
    out["seed"] = check_seed("seed", seed)
    out["speaker"] = speaker
    return out


def checked_stream(stream):
    """Decorator of ``stream(self, requests, **options)``: :func:`check_requests` and :func:`check_stream_options`
    run when the stream starts (at its first ``next``, as the pipeline's own checks), before any work; the stream
    then runs with the options as plain Python values."""
    sig = inspect.signature(stream)

    @functools.wraps(stream)
    def wrapper(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)  # an unknown keyword is Python's TypeError naming it
        bound.apply_defaults()
        options = dict(bound.arguments)
        options.pop("self")
        requests = options.pop("requests")
        check_requests(requests)
        yield from stream(self, requests, **check_stream_options(**options))

    return wrapper


def checked_generate(generate):
    """Decorator of ``generate(self, requests, **kwargs)``: :func:`check_requests` first (``generate`` lists the
    requests before ``stream`` runs); the options are checked by ``stream``."""

    @functools.wraps(generate)
    def wrapper(self, requests, **kwargs):
        check_requests(requests)
        return generate(self, requests, **kwargs)

    return wrapper


__all__ = ["MAX_STREAM_TOKENS", "check_request", "check_requests", "check_stream_options", "checked_generate",
           "checked_stream"]
