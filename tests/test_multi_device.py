"""Several GPUs on a CPU: what omni-fast asks CUDA for when the tensors' device is not the current device
(tests/_fake_cuda.py: two devices, cuda:0 current, the tensors on cuda:1). Each test failed before its fix.
docs/reliability.md, "Several GPUs"; the real thing: tests/test_multi_gpu.py (2 GPUs)."""

import sys
import types

import torch
from _fake_cuda import FakeCuda


class _OnCuda1:
    """Stands in for a CUDA tensor on cuda:1 (what the code under test reads of it)."""

    is_cuda = True
    device = torch.device("cuda:1")
    dtype = torch.int32
    shape = (1,)


class _HostWord:
    def copy_(self, src, non_blocking=False):
        self.src = src


def test_launch_runs_on_the_tensors_device(monkeypatch):
    """The one launcher switches to the tensors' device around the launch (Triton launches on the current device's
    current stream) and back."""
    from omni_fast.kernels.launch import launch

    fake = FakeCuda(monkeypatch)
    seen = []

    class _Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.append(fake.current_stream())

    launch(_Kernel(), (1,), device=torch.device("cuda:1"))
    assert seen == [fake.streams[1]] and fake.current == 0


def test_persistent_flag_watch_records_on_the_flags_device(monkeypatch):
    """The persistent kernel's flag copy (queued on the flag's device) and the event the host polls: the event was
    recorded on the CURRENT device's stream, so with the model on cuda:1 and cuda:0 current it completed without
    waiting for the copy, and the host read a word not yet written (a missed trip, or garbage read as one)."""
    from omni_fast.models.persistent.watch import FlagWatch

    fake = FakeCuda(monkeypatch)
    event = fake.Event()
    watch = FlagWatch(_OnCuda1(), host=_HostWord(), event=event)
    watch.record()
    assert event.stream is fake.streams[1]
    fake.streams[1].capturing = True  # cuda:1 captures (cuda:0 does not): nothing recorded, nothing queried
    event.stream = None
    watch.record()
    assert event.stream is None and watch.tripped() == 0


def test_value_checks_skip_while_the_tensors_device_captures(monkeypatch):
    """A data-dependent check (a host sync) must not run while the tensors' device captures a graph: it asked the
    CURRENT device, so an op called with check_values=True on cuda:1 tensors during a capture there (cuda:0 current)
    synced inside the capture (CUDA invalidates it). Asked of the tensors' device now."""
    from omni_fast.validation import values_checkable

    fake = FakeCuda(monkeypatch)
    fake.streams[1].capturing = True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not values_checkable(_OnCuda1(), check_values=True)
    fake.streams[1].capturing = False
    assert values_checkable(_OnCuda1(), check_values=True)


def test_async_host_copy_records_on_the_tensors_device(monkeypatch):
    """The pipeline's non-blocking device-to-host copies (sampled ids, codes): the event ``tolist`` waits for was
    recorded on the current device's stream while the copy ran on the tensor's: ``tolist`` could read the pinned
    buffer before the copy landed."""
    from omni_fast.pipeline import device as pdev

    fake = FakeCuda(monkeypatch)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _HostWord())  # (no pinned memory without CUDA)
    copy = pdev.AsyncHostCopy(_OnCuda1())
    assert copy.event.stream is fake.streams[1] and copy.host.src.device == torch.device("cuda:1")


def test_cupy_launches_on_the_tensors_device_and_stream(monkeypatch):
    """The CUDA C++ kernels (CuPy): the sampler wrapped torch's stream in an ``ExternalStream`` BEFORE entering the
    tensors' device, so the stream was taken as the current device's (cuda:0) and the launch on cuda:1 went to
    CuPy's stream of cuda:1 (the legacy stream: not ordered with torch's work, not captured). One launcher now
    (``kernels/cuda_cupy.run``) for the three CuPy kernel modules: the device entered first, then torch's stream
    of that device wrapped."""
    from omni_fast.kernels import cuda_cupy

    fake = FakeCuda(monkeypatch)
    made, launched = [], []

    class _Device:
        active = [None]

        def __init__(self, index):
            self.index = index

        def __enter__(self):
            self.prev, _Device.active[0] = _Device.active[0], self.index

        def __exit__(self, *exc):
            _Device.active[0] = self.prev

    class _ExternalStream:  # CuPy 13's form (no Stream.from_external)
        def __init__(self, ptr, device_id=-1):
            made.append((ptr, device_id if device_id != -1 else _Device.active[0]))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=_Device, ExternalStream=_ExternalStream,
                                                            Stream=type("Stream", (), {})))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(cuda_cupy, "kernel", lambda source, options, name, index:
                        lambda grid, block, args: launched.append((name, index, _Device.active[0])))
    cuda_cupy.run("k.cu", (), "k", torch.device("cuda:1"), (1,), (32,), ())
    assert made == [(fake.streams[1].cuda_stream, 1)] and launched == [("k", 1, 1)]
    import inspect

    from omni_fast.kernels import cuda_moe, cuda_rope, cuda_sampling
    for module in (cuda_moe, cuda_rope, cuda_sampling):  # every CuPy launch goes through it
        source = inspect.getsource(module)
        assert "cuda_cupy.run(" in source and "ExternalStream" not in source, module.__name__


def test_stream_resumes_run_on_the_models_device(monkeypatch):
    """The pipeline's ``stream`` on a model on cuda:1, consumed by a thread whose current device is cuda:0: every
    resume runs with cuda:1 current (its events, streams and captures land there), and the consumer's device is
    its own again at each yield (a with-block around the whole generator would leak while it is suspended)."""
    from omni_fast.pipeline.device import resumed_in_order

    fake = FakeCuda(monkeypatch)

    def events():
        for _ in range(2):
            yield fake.current

    seen = [(item, fake.current) for item in resumed_in_order(events(), torch.device("cuda:1"))]
    assert seen == [(1, 0), (1, 0)]


def test_capture_status_of_the_current_device_enters_no_device_context(monkeypatch):
    """``capturing(device)`` runs on every op call's value check (validation.values_checkable), every ReplayGuard
    hold and every flag watch: asked of the current device (one GPU: always), it is torch's one query, as before the
    multi-GPU change, not a torch.cuda.device enter and exit around it (a Python object and two device exchanges per
    op call). Another device is still asked with that device current."""
    from omni_fast._device import capturing

    fake = FakeCuda(monkeypatch)
    fake.streams[1].capturing = True
    assert not capturing("cuda:0") and not capturing(torch.device("cuda")) and not capturing("cpu")
    assert fake.entered == []
    assert capturing("cuda:1") and fake.entered == [1] and fake.current == 0
    with torch.cuda.device(1):
        assert capturing("cuda:1") and capturing("cuda") and not capturing("cuda:0")
    assert fake.entered == [1, 1, 0] and fake.current == 0
