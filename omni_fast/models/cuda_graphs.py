"""The one CUDA-graph capture routine of the model modules (MTP frame, text decode step, Code2Wav stream step), the
weights identity (:func:`weights_key`) their graph caches are keyed on, and the :class:`ReplayGuard` of graphs that
several requests share."""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Iterator

import torch

from .._device import CAPTURE_LOCK, capture_stream, capturing, on_device, side_stream
from ..kernels import tile_counters


def capture(fn: Callable[[], object], device: torch.device | str | None = None, *, warmup: int = 2, pool=None,
            after_warmup: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run ``fn`` ``warmup`` times on a side stream, then capture one call of it; returns ``(graph, outputs)``.

    The warm-up keeps everything a capture forbids outside it: Triton JIT compiles and autotuning, cuBLAS handle
    creation, lazily built constant tensors. ``after_warmup`` undoes what the warm-up calls changed in the caller's
    state (it runs on the current stream, before the capture). ``outputs`` are ``fn``'s return values during the
    capture: the static buffers each replay rewrites. ``pool``: a ``torch.cuda.graph_pool_handle()`` shared by
    graphs that never replay concurrently.

    The capture is ``thread_local`` (``cudaStreamCaptureModeThreadLocal``), not torch's default ``global``: under
    ``global`` a capture forbids the capture-unsafe CUDA calls (``cudaMalloc`` of a caching allocator that grows, a
    synchronize, an event query) on EVERY thread of the process, so another request's thread of a server that
    allocates while this request captures its first graph fails with "operation not permitted when stream is
    capturing", and the capture is invalidated too. ``thread_local`` still refuses such calls on the capturing
    thread (where they would be bugs of the captured body) and leaves the other threads alone; their work runs
    on their own streams and the caching allocator's general pool, not on this capture's side stream and private
    pool (PyTorch's own cudagraph trees capture the same way). Captures of several threads (one request's first
    decode step, another's first MTP frame) are serialised by one process-wide lock (``_device.CAPTURE_LOCK``, which
    ``_device.synchronize`` takes too): PyTorch supports one capture at a time (``torch.cuda.graph`` synchronises the
    device and empties the allocator's cache on entry, which must not happen while another stream captures); the
    warm-ups and every replay run outside that lock.

    Several GPUs: everything happens on ``device`` (the device of the tensors ``fn`` works on), whatever the
    current device is: the warm-up's side stream, the synchronisation on entry and the capture stream. The capture
    stream is passed explicitly (``_device.capture_stream``, ONE per device, as torch keeps one per process):
    ``torch.cuda.graph``'s default is ONE stream per process, made on whichever device was current at the first
    capture, so a later capture for another device would capture on a stream of the wrong device, where none of
    ``fn``'s kernels (launched on their tensors' device) land: an empty graph whose replays leave the outputs of the
    capture run unchanged. A replay needs no guard (torch replays on the capture device's current stream). Nothing
    executes during a capture, and ``torch.cuda.graph`` synchronises the device on entry: the capture stream needs
    no wait on the caller's stream, nor the caller's on it.
    """
    with on_device(device):
        side = side_stream()
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), tile_counters.recorded() as counters_needed:
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        if after_warmup is not None:
            after_warmup()
        graph = torch.cuda.CUDAGraph()
        # split-K launches in the graph count on counters of its own (another stream's launches or another graph's
        # replays may run beside its replays), made zeroed before the capture and kept with the graph
        with tile_counters.for_capture(counters_needed) as graph_counters, CAPTURE_LOCK, \
                torch.cuda.graph(graph, pool=pool, stream=capture_stream(), capture_error_mode="thread_local"):
            out = fn()
        graph.omni_fast_tile_counters = graph_counters
    return graph, out


def weights_key(*modules: torch.nn.Module) -> tuple:
    """Identity of the modules' current weights (storage, dtype, device, in-place version of every tensor): a model
    built from them (a :class:`CodePredictor`, a ``Code2Wav``), or a CUDA graph that reads them by address, is
    stale once this changes (``.to()``, ``load_state_dict``, an in-place update). Writes autograd does not count
    (``param.data.copy_(...)``; in place on an inference tensor) change it only once announced with
    :func:`weights_changed`, except ``load_state_dict`` (counted by a post hook this registers on the modules)."""
    for m in modules:  # (every call: a submodule attached since, e.g. a swapped block, is hooked too)
        _watch_loads(m)
    return tuple((t.data_ptr(), t.dtype, t.device, _writes(t))
                 for m in modules for t in (*m.parameters(), *m.buffers()))


_WATCHED = "_omni_fast_loads_watched"  # on a module whose load_state_dict counts the writes of its inference tensors
_WRITES = "_omni_fast_writes"  # on an inference tensor: its writes announced (it has no version counter)


def _writes(t: torch.Tensor) -> int:
    """The in-place writes to ``t`` so far: autograd's version counter; for an inference tensor (made under
    torch.inference_mode: no counter, yet writable in place inside inference mode, e.g. by ``load_state_dict``) the
    writes announced by :func:`weights_changed` and the load hook."""
    return getattr(t, _WRITES, 0) if t.is_inference() else t._version


def _watch_loads(module: torch.nn.Module) -> None:
    """Make ``load_state_dict`` of ``module`` or of any submodule (or of a parent: torch runs every loaded
    submodule's post hooks) count as a write of their inference tensors, which the version counter misses: a model
    built under inference_mode and reloaded there (a hot swap) kept its cached copies of the old weights."""
    for sub in module.modules():
        if not sub.__dict__.get(_WATCHED, False):
            sub.register_load_state_dict_post_hook(_loaded)
            sub.__dict__[_WATCHED] = True


def _loaded(module: torch.nn.Module, incompatible_keys) -> None:
    """load_state_dict post hook (module-level: hooked modules still pickle)."""
    _announce(t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)) if t.is_inference())


def _announce(tensors) -> None:
    for t in tensors:
        if t.is_inference():
            setattr(t, _WRITES, _writes(t) + 1)
        else:
            torch.autograd.graph.increment_version(t)


def weights_changed(*weights: torch.nn.Module | torch.Tensor) -> None:
    """Announce that the values of these modules' parameters and buffers (or of these tensors) changed in a way
    autograd's version counter does not see: ``param.data.copy_(new)`` (vLLM's ``default_weight_loader``, many EMA
    and RL weight-sync loops), any in-place op through ``.data``, an in-place write to an inference tensor. Every
    omni-fast copy built from them (the patched Code2Wav, the talker's code predictor, text decoders, the DiT's
    fused weights, graphs keyed on them) is rebuilt at its next call; without this they kept the old values.
    ``load_state_dict``, ``with torch.no_grad(): p.copy_(new)`` and new tensors (``.to()``, assignment) need no call.
    Bumps each tensor's version counter (for an inference tensor: omni-fast's count of its writes); no device
    work. TypeError for anything but modules and tensors."""
    for w in weights:
        if isinstance(w, torch.nn.Module):
            _announce((*w.parameters(), *w.buffers()))
        elif isinstance(w, torch.Tensor):
            _announce((w,))
        else:
            raise TypeError(f"weights must be torch.nn.Module or torch.Tensor objects, got {type(w).__name__}")


def key_devices(key: tuple) -> set[torch.device]:
    """The devices of the tensors a :func:`weights_key` was taken of: several for a module ``device_map`` split,
    ``meta`` among them for one it offloaded (CPU / disk). Read off the key its callers compute anyway (one pass
    over the module's tensors per call, not two)."""
    return {device for _, _, device, _ in key}


class ReplayGuard:
    """One user at a time for what several requests share: a graph's static input/output buffers (or a memory pool,
    or a persistent kernel's workspace), from the copy-in to the copy-out of the result.

    ``with guard.hold(device):`` takes the lock (host order: threads of a server), makes the current stream wait
    for the previous holder's work (its event: threads may run on different streams), and records the end of this
    holder's work on the current stream when it leaves (also after an exception: what was queued must still be
    waited for). Re-entrant: a nested hold (a persistent frame launched by the body of a frame graph being
    captured takes it again) neither waits nor records, the outermost one orders the work; nor does a hold while
    the current stream captures (a caller's own graph around ours): waiting there on an event recorded outside the
    capture is not allowed, and the capture runs nothing, its replays are what the caller orders. No host sync.
    Pickles and deep-copies as a fresh guard (its lock and event belong to this process and device).

    ``device`` is the device of the shared buffers: "the current stream" above is ``device``'s current stream and
    the capture status is asked of it, whatever the thread's current device is (docs/reliability.md, "Several
    GPUs").

    Host work per hold (every MTP frame takes one): one capture-status query and one event record; a holder on
    another stream than the previous one also one stream wait. One event is re-recorded (a wait binds to the
    record before it: CUDA's cudaStreamWaitEvent semantics), not one created and destroyed per hold."""

    def __init__(self):
        self.lock, self.done, self.depth = threading.RLock(), None, 0
        self.stream = None  # the stream ``done`` was last recorded on (a holder on it is ordered already)

    def __reduce__(self):
        return type(self), ()

    def wait(self, device) -> None:
        """The current stream waits for the previous holder's work (and its output copies), wherever it ran."""
        if self.done is not None and _ordered(device):
            stream = torch.cuda.current_stream(device)
            if stream != self.stream:  # (on the same stream the previous holder's work is before ours anyway)
                stream.wait_event(self.done)

    def record(self, device) -> None:
        if _ordered(device):
            stream = torch.cuda.current_stream(device)
            if self.done is None or self.stream is None or self.stream.device != stream.device:
                self.done = torch.cuda.Event()  # (an event records on streams of the device it was made on)
            self.done.record(stream)
            self.stream = stream

    def drain(self, device) -> None:
        """Inside a hold, before dropping what the holders shared (graphs and their static inputs, persistent
        frames' workspaces): the host waits for the current stream, which the hold ordered after every earlier
        holder's work. The caching allocator hands a freed block to the next allocation on the stream that made
        it at once, and a holder of another thread's stream may still be replaying with it. A host sync, only on
        these rare drops (new weights, a full cache)."""
        if self.depth and self.done is not None and _ordered(device):
            torch.cuda.current_stream(device).synchronize()

    @contextlib.contextmanager
    def hold(self, device) -> Iterator[None]:
        with self.lock:
            outer = self.depth == 0  # (depth changes only under the lock)
            self.depth += 1
            try:
                if outer:
                    self.wait(device)
                try:
                    yield
                finally:
                    if outer:
                        self.record(device)
            finally:
                self.depth -= 1


def _ordered(device) -> bool:
    """Whether a hold on ``device`` orders the device work with an event: a CUDA device whose current stream is not
    being captured (asked of ``device``, not of the current device: a model on cuda:1 held from a thread whose
    current device is cuda:0)."""
    return torch.device(device).type == "cuda" and not capturing(device)


class ModelRef:
    """A weak reference from what a model caches (a captured graph, a persistent frame) to that model: a strong one
    is a cycle, which keeps a dropped model's weights and graphs until a full garbage collection. ``ref()`` is the
    model or None; :meth:`get` the model, or a ``ReferenceError`` once it was freed (a graph kept past its model
    must not replay: it reads the freed weights by address). Pickles and deep-copies as the model itself, as the
    strong reference did (through the memo: a copied model's caches refer to the copy)."""

    __slots__ = ("_ref", "what")

    def __init__(self, model, what: str):
        self._ref, self.what = (weakref.ref(model) if model is not None else None), what

    def __call__(self):
        return self._ref() if self._ref is not None else None

    def get(self):
        model = self()
        if model is None:
            raise ReferenceError(f"the {self.what} this was built for was freed (its weights with it): a graph or "
                                 f"frame kept past its model cannot run; build it again from a live model")
        return model

    def __reduce__(self):
        return ModelRef, (self(), self.what)
