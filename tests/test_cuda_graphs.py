"""The one capture routine and the replay guard of :mod:`omni_fast.models.cuda_graphs`, on a CPU with torch.cuda's
graph, stream and event objects faked (what is checked is what we ask CUDA for, not CUDA itself); ~0.01 s."""

import torch
from _fake_cuda import FakeCuda, FakeStream

from omni_fast.models import cuda_graphs


def _fake_cuda(monkeypatch):
    """torch.cuda faked (tests/_fake_cuda.py: two devices, cuda:0 current); returns (the fake, cuda:0's current
    stream, the captures). A test switches ``fake.streams[0]`` to play another thread's stream."""
    fake = FakeCuda(monkeypatch)
    return fake, fake.streams[0], fake.captures


def test_capture_is_thread_local(monkeypatch):
    """The capture asks for cudaStreamCaptureModeThreadLocal: under torch's default ("global") another thread of a
    server that allocates or synchronises while a request captures its first graph failed, and so did the
    capture. The warm-up runs first, the capture once, the pool is passed on."""
    fake, _, captures = _fake_cuda(monkeypatch)
    calls = []
    graph, out = cuda_graphs.capture(lambda: calls.append(1) or len(calls), "cuda", warmup=2, pool="pool")
    assert out == 3 and len(calls) == 3
    assert [{k: v for k, v in c.items() if k != "on"} for c in captures] == [
        dict(pool="pool", capture_error_mode="thread_local")]


def test_replay_guard_orders_holders_on_the_device(monkeypatch):
    """A holder's stream waits for the previous holder's recorded end (threads may run on different streams), also
    when the previous holder raised; on a CPU there is no event. Pickles as a fresh guard."""
    import pickle

    fake, current, _ = _fake_cuda(monkeypatch)
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
    assert isinstance(first, fake.Event) and current.waited == [] and first.stream is current
    other = fake.streams[0] = FakeStream(0)  # another thread's stream
    with guard.hold("cuda"):
        assert other.waited == [first] and guard.lock._is_owned()
    assert guard.done.stream is other
    fresh = pickle.loads(pickle.dumps(guard))
    assert isinstance(fresh, cuda_graphs.ReplayGuard) and fresh.done is None


def test_replay_guard_nested_or_capturing_holds_neither_wait_nor_record(monkeypatch):
    """A hold inside a hold (a persistent frame launched by the body of a frame graph being captured) and a hold
    while the current stream captures (a caller's graph around ours) neither wait on nor record an event: waiting
    inside a capture on an event recorded outside it is not allowed; the outermost hold orders the work."""
    fake, current, _ = _fake_cuda(monkeypatch)
    guard = cuda_graphs.ReplayGuard()
    with guard.hold("cuda"):
        pass
    first = guard.done
    other = fake.streams[0] = FakeStream(0)  # another thread's stream
    with guard.hold("cuda"):
        assert other.waited == [first]
        with guard.hold("cuda"):  # nested: no second wait, no record
            assert other.waited == [first] and guard.done.stream is current
        assert guard.done.stream is current
    assert guard.done.stream is other and guard.depth == 0
    fake.streams[0] = current
    current.capturing = True
    with guard.hold("cuda"):
        pass
    assert current.waited == [] and guard.done.stream is other


def test_replay_guard_host_work_per_hold(monkeypatch):
    """Every MTP frame takes the guard: one event is re-recorded (a wait binds to the record before it), not one
    made (and destroyed) per hold, and a holder on the stream that recorded last does not wait (stream order
    already puts the previous holder's work first); a holder on another stream waits (~0 s)."""
    fake, current, _ = _fake_cuda(monkeypatch)
    guard = cuda_graphs.ReplayGuard()
    for _ in range(3):
        with guard.hold("cuda"):
            pass
    assert fake.events == 1 and current.waited == []
    other = fake.streams[0] = FakeStream(0)
    with guard.hold("cuda"):
        pass
    assert other.waited == [guard.done] and fake.events == 1 and guard.done.stream is other
    cuda1 = fake.streams[1]  # an event records on its own device's streams: a new one there
    with guard.hold("cuda:1"):
        pass
    assert fake.events == 2 and guard.done.stream is cuda1


def test_replay_guard_drains_before_what_holders_shared_is_dropped(monkeypatch):
    """Dropping graphs (new weights) or persistent frames (a full cache) frees their static inputs / workspaces to
    the stream that allocated them, whose next allocation reuses them at once, while a holder on another thread's
    stream may still replay with them: inside the hold (ordered after every earlier holder) the host first waits
    for the current stream. Nothing to wait for without an earlier CUDA holder, outside a hold, or on the CPU."""
    _, current, _ = _fake_cuda(monkeypatch)
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


# --- several GPUs (docs/reliability.md, "Several GPUs") -------------------------------------------------------------


