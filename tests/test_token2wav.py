"""``omni_fast.patch`` on a tiny random transformers Qwen2.5-Omni: the Token2Wav pieces it swaps in (BigVGAN's
anti-aliased activations and AMP-block convs) against the unpatched model, and ``unpatch``."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))

import omni_fast  # noqa: E402
from omni_fast.integrations import token2wav_synth  # noqa: E402
from omni_fast.models.presets import tiny_qwen2_5_omni_config  # noqa: E402
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return _build()


def _build():
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


@pytest.mark.parametrize("offload", ["all", "some"])
def test_offloaded_token2wav_runs_transformers_pieces(fast_path, offload, monkeypatch):
    """A Token2Wav that accelerate's device_map offloaded (CPU / disk: each submodule's weights on meta outside its
    own hooked forward, which loads them for that forward only). The patched pieces that read weights of their
    submodules directly would read meta tensors: the DiT's ``sample`` (its solve graph fuses and reads every
    weight), the BigVGAN anti-aliased activations (SnakeBeta's alpha / beta) and AMP blocks (the convs' weights),
    and the whole-forward graph when only some submodules are offloaded (its refusal looked at the first weight of
    the DiT and of the vocoder only). Each now runs transformers' forward while its weights are on meta (the
    pieces that call their submodules, DiTAttention and the AdaLN norms, run patched: the hooks load those
    weights): the unpatched waveform. ``all``: the whole Token2Wav offloaded; ``some``: the DiT's layers and the
    vocoder's AMP blocks only."""
    from test_patch_hooks import _offload

    fast_path("token2wav")
    m = _build()
    want = _token2wav(m)
    t2w = m.token2wav
    for part in ([t2w] if offload == "all" else [t2w.code2wav_dit_model.transformer_blocks,
                                                  t2w.code2wav_bigvgan_model.resblocks]):
        _offload(part)
    assert any(p.is_meta for p in t2w.parameters())
    torch.testing.assert_close(_token2wav(m), want, atol=0, rtol=0)  # (the offload as accelerate runs it)
    calls = {}
    for name in ("block_attention", "ada_layer_norm", "anti_aliased_snake", "padded_conv1d"):
        op = getattr(omni_fast.ops, name)
        monkeypatch.setattr(omni_fast.ops, name, lambda *a, _op=op, _n=name, **k: (
            calls.__setitem__(_n, calls.get(_n, 0) + 1), _op(*a, **k))[1])
    report = omni_fast.patch(m, backend="reference")
    try:
        assert any("AntiAliasedActivation1d" in r for r in report.replaced)
        got = _token2wav(m)
        reason = t2w.__dict__[token2wav_synth.FALLBACK_ATTR]
    finally:
        omni_fast.unpatch(m)
    assert "device_map" in reason or "devices" in reason, reason
    # every AMP block's convs offloaded: no fused conv; the activations fused only where not offloaded (``some``:
    # the final one); the DiT's attention and AdaLN patched (their submodules' hooks load the weights)
    snakes = 0 if offload == "all" else 1
    assert calls.get("padded_conv1d", 0) == 0 and calls.get("anti_aliased_snake", 0) == snakes, calls
    assert calls["block_attention"] and calls["ada_layer_norm"], calls
    # DiTAttention / AdaLN patched: the fused ops sum in another order (the bound of the test above)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
