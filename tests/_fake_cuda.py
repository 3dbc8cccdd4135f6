"""torch.cuda's device, stream, event and graph objects faked on a CPU, with several devices and a current one.

What the CPU tests check is what omni-fast asks CUDA for (which device's stream captures, waits, records), not CUDA
itself. The fake follows torch's rules where they matter for several GPUs:

- ``torch.cuda.device(d)`` switches the current device; ``torch.cuda.stream(s)`` makes ``s`` the current stream of
  its device AND switches the current device to it (torch's ``set_stream``), both restored on exit;
- ``torch.cuda.Stream()`` is a new stream, or with ``pool=N`` one of N per device drawn round robin (torch's stream
  pool: 32 per device and priority, so two draws may be the same CUDA stream);
- ``torch.cuda.Stream()`` / ``Event.record()`` / ``current_stream()`` / ``is_current_stream_capturing()`` without a
  device mean the CURRENT device;
- ``torch.cuda.graph(g)`` without ``stream=`` captures on ONE default stream per process, made on the device current
  at the first capture (torch's ``graph.default_capture_stream``); it synchronises the current device on entry.

``FakeCuda.kernel(device)`` stands in for a kernel launched on tensors of ``device`` (the launcher's
``torch.cuda.device`` guard, then Triton's "current stream of the current device"): it returns the stream the kernel
lands on, and whether that stream was capturing.
"""

from __future__ import annotations

import torch


class FakeStream:
    def __init__(self, index: int):
        self.device = torch.device("cuda", index)
        self.waited, self.waited_streams, self.synced, self.capturing = [], [], 0, False
        self.cuda_stream = id(self)  # (the handle CuPy wraps)

    def synchronize(self):
        self.synced += 1

    def wait_stream(self, other):
        self.waited_streams.append(other)

    def wait_event(self, event):
        self.waited.append(event)

    def __repr__(self):
        return f"<FakeStream {self.device} {id(self):#x}>"


class FakeCuda:
    """Installs the fake with ``devices`` devices, ``current`` the current one; see the module doc."""

    def __init__(self, monkeypatch, devices: int = 2, current: int = 0, pool: int | None = None):
        self.current = current
        self.pools, self.drawn = {}, {}  # torch.cuda.Stream(): the streams made / the draws, per device
        self.streams = {i: FakeStream(i) for i in range(devices)}  # the current stream of each device
        self.captures = []  # per capture: its kwargs plus "on" (the capture stream)
        self.synced = []  # devices torch.cuda.synchronize() waited for
        self.events = 0  # events made
        self.entered = []  # the devices torch.cuda.device(d) entered, in order
        self.default_capture_stream = None
        fake = self

        class Event:
            def __init__(self, *a, **k):
                fake.events += 1
                self.stream = None

            def record(self, stream=None):
                self.stream = stream if stream is not None else fake.streams[fake.current]

            def synchronize(self):
                pass

            def query(self):
                return True

        class Stream(FakeStream):
            def __new__(cls, device=None, *a, **k):  # torch's pool: ``pool`` streams per device, round robin
                idx = fake.index(device)
                made, drawn = fake.pools.setdefault(idx, []), fake.drawn.get(idx, 0)
                fake.drawn[idx] = drawn + 1
                if pool is None or len(made) < pool:
                    made.append(super().__new__(cls))
                    return made[-1]
                return made[drawn % pool]

            def __init__(self, device=None, *a, **k):
                if not hasattr(self, "device"):  # (a pool stream drawn again keeps its state)
                    super().__init__(fake.index(device))

        class device:
            def __init__(self, d):
                self.idx = fake.index(d)

            def __enter__(self):
                fake.entered.append(self.idx)
                self.prev, fake.current = fake.current, self.idx

            def __exit__(self, *exc):
                fake.current = self.prev
                return False

        class graph:
            def __init__(self, g, pool=None, stream=None, capture_error_mode="global"):
                if stream is None and fake.default_capture_stream is None:
                    fake.default_capture_stream = Stream()
                self.on = stream if stream is not None else fake.default_capture_stream
                fake.captures.append(dict(pool=pool, capture_error_mode=capture_error_mode, on=self.on))

            def __enter__(self):
                fake.synced.append(fake.current)
                self.ctx = _StreamCtx(fake, self.on)
                self.ctx.__enter__()
                self.on.capturing = True

            def __exit__(self, *exc):
                self.on.capturing = False
                self.ctx.__exit__(*exc)
                return False

        self.Stream, self.Event = Stream, Event
        from omni_fast import _device  # (its per-device capture streams: this fake's own)

        monkeypatch.setattr(_device, "_CAPTURE_STREAMS", {})
        for name, value in dict(Stream=Stream, Event=Event, device=device, graph=graph,
                                stream=lambda s: _StreamCtx(self, s),
                                CUDAGraph=_Graph, current_stream=self.current_stream,
                                is_current_stream_capturing=lambda: self.streams[self.current].capturing,
                                current_device=lambda: self.current, device_count=lambda: len(self.streams),
                                synchronize=lambda d=None: self.synced.append(self.index(d)),
                                graph_pool_handle=lambda: "pool").items():
            monkeypatch.setattr(torch.cuda, name, value, raising=False)

    def index(self, device) -> int:
        if device is None:
            return self.current
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return device.index if device.index is not None else self.current

    def current_stream(self, device=None) -> FakeStream:
        return self.streams[self.index(device)]

    def kernel(self, device) -> tuple[FakeStream, bool]:
        with torch.cuda.device(torch.device(device)):
            s = self.current_stream()
            return s, s.capturing


class _StreamCtx:
    def __init__(self, fake: FakeCuda, s: FakeStream):
        self.fake, self.s = fake, s

    def __enter__(self):
        idx = self.s.device.index
        self.prev = (self.fake.current, idx, self.fake.streams[idx])
        self.fake.current, self.fake.streams[idx] = idx, self.s

    def __exit__(self, *exc):
        self.fake.current, idx, self.fake.streams[idx] = self.prev
        return False


class _Graph:
    pass
