"""Fused decode-layer kernels of the MTP code predictor (issue 5): ``norm_linear`` (RMSNorm + GEMV, plain and SwiGLU
epilogues), ``linear_residual_`` (GEMV + residual add in place), ``cached_attention`` with the q/k RMSNorm + RoPE
fused in; Triton vs the pure-torch reference (which rounds like transformers) on odd sizes, M = 0 / 1, K not a
multiple of the block, strided rows; the fused and the unfused layer paths of ``CodePredictor`` agree; bad input;
traces; bf16 real shapes (gpu)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni_fast.models import CodePredictor
from omni_fast.ops import mtp_layers
from omni_fast.reference.rope import rope_inv_freq
from omni_fast.testing import DEVICE, KERNEL_DTYPES, assert_matches_reference, ulp
from test_mtp import _hf_predictor  # noqa: E402 (tests/ is on sys.path: rootdir-relative test modules)

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (  # noqa: E402
    Qwen3OmniMoeTalkerCodePredictorConfig)


def _rand(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g) * scale + shift


def _check_norm_linear(M, N, K, swiglu, norm, dtype, seed, row_stride_extra=0):
    g = torch.Generator().manual_seed(seed)
    rows = N * 2 if swiglu else N
    # x as a strided row view (the lm_head reads the last token of each sequence out of the residual stream).
    base = _rand(g, M, K + row_stride_extra, scale=2.0).to(DEVICE, dtype)
    x = base[:, :K]
    w = _rand(g, rows, K, scale=K**-0.5).to(DEVICE, dtype)
    nw = _rand(g, K, scale=0.3, shift=1.0).to(DEVICE, dtype) if norm else None
    out = mtp_layers.norm_linear(x, nw, w, eps=1e-6, swiglu=swiglu, backend="triton")
    same = mtp_layers.norm_linear(x, nw, w, eps=1e-6, swiglu=swiglu, backend="reference")
    exact = mtp_layers._norm_linear_reference(x.double(), None if nw is None else nw.double(), w.double(), 1e-6,
                                              swiglu)
    assert out.dtype == dtype and out.shape == (M, N)
    # SwiGLU multiplies two rounded GEMV outputs (silu(gate) * up): their relative errors add, so the error floor is
    # twice the helper's 2 ulp at the output's scale. (Seen on an AVX-512 CI machine: fp32 M1 N24 K40 at 2.7 ulp
    # while torch's fp32 reference happened to land at 0.6 ulp; the 2x-the-reference rule alone then fails.)
    atol = (4 if swiglu else 2) * ulp(dtype) * max(exact.abs().max().item() if exact.numel() else 0.0, 1.0)
    assert_matches_reference(out, exact, same, atol=atol, name=f"norm_linear M{M} N{N} K{K} swiglu={swiglu}")


def _check_linear_residual(M, N, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    resid = _rand(g, M, N, scale=3.0).to(DEVICE, dtype)
    x = _rand(g, M, K).to(DEVICE, dtype)
    w = _rand(g, N, K, scale=K**-0.5).to(DEVICE, dtype)
    tri, same, exact = resid.clone(), resid.clone(), resid.double()
    assert mtp_layers.linear_residual_(tri, x, w, backend="triton") is tri
    mtp_layers.linear_residual_(same, x, w, backend="reference")
    mtp_layers._linear_residual_reference(exact, x.double(), w.double())
    assert_matches_reference(tri, exact, same, name=f"linear_residual_ M{M} N{N} K{K}")


# M = 1 (15 padding rows of the 16-row tile), 3 / 16 (one tile), 17 / 40 / 70 (two to five tiles); K 1030 and 300 are
# not multiples of any BLOCK_K; N 24 / 33 not multiples of BLOCK_N.
SIZES = [(1, 24, 40), (1, 33, 1030), (3, 17, 300), (16, 16, 64), (17, 33, 70), (40, 16, 130), (70, 9, 48)]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,N,K", SIZES)
def test_norm_linear_and_linear_residual(dtype, M, N, K):
    for swiglu in (False, True):
        _check_norm_linear(M, N, K, swiglu, True, dtype, seed=M * N + K, row_stride_extra=3)
    _check_norm_linear(M, N, K, False, False, dtype, seed=M + N + K)
    _check_linear_residual(M, N, K, dtype, seed=M * K + N)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(0, 70), N=st.integers(1, 40), K=st.integers(1, 300), swiglu=st.booleans(), norm=st.booleans(),
       dtype=st.sampled_from(KERNEL_DTYPES), seed=st.integers(0, 2**16))
def test_gemv_kernels_odd_sizes(M, N, K, swiglu, norm, dtype, seed):
    _check_norm_linear(M, N, K, swiglu, norm, dtype, seed)
    _check_linear_residual(M, N, K, dtype, seed)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,swiglu", [(1, False), (5, True), (20, False)])
def test_norm_linear_gathers_embedding_rows(dtype, M, swiglu):
    """The decode step's first GEMV gathers the codebook embedding rows itself and writes them to the residual."""
    g = torch.Generator().manual_seed(M)
    V, N, K = 37, 24, 72
    table = _rand(g, V, K + 5, scale=2.0).to(DEVICE, dtype)[:, :K]  # a row-strided table slice, as in the model
    w = _rand(g, 2 * N if swiglu else N, K, scale=K**-0.5).to(DEVICE, dtype)
    nw = _rand(g, K, scale=0.3, shift=1.0).to(DEVICE, dtype)
    ids = torch.randint(0, V, (M,), generator=g).to(DEVICE)
    got_rows, same_rows = (torch.full((M, K), float("nan"), device=DEVICE, dtype=dtype) for _ in range(2))
    out = mtp_layers.norm_linear(table, nw, w, swiglu=swiglu, rows=ids, gathered=got_rows, backend="triton")
    same = mtp_layers.norm_linear(table, nw, w, swiglu=swiglu, rows=ids, gathered=same_rows, backend="reference")
    exact = mtp_layers._norm_linear_reference(table.double(), nw.double(), w.double(), 1e-6, swiglu, ids)
    assert torch.equal(got_rows, table[ids]) and torch.equal(same_rows, table[ids])
    assert_matches_reference(out, exact, same, name="gathered norm_linear")
    no_copy = mtp_layers.norm_linear(table, nw, w, swiglu=swiglu, rows=ids, backend="triton")
    torch.testing.assert_close(no_copy, out, rtol=0, atol=0)


