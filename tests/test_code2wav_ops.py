"""Code2Wav kernels vs the reference: causal conv1d, transposed conv, SnakeBeta (fused and pre-activated paths),
split-K, streaming states, torch.compile tracing, bad input to the ops."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omni_fast
import omni_fast.models  # noqa: F401  (not imported by omni_fast itself)
from omni_fast.reference import code2wav as ref
from omni_fast.testing import DEVICE, KERNEL_DTYPES, assert_matches_reference

transformers = pytest.importorskip("transformers")

from _code2wav_helpers import _check_conv, _check_convt, _snake_params  # noqa: E402


# --- kernels vs reference ------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", ["depthwise", "dense"])
def test_channels_last_out_gives_the_same_values_in_the_transposed_layout(backend, case):
    """``channels_last_out=True`` (Code2Wav's ConvNeXt depthwise conv, read channels-last by its LayerNorm): the same
    y, bit for bit, stored as a ``[B, T, C_out]`` buffer; the state (in place or returned) is unchanged."""
    x = torch.randn(2, 6, 9, device=DEVICE)
    w = torch.randn(6, 1, 7, device=DEVICE) if case == "depthwise" else torch.randn(5, 6, 7, device=DEVICE)
    kw = dict(bias=torch.randn(w.shape[0], device=DEVICE), groups=6 if case == "depthwise" else 1, backend=backend)
    st = torch.randn(2, 6, 6, device=DEVICE)
    for state, update in ((None, False), (st, False), (st, True)):
        want, want_state = omni_fast.ops.causal_conv1d(x, w, state=state, **kw)
        buf = None if state is None else state.clone()
        y, new = omni_fast.ops.causal_conv1d(x, w, state=buf, update_state=update, channels_last_out=True, **kw)
        assert y.shape == want.shape and y.transpose(1, 2).is_contiguous() and torch.equal(y, want)
        assert torch.equal(buf if update else new, want_state)
    with pytest.raises(TypeError, match="channels_last_out"):
        omni_fast.ops.causal_conv1d(x, w, channels_last_out="yes", **kw)


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


@pytest.mark.parametrize("case", ["dense", "depthwise", "split_k", "fp16"])
def test_kernel_clamp_equals_clamping_the_output(monkeypatch, case):
    """``clamp=c`` (Code2Wav's final ``clamp(-1, 1)`` fused into the output conv's epilogue, the split reduction's
    with split-K) equals ``y.clamp(-c, c)`` exactly, NaN passing through, on both backends."""
    from omni_fast.kernels import code2wav as kernels

    if case == "split_k":
        monkeypatch.setattr(kernels, "_INTERP_GEMM", kernels.triton.Config({"BLOCK_N": 16, "BLOCK_T": 16,
                                                                            "BLOCK_K": 16}))
        monkeypatch.setattr(kernels, "_FORCE_SPLIT_K", 3)
    g = torch.Generator().manual_seed(7)
    c_in, groups = (6, 6) if case == "depthwise" else (40, 1)
    dt = torch.float16 if case == "fp16" else torch.float32
    x = (torch.randn(2, c_in, 11, generator=g) * 3).to(DEVICE, dt)
    x[0, 1, 4] = float("nan")
    w = (torch.randn(c_in if groups > 1 else 3, c_in // groups, 7, generator=g) * 0.3).to(DEVICE, dt)
    kw = dict(bias=torch.randn(w.shape[0], generator=g).to(DEVICE, dt), groups=groups,
              snake=tuple((torch.randn(c_in, generator=g) * 0.1).to(DEVICE, dt) for _ in range(2)),
              state=torch.randn(2, c_in, 6, generator=g).to(DEVICE, dt))
    for be in ("reference", "triton"):
        y, _ = omni_fast.ops.causal_conv1d(x, w, clamp=0.5, backend=be, **kw)
        want, _ = omni_fast.ops.causal_conv1d(x, w, backend=be, **kw)
        assert y.isnan().any() and (y.nan_to_num().abs() <= 0.5).all()
        torch.testing.assert_close(y, want.clamp(-0.5, 0.5), rtol=0, atol=0, equal_nan=True)


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


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_update_state_writes_the_new_state_in_place(backend):
    """``update_state=True`` gives the same output and, in ``state`` itself, the state the plain call returns, for
    chunks longer and shorter than the context (the shorter one shifts the old context), conv and transposed."""
    x = torch.randn(2, 6, 52, device=DEVICE)
    w = torch.randn(5, 6, 7, device=DEVICE) * 0.3
    wt = torch.randn(6, 5, 6, device=DEVICE) * 0.3
    snake = _snake_params(6, torch.float32)
    st, st_t = torch.randn(2, 6, 18, device=DEVICE), torch.randn(2, 6, 1, device=DEVICE)
    for a, e in ((0, 1), (1, 2), (2, 11), (11, 29), (29, 52)):  # shorter than, equal to, longer than the context
        chunk = x[..., a:e]
        y, new = omni_fast.ops.causal_conv1d(chunk, w, dilation=3, snake=snake, state=st, backend=backend)
        buf = st.clone()
        y2, same = omni_fast.ops.causal_conv1d(chunk, w, dilation=3, snake=snake, state=buf, update_state=True,
                                               backend=backend)
        assert same is buf and torch.equal(y2, y) and torch.equal(buf, new)
        yt, new_t = omni_fast.ops.causal_conv_transpose1d(chunk, wt, stride=3, snake=snake, state=st_t,
                                                          backend=backend)
        buf_t = st_t.clone()
        yt2, same_t = omni_fast.ops.causal_conv_transpose1d(chunk, wt, stride=3, snake=snake, state=buf_t,
                                                            update_state=True, backend=backend)
        assert same_t is buf_t and torch.equal(yt2, yt) and torch.equal(buf_t, new_t)
        st, st_t = new, new_t


def test_update_state_bad_input():
    x, w = torch.randn(1, 4, 8, device=DEVICE), torch.randn(4, 4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="update_state=True needs a state"):
        omni_fast.ops.causal_conv1d(x, w, update_state=True)
    with pytest.raises(TypeError, match="update_state"):
        omni_fast.ops.causal_conv1d(x, w, state=torch.zeros(1, 4, 2, device=DEVICE), update_state=1)
    buf = torch.zeros(1, 4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="state must not overlap x"):  # column 1 is read as x while written
        omni_fast.ops.causal_conv1d(buf[..., 1:9], w, state=buf[..., :2], update_state=True)


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
    (dict(clamp=-1.0), ValueError, "clamp"),
    (dict(clamp=float("nan")), ValueError, "clamp"),
    (dict(clamp="1"), TypeError, "clamp"),
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


