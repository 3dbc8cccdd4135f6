"""A server that runs for days (docs/reliability.md, "Long-running servers: what is kept"): every cache the library
keeps between calls is bounded where requests pick its keys, and nothing keeps a dropped model (or its graphs and
buffers) alive. "Freed without gc" means by reference counting alone, the moment the last reference goes: objects
in a reference cycle wait for Python's cyclic collector, which runs on Python allocation counts and knows nothing
about GPU memory (a dropped checkpoint's weights and CUDA graphs could stay for hours). On the CPU the graph caches
emulate their replays (the same cache entries, static buffers and bound objects), so they are tested here."""

import gc
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))

import omni_fast  # noqa: E402
from omni_fast.models import CodePredictor, Qwen3Omni, dit_solve  # noqa: E402
from omni_fast.models.persistent import PersistentFrame  # noqa: E402
from omni_fast.ops import sampling  # noqa: E402
from omni_fast.pipeline import device as pipeline_device  # noqa: E402
from omni_fast.pipeline import qwen3 as pipeline_qwen3  # noqa: E402
from omni_fast.pipeline.requests import Request  # noqa: E402

GREEDY = dict(max_new_tokens=4, talker_max_new_tokens=6)


@contextmanager
def no_gc():
    """Only reference counting frees objects inside (a collection left over from earlier tests runs first)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _freed(make):
    """Whether the object ``make()`` returns (after using it) is freed by reference counting alone once dropped.
    ``make`` runs once before, untracked: a module's first (lazy) import inside it can leave the import's frames,
    and through them ``make``'s locals, in a reference cycle (transformers' lazy modules do; once per process)."""
    make()
    with no_gc():
        ref = weakref.ref(make())
        return ref() is None


# --- dropped models: no reference cycles through the graph caches -------------------------------------------------


def test_code_predictor_with_frame_graphs_freed_without_gc():
    """A frame graph's body was a closure over the CodePredictor that caches the graph: a cycle, so a dropped
    predictor (its weight copies, static buffers and, on CUDA, graphs) waited for a full collection."""
    from test_mtp import _hf_predictor

    m, emb = _hf_predictor(1, torch.float32, seed=4)

    def make():
        cp = CodePredictor.from_transformers(m, emb)
        h, c0 = torch.randn(3, 48), torch.randint(0, emb.num_embeddings, (3,))
        for kw in (dict(do_sample=False), dict(seed=5)):
            cp.predict_frame(h, c0, use_graph=True, backend="reference", **kw)
        assert len(cp._graphs) == 2
        return cp

    assert _freed(make)


def test_persistent_frame_does_not_keep_its_model():
    """A persistent frame (cached in its CodePredictor's ``_persistent``) held the predictor strongly: a cycle."""
    from omni_fast.bench.cases.mtp import _build
    from test_persistent import SMALL

    parts = _build("cpu", torch.float32, SMALL)

    def make():
        cp = CodePredictor.from_transformers(*parts, persistent=True)
        frame = PersistentFrame(cp, 2, torch.float32, torch.device("cpu"), (False, 0, 1.0, 1.0), False, False)
        assert frame.model is cp
        cp._persistent["k"] = frame
        return cp

    assert _freed(make)


def _dit_inputs(dit, n=3, B=1):
    from test_dit_solve import _inputs

    return _inputs(dit, B, n)


def test_dit_with_solve_graphs_freed_without_gc():
    """A solve graph's body was a closure over the DiT (and the graph itself) cached on the DiT: a cycle that kept a
    dropped Qwen2.5-Omni's DiT weights, graphs and shared pool until a full collection."""
    from test_dit_solve import _dit

    def make():
        dit = _dit()
        cond, ref, code = _dit_inputs(dit)
        with torch.no_grad():
            dit_solve.sample(dit, cond, ref, code, num_steps=2, buckets=(4,), backend="reference")
        assert len(dit.__dict__[dit_solve._CACHE]) == 2  # the weights key and one graph
        return dit

    assert _freed(make)


def test_patched_model_generate_then_unpatch_freed_without_gc():
    """patch -> generate (fast MTP step, fast Code2Wav, decode takeover) -> unpatch -> del: nothing the library
    keeps (caches on the modules, module-level caches, hooks) holds the model."""
    from test_patch import _generate, _prompt, q3, seeded_weights_, tiny_qwen3_omni_config

    def make():
        torch.manual_seed(0)
        model = seeded_weights_(q3.Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_omni_config()))
        omni_fast.patch(model, backend="reference")
        _generate(model, _prompt())
        omni_fast.unpatch(model)
        return model

    assert _freed(make)


