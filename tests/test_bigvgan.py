"""BigVGAN (Qwen2.5-Omni Token2Wav vocoder): the anti-aliased SnakeBeta reference against transformers' modules, the
fused Triton kernel against the reference (interpreter on a CPU), bad input."""

import pytest
import torch

pytest.importorskip("transformers")

import omni_fast  # noqa: E402
from omni_fast.kernels import bigvgan as kernels  # noqa: E402
from omni_fast.reference import bigvgan as ref  # noqa: E402
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25  # noqa: E402

FILTERS = ref.resample_filters()


def _hf_activation(channels: int, seed: int = 0):
    act = q25.Qwen2_5OmniAntiAliasedActivation1d(q25.Qwen2_5OmniSnakeBeta(channels))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # transformers initialises alpha = beta = 0 (log space): randomise them
        act.act.alpha.copy_(0.5 * torch.randn(channels, generator=g))
        act.act.beta.copy_(0.5 * torch.randn(channels, generator=g))
    return act


def test_filters_are_transformers_filters():
    act = _hf_activation(2)
    assert torch.equal(FILTERS[0], act.upsample.filter.reshape(-1))
    assert torch.equal(FILTERS[1], act.downsample.filter.reshape(-1))


@pytest.mark.parametrize("B,C,T", [(1, 1, 1), (2, 3, 2), (3, 5, 7), (2, 4, 33), (1, 6, 128)])
def test_reference_matches_transformers_activation(B, C, T):
    act = _hf_activation(C, seed=T)
    x = torch.randn(B, C, T, generator=torch.Generator().manual_seed(T))
    want = act(x)
    got = ref.anti_aliased_snake(x, act.act.alpha, act.act.beta, *FILTERS)
    assert got.shape == want.shape == (B, C, T)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_reference_amp_block_matches_transformers():
    C, T = 4, 19
    torch.manual_seed(0)
    block = q25.Qwen2_5OmniAMPBlock(C, 3, (1, 3, 5))
    with torch.no_grad():
        for act in block.activations:
            act.act.alpha.normal_(0, 0.5)
            act.act.beta.normal_(0, 0.5)
    x = torch.randn(2, C, T)
    convs1 = [(c.weight, c.bias, c.dilation[0]) for c in block.convs1]
    convs2 = [(c.weight, c.bias, c.dilation[0]) for c in block.convs2]
    acts = [(a.act.alpha, a.act.beta) for a in block.activations]
    with torch.no_grad():
        torch.testing.assert_close(ref.amp_block(x, convs1, convs2, acts, *FILTERS), block(x), atol=1e-5, rtol=1e-5)


@pytest.mark.hf_free
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 2e-3)])
# (1, 33, 70): the largest tile's masked channel and time tails (33 > 32, 70 > 64) and several tiles per row in
# both tiles; it was (2, 40, 130): 3.5x the interpreter programs, the same branches (batch > 1: (2, 19, 37))
@pytest.mark.parametrize("B,C,T", [(1, 1, 1), (3, 5, 2), (2, 19, 37), (1, 33, 70)])
def test_kernel_matches_reference(B, C, T, dtype, tol):
    g = torch.Generator().manual_seed(B * 100 + T)
    x = torch.randn(B, C, T, generator=g).to(dtype)
    alpha, beta = (0.5 * torch.randn(C, generator=g)).to(dtype), (0.5 * torch.randn(C, generator=g)).to(dtype)
    want = ref.anti_aliased_snake(x, alpha, beta, *FILTERS)
    for tile in ((16, 16), (32, 64)):  # several tiles per row / one tile
        got = kernels.anti_aliased_snake(x, alpha, beta, *FILTERS, 2, tile=tile)
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.hf_free
def test_op_dispatch_strided_input_and_empty():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 9, 40, generator=g)
    x = base[:, ::2, 3:28]  # channel and time strides
    alpha, beta = 0.3 * torch.randn(5, generator=g), 0.3 * torch.randn(5, generator=g)
    want = ref.anti_aliased_snake(x, alpha, beta, *FILTERS)
    for backend in ("triton", "reference"):
        got = omni_fast.ops.anti_aliased_snake(x, alpha, beta, FILTERS[0].view(1, 1, -1), FILTERS[1],
                                               backend=backend)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    empty = omni_fast.ops.anti_aliased_snake(x[..., :0], alpha, beta, *FILTERS, backend="triton")
    assert empty.shape == (2, 5, 0)


@pytest.mark.hf_free
def test_bad_input_names_the_argument():
    x, a = torch.randn(1, 3, 8), torch.zeros(3)
    op = omni_fast.ops.anti_aliased_snake
    with pytest.raises(ValueError, match="alpha"):
        op(x, torch.zeros(4), a, *FILTERS)
    with pytest.raises(TypeError, match="x"):
        op(x.long(), a, a, *FILTERS)
    with pytest.raises(TypeError, match="up_filter"):
        op(x, a, a, FILTERS[0].double(), FILTERS[1])
    with pytest.raises(ValueError, match="up_filter has 11 taps"):
        op(x, a, a, FILTERS[0][:11], FILTERS[1])
    with pytest.raises(ValueError, match="ratio"):
        op(x, a, a, *FILTERS, ratio=0)


@pytest.mark.hf_free
@pytest.mark.parametrize("B,ci,co,T,k,dil,groups", [(2, 5, 7, 13, 3, 1, 1), (1, 8, 8, 9, 7, 3, 1),
                                                     (2, 6, 6, 11, 3, 5, 6), (1, 4, 4, 1, 11, 1, 1)])
def test_same_padded_conv_on_the_code2wav_kernels(B, ci, co, T, k, dil, groups):
    """BigVGAN's convs (nn.Conv1d, padding = dil * (k - 1) / 2) on the Code2Wav kernels with non-causal padding:
    dense and depthwise, dilated, one sample, with and without the fused residual."""
    g = torch.Generator().manual_seed(T * k)
    conv = torch.nn.Conv1d(ci, co, k, dilation=dil, padding=dil * (k - 1) // 2, groups=groups)
    x = torch.randn(B, ci, T, generator=g)
    with torch.no_grad():
        want = conv(x)
        res = torch.randn(want.shape, generator=g)
        for backend in ("triton", "reference"):
            got = omni_fast.ops.padded_conv1d(x, conv.weight, conv.bias, padding=conv.padding[0], dilation=dil,
                                       groups=groups, backend=backend)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            got = omni_fast.ops.padded_conv1d(x, conv.weight, conv.bias, padding=conv.padding[0], dilation=dil,
                                       groups=groups, residual=res, backend=backend)
            torch.testing.assert_close(got, want + res, atol=1e-5, rtol=1e-5)


@pytest.mark.hf_free
def test_conv1d_bad_input():
    x, w = torch.randn(1, 4, 9), torch.randn(5, 4, 3)
    with pytest.raises(ValueError, match="padding"):
        omni_fast.ops.padded_conv1d(x, w, padding=-1)
    with pytest.raises(ValueError, match="channel mismatch"):
        omni_fast.ops.padded_conv1d(x, torch.randn(5, 3, 3), padding=1)
    with pytest.raises(ValueError, match="residual"):
        omni_fast.ops.padded_conv1d(x, w, padding=1, residual=torch.zeros(1, 5, 8))
