"""Code2Wav CUDA-graph readiness: in-place stream state, graph buckets and steps, graphs on/off, GPU replay vs
eager streams."""

import pytest
import torch

import omni_fast
import omni_fast.models  # noqa: F401  (not imported by omni_fast itself)
from omni_fast.testing import DEVICE, assert_matches_reference

transformers = pytest.importorskip("transformers")

from _code2wav_helpers import (  # noqa: E402
    DOWN,
    ONE_SHOT,
    UP,
    _check_utterances,
    _hf_model,
    _models,
    _pre_transformer_reference,
    _pre_transformer_streamed,
    _run_with_resets,
    _stream,
)


# --- CUDA-graph readiness ----------------------------------------------------------------------------------------


def _state_tensors(st):
    out = {"pos": st.pos, "fresh": st.fresh, **{f"conv {k}": v for k, v in st.conv.items()}}
    for i, kv in enumerate(st.kv):
        out[f"k{i}"], out[f"v{i}"] = kv
    return out


def test_stream_state_is_updated_in_place_after_the_first_push():
    """What CUDA-graph replay needs: from the second push on, every state tensor keeps its shape and address."""
    _, model = _models(0)
    s = model.stream(2)
    codes = torch.randint(0, 16, (2, 4, 12))
    s.push(codes[..., :3])
    before = {k: (v.data_ptr(), tuple(v.shape)) for k, v in _state_tensors(s.state).items()}
    for a, e in ((3, 4), (4, 8), (8, 12)):
        s.push(codes[..., a:e])
    after = {k: (v.data_ptr(), tuple(v.shape)) for k, v in _state_tensors(s.state).items()}
    assert before == after
    assert s.state.pos.tolist() == [12, 12] and s.frames == 12


def test_graph_bucket_decomposition(monkeypatch):
    """With graphs on, a push is cut into bucket-sized pieces; any cut gives the one-shot audio (CPU stand-in for
    the graph: the eager step)."""
    from omni_fast.models import code2wav as mod

    sizes = []

    class FakeGraph:
        def __init__(self, stream, frames, fresh=False):
            self.stream, self.frames, self.fresh = stream, frames, fresh
            self.codes = torch.zeros(frames)  # (a static input buffer, made in the current inference mode)

        def __call__(self, codes):
            assert codes.shape[-1] == self.frames
            sizes.append(self.frames)
            return self.stream._step(codes, self.fresh)

    monkeypatch.setattr(mod, "_GraphStep", FakeGraph)
    _, model = _models(0)
    codes = torch.randint(0, 16, (1, 4, 20))
    s = model.stream(1, graph_buckets=(1, 4))
    s.cuda_graphs = True
    got = torch.cat([s.push(codes[..., :2]), s.push(codes[..., 2:13]), s.push(codes[..., 13:])], dim=-1)
    assert sizes == [4, 4, 1, 1, 1, 4, 1, 1, 1]
    torch.testing.assert_close(got, model(codes), rtol=1e-4, atol=5e-5)
    # a long-lived stream: reset() keeps its graphs; the first push after it replays a "fresh" graph for its
    # first piece only, then the usual ones
    graphs = dict(s._graphs)
    s.reset([0])
    assert s._graphs == graphs
    sizes.clear()
    more = torch.randint(0, 16, (1, 4, 6))
    wav = s.push(more)
    assert sizes == [4, 1, 1] and sorted(s._fresh_graphs) == [4] and s._graphs == graphs
    torch.testing.assert_close(wav[..., s.lead_samples:], model(more), rtol=1e-4, atol=5e-5)
    s.finish()
    assert not s._graphs and not s._fresh_graphs