def test_abandoned_stream_releases_its_leases_at_once(monkeypatch):
    """A client gone mid-stream: the generator dropped (or closed) frees its codec stream lease at once, as does a
    stream that raised once its exception is dropped; the pipeline and its model are freed by reference counting
    when dropped."""
    from omni_fast.models.code2wav import Code2WavStream

    def make():
        pipe = Qwen3Omni.random("tiny", patch=True, backend="reference")
        req = Request(text=[5, 6, 7, 8, 9])

        def held():
            return [e[1]() is not None for e in pipe._codec_streams[1][1]]

        for finish in ("drop", "close"):
            gen = pipe.stream(req, **GREEDY, first_chunk=1, chunk=1)
            next(e for e in gen if e.kind == "audio")
            assert held() == [True]
            if finish == "close":
                gen.close()
            del gen
            assert held() == [False]
        pushes, push = [], Code2WavStream.push

        def failing_push(self, *args, **kwargs):  # the second chunk fails mid-stream
            pushes.append(1)
            if len(pushes) == 2:
                raise RuntimeError("device error")
            return push(self, *args, **kwargs)

        monkeypatch.setattr(Code2WavStream, "push", failing_push)
        try:  # (not pytest.raises: its ExceptionInfo is a reference cycle that would keep the pipeline)
            list(pipe.stream(req, **GREEDY, first_chunk=1, chunk=1))
            raise AssertionError("the failing push did not raise")
        except RuntimeError as exc:
            assert str(exc) == "device error"
        assert held() == [False]
        monkeypatch.undo()
        model = pipe.model
        del pipe
        return model

    assert _freed(make)


# --- request-driven keys: bounded ----------------------------------------------------------------------------------


def test_dit_solve_graphs_bounded(monkeypatch):
    """Per-request guidance scales (or sway values, steps, batch sizes) each captured a solve graph, all kept: now
    at most MAX_SOLVE_GRAPHS, the least recently used dropped after a drain of the shared guard."""
    from test_dit_solve import _dit

    dit = _dit(layers=1)
    monkeypatch.setattr(dit_solve, "MAX_SOLVE_GRAPHS", 2, raising=False)
    drained = []
    shared = dit.__dict__.setdefault(dit_solve._POOL, dit_solve._SharedPool())
    monkeypatch.setattr(shared, "drain", lambda device: drained.append(1), raising=False)
    cond, ref, code = _dit_inputs(dit)

    def solve(guidance):
        with torch.no_grad():
            dit_solve.sample(dit, cond, ref, code, num_steps=2, guidance_scale=guidance, buckets=(4,),
                             backend="reference")
        return [k[2][1] for k in dit.__dict__[dit_solve._CACHE] if k != "weights"]

    assert solve(0.5) == [0.5] and solve(0.6) == [0.5, 0.6]
    assert solve(0.5) == [0.6, 0.5]  # a hit: now the most recently used
    drained.clear()  # (the first solve drained too: the cache took the weights key)
    assert solve(0.7) == [0.5, 0.7] and drained == [1]  # 0.6 (least recently used) dropped, after a drain
    for g in (0.8, 0.9, 1.0, 1.1):
        assert len(solve(g)) == 2


