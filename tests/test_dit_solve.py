"""Qwen2.5-Omni Token2Wav: the DiT's whole ODE solve as one (per length bucket) CUDA graph
(:mod:`omni_fast.models.dit_solve`) against transformers' ``Qwen2_5OmniToken2WavDiTModel.sample`` on a tiny random
DiT with a small block (so the block mask and the bucket padding both matter). On the CPU the graph's replay is
emulated (the captured function on the same static buffers); the gpu-marked test captures for real."""

import pytest
import torch

pytest.importorskip("transformers")

from omni_fast.models import dit_solve  # noqa: E402
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25  # noqa: E402
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniDiTConfig  # noqa: E402


def _dit(device="cpu", layers=3):
    """The tiny random DiT of the Token2Wav tests (test_dit_layers.py uses it too)."""
    config = Qwen2_5OmniDiTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, head_dim=16,
                                  emb_dim=16, enc_emb_dim=16, enc_dim=16, enc_channels=[16, 16, 16, 16, 48],
                                  enc_attention_channels=8, enc_se_channels=8, num_embeds=300, block_size=4,
                                  look_ahead_layers=[1], look_backward_layers=[0, 2], max_position_embeddings=256)
    torch.manual_seed(0)
    dit = q25.Qwen2_5OmniToken2WavDiTModel._from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # N(0, 0.2): AdaLN / gates / projections all away from their zero init
        for name, p in dit.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return dit.to(device)


@pytest.fixture(scope="module")
def dit():
    return _dit()


