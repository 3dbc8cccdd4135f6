"""``omni_fast.patch`` on a tiny random transformers Qwen2.5-Omni: the Token2Wav pieces it swaps in (BigVGAN's
anti-aliased activations and AMP-block convs) against the unpatched model, and ``unpatch``."""

import pytest
import torch

pytest.importorskip("transformers")

import omni_fast  # noqa: E402
from omni_fast.integrations import token2wav_synth  # noqa: E402
from omni_fast.models.presets import tiny_qwen2_5_omni_config  # noqa: E402
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25  # noqa: E402


@pytest.fixture(scope="module")
def model():
    config = tiny_qwen2_5_omni_config()
    # BigVGAN cut to the real vocoder's first two upsampling stages (rates 5, 3; kernels 11, 7) with all of its AMP
    # blocks (resblock kernels 3 / 7 / 11 x dilations 1 / 3 / 5, 18 anti-aliased activations per stage, + the final
    # one): every module class patch() swaps, every conv shape / dilation / residual the swapped AMP forward passes,
    # and a signal longer than one interpreter tile (90 samples at stage 2). The last four stages (rate 2, kernel 4)
    # repeat the same pieces on longer signals: ~90% of the interpreter launches' work for no new code path (the
    # kernels themselves on odd shapes: test_bigvgan.py; the six-stage vocoder: test_bigvgan_padded.py).
    big = config.token2wav_config.bigvgan_config
    big.upsample_rates, big.upsample_kernel_sizes = [5, 3], [11, 7]
    torch.manual_seed(0)
    m = q25.Qwen2_5OmniForConditionalGeneration._from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # N(0, 0.05): the waveform stays inside BigVGAN's [-1, 1] clamp (not saturated)
        for name, p in m.token2wav.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _token2wav(m, codes=3, steps=2, forward=None):
    """``forward`` (default: the model's Token2Wav forward, DiT ODE solve + BigVGAN) on fixed random inputs, the same
    noise each call."""
    dit = m.config.token2wav_config.dit_config
    g = torch.Generator().manual_seed(1)
    code = torch.randint(0, 290, (1, codes), generator=g)
    cond = torch.randn(1, dit.enc_emb_dim, generator=g)
    ref_mel = torch.randn(1, 10, dit.mel_dim, generator=g)
    torch.manual_seed(123)  # the ODE's initial noise (torch.randn inside sample)
    with torch.no_grad():
        return (forward or m.token2wav)(code, cond, ref_mel, num_steps=steps)


def test_token2wav_pieces_are_opt_in(model):
    """Until a GPU run passes, patch() reports the Token2Wav pieces as left (opt-in) and swaps nothing."""
    report = omni_fast.patch(model)
    try:
        assert any("Qwen2_5OmniAntiAliasedActivation1d" in r and "opt-in" in r for r in report.left)
        assert not any("Qwen2_5Omni" in r and "BigVGAN" in r for r in report.replaced)
        assert not any("forward" in m.__dict__ for m in model.token2wav.modules()
                       if type(m).__name__ in ("Qwen2_5OmniAntiAliasedActivation1d", "Qwen2_5OmniAMPBlock"))
    finally:
        omni_fast.unpatch(model)


def test_patch_swaps_bigvgan_activations_and_unpatch_restores(model, fast_path):
    fast_path("token2wav")  # OMNI_FAST_TOKEN2WAV=1
    want = _token2wav(model)
    assert 0 < want.abs().max() < 1  # not clamped: a real comparison
    acts = [mod for mod in model.modules() if type(mod).__name__ == "Qwen2_5OmniAntiAliasedActivation1d"]
    report = omni_fast.patch(model, backend="triton")
    try:
        line = [r for r in report.replaced if "AntiAliasedActivation1d" in r]
        assert line and f"(x{len(acts)})" in line[0] and line[0].startswith("[code2wav]")
        assert all("forward" in a.__dict__ for a in acts)
        blocks = [r for r in report.replaced if "Qwen2_5OmniAMPBlock" in r]
        assert blocks and "omni_fast.ops.padded_conv1d" in blocks[0]
        assert any(r.startswith("[code2wav] DiTAttention") for r in report.replaced)
        assert any("sample: the whole RK4 ODE solve" in r for r in report.replaced)
        assert "sample" in model.token2wav.code2wav_dit_model.__dict__
        assert any(r.startswith("[code2wav] Qwen2_5OmniToken2WavModel.forward") for r in report.replaced)
        # the pieces as transformers' forward reaches them (what the swapped forward falls back to); the swapped
        # forward itself (dit_solve.synthesize): tests/test_token2wav_forward.py. Buckets (4,): the 3 codes' solve
        # on one padded 24-frame attention block (the default smallest bucket, 16 codes, rounds up to 48 frames:
        # twice the interpreter work, same code path; the default buckets: test_dit.py[13])
        token2wav_synth.set_code_buckets(model.token2wav, (4,))
        got = _token2wav(model, forward=model.token2wav._omni_fast_forward)
    finally:
        omni_fast.unpatch(model)
    # fp32 end to end; the fused ops sum the same terms in another order (fp32 rounding, ~1e-7 relative per op),
    # through the DiT's RK4 steps and the vocoder's 2 upsampling stages x 18 AMP activations: measured max |diff|
    # 1.2e-7 on a waveform of max |x| 0.45 (2.7e-7 relative; the six-stage vocoder: 2.3e-9 on a peak of 6.2e-3).
    # The bound is 1e-6 absolute (2.2e-6 of the peak): 8x the measured error, far below any audible difference, and
    # it catches a wrong tap or a wrong mask (a replicate-padding edge off by one: 4e-3; one AMP block's two
    # activations swapped: 1.5e-2).
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not any("forward" in a.__dict__ for a in acts) and "forward" not in model.token2wav.__dict__
    assert "sample" not in model.token2wav.code2wav_dit_model.__dict__
    assert torch.equal(_token2wav(model), want)  # unpatched again: transformers' own numbers, bit for bit


def test_unsupported_activation_variant_is_left_and_reported(fast_path):
    fast_path("token2wav")
    act = q25.Qwen2_5OmniAntiAliasedActivation1d(torch.nn.Tanh())  # not SnakeBeta: the fused op does not apply
    holder = torch.nn.Module()
    holder.token2wav = torch.nn.Module()
    holder.token2wav.act = act
    report = omni_fast.patch(holder)
    try:
        assert any("unsupported variant" in r for r in report.left)
        assert "forward" not in act.__dict__
    finally:
        omni_fast.unpatch(holder)
