"""Several GPUs: work runs on the device of the tensors it is given, never on the thread's current device.

A model split with transformers' ``device_map="auto"`` (thinker layers on cuda:0 and cuda:1, the talker and
Code2Wav on cuda:1), or a serving worker whose ``torch.cuda.current_device()`` is not the device of the tensors it
passes, calls omni-fast with tensors on a device that is not the current one. FlashAttention's and vLLM's ops
guard their tensors' device (a C++ ``CUDAGuard``); omni-fast does the same with the helpers here:

- :func:`on_device`: ``torch.cuda.device(device)`` for a CUDA device, nothing elsewhere. The one launcher
  (``kernels/launch.py``) enters it around every Triton launch (``kernels/cuda_cupy.run`` selects the same device and
  its current stream for the CuPy launches); every model-level entry point that
  captures or replays CUDA graphs, records events or makes streams (``CodePredictor.predict_frame``,
  ``MoeTextDecoder.step``, ``Code2WavStream.push``, the Token2Wav DiT solves, the pipelines' ``stream`` per resume)
  enters it ONCE around its body, so everything below it that asks CUDA for "the current" stream, event device or
  capture status asks the tensors' device. The lower-level pieces take the device they are given
  (``cuda_graphs.capture`` enters it and captures on a stream of it: ``MoeTextDecoder.load_prefill`` / ``reserve``
  capture through it; ``ReplayGuard.hold(device)``).
- :func:`capturing`: whether the current stream of a given device is being captured (torch's
  ``is_current_stream_capturing`` asks the current device only).
- :func:`devices_of`: the devices a module's weights sit on (a ``device_map`` split shows as several).

Rules in docs/reliability.md ("Several GPUs").

Captures and syncs of the process (here, below both the kernel modules and ``models/cuda_graphs``, so that the
kernels' and ops' caches reach them without importing the model layer): :data:`CAPTURE_LOCK`, the one capture at a
time that ``cuda_graphs.capture`` holds; :func:`capture_stream`, each device's one capture stream;
:func:`side_stream`, a side stream that is never a capture stream; :func:`synchronize`, a device sync that waits for
a capture under way (docs/reliability.md, "Long-running servers").
"""

from __future__ import annotations

import contextlib
import threading

import torch


def on_device(device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` when ``device`` (a ``torch.device``, string or None) is a CUDA device, else a
    no-op context. Entering it costs a device switch only when the current device differs (no sync)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.device(torch.device(device))
    return contextlib.nullcontext()


def capturing(device) -> bool:
    """Whether the current stream of ``device`` (a CUDA device; False for any other) is being captured into a CUDA
    graph. Asked of that device, not of the current one: a capture on cuda:1 is not seen from cuda:0. Asked of the
    current device (one GPU: always) it is torch's one query, no device switch: it runs on every op call's value
    check (``validation.values_checkable``), every ``ReplayGuard`` hold and every persistent flag watch."""
    if device is None:
        return False
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def offloaded(*tensors: torch.Tensor | None) -> bool:
    """Whether any of the tensors a patched forward reads directly sits on the meta device: accelerate's CPU / disk
    offload (``device_map``) keeps a submodule's weights there outside its own hooked forward, which loads them for
    that forward only, so a patched forward that reads a SUBMODULE's weights without calling it would hand meta
    tensors to the op. Such a call runs transformers' forward (which calls the submodules: their hooks load them)."""
    return any(t is not None and t.is_meta for t in tensors)


def devices_of(*modules: torch.nn.Module) -> list[torch.device]:
    """The devices of the modules' parameters and buffers, in first-seen order: one for a model on one device,
    several for a model that transformers' ``device_map`` split (its layers on cuda:0 and cuda:1)."""
    seen: dict[torch.device, None] = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            seen.setdefault(t.device)
    return list(seen)


# One capture at a time in the process (``cuda_graphs.capture``: PyTorch supports one). Lock order: a ReplayGuard's
# lock, then this one; nothing takes a ReplayGuard while holding it but the capturing thread's own re-entrant holds.
CAPTURE_LOCK = threading.RLock()

# The capture stream of each device (index -> stream), made by its first capture, used only under CAPTURE_LOCK.
_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream() -> torch.cuda.Stream:
    """A side stream of the current device (a capture's warm-up, a cache entry made outside the graph pools), never
    the device's capture stream: torch.cuda.Stream() draws from torch's pool (32 per device, round robin), so a draw
    may be that very CUDA stream, and a side stream's work runs outside the capture lock: on the capture stream
    while another thread captures, its kernels would be captured into that graph. A colliding draw is made again
    (the next one in the round is another stream)."""
    avoid = _CAPTURE_STREAMS.get(torch.cuda.current_device())
    side = torch.cuda.Stream()
    for _ in range(2):
        if avoid is None or side != avoid:
            break
        side = torch.cuda.Stream()
    return side


def capture_stream() -> torch.cuda.Stream:
    """The current device's capture stream (called under :data:`CAPTURE_LOCK`, inside ``cuda_graphs.capture``'s
    device). One per device, reused: graphs sharing a ``pool`` reuse each other's freed scratch only when captured
    on the same stream (the caching allocator hands a freed block back to its own stream only; torch.cuda.graph's
    note), and a fresh side stream per capture (torch's pool of 32, round robin) made a shared pool the sum of its
    graphs' activations. Never a side stream's (:func:`side_stream`): warm-ups run outside the lock, and another
    thread's kernels launched on a capturing stream would be captured into this graph."""
    index = torch.cuda.current_device()
    stream = _CAPTURE_STREAMS.get(index)
    if stream is None:
        stream = _CAPTURE_STREAMS[index] = torch.cuda.Stream(index)
    return stream


def synchronize(device) -> None:
    """The host waits for every stream of CUDA ``device`` (``torch.cuda.synchronize``), never during another
    thread's capture: synchronising the device while any of its streams captures is an error that also invalidates
    that capture, in every capture mode (CUDA forbids synchronising or querying a handle that encompasses a
    capturing stream, the device or context included). So under :data:`CAPTURE_LOCK`: it waits for a capture under
    way to end. For rare drops of what other threads' streams may still read (a full cache); never call it while
    this thread captures."""
    with CAPTURE_LOCK:
        torch.cuda.synchronize(device)
