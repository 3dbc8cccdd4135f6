"""The one capture routine and the replay guard of :mod:`omni_fast.models.cuda_graphs`, on a CPU with torch.cuda's
graph, stream and event objects faked (what is checked is what we ask CUDA for, not CUDA itself); ~0.01 s."""

import torch

from omni_fast.models import cuda_graphs


class _Stream:
    device = "cuda:0"

    def __init__(self, *a, **k):
        self.waited, self.synced = [], 0

    def synchronize(self):
        self.synced += 1

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        self.waited.append(event)


class _Event:
    made = 0  # events created (the guard re-records one)

    def __init__(self):
        _Event.made += 1

    def record(self, stream=None):
        self.stream = stream


class _Graph:
    pass


def _fake_cuda(monkeypatch):
    """torch.cuda's stream / graph / event objects replaced; returns (current stream, the kwargs of each capture).
    ``current_stream()`` answers ``torch.cuda._fake_current[0]`` (a test switches it: another thread's stream)."""
    current, captures = _Stream(), []
    monkeypatch.setattr(torch.cuda, "_fake_current", [current], raising=False)

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
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: torch.cuda._fake_current[0])
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
    assert isinstance(first, _Event) and current.waited == [] and first.stream is current
    other = torch.cuda._fake_current[0] = _Stream()  # another thread's stream
    with guard.hold("cuda"):
        assert other.waited == [first] and guard.lock._is_owned()
    assert guard.done.stream is other
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
    other = torch.cuda._fake_current[0] = _Stream()  # another thread's stream
    with guard.hold("cuda"):
        assert other.waited == [first]
        with guard.hold("cuda"):  # nested: no second wait, no record
            assert other.waited == [first] and guard.done.stream is current
        assert guard.done.stream is current
    assert guard.done.stream is other and guard.depth == 0
    torch.cuda._fake_current[0] = current
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with guard.hold("cuda"):
        pass
    assert current.waited == [] and guard.done.stream is other


def test_replay_guard_host_work_per_hold(monkeypatch):
    """Every MTP frame takes the guard: one event is re-recorded (a wait binds to the record before it), not one
    made (and destroyed) per hold, and a holder on the stream that recorded last does not wait (stream order
    already puts the previous holder's work first); a holder on another stream waits (~0 s)."""
    current, _ = _fake_cuda(monkeypatch)
    guard, made = cuda_graphs.ReplayGuard(), _Event.made
    for _ in range(3):
        with guard.hold("cuda"):
            pass
    assert _Event.made - made == 1 and current.waited == []
    other = torch.cuda._fake_current[0] = _Stream()
    with guard.hold("cuda"):
        pass
    assert other.waited == [guard.done] and _Event.made - made == 1 and guard.done.stream is other
    cuda1 = torch.cuda._fake_current[0] = _Stream()
    cuda1.device = "cuda:1"  # an event records on its own device's streams: a new one there
    with guard.hold("cuda:1"):
        pass
    assert _Event.made - made == 2 and guard.done.stream is cuda1


def test_replay_guard_drains_before_what_holders_shared_is_dropped(monkeypatch):
    """Dropping graphs (new weights) or persistent frames (a full cache) frees their static inputs / workspaces to
    the stream that allocated them, whose next allocation reuses them at once, while a holder on another thread's
    stream may still replay with them: inside the hold (ordered after every earlier holder) the host first waits
    for the current stream. Nothing to wait for without an earlier CUDA holder, outside a hold, or on the CPU."""
    current, _ = _fake_cuda(monkeypatch)
    guard = cuda_graphs.ReplayGuard()
    with guard.hold("cuda"):
        guard.drain("cuda")  # no earlier holder
    assert current.synced == 0
    guard.drain("cuda")  # outside a hold: the stream is not ordered after the holders
    with guard.hold("cpu"):
        guard.drain("cpu")
    assert current.synced == 0
    with guard.hold("cuda"):
        guard.drain("cuda")
    assert current.synced == 1


def test_code_predictor_drains_before_dropping_graphs(monkeypatch):
    """CodePredictor's graph path drains its guard before it drops the frame graphs of stale weights (CPU
    emulation of the graph path with drain recorded; ~0.1 s)."""
    from omni_fast.models import CodePredictor

    cfg = dict(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_code_groups=3)
    cp = CodePredictor(cfg, codec_vocab_size=32)  # (zero weights: what is checked is when graphs are dropped)
    drained = []
    monkeypatch.setattr(cp._shared, "drain", lambda device: drained.append(len(cp._graphs)))
    x = torch.randn(1, cp.config.hidden_size)
    c0 = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        cp.predict_frame(x, c0, use_graph=True, backend="reference", do_sample=False)
        assert drained == [0] and len(cp._graphs) == 1  # (the first frame: no graph yet)
        cp.predict_frame(x, c0, use_graph=True, backend="reference", do_sample=False)
        assert drained == [0]
        cp.table.add_(0)  # an in-place update: the graphs are stale
        cp.predict_frame(x, c0, use_graph=True, backend="reference", do_sample=False)
    assert drained == [0, 1] and len(cp._graphs) == 1


def test_code_predictor_graph_cache_is_bounded(monkeypatch):
    """Sampling settings are baked into the frame graphs: a server whose requests each bring their own temperature
    captured one more graph per setting without bound; past 32 the cache is drained and dropped (~0.3 s)."""
    from omni_fast.models import CodePredictor

    cfg = dict(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_code_groups=3)
    cp = CodePredictor(cfg, codec_vocab_size=32)
    drained = []
    monkeypatch.setattr(cp._shared, "drain", lambda device: drained.append(len(cp._graphs)))
    x, c0 = torch.randn(1, cp.config.hidden_size), torch.zeros(1, dtype=torch.long)
    sizes = []
    with torch.no_grad():
        for i in range(40):
            cp.predict_frame(x, c0, use_graph=True, backend="reference", do_sample=True, temperature=0.5 + i / 64,
                             seed=1)
            sizes.append(len(cp._graphs))
        cp.predict_frame(x, c0, use_graph=True, backend="reference", do_sample=True, temperature=0.5 + 39 / 64, seed=1)
    assert max(sizes) == 32 and sizes[32] == 1 and drained == [0, 32]  # (the first frame's drain: no graph yet)
    assert len(cp._graphs) == 8  # a setting still cached replays without a drop


def test_captures_of_two_threads_never_overlap(monkeypatch):
    """PyTorch supports one capture at a time (torch.cuda.graph synchronises the device and empties the caching
    allocator on entry): two server threads capturing their first graphs at once take turns (~0.1 s)."""
    import threading
    import time

    _fake_cuda(monkeypatch)
    inside, most = [0], [0]

    class _Counting:
        def __init__(self, graph, **kwargs):
            pass

        def __enter__(self):
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            time.sleep(0.02)  # (a capture that takes a while: the other thread arrives meanwhile)

        def __exit__(self, *exc):
            inside[0] -= 1
            return False

    monkeypatch.setattr(torch.cuda, "graph", _Counting)
    threads = [threading.Thread(target=cuda_graphs.capture, args=(lambda: None, "cuda"), kwargs=dict(warmup=0))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and inside[0] == 0
