"""Code2Wav: reference vs transformers, kernels vs reference, exact streaming, bad input."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omni_fast
import omni_fast.models  # noqa: F401  (not imported by omni_fast itself)
from omni_fast.reference import code2wav as ref
from omni_fast.testing import DEVICE, KERNEL_DTYPES, assert_matches_reference

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig  # noqa: E402

# Tiny configs with different upsample layouts (the real one is ratios (2, 2), rates (8, 5, 4, 3)).
LAYOUTS = [
    dict(upsampling_ratios=[2], upsample_rates=[2, 3]),
    dict(upsampling_ratios=[2, 2], upsample_rates=[3]),
    dict(upsampling_ratios=[3], upsample_rates=[4, 2]),
]


def _hf_config(layout=0, **over):
    kw = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, num_hidden_layers=2,
              codebook_size=16, num_quantizers=4, decoder_dim=32, sliding_window=5, rms_norm_eps=1e-5)
    kw.update(LAYOUTS[layout])
    kw.update(over)
    return Qwen3OmniMoeCode2WavConfig(**kw)


def _randomize(module: torch.nn.Module, scale=0.3):
    """Random weights everywhere (transformers initialises SnakeBeta/LayerScale/gamma to trivial values)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.uniform_(-0.5, 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("gamma", "layer_scale.scale")):
                p.uniform_(0.2, 0.8)
            else:
                fan = p.shape[1] * (p.shape[2] if p.dim() == 3 else 1) if p.dim() > 1 else 4
                p.normal_(0, scale * (3.0 / fan) ** 0.5 * (2 if p.dim() > 1 else 1))
    return module


def _hf_model(layout=0, dtype=torch.float32, **over):
    m = _randomize(q3.Qwen3OmniMoeCode2Wav(_hf_config(layout, **over)).eval())
    with torch.no_grad():  # keep the waveform mostly inside the final clamp's [-1, 1]
        m.decoder[-1].conv.weight.mul_(0.05)
    return m.to(dtype)


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


# --- kernels vs reference ------------------------------------------------------------------------------------


def _snake_params(C, dtype):
    return (torch.randn(C, device=DEVICE) * 0.4).to(dtype), (torch.randn(C, device=DEVICE) * 0.4).to(dtype)


def _dbl(v):
    if v is None or isinstance(v, int):
        return v
    if isinstance(v, tuple):
        return tuple(t.double() for t in v)
    return v.double()


def _check_conv(B, c_in, c_out, T, k, d=1, s=1, groups=1, snake=False, residual=False, state=False,
                dtype=torch.float32, packed=True):
    x = torch.randn(B, c_in, T, device=DEVICE).to(dtype)
    w = (torch.randn(c_out, c_in // groups, k, device=DEVICE) * (1.0 / (c_in // groups * k)) ** 0.5).to(dtype)
    if packed and groups == 1:
        w = omni_fast.models.code2wav.pack_conv1d_weight(w)
    b = torch.randn(c_out, device=DEVICE).to(dtype)
    kw = dict(stride=s, dilation=d, groups=groups)
    kw["snake"] = _snake_params(c_in, dtype) if snake else None
    kw["residual"] = torch.randn(B, c_out, -(-T // s), device=DEVICE).to(dtype) if residual else None
    kw["state"] = torch.randn(B, c_in, (k - 1) * d, device=DEVICE).to(dtype) if state else None
    y, st = omni_fast.ops.causal_conv1d(x, w, b, backend="triton", **kw)
    exact, st_exact = ref.causal_conv1d(x.double(), w.double(), b.double(), **{a: _dbl(v) for a, v in kw.items()})
    same, _ = ref.causal_conv1d(x, w, b, **kw)
    assert_matches_reference(y, exact, same, name="y")
    assert st.shape == st_exact.shape and torch.equal(st.double(), st_exact)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", [
    dict(k=7, d=1, snake=False),  # decoder.0
    dict(k=7, d=3, snake=True),  # residual unit conv1
    dict(k=7, d=9, snake=True, state=True),
    dict(k=1, snake=True, residual=True),  # residual unit conv2
    dict(k=7, groups=6, c_out=6),  # ConvNeXt depthwise
    dict(k=7, groups=6, c_out=6, snake=True, residual=True, state=True),
    dict(k=7, snake=True, c_out=1),  # output conv
    dict(k=4, s=2, groups=2, c_out=6),  # strided, grouped (transformers' extra right padding)
])
def test_kernel_causal_conv1d(case, dtype):
    case = dict(case)
    _check_conv(2, 6, case.pop("c_out", 5), 37, dtype=dtype, **case)


@pytest.mark.parametrize("T", [1, 2, 13])
@pytest.mark.parametrize("case", [
    dict(k=5, d=2, s=3, groups=2),  # strided, dilated, grouped (transformers' extra right padding)
    dict(k=7, d=3, s=2, snake=True, residual=True),
    dict(k=3, d=9, s=4),  # an effective kernel of 19 with stride 4
])
def test_kernel_causal_conv1d_stride_dilation_combinations(case, T):
    _check_conv(2, 6, 4, T, **case)


@pytest.mark.parametrize("T", [0, 1, 2])
def test_kernel_causal_conv1d_short_inputs(T):
    _check_conv(1, 6, 5, T, 7, d=3, snake=True, residual=True)
    _check_conv(1, 6, 5, T, 7, d=3, snake=True, state=True)
    _check_conv(1, 6, 6, T, 7, groups=6, state=True)


def test_kernel_multi_tile_grids(monkeypatch):
    """Small interpreter tiles: several row, column and channel blocks, partial edges."""
    from omni_fast.kernels import code2wav as kernels

    monkeypatch.setattr(kernels, "_INTERP_GEMM", kernels.triton.Config({"BLOCK_N": 16, "BLOCK_T": 16, "BLOCK_K": 16}))
    monkeypatch.setattr(kernels, "_INTERP_DW", (16, 16))
    _check_conv(2, 37, 35, 41, 7, d=3, snake=True, residual=True, state=True)
    _check_conv(1, 20, 20, 35, 7, groups=20, snake=True, state=True)
    _check_convt(2, 37, 9, 7, 5, snake=True, state=True)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), c_in=st.integers(1, 20), c_out=st.integers(1, 20), T=st.integers(0, 40),
       k=st.sampled_from([1, 2, 3, 7]), d=st.sampled_from([1, 2, 3, 9]), snake=st.booleans(), residual=st.booleans(),
       state=st.booleans(), depthwise=st.booleans(), dtype=st.sampled_from(KERNEL_DTYPES))
