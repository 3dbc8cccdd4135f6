"""The split-K kernels' tile counters (``mtp_gemv``'s residual GEMV, ``moe_gemm`` with ``SPLIT_K``): each split of
an output tile takes a ticket on the tile's int32 counter, the last one reduces the partial sums and resets the
counter to zero, so the counters are zero between launches and launches that run one after another may share them.

Launches that may run AT THE SAME TIME must not: two server threads on their own streams, or a graph replayed on one
stream while another stream launches, would take each other's tickets (a tile reduced before all its splits landed,
or never reduced): silently wrong sums. So the counters belong to whatever orders its launches:

- an eager launch: one set per (device, stream) (:data:`_EAGER`), ``MAX_TILE_COUNTERS`` long, made on first use;
- a launch captured into a CUDA graph: a set of the graph's own. Under :func:`omni_fast.models.cuda_graphs.capture`
  the warm-ups record how many counters each device needs (:func:`recorded`), the capture makes them zeroed BEFORE it
  begins (no memset node in the graph) and keeps them on the graph (:func:`for_capture`); a capture omni-fast does
  not run (a serving stack capturing our ops; torch.compile's ``mode="reduce-overhead"`` CUDA-graph trees) gets
  counters made inside it for each split-K launch (one memset node of that graph before the launch, zeroed at
  each replay) and kept for good in :data:`_KEPT_FOR_FOREIGN_GRAPHS`: such a graph reads them by address on every
  replay, and we cannot see when it is freed, nor where one capture ends and the next begins (one int32
  ``[tiles]`` tensor per split-K launch captured: a model of 48 MoE layers, two split-K GEMMs each, keeps 96 per
  graph). To CUDA-graph trees they are the graph's temporaries: its replays may write them, as any temporary.

One rule for the graphs of :func:`~omni_fast.models.cuda_graphs.capture`: all their split-K launches share one set,
so their body must not fork split-K launches onto side streams that run in parallel inside the graph (no body in
omni-fast does; a foreign capture's launches each have their own set, forked or not).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from .._cache_memory import made_outside_pools
from .._device import capturing

MAX_TILE_COUNTERS = 1 << 14
_EAGER: dict[tuple, torch.Tensor] = {}  # (device, stream handle or None off CUDA) -> counters
_KEPT_FOR_FOREIGN_GRAPHS: list[torch.Tensor] = []


class _CaptureState(threading.local):
    """This thread's :func:`omni_fast.models.cuda_graphs.capture` under way: ``need`` (device -> most counters one
    launch took) while its warm-ups run, ``graph_counters`` (the counters its graph reads) while it captures."""

    def __init__(self):
        self.need: dict[torch.device, int] | None = None
        self.graph_counters: list[torch.Tensor] | None = None


_STATE = _CaptureState()


def _indexed(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device`` with its index: ``"cuda"`` is the current CUDA device (the launches pass
    their tensors' device, always indexed; ``torch.device("cuda")`` would be another dict key and never equal it)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _zeroed(device: torch.device, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int32, device=device)


def tile_counters(device: torch.device | str, tiles: int) -> torch.Tensor:
    """int32 counters (at least ``tiles``) on ``device``, zero, for one split-K launch on the current stream of
    ``device``; see the module doc for whose they are."""
    if tiles > MAX_TILE_COUNTERS:
        raise ValueError(f"{tiles} split-K tiles in one launch, more than the {MAX_TILE_COUNTERS} counters")
    device = _indexed(device)
    if capturing(device):
        return _graph_counters(device, tiles)
    if _STATE.need is not None:  # a warm-up before a capture: the graph will need as many
        _STATE.need[device] = max(_STATE.need.get(device, 0), tiles)
    key = _eager_key(device)
    cnt = _EAGER.get(key)
    if cnt is None:  # (kept for good: made outside any pool CUDA-graph trees route a warm-up's allocations into)
        cnt = _EAGER[key] = made_outside_pools(lambda: _zeroed(device, MAX_TILE_COUNTERS), device)
    return cnt


def _eager_key(device: torch.device) -> tuple:
    return device, (torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None)


def eager_counters(device: torch.device | str) -> torch.Tensor | None:
    """The counters eager split-K launches on the current stream of ``device`` use (None before the first): all
    zero between launches (the tests check every tile reset its counter)."""
    return _EAGER.get(_eager_key(_indexed(device)))


def _graph_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Counters for a launch being captured: the graph's own (its launches run one after another in the graph, so
    they share them)."""
    mine = _STATE.graph_counters
    for cnt in mine or ():
        if cnt.device == device and cnt.numel() >= tiles:
            return cnt
    cnt = _zeroed(device, tiles)  # inside the capture: a memset node, zeroed again at each replay's start
    (mine if mine is not None else _KEPT_FOR_FOREIGN_GRAPHS).append(cnt)
    return cnt


@contextlib.contextmanager
def recorded() -> Iterator[dict]:
    """Around a capture's warm-ups: yields the dict (device -> counters) the split-K launches in them needed."""
    outer, _STATE.need = _STATE.need, {}
    try:
        yield _STATE.need
    finally:
        _STATE.need = outer


@contextlib.contextmanager
def for_capture(need: dict) -> Iterator[list[torch.Tensor]]:
    """Around a capture: makes the counters ``need`` names, zeroed, before it begins, and yields the list of every
    set the captured launches read (the caller keeps it with the graph: the graph reads them by address)."""
    outer, _STATE.graph_counters = _STATE.graph_counters, [_zeroed(d, n) for d, n in need.items()]
    try:
        yield _STATE.graph_counters
    finally:
        _STATE.graph_counters = outer
