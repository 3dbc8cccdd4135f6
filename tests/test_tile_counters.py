"""Whose split-K tile counters a launch takes (kernels/tile_counters.py), on torch.cuda faked with two streams and a
capture (tests/_fake_cuda.py). Before, one set per device was shared by every stream and every graph: two server
threads on their own streams running split-K at once (or a graph replayed beside another stream's launch) took
each other's tickets: silently wrong sums."""

import pytest
import torch
from _fake_cuda import FakeCuda

from omni_fast import _device
from omni_fast._cache_memory import made_to_keep
from omni_fast.kernels import tile_counters as tc
from omni_fast.models import cuda_graphs

CUDA0 = torch.device("cuda", 0)


class _Counters:
    """Stands in for an int32 CUDA tensor: its device, its length, and whether a capture was under way when it was
    made (a memset node of that graph)."""

    is_cuda = True

    def __init__(self, device, n, fake):
        self.device, self.n = torch.device(device), n
        self.made_on = fake.current_stream(device)
        self.in_capture = self.made_on.capturing

    def numel(self):
        return self.n


@pytest.fixture
def fake(monkeypatch):
    fake = FakeCuda(monkeypatch, devices=2)
    monkeypatch.setattr(tc, "_EAGER", {})
    monkeypatch.setattr(tc, "_KEPT_FOR_FOREIGN_GRAPHS", [])
    monkeypatch.setattr(tc, "_zeroed", lambda device, n: _Counters(device, n, fake))
    return fake


def test_each_stream_counts_on_its_own_counters(fake):
    a = tc.tile_counters(CUDA0, 12)
    assert tc.tile_counters(CUDA0, 40) is a  # one stream: its launches run one after another and share them
    other = torch.cuda.Stream()
    with torch.cuda.stream(other):
        b = tc.tile_counters(CUDA0, 12)
    assert b is not a and tc.tile_counters("cuda:1", 12) not in (a, b)
    assert tc.eager_counters(CUDA0) is a and a.n == tc.MAX_TILE_COUNTERS


def test_eager_counters_are_made_outside_the_launching_streams_pool(fake):
    """torch.compile's CUDA-graph trees route every allocation of their warm-up stream into a graph's private pool,
    whose blocks they later hand to other graphs: counters kept for good are made on a side stream (the general
    pool), and the launching stream waits for their zeroing. Before, they were made on the launching stream."""
    launching = fake.current_stream(CUDA0)
    cnt = tc.tile_counters(CUDA0, 12)
    assert cnt.made_on is not launching and cnt.made_on in launching.waited_streams
    assert cnt.made_on is not _device._CAPTURE_STREAMS.get(0)


def test_cached_tensors_are_made_in_a_running_capture_else_outside_the_pools(fake):
    """``_cache_memory.made_to_keep``, the one rule of the suppress-range, zero-offset and rvq table-offset caches:
    outside a capture a full cache is dropped after a device sync, then the entry is made on a side stream (never
    the capture stream) that the launching stream waits for; in a running capture it is made on the capturing
    stream (the graph's own), and a full cache is kept (a device sync there would break the capture)."""
    launching = fake.current_stream(CUDA0)
    make = lambda: _Counters(CUDA0, 1, fake)  # noqa: E731
    cache = {"a": make(), "b": make()}
    kept = made_to_keep(make, CUDA0, False, cache, 2)
    assert cache == {} and fake.synced == [0]
    assert kept.made_on is not launching and kept.made_on in launching.waited_streams and not kept.in_capture
    cache = {"a": kept, "b": make()}
    launching.capturing = True
    captured = made_to_keep(make, CUDA0, True, cache, 2)
    assert captured.made_on is launching and captured.in_capture
    assert len(cache) == 2 and fake.synced == [0]


def test_a_graph_counts_on_counters_of_its_own_made_before_its_capture(fake):
    eager = tc.tile_counters(CUDA0, 8)
    seen = []

    def body():
        seen.append(tc.tile_counters(CUDA0, 24))
        seen.append(tc.tile_counters(CUDA0, 16))  # a second split-K launch of the same graph: the same set

    g1, _ = cuda_graphs.capture(body, CUDA0, warmup=1)
    g2, _ = cuda_graphs.capture(body, CUDA0, warmup=1)
    warm1, _, cap1, cap1b, warm2, _, cap2, _ = seen
    assert cap1 is cap1b and cap1 is not cap2  # each graph its own
    assert {id(c) for c in (cap1, cap2)}.isdisjoint({id(eager), id(warm1), id(warm2)})
    assert g1.omni_fast_tile_counters == [cap1] and g2.omni_fast_tile_counters == [cap2]  # kept with the graph
    assert cap1.n == 24 and not cap1.in_capture  # sized by the warm-ups, zeroed before the capture began
    assert eager not in (warm1, warm2)  # the warm-ups run eagerly, on their side streams


def test_a_capture_needing_more_than_its_warmups_gets_more(fake):
    calls = []

    def body():
        calls.append(tc.tile_counters(CUDA0, 10 if len(calls) == 0 else 30))

    graph, _ = cuda_graphs.capture(body, CUDA0, warmup=1)
    made_before, made_inside = graph.omni_fast_tile_counters
    assert calls[1] is made_inside and made_inside.n == 30 and made_inside.in_capture and made_before.n == 10


def test_a_capture_omni_fast_does_not_run_keeps_its_counters_for_good(fake):
    eager = tc.tile_counters(CUDA0, 8)
    got = []
    for _ in range(2):  # a serving stack capturing our split-K ops in graphs of its own
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=torch.cuda.Stream()):
            got.append(tc.tile_counters(CUDA0, 20))
    assert got[0] is not got[1] and eager not in got and all(c.in_capture for c in got)
    assert tc._KEPT_FOR_FOREIGN_GRAPHS == got
    assert tc.tile_counters(CUDA0, 8) is eager  # after the captures: the stream's own again


def test_too_many_tiles_is_refused():
    with pytest.raises(ValueError, match="split-K tiles"):
        tc.tile_counters("cpu", tc.MAX_TILE_COUNTERS + 1)


def test_a_cuda_device_without_index_is_the_current_one(fake):
    """``torch.device("cuda")`` (``omni_fast.testing.DEVICE`` on a GPU) names the current device: the same set as
    ``cuda:0``'s. Before, it was another key: ``eager_counters(DEVICE)`` found nothing on a GPU, so the tests'
    "every tile reset its counter" check (``cnt is None or not cnt.any()``) passed without looking."""
    a = tc.tile_counters(CUDA0, 8)
    assert tc.eager_counters("cuda") is a and tc.tile_counters(torch.device("cuda"), 8) is a
    graph, _ = cuda_graphs.capture(lambda: tc.tile_counters("cuda", 8), CUDA0, warmup=1)
    assert len(graph.omni_fast_tile_counters) == 1  # the capture's launch took the set made before it
