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
"""

from __future__ import annotations

import contextlib

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
