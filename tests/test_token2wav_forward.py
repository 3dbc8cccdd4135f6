"""``omni_fast.patch`` routing Qwen2.5-Omni's ``Qwen2_5OmniToken2WavModel.forward`` to
:func:`omni_fast.models.dit_solve.synthesize` (DiT solve + padded BigVGAN in one graph per length bucket; the replay
emulated on the CPU) when the ``token2wav`` fast path is on: transformers' return convention and numbers, the bucket
setting, the calls it hands back to transformers' forward, ``unpatch``.

The tiny random Token2Wav and its inputs are test_bigvgan_padded's. Backend "reference": the Triton vocoder on the
interpreter over a whole padded bucket takes minutes; the kernels against their references: test_bigvgan*.py,
test_dit*.py, test_token2wav.py."""

import pytest
import torch

pytest.importorskip("transformers")

import omni_fast  # noqa: E402
from omni_fast.integrations import token2wav_synth  # noqa: E402
from omni_fast.models import dit_solve  # noqa: E402
from test_bigvgan_padded import _synth_inputs, _token2wav  # noqa: E402 (one tiny Token2Wav for both files)

# fp32 end to end; the padded solve and vocoder sum the same terms in another order / other GEMM shapes (~1e-7
# relative per op) through 2 RK4 steps and BigVGAN's 6 upsampling stages: measured max |diff| 1.9e-9 on a waveform
# of peak 6.2e-3. The bound, 1e-6 absolute (1.6e-4 of the peak, ~500x the measured error), is the one the
# piece-by-piece patch uses (test_token2wav.py) and still catches a wrong mask, length or padding leak.
TOL = dict(atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def t2w():
    return _token2wav()


def _call(t2w, codes, seed=11, batch=1, grad=False, **kw):
    code, cond, ref = _synth_inputs(t2w, codes)
    if batch > 1:  # rows with their own codes (one noise draw for the batch, as transformers)
        code = torch.cat([code, torch.randint(0, 290, (batch - 1, codes), generator=torch.Generator().manual_seed(5))])
        cond, ref = cond.expand(batch, -1), ref.expand(batch, -1, -1)
    torch.manual_seed(seed)
    with torch.set_grad_enabled(grad):
        return t2w(code, cond, ref, **kw)


def _graphs(t2w):
    return [k for k in t2w.code2wav_dit_model.__dict__.get(dit_solve._CACHE + "_wave", {}) if k != "weights"]


@pytest.fixture
def patched(t2w, fast_path):
    fast_path("token2wav")
    t2w.code2wav_dit_model.__dict__.pop(dit_solve._CACHE + "_wave", None)
    report = omni_fast.patch(t2w, backend="reference")
    yield report
    omni_fast.unpatch(t2w)


def test_patched_forward_equals_transformers_two_lengths(t2w, fast_path):
    lengths = (3, 17, 5)  # buckets (4, 24) -> 12 / 24 codes (whole 24-frame attention blocks); 5 shares 3's graph
    want = [_call(t2w, n, num_steps=2) for n in lengths]
    fast_path("token2wav")
    report = omni_fast.patch(t2w, backend="reference")
    try:
        assert any(r.startswith("[code2wav] Qwen2_5OmniToken2WavModel.forward: DiT ODE solve + BigVGAN vocoder -> "
                                "one CUDA graph per length bucket (omni_fast.models.dit_solve.synthesize")
                   for r in report.replaced)
        token2wav_synth.set_code_buckets(t2w, (24, 4))
        assert token2wav_synth.code_buckets(t2w) == (4, 24)
        # the DiT's patched sample (the pipeline calls it directly) takes the same buckets
        assert t2w.code2wav_dit_model.__dict__[token2wav_synth.BUCKETS_ATTR] == (4, 24)
        for n, w in zip(lengths, want):
            got = _call(t2w, n, num_steps=2)
            assert t2w.__dict__[token2wav_synth.FALLBACK_ATTR] is None  # ran on synthesize
            assert got.device.type == "cpu" and got.shape == w.shape == (n * 2 * 240,) and got.dtype == w.dtype
            assert 1e-3 < w.abs().max() < 1  # a real waveform, not clamped
            torch.testing.assert_close(got, w, **TOL)
        assert sorted(k[1] for k in _graphs(t2w)) == [12, 24]
    finally:
        omni_fast.unpatch(t2w)
    assert "forward" not in t2w.__dict__ and token2wav_synth.BUCKETS_ATTR not in t2w.__dict__
    assert token2wav_synth.BUCKETS_ATTR not in t2w.code2wav_dit_model.__dict__
    assert torch.equal(_call(t2w, 3, num_steps=2), want[0])  # unpatched: transformers' own numbers, bit for bit


@pytest.mark.parametrize("kw", [dict(batch=2, num_steps=3), dict(guidance_scale=0.0, sway_coefficient=None),
                                dict(num_steps=2, guidance_scale=0.7, unused_keyword=1)])
def test_batch_no_cfg_sway_none_and_defaults(t2w, fast_path, kw):
    """Batch 2 comes back ``[2, samples]`` (transformers squeezes only the channel); no CFG; sway None; default
    num_steps (10) and transformers' ignored keywords."""
    want = _call(t2w, 4, **kw)
    fast_path("token2wav")
    omni_fast.patch(t2w, backend="reference")
    try:
        got = _call(t2w, 4, **kw)
        assert t2w.__dict__[token2wav_synth.FALLBACK_ATTR] is None
    finally:
        omni_fast.unpatch(t2w)
    assert got.shape == want.shape == ((2, 4 * 480) if kw.get("batch") else (4 * 480,))
    torch.testing.assert_close(got, want, **TOL)


def test_calls_the_graph_does_not_cover_run_transformers_forward(t2w, patched, monkeypatch):
    """Autograd recording, one ODE time point (the swapped DiT ``sample`` refuses it: ValueError), a too-long code
    (transformers' own error): transformers' forward on the swapped pieces, the reason kept on the module; no graph
    built."""
    want = _call(t2w, 3, num_steps=2)  # (patched: through synthesize)
    got = _call(t2w, 3, grad=True, num_steps=2)
    assert "autograd" in t2w.__dict__[token2wav_synth.FALLBACK_ATTR]
    torch.testing.assert_close(got.detach(), want, **TOL)
    graphs = _graphs(t2w)
    with pytest.raises(ValueError, match="num_steps"):
        _call(t2w, 3, num_steps=1)
    assert "num_steps=1" in t2w.__dict__[token2wav_synth.FALLBACK_ATTR]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        dit = t2w.code2wav_dit_model
        _call(t2w, dit.config.max_position_embeddings // dit.repeats + 1, num_steps=2)
    assert "max_position_embeddings" in t2w.__dict__[token2wav_synth.FALLBACK_ATTR]
    assert _graphs(t2w) == graphs


def test_patched_model_pickles_and_deep_copies_after_a_call(t2w, patched):
    """The graph caches (closures, static buffers bound to this module) pickle and copy as EMPTY caches: a saved or
    copied patched Token2Wav loads back patched and builds its own graphs."""
    import copy
    import io

    want = _call(t2w, 3, num_steps=2)
    assert _graphs(t2w)
    buf = io.BytesIO()
    torch.save(t2w, buf)
    buf.seek(0)
    for twin in (torch.load(buf, weights_only=False), copy.deepcopy(t2w)):
        assert twin.forward.__self__ is twin and not _graphs(twin)
        torch.testing.assert_close(_call(twin, 3, num_steps=2), want, **TOL)
        assert twin.__dict__[token2wav_synth.FALLBACK_ATTR] is None and len(_graphs(twin)) == 1
        pools = [m.code2wav_dit_model.__dict__[dit_solve._POOL] for m in (t2w, twin)]
        assert pools[0] is not pools[1]  # the memory pool (and its lock) is the module's own, not shared


def test_refusal_reasons(t2w):
    code, cond, ref = _synth_inputs(t2w, 3)
    ok = (code, cond, ref, 2, 0.5, -1.0)
    with torch.no_grad():
        assert token2wav_synth.refusal(t2w, *ok) is None
        cases = {"int tensor": (code.float(), cond, ref), "shapes": (code, cond[:, :3], ref),
                 "dtypes": (code, cond.double(), ref.double()), "devices": (code, cond.to("meta"), ref),
                 "not all tensors": (code.tolist(), cond, ref)}
        for reason, args in cases.items():
            assert reason in token2wav_synth.refusal(t2w, *args, 2, 0.5, -1.0), reason
        assert "Python numbers" in token2wav_synth.refusal(t2w, *ok[:4], torch.tensor(0.5), -1.0)
        assert "num_steps" in token2wav_synth.refusal(t2w, *ok[:3], 2.0, 0.5, -1.0)


def test_opt_in_unsupported_vocoder_and_bucket_setting(t2w, fast_path):
    report = omni_fast.patch(t2w)  # token2wav fast path off: nothing swapped, the line under "left"
    try:
        assert any("Qwen2_5OmniToken2WavModel.forward" in r and "opt-in" in r for r in report.left)
        assert "forward" not in t2w.__dict__
        with pytest.raises(ValueError, match="patch swapped"):
            token2wav_synth.set_code_buckets(t2w, (8,))
    finally:
        omni_fast.unpatch(t2w)
    fast_path("token2wav")
    act = t2w.code2wav_bigvgan_model.activation_post.act
    t2w.code2wav_bigvgan_model.activation_post.act = torch.nn.Tanh()  # not SnakeBeta: the padded vocoder refuses
    try:
        report = omni_fast.patch(t2w)
        assert any("Qwen2_5OmniToken2WavModel.forward" in r and "unsupported variant" in r for r in report.left)
        assert "forward" not in t2w.__dict__
    finally:
        omni_fast.unpatch(t2w)
        t2w.code2wav_bigvgan_model.activation_post.act = act
    omni_fast.patch(t2w)
    try:
        for bad, err in (((), ValueError), ((0, 8), ValueError), ((8.0,), ValueError), ("8", TypeError)):
            with pytest.raises(err, match="buckets"):
                token2wav_synth.set_code_buckets(t2w, bad)
    finally:
        omni_fast.unpatch(t2w)


@pytest.mark.gpu
def test_patched_forward_graph_on_cuda(fast_path):
    """On CUDA the patched forward replays one captured graph per bucket (solve + vocoder) and equals transformers'
    forward (IEEE fp32, see conftest; 1e-4: the padded GEMM shapes may pick other cuBLAS kernels)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    t2w = _token2wav("cuda")
    want = {n: _call_cuda(t2w, n) for n in (5, 3)}
    fast_path("token2wav")
    omni_fast.patch(t2w)
    try:
        token2wav_synth.set_code_buckets(t2w, (8,))
        for n in (5, 3):  # one bucket, one graph
            torch.testing.assert_close(_call_cuda(t2w, n), want[n], atol=1e-4, rtol=1e-4)
        graphs = t2w.code2wav_dit_model.__dict__[dit_solve._CACHE + "_wave"]
        assert len(_graphs(t2w)) == 1 and all(g.graph is not None for k, g in graphs.items() if k != "weights")
    finally:
        omni_fast.unpatch(t2w)


def _call_cuda(t2w, n):
    code, cond, ref = _synth_inputs(t2w, n, "cuda")
    torch.manual_seed(11)
    with torch.no_grad():
        return t2w(code, cond, ref, num_steps=3)