def test_suppress_range_cache_bounded(monkeypatch):
    """``sample(suppress_ranges=...)`` with a new list per request cached one device tensor per list, forever."""
    monkeypatch.setattr(sampling, "MAX_RANGE_SETS", 4, raising=False)
    monkeypatch.setattr(sampling, "_RANGE_CACHE", {})
    logits = torch.randn(2, 64)
    for i in range(10):
        ids = omni_fast.ops.sample(logits, greedy=True, suppress_ranges=[(i, i + 1)], backend="reference")
        assert ((ids < i) | (ids > i)).all()
        assert len(sampling._RANGE_CACHE) <= 4
    again = sampling._suppress_tensor([(9, 10)], torch.device("cpu"), 64)
    assert again is sampling._suppress_tensor([(9, 10)], torch.device("cpu"), 64)  # still cached between calls


def test_entries_for_keeps_the_recent_keys_and_the_busy_ones():
    """The pipeline's per-batch-size codec streams: at most ``keep`` keys, least recently used idle keys dropped,
    a key a live stream holds kept until its stream ends."""
    table = {}
    cpu = torch.device("cpu")
    busy = pipeline_device.Lease()
    pipeline_device.lease_from(pipeline_device.entries_for(table, 1, 2, cpu), busy, lambda: "stream of 1")
    for key in (2, 3, 4):
        pipeline_device.lease_from(pipeline_device.entries_for(table, key, 2, cpu), pipeline_device.Lease(),
                                   lambda: f"stream of {key}")  # (that lease ends at once)
    assert list(table) == [1, 4]  # 1 is busy, 2 and 3 idle and older than 4
    del busy
    pipeline_device.entries_for(table, 5, 2, cpu)
    assert list(table) == [4, 5]
    assert [e[0] for e in pipeline_device.entries_for(table, 4, 2, cpu)] == ["stream of 4"]  # reused, not rebuilt


def test_pipeline_codec_streams_bounded_by_batch_sizes(monkeypatch):
    """Each new batch size kept its Code2Wav streams (states, CUDA graphs and pool) for the rest of the process."""
    monkeypatch.setattr(pipeline_qwen3, "MAX_CODEC_BATCH_SIZES", 1, raising=False)
    pipe = Qwen3Omni.random("tiny", patch=True, backend="reference")
    try:
        for n in (1, 2):
            pipe.generate([Request(text=[5, 6, 7])] * n, **GREEDY)
            assert list(pipe._codec_streams[1]) == [n]
    finally:
        omni_fast.unpatch(pipe.model)


def test_persistent_frames_of_old_weights_dropped(monkeypatch):
    """New weights (a hot swap into the same tensors, ``load_state_dict``) built new persistent frames and kept the
    old ones (each a workspace) until 33 had piled up; now the stale ones go with the first new frame (as the frame
    graphs do), and at most 32 stay. (A stand-in frame: what is cached is the point, not the kernel.)"""
    from omni_fast.bench.cases.mtp import _build
    from omni_fast.models import persistent
    from test_persistent import SMALL

    monkeypatch.setattr(persistent, "PersistentFrame", lambda *args: lambda *inputs: None)
    cp = CodePredictor.from_transformers(*_build("cpu", torch.float32, SMALL), persistent=True)
    h, c0, seed = torch.randn(2, 64), torch.randint(0, 32, (2,)), torch.zeros(1, dtype=torch.long)
    for top_k in range(40):  # per-request sampling settings
        cp._persistent_frame(h, c0, None, seed, (True, top_k, 1.0, 1.0))
        assert len(cp._persistent) <= 32
    with torch.no_grad():
        cp.norm.mul_(1.0)  # in place: the weights key changes
    cp._persistent_frame(h, c0, None, seed, (False, 0, 1.0, 1.0))
    assert len(cp._persistent) == 1


# --- the drops' device syncs: never while another thread captures --------------------------------------------------


