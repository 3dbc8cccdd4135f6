"""Shared helpers of the sampling tests (tests/test_sampling*.py): the backends, transformers' warpers."""

import pytest

transformers = pytest.importorskip("transformers")

from transformers.generation import logits_process as lp  # noqa: E402

BACKENDS = ["reference", "triton"]


def _warp(scores, temperature, top_k, top_p):
    """transformers' warper chain, as generate(do_sample=True) builds it."""
    s = scores.clone()
    if temperature != 1.0:
        s = lp.TemperatureLogitsWarper(temperature)(None, s)
    if top_k:
        s = lp.TopKLogitsWarper(top_k)(None, s)
    if top_p < 1.0:
        s = lp.TopPLogitsWarper(top_p)(None, s)
    return s

