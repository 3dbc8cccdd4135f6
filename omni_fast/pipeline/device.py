"""Device-side plumbing of the streaming scheduler: stage clocks, host <-> device copies that do not block, KV
caches, and the leases that give each live stream its own decoders and codec streams."""

from __future__ import annotations

import threading
import time
import weakref
from typing import Iterator

import torch

from .._cache_memory import record_copy_use
from .._device import on_device, synchronize
from ..models.cuda_graphs import ReplayGuard


def now(device: torch.device) -> float:
    """A stage clock: ``perf_counter`` after the current stream has finished its queued work (on CUDA). The current
    stream, not the device: a request's work is ordered on its thread's current stream (capture side streams and
    the replay guards join it), and a server thread running its requests on a stream of its own
    (``torch.cuda.stream``) then does not wait for the other threads' work at every stage boundary."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return time.perf_counter()


def resumed_in_order(events: Iterator, device: torch.device, lease: "Lease | None" = None) -> Iterator:
    """``events`` (a stream's generator) re-yielded so that a resume on another CUDA stream than the last one (a
    server thread that took the request over, on a stream of its own) first waits for the work the last resume
    queued: each resume is one :class:`~omni_fast.models.cuda_graphs.ReplayGuard` hold (an event re-recorded per
    resume, a wait only across streams, no host sync), run with ``device`` as the current device (the work of
    each resume lands there whatever the resuming thread's current device is; its own is back at each yield).
    A resume on another stream than the last one also records what ``lease`` holds on it (:meth:`Lease.record`: a
    hot swap may drop those decoders while this stream's kernels still read them); one ``current_stream`` per
    resume otherwise. Closing this generator closes ``events`` at once (its leases end). Elsewhere: ``events`` as
    they are."""
    if device.type != "cuda":
        yield from events
        return
    order, last = ReplayGuard(), None
    try:
        while True:
            # each resume on the model's device (docs/reliability.md, "Several GPUs"): entered per resume, not
            # around the whole generator, whose suspended block would switch its consumer's device meanwhile
            with on_device(device), order.hold(device):
                stream = torch.cuda.current_stream(device)
                if lease is not None and stream != last:
                    lease.record()
                    last = stream
                try:
                    item = next(events)
                except StopIteration:
                    return
            yield item
    finally:
        getattr(events, "close", lambda: None)()


def new_cache(config, static: bool, max_len: int):
    """A transformers KV cache: ``StaticCache`` (preallocated, fixed shapes) or ``DynamicCache`` (grows)."""
    from transformers.cache_utils import DynamicCache, StaticCache

    return StaticCache(config=config, max_cache_len=max_len) if static else DynamicCache(config=config)


class AsyncHostCopy:
    """A device tensor's values copied to the host without blocking (pinned memory + an event on CUDA); read with
    :meth:`tolist`, which waits for that copy only."""

    def __init__(self, t: torch.Tensor):
        if t.device.type != "cuda":
            self.host, self.event = t, None
            return
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.host.copy_(t, non_blocking=True)  # (queued on t's device's current stream)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(t.device))  # that stream: the current device may be another

    def tolist(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync (pinned memory + a non-blocking copy on CUDA)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_device(values: list, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without a host sync: on CUDA through pinned memory and a non-blocking
    copy (a copy from pageable memory waits for the stream to drain first)."""
    return host_to_device(torch.tensor(values), device)


def int_positions(pos: torch.Tensor) -> torch.Tensor:
    """The float positions of ``get_rope_index`` as int64 when they are whole numbers (the fused RoPE needs
    integers; a fractional video timestamp keeps them float, for the rest of the request's decode too, and
    transformers' own RoPE runs). Integer positions pass through; float ones cost one host sync, at prefill
    (``rope_positions(..., integer=True)`` returns int64 whenever it can, so only fractional prompts get here)."""
    if not pos.is_floating_point():
        return pos
    as_int = pos.to(torch.int64)
    return as_int if torch.equal(as_int.to(pos.dtype), pos) else pos


class Lease:
    """A token a ``stream`` generator holds while it runs; what is leased to it (decoders, codec streams) is free
    again once it is gone (the generator finished or was garbage-collected). It also lists what was leased to it,
    with the device, to record them on each CUDA stream the generator resumes on (:meth:`record`)."""

    def __init__(self):
        self.held: list[tuple[object, torch.device]] = []

    def __reduce__(self):  # (a copy, e.g. of a generate's cache, is a new token holding nothing yet, as before)
        return Lease, ()

    def use(self, obj, device) -> None:
        """``obj`` is leased to this token: recorded on the current stream of ``device`` now
        (:func:`~omni_fast._cache_memory.record_copy_use`: a hot swap drops the decoders of the old weights from
        their cache while this generator may still have kernels reading them queued) and on each later
        :meth:`record`."""
        if device is None:
            return
        record_copy_use(obj, device)
        if not any(o is obj for o, _ in self.held):
            self.held.append((obj, device))

    def record(self) -> None:
        """Record what this token holds on the current streams of their devices (once per stream each)."""
        for obj, device in self.held:
            record_copy_use(obj, device)


_LEASES = threading.Lock()  # the check and the take of a free entry are one step (streams of several threads)


def lease_from(entries: list, lease: Lease, build, device=None):
    """The first object of ``entries`` (``[[object, weakref to its lease], ...]``) no live stream holds, now
    leased to ``lease``; else a new one from ``build()``, appended. Objects keep their caches and captured graphs
    between streams; interleaved streams, and streams of several threads, get one each (``build`` runs outside
    the lock: a capture does not hold up the other threads' leases). ``device``: the object's (default: its
    ``device`` attribute; neither: nothing to record), where :meth:`Lease.use` records it on the current stream."""
    obj = None
    with _LEASES:
        for entry in entries:
            if entry[1]() is None:  # its stream ended (or was dropped)
                entry[1] = weakref.ref(lease)
                obj = entry[0]
                break
    if obj is None:
        obj = build()
        with _LEASES:
            entries.append([obj, weakref.ref(lease)])
    lease.use(obj, getattr(obj, "device", None) if device is None else device)
    return obj


def entries_for(table: dict, key, keep: int, device: torch.device) -> list:
    """``table[key]``: the lease entries (``[[object, weakref to its lease], ...]``, for :func:`lease_from`) of one
    key, e.g. a batch size, made empty when new; ``key`` becomes the most recently used. At most ``keep`` keys stay:
    the least recently used keys whose objects no live stream holds are dropped (request-driven keys must not grow
    without bound; a key in use stays until its streams end, so ``table`` may briefly hold more). On CUDA the host
    waits for the device before the dropped objects are freed: their last replays may still run on another
    thread's stream (a sync only on a drop: a new key beyond ``keep``, whose first use captures graphs anyway;
    after any capture under way on another thread, which a device sync would break)."""
    with _LEASES:
        entries = table.pop(key, None)
        table[key] = entries = [] if entries is None else entries
        idle = [k for k, v in table.items() if k != key and all(e[1]() is None for e in v)]
        dropped = [table.pop(k) for k in idle[:max(0, len(table) - keep)]]
    if dropped and device.type == "cuda":
        synchronize(device)  # (not during another thread's capture: _device.synchronize)
    return entries