def test_kernel_causal_conv1d_random_shapes(B, c_in, c_out, T, k, d, snake, residual, state, depthwise, dtype):
    groups = c_in if depthwise else 1
    _check_conv(B, c_in, c_in if depthwise else c_out, T, k, d=d, groups=groups, snake=snake, residual=residual,
                state=state, dtype=dtype)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), c_in=st.integers(1, 20), c_out=st.integers(1, 12), T=st.integers(1, 20),
       s=st.integers(1, 8), m=st.integers(1, 3), snake=st.booleans(), state=st.booleans(),
       dtype=st.sampled_from(KERNEL_DTYPES))
def test_kernel_causal_conv_transpose1d_random_shapes(B, c_in, c_out, T, s, m, snake, state, dtype):
    if not state and T < m - 1:
        T = m - 1 if m > 1 else 1
    _check_convt(B, c_in, c_out, T, s, m, snake, state, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_causal_conv_transpose1d_single_channel(dtype):
    """C_in = C_out = 1: packing cannot change the strides of size-1 dims (torch keeps them), so the packed-layout
    check and the launch must not read them (found by hypothesis: the kernel read past the weight)."""
    _check_convt(2, 1, 1, 3, 3, 3, dtype=dtype)
    _check_convt(1, 1, 1, 5, 2, 2, snake=True, state=True, dtype=dtype)


def test_kernel_non_contiguous_input():
    """The model feeds the pre-transformer output [B, T, H] to the first transposed conv as a permuted view."""
    h = torch.randn(2, 11, 8, device=DEVICE)
    x = h.permute(0, 2, 1)
    w = torch.randn(8, 8, 2, device=DEVICE)
    wc = torch.randn(5, 8, 7, device=DEVICE)
    snake = _snake_params(8, torch.float32)
    y, _ = omni_fast.ops.causal_conv_transpose1d(x, w, stride=2, backend="triton")
    want, _ = ref.causal_conv_transpose1d(x.contiguous(), w, stride=2)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y, state = omni_fast.ops.causal_conv1d(x, wc, snake=snake, backend="triton")
    want, _ = ref.causal_conv1d(x.contiguous(), wc, snake=snake)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert state.is_contiguous() and torch.equal(state, x[..., -6:])


@pytest.mark.parametrize("split", [3])
def test_kernel_split_k(monkeypatch, split):
    """The streaming path's split reduction (fp32 partials + a deterministic reduce kernel) equals the reference."""
    from omni_fast.kernels import code2wav as kernels

    monkeypatch.setattr(kernels, "_INTERP_GEMM", kernels.triton.Config({"BLOCK_N": 16, "BLOCK_T": 16, "BLOCK_K": 16}))
    monkeypatch.setattr(kernels, "_FORCE_SPLIT_K", split)
    _check_conv(2, 40, 20, 9, 7, d=3, snake=True, residual=True, state=True)
    _check_conv(1, 40, 6, 5, 4, s=2, groups=2)
    _check_convt(2, 40, 9, 6, 5, snake=True, state=True)
    _check_conv(1, 40, 20, 9, 7, dtype=torch.float16, snake=True, residual=True)


def test_kernel_unpacked_weights_give_the_same_result():
    x = torch.randn(2, 6, 19, device=DEVICE)
    w = torch.randn(5, 6, 7, device=DEVICE)
    snake = _snake_params(6, torch.float32)
    a, _ = omni_fast.ops.causal_conv1d(x, w, snake=snake, backend="triton")
    b, _ = omni_fast.ops.causal_conv1d(x, omni_fast.models.code2wav.pack_conv1d_weight(w), snake=snake,
                                       backend="triton")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    wt = torch.randn(6, 5, 8, device=DEVICE)
    a, _ = omni_fast.ops.causal_conv_transpose1d(x, wt, stride=4, backend="triton")
    b, _ = omni_fast.ops.causal_conv_transpose1d(x, omni_fast.models.code2wav.pack_conv_transpose1d_weight(wt),
                                                 stride=4, backend="triton")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _check_convt(B, c_in, c_out, T, s, m=2, snake=False, state=False, dtype=torch.float32):
    x = torch.randn(B, c_in, T, device=DEVICE).to(dtype)
    w = (torch.randn(c_in, c_out, m * s, device=DEVICE) * (1.0 / c_in) ** 0.5).to(dtype)
    w = omni_fast.models.code2wav.pack_conv_transpose1d_weight(w)
    b = torch.randn(c_out, device=DEVICE).to(dtype)
    kw = dict(stride=s, snake=_snake_params(c_in, dtype) if snake else None,
              state=torch.randn(B, c_in, m - 1, device=DEVICE).to(dtype) if state else None)
    y, st = omni_fast.ops.causal_conv_transpose1d(x, w, b, backend="triton", **kw)
    exact, st_exact = ref.causal_conv_transpose1d(x.double(), w.double(), b.double(),
                                                  **{a: _dbl(v) if a != "stride" else v for a, v in kw.items()})
    same, _ = ref.causal_conv_transpose1d(x, w, b, **kw)
    assert_matches_reference(y, exact, same, name="y")
    assert st.shape == st_exact.shape and torch.equal(st.double(), st_exact)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("s,m,snake,state", [(8, 2, True, False), (5, 2, True, True), (3, 2, False, True),
                                             (2, 1, False, False), (2, 1, False, True), (4, 3, True, True)])
def test_kernel_causal_conv_transpose1d(s, m, snake, state, dtype):
    _check_convt(2, 7, 6, 13, s, m, snake, state, dtype)


@pytest.mark.parametrize("T", [1, 2])
def test_kernel_causal_conv_transpose1d_short_inputs(T):
    _check_convt(1, 6, 5, T, 5, 2, snake=True)
    _check_convt(1, 6, 5, T, 5, 2, snake=True, state=True)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("T", [1, 67])
def test_kernel_snake_beta(dtype, T):
    x = (torch.randn(2, 5, T, device=DEVICE) * 3).to(dtype)
    alpha, beta = _snake_params(5, dtype)
    out = omni_fast.ops.snake_beta(x, alpha, beta, backend="triton")
    assert_matches_reference(out, ref.snake_beta(x.double(), alpha.double(), beta.double()),
                             ref.snake_beta(x, alpha, beta))


def test_kernel_streaming_states_continue_exactly():
    """Chunks through the Triton convs with carried states equal the one-shot Triton call."""
    x = torch.randn(2, 6, 29, device=DEVICE)
    w = torch.randn(5, 6, 7, device=DEVICE) * 0.3
    wt = torch.randn(6, 5, 6, device=DEVICE) * 0.3
    snake = _snake_params(6, torch.float32)
    whole, _ = omni_fast.ops.causal_conv1d(x, w, dilation=3, snake=snake, backend="triton")
    whole_t, _ = omni_fast.ops.causal_conv_transpose1d(x, wt, stride=3, snake=snake, backend="triton")
    st = st_t = None
    parts, parts_t = [], []
    for a, e in ((0, 1), (1, 2), (2, 11), (11, 29)):
        y, st = omni_fast.ops.causal_conv1d(x[..., a:e], w, dilation=3, snake=snake, state=st, backend="triton")
        yt, st_t = omni_fast.ops.causal_conv_transpose1d(x[..., a:e], wt, stride=3, snake=snake, state=st_t,
                                                        backend="triton")
        parts.append(y)
        parts_t.append(yt)
    torch.testing.assert_close(torch.cat(parts, -1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(parts_t, -1), whole_t, rtol=1e-5, atol=1e-5)


@pytest.fixture(params=[True, False], ids=["preact", "fused"])
def snake_path(request, monkeypatch):
    """Force every SnakeBeta conv onto one path: activated once into a buffer (the large-batch path,
    kernels/code2wav_preact.py) or fused into the GEMM's input load (the small-batch path)."""
    from omni_fast.kernels import code2wav_preact

    monkeypatch.setattr(code2wav_preact, "FORCE", request.param)
    return request.param


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_both_snake_paths_match_reference(snake_path, dtype):
    """Odd lengths, one sample, batch > 1, with and without a streaming state, residual, dilation, strided and
    transposed convs: each path against the reference."""
    _check_conv(2, 11, 9, 13, 7, d=3, snake=True, residual=True, state=True, dtype=dtype)
    _check_conv(1, 11, 9, 1, 7, d=3, snake=True, state=True, dtype=dtype)
    _check_conv(3, 6, 5, 1, 7, snake=True, dtype=dtype)
    _check_conv(2, 10, 7, 9, 1, snake=True, residual=True, state=True, dtype=dtype)
    _check_conv(2, 8, 6, 11, 4, s=2, groups=2, snake=True, dtype=dtype)
    _check_convt(2, 7, 6, 13, 5, 2, snake=True, state=True, dtype=dtype)
    _check_convt(3, 7, 6, 1, 3, 3, snake=True, state=True, dtype=dtype)
    _check_convt(2, 5, 4, 7, 4, 2, snake=True, dtype=dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_preactivated_equals_fused_exactly(monkeypatch, dtype):
    """The pre-activated path does the fused path's fp32 SnakeBeta and rounding: the same bits, streaming states
    included (checked chunk by chunk, with the states carried)."""
    from omni_fast.kernels import code2wav_preact

    x = (torch.randn(3, 12, 23, device=DEVICE) * 2).to(dtype)
    w = omni_fast.models.code2wav.pack_conv1d_weight((torch.randn(10, 12, 7, device=DEVICE) * 0.2).to(dtype))
    wt = omni_fast.models.code2wav.pack_conv_transpose1d_weight((torch.randn(12, 5, 6, device=DEVICE) * 0.2)
                                                                .to(dtype))
    res = torch.randn(3, 10, 23, device=DEVICE).to(dtype)
    snake = _snake_params(12, dtype)

    def run(force):
        monkeypatch.setattr(code2wav_preact, "FORCE", force)
        st = st_t = None
        outs = []
        for a, e in ((0, 1), (1, 4), (4, 11), (11, 23)):
            y, st = omni_fast.ops.causal_conv1d(x[..., a:e], w, dilation=3, snake=snake, residual=res[..., a:e],
                                                state=st, backend="triton")
            yt, st_t = omni_fast.ops.causal_conv_transpose1d(x[..., a:e], wt, stride=3, snake=snake, state=st_t,
                                                             backend="triton")
            outs += [y, st, yt, st_t]
        outs.append(omni_fast.ops.causal_conv1d(x, w, snake=snake, backend="triton")[0])  # no state: zero padding
        return outs

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)


def test_preactivation_choice_follows_the_batch():
    """The model's choice on the real config's shapes (bf16, one-frame pushes): every conv fused at batch 1; at
    batch 32 the k7 residual convs and the transposed convs pre-activated; the k1 convs of the last two blocks
    (recompute factor 2-3, below the break-even) always fused. The rates are the cost model's."""
    from omni_fast.bench.code2wav_snake_cost import conv_shapes
    from omni_fast.bench.costmodel.constants import DEFAULT
    from omni_fast.kernels import code2wav_preact as pre

    assert pre.HBM_BYTES_PER_S == DEFAULT.hbm_bytes_per_s and pre.NODE_S == DEFAULT.graph_node_s
    assert pre.MMA_MACS_PER_S == DEFAULT.mma_flops_per_s / 2
    shapes = conv_shapes(ref.Code2WavConfig(), 1)
    assert len(shapes) == 29
    for name, sh in shapes:
        assert not pre.use_preactivation(1, **sh), name
        if "k7 " in name or "convT" in name:
            assert pre.use_preactivation(32, **sh), name
        if name.startswith(("block3", "block4")) and " k1 " in name:
            assert pre.batch_threshold(**sh) is None, name


def test_ops_trace_under_torch_compile():
    x = torch.randn(2, 6, 9)
    w, wt = torch.randn(5, 6, 7), torch.randn(6, 5, 4)
    snake = _snake_params(6, torch.float32)

    def f(x, st):
        y, st2 = omni_fast.ops.causal_conv1d(x, w, snake=snake, state=st, backend="reference")
        z, _ = omni_fast.ops.causal_conv_transpose1d(x, wt, stride=2, backend="reference")
        return y * 2, st2, z, omni_fast.ops.snake_beta(x, *snake, backend="reference")

    st = torch.randn(2, 6, 6)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x, st), f(x, st))


