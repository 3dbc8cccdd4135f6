"""Code2Wav on the GPU: bf16 real shapes of the conv kernels, split-K streaming chunks, 2**31 offsets, the real
config's one-frame pushes."""

import pytest
import torch

import omni_fast
import omni_fast.models  # noqa: F401  (not imported by omni_fast itself)
from omni_fast.reference import code2wav as ref
from omni_fast.testing import DEVICE, assert_matches_reference

transformers = pytest.importorskip("transformers")

from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig  # noqa: E402

from _code2wav_helpers import (  # noqa: E402
    _check_conv,
    _check_convt,
    _dbl,
    _hf_model,
    _models,
    _randomize,
    _run_with_resets,
    _snake_params,
    _stream,
)


# --- GPU: bf16 and the real shapes -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("c_in,c_out,k,d,snake,residual,groups", [
    (1024, 1536, 7, 1, False, False, 1), (768, 768, 7, 9, True, False, 1), (96, 96, 1, 1, True, True, 1),
    (96, 1, 7, 1, True, False, 1), (1024, 1024, 7, 1, False, False, 1024)])
@pytest.mark.parametrize("state", [False, True])
def test_gpu_real_shapes_bf16_conv(c_in, c_out, k, d, snake, residual, groups, state):
    _check_conv(2, c_in, c_out, 333, k, d=d, groups=groups, snake=snake, residual=residual, state=state,
                dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("c_in,r", [(1536, 8), (768, 5), (384, 4), (192, 3)])
def test_gpu_real_shapes_bf16_conv_transpose(c_in, r):
    _check_convt(2, c_in, c_in // 2, 77, r, 2, snake=True, state=True, dtype=torch.bfloat16)
    _check_convt(2, 1024, 1024, 77, 2, 1, dtype=torch.bfloat16)


def _spy_split_k(monkeypatch):
    """Record the split-K factors the GEMM launches choose (the streaming path: small tile + splitk_reduce_kernel
    when the split is > 1)."""
    from omni_fast.kernels import code2wav as kernels

    splits, choose = [], kernels._choose_split_k

    def spy(*args):
        splits.append(choose(*args))
        return splits[-1]

    monkeypatch.setattr(kernels, "_choose_split_k", spy)
    return splits


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4, 20])
@pytest.mark.parametrize("c_in,c_out,k,d,snake,residual", [
    (768, 768, 7, 1, True, True),  # dense k7, SnakeBeta in and a residual out
    (384, 384, 7, 9, True, False),  # a residual unit's dilated k7
    (1024, 1536, 7, 1, False, False),  # decoder.0
    (768, 768, 1, 1, True, True),  # a residual unit's k1
])
def test_gpu_streaming_chunks_bf16_conv_split_k(monkeypatch, T, c_in, c_out, k, d, snake, residual):
    """Streaming-sized chunks (n_cols <= 32: the fixed small tile, split-K partials and splitk_reduce_kernel) at
    the real shapes in bf16, with a carried state, batch 1 and 4."""
    splits = _spy_split_k(monkeypatch)
    for B in (1, 4):
        _check_conv(B, c_in, c_out, T, k, d=d, snake=snake, residual=residual, state=True, dtype=torch.bfloat16)
    assert max(splits) > 1  # the split-K path ran


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4, 20])
@pytest.mark.parametrize("c_in,r", [(1536, 8), (768, 5), (384, 4), (192, 3)])
def test_gpu_streaming_chunks_bf16_conv_transpose_split_k(monkeypatch, T, c_in, r):
    splits = _spy_split_k(monkeypatch)
    _check_convt(1, c_in, c_in // 2, T, r, 2, snake=True, state=True, dtype=torch.bfloat16)
    _check_convt(1, 1024, 1024, T, 2, 1, dtype=torch.bfloat16)  # the x2 upsampler (k = s)
    assert max(splits) > 1


@pytest.mark.gpu
def test_gpu_long_decode_channel_offsets_past_2_31():
    """A one-shot decode of ~15 min has ``C * T > 2^31`` in the last decoder block (96 channels x 22.4 M samples):
    the kernels' channel offsets are 64-bit. The tail of each output is checked against the reference continued
    from a state (causal: the tail depends on the last inputs only). ~13 GB of GPU memory."""
    from omni_fast.models.code2wav import pack_conv1d_weight, pack_conv_transpose1d_weight

    dt, tail = torch.bfloat16, 1000
    C = 96
    T = (1 << 31) // C + 4096
    x = torch.randn(1, C, T, device=DEVICE, dtype=dt)
    w = (torch.randn(C, C, 7, device=DEVICE) / (7 * C) ** 0.5).to(dt)
    b = torch.randn(C, device=DEVICE).to(dt)
    snake = _snake_params(C, dt)
    y, _ = omni_fast.ops.causal_conv1d(x, pack_conv1d_weight(w), b, dilation=9, snake=snake, residual=x,
                                       backend="triton")
    ctx = 6 * 9
    kw = dict(dilation=9, snake=snake, residual=x[..., -tail:], state=x[..., -tail - ctx:-tail])
    same, _ = ref.causal_conv1d(x[..., -tail:], w, b, **kw)
    exact, _ = ref.causal_conv1d(x[..., -tail:].double(), w.double(), b.double(),
                                 **{k: _dbl(v) for k, v in kw.items()})
    assert_matches_reference(y[..., -tail:], exact, same, name="k7 d9 tail")
    del y
    r, L = 3, T // 3 + 1  # the block's transposed conv: 192 -> 96 channels, x3
    xt = torch.randn(1, 2 * C, L, device=DEVICE, dtype=dt)
    wt = (torch.randn(2 * C, C, 2 * r, device=DEVICE) / (2 * C) ** 0.5).to(dt)
    st = torch.randn(1, 2 * C, 1, device=DEVICE, dtype=dt)
    yt, _ = omni_fast.ops.causal_conv_transpose1d(xt, pack_conv_transpose1d_weight(wt), b, stride=r, state=st,
                                                  backend="triton")
    assert yt.shape[-1] * C > 1 << 31
    nb = tail // r
    same, _ = ref.causal_conv_transpose1d(xt[..., -nb:], wt, b, stride=r, state=xt[..., -nb - 1:-nb])
    exact, _ = ref.causal_conv_transpose1d(xt[..., -nb:].double(), wt.double(), b.double(), stride=r,
                                           state=xt[..., -nb - 1:-nb].double())
    assert_matches_reference(yt[..., -nb * r:], exact, same, name="transposed tail")


def _real_hf_model():
    """transformers' Code2Wav with the real config and random weights (fp32; ~0.8 GB). The output conv is scaled
    so the waveform stays mostly inside the clamp (mean |wav| ~0.13 on 6 frames, nothing clipped)."""
    torch.manual_seed(0)
    hf = _randomize(q3.Qwen3OmniMoeCode2Wav(Qwen3OmniMoeCode2WavConfig()).eval())
    with torch.no_grad():
        hf.decoder[-1].conv.weight.mul_(0.004)
    return hf.to(DEVICE)


@pytest.mark.gpu
def test_gpu_real_config_one_frame_pushes_bf16(monkeypatch):
    """The real config (random weights) in bf16 on the Triton backend: 1-frame pushes (split-K convs, the
    1-query attention) equal the one-shot decode and transformers within bf16 error, also with a row reset
    mid-stream."""
    hf = _real_hf_model()
    codes = torch.randint(0, 2048, (2, 16, 8), device=DEVICE)
    with torch.no_grad():
        exact, alone_exact = hf(codes), hf(codes[1:, :, 3:])  # row 1 restarts at frame 3 below
        assert 0.02 < exact.abs().mean() < 0.5
        hf = hf.to(torch.bfloat16)
        want, alone = hf(codes), hf(codes[1:, :, 3:])
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    splits = _spy_split_k(monkeypatch)
    one_shot = model(codes)
    assert_matches_reference(one_shot, exact, want, factor=3.0, name="one-shot")
    streamed = _stream(model, codes, [1] * 8)
    assert max(splits) > 1
    assert_matches_reference(streamed, exact, want, factor=3.0, name="1-frame pushes")
    wav, starts = _run_with_resets(model, codes, [(1, [])] * 3 + [(1, [1])] + [(1, [])] * 4)
    assert starts[1][1] == (3, model.num_samples(3) + 555)
    assert_matches_reference(wav[1:, :, starts[1][1][1]:], alone_exact, alone, factor=3.0, name="reset row")


@pytest.mark.gpu
def test_gpu_codes_out_of_range_checked_on_request():
    """On CUDA the code range is not checked by default (a host sync); check_values=True checks it."""
    _, model = _models(0)
    model = model.to(DEVICE)
    bad = torch.full((1, 4, 3), 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        model(bad, check_values=True)
    with pytest.raises(ValueError, match=r"codes must lie in"):
        model.stream(1).push(bad, check_values=True)


@pytest.mark.gpu
def test_gpu_model_bf16_one_shot_and_streamed():
    """bf16 on the GPU (Triton backend): one-shot and streamed errors vs the fp32 decode stay within a small factor
    of transformers' own bf16 error."""
    hf = _hf_model(0).to(DEVICE)
    codes = torch.randint(0, 16, (2, 4, 40), device=DEVICE)
    with torch.no_grad():
        exact = hf(codes)
        hf_bf16 = hf.to(torch.bfloat16)
        want = hf_bf16(codes)
    model = omni_fast.models.Code2Wav.from_transformers(hf_bf16, backend="triton")
    assert_matches_reference(model(codes), exact, want, factor=3.0, name="one-shot")
    assert_matches_reference(_stream(model, codes, [1, 5, 10, 24]), exact, want, factor=3.0, name="streamed")




@pytest.mark.gpu
def test_gpu_state_moves_equal_per_conv_copies_bf16():
    """The fast path code2wav_state_moves (conv states moved up to 8 per launch, kernels/code2wav_states.py) on the
    real config in bf16 with CUDA graphs (the default), 1- and 4-frame pushes and a row reset: bit-equal to the
    per-conv copies. And the op at the real shapes (B = 32, one-frame push contexts) equals the concatenation."""
    from omni_fast import fast_paths

    hf = _real_hf_model().to(torch.bfloat16)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    codes = torch.randint(0, 2048, (2, 16, 13), device=DEVICE)
    schedule = [(1, []), (1, []), (4, []), (1, [1]), (4, []), (1, []), (1, [])]
    outs = []
    for on in (False, True):
        with fast_paths.enable("code2wav_state_moves", on):
            stream = model.stream(2)
        assert stream.cuda_graphs and stream._move_states is on
        outs.append(_run_with_resets(model, codes, schedule, stream=stream)[0])
    assert torch.equal(outs[0], outs[1])
    # (C, ctx, T): upsampler dwconvs, decoder.0, block 1's transposed conv and residual units, the output conv
    shapes = [(1024, 6, 2), (1024, 6, 4), (1024, 6, 4), (1536, 1, 4), (768, 6, 32), (768, 18, 32), (768, 54, 32),
              (96, 6, 1920)]
    states = [torch.randn(32, c, ctx, device=DEVICE, dtype=torch.bfloat16) for c, ctx, _ in shapes]
    inputs = [torch.randn(32, c, t, device=DEVICE, dtype=torch.bfloat16) for c, _, t in shapes]
    want = [torch.cat((s, x), -1)[..., x.shape[-1]:] for s, x in zip(states, inputs)]
    omni_fast.ops.update_conv_states(states, inputs, backend="triton")
    assert all(torch.equal(s, w) for s, w in zip(states, want))