def _sync_seen_during_a_capture(monkeypatch, call) -> list:
    """Run ``call`` on a worker thread while another thread is inside the process's one capture (it holds
    ``_device.CAPTURE_LOCK``, as :func:`~omni_fast.models.cuda_graphs.capture` does): for each device-wide sync
    (a faked ``torch.cuda.synchronize``) whether that capture was still under way."""
    import threading

    from omni_fast import _device

    capturing, entered, release = threading.Event(), threading.Event(), threading.Event()
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append(capturing.is_set()))

    def capture_thread():
        with _device.CAPTURE_LOCK:
            capturing.set()
            entered.set()
            release.wait(10)
            capturing.clear()

    capturer = threading.Thread(target=capture_thread)
    capturer.start()
    assert entered.wait(10)
    worker = threading.Thread(target=call)
    worker.start()
    worker.join(0.5)  # (an unguarded sync has happened by now)
    release.set()
    worker.join(10)
    capturer.join(10)
    return seen


def test_codec_stream_drop_sync_waits_for_a_capture(monkeypatch):
    """entries_for's drop synchronised the whole device while another thread could be capturing a graph (its first
    decode step or MTP frame): a device-wide sync while any stream of the device captures is an error that also
    invalidates that capture (thread_local mode does not allow it either). The sync now takes the capture lock."""
    table = {1: [], 2: []}
    seen = _sync_seen_during_a_capture(
        monkeypatch, lambda: pipeline_device.entries_for(table, 3, 1, torch.device("cuda")))
    assert list(table) == [3] and seen == [False]


def test_suppress_range_cache_drop_sync_waits_for_a_capture(monkeypatch):
    """The same for the suppress-range cache's drop when full (a stand-in for its CUDA tensors)."""

    class _OnCuda:
        is_cuda, device = True, torch.device("cuda", 0)

    monkeypatch.setattr(sampling, "MAX_RANGE_SETS", 2, raising=False)
    monkeypatch.setattr(sampling, "_RANGE_CACHE", {"a": _OnCuda(), "b": _OnCuda()})
    seen = _sync_seen_during_a_capture(
        monkeypatch, lambda: sampling._cached_pairs_tensor(((0, 1),), torch.device("cpu")))
    assert list(sampling._RANGE_CACHE) == [(((0, 1),), "cpu")] and seen == [False]



def test_rvq_table_offsets_drop_waits_for_the_devices(monkeypatch):
    """``rvq_embed``'s table-offset cache, when full, was cleared with no sync at all: a kernel another thread had
    queued could still read an offset tensor whose block the allocator handed out again. One helper for both
    caches now (``_cache_memory.clear_when_full``): the devices first (under the capture lock), then the drop."""
    from omni_fast.ops import rvq

    class _OnCuda:
        is_cuda, device = True, torch.device("cuda", 0)

    monkeypatch.setattr(rvq, "MAX_TABLE_SETS", 2, raising=False)
    monkeypatch.setattr(rvq, "_LIST_BASES", {"a": (_OnCuda(),) * 3, "b": (_OnCuda(),) * 3})
    tables = [torch.zeros(4, 2), torch.zeros(4, 2)]
    seen = _sync_seen_during_a_capture(monkeypatch, lambda: rvq._list_bases(tables))
    assert len(rvq._LIST_BASES) == 1 and seen == [False]

# --- the weak references to the model: pickling, and a graph kept after its model ----------------------------------


def test_code_predictor_with_persistent_frames_pickles():
    """``torch.save`` of a CodePredictor (or a patched model holding one) that ran persistent frames worked while a
    frame held its model strongly; the weak reference made it "cannot pickle 'weakref.ReferenceType' object". It
    pickles and deep-copies as the model again (the copy's frames refer to the copy)."""
    import copy
    import io

    from omni_fast.bench.cases.mtp import _build
    from test_persistent import SMALL

    cp = CodePredictor.from_transformers(*_build("cpu", torch.float32, SMALL), persistent=True)
    cp._persistent["k"] = PersistentFrame(cp, 2, torch.float32, torch.device("cpu"), (False, 0, 1.0, 1.0), False,
                                          False)
    buf = io.BytesIO()
    torch.save(cp, buf)
    buf.seek(0)
    twin = torch.load(buf, weights_only=False)
    assert twin._persistent["k"].model is twin
    twin = copy.deepcopy(cp)
    assert twin._persistent["k"].model is twin