def test_snake_cost_model_recompute_factors():
    """omni_fast.bench.code2wav_snake_cost (docs/code2wav.md): recompute factor K * ceil(C_out / BLOCK_N), m * ceil(s C_out /
    BLOCK_N) for transposed convs."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` is a folder of the repository
    from omni_fast.bench.code2wav_snake_cost import conv_costs

    rows = {name: (macs, fused, once) for name, macs, fused, once in conv_costs(ref.Code2WavConfig(), 64)}
    macs, fused, once = rows["block1 unit d1 k7 768"]
    assert fused == 7 * 12 * once and macs == 32 * 768 * 768 * 7
    macs, fused, once = rows["block1 convT 1536->768 k16"]
    assert fused == 2 * (8 * 768 // 64) * once and macs == 32 * 768 * 1536 * 2
    assert rows["decoder.0 1024->1536 k7"][1] == 0  # no SnakeBeta


# --- the model: one-shot, streaming ----------------------------------------------------------------------------


def _models(layout=0, **over):
    hf = _hf_model(layout, **over)
    return hf, omni_fast.models.Code2Wav.from_transformers(hf, backend="reference")


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_model_forward_matches_transformers(layout):
    hf, model = _models(layout)
    codes = torch.randint(0, 16, (2, 4, 14))
    with torch.no_grad():
        want = hf(codes)
    torch.testing.assert_close(model(codes), want, rtol=1e-4, atol=5e-5)


def test_model_bf16_error_is_within_transformers_own_bf16_error():
    """bf16 end to end (reference backend): the error vs the fp32 decode is at most 2x transformers' bf16 error."""
    hf, _ = _models(0)
    codes = torch.randint(0, 16, (2, 4, 20))
    with torch.no_grad():
        exact = hf(codes)
        hf_bf16 = hf.to(torch.bfloat16)
        want = hf_bf16(codes)
    model = omni_fast.models.Code2Wav.from_transformers(hf_bf16, backend="reference")
    got = model(codes)
    assert got.dtype == torch.bfloat16
    assert_matches_reference(got, exact, want)


