"""Small device tensors that the kernel modules' and ops' caches keep past the call that made them: ``ops.sample``'s
suppress ranges and zero offset, ``rvq_embed``'s table offsets, the split-K tile counters. Later launches read them
by address, so where they are made and when they may be freed decide whether those launches read the right bytes.

- :func:`made_to_keep`: the one rule for where a kept tensor is made (inside a capture that is running, else
  outside the CUDA-graph pools), with a bounded cache's drop when full;
- :func:`made_outside_pools`: ``make()`` on a side stream, the general pool's;
- :func:`clear_when_full`: a bounded cache emptied after the devices finished reading it;
- :func:`record_use`: a looked-up tensor's block kept from reuse until this stream's launch is done;
- :func:`record_copy_use`: the same for a copy built from a module's weights (or a leased decoder, a codec stream),
  once per stream that uses it; :func:`copy_changed` when such an object made new tensors since.

Here, below ``kernels/`` and ``ops/`` (and ``models/cuda_graphs``, which captures), so that they import it at module
top. Rules in docs/reliability.md ("Long-running servers: what is kept").
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch

from ._device import capturing, on_device, side_stream, synchronize


def made_to_keep(make: Callable[[], object], device, in_capture: bool, cache: dict | None = None,
                 limit: int = 0) -> object:
    """``make()``, which allocates device tensors on ``device`` that a cache keeps past this call, made where they
    stay valid; ``in_capture``: whether ``device``'s current stream is being captured (the caller asked
    ``_device.capturing(device)``, and decides by it what it keeps).

    - In a capture: ``make()`` on the capturing stream, inside the capture. The graph reads the tensors by address on
      every replay (the caller keeps them for good, or not at all: then they are the graph's temporaries, remade at
      each replay). Nothing else is allowed there: a device sync (the cache's drop) breaks the capture, and a side
      stream made to wait for the capturing stream would join the capture.
    - Else: when ``cache`` is given, it is emptied first once it holds ``limit`` entries (:func:`clear_when_full`);
      then :func:`made_outside_pools`. Why not on the current stream: torch.compile's CUDA-graph trees
      (``mode="reduce-overhead"``) route every allocation of their stream during a warm-up into a graph's private
      pool, whose blocks a later replay of another graph frees and overwrites: a cached tensor made there would be
      overwritten. Made on a side stream, its block belongs to that stream: every later lookup on another stream
      records its use (:func:`record_use`), or a drop would hand the block at once to that side stream's next
      allocation while the launch still reads it."""
    if in_capture:
        return make()
    if cache is not None:
        clear_when_full(cache, limit)
    return made_outside_pools(make, device)


def clear_when_full(cache: dict, limit: int) -> None:
    """Empty ``cache`` (values: tensors or tuples of tensors that launches read by address) once it holds ``limit``
    entries, after the host waited for every CUDA device they sit on (``_device.synchronize``: a kernel queued by
    another thread may still read one, and the caching allocator would hand its block to the next allocation at
    once). Caches of small device tensors whose keys callers pick (``ops.sample``'s suppress ranges, ``rvq_embed``'s
    table offsets); call it outside a capture (a sync there breaks it: the caller keeps the cache until later). The
    sync covers launches queued before it; a thread that looked a tensor up before the drop and launches after it is
    covered by the stream its lookup recorded (:func:`record_use`)."""
    if len(cache) < limit:
        return
    values = [v for entry in cache.values() for v in (entry if isinstance(entry, tuple) else (entry,))]
    for device in {v.device for v in values if v.is_cuda}:
        synchronize(device)
    cache.clear()


def made_outside_pools(make: Callable[[], object], device) -> object:
    """``make()``, which allocates device tensors that outlive the call (a cache entry, split-K counters), run with a
    side stream of CUDA ``device`` current (never its capture stream), the current stream then waiting for it; on
    other devices just ``make()``. Why: torch.compile's CUDA-graph trees (``mode="reduce-overhead"``) run their
    warm-up with every allocation of their stream routed into a graph's private pool
    (``_cuda_beginAllocateCurrentStreamToPool``), whose blocks they free and hand to other graphs when they restore a
    checkpoint of that pool: a kept tensor made there would be overwritten by another graph's replay. An allocation
    on another stream comes from the general pool. Outside a capture only (a capture's tensors are its own)."""
    device = torch.device(device)
    if device.type != "cuda":
        return make()
    with on_device(device):
        current, side = torch.cuda.current_stream(), side_stream()
        side.wait_stream(current)  # (make may read what the current stream wrote)
        with torch.cuda.stream(side):
            out = make()
        current.wait_stream(side)
    return out


def record_use(tensors) -> None:
    """Tell the caching allocator that the current stream of each CUDA tensor's device is about to read it
    (``Tensor.record_stream``): when the tensor is freed, its block goes back to the allocator only once the work
    queued on that stream by then is done. For the small tensors of a cache whose drop (:func:`clear_when_full`)
    another thread may run between this thread's lookup and its launch: the drop's device sync comes BEFORE the
    launch, and the launching thread then holds the last reference; without the record, dropping it after the
    launch hands its block at once to the next allocation on the stream that made it (another thread's), whose
    writes may land while the launch on this stream still reads it. On the stream that made it, or once recorded,
    torch's record is a no-op check (one allocator lookup per tensor): no sync, no event until the free. Call it
    after the lookup, outside a capture (the tensors a capture reads are kept for good) and outside torch.compile
    tracing (a cache lookup is not traced: the traced path builds its tensors in the graph)."""
    stream = None
    for t in tensors:
        if t.is_cuda:
            if stream is None or stream.device != t.device:
                stream = torch.cuda.current_stream(t.device)
            t.record_stream(stream)


_USED_ON: "weakref.WeakKeyDictionary[object, set]" = weakref.WeakKeyDictionary()  # copy -> streams recorded on it
_USED_ON_LOCK = threading.Lock()


def record_copy_use(copy: object, device: torch.device) -> None:
    """:func:`record_use` for a copy built from a module's weights (the patched Code2Wav, the talker's
    CodePredictor, a text decoder's ``gate_up`` / ``shared_w13`` concatenations) or an object leased to one request
    at a time (a decoder's KV state, a codec stream's buffers), at each lookup, recording its tensors once per stream
    that uses it (later lookups on that stream: one ``current_stream`` and a set check). Its cache drops it when the
    weights change (a hot swap) while a request of another thread may still hold it, or have kernels reading it
    queued on its own stream; the last reference then freed its blocks straight back to the stream that MADE them,
    whose next allocation (the new copy's requests) could overwrite what a queued kernel still read. Views of the
    module's weights are recorded too: after a reassignment (``load_state_dict(assign=True)``, ``.to()``) the copy
    holds the last reference to the old weights. ``copy``: an nn.Module, or an object whose attributes hold tensors,
    nn.Modules (their parameters and buffers), dicts / lists / tuples of them, or omni-fast objects holding them
    (:func:`_copy_tensors`). Not during a capture (what a graph reads is kept with the graph)."""
    device = torch.device(device)
    if device.type != "cuda" or capturing(device):
        return
    stream = torch.cuda.current_stream(device)
    seen = _USED_ON.get(copy)
    if seen is not None and stream in seen:
        return
    record_use(_copy_tensors(copy))
    with _USED_ON_LOCK:
        _USED_ON.setdefault(copy, set()).add(stream)


def copy_changed(copy: object) -> None:
    """``copy`` (of :func:`record_copy_use`) holds tensors made since its lookups recorded it (a decoder's new KV
    state, a codec stream's new graph buffers: made on the stream current then): every stream's next lookup records
    all its tensors again. Host only; nothing while torch.compile traces (the traced code's tensors are the
    graph's, and a lock cannot be traced)."""
    if torch.compiler.is_compiling():
        return
    with _USED_ON_LOCK:
        _USED_ON.pop(copy, None)


def _copy_tensors(copy: object) -> list:
    """The tensors ``copy`` holds, each object walked once (cycles: a workspace that points back at its decoder):
    an nn.Module's parameters and buffers; the attribute values of ``copy`` itself and of the omni-fast objects
    found in them (a decoder's layers and state), through dicts, lists and tuples. Other objects (configs,
    generators, graphs: their memory is their pool's) are skipped."""
    found, walked, todo = [], set(), [copy]
    while todo:
        item = todo.pop()
        if id(item) in walked:
            continue
        walked.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, torch.nn.Module) and not _ours(item):
            found.extend([*item.parameters(), *item.buffers()])
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
        elif item is copy or _ours(item):
            todo.extend(getattr(item, "__dict__", {}).values())  # (an omni-fast module: its dicts of parameters too)
    return found


def _ours(item: object) -> bool:
    return not isinstance(item, type) and type(item).__module__.startswith("omni_fast.") \
        and isinstance(getattr(item, "__dict__", None), dict)