def test_frame_graph_kept_after_its_model_raises_instead_of_replaying():
    """A frame graph replays kernels that read its CodePredictor's weights by address: kept by a caller after the
    predictor was dropped (its weights freed), a replay read freed memory without a word on CUDA (and failed with
    "'NoneType' object has no attribute 'frame'" on the CPU). Now a ReferenceError, before any replay."""
    from test_mtp import _hf_predictor

    m, emb = _hf_predictor(1, torch.float32, seed=4)
    cp = CodePredictor.from_transformers(m, emb)
    h, c0 = torch.randn(3, 48), torch.randint(0, emb.num_embeddings, (3,))
    cp.predict_frame(h, c0, use_graph=True, backend="reference", do_sample=False)
    (graph,) = cp._graphs.values()
    replays = []
    graph.graph = type("FakeGraph", (), {"replay": lambda self: replays.append(1)})()  # (as on CUDA)
    graph.watched = None
    graph.run(h, c0, None, 0)
    assert replays == [1]
    del cp
    with pytest.raises(ReferenceError, match="CodePredictor"):
        graph.run(h, c0, None, 0)
    assert replays == [1]


def test_solve_graph_kept_after_its_dit_raises_instead_of_replaying():
    """The same for a DiT solve graph (its replay reads the DiT's weights)."""
    from test_dit_solve import _dit

    dit = _dit()
    cond, ref, code = _dit_inputs(dit)
    with torch.no_grad():
        dit_solve.sample(dit, cond, ref, code, num_steps=2, buckets=(4,), backend="reference")
    (graph,) = [g for k, g in dit.__dict__[dit_solve._CACHE].items() if k != "weights"]
    del dit
    with pytest.raises(ReferenceError, match="DiT"):
        graph.run(graph.noise, graph.code, graph.cond, graph.spk, graph.noise.shape[1])


def test_suppress_ranges_a_capture_read_survive_the_cache_drop(monkeypatch):
    """The range tensor a CUDA graph captured is read by address on every replay: the full cache's drop must not
    free it (``_CAPTURED_RANGES``; untested before). (A CPU tensor stands in for the device one; the capture status
    is faked.)"""
    monkeypatch.setattr(sampling, "MAX_RANGE_SETS", 2, raising=False)
    monkeypatch.setattr(sampling, "_RANGE_CACHE", {})
    monkeypatch.setattr(sampling, "_CAPTURED_RANGES", {})
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    pairs = ((3, 5),)
    warmed = sampling._RANGE_CACHE[(pairs, str(cuda))] = torch.tensor(pairs)  # the warm-up's copy
    capturing = [True]
    monkeypatch.setattr(sampling, "capturing", lambda device: torch.device(device).type == "cuda" and capturing[0])
    assert sampling._cached_pairs_tensor(pairs, cuda) is warmed  # the capture's lookup
    capturing[0] = False
    for i in range(4):  # later requests' new ranges: the cache fills and is dropped
        sampling._cached_pairs_tensor(((i, i + 2),), cpu)
    assert (pairs, str(cuda)) not in sampling._RANGE_CACHE
    assert sampling._cached_pairs_tensor(pairs, cuda) is warmed  # what the graph reads: kept



# --- a cache drop between another thread's lookup and its launch -------------------------------------------------


class _CachedOnCuda:
    """A small CUDA tensor of a cache, to the caching allocator: made on ``stream``; ``record_stream`` adds a stream
    whose work queued by the free must end before its block is handed out again."""

    is_cuda = True

    def __init__(self, stream):
        self.device, self.made_on, self.uses = stream.device, stream, set()

    def record_stream(self, stream):
        self.uses.add(stream)


