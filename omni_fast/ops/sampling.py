"""Public sampling op: :func:`sample` (transformers' processors and warpers + a counter-based Gumbel race).

See :mod:`omni_fast.reference.sampling` for the exact distribution and the RNG. No host sync and no data-dependent
shape on the op path, so a call with tensor ``seed`` / ``offset`` captures in a CUDA graph; the same seed gives the
same ids on the triton, cuda and reference backends.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .._cache_memory import made_to_keep, record_use
from .._device import capturing
from ..reference import sampling as ref
from ..validation import (FLOAT_DTYPES, INT_DTYPES, as_int, check_bool, check_float, check_positive_int, check_seed,
                          check_tensor, values_checkable)
from ._dispatch import dispatched_op


def _fake(logits, temperature, top_k, top_p, suppress, repetition_penalty, prev_ids, seed, offset, greedy, backend):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


@dispatched_op("sample", fake=_fake)
def _sample_op(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, suppress: torch.Tensor | None,
               repetition_penalty: float, prev_ids: torch.Tensor | None, seed: torch.Tensor, offset: torch.Tensor,
               greedy: bool, backend: str) -> torch.Tensor:
    """int64 ``[B]``: one id drawn per row of ``logits`` ``[B, V]``."""


@_sample_op.impl("reference")
def _sample_reference(logits, temperature, top_k, top_p, suppress, repetition_penalty, prev_ids, seed, offset,
                      greedy):
    return ref.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, suppress_ranges=suppress,
                      repetition_penalty=repetition_penalty, prev_ids=prev_ids, seed=seed, offset=offset,
                      greedy=greedy)


@_sample_op.impl("triton")
def _sample_triton(*args):
    from ..kernels import sampling as kernels_sampling

    return kernels_sampling.sample(*args)


@_sample_op.impl("cuda")
def _sample_cuda(*args):
    from ..kernels import cuda_sampling

    return cuda_sampling.sample(*args)


# suppress_ranges lists as device tensors, per (pairs, device): a warmed-up call copies nothing host -> device (CUDA-
# graph capturable). The keys come from the callers (a server's per-request banned ids): at most MAX_RANGE_SETS kept,
# all dropped when full (after a device sync: another stream's kernel may still read one), except the ones a CUDA
# graph captured, which its replays read by address: those stay (one per captured set of ranges).
MAX_RANGE_SETS = 256
_RANGE_CACHE: dict[tuple, torch.Tensor] = {}
_CAPTURED_RANGES: dict[tuple, torch.Tensor] = {}


def _check_ranges(pairs, V: int) -> None:
    """(lo, hi) pairs: lo <= hi, and not every id of the vocabulary suppressed (no id could be drawn).

    Comparisons only while tracing: under ``torch.compile(dynamic=True)`` ints passed to the compiled function are
    SymInts, which dynamo cannot sort; a comparison of them is a guard of the graph instead, so a call that breaks
    a rule recompiles and raises here, as in eager. Eager (every call) sorts first: the covered prefix then grows
    in one pass, where unsorted ranges can take one pass per range (R^2 steps; a trace pays that once)."""
    for lo, hi in pairs:
        if lo > hi:
            raise ValueError(f"suppress_ranges entries must be (lo, hi) with lo <= hi, got ({lo}, {hi})")
    ordered = pairs if torch.compiler.is_compiling() else sorted(pairs)
    covered, grew = 0, True  # ids [0, covered) suppressed: grown by every range starting inside it, until none does
    while grew:
        grew = False
        for lo, hi in ordered:
            if lo <= covered and hi > covered:
                covered, grew = hi, True
        if covered >= V:
            raise ValueError(f"suppress_ranges suppress the whole vocabulary (V={V}): no id could be drawn")


def _range_end(name: str, value):
    """One end of a (lo, hi) pair: an int (see :func:`as_int`), or, while torch.compile traces, a 0-d integer
    tensor kept as it is: its value is data-dependent (``int()`` of it cannot be traced), so it is not checked."""
    if isinstance(value, torch.Tensor) and torch.compiler.is_compiling():
        if value.dim() == 0 and value.dtype in INT_DTYPES + (torch.int8, torch.int16, torch.uint8):
            return value
    return as_int(name, value)


def _pairs_tensor(pairs: tuple, device: torch.device, tensor_ends: bool) -> torch.Tensor:
    """int64 ``[R, 2]`` on ``device`` from (lo, hi) pairs of ints, SymInts or (``tensor_ends``: traced) 0-d
    tensors."""
    if not torch.compiler.is_compiling():
        return _cached_pairs_tensor(pairs, device)
    if not tensor_ends:
        return torch.tensor(pairs, dtype=torch.long, device=device)  # part of the graph (no cache: no side effect)
    ends = [v.to(device=device, dtype=torch.long) if isinstance(v, torch.Tensor)
            else torch.full((), v, dtype=torch.long, device=device) for pair in pairs for v in pair]
    return torch.stack(ends).reshape(-1, 2)


def _cached_pairs_tensor(pairs: tuple, device: torch.device) -> torch.Tensor:
    """:func:`_pairs_tensor` of ints, cached: a warmed-up call copies nothing to the device (CUDA-graph capturable).
    At most MAX_RANGE_SETS kept (all dropped when full, after the devices finish reading them); a tensor a captured
    graph reads is kept apart for good; outside a capture the current stream is recorded on the tensor
    (:func:`~omni_fast._cache_memory.record_use`), which keeps its block from reuse while this call's launch
    may read it, even when another thread drops the cache before that launch."""
    key = (pairs, str(device))
    t = _CAPTURED_RANGES.get(key)
    if t is None:
        t = _RANGE_CACHE.get(key)
    in_capture = capturing(device)  # (asked of the tensors' device: the current one may be another)
    if t is None:  # (full: dropped first, outside a capture; made where a kept tensor stays valid: made_to_keep)
        t = made_to_keep(lambda: torch.tensor(pairs, dtype=torch.long, device=device), device, in_capture,
                         _RANGE_CACHE, MAX_RANGE_SETS)
        t = _RANGE_CACHE.setdefault(key, t)
    if in_capture:
        _CAPTURED_RANGES[key] = t  # the graph reads this tensor on every replay: keep it alive
    elif t.is_cuda:
        # another thread's full-cache drop may come between this lookup and the launch (its sync before the launch):
        # the launch's stream is recorded so that the block outlives what it queues (_cache_memory.record_use)
        record_use((t,))
    return t


def _suppress_tensor(ranges, device: torch.device, V: int) -> torch.Tensor | None:
    if ranges is None:
        return None
    if isinstance(ranges, torch.Tensor):
        if ranges.is_floating_point() or ranges.dtype == torch.bool:
            raise TypeError(f"suppress_ranges must be integers, got {ranges.dtype}")
        check_tensor("suppress_ranges", ranges, dtypes=INT_DTYPES, device=device)
        if ranges.dim() != 2 or ranges.shape[1] != 2:
            raise ValueError(f"suppress_ranges must have shape [R, 2] (lo, hi), got {tuple(ranges.shape)}")
        if ranges.numel() and values_checkable(ranges):  # the list's rules, where the values cost no host sync
            _check_ranges([tuple(p) for p in ranges.tolist()], V)
        return ranges.long().contiguous() if ranges.numel() else None
    if isinstance(ranges, (str, bytes)) or not hasattr(ranges, "__iter__"):
        raise TypeError(f"suppress_ranges must be (lo, hi) pairs or an int tensor [R, 2], got {ranges!r}")
    pairs = []
    for i, pair in enumerate(ranges):
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise ValueError(f"suppress_ranges[{i}] must be a (lo, hi) pair, got {pair!r}")
        pairs.append((_range_end(f"suppress_ranges[{i}][0]", pair[0]), _range_end(f"suppress_ranges[{i}][1]", pair[1])))
    pairs = tuple(pairs)
    if not pairs:
        return None
    tensor_ends = any(isinstance(v, torch.Tensor) for pair in pairs for v in pair)  # (only while tracing)
    if not tensor_ends:
        _check_ranges(pairs, V)
    return _pairs_tensor(pairs, device, tensor_ends)


_ZERO_CACHE: dict[str, torch.Tensor] = {}


def _device_zero(device: torch.device) -> torch.Tensor:
    """int64 ``[1]`` zero on ``device`` (the default offset), made once per device: a warmed-up call with
    ``offset=None`` then copies nothing host->device, which a CUDA-graph capture forbids. Never written to."""
    key = str(device)
    t = _ZERO_CACHE.get(key)
    if t is None:
        in_capture = capturing(device)  # (asked of the tensors' device: the current one may be another)
        t = made_to_keep(lambda: torch.zeros(1, dtype=torch.long, device=device), device, in_capture)
        if in_capture:
            return t  # the graph's, zeroed on replay: not cached
        t = _ZERO_CACHE.setdefault(key, t)
    return t


def _rng_tensor(name: str, value, B: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        check_tensor(name, value, device=device)
        if value.numel() not in (1, B) or value.dim() > 1:
            raise ValueError(f"{name} must hold one value or one per row (B={B}), got shape {tuple(value.shape)}")
    else:
        value = check_seed(name, value)  # ints, numpy ints; outside int64 -> ValueError naming it
    return ref.seed_tensor(value, B, device, name)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    suppress_ranges: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
    prev_ids: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    greedy: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Draw one id per row of ``logits`` ``[B, V]`` (fp32/fp16/bf16); returns int64 ``[B]``.

    temperature > 0; top_k >= 0 (0: off); top_p in (0, 1] (1: off); suppress_ranges: ``(lo, hi)`` id ranges set
    to -inf (a list, or an int tensor ``[R, 2]``); repetition_penalty > 0 applied at ``prev_ids`` (int ``[B, L]``,
    negative entries are padding). seed / offset: ints or int tensors ``[]``, ``[1]`` or ``[B]`` (device tensors
    keep a CUDA-graph replay free of host copies; advance ``offset`` between draws; ``offset=None`` is 0 and
    copies nothing). One seed value is shared by the batch (rows are told apart by their index); a ``[B]`` seed
    (B > 1) gives every row its own stream, independent of the row's place in the batch. ``seed=None`` takes a
    seed from torch's default generator (drawn on the CPU and copied to the device: not inside a CUDA-graph
    capture; inside a ``torch.compile`` region it is a draw of the graph). ``greedy``: argmax after penalty
    and suppression. NaN logits are -inf on every backend (never drawn, never counted by top-k / top-p, out of the
    softmax; a row of only NaN and -inf gives id 0, as a row of only -inf); see :mod:`omni_fast.reference.sampling`.

    suppress_ranges rules (lo <= hi, not the whole vocabulary: a ``ValueError``) are checked on Python ints, also
    while ``torch.compile`` traces (there, with ``dynamic=True``, as guards of the graph), and on CPU tensors in
    eager. Values it cannot read without a host sync or a data-dependent branch (a device tensor; while compiling,
    any tensor, or pairs with 0-d tensor ends) are not checked; the kernels' rule holds for them: ``[lo, hi)`` is clamped to the
    vocabulary, lo >= hi suppresses nothing, and a row with every id suppressed gives id 0.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    B, V = logits.shape
    if V < 1:
        raise ValueError(f"logits must have a non-empty vocabulary, got shape {tuple(logits.shape)}")
    temperature = check_float("temperature", temperature, minimum=0.0, min_open=True)
    top_k = check_positive_int("top_k", top_k, minimum=0)  # 0 disables it
    top_p = check_float("top_p", top_p, minimum=0.0, maximum=1.0, min_open=True)
    repetition_penalty = check_float("repetition_penalty", repetition_penalty, minimum=0.0, min_open=True)
    greedy = check_bool("greedy", greedy)
    if prev_ids is not None:
        check_tensor("prev_ids", prev_ids)
        if prev_ids.is_floating_point():
            raise TypeError(f"prev_ids must be an integer tensor, got {prev_ids.dtype}")
        check_tensor("prev_ids", prev_ids, dtypes=INT_DTYPES, ndim=2, device=logits.device)
        if prev_ids.shape[0] != B:
            raise ValueError(f"prev_ids must have one row per logits row (B={B}), got shape {tuple(prev_ids.shape)}")
        prev_ids = prev_ids.long().contiguous()
    suppress = _suppress_tensor(suppress_ranges, logits.device, V)
    if seed is None:  # one draw of torch's default generator, kept a tensor: no host int, so torch.compile traces it
        seed = torch.randint(0, 2**62, (1,), dtype=torch.long).to(logits.device)
    seed_t = _rng_tensor("seed", seed, B, logits.device)
    # offset=None: a cached device zero (graph-capturable); an int seed/offset is copied to the device per call
    # (pass device tensors inside a capture)
    offset_t = _device_zero(logits.device) if offset is None else _rng_tensor("offset", offset, B, logits.device)
    be = _sample_op.resolve((logits,), backend)
    return _sample_op(logits, temperature, min(top_k, V), top_p, suppress, repetition_penalty, prev_ids, seed_t,
                      offset_t, greedy, be)


__all__ = ["sample"]