def test_gemv_blocks_heuristic():
    from omni_fast.kernels.mtp_gemv import gemv_blocks

    want = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, num_warps=4)
    for M in (1, 3, 16, 17, 64, 128):  # one config for every M: a row's reduction order depends on K only
        assert gemv_blocks(M, 1024, 3072) == want
        assert gemv_blocks(M, 4096, 1024) == want
    assert gemv_blocks(3, 10, 20)["BLOCK_K"] == 32  # never wider than the (power-of-two) K


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])  # interpreter: no bf16 dot
def test_gemv_rows_are_batch_invariant(dtype):
    """Row r of every GEMV form is bit-identical whatever the number of rows M in the launch (1, 3, 16, 17, 64):
    plain, norm prologue, SwiGLU, residual epilogue and the embedding gather."""
    g = torch.Generator().manual_seed(3)
    K, N = 80, 40
    x = _rand(g, 64, K).to(dtype).to(DEVICE)
    nw = _rand(g, K, scale=0.1, shift=1.0).to(dtype).to(DEVICE)
    w = _rand(g, 2 * N, K, scale=0.2).to(dtype).to(DEVICE)
    resid = _rand(g, 64, N).to(dtype).to(DEVICE)
    table = _rand(g, 30, K).to(dtype).to(DEVICE)
    ids = torch.randint(0, 30, (64,), generator=g).to(DEVICE)
    outs = {}
    for M in (1, 3, 16, 17, 64):
        r = resid[:M].clone()
        mtp_layers.linear_residual_(r, x[:M], w[:N], backend="triton")
        outs[M] = (mtp_layers.norm_linear(x[:M], None, w, backend="triton"),
                   mtp_layers.norm_linear(x[:M], nw, w, eps=1e-6, backend="triton"),
                   mtp_layers.norm_linear(x[:M], nw, w, eps=1e-6, swiglu=True, backend="triton"),
                   r,
                   mtp_layers.norm_linear(table, nw, w, eps=1e-6, rows=ids[:M], backend="triton"))
    for M, got in outs.items():
        for a, b in zip(got, outs[64]):
            assert torch.equal(a, b[:M]), (M, dtype)