def test_model_forward_triton_matches_transformers():
    hf = _hf_model(1)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    codes = torch.randint(0, 16, (2, 4, 9))
    with torch.no_grad():
        want = hf(codes)
    torch.testing.assert_close(model(codes), want, rtol=1e-4, atol=5e-5)


def _pre_transformer_reference(hf, emb, dtype):
    """transformers' pre-transformer, computed by ``reference.code2wav`` in ``dtype`` (one shot, explicit mask)."""
    cfg = ref.Code2WavConfig.from_transformers(hf.config)
    sd = {k: v.to(dtype) for k, v in hf.state_dict().items()}
    h = emb.to(dtype)
    pos = torch.arange(h.shape[1], device=h.device)
    cos, sin = ref.rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, dtype)
    mask = ref.sliding_window_mask(pos, pos, cfg.sliding_window, dtype)
    for i in range(cfg.num_hidden_layers):
        h, _ = ref.pre_transformer_layer(cfg, sd, f"pre_transformer.layers.{i}.", h, cos, sin, mask)
    return ref._rms_norm(h, sd["pre_transformer.norm.weight"], cfg.rms_norm_eps)


def _pre_transformer_streamed(model, emb, sizes):
    """The model's pre-transformer over ``emb`` [B, T, H] pushed in chunks of ``sizes`` frames (one stream)."""
    s = model.stream(emb.shape[0])
    out, i = [], 0
    for n in sizes:
        out.append(s._pre_transformer(emb[:, i:i + n].clone()))  # it overwrites its input (the residual stream)
        s.state.pos += n
        s.state.frames += n
        i += n
    return torch.cat(out, 1)


