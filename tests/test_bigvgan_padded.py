"""Qwen2.5-Omni BigVGAN on a padded batch with device-side lengths (:mod:`omni_fast.models.bigvgan_padded`, the
form that can run inside the DiT solve's graph) against transformers' vocoder on each unpadded row, and the
length-aware anti-aliased activation (``ops.anti_aliased_snake(seq_lens=...)``) against the unpadded op."""

import pytest
import torch

pytest.importorskip("transformers")

import omni_fast  # noqa: E402
from omni_fast.models import bigvgan_padded  # noqa: E402
from omni_fast.reference import bigvgan as ref  # noqa: E402

FILTERS = ref.resample_filters(2, 12)


@pytest.mark.parametrize("lens", [(9, 4), (1, 9), (5,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_anti_aliased_snake_seq_lens_equals_the_unpadded_signal(lens, dtype):
    """Rows < seq_lens[b] equal the op on the unpadded row (replicate padding from the real end), zeros after."""
    B, C, T = len(lens), 5, 9
    g = torch.Generator().manual_seed(sum(lens))
    x = torch.randn(B, C, T, generator=g).to(dtype)
    alpha, beta = (torch.randn(C, generator=g).mul(0.3).to(dtype) for _ in range(2))
    n = torch.tensor(lens, dtype=torch.int32)
    for backend in ("triton", "reference"):
        got = omni_fast.ops.anti_aliased_snake(x, alpha, beta, *FILTERS, seq_lens=n, backend=backend)
        for b, L in enumerate(lens):
            want = omni_fast.ops.anti_aliased_snake(x[b:b + 1, :, :L].contiguous(), alpha, beta, *FILTERS,
                                                    backend=backend)
            torch.testing.assert_close(got[b:b + 1, :, :L], want, atol=1e-6 if dtype == torch.float32 else 1e-3,
                                       rtol=1e-5)
            assert not got[b, :, L:].any()
    with pytest.raises((TypeError, ValueError), match="seq_lens"):
        omni_fast.ops.anti_aliased_snake(x, alpha, beta, *FILTERS, seq_lens=n.float())


def _bigvgan(small=False):
    """The tiny preset's BigVGAN (the real 6 upsamplers, 5-3-2-2-2-2), or (small) a 2-upsampler one with one AMP
    block (3 dilations) per scale: the Triton path on the interpreter runs ~40 launches instead of ~170."""
    from omni_fast.models.presets import tiny_qwen2_5_omni_config
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniBigVGANConfig

    cfg = tiny_qwen2_5_omni_config().token2wav_config.bigvgan_config
    if small:
        cfg = Qwen2_5OmniBigVGANConfig(mel_dim=cfg.mel_dim, upsample_initial_channel=16, resblock_kernel_sizes=[3],
                                       resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[5, 2],
                                       upsample_kernel_sizes=[11, 4])
    torch.manual_seed(0)
    model = q25.Qwen2_5OmniToken2WavBigVGANModel._from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # N(0, 0.05) (a waveform inside the [-1, 1] clamp); SnakeBeta away from its init
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.endswith(("alpha", "beta")) else 0.05))
    return model


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_padded_vocoder_equals_transformers_per_row(backend):
    """Batch 2 on a 6-frame bucket (real 6 and 3 frames, garbage in the padding): every real sample equals
    transformers' BigVGAN on the unpadded row. (Triton: the small vocoder, for the interpreter's sake.)"""
    model = _bigvgan(small=backend == "triton")
    assert bigvgan_padded.supported(model)
    g = torch.Generator().manual_seed(2)
    lens = (6, 3)
    mel = torch.randn(2, model.config.mel_dim, 6, generator=g) - 3
    per = bigvgan_padded.samples_per_frame(model)
    with torch.no_grad():
        got = bigvgan_padded.vocode(model, mel, torch.tensor(lens), backend=backend)
        assert got.shape == (2, 6 * per)
        for b, L in enumerate(lens):
            want = model(mel[b:b + 1, :, :L])
            assert 1e-3 < want.abs().max() < 1  # a real waveform, not clamped
            torch.testing.assert_close(got[b, :L * per], want, atol=2e-6, rtol=1e-4)


def test_unsupported_variant_is_refused():
    model = _bigvgan()
    model.activation_post.act = torch.nn.Identity()
    with pytest.raises(ValueError, match="BigVGAN"):
        bigvgan_padded.vocode(model, torch.zeros(1, model.config.mel_dim, 4), torch.tensor([4]))


def _token2wav(device="cpu"):
    from omni_fast.models.presets import tiny_qwen2_5_omni_config
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25

    cfg = tiny_qwen2_5_omni_config().token2wav_config
    torch.manual_seed(0)
    t2w = q25.Qwen2_5OmniToken2WavModel._from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # N(0, 0.05): the waveform stays inside BigVGAN's [-1, 1] clamp (not saturated)
        for name, p in t2w.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return t2w.to(device)


def _synth_inputs(t2w, codes, device="cpu"):
    dc = t2w.config.dit_config
    g = torch.Generator().manual_seed(codes)
    code = torch.randint(0, 290, (1, codes), generator=g)
    return (code.to(device), torch.randn(1, dc.enc_emb_dim, generator=g).to(device),
            torch.randn(1, 10, dc.mel_dim, generator=g).to(device))


def test_solve_and_vocoder_in_one_graph_equal_transformers_token2wav():
    """``dit_solve.synthesize`` (DiT solve + padded BigVGAN in one per-bucket graph, emulated on the CPU) against
    transformers' ``Qwen2_5OmniToken2WavModel.forward``: two code lengths sharing one bucket (the vocoder sees the
    padding), the same noise for a seed."""
    from omni_fast.models import dit_solve

    t2w = _token2wav()
    dit, voc = t2w.code2wav_dit_model, t2w.code2wav_bigvgan_model
    for codes in (5, 3):
        code, cond, ref_mel = _synth_inputs(t2w, codes)
        torch.manual_seed(11)
        with torch.no_grad():
            want = t2w(code, cond, ref_mel, num_steps=2)
        torch.manual_seed(11)
        with torch.no_grad():
            got = dit_solve.synthesize(dit, voc, cond, ref_mel, code, num_steps=2, buckets=(8,), backend="reference")
        assert got.shape == (1, want.numel()) and 1e-3 < want.abs().max() < 1
        torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)  # fp32; the DiT solve's tolerance
    graphs = [k for k in dit.__dict__[dit_solve._CACHE + "_wave"] if k != "weights"]
    assert len(graphs) == 1  # one graph for both lengths


@pytest.mark.gpu
def test_solve_and_vocoder_graph_on_cuda():
    """Real capture of the DiT solve + padded vocoder: equals transformers' Token2Wav forward."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from omni_fast.models import dit_solve

    t2w = _token2wav("cuda")
    for codes in (5, 3):
        code, cond, ref_mel = _synth_inputs(t2w, codes, "cuda")
        torch.manual_seed(11)
        with torch.no_grad():
            want = t2w(code, cond, ref_mel, num_steps=3)
        torch.manual_seed(11)
        with torch.no_grad():
            got = dit_solve.synthesize(t2w.code2wav_dit_model, t2w.code2wav_bigvgan_model, cond, ref_mel, code,
                                       num_steps=3, buckets=(8,))
        torch.testing.assert_close(got[0].cpu(), want, atol=1e-3, rtol=1e-3)  # TF32 / cuDNN paths