# --- attention with the q/k norm + RoPE fused in -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,Hq,Hk,D,L", [(2, 4, 2, 16, 6), (1, 2, 2, 24, 16), (3, 8, 1, 32, 5)])
def test_cached_attention_with_norm_rope(dtype, B, Hq, Hk, D, L):
    g = torch.Generator().manual_seed(B * D + Hq)
    inv_freq = rope_inv_freq(D, 1e6, DEVICE)
    cos, sin = mtp_layers.rope_tables(L + 2, inv_freq, dtype)
    cos64, sin64 = cos.double(), sin.double()
    qn, kn = (_rand(g, D, scale=0.3, shift=1.0).to(DEVICE, dtype) for _ in range(2))
    for start, T in ((0, 2), (0, 1), (2, 1), (L - 2, 2), (L - 1, 1)):
        # q / k / v are views into one fused qkv projection output, as in the model.
        qkv = _rand(g, B, T, Hq + 2 * Hk, D, scale=2.0).to(DEVICE, dtype)
        q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq: Hq + Hk], qkv[:, :, Hq + Hk:]
        kc, vc = (_rand(g, B, Hk, L, D).to(DEVICE, dtype) for _ in range(2))
        kt, vt, ks, vs, ke, ve = kc.clone(), vc.clone(), kc.clone(), vc.clone(), kc.double(), vc.double()
        before = qkv.clone()
        kw = dict(start=start, q_norm=qn, k_norm=kn, cos=cos, sin=sin)
        out = mtp_layers.cached_attention(q, k, v, kt, vt, backend="triton", **kw)
        same = mtp_layers.cached_attention(q, k, v, ks, vs, backend="reference", **kw)
        exact = mtp_layers._attn_reference(q.double(), k.double(), v.double(), ke, ve, start, D**-0.5, qn.double(),
                                           kn.double(), cos64, sin64, 1e-6)
        assert torch.equal(qkv, before)  # q / k / v are read, not rotated in place
        assert_matches_reference(out, exact, same, name=f"attention start={start} T={T}")
        assert_matches_reference(kt, ke, ks, name="k cache (normalised + rotated)")
        assert torch.equal(vt, vs)  # v is cached as is
        untouched = torch.ones(L, dtype=torch.bool)
        untouched[start: start + T] = False
        assert torch.equal(kt[:, :, untouched], kc[:, :, untouched])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_cached_attention_empty_step(backend):
    """T = 0 (a valid, empty step) returns an empty output and leaves the caches alone on every backend."""
    q, k, v = torch.randn(1, 0, 4, 16), torch.randn(1, 0, 2, 16), torch.randn(1, 0, 2, 16)
    kc, vc = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    k0 = kc.clone()
    for start in (3, 8):
        out = mtp_layers.cached_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE),
                                          start=start, backend=backend)
        assert out.shape == (1, 0, 4, 16)
    assert torch.equal(kc, k0)


def test_rope_tables_match_transformers_rotary_embedding():
    cfg = Qwen3OmniMoeTalkerCodePredictorConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=16, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 1e6})
    rot = q3.Qwen3OmniMoeRotaryEmbedding(cfg) if hasattr(q3, "Qwen3OmniMoeRotaryEmbedding") else None
    if rot is None:
        pytest.skip("no Qwen3OmniMoeRotaryEmbedding in this transformers")
    pos = torch.arange(16)[None]
    for dtype in (torch.float64, torch.float32, torch.float16):
        want_cos, want_sin = rot(torch.zeros(1, dtype=dtype), pos)
        cos, sin = mtp_layers.rope_tables(16, rope_inv_freq(16, 1e6, "cpu"), dtype)
        assert torch.equal(torch.cat((cos, cos), -1), want_cos[0])
        assert torch.equal(torch.cat((sin, sin), -1), want_sin[0])