def test_capture_lands_on_the_tensors_device_not_the_current_one(monkeypatch):
    """A model on cuda:1 captured from a thread whose current device is cuda:0 (a serving worker, or transformers'
    device_map="auto" with the talker on cuda:1): the warm-up, the synchronisation on entry and the capture run on
    cuda:1, and the body's kernels (launched on their tensors' device) land on the capturing stream. Before, the
    capture ran on a stream of cuda:0 (torch.cuda.graph's default stream, made on the current device) while the
    kernels ran eagerly on cuda:1: an empty graph whose replays never refreshed the outputs."""
    fake, _, captures = _fake_cuda(monkeypatch)
    seen = []
    cuda_graphs.capture(lambda: seen.append(fake.kernel("cuda:1")), "cuda:1", warmup=1)
    (warm_stream, warm_capturing), (stream, was_capturing) = seen
    assert captures[0]["on"].device == torch.device("cuda:1") and stream is captures[0]["on"] and was_capturing
    assert warm_stream.device == torch.device("cuda:1") and not warm_capturing
    assert warm_stream is not fake.streams[1]  # (the warm-up ran on a side stream)
    assert fake.synced == [1] and fake.current == 0  # torch.cuda.graph's entry sync: cuda:1; the current device back


def test_captures_for_two_devices_each_capture_on_their_own(monkeypatch):
    """torch.cuda.graph's default capture stream is ONE per process, made on the device current at the first
    capture: a thinker decoder captured on cuda:0, then a talker's graph on cuda:1 (its current device set right)
    captured on the cuda:0 stream. Each capture now brings a stream of its own device."""
    fake, _, captures = _fake_cuda(monkeypatch)
    seen = []
    cuda_graphs.capture(lambda: seen.append(fake.kernel("cuda:0")), "cuda:0", warmup=0)
    with torch.cuda.device(1):
        cuda_graphs.capture(lambda: seen.append(fake.kernel("cuda:1")), "cuda:1", warmup=0)
    assert [s.device.index for s, _ in seen] == [0, 1] and all(c for _, c in seen)
    assert [c["on"].device.index for c in captures] == [0, 1]


def test_replay_guard_asks_its_own_device_whether_it_captures(monkeypatch):
    """The guard's capture-status query was asked of the current device: holds on cuda:1 from a thread whose current
    device (cuda:0) was capturing (a caller's graph there) skipped the event wait and record on cuda:1, so two
    holders on two cuda:1 streams were not ordered; and holds on cuda:1 while cuda:1's stream captured (current
    device cuda:0) waited on an event inside that capture, which CUDA refuses. Now: cuda:1 is asked."""
    fake, _, _ = _fake_cuda(monkeypatch)
    fake.streams[0].capturing = True  # cuda:0 captures; the guard's device does not
    guard = cuda_graphs.ReplayGuard()
    first = fake.streams[1]
    with guard.hold("cuda:1"):
        pass
    assert guard.done is not None and guard.done.stream is first
    event = guard.done
    other = fake.streams[1] = FakeStream(1)  # another thread's stream on cuda:1
    with guard.hold("cuda:1"):
        pass
    assert other.waited == [event]  # ordered after the first holder
    assert guard.done.stream is other
    fake.streams[0].capturing, other.capturing = False, True  # now cuda:1's current stream captures
    with guard.hold("cuda:1"):
        guard.drain("cuda:1")
    assert len(other.waited) == 1 and other.synced == 0 and guard.done.stream is other


def test_captures_of_one_device_share_one_capture_stream(monkeypatch):
    """Graphs that share a memory pool (a DiT's ~23 solve buckets, a Code2Wav stream's chunk sizes) reuse each
    other's freed scratch only when captured on the SAME stream: the caching allocator hands a freed block back to
    its own stream only (torch.cuda.graph's docs: "if the previous capture used an explicit stream argument, you
    should pass the same stream argument to this capture"). A fresh side stream per capture (torch's pool of 32,
    round robin) made the shared pool the sum of the graphs' activations again. One capture stream per device now,
    and never a warm-up's stream (warm-ups run outside the capture lock: another thread's would land in a capture)."""
    fake, _, captures = _fake_cuda(monkeypatch)
    warm = []
    for dev in ("cuda:1", "cuda:1", "cuda:0", "cuda:1"):
        cuda_graphs.capture(lambda: warm.append(fake.kernel(dev)[0]), dev, warmup=1, pool="pool")
    ons = [c["on"] for c in captures]
    assert ons[0] is ons[1] is ons[3] and ons[2] is not ons[0]
    assert [s.device.index for s in ons] == [1, 1, 0, 1]
    assert not any(w is on for w in warm[0::2] for on in ons)  # (warm[1::2]: the capture calls)
    assert all(w is on for w, on in zip(warm[1::2], ons))


def test_warm_ups_never_run_on_the_capture_stream(monkeypatch):
    """torch.cuda.Stream() draws from a pool (32 per device, round robin): a warm-up's side stream can be the very
    CUDA stream the per-device capture stream is. Warm-ups run outside the capture lock, so another thread's
    warm-up on it while a capture runs would be captured into that graph: a warm-up stream equal to the capture
    stream is drawn again (here a pool of 2, so every second draw collided)."""
    fake = FakeCuda(monkeypatch, pool=2)
    warm = []
    for _ in range(4):
        cuda_graphs.capture(lambda: warm.append(fake.kernel("cuda:1")[0]), "cuda:1", warmup=1)
    ons = [c["on"] for c in fake.captures]
    assert all(on is ons[0] for on in ons) and not any(w is ons[0] for w in warm[0::2])