@pytest.mark.parametrize("graphs", [False, True])
def test_stream_under_inference_mode_then_outside_it(graphs, monkeypatch):
    """A stream pushed under torch.inference_mode() (a server's request) holds its state as inference tensors; the
    next push or reset outside it (another request on the long-lived stream) crashed updating them in place
    ('Inplace update to inference tensor outside InferenceMode'). The state becomes ordinary tensors once, the
    graphs that read it are dropped (CPU stand-in for the graphs: the eager step); same audio as one shot."""
    from omni_fast.models import code2wav as mod

    made = []

    class FakeGraph:
        def __init__(self, stream, frames, fresh=False):
            self.stream, self.fresh, self.codes = stream, fresh, torch.zeros(frames)
            made.append(torch.is_inference_mode_enabled())

        def __call__(self, codes):
            self.codes.copy_(codes[0, 0])  # a replay writes its static input
            return self.stream._step(codes, self.fresh)

    monkeypatch.setattr(mod, "_GraphStep", FakeGraph)
    _, model = _models(0)
    codes = torch.randint(0, 16, (1, 4, 15))
    for modes in ((True, False, True, False, True), (False, True, False, True, False)):
        with torch.inference_mode(modes[0]):
            s = model.stream(1, graph_buckets=(1, 2))
        s.cuda_graphs = graphs
        out = []
        for i, inference in enumerate(modes):
            with torch.inference_mode(inference):
                out.append(s.push(codes[..., 3 * i: 3 * i + 3]))
        torch.testing.assert_close(torch.cat(out, -1), model(codes), rtol=1e-4, atol=5e-5)
        with torch.inference_mode(not modes[-1]):
            s.reset([0])
        with torch.inference_mode(modes[-1]):
            wav = s.push(codes[..., :3])
        torch.testing.assert_close(wav[..., s.lead_samples:], model(codes[..., :3]), rtol=1e-4, atol=5e-5)
    assert not graphs or (True in made and False in made)


def test_graph_steps_bookkeeping_with_resets(monkeypatch):
    """_GraphStep's host bookkeeping (frames, pending resets, the state snapshot restored after warm-up) with a CPU
    stand-in for the capture: it records nothing, so "capture" runs the step and the snapshot is restored again (a
    real capture runs the step's Python but none of its kernels); a replay runs the step into the static output."""
    from omni_fast.models import code2wav as mod

    streams = []

    class StandIn:
        def __init__(self, fn, out):
            self.fn, self.out = fn, out

        def replay(self):  # the step's kernels only: its host-side updates are not part of a graph
            st = streams[0].state
            host = (st.frames, st.reset_pending)
            self.out.copy_(self.fn())
            st.frames, st.reset_pending = host

    def fake_capture(fn, device=None, *, warmup=2, pool=None, after_warmup=None):
        for _ in range(warmup):
            fn()
        after_warmup()
        out = fn()
        after_warmup()
        return StandIn(fn, out), out

    monkeypatch.setattr(mod, "capture", fake_capture)
    _, model = _models(0)
    codes = torch.randint(0, 16, (2, 4, 16))
    schedule = [(2, []), (4, []), (4, [1]), (1, [0]), (5, [])]
    eager, starts = _run_with_resets(model, codes, schedule)
    s = model.stream(2, graph_buckets=(1, 4))
    s.cuda_graphs, s._pool = True, object()
    streams.append(s)
    got, _ = _run_with_resets(model, codes, schedule, stream=s)
    assert sorted(s._graphs) == [1, 4] and sorted(s._fresh_graphs) == [1, 4]
    assert s.frames == 16 and s.state.pos.tolist() == [6, 10] and not s.state.reset_pending
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=5e-5)  # (the last push runs as pieces 4 + 1)
    _check_utterances(model, codes, got, starts, rtol=1e-4, atol=5e-5)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU-only behaviour")
def test_cuda_graphs_need_cuda():
    _, model = _models(0)
    with pytest.raises(ValueError, match="CUDA device"):
        model.stream(1, cuda_graphs=True)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU-only behaviour")
def test_cuda_graphs_default_off_on_cpu():
    _, model = _models(0)
    for m in (model, omni_fast.models.Code2Wav.from_transformers(_hf_model(0), backend="triton")):
        assert not m.stream(2).cuda_graphs and not m.stream(2, cuda_graphs=False).cuda_graphs


@pytest.mark.gpu
def test_gpu_stream_uses_cuda_graphs_by_default():
    """On CUDA a stream replays CUDA graphs unless told not to (``cuda_graphs=False``), and the replays equal the
    eager stream; the reference backend (host reads, not capturable) stays eager."""
    hf = _hf_model(0).to(DEVICE)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    codes = torch.randint(0, 16, (2, 4, 30), device=DEVICE)
    sizes = [1, 4, 4, 21]
    eager = _stream(model, codes, sizes)
    s = model.stream(2)
    assert s.cuda_graphs and not model.stream(2, cuda_graphs=False).cuda_graphs
    out, i = [], 0
    for n in sizes:
        out.append(s.push(codes[..., i:i + n]))
        i += n
    assert sorted(s._graphs) == [1, 4, 16]  # 21 = 16 + 4 + 1; the first push (states created) runs eagerly
    out.append(s.finish())
    torch.testing.assert_close(torch.cat(out, -1), eager, rtol=1e-4, atol=5e-5)
    ref_model = omni_fast.models.Code2Wav.from_transformers(hf, backend="reference")
    assert not ref_model.stream(2).cuda_graphs


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_cuda_graph_stream_equals_eager_stream(batch):
    hf = _hf_model(0).to(DEVICE)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    codes = torch.randint(0, 16, (batch, 4, 30), device=DEVICE)
    eager = _stream(model, codes, [2, 1, 10, 17])
    s = model.stream(batch, cuda_graphs=True)
    got = torch.cat([s.push(codes[..., a:e]) for a, e in ((0, 2), (2, 3), (3, 13), (13, 30))], dim=-1)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=5e-5)
    assert len(s._graphs) == 4  # buckets 1, 2, 8, 16