# --- the model: fused vs unfused layer paths -----------------------------------------------------------------------

def _predictor(dtype, fused=True, seed=0):
    """test_mtp's tiny random predictor 0 (fp64 weights: hidden 64, 4 q / 2 kv heads, d 16, 5 groups) in ``dtype``."""
    m, emb = _hf_predictor(0, torch.float64, seed=seed)
    return CodePredictor.from_state_dict(m.config, m.state_dict(), codec_embedding=emb, dtype=dtype, device=DEVICE,
                                         fused=fused)


def test_fused_and_unfused_paths_agree():
    cp = _predictor(torch.float32)
    assert cp.fused
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(3, 64, generator=g) * 2).to(DEVICE)
    c0 = torch.randint(0, 39, (3,), generator=g).to(DEVICE)
    for kw in (dict(do_sample=False), dict(top_k=8, top_p=0.9, seed=17)):
        # The reference ops of both paths are the same torch computations: identical results.
        fused_ref = cp.predict_frame(h, c0, backend="reference", use_graph=False, **kw)
        unfused_ref = cp.predict_frame(h, c0, backend="reference", use_graph=False, fused=False, **kw)
        assert torch.equal(fused_ref[0], unfused_ref[0])
        torch.testing.assert_close(fused_ref[1], unfused_ref[1], rtol=0, atol=0)
        for fused in (True, False) if kw.get("do_sample") is False else (True,):
            tri = cp.predict_frame(h, c0, backend="triton", use_graph=False, fused=fused, **kw)
            assert torch.equal(tri[0], fused_ref[0]), (fused, kw)
            torch.testing.assert_close(tri[1], fused_ref[1], rtol=1e-5, atol=1e-5)
    # The model-level switch and the graph cache key follow `fused`.
    bare = _predictor(torch.float32, fused=False)
    assert not bare.fused
    a = bare.predict_frame(h, c0, do_sample=False, backend="reference", use_graph=True)
    assert torch.equal(a[0], cp.predict_frame(h, c0, do_sample=False, backend="reference", use_graph=True)[0])
    assert {k[-1] for k in bare._graphs} == {False} and {k[-1] for k in cp._graphs} == {True}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_fused_step_logits_match_reference(dtype):
    """One prefill (T = 2) and one decode step (T = 1) of the fused Triton layers vs the reference in the same dtype
    and in fp64: logits within 2x the same-dtype reference's error (errors compound over the layers)."""
    cps = {name: _predictor(dt) for name, dt in (("tri", dtype), ("same", dtype), ("exact", torch.float64))}
    g = torch.Generator().manual_seed(11)
    B, c = 3, cps["tri"].config
    hs = torch.randn(B, 2, c.hidden_size, generator=g, dtype=torch.float64).to(DEVICE)
    h1 = torch.randn(B, 1, c.hidden_size, generator=g, dtype=torch.float64).to(DEVICE)
    logits = {}
    for name, cp in cps.items():
        dt = cp.table.dtype
        consts = cp._constants(DEVICE, B, dt)
        caches = [(torch.zeros(B, c.num_key_value_heads, c.num_code_groups, c.head_dim, device=DEVICE, dtype=dt),
                   torch.zeros(B, c.num_key_value_heads, c.num_code_groups, c.head_dim, device=DEVICE, dtype=dt))
                  for _ in cp.layers]
        be = "triton" if name == "tri" else "reference"
        step = cp._step_fused if name == "tri" else cp._step
        logits[name] = [step(hs.to(dt), 0, caches, consts, cp.lm_head[0], be),
                        step(h1.to(dt), 2, caches, consts, cp.lm_head[1], be)]
    for i in range(2):
        assert_matches_reference(logits["tri"][i], logits["exact"][i], logits["same"][i], name=f"logits step {i}")