def _inputs(dit, B, n, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    code = torch.randint(0, 300, (B, n), generator=g)
    cond = torch.randn(B, dit.config.enc_emb_dim, generator=g)
    ref = torch.randn(B, 9, dit.mel_dim, generator=g)
    return cond.to(device), ref.to(device), code.to(device)


def _hf(dit, cond, ref, code, seed, **kw):
    torch.manual_seed(seed)
    return dit.sample(cond, ref, code, **kw)


def _ours(dit, cond, ref, code, seed, **kw):
    torch.manual_seed(seed)
    with torch.no_grad():
        return dit_solve.sample(dit, cond, ref, code, **kw)


def _eager(dit, cond, ref, code, seed, num_steps=10, guidance_scale=0.5, sway_coefficient=-1.0, backend=None):
    """The solve function uncaptured and unpadded (lens = the real length)."""
    torch.manual_seed(seed)
    B, L = code.shape[0], code.shape[1] * dit.repeats
    noise = torch.randn([B, L, dit.mel_dim], dtype=ref.dtype, device=code.device)
    with torch.no_grad():
        r = torch.cat([ref, torch.zeros_like(ref)]) if guidance_scale >= 1e-5 else ref
        spk = dit.input_embed.spk_encoder(r)
        lens = torch.full((B,), L, dtype=torch.int32, device=code.device)
        y = dit_solve.solve(dit, noise, code, cond, spk, lens, num_steps=num_steps, guidance_scale=guidance_scale,
                            sway_coefficient=sway_coefficient, backend=backend)
    return y.permute(0, 2, 1)


# fp32 throughout; padding changes GEMM shapes and the attention kernel sums in another order (~1e-7 relative per
# op), carried through 3 layers x 4 evaluations x (steps - 1): 1e-4 absolute on mels of magnitude ~1-10.
TOL = dict(atol=1e-4, rtol=1e-4)


# the Triton attention (interpreter) on one case; the others check the solve / bucket logic on the reference backend
# (the Triton case: num_steps=2, one whole RK4 step = 4 DiT evaluations through every Triton op, padded and eager;
# the multi-step loop is the same code on either backend: the reference cases with 4 steps)
@pytest.mark.parametrize("B,n,steps,guidance,backend", [(2, 7, 2, 0.5, "triton"), (1, 5, 4, 0.5, "reference"),
                                                        (1, 1, 2, 0.0, "reference"), (3, 3, 4, 0.7, "reference")])
def test_graph_solve_matches_transformers_and_eager(dit, B, n, steps, guidance, backend):
    cond, ref, code = _inputs(dit, B, n)
    kw = dict(num_steps=steps, guidance_scale=guidance, backend=backend)
    want = _hf(dit, cond, ref, code, 7, num_steps=steps, guidance_scale=guidance)
    got = _ours(dit, cond, ref, code, 7, buckets=(4, 8), **kw)
    eager = _eager(dit, cond, ref, code, 7, **kw)
    assert got.shape == want.shape == (B, dit.mel_dim, n * dit.repeats)
    assert want.abs().max() > 0.5  # a real solve, not a near-zero field
    torch.testing.assert_close(eager, want, **TOL)
    torch.testing.assert_close(got, eager, **TOL)
    torch.testing.assert_close(got, want, **TOL)


def test_two_lengths_share_one_bucket_graph(dit):
    dit.__dict__.pop(dit_solve._CACHE, None)
    for n in (5, 7, 6):  # codes 5 / 7 / 6 -> mel 10 / 14 / 12, all in bucket 8 (16 frames)
        cond, ref, code = _inputs(dit, 2, n, seed=n)
        want = _hf(dit, cond, ref, code, n, num_steps=3)
        got = _ours(dit, cond, ref, code, n, num_steps=3, buckets=(8,), backend="reference")
        torch.testing.assert_close(got, want, **TOL)
    graphs = [k for k in dit.__dict__[dit_solve._CACHE] if k != "weights"]
    assert len(graphs) == 1 and graphs[0][1] == 8


def test_sway_none_and_beyond_the_largest_bucket(dit):
    cond, ref, code = _inputs(dit, 1, 11)
    want = _hf(dit, cond, ref, code, 3, num_steps=3, sway_coefficient=None)
    got = _ours(dit, cond, ref, code, 3, num_steps=3, sway_coefficient=None, buckets=(4,),
                backend="reference")  # -> bucket 16
    torch.testing.assert_close(got, want, **TOL)
    assert dit_solve.bucket_for(11, (4,)) == 16 and dit_solve.bucket_for(4, (4, 8)) == 4


def test_default_buckets_four_per_octave():
    """docs/token2wav.md's padding table and graph count rest on these: 16 ... 4096, four per octave (ratio ~2^(1/4),
    at most 21 % between neighbours after rounding to ints), powers of two kept; 23 page-aligned graphs (12
    codes a block) cover 25-1500 codes (0.5-30 s), 7 with the former powers of two."""
    b = dit_solve.CODE_BUCKETS
    assert b[0] == 16 and b[-1] == 4096 and len(b) == 33 and list(b) == sorted(set(b))
    assert {16 << i for i in range(9)} <= set(b)
    assert all(hi / lo <= 1.22 for lo, hi in zip(b, b[1:]))
    assert dit_solve.bucket_for(250) == 256 and dit_solve.bucket_for(4097) == 8192

    def graphs(buckets):
        return len({-(-dit_solve.bucket_for(n, buckets) // 12) * 12 for n in range(25, 1501)})

    assert graphs(b) == 23 and graphs(tuple(16 << i for i in range(9))) == 7


def test_new_weights_drop_the_graphs(dit, monkeypatch):
    """... after draining the shared guard (another stream's replay may still read the dropped graphs' buffers)."""
    cond, ref, code = _inputs(dit, 1, 3)
    _ours(dit, cond, ref, code, 0, num_steps=2, buckets=(4,), backend="reference")
    cache = dit.__dict__[dit_solve._CACHE]
    before, graphs = cache["weights"], len(cache)
    drained = []
    monkeypatch.setattr(dit.__dict__[dit_solve._POOL], "drain", lambda device: drained.append(len(cache)),
                        raising=False)
    with torch.no_grad():
        dit.proj_out.bias.add_(0.0)  # in-place update: version bump
    _ours(dit, cond, ref, code, 0, num_steps=2, buckets=(4,), backend="reference")
    assert dit.__dict__[dit_solve._CACHE]["weights"] != before
    assert drained == [graphs]  # drained once, before the stale graphs were dropped


def test_inference_mode_then_no_grad(dit):
    """A solve under torch.inference_mode() and then one outside it (transformers' generate runs under no_grad):
    static buffers made under inference_mode cannot be written outside it, so each mode has its own graph (was
    RuntimeError 'Inplace update to inference tensor outside InferenceMode' on the second call); same result."""
    dit.__dict__.pop(dit_solve._CACHE, None)
    cond, ref, code = _inputs(dit, 1, 3)
    torch.manual_seed(0)
    with torch.inference_mode():
        first = dit_solve.sample(dit, cond, ref, code, num_steps=2, buckets=(4,), backend="reference")
    again = _ours(dit, cond, ref, code, 0, num_steps=2, buckets=(4,), backend="reference")
    torch.manual_seed(0)
    with torch.inference_mode():
        third = dit_solve.sample(dit, cond, ref, code, num_steps=2, buckets=(4,), backend="reference")
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(third, first, atol=0, rtol=0)


def test_bad_input(dit):
    cond, ref, code = _inputs(dit, 1, 3)
    with pytest.raises(ValueError, match="num_steps"):
        dit_solve.sample(dit, cond, ref, code, num_steps=1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        dit_solve.sample(dit, cond, ref, torch.zeros(1, 200, dtype=torch.long))
    with pytest.raises((TypeError, ValueError), match="code"):
        dit_solve.sample(dit, cond, ref, code.float())
    with pytest.raises(ValueError, match="reference_mel"):
        dit_solve.sample(dit, cond, ref[..., :3], code)


@pytest.mark.gpu
def test_graph_replay_equals_eager_on_cuda():
    """Real capture: the replayed solve equals the eager (uncaptured, unpadded) solve and transformers' sample."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dit = _dit("cuda")
    for B, n in ((1, 5), (2, 7), (2, 6)):  # the last two share bucket 8
        cond, ref, code = _inputs(dit, B, n, device="cuda")
        want = _hf(dit, cond, ref, code, 5, num_steps=4)
        eager = _eager(dit, cond, ref, code, 5, num_steps=4)
        got = _ours(dit, cond, ref, code, 5, num_steps=4, buckets=(8,))
        graphs = [g for k, g in dit.__dict__[dit_solve._CACHE].items() if k != "weights" and k[0] == B]
        assert len(graphs) == 1 and graphs[0].graph is not None  # captured, one graph for bucket 8
        torch.testing.assert_close(got, eager, **TOL)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)  # TF32 / cuDNN paths may differ from SDPA's


def _fake_capture(monkeypatch):
    """Every ``_SolveGraph`` takes the capture path on the CPU: ``capture`` records the pool it is given and returns
    a fake graph whose replay reruns the captured function into its static outputs; ``graph_pool_handle`` hands
    out a new token per call. Returns (pools given to captures, handles made)."""
    pools, handles = [], []

    class FakeGraph:
        def __init__(self, fn):
            self.fn, self.out = fn, fn()

        def replay(self):
            for static, new in zip(self.out, self.fn()):
                static.copy_(new)

    def capture(fn, device, *, pool=None, **kw):
        pools.append(pool)
        graph = FakeGraph(fn)
        return graph, graph.out

    monkeypatch.setattr(dit_solve, "_captures", lambda device: True)
    monkeypatch.setattr(dit_solve, "capture", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: handles.append(object()) or handles[-1])
    return pools, handles


def _solve_calls(t2w, buckets, **kw):
    """(mel(codes), wave(codes)): ``dit_solve.sample`` / ``synthesize`` on the tiny Token2Wav, seeded per length."""
    from test_bigvgan_padded import _synth_inputs

    dit, voc = t2w.code2wav_dit_model, t2w.code2wav_bigvgan_model

    def call(codes, vocoder):
        code, cond, ref = _synth_inputs(t2w, codes, device=next(dit.parameters()).device)
        torch.manual_seed(codes)
        with torch.no_grad():
            if vocoder:
                return dit_solve.synthesize(dit, voc, cond, ref, code, buckets=buckets, **kw)
            return dit_solve.sample(dit, cond, ref, code, buckets=buckets, **kw)

    return (lambda n: call(n, False)), (lambda n: call(n, True))


def _graphs(dit):
    return [g for name in (dit_solve._CACHE, dit_solve._CACHE + "_wave") for k, g in dit.__dict__.get(name, {}).items()
            if k != "weights"]


def test_every_bucket_graph_shares_one_memory_pool(monkeypatch):
    """All of a DiT's solve graphs (every bucket, ``sample``'s and ``synthesize``'s) are captured into ONE pool,
    made once; callers get clones, never a graph's static outputs, so replays in any order leave earlier results
    alone and give each call its own; once every graph died (new weights), the next capture takes a NEW pool (torch
    asserts a use count > 0 when a capture joins an existing pool)."""
    import gc

    from test_bigvgan_padded import _token2wav

    pools, handles = _fake_capture(monkeypatch)
    held, replay = [], dit_solve._SolveGraph._replay
    monkeypatch.setattr(dit_solve._SolveGraph, "_replay",
                        lambda self, *a: held.append(self.shared.lock._is_owned()) or replay(self, *a))
    t2w = _token2wav()
    dit = t2w.code2wav_dit_model
    mel, wave = _solve_calls(t2w, (12, 24), num_steps=2, backend="reference")
    first = {n: mel(n) for n in (3, 13)}  # buckets 12 and 24 (tiny DiT: blocks of 24 frames = 12 codes)
    w = wave(3)
    assert len(pools) == 3 and len(handles) == 1 and all(p is handles[0] for p in pools)
    graphs = _graphs(dit)
    assert sorted(g.noise.shape[1] for g in graphs) == [24, 24, 48] and all(g.shared.handle is handles[0]
                                                                            for g in graphs)
    saved = {n: t.clone() for n, t in first.items()}
    statics = {g.out[0].data_ptr() for g in graphs}
    for n in (13, 3, 13, 3):  # alternating buckets, replays only
        got = mel(n)
        assert got.data_ptr() not in statics
        torch.testing.assert_close(got, saved[n], atol=0, rtol=0)
    assert all(torch.equal(first[n], saved[n]) for n in first)  # earlier results untouched by later replays
    assert len(held) == 7 and all(held)  # every replay (and its output copies) inside the pool's lock
    torch.testing.assert_close(wave(3), w, atol=0, rtol=0)
    assert len(pools) == 3  # no capture since the first three
    with torch.no_grad():
        dit.proj_out.bias.add_(0.0)  # new weights (version bump): the sample cache is dropped on its next call
    mel(3)
    assert len(pools) == 4 and pools[-1] is handles[0]  # the waveform graph still lives in the pool: joined
    del graphs
    for name in (dit_solve._CACHE, dit_solve._CACHE + "_wave"):
        dit.__dict__[name].clear()
    gc.collect()  # (a graph's closure refers to it: freed by the collector)
    mel(13)
    assert len(handles) == 2 and pools[-1] is handles[1]  # every graph died: a new pool


@pytest.mark.gpu
def test_shared_pool_alternating_buckets_on_cuda():
    """Real captures of two buckets (and a solve + vocoder graph) in ONE memory pool, replayed in alternating
    order: every replay equals the eager (uncaptured, unpadded) solve, and results returned earlier are not
    overwritten by another bucket's replay."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from test_bigvgan_padded import _token2wav

    t2w = _token2wav("cuda")
    dit = t2w.code2wav_dit_model
    mel, wave = _solve_calls(t2w, (12, 24), num_steps=3)
    got = {n: mel(n) for n in (3, 13)}  # captures: bucket 12, then 24
    w = wave(3)
    graphs = _graphs(dit)
    assert len(graphs) == 3 and all(g.graph is not None for g in graphs)
    assert len({g.graph.pool() for g in graphs}) == 1  # one pool
    want = {}
    for n in (3, 13):
        from test_bigvgan_padded import _synth_inputs

        code, cond, ref = _synth_inputs(t2w, n, "cuda")
        want[n] = _eager(dit, cond, ref, code, n, num_steps=3)
    kept = {n: t.clone() for n, t in got.items()}
    for n in (13, 3, 13, 3, 13):
        torch.testing.assert_close(mel(n), want[n], **TOL)
        torch.testing.assert_close(wave(3), w, atol=1e-6, rtol=0)  # a third graph's replay in between
    for n in (3, 13):
        torch.testing.assert_close(got[n], want[n], **TOL)
        assert torch.equal(got[n], kept[n])  # the first results, still intact after the later replays


def test_tf32_fast_path_wraps_the_solve_and_keys_its_graph(dit, fast_path, monkeypatch):
    """dit_tf32: the solve runs with cuBLAS fp32 GEMMs as TF32 (the flag seen inside the DiT forward, restored
    after), in its own graph (a graph keeps the math it was captured with); off: IEEE fp32 as transformers. On the
    CPU the flag changes nothing, so the result is the same."""
    seen = []
    forward = dit_solve._dit_forward

    def spy(*args, **kw):
        seen.append(torch.backends.cuda.matmul.fp32_precision)
        return forward(*args, **kw)

    monkeypatch.setattr(dit_solve, "_dit_forward", spy)
    dit.__dict__.pop(dit_solve._CACHE, None)  # (the fixture's DiT may hold other tests' graphs)
    cond, ref, code = _inputs(dit, 1, 3)
    before = torch.backends.cuda.matmul.fp32_precision
    plain = _ours(dit, cond, ref, code, 5, num_steps=2, backend="reference")
    assert seen and set(seen) == {before}
    seen.clear()
    fast_path("dit_tf32", True)
    fast = _ours(dit, cond, ref, code, 5, num_steps=2, backend="reference")
    assert seen and set(seen) == {"tf32"} and torch.backends.cuda.matmul.fp32_precision == before
    keys = [k for k in dit.__dict__[dit_solve._CACHE] if k != "weights"]
    assert sorted(k[-2] for k in keys) == [False, True]  # two graphs: fp32 and tf32
    torch.testing.assert_close(fast, plain, atol=0, rtol=0)  # (CPU: the flag is CUDA's)


@pytest.mark.gpu
def test_tf32_solve_close_to_fp32_on_cuda(fast_path):
    """dit_tf32 on a GPU: the TF32 solve stays within 2e-2 of the fp32 solve (10-bit mantissa inputs, fp32
    accumulation, 3 RK4 steps of a tiny random DiT); the fp32 graph is untouched by it."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dit = _dit("cuda")
    cond, ref, code = _inputs(dit, 2, 7, device="cuda")
    fp32 = _ours(dit, cond, ref, code, 5, num_steps=4)
    fast_path("dit_tf32", True)
    tf32 = _ours(dit, cond, ref, code, 5, num_steps=4)
    fast_path("dit_tf32", False)
    again = _ours(dit, cond, ref, code, 5, num_steps=4)
    assert torch.equal(again, fp32)
    err = (tf32 - fp32).abs().max() / fp32.abs().max()
    assert err < 2e-2