# one shot, then chunks shorter than, equal to and longer than the window (72), from both ends
ONE_SHOT, UP, DOWN = [153], [1, 7, 72, 73], [73, 72, 7, 1]


# (the interpreter is slow: the Triton cases split the chunkings between the dtypes)
@pytest.mark.parametrize("backend,dtype,chunkings", [("reference", torch.float32, [ONE_SHOT, UP, DOWN]),
                                                     ("triton", torch.float32, [ONE_SHOT, UP]),
                                                     ("triton", torch.float16, [DOWN])])
def test_pre_transformer_longer_than_the_window_one_shot_and_streamed(backend, dtype, chunkings):
    """The real window (72) over 153 frames: one shot and streamed in chunks of 1, 7, 72 and 73 frames equal the
    reference's one-shot hidden states (FlashAttention's error rule against the fp64 reference)."""
    hf = _hf_model(0, sliding_window=72, num_hidden_layers=2 if backend == "reference" else 1)
    model = omni_fast.models.Code2Wav.from_transformers(hf.to(dtype), backend=backend)
    emb = torch.randn(2 if backend == "reference" else 1, 153, hf.config.hidden_size)
    with torch.no_grad():
        exact = _pre_transformer_reference(hf, emb.double(), torch.float64)
        want = _pre_transformer_reference(hf, emb, dtype)
        if dtype == torch.float32:  # the reference itself equals transformers' module
            torch.testing.assert_close(want, hf.pre_transformer(inputs_embeds=emb).last_hidden_state, rtol=1e-5,
                                       atol=1e-5)
        for sizes in chunkings:
            got = _pre_transformer_streamed(model, emb.to(dtype), sizes)
            assert_matches_reference(got, exact, want, name=f"chunks {sizes}")