def _reused_under_a_pending_launch(monkeypatch, cache: dict, key, lookup, fill, parts: int = 1) -> bool:
    """An earlier request made ``cache[key]`` (``parts`` tensors) on the device's stream S0. Thread A, on its own
    stream S1, looks it up (``lookup``); thread B then fills the cache with new keys (``fill``) until it is dropped,
    after its device sync; A launches its kernel on S1 and drops its last reference (the interleaving, step by step
    on one thread). Returns whether the caching allocator could hand the block out to the next allocation on S0
    while A's launch on S1 may still read it: freed with S1 neither its stream nor recorded on it."""
    import weakref

    from _fake_cuda import FakeCuda

    fake = FakeCuda(monkeypatch, devices=1)
    made = [_CachedOnCuda(fake.current_stream(0)) for _ in range(parts)]
    cache[key] = made[0] if parts == 1 else tuple(made)
    unsafe, launched = [], []

    def freed(made_on, uses):
        unsafe.append(any(s is not made_on and s not in uses for s in launched))

    for entry in made:
        weakref.finalize(entry, freed, entry.made_on, entry.uses)
    del made, entry
    with torch.cuda.stream(fake.Stream(0)):
        got = lookup()  # thread A: a hit
        fill()  # thread B: the cache fills up and is dropped (its sync comes before A's launch)
        assert key not in cache
        launched.append(fake.kernel(torch.device("cuda", 0))[0])  # thread A's launch reads ``got`` on S1
        del got  # ... and A drops the last reference
    assert len(unsafe) == parts, "the cached tensors were not freed"
    return any(unsafe)


def test_suppress_ranges_dropped_under_another_threads_launch_outlive_it(monkeypatch):
    """A suppress-range tensor another thread looked up just before a full-cache drop was freed when that thread's
    launch (on its own stream) dropped it: the drop's device sync came before the launch, so the caching allocator
    could hand its block to the next allocation on the stream that made it while the kernel still read it. The
    lookup now records its stream on the tensor (``_cache_memory.record_use``)."""
    monkeypatch.setattr(sampling, "MAX_RANGE_SETS", 3, raising=False)
    monkeypatch.setattr(sampling, "_RANGE_CACHE", {})
    monkeypatch.setattr(sampling, "_CAPTURED_RANGES", {})
    monkeypatch.setattr(sampling, "capturing", lambda device: False)
    cuda, pairs = torch.device("cuda", 0), ((3, 5),)

    def fill():
        for i in range(3):
            sampling._cached_pairs_tensor(((i, i + 2),), torch.device("cpu"))

    assert not _reused_under_a_pending_launch(monkeypatch, sampling._RANGE_CACHE, (pairs, str(cuda)),
                                              lambda: sampling._cached_pairs_tensor(pairs, cuda), fill)


def test_rvq_table_offsets_dropped_under_another_threads_launch_outlive_it(monkeypatch):
    """The same for ``rvq_embed``'s table offsets (three tensors per table set)."""
    from omni_fast.ops import rvq

    monkeypatch.setattr(rvq, "MAX_TABLE_SETS", 2, raising=False)
    monkeypatch.setattr(rvq, "_LIST_BASES", {})
    monkeypatch.setattr(rvq, "_CAPTURED_BASES", {})
    monkeypatch.setattr(rvq, "capturing", lambda device: False)
    tables = [torch.zeros(4, 2), torch.zeros(5, 2)]
    key = (tables[0].device, tables[0].dtype) + tuple((t.data_ptr(), t.stride(0), t.shape[0]) for t in tables)

    def fill():
        for n in (6, 7):
            rvq._list_bases([torch.zeros(n, 2), torch.zeros(n, 2)])

    assert not _reused_under_a_pending_launch(monkeypatch, rvq._LIST_BASES, key, lambda: rvq._list_bases(tables),
                                              fill, parts=3)
