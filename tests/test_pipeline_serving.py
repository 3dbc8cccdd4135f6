"""The pipeline used the way a server uses it (issue: serving audit, session 8): requests from several Python
threads at once on one pipeline object, streams closed midway, one object reused across batch sizes. Tiny random
model on the CPU (reference backend); each test well under a second after the module's one model build."""

import gc
import threading

import pytest
import torch

pytest.importorskip("transformers")

import omni_fast  # noqa: E402
from _thread_helpers import run_threads  # noqa: E402
from omni_fast.integrations.hf_compat import thinker_text_model  # noqa: E402
from omni_fast.models.qwen3_omni import Qwen3Omni, Request  # noqa: E402
from omni_fast.pipeline.scheduler import StreamOptions  # noqa: E402

KW = dict(max_new_tokens=6, talker_max_new_tokens=8, talker_min_new_tokens=6, first_chunk=1, chunk=3)
REQS = [Request(text=[5, 6, 7, 8, 9]), Request(text=[11, 3, 4])]


@pytest.fixture(scope="module")
def pipe():
    base = Qwen3Omni.random("tiny", patch=False)
    patched = Qwen3Omni(base.model, patch=True, tokenizer=base.tokenizer, backend="reference")
    yield patched
    omni_fast.unpatch(base.model)


def test_prefill_keeps_its_own_layer_output_while_another_thread_runs_the_layer(pipe):
    """The thinker prefill keeps the talker's accepted layer output with a forward hook on that (shared) layer: a
    request of another thread running the layer meanwhile was kept too, and the talker prompt then failed with a
    size mismatch (or took the other request's rows). Now the hook keeps only its own thread's output."""
    stages = pipe.stages()
    prompt = stages.prepare([REQS[0]])
    accept = pipe.config.talker_config.accept_hidden_layer
    text_model = thinker_text_model(stages.model.thinker)
    layer, main, ran = text_model.layers[accept - 1], threading.get_ident(), []

    def other_request(module, args, kwargs):  # while the main thread's prefill runs the layer, another one runs it
        if threading.get_ident() == main and not ran:
            ran.append(True)
            other = {k: (None if "past_key" in k else v) for k, v in kwargs.items()}
            t = threading.Thread(target=lambda: module(*args, **other))
            t.start()
            t.join()

    handle = layer.register_forward_pre_hook(other_request, with_kwargs=True)
    try:
        _, ctx = stages.thinker_prefill(prompt, StreamOptions())
    finally:
        handle.remove()
    assert ran
    assert ctx.hidden_states[accept].shape[:2] == prompt.ids.shape


def test_concurrent_requests_from_threads_get_their_own_results(pipe):
    """Two threads generating different requests on one pipeline get the results each gets alone (text and audio;
    leased decoders and codec streams, graph decode on its eager CPU path)."""
    want = [pipe.generate(r, graph_decode=True, **KW)[0] for r in REQS]

    def one(i):
        for _ in range(2):
            got = pipe.generate(REQS[i], graph_decode=True, **KW)[0]
            assert got["token_ids"] == want[i]["token_ids"]
            torch.testing.assert_close(got["audio"], want[i]["audio"], rtol=0, atol=1e-5)

    assert run_threads(one) == []


def test_a_free_decoder_is_leased_to_one_thread_only():
    """Two threads' streams looking for a free decoder / codec stream at once: both saw the same free entry and both
    took it (one KV cache, two requests). Now the check and the take are one step: the second thread builds its
    own. (The free entry's dead weakref waits for both threads to have checked it: deterministic, ~0.3 s.)"""
    from omni_fast.pipeline.device import Lease, lease_from

    both_checked = threading.Barrier(2, timeout=0.3)

    def dead():  # a stream that ended: no holder (and a pause, so that the other thread checks meanwhile)
        try:
            both_checked.wait()
        except threading.BrokenBarrierError:
            pass

    entries, leases, got = [["shared decoder", dead]], [Lease(), Lease()], [None, None]

    def take(i):
        got[i] = lease_from(entries, leases[i], lambda: f"new decoder {i}")

    assert run_threads(take) == []
    assert sorted(got) in (["new decoder 0", "shared decoder"], ["new decoder 1", "shared decoder"])
    assert len(entries) == 2 and {e[1]() for e in entries} == set(leases)