@pytest.mark.parametrize("window,T,sizes", [(72, 153, [1, 7, 72, 73]), (1, 9, [1, 3, 5])])
def test_model_window_matches_transformers_one_shot_and_streamed(window, T, sizes):
    """The whole model past the real window (72), and with window 1 (each frame sees itself only; the KV caches
    are empty ``[B, 0, Hk, D]``), one shot and streamed."""
    hf, model = _models(0, sliding_window=window)
    codes = torch.randint(0, 16, (2, 4, T))
    with torch.no_grad():
        want = hf(codes)
    torch.testing.assert_close(model(codes), want, rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(_stream(model, codes, sizes), want, rtol=1e-4, atol=5e-5)


def _random_chunks(rng, T, max_chunk):
    sizes = []
    while sum(sizes) < T:
        sizes.append(min(rng.choice([0, 1, 1, 2, 3, max_chunk]), T - sum(sizes)))
    return sizes


def _stream(model, codes, sizes):
    s = model.stream(codes.shape[0], cuda_graphs=False)  # eager (on CUDA graphs are the default)
    out, i = [], 0
    for n in sizes:
        w = s.push(codes[..., i:i + n])
        assert w.shape[-1] == model.num_samples(i + n) - model.num_samples(i)  # every final sample, no more
        out.append(w)
        i += n
    out.append(s.finish())
    return torch.cat(out, -1)


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_streaming_equals_one_shot_reference_backend(layout):
    _, model = _models(layout)
    rng = random.Random(layout)
    for trial in range(3):
        T = rng.randint(1, 17)
        codes = torch.randint(0, 16, (2, 4, T))
        whole = model(codes)
        got = _stream(model, codes, _random_chunks(rng, T, 7))
        torch.testing.assert_close(got, whole, rtol=1e-4, atol=5e-5)


def test_streaming_equals_one_shot_triton_backend():
    hf = _hf_model(1, num_hidden_layers=1)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    codes = torch.randint(0, 16, (2, 4, 8))
    with torch.no_grad():
        want = hf(codes)
    torch.testing.assert_close(_stream(model, codes, [1, 2, 5]), want, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("layout,seed", [(0, 13), (2, 18)])  # seeds drawing [1, 4, 1] and [0, 4, 1] (few pushes)
def test_streaming_random_chunkings_triton_backend(layout, seed):
    """Random chunkings (sizes 0..4, single frames included) through the Triton kernels equal transformers'
    one-shot decode sample for sample, first and last chunk included."""
    hf = _hf_model(layout, num_hidden_layers=1)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    rng = random.Random(seed)
    T = rng.randint(4, 7)
    codes = torch.randint(0, 16, (1, 4, T))
    with torch.no_grad():
        want = hf(codes)
    torch.testing.assert_close(_stream(model, codes, _random_chunks(rng, T, 4)), want, rtol=1e-4, atol=5e-5)


def test_batched_streams_of_different_lengths_triton_backend():
    hf = _hf_model(0, num_hidden_layers=1)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    lengths = [6, 2]
    codes = torch.randint(0, 16, (2, 4, max(lengths)))
    wav = _stream(model, codes, [1, 5])
    for b, n in enumerate(lengths):
        with torch.no_grad():
            alone = hf(codes[b:b + 1, :, :n])
        torch.testing.assert_close(wav[b:b + 1, :, :model.num_samples(n)], alone, rtol=1e-4, atol=5e-5)


def test_batched_streams_of_different_lengths_equal_separate_decodes():
    _, model = _models(0)
    lengths = [13, 4, 9]
    codes = torch.randint(0, 16, (3, 4, max(lengths)))
    wav = _stream(model, codes, [3, 1, 6, 3])
    for b, n in enumerate(lengths):
        alone = model(codes[b:b + 1, :, :n])
        torch.testing.assert_close(wav[b:b + 1, :, :model.num_samples(n)], alone, rtol=1e-4, atol=5e-5)


def _run_with_resets(model, codes, schedule, stream=None):
    """Push ``codes [B, G, T]`` in chunks; ``schedule`` = [(frames, rows reset before the push)]. Returns the
    streamed wav [B, 1, n] and, per row, the (first frame, first sample) of each utterance it decoded."""
    B = codes.shape[0]
    s = stream or model.stream(B, cuda_graphs=False)
    outs, starts, i, n = [], [[(0, 0)] for _ in range(B)], 0, 0
    for frames, rows in schedule:
        if rows:
            s.reset(rows)
            for r in rows:
                starts[r].append((i, n + s.lead_samples))
        w = s.push(codes[..., i:i + frames])
        assert w.shape[-1] == model.num_samples(i + frames) - model.num_samples(i)  # the same for every row
        for r in rows:  # a reset row's first push starts with its lead, zeros
            assert not w[r, :, :s.lead_samples].any()
        outs.append(w)
        i += frames
        n += w.shape[-1]
    return torch.cat(outs, -1), starts


def _check_utterances(model, codes, wav, starts, **tol):
    T = codes.shape[-1]
    for b, utts in enumerate(starts):
        for u, (f0, s0) in enumerate(utts):
            f1 = utts[u + 1][0] if u + 1 < len(utts) else T
            alone = model(codes[b:b + 1, :, f0:f1])
            got = wav[b:b + 1, :, s0:s0 + alone.shape[-1]]
            torch.testing.assert_close(got, alone, **tol, msg=lambda m: f"row {b} utterance {u}: {m}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rows_reset_mid_stream_equal_their_separate_one_shot_decodes(backend):
    """Rows started at different times (reset mid-stream, some twice) give exactly the one-shot decodes of their
    utterances; the other rows are not disturbed. Window 5 < the utterances, so per-row positions and KV lengths
    matter (the rows' caches are at different fill levels when they attend)."""
    if backend == "reference":
        _, model = _models(0)
        schedule = [(3, []), (2, []), (4, [1]), (1, [2]), (3, [1, 0]), (6, [])]
    else:
        hf = _hf_model(1, num_hidden_layers=1)
        model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
        schedule = [(2, []), (3, [1]), (1, [0]), (4, [])]
    T = sum(f for f, _ in schedule)
    codes = torch.randint(0, 16, (3, 4, T))
    wav, starts = _run_with_resets(model, codes, schedule)
    _check_utterances(model, codes, wav, starts, rtol=1e-4, atol=5e-5)


def test_reset_rows_forms_and_bad_input():
    _, model = _models(0)
    codes = torch.randint(0, 16, (3, 4, 9))
    s = model.stream(3)
    s.push(codes[..., :3])
    s.reset(torch.tensor([False, True, False]))  # a bool mask
    s.reset(2)  # an index
    assert s.state.fresh.tolist() == [False, True, True] and s.state.pos.tolist() == [3, 0, 0]
    s.push(codes[..., 3:5])
    assert s.state.pos.tolist() == [5, 2, 2] and not s.state.fresh.any() and not s.state.reset_pending
    s.reset(torch.tensor([0]))  # an index tensor
    wav = s.push(codes[..., 5:9])
    assert s.state.pos.tolist() == [4, 6, 6]
    torch.testing.assert_close(wav[:1, :, s.lead_samples:], model(codes[:1, :, 5:9]), rtol=1e-4, atol=5e-5)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 3\)"):
        s.reset([3])
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        s.reset(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="bool mask"):
        s.reset(True)
    with pytest.raises(TypeError, match="row indices"):
        s.reset(["a"])
    s.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        s.reset([0])


def test_stream_state_with_resets_resumes_in_a_new_stream():
    """A state saved with per-row positions and a reset still pending resumes exactly."""
    _, model = _models(0)
    codes = torch.randint(0, 16, (2, 4, 12))
    s = model.stream(2)
    a, starts = _run_with_resets(model, codes[..., :7], [(4, []), (3, [1])], stream=s)
    s.reset([0])  # pending when the state moves
    resumed = model.stream(2, state=s.state)
    b = resumed.push(codes[..., 7:])
    wav = torch.cat((a, b), -1)
    starts[0].append((7, a.shape[-1] + resumed.lead_samples))
    _check_utterances(model, codes, wav, starts, rtol=1e-4, atol=5e-5)


def test_old_format_stream_state_is_refused():
    _, model = _models(0)
    s = model.stream(2)
    s.push(torch.zeros(2, 4, 2, dtype=torch.long))
    st = s.state
    st.pos = st.pos[0].clone()  # the former shared 0-d position
    with pytest.raises(ValueError, match="former format"):
        model.stream(2, state=st)
    st.pos = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"pos must be an int64 \[B\]"):
        model.stream(2, state=st)


def test_stream_state_resumes_in_a_new_stream():
    _, model = _models(0)
    codes = torch.randint(0, 16, (1, 4, 10))
    s = model.stream(1)
    a = s.push(codes[..., :6])
    b = model.stream(1, state=s.state).push(codes[..., 6:])
    torch.testing.assert_close(torch.cat((a, b), -1), model(codes), rtol=1e-4, atol=5e-5)


def test_chunked_decode_matches_transformers():
    hf, model = _models(0)
    codes = torch.randint(0, 16, (1, 4, 23))
    with torch.no_grad():
        want = hf.chunked_decode(codes, chunk_size=7, left_context_size=3)
    torch.testing.assert_close(model.chunked_decode(codes, chunk_size=7, left_context_size=3), want, rtol=1e-4,
                               atol=5e-5)


def test_from_state_dict_equals_from_transformers():
    hf, model = _models(2)
    sd = {"code2wav." + k: v for k, v in hf.state_dict().items()}
    other = omni_fast.models.Code2Wav.from_state_dict(hf.config, sd, backend="reference")
    codes = torch.randint(0, 16, (1, 4, 6))
    torch.testing.assert_close(other(codes), model(codes), rtol=0, atol=0)


# --- bad input -------------------------------------------------------------------------------------------------


def test_first_push_too_short_for_the_layout_is_refused():
    """A layout with little upsampling before the decoder makes no sample from one frame: the stream's first push
    (like the first after a reset) says how many frames it needs instead of failing inside a conv."""
    _, model = _models(0, upsampling_ratios=[1], upsample_rates=[2, 3])
    stream = model.stream(1)
    need = stream._min_reset_frames()
    assert need > 1
    codes = torch.randint(0, 16, (1, 4, need + 2))
    with pytest.raises(ValueError, match=f"first push .* needs at least {need} frames"):
        stream.push(codes[..., :1])
    got = torch.cat([stream.push(codes[..., :need])] + [stream.push(codes[..., i:i + 1])
                                                          for i in range(need, need + 2)], -1)
    torch.testing.assert_close(got, model(codes), rtol=1e-5, atol=1e-6)


def test_model_bad_codes():
    _, model = _models(0)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        model(torch.full((1, 4, 3), 16))
    with pytest.raises(ValueError, match=r"codes must lie in"):
        model(torch.full((1, 4, 3), -1))
    with pytest.raises(ValueError, match="4 codebooks"):
        model(torch.zeros(1, 5, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="3 dimensions"):
        model(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must lie in"):  # check_values=True checks on any device
        model(torch.full((1, 4, 3), 16), check_values=True)
    s = model.stream(2)
    with pytest.raises(ValueError, match=r"codes must lie in"):
        s.push(torch.full((2, 4, 1), 99), check_values=True)
    with pytest.raises(ValueError, match="batch size 2"):
        s.push(torch.zeros(1, 4, 3, dtype=torch.long))
    s.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        s.push(torch.zeros(2, 4, 1, dtype=torch.long))


def test_model_state_from_another_config():
    _, model = _models(0)
    _, other = _models(1)
    s = other.stream(1)
    s.push(torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="another config"):
        model.stream(1, state=s.state)
    with pytest.raises(ValueError, match="batch size"):
        other.stream(2, state=s.state)


def test_model_state_with_bad_kv_caches():
    _, model = _models(0)
    s = model.stream(1)
    s.push(torch.zeros(1, 4, 2, dtype=torch.long))
    st = s.state
    k, v = st.kv[0]
    assert k.shape == (1, 4, 2, 8)  # [B, W-1, Hk, D]
    st.kv[0] = (k.transpose(1, 2).contiguous(), v)  # the former [B, Hk, W-1, D] layout
    with pytest.raises(ValueError, match=r"kv\[0\] k has shape \[1, 2, 4, 8\], expected \[1, 4, 2, 8\]"):
        model.stream(1, state=st)
    st.kv[0] = (k, v.half())
    with pytest.raises(ValueError, match=r"kv\[0\] v has torch.float16"):
        model.stream(1, state=st)
    st.kv[0] = (k, v)
    st.kv.pop()
    with pytest.raises(ValueError, match="1 KV caches, the model 2"):
        model.stream(1, state=st)


def test_model_bad_state_dict():
    hf = _hf_model(0)
    sd = dict(hf.state_dict())
    with pytest.raises(ValueError, match="missing"):
        omni_fast.models.Code2Wav.from_state_dict(hf.config, {k: v for k, v in sd.items() if "decoder.0" not in k})
    with pytest.raises(ValueError, match="the config expects"):
        omni_fast.models.Code2Wav.from_state_dict(_hf_config(0, decoder_dim=16), sd)


def _conv_call(**over):
    args = dict(x=torch.randn(2, 6, 9), weight=torch.randn(5, 6, 7))
    args.update(over)
    return omni_fast.ops.causal_conv1d(args.pop("x"), args.pop("weight"), **args, backend="reference")


@pytest.mark.parametrize("over,exc,match", [
    (dict(weight=torch.randn(5, 4, 7)), ValueError, "channel mismatch"),
    (dict(weight=torch.randn(5, 3, 7), groups=4), ValueError, "groups=4 must divide"),
    (dict(bias=torch.randn(4)), ValueError, "bias must have shape"),
    (dict(state=torch.randn(2, 6, 5)), ValueError, "state must have shape"),
    (dict(state=torch.randn(2, 5, 6)), ValueError, "another layer or config"),
    (dict(state=torch.randn(2, 6, 6), stride=2), ValueError, "stride=1"),
    (dict(residual=torch.randn(2, 5, 8)), ValueError, "residual must have shape"),
    (dict(snake=(torch.randn(5), torch.randn(6))), ValueError, "snake alpha must have shape"),
    (dict(snake=torch.randn(6)), TypeError, "pair"),
    (dict(weight=torch.randn(5, 6, 7, dtype=torch.float16)), TypeError, "same dtype"),
    (dict(state=torch.randn(2, 6, 6, dtype=torch.float64)), TypeError, "state must have dtype"),
    (dict(x=torch.randn(6, 9)), ValueError, "x must have 3 dimensions"),
    (dict(x=torch.randint(0, 3, (2, 6, 9))), TypeError, "x must have dtype"),
    (dict(dilation=0), ValueError, "dilation must be (>= 1|in \\[1, )"),
    (dict(weight=torch.randn(5, 6, 0)), ValueError, "kernel size of at least 1"),
])
def test_conv_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _conv_call(**over)


@pytest.mark.parametrize("over,exc,match", [
    (dict(weight=torch.randn(5, 5, 4)), ValueError, "channel mismatch"),
    (dict(weight=torch.randn(6, 5, 5)), ValueError, "multiple of stride"),
    (dict(state=torch.randn(2, 6, 2)), ValueError, "state must have shape"),
    (dict(x=torch.randn(2, 6, 0)), ValueError, "at least 1 input samples"),
    (dict(weight=torch.randn(6, 5, 0)), ValueError, "kernel size of at least 1"),
    (dict(snake=(torch.randn(6), torch.randn(6, dtype=torch.float16))), TypeError, "same dtype"),
])
def test_conv_transpose_bad_input(over, exc, match):
    args = dict(x=torch.randn(2, 6, 9), weight=torch.randn(6, 5, 4))
    args.update(over)
    with pytest.raises(exc, match=match):
        omni_fast.ops.causal_conv_transpose1d(args.pop("x"), args.pop("weight"), stride=2, **args,
                                              backend="reference")


def test_snake_bad_input():
    with pytest.raises(ValueError, match="snake alpha must have shape"):
        omni_fast.ops.snake_beta(torch.randn(1, 3, 4), torch.randn(4), torch.randn(3))


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
