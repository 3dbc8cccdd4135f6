"""The one capture routine and the replay guard of :mod:`omni_fast.models.cuda_graphs`, on a CPU with torch.cuda's
graph, stream and event objects faked (what is checked is what we ask CUDA for, not CUDA itself); ~0.01 s."""

import torch

from omni_fast.models import cuda_graphs


class _Stream:
    def __init__(self, *a, **k):
        self.waited = []

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        self.waited.append(event)


class _Event:
    def record(self, stream=None):
        self.stream = stream


class _Graph:
    pass


def _fake_cuda(monkeypatch):
    """torch.cuda's stream / graph / event objects replaced; returns (current stream, the kwargs of each capture)."""
    current, captures = _Stream(), []

    class _GraphContext:
        def __init__(self, graph, **kwargs):
            captures.append(kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class _StreamContext(_GraphContext):
        def __init__(self, stream):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", _StreamContext)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", _GraphContext)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return current, captures


def test_capture_is_thread_local(monkeypatch):
    """The capture asks for cudaStreamCaptureModeThreadLocal: under torch's default ("global") another thread of a
    server that allocates or synchronises while a request captures its first graph failed, and so did the
    capture. The warm-up runs first, the capture once, the pool is passed on."""
    _, captures = _fake_cuda(monkeypatch)
    calls = []
    graph, out = cuda_graphs.capture(lambda: calls.append(1) or len(calls), "cuda", warmup=2, pool="pool")
    assert isinstance(graph, _Graph) and out == 3 and len(calls) == 3
    assert captures == [dict(pool="pool", capture_error_mode="thread_local")]


def test_replay_guard_orders_holders_on_the_device(monkeypatch):
    """A holder's stream waits for the previous holder's recorded end (threads may run on different streams), also
    when the previous holder raised; on a CPU there is no event. Pickles as a fresh guard."""
    import pickle

    current, _ = _fake_cuda(monkeypatch)
    guard = cuda_graphs.ReplayGuard()
    with guard.hold("cpu"):
        pass
    assert guard.done is None
    try:
        with guard.hold("cuda"):
            raise RuntimeError("a failed replay")
    except RuntimeError:
        pass
    first = guard.done
    assert isinstance(first, _Event) and current.waited == []
    with guard.hold("cuda"):
        assert current.waited == [first] and guard.lock._is_owned()
    assert guard.done is not first
    fresh = pickle.loads(pickle.dumps(guard))
    assert isinstance(fresh, cuda_graphs.ReplayGuard) and fresh.done is None


def test_replay_guard_nested_or_capturing_holds_neither_wait_nor_record(monkeypatch):
    """A hold inside a hold (a persistent frame launched by the body of a frame graph being captured) and a hold
    while the current stream captures (a caller's graph around ours) neither wait on nor record an event: waiting
    inside a capture on an event recorded outside it is not allowed; the outermost hold orders the work."""
    current, _ = _fake_cuda(monkeypatch)
    guard = cuda_graphs.ReplayGuard()
    with guard.hold("cuda"):
        pass
    first = guard.done
    with guard.hold("cuda"):
        assert current.waited == [first]
        with guard.hold("cuda"):  # nested: no second wait, no record
            assert current.waited == [first] and guard.done is first
        assert guard.done is first
    second = guard.done
    assert second is not first and guard.depth == 0
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with guard.hold("cuda"):
        pass
    assert current.waited == [first] and guard.done is second
