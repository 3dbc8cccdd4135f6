"""Shared helpers of the sampling tests (tests/test_sampling*.py): the backends, transformers' warpers, the
interpreter-sized chunked sampler, the CUDA C++ sampler on the host emulator."""

import pytest
import torch

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



def use_small_chunks(monkeypatch):
    """The two-stage sampler (kernels/sampling_chunked.py) at interpreter-sized chunks: 128 ids, 16 candidates
    each (the GPU's 4096 / 64 cost ~20 s per chunk on the interpreter); V > 128 then runs several chunks.
    Returns the module (tests set its FALLBACK)."""
    from omni_fast.kernels import sampling_chunked

    monkeypatch.setattr(sampling_chunked, "CHUNK", 128)
    monkeypatch.setattr(sampling_chunked, "KC", 16)
    return sampling_chunked


def emu_library(build_cuda_emu):
    """kernels/cuda/sampling.cu compiled for the host with tests/cuda_emu (threads + barriers for a block);
    ``build_cuda_emu``: the conftest fixture."""
    import ctypes

    lib = build_cuda_emu("emu.cpp")
    P, I, L, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float
    lib.emu_sample_f32.argtypes = [I, P, P, L, I, P, I, P, I, P, L, I, F, F, P, I, F, I, F, I, I, I, I, I]
    return lib


def emu_sample(lib, logits, *, temperature=1.0, top_k=0, top_p=1.0, suppress_ranges=None, repetition_penalty=1.0,
               prev_ids=None, seed=0, offset=0, greedy=False):
    """int64 ``[B]``: the emulated CUDA C++ sampler on fp32 CPU ``logits`` ``[B, V]`` (ops.sample's arguments; seed an
    int or an int tensor ``[B]``, offset an int)."""
    B, V = logits.shape
    out = torch.full((B,), -7, dtype=torch.long)
    seed_t = seed.long().reshape(-1).contiguous() if isinstance(seed, torch.Tensor) else torch.tensor([seed])
    seed_stride = 1 if seed_t.numel() > 1 else 0
    off_t = torch.tensor([offset], dtype=torch.long)
    pen = prev_ids is not None and repetition_penalty != 1.0
    sup = None if suppress_ranges is None else torch.tensor(suppress_ranges, dtype=torch.long)
    lib.emu_sample_f32(
        B, logits.data_ptr(), out.data_ptr(), logits.stride(0), V, seed_t.data_ptr(), seed_stride, off_t.data_ptr(), 0,
        prev_ids.data_ptr() if pen else out.data_ptr(), prev_ids.stride(0) if pen else 0,
        prev_ids.shape[1] if pen else 0, repetition_penalty, 1.0 / repetition_penalty,
        sup.data_ptr() if sup is not None else out.data_ptr(), 0 if sup is None else sup.shape[0], 1.0 / temperature,
        top_k, 1.0 - top_p, int(greedy), int(pen), int(temperature != 1.0 and not greedy), int(0 < top_k < V),
        int(top_p < 1.0))
    return out
