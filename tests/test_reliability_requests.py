"""Issue 17 on the pipeline's entry points: ``Qwen3Omni.stream`` / ``generate`` arguments and the fields of
``omni_fast.models.Request`` give a TypeError/ValueError naming the argument (``requests[i].<field>``) before any
work, never another exception type, and no silently accepted nonsense (checks: omni_fast/models/request_checks.py).
Only the tiny random model's construction costs time; every bad case fails before the model runs."""

import math

import numpy as np
import pytest
import torch

from omni_fast.models import Qwen3Omni, Request
from omni_fast.models.request_checks import MAX_STREAM_TOKENS, check_requests, check_stream_options

GOOD = dict(max_new_tokens=1, talker_max_new_tokens=1)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return Qwen3Omni.random("tiny", patch=False)


def _req(**kw):
    return Request(**{"text": [1, 2, 3], **kw})


def _first(pipe, requests, **kw):
    """Start the stream: the checks run at its first event (as before: a stream is a generator)."""
    return next(iter(pipe.stream(requests, **{**GOOD, **kw})))


@pytest.mark.parametrize("requests", [None, 3, "abc", {"text": "x"}, torch.zeros(2)])
def test_requests_argument_named(pipe, requests):
    with pytest.raises(TypeError, match=r"^requests must be"):
        _first(pipe, requests)
    with pytest.raises(TypeError, match=r"^requests must be"):
        pipe.generate(requests, **GOOD)


STREAM_BAD = [
    ("max_new_tokens", MAX_STREAM_TOKENS + 1, ValueError), ("max_new_tokens", 2**40, ValueError),
    ("talker_max_new_tokens", 2**40, ValueError), ("first_chunk", 2**40, ValueError),
    ("left_context", 2**40, ValueError), ("prefill_chunk", 2**40, ValueError),
    ("speaker", None, TypeError), ("speaker", 3, TypeError),
    ("do_sample", "no", TypeError), ("do_sample", 1, TypeError), ("do_sample", None, TypeError),
    ("talker_do_sample", "no", TypeError), ("static_cache", "no", TypeError), ("static_cache", None, TypeError),
    ("graph_decode", "no", TypeError), ("graph_decode", 1, TypeError),
    ("talker_repetition_penalty", math.inf, ValueError), ("talker_repetition_penalty", math.nan, ValueError),
    ("talker_repetition_penalty", True, TypeError), ("talker_repetition_penalty", "x", TypeError),
    ("talker_repetition_penalty", 0.0, ValueError),
    ("seed", None, TypeError), ("seed", 1.5, TypeError), ("seed", "x", TypeError), ("seed", 2**64, ValueError),
]


@pytest.mark.parametrize("name, value, exc", STREAM_BAD)
def test_stream_options_named(pipe, name, value, exc):
    with pytest.raises(exc, match=name):
        _first(pipe, _req(), **{name: value})


def test_stream_still_lazy(pipe):
    """A bad argument raises when the stream starts, not when it is created (the pipeline's contract)."""
    stream = pipe.stream(_req(), seed="x")
    with pytest.raises(TypeError, match="seed"):
        next(iter(stream))


def test_unknown_keyword_named(pipe):
    with pytest.raises(TypeError, match="temperature"):
        _first(pipe, _req(), temperature=0.7)


@pytest.mark.parametrize("name, value", [("seed", np.int64(3)), ("seed", torch.tensor(3)),
                                         ("talker_repetition_penalty", np.float32(1.1)),
                                         ("max_new_tokens", np.int64(1)), ("do_sample", np.bool_(False))])
def test_numpy_and_0d_tensor_values_accepted(pipe, name, value):
    """One rule for numbers: what numpy/torch users naturally pass works (before: np.float32 penalty refused as
    "must be > 0", np.int64 seed "an integer is required")."""
    assert _first(pipe, _req(), **{name: value}) is not None


REQUEST_BAD = [
    (dict(audio=torch.full((1600,), math.nan)), ValueError, r"requests\[0\]\.audio"),
    (dict(audio=torch.full((1600,), math.inf)), ValueError, r"requests\[0\]\.audio"),
    (dict(image=torch.full((3, 28, 28), math.nan)), ValueError, r"requests\[0\]\.image"),
    (dict(video=torch.full((2, 3, 28, 28), math.nan)), ValueError, r"requests\[0\]\.video"),
    (dict(audio=np.zeros(1600, np.float32)), TypeError, r"requests\[0\]\.audio"),
    (dict(video_fps=math.nan), ValueError, r"requests\[0\]\.video_fps"),
    (dict(video_fps=0), ValueError, r"requests\[0\]\.video_fps"),
    (dict(video_fps=-1.0), ValueError, r"requests\[0\]\.video_fps"),
    (dict(video_fps="x"), TypeError, r"requests\[0\]\.video_fps"),
    (dict(video_fps=None), TypeError, r"requests\[0\]\.video_fps"),
    (dict(audio_in_video="no"), TypeError, r"requests\[0\]\.audio_in_video"),
    (dict(audio_in_video=None), TypeError, r"requests\[0\]\.audio_in_video"),
    (dict(audio_in_video=True), ValueError, r"requests\[0\]\.audio_in_video"),
    (dict(audio_in_video=True, video=torch.rand(2, 3, 28, 28)), ValueError, r"requests\[0\]\.audio is None"),
]


@pytest.mark.parametrize("fields, exc, match", REQUEST_BAD)
def test_request_fields_named(pipe, fields, exc, match):
    with pytest.raises(exc, match=match):
        _first(pipe, _req(**fields))
    with pytest.raises(exc, match=match.replace("0", "1")):  # the index of the bad request in a batch
        pipe.generate([_req(), _req(**fields)], **GOOD)


def test_checks_without_a_model():
    """The checks themselves (no pipeline): the good defaults pass and come back as plain Python values."""
    opts = check_stream_options(max_new_tokens=np.int64(4), talker_max_new_tokens=8, speaker="ethan",
                                do_sample=np.bool_(True), talker_do_sample=False, talker_repetition_penalty=1,
                                first_chunk=1, chunk=torch.tensor(12), left_context=0, prefill_chunk=None,
                                static_cache=False, graph_decode=None, seed=np.uint8(7))
    assert opts["max_new_tokens"] == 4 and type(opts["max_new_tokens"]) is int and opts["chunk"] == 12
    assert opts["do_sample"] is True and opts["talker_repetition_penalty"] == 1.0 and opts["seed"] == 7
    check_requests(_req())
    check_requests((_req(), _req(video_fps=np.float32(4.0))))
    with pytest.raises(TypeError, match=r"requests\[1\] must be"):
        check_requests([_req(), "text"])