def test_fused_decode_step_gathers_the_embedding():
    """A decode step given ``(table, ids)`` (the fused path gathers in the first GEMV) equals the step on the looked-up
    embeddings, on both paths."""
    cp = _predictor(torch.float32)
    c, B = cp.config, 4
    ids = torch.tensor([0, 5, 31, 5], device=DEVICE)
    table = cp.table[39: 39 + c.vocab_size]  # codebook 1's table (39 = the codec vocabulary of codebook 0)
    consts = cp._constants(DEVICE, B, torch.float32)
    outs = []
    for fused, be, token in ((True, "triton", (table, ids)), (True, "triton", table[ids][:, None]),
                             (False, "reference", (table, ids))):
        caches = [(torch.zeros(B, c.num_key_value_heads, c.num_code_groups, c.head_dim, device=DEVICE),
                   torch.zeros(B, c.num_key_value_heads, c.num_code_groups, c.head_dim, device=DEVICE))
                  for _ in cp.layers]
        step = cp._step_fused if fused else cp._step
        outs.append((step(token, 2, caches, consts, cp.lm_head[1], be), caches[0][0].clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][0], outs[2][0], rtol=1e-5, atol=1e-5)


# --- bad input, traces ------------------------------------------------------------------------------------------


def test_gemv_bad_input():
    x, w, nw = torch.randn(2, 8), torch.randn(6, 8), torch.ones(8)
    sq = torch.randn(2, 8)
    with pytest.raises(ValueError, match="resid must not overlap x"):
        mtp_layers.linear_residual_(sq, sq, torch.randn(8, 8))  # other programs would read x while it is written
    buf = torch.randn(3, 16)  # side-by-side column blocks of one buffer share no element: allowed
    mtp_layers.linear_residual_(buf[:, :8], buf[:, 8:], torch.randn(8, 8), backend="reference")
    table = torch.randn(5, 8)
    with pytest.raises(ValueError, match="gathered must not overlap x"):
        mtp_layers.norm_linear(table, nw, w, rows=torch.tensor([0, 1]), gathered=table[3:5])
    with pytest.raises(ValueError, match="decode-sized"):
        mtp_layers.cached_attention(torch.randn(1, 9, 8, 16), torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16),
                                    torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16), start=0)
    with pytest.raises(ValueError, match="weight"):
        mtp_layers.norm_linear(x, nw, torch.randn(6, 7))
    with pytest.raises(ValueError, match="norm_weight"):
        mtp_layers.norm_linear(x, torch.ones(7), w)
    with pytest.raises(TypeError, match="weight"):
        mtp_layers.norm_linear(x, nw, w.half())
    with pytest.raises(TypeError, match="norm_weight"):
        mtp_layers.norm_linear(x, nw.half(), w)
    with pytest.raises(ValueError, match="even"):
        mtp_layers.norm_linear(x, nw, torch.randn(5, 8), swiglu=True)
    with pytest.raises(ValueError, match="x"):
        mtp_layers.norm_linear(torch.randn(8, 2).t(), nw, w)
    with pytest.raises(ValueError, match="resid"):
        mtp_layers.linear_residual_(torch.randn(2, 5), x, w)
    with pytest.raises(TypeError, match="resid"):
        mtp_layers.linear_residual_(torch.randn(2, 6).half(), x, w)
    with pytest.raises(ValueError, match="rows"):
        mtp_layers.norm_linear(x, nw, w, rows=torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="rows"):
        mtp_layers.norm_linear(x, nw, w, rows=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="gathered needs rows"):
        mtp_layers.norm_linear(x, nw, w, gathered=torch.empty(2, 8))
    with pytest.raises(ValueError, match="gathered"):
        mtp_layers.norm_linear(x, nw, w, rows=torch.tensor([0, 1, 1]), gathered=torch.empty(2, 8))
    with pytest.raises(ValueError, match="overlapping"):
        mtp_layers.linear_residual_(torch.randn(1, 6).expand(2, 6), x, w)
    q, kv, cache = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 2, 16), torch.zeros(1, 2, 4, 16)
    cos, sin = mtp_layers.rope_tables(4, rope_inv_freq(16, 1e6, "cpu"), torch.float32)
    ones = torch.ones(16)
    with pytest.raises(ValueError, match="go together"):
        mtp_layers.cached_attention(q, kv, kv, cache, cache.clone(), start=0, q_norm=ones, k_norm=ones)
    with pytest.raises(ValueError, match="cos/sin need"):
        mtp_layers.cached_attention(q, kv, kv, cache, cache.clone(), start=3, q_norm=ones, k_norm=ones,
                                    cos=cos[:3], sin=sin[:3])
    with pytest.raises(ValueError, match="sin"):
        mtp_layers.cached_attention(q, kv, kv, cache, cache.clone(), start=0, q_norm=ones, k_norm=ones, cos=cos,
                                    sin=sin[:, :4])
    with pytest.raises(ValueError, match="even"):
        odd = torch.randn(1, 1, 2, 15)
        mtp_layers.cached_attention(odd, odd, odd, torch.zeros(1, 2, 4, 15), torch.zeros(1, 2, 4, 15), start=0,
                                    q_norm=torch.ones(15), k_norm=torch.ones(15), cos=cos, sin=sin)