def test_patched_generate_keeps_its_decoder_while_another_generate_runs(pipe):
    """omni_fast.patch's decode takeover kept ONE decoder per text model: a second generate on the model (another
    server thread's, here run between two steps of the first through its streamer) loaded its prefill into that
    decoder, and the first one continued on the other prompt's KV (other tokens). Now each generate's cache leases
    a decoder of its own (~0.3 s)."""
    thinker = pipe.model.thinker  # patched by the fixture: its decode steps run on MoeTextDecoder
    a, b = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[11, 3, 4, 20]])
    kw = dict(max_new_tokens=6, do_sample=False)
    want_a, want_b = thinker.generate(input_ids=a, **kw), thinker.generate(input_ids=b, **kw)

    class OtherRequestBetweenSteps:
        def __init__(self):
            self.calls, self.other = 0, None

        def put(self, _ids):
            self.calls += 1
            if self.calls == 2:
                self.other = thinker.generate(input_ids=b, **kw)

        def end(self):
            pass

    streamer = OtherRequestBetweenSteps()
    got_a = thinker.generate(input_ids=a, streamer=streamer, **kw)
    assert torch.equal(streamer.other, want_b)
    assert torch.equal(got_a, want_a)


def test_a_request_failed_or_closed_midway_leaves_the_model_exact(pipe, monkeypatch):
    """A request whose Code2Wav push raised midway (attention states advanced, frame count not: an OOM, an
    interrupt), in its first push or a later one, and a stream closed after its first audio chunk (a client gone)
    leave the pipeline usable: the next request on the same leased decoders and codec stream gets exactly what it
    gets alone (checked, no defect found; ~1 s)."""
    from omni_fast.models.code2wav import Code2WavStream

    want = pipe.generate(REQS[0], graph_decode=True, **KW)[0]
    convnet, pushes = Code2WavStream._convnet, []

    def fail_at(n):
        def convnet_failing(self, *a, **k):
            pushes.append(self.state.frames)
            if len(pushes) == n:
                raise MemoryError("out of memory in the middle of a push")
            return convnet(self, *a, **k)
        return convnet_failing

    for n in (1, 2):  # the first push of a new stream (frame count 0), a later push of a reused one
        pushes.clear()
        if n == 1:
            pipe._codec_streams = None
        monkeypatch.setattr(Code2WavStream, "_convnet", fail_at(n))
        with pytest.raises(MemoryError) as failed:
            pipe.generate(REQS[1], graph_decode=True, **KW)
        del failed  # logged by the server: the failed request's generator (and its leases) is gone
        gc.collect()
        monkeypatch.setattr(Code2WavStream, "_convnet", convnet)
        assert (pushes[-1] == 0) == (n == 1)
        got = pipe.generate(REQS[0], graph_decode=True, **KW)[0]
        assert got["token_ids"] == want["token_ids"]
        torch.testing.assert_close(got["audio"], want["audio"], rtol=0, atol=1e-5)
    events = pipe.stream(REQS[1], graph_decode=True, **KW)
    next(e for e in events if e.kind == "audio")
    events.close()
    got = pipe.generate(REQS[0], graph_decode=True, **KW)[0]
    assert got["token_ids"] == want["token_ids"]
    torch.testing.assert_close(got["audio"], want["audio"], rtol=0, atol=1e-5)


def test_stage_clock_waits_for_the_current_stream_only(monkeypatch):
    """The stage clock waits for the request thread's current stream, not the whole device (a server thread on a
    stream of its own would otherwise wait for every other thread's work at each stage boundary); CUDA faked."""
    from omni_fast.pipeline import device as pdev

    synced = []

    class _Stream:
        def synchronize(self):
            synced.append("stream")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append("device"))
    assert isinstance(pdev.now(torch.device("cuda", 0)), float) and synced == ["stream"]
    pdev.now(torch.device("cpu"))
    assert synced == ["stream"]


