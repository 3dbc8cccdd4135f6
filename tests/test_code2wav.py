"""Code2Wav: the reference vs transformers (SnakeBeta, causal convs, residual units, ConvNeXt, pre-transformer,
the whole model, streaming states). Also: test_code2wav_ops.py (kernels vs reference), test_code2wav_stream.py
(the model one-shot and streamed, bad input), test_code2wav_gpu.py (bf16, real shapes), test_code2wav_graphs.py
(CUDA-graph readiness)."""

import pytest
import torch

import omni_fast.models  # noqa: F401  (not imported by omni_fast itself)
from omni_fast.reference import code2wav as ref

transformers = pytest.importorskip("transformers")

from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402

from _code2wav_helpers import LAYOUTS, _hf_model, _randomize  # noqa: E402


# --- reference vs transformers -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_snake_beta_matches_transformers(dtype):
    m = _randomize(q3.Qwen3OmniMoeSnakeBeta(6)).to(dtype)
    x = torch.randn(2, 6, 11, dtype=dtype) * 3
    torch.testing.assert_close(ref.snake_beta(x, m.alpha, m.beta), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("k,d,s,groups", [(7, 1, 1, 1), (7, 3, 1, 1), (7, 9, 1, 1), (1, 1, 1, 1), (7, 1, 1, 6),
                                          (4, 1, 2, 1), (5, 2, 3, 2)])
@pytest.mark.parametrize("T", [1, 2, 13])
def test_reference_causal_conv_matches_transformers(k, d, s, groups, T):
    m = _randomize(q3.Qwen3OmniMoeCausalConvNet(6, 6 if groups > 1 else 5, k, dilation=d, stride=s, groups=groups))
    x = torch.randn(2, 6, T)
    y, _ = ref.causal_conv1d(x, m.conv.weight, m.conv.bias, stride=s, dilation=d, groups=groups)
    torch.testing.assert_close(y, m(x), rtol=0, atol=0)


@pytest.mark.parametrize("k,s", [(2, 2), (3, 3), (4, 2), (6, 3), (16, 8), (10, 5)])
@pytest.mark.parametrize("T", [1, 2, 9])
def test_reference_causal_transconv_matches_transformers(k, s, T):
    m = _randomize(q3.Qwen3OmniMoeCausalTransConvNet(6, 5, k, s))
    x = torch.randn(2, 6, T)
    y, st = ref.causal_conv_transpose1d(x, m.conv.weight, m.conv.bias, stride=s)
    torch.testing.assert_close(y, m(x), rtol=0, atol=0)
    assert st.shape == (2, 6, k // s - 1)


@pytest.mark.parametrize("d", [1, 3, 9])
def test_reference_residual_unit_matches_transformers(d):
    m = _randomize(q3.Qwen3OmniMoeCode2WavDecoderResidualUnit(6, d))
    x = torch.randn(2, 6, 17)
    y, _ = ref.causal_conv1d(x, m.conv1.conv.weight, m.conv1.conv.bias, dilation=d, snake=(m.act1.alpha, m.act1.beta))
    y, _ = ref.causal_conv1d(y, m.conv2.conv.weight, m.conv2.conv.bias, snake=(m.act2.alpha, m.act2.beta), residual=x)
    torch.testing.assert_close(y, m(x), rtol=0, atol=0)


def test_reference_convnext_matches_transformers():
    m = _randomize(q3.Qwen3OmniMoeConvNeXtBlock(8))
    x = torch.randn(2, 8, 10)
    dw, _ = ref.causal_conv1d(x, m.dwconv.conv.weight, m.dwconv.conv.bias, groups=8)
    sd = {"blk." + k: v for k, v in m.state_dict().items()}
    torch.testing.assert_close(ref.convnext_pointwise(sd, "blk.", x, dw), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
@pytest.mark.parametrize("T", [1, 4, 13])
def test_reference_code2wav_matches_transformers(layout, T):
    m = _hf_model(layout)
    cfg = ref.Code2WavConfig.from_transformers(m.config)
    codes = torch.randint(0, cfg.codebook_size, (2, cfg.num_quantizers, T))
    with torch.no_grad():
        want = m(codes)
        got = ref.code2wav_forward(cfg, m.state_dict(), codes)
    assert got.shape == want.shape == (2, 1, cfg.num_samples(T))
    assert 0.01 < want.abs().mean() < 0.9  # neither silent nor saturated by the clamp
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)


def test_reference_pre_transformer_matches_transformers_hidden_states():
    m = _hf_model(0)
    cfg = ref.Code2WavConfig.from_transformers(m.config)
    emb = torch.randn(2, 11, cfg.hidden_size)
    with torch.no_grad():
        want = m.pre_transformer(inputs_embeds=emb).last_hidden_state
        sd = m.state_dict()
        pos = torch.arange(11)
        cos, sin = ref.rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, emb.dtype)
        mask = ref.sliding_window_mask(pos, pos, cfg.sliding_window, emb.dtype)
        h = emb
        for i in range(cfg.num_hidden_layers):
            h, _ = ref.pre_transformer_layer(cfg, sd, f"pre_transformer.layers.{i}.", h, cos, sin, mask)
        h = ref._rms_norm(h, sd["pre_transformer.norm.weight"], cfg.rms_norm_eps)
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,d", [(7, 1), (7, 3), (1, 1)])
def test_reference_conv_state_continues_exactly(k, d):
    w, b = torch.randn(5, 6, k), torch.randn(5)
    snake = (torch.randn(6) * 0.3, torch.randn(6) * 0.3)
    x = torch.randn(2, 6, 23)
    whole, _ = ref.causal_conv1d(x, w, b, dilation=d, snake=snake)
    state, parts = None, []
    for a, e in ((0, 1), (1, 8), (8, 8), (8, 23)):
        y, state = ref.causal_conv1d(x[..., a:e], w, b, dilation=d, snake=snake, state=state)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, -1), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k,s", [(2, 2), (4, 2), (10, 5)])
def test_reference_transconv_state_continues_exactly(k, s):
    w, b = torch.randn(6, 5, k), torch.randn(5)
    x = torch.randn(2, 6, 17)
    whole, _ = ref.causal_conv_transpose1d(x, w, b, stride=s)
    y0, state = ref.causal_conv_transpose1d(x[..., :3], w, b, stride=s)
    parts = [y0]
    for a, e in ((3, 4), (4, 4), (4, 17)):
        y, state = ref.causal_conv_transpose1d(x[..., a:e], w, b, stride=s, state=state)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, -1), whole, rtol=1e-6, atol=1e-6)