def test_gemv_ops_trace_fullgraph():
    x, w, nw = torch.randn(3, 8), torch.randn(6, 8), torch.ones(8)
    cos, sin = mtp_layers.rope_tables(4, rope_inv_freq(16, 1e6, "cpu"), torch.float32)
    q, kv = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 2, 16)
    ones = torch.ones(16)

    def body(x, resid, cache):
        y = mtp_layers.norm_linear(x, nw, w, swiglu=True, backend="reference")
        y = y + mtp_layers.norm_linear(x, nw, w, swiglu=True, rows=rows, gathered=x_rows, backend="reference")
        mtp_layers.linear_residual_(resid, y, w[:, :3], backend="reference")
        a = mtp_layers.cached_attention(q, kv, kv, cache, cache.clone(), start=1, q_norm=ones, k_norm=ones, cos=cos,
                                        sin=sin, backend="reference")
        return y, resid, a

    fn = torch.compile(body, fullgraph=True, backend="eager")
    rows, x_rows = torch.tensor([2, 0, 2]), torch.empty(3, 8)
    r1, r2, c1, c2 = torch.randn(3, 6), None, torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4, 16)
    r2 = r1.clone()
    for a, b in zip(fn(x, r1, c1), body(x, r2, c2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- GPU: bf16 at the real shapes -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_shapes(M, dtype):
    shapes = {"qkv": (4096, 1024, False, True), "gate_up": (3072, 1024, True, True), "lm_head": (2048, 1024, False,
                                                                                                    True)}
    for i, (N, K, swiglu, norm) in enumerate(shapes.values()):
        _check_norm_linear(M, N, K, swiglu, norm, dtype, seed=i)
    for i, (N, K) in enumerate(((1024, 2048), (1024, 3072))):  # o-proj, down-proj
        _check_linear_residual(M, N, K, dtype, seed=10 + i)


@pytest.mark.gpu
def test_gpu_fused_and_unfused_graphs_agree_bf16():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTalkerCodePredictorConfig

    cfg = Qwen3OmniMoeTalkerCodePredictorConfig(num_code_groups=16, rope_parameters={"rope_type": "default",
                                                                                       "rope_theta": 1e6})
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = q3.Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration(cfg).to(torch.bfloat16).eval()
        emb = torch.nn.Embedding(3072, cfg.hidden_size).to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    cp = CodePredictor.from_transformers(m, emb)
    for B in (1, 16, 64):
        h = torch.randn(B, 1024, device="cuda", dtype=torch.bfloat16)
        c0 = torch.randint(0, 2048, (B,), device="cuda")
        fused = cp.predict_frame(h, c0, do_sample=False, use_graph=True, backend="triton")
        eager = cp.predict_frame(h, c0, do_sample=False, use_graph=False, backend="triton")
        assert torch.equal(fused[0], eager[0])
        unfused = cp.predict_frame(h, c0, do_sample=False, use_graph=True, backend="triton", fused=False)
        # Different (equally valid) bf16 roundings: the first predicted code agrees on nearly every row.
        assert (fused[0][:, 1] == unfused[0][:, 1]).float().mean() >= 0.75
        x = torch.randn(B, 1024, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, cp.layers[0].qkv)
        got = mtp_layers.norm_linear(x, None, cp.layers[0].qkv, backend="triton")
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