@pytest.mark.gpu
def test_gpu_cuda_graph_stream_with_resets_equals_eager_stream():
    """Rows reset mid-stream under CUDA graphs (the graphs of the stream are reused across resets; the first push
    after a reset replays a "fresh" graph) equal the eager stream and the separate one-shot decodes."""
    hf = _hf_model(0, sliding_window=72).to(DEVICE)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    codes = torch.randint(0, 16, (3, 4, 100), device=DEVICE)
    schedule = [(1, []), (8, []), (8, [1]), (1, [2]), (40, [0]), (8, [1, 2]), (34, [])]
    eager, starts = _run_with_resets(model, codes, schedule)
    s = model.stream(3, cuda_graphs=True, graph_buckets=(1, 8, 32))
    got, _ = _run_with_resets(model, codes, schedule, stream=s)
    assert sorted(s._graphs) == [1, 8, 32] and sorted(s._fresh_graphs) == [1, 8, 32]
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=5e-5)
    _check_utterances(model, codes, got, starts, rtol=1e-4, atol=5e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,dtype", [(1, torch.float32), (3, torch.bfloat16), (64, torch.bfloat16)])
def test_gpu_cuda_graphs_replay_across_the_window(batch, dtype):
    """Graphs captured while the KV caches are still filling (pos < W-1 = 71) replay correctly once the caches are
    full and slide: the valid cache length and the rows kept come from the device position at replay time."""
    hf = _hf_model(0, sliding_window=72).to(DEVICE)
    codes = torch.randint(0, 16, (batch, 4, 160), device=DEVICE)
    with torch.no_grad():
        exact = hf(codes)
        want = hf.to(dtype)(codes)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    sizes = [1, 8, 8, 1, 64, 3, 75]  # graphs: 8 captured at pos 1, 1 at 17, 64 at 18, 2 at 82; 75 = 64 + 8 + 2 + 1
    eager = _stream(model, codes, sizes)
    s = model.stream(batch, cuda_graphs=True)
    out, i = [], 0
    for n in sizes:
        out.append(s.push(codes[..., i:i + n]))
        i += n
    got = torch.cat(out, -1)
    assert sorted(s._graphs) == [1, 2, 8, 64]
    if dtype == torch.float32:
        torch.testing.assert_close(got, eager, rtol=1e-4, atol=5e-5)
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=5e-5)
    else:  # the same kernels on the same state; loose in case a graph picks another cuBLAS algorithm
        torch.testing.assert_close(got, eager, rtol=2e-2, atol=2e-2)
        assert_matches_reference(got, exact, want, factor=3.0, name="graphs vs transformers")


@pytest.mark.gpu
def test_gpu_pre_transformer_real_shapes_bf16():
    """The real pre-transformer (8 layers, hidden 1024, 16 heads of 64, window 72, MLP 3072) in bf16 on the Triton
    ops, one shot and streamed across the window, vs the fp64 reference (FlashAttention's rule)."""
    hf = _hf_model(0, hidden_size=1024, num_attention_heads=16, num_key_value_heads=16, intermediate_size=3072,
                   num_hidden_layers=8, sliding_window=72).to(DEVICE)
    emb = torch.randn(2, 153, 1024, device=DEVICE)
    with torch.no_grad():
        exact = _pre_transformer_reference(hf, emb.double(), torch.float64)
        want = _pre_transformer_reference(hf, emb, torch.bfloat16)
        model = omni_fast.models.Code2Wav.from_transformers(hf.to(torch.bfloat16), backend="triton")
        for sizes in (ONE_SHOT, UP, DOWN, [1] * 80 + [73]):
            got = _pre_transformer_streamed(model, emb.to(torch.bfloat16), sizes)
            assert_matches_reference(got, exact, want, name=f"chunks {sizes[:5]}")
