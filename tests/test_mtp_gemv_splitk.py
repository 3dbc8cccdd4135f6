"""Split-K of the MTP residual GEMVs (``mtp_gemv.linear_residual_(..., split_k=True)``, opt-in until a GPU run):
the split kernel against the reference at odd sizes, M = 0 / 1, K not a multiple of the block; deterministic, batch
invariant per row, counters back to zero; the split choice from N and K only; bf16 real shapes and CUDA-graph
replay (gpu)."""

import pytest
import torch

from omni_fast.kernels import mtp_gemv, tile_counters
from omni_fast.ops import mtp_layers
from omni_fast.testing import DEVICE, KERNEL_DTYPES, assert_matches_reference


def _inputs(M, N, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    resid = (torch.randn(M, N, generator=g) * 3.0).to(DEVICE, dtype)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(DEVICE, dtype)
    return resid, x, w


def test_split_choice_depends_on_n_and_k_only():
    """The real o-proj / down-proj (N 1024: 64 programs of 16 columns) split into 3, giving 192 programs; wide
    GEMVs and single-K-block ones are not split; every split is whole BLOCK_K steps and none is empty."""
    assert mtp_gemv.gemv_splits(1024, 2048) == (3, 768)
    assert mtp_gemv.gemv_splits(1024, 3072) == (3, 1024)
    assert mtp_gemv.gemv_splits(4096, 1024) == (1, 1024)
    assert mtp_gemv.gemv_splits(40, 80) == (1, 80)
    for N, K in ((40, 1000), (24, 600), (16, 513), (1024, 2048), (7, 4096)):
        splits, per = mtp_gemv.gemv_splits(N, K)
        bk = mtp_gemv.gemv_blocks(1, N, K)["BLOCK_K"]
        assert per % bk == 0 and (splits - 1) * per < K <= splits * per and splits <= mtp_gemv.MAX_SPLITS


# K 1000 / 600 / 513: 4 / 3 / 3 splits (the last one partial); N 40 / 24 not multiples of BLOCK_N; M 0, 1, 3, 17.
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,N,K", [(0, 40, 1000), (1, 40, 1000), (3, 24, 600), (17, 16, 513), (1, 7, 4096)])
def test_splitk_residual_matches_reference(M, N, K, dtype):
    resid, x, w = _inputs(M, N, K, dtype, seed=M + N + K)
    assert mtp_gemv.gemv_splits(N, K)[0] > 1
    tri, same, exact = resid.clone(), resid.clone(), resid.double()
    mtp_gemv.linear_residual_(tri, x, w, split_k=True)
    mtp_layers.linear_residual_(same, x, w, backend="reference")
    mtp_layers._linear_residual_reference(exact, x.double(), w.double())
    assert_matches_reference(tri, exact, same, name=f"split-K linear_residual_ M{M} N{N} K{K}")
    cnt = tile_counters.eager_counters(DEVICE)
    assert cnt is None or not cnt.any()  # every tile reset its counter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_splitk_is_deterministic_and_batch_invariant(dtype):
    """Row r is bit-identical whatever M (the split depends on N, K) and from run to run (fixed-order sum)."""
    resid, x, w = _inputs(40, 24, 600, dtype, seed=5)
    outs = {}
    for M in (1, 3, 17, 40):
        r = resid[:M].clone()
        mtp_gemv.linear_residual_(r, x[:M], w, split_k=True)
        outs[M] = r
    again = resid.clone()
    mtp_gemv.linear_residual_(again, x, w, split_k=True)
    assert torch.equal(again, outs[40])
    for M, got in outs.items():
        assert torch.equal(got, outs[40][:M]), M


def test_splitk_off_by_default_is_todays_launch(fast_path):
    """Opt-in: without the flag the residual GEMV is today's one-kernel path, bit for bit."""
    resid, x, w = _inputs(3, 24, 600, torch.float32, seed=9)
    a, b = resid.clone(), resid.clone()
    mtp_layers.linear_residual_(a, x, w, backend="triton")
    mtp_gemv._launch(x, None, w, b, 24, 0.0, mtp_gemv.RESIDUAL)
    assert torch.equal(a, b)
    fast_path("gemv_splitk")  # OMNI_FAST_GEMV_SPLITK=1
    c = resid.clone()
    mtp_layers.linear_residual_(c, x, w, backend="triton")
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 64])
def test_gpu_splitk_real_shapes_bf16(M):
    """o-proj (K 2048) and down-proj (K 3072) at bf16 on the GPU: against the reference, 20 runs bit-identical
    (the last-arriver reduction), counters zero afterwards, and a CUDA-graph replay equal to the eager call."""
    for K in (2048, 3072):
        resid, x, w = _inputs(M, 1024, K, torch.bfloat16, seed=K)
        tri, same, exact = resid.clone(), resid.clone(), resid.double()
        mtp_gemv.linear_residual_(tri, x, w, split_k=True)
        mtp_layers.linear_residual_(same, x, w, backend="reference")
        mtp_layers._linear_residual_reference(exact, x.double(), w.double())
        assert_matches_reference(tri, exact, same, name=f"split-K M{M} K{K}")
        for _ in range(20):
            r = resid.clone()
            mtp_gemv.linear_residual_(r, x, w, split_k=True)
            assert torch.equal(r, tri)
        torch.cuda.synchronize()
        assert not tile_counters.eager_counters(x.device).any()
        static = resid.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mtp_gemv.linear_residual_(static, x, w, split_k=True)
        static.copy_(resid)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, tri)


@pytest.mark.gpu
def test_gpu_splitk_on_two_streams_at_once_bf16():
    """Split-K launches on two streams at once (two server threads) and a graph replayed beside them: each on its
    own tile counters (kernels/tile_counters.py), every result bit-identical to the same call run alone. With one
    set per device their tickets mixed (a tile reduced before all its splits landed)."""
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    cases = [_inputs(64, 1024, K, torch.bfloat16, seed=K) for K in (2048, 3072)]
    alone = []
    for resid, x, w in cases:
        alone.append(resid.clone())
        mtp_gemv.linear_residual_(alone[-1], x, w, split_k=True)
    static = cases[0][0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mtp_gemv.linear_residual_(static, cases[0][1], cases[0][2], split_k=True)
    outs = [[c[0].clone() for _ in range(50)] for c in cases]
    torch.cuda.synchronize()
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for i in range(50):  # interleaved launches on the two streams: their kernels overlap on the device
        for (resid, x, w), s, out in zip(cases, streams, outs):
            with torch.cuda.stream(s):
                mtp_gemv.linear_residual_(out[i], x, w, split_k=True)
        static.copy_(cases[0][0])
        graph.replay()
    torch.cuda.synchronize()
    for out, want in zip(outs, alone):
        assert all(torch.equal(o, want) for o in out)
    assert torch.equal(static, alone[0])