def test_patched_model_pickles_after_a_generate(pipe):
    """The decode takeover's leased decoders are kept on the text model with a weakref to each one's lease: torch.save
    of a patched model after any generate (or right after patch with fused_step on, which builds the decoder)
    raised "cannot pickle 'weakref.ReferenceType' object" (the docs say a patched model pickles). The leased
    decoders now pickle and deep-copy as none: the twin builds its own for its weights (~0.5 s)."""
    import copy
    import io

    thinker = pipe.model.thinker
    ids, kw = torch.tensor([[5, 6, 7, 8]]), dict(max_new_tokens=3, do_sample=False)
    want = thinker.generate(input_ids=ids, **kw)
    buf = io.BytesIO()
    torch.save(thinker, buf)
    buf.seek(0)
    twin = torch.load(buf, weights_only=False)
    assert torch.equal(twin.generate(input_ids=ids, **kw), want)
    assert torch.equal(copy.deepcopy(thinker).generate(input_ids=ids, **kw), want)


@pytest.mark.gpu
def test_gpu_frames_from_threads_on_their_own_streams():
    """Two server threads, each on a CUDA stream of its own, capture their first frame graphs at the same time
    (buckets 2 and 4) and replay them 20 times each, greedy and seeded: every frame equals the eager frame. The
    real-device check of the ReplayGuard's event ordering, the capture lock and the thread_local capture mode."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from test_mtp import _hf_predictor

    from omni_fast.models import CodePredictor

    m, emb = _hf_predictor(1, torch.float32, seed=4)
    cp = CodePredictor.from_transformers(m.cuda(), emb.cuda())
    g = torch.Generator().manual_seed(3)
    hs = [torch.randn(B, 48, generator=g).cuda() for B in (2, 3)]
    c0s = [torch.randint(0, emb.num_embeddings, (B,), generator=g).cuda() for B in (2, 3)]
    kws = [dict(do_sample=False), dict(seed=11)]
    want = [[cp.predict_frame(h, c, use_graph=False, **kw) for kw in kws] for h, c in zip(hs, c0s)]
    got = [[], []]
    torch.cuda.synchronize()

    def work(i):
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(20):
                for kw in kws:
                    codes, nxt = cp.predict_frame(hs[i], c0s[i], use_graph=True, **kw)
                    got[i].append((codes.clone(), nxt.clone()))
            torch.cuda.current_stream().synchronize()

    assert run_threads(work) == []
    for i in range(2):
        assert len(got[i]) == 40
        for j, (codes, nxt) in enumerate(got[i]):
            assert torch.equal(codes, want[i][j % 2][0]), (i, j)
            torch.testing.assert_close(nxt, want[i][j % 2][1], rtol=0, atol=0)


def test_a_stream_resumed_on_another_cuda_stream_waits_for_the_last_resume(monkeypatch):
    """A stream generator resumed by a server thread on another CUDA stream first waits for the work its previous
    resume queued (an event recorded at each yield); resumed on the same stream it does not wait; closing it closes
    the stream's own generator at once (CUDA streams and events faked; ~0 s)."""
    from _fake_cuda import FakeCuda, FakeStream

    from omni_fast.pipeline.device import resumed_in_order

    log = []

    class _Stream(FakeStream):
        def __init__(self, name):
            super().__init__(0)
            self.name = name

        def wait_event(self, event):
            log.append(("wait", self.name, event.stream.name))

    fake = FakeCuda(monkeypatch, devices=1)
    streams = {"a": _Stream("a"), "b": _Stream("b")}
    fake.streams[0] = streams["a"]
    closed = []

    def inner():
        try:
            for i in range(4):
                log.append(("work", fake.current_stream().name))
                yield i
        finally:
            closed.append(True)

    gen = resumed_in_order(inner(), torch.device("cuda"))
    assert next(gen) == 0 and next(gen) == 1  # the same stream: no wait
    fake.streams[0] = streams["b"]
    assert next(gen) == 2  # another thread's stream: it waits for a's last record first
    assert log == [("work", "a"), ("work", "a"), ("wait", "b", "a"), ("work", "b")]
    gen.close()
    assert closed == [True]
    assert list(resumed_in_order(iter([1, 2]), torch.device("cpu"))) == [1, 2]
