"""Sampling: reference vs transformers' processors/warpers, Triton vs reference draw for draw, distribution
(chi-square), suppression, batch invariance, RNG, bad input, compile trace. Also the RVQ embedding op."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omni_fast
from omni_fast.reference import rvq as ref_rvq
from omni_fast.reference import sampling as ref
from omni_fast.testing import DEVICE, KERNEL_DTYPES, assert_matches_reference

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as lp  # noqa: E402

BACKENDS = ["reference", "triton"]


def _warp(scores, temperature, top_k, top_p):
    """transformers' warper chain, as generate(do_sample=True) builds it."""
    s = scores.clone()
    if temperature != 1.0:
        s = lp.TemperatureLogitsWarper(temperature)(None, s)
    if top_k:
        s = lp.TopKLogitsWarper(top_k)(None, s)
    if top_p < 1.0:
        s = lp.TopPLogitsWarper(top_p)(None, s)
    return s


# --- reference vs transformers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 50, 0.8), (0.7, 0, 0.9), (1.3, 10, 1.0), (1.0, 0, 0.5),
                                                     (1.0, 3, 0.3), (0.5, 200, 0.95)])
def test_keep_set_matches_transformers_warpers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(64, 300, generator=g) * 2.5
    ours = ref.keep_mask(ref.apply_processors(logits) * (1.0 / temperature), top_k=top_k, top_p=top_p)
    theirs = torch.isfinite(_warp(logits, temperature, top_k, top_p))
    assert torch.equal(ours, theirs)


def test_greedy_matches_transformers_processors():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 97, generator=g)
    prev = torch.randint(0, 97, (16, 5), generator=g)
    s = lp.RepetitionPenaltyLogitsProcessor(1.3)(prev, logits.clone())
    s = lp.SuppressTokensLogitsProcessor(list(range(10, 40)) + [90])(prev, s)
    ours = omni_fast.ops.sample(logits, greedy=True, repetition_penalty=1.3, prev_ids=prev,
                                suppress_ranges=[(10, 40), (90, 91)], backend="reference")
    assert torch.equal(ours, s.argmax(-1))


def test_rng_bits_are_uniform_and_row_keyed():
    bits = ref.uniform_bits(torch.tensor([11]), torch.tensor([0]), 64, 1024)
    u = (bits >> 8).double() / 2**24
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert len(torch.unique(bits)) > 0.99 * bits.numel()
    # 2**31 boundary: the split multiply must wrap exactly like uint32 arithmetic.
    x = torch.tensor([0xFFFFFFFF, 0x80000000, 12345], dtype=torch.long)
    want = torch.tensor([(v * ref.MIX_A) % 2**32 for v in x.tolist()])
    assert torch.equal(ref._mul32(x, ref.MIX_A), want)


# --- Triton (and CUDA) vs reference: identical draws -------------------------------------------------------------


def _cases():
    return [
        dict(top_k=50, top_p=0.8),
        dict(top_k=7, top_p=1.0, temperature=0.6),
        dict(top_k=0, top_p=0.9, temperature=1.4),
        dict(top_k=0, top_p=1.0),
        dict(greedy=True),
        dict(top_k=5, top_p=0.7, repetition_penalty=1.5, suppress_ranges=[(0, 3), (10, 12)]),
    ]


@pytest.mark.parametrize("kw", _cases())
@pytest.mark.parametrize("V", [37, 2048])
def test_triton_draws_equal_reference(kw, V):
    g = torch.Generator().manual_seed(V)
    B = 3
    logits = (torch.randn(B, V, generator=g) * 3).to(DEVICE)
    prev = torch.randint(-1, V, (B, 4), generator=g).to(DEVICE) if "repetition_penalty" in kw else None
    seed = torch.tensor([5, 6, 7], device=DEVICE)
    a = omni_fast.ops.sample(logits, prev_ids=prev, seed=seed, offset=9, backend="reference", **kw)
    b = omni_fast.ops.sample(logits, prev_ids=prev, seed=seed, offset=9, backend="triton", **kw)
    assert torch.equal(a, b)


def test_triton_ties_multiblock_and_fp16():
    g = torch.Generator().manual_seed(1)
    # Integer logits: many ties at the top-k threshold and inside top-p; V > 4096 streams two blocks.
    logits = torch.randint(-3, 4, (2, 5000), generator=g).float()
    logits[:, 4500] = 9.0
    logits[:, 17] = 9.0  # a tie for the max: greedy must pick the lower id
    for kw in (dict(top_k=20, top_p=0.5), dict(greedy=True), dict(top_k=3000)):
        a = omni_fast.ops.sample(logits.to(DEVICE), seed=3, backend="reference", **kw)
        b = omni_fast.ops.sample(logits.to(DEVICE), seed=3, backend="triton", **kw)
        assert torch.equal(a, b), kw
    assert omni_fast.ops.sample(logits.to(DEVICE), greedy=True, backend="triton").tolist() == [17, 17]
    half = (torch.randn(3, 50, generator=g) * 2).half().to(DEVICE)
    a = omni_fast.ops.sample(half, top_k=10, top_p=0.8, seed=2, backend="reference")
    b = omni_fast.ops.sample(half, top_k=10, top_p=0.8, seed=2, backend="triton")
    assert torch.equal(a, b)


@pytest.fixture
def small_chunks(monkeypatch):
    """The two-stage sampler (kernels/sampling_chunked.py) at interpreter-sized chunks: 128 ids, 16 candidates
    each (the GPU's 4096 / 64 cost ~20 s per chunk on the interpreter); V > 128 then runs several chunks."""
    from omni_fast.kernels import sampling_chunked

    monkeypatch.setattr(sampling_chunked, "CHUNK", 128)
    monkeypatch.setattr(sampling_chunked, "KC", 16)
    return sampling_chunked


@pytest.mark.parametrize("kw", [dict(top_k=10, top_p=0.8), dict(top_k=16, top_p=1.0, temperature=0.6),
                                dict(top_k=1), dict(greedy=True),
                                dict(top_k=5, top_p=0.7, repetition_penalty=1.5, suppress_ranges=[(0, 3), (130, 140)])])
def test_chunked_draws_equal_reference(small_chunks, monkeypatch, kw):
    """Several CTAs per row (3 chunks, the last one partial), per-row and shared seeds: the fast branch alone
    (FALLBACK off: no row overflows on random logits) draws the reference's ids, and only its two kernels run."""
    from omni_fast.bench.costmodel.counter import count_launches

    monkeypatch.setattr(small_chunks, "FALLBACK", False)
    g = torch.Generator().manual_seed(3)
    B, V = 3, 300
    logits = (torch.randn(B, V, generator=g) * 3).to(DEVICE)
    prev = torch.randint(-1, V, (B, 4), generator=g).to(DEVICE) if "repetition_penalty" in kw else None
    for seed in (torch.tensor([5, 6, 7], device=DEVICE), 11):
        a = omni_fast.ops.sample(logits, prev_ids=prev, seed=seed, offset=9, backend="reference", **kw)
        b = omni_fast.ops.sample(logits, prev_ids=prev, seed=seed, offset=9, backend="triton", **kw)
        assert torch.equal(a, b), (kw, a, b)
    counts = count_launches(lambda: omni_fast.ops.sample(logits, prev_ids=prev, seed=1, backend="triton", **kw))
    assert counts.get("triton:sample_chunk_topk_kernel") == 1 and counts.get("triton:sample_combine_kernel") == 1
    assert "triton:sample_kernel" not in counts


def test_chunked_ties_take_the_multipass_fallback(small_chunks, monkeypatch):
    """Ties at the k-th score that overflow a chunk's candidates (or all but fewer than k ids suppressed) are seen
    (FALLBACK off: -1) and sampled by the multi-pass path in the same kernel (FALLBACK on: the reference's ids);
    rows without overflow take the fast branch in the same launch."""
    g = torch.Generator().manual_seed(4)
    V = 400
    logits = torch.randn(4, V, generator=g) * 3
    logits[0] = torch.randint(-2, 3, (V,), generator=g).float()  # ~80 ids tie at each value: overflow
    logits[0, 333] = 7.0
    logits[1, :] = float("-inf")
    logits[1, [5, 250]] = 1.0  # 2 finite ids < k
    logits = logits.to(DEVICE)
    kw = dict(top_k=12, top_p=0.9, seed=torch.tensor([1, 2, 3, 4], device=DEVICE))
    monkeypatch.setattr(small_chunks, "FALLBACK", False)
    marked = omni_fast.ops.sample(logits, backend="triton", **kw)
    assert marked[0] == -1 and marked[1] == -1 and (marked[2:] >= 0).all()
    monkeypatch.setattr(small_chunks, "FALLBACK", True)
    got = omni_fast.ops.sample(logits, backend="triton", **kw)
    assert torch.equal(got, omni_fast.ops.sample(logits, backend="reference", **kw))
    assert torch.equal(got[2:], marked[2:])


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # the patch is constant
@given(B=st.integers(1, 2), V=st.integers(129, 420), top_k=st.integers(1, 16), top_p=st.floats(0.05, 1.0),
       temperature=st.sampled_from([1.0, 0.3, 2.0]), scale=st.sampled_from([0.01, 1.0, 30.0]),
       ties=st.booleans(), seed=st.integers(-2**63, 2**63 - 1))
def test_chunked_draws_equal_reference_hypothesis(small_chunks, B, V, top_k, top_p, temperature, scale, ties, seed):
    g = torch.Generator().manual_seed(V * 7 + B)
    logits = torch.randn(B, V, generator=g) * scale
    if ties:
        logits = logits.round()
    logits[:, 1] = float("-inf")
    kw = dict(top_k=top_k, top_p=top_p, temperature=temperature, seed=seed, offset=3)
    a = omni_fast.ops.sample(logits.to(DEVICE), backend="reference", **kw)
    b = omni_fast.ops.sample(logits.to(DEVICE), backend="triton", **kw)
    assert torch.equal(a, b)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), V=st.integers(1, 300), top_k=st.integers(0, 40), top_p=st.floats(0.05, 1.0),
       temperature=st.sampled_from([1.0, 0.3, 2.0]), scale=st.sampled_from([0.01, 1.0, 30.0]),
       ties=st.booleans(), seed=st.integers(-2**63, 2**63 - 1), offset=st.integers(0, 2**40))
def test_triton_draws_equal_reference_hypothesis(B, V, top_k, top_p, temperature, scale, ties, seed, offset):
    g = torch.Generator().manual_seed(V * 7 + B)
    logits = torch.randn(B, V, generator=g) * scale
    if ties:
        logits = logits.round()
    if V > 4:
        logits[:, 1] = float("-inf")
    kw = dict(top_k=top_k, top_p=top_p, temperature=temperature, seed=seed, offset=offset)
    a = omni_fast.ops.sample(logits.to(DEVICE), backend="reference", **kw)
    b = omni_fast.ops.sample(logits.to(DEVICE), backend="triton", **kw)
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])  # cuda: kernels/cuda/sampling.cu through CuPy
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_draws_equal_reference(backend, dtype):
    if backend == "cuda":
        pytest.importorskip("cupy")
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 2048, generator=g) * 3).to("cuda", dtype)
    seeds = torch.arange(64, device="cuda")
    for kw in _cases():
        prev = torch.randint(0, 2048, (64, 4), device="cuda") if "repetition_penalty" in kw else None
        a = omni_fast.ops.sample(logits, prev_ids=prev, seed=seeds, offset=3, backend="reference", **kw)
        b = omni_fast.ops.sample(logits, prev_ids=prev, seed=seeds, offset=3, backend=backend, **kw)
        # The backends' log/exp may round differently: allow a rare near-tie flip, never more.
        assert (a != b).sum().item() <= 1, kw


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_chunked_sampler_real_vocab(dtype):
    """The two-stage sampler at the thinker's vocabulary (152064 ids: 38 chunks of 4096, 64 candidates each) equals
    the reference (a rare near-tie flip allowed, as above), tie rows included (the in-kernel fallback), and replays
    in a CUDA graph."""
    from omni_fast.kernels import sampling_chunked
    from omni_fast.models.cuda_graphs import capture

    g = torch.Generator().manual_seed(0)
    V = 152064
    logits = torch.randn(8, V, generator=g) * 3
    logits[7] = torch.randint(-2, 3, (V,), generator=g).float()  # ties at the k-th score: the fallback
    logits = logits.to("cuda", dtype)
    seeds = torch.arange(8, device="cuda") * 7 + 1
    assert sampling_chunked.applies(V, 50, False)
    for kw in (dict(top_k=50, top_p=0.8), dict(top_k=50, top_p=0.8, temperature=0.7, repetition_penalty=1.3,
                                               prev_ids=torch.randint(0, V, (8, 6), device="cuda")),
               dict(top_k=1), dict(greedy=True)):
        a = omni_fast.ops.sample(logits, seed=seeds, offset=3, backend="reference", **kw)
        b = omni_fast.ops.sample(logits, seed=seeds, offset=3, backend="triton", **kw)
        assert (a != b).sum().item() <= 1, kw

    def draw():
        return omni_fast.ops.sample(logits, seed=seeds, top_k=50, top_p=0.8, backend="triton")

    eager = draw().clone()
    graph, out = capture(draw, "cuda")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


# --- the CUDA C++ kernel's logic, emulated on the CPU ------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_emu(build_cuda_emu):
    """kernels/cuda/sampling.cu compiled for the host with tests/cuda_emu (threads + barriers for a block)."""
    import ctypes

    lib = build_cuda_emu("emu.cpp")
    P, I, L, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float
    lib.emu_sample_f32.argtypes = [I, P, P, L, I, P, I, P, I, P, L, I, F, F, P, I, F, I, F, I, I, I, I, I]
    return lib


def _emu_sample(lib, logits, *, temperature=1.0, top_k=0, top_p=1.0, suppress_ranges=None, repetition_penalty=1.0,
                prev_ids=None, seed=0, offset=0, greedy=False):
    B, V = logits.shape
    out = torch.full((B,), -7, dtype=torch.long)
    seed_t = seed.long().reshape(-1).contiguous() if isinstance(seed, torch.Tensor) else torch.tensor([seed])
    seed_stride = 1 if seed_t.numel() > 1 else 0
    off_t = torch.tensor([offset], dtype=torch.long)
    pen = prev_ids is not None and repetition_penalty != 1.0
    sup = None if suppress_ranges is None else torch.tensor(suppress_ranges, dtype=torch.long)
    lib.emu_sample_f32(
        B, logits.data_ptr(), out.data_ptr(), logits.stride(0), V, seed_t.data_ptr(), seed_stride, off_t.data_ptr(), 0,
        prev_ids.data_ptr() if pen else out.data_ptr(), prev_ids.stride(0) if pen else 0,
        prev_ids.shape[1] if pen else 0, repetition_penalty, 1.0 / repetition_penalty,
        sup.data_ptr() if sup is not None else out.data_ptr(), 0 if sup is None else sup.shape[0], 1.0 / temperature,
        top_k, 1.0 - top_p, int(greedy), int(pen), int(temperature != 1.0 and not greedy), int(0 < top_k < V),
        int(top_p < 1.0))
    return out


@pytest.mark.parametrize("V,kw", [
    (300, dict(top_k=50, top_p=0.8)),
    (20, dict(top_k=4, top_p=0.6, temperature=0.7)),
    (130, dict(top_p=0.9, temperature=1.5)),
    (97, dict(greedy=True, repetition_penalty=1.3, suppress_ranges=[(0, 5), (40, 60)])),
    (64, dict(top_k=7, repetition_penalty=1.2, suppress_ranges=[(10, 20)])),
])
def test_cuda_kernel_logic_emulated(cuda_emu, V, kw):
    """The CUDA C++ sampler (never run here: no GPU) draws the reference's ids when its blocks run as host threads."""
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(2, V, generator=g) * 3
    if V == 64:
        logits = logits.round()  # ties
    prev = torch.randint(-1, V, (2, 3), generator=g) if "repetition_penalty" in kw else None
    got = _emu_sample(cuda_emu, logits, prev_ids=prev, seed=-77, offset=5, **kw)
    want = ref.sample(logits, prev_ids=prev, seed=torch.tensor([-77]), offset=torch.tensor([5]), **kw)
    assert torch.equal(got, want)


def test_cuda_kernel_per_row_seeds_emulated(cuda_emu):
    """The CUDA C++ kernel keys per-row seeds without the row index, like the reference: equal seeds on equal rows
    draw equal ids, and every row equals the reference."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 40, generator=g).expand(2, -1).contiguous() * 0.1  # flat: many ids are likely
    seeds = torch.tensor([7, 7])
    got = _emu_sample(cuda_emu, logits, seed=seeds, offset=2, top_k=30)
    want = ref.sample(logits, seed=seeds, offset=torch.tensor([2]), top_k=30)
    assert torch.equal(got, want) and got[0] == got[1]
    shared = _emu_sample(cuda_emu, logits, seed=7, offset=2, top_k=30)
    assert torch.equal(shared, ref.sample(logits, seed=torch.tensor([7]), offset=torch.tensor([2]), top_k=30))
    assert shared[0] == got[0]  # row 0 of a shared seed = that seed's stream


# --- distribution -----------------------------------------------------------------------------------------------


def _chi2_quantile(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.719: upper 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _assert_chi_square(ids: torch.Tensor, probs: torch.Tensor) -> None:
    """The draws ``ids`` (over the 10-id vocabulary) never hit a zero-probability id and pass Pearson's chi-square
    test against ``probs`` at the 1e-4 level."""
    N = ids.numel()
    counts = torch.bincount(ids, minlength=10).double()
    assert counts[probs == 0].sum() == 0
    live = probs > 0
    expected = probs[live] * N
    stat = ((counts[live] - expected) ** 2 / expected).sum().item()
    df = int(live.sum()) - 1
    assert df == 0 or stat < _chi2_quantile(df), (stat, df)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 0.8), (0.8, 0, 0.9), (1.0, 0, 1.0), (1.5, 6, 1.0)])
def test_chi_square_matches_warped_distribution(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.5, 0.1, -0.4, -1.0, -2.0, 0.7])
    probs = torch.softmax(_warp(logits[None], temperature, top_k, top_p)[0], -1).double()
    N = 40000
    # N independent draws in one call: one shared seed, so the row index in the key gives every row its own stream.
    ids = omni_fast.ops.sample(logits.expand(N, -1).contiguous(), temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=1234, backend="reference")
    _assert_chi_square(ids, probs)
    # The Triton kernel draws the very same ids (a slice: the interpreter is slow).
    n = 6
    tri = omni_fast.ops.sample(logits.expand(n, -1).contiguous().to(DEVICE), temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=1234, backend="triton")
    assert torch.equal(tri.cpu(), ids[:n])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 0.8), (0.8, 0, 0.9), (1.5, 6, 1.0)])
def test_gpu_chi_square_matches_warped_distribution(backend, temperature, top_k, top_p):
    """The GPU samplers' draws follow the warped distribution (the reference test's statistic, 200k draws)."""
    if backend == "cuda":
        pytest.importorskip("cupy")
    logits = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.5, 0.1, -0.4, -1.0, -2.0, 0.7])
    probs = torch.softmax(_warp(logits[None], temperature, top_k, top_p)[0], -1).double()
    N = 200000
    ids = omni_fast.ops.sample(logits.expand(N, -1).contiguous().cuda(), temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=4321, backend=backend).cpu()
    _assert_chi_square(ids, probs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_sample_captures_in_a_cuda_graph(backend):
    """ops.sample captured in a CUDA graph (default offset, i.e. the cached zero; and a device offset) replays the
    eager draws; new seeds written into the static seed buffer give the eager draws of those seeds."""
    if backend == "cuda":
        pytest.importorskip("cupy")
    from omni_fast.models.cuda_graphs import capture

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 2048, generator=g) * 3).to("cuda", torch.bfloat16)
    seeds = torch.arange(16, device="cuda") * 3 + 1
    offset = torch.tensor([4], device="cuda")
    kw = dict(top_k=50, top_p=0.8, temperature=0.9, suppress_ranges=[(2000, 2048)], backend=backend)

    def draw():
        return (omni_fast.ops.sample(logits, seed=seeds, **kw), omni_fast.ops.sample(logits, seed=seeds,
                                                                                       offset=offset, **kw))

    eager = [t.clone() for t in draw()]
    graph, out = capture(draw, "cuda")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
    seeds.add_(1000)
    offset.fill_(9)
    graph.replay()
    want = [t.clone() for t in draw()]
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    assert not torch.equal(out[1], eager[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_suppressed_ids_never_appear(backend):
    logits = torch.zeros(8, 40)
    logits[:, 30:] = 5.0  # the most likely ids are all suppressed
    n = 8 if backend == "triton" else 4000
    rows = logits[:1].expand(n, -1).contiguous().to(DEVICE)
    ids = omni_fast.ops.sample(rows, suppress_ranges=[(30, 40), (0, 5)], top_k=20, seed=9, backend=backend)
    assert ((ids >= 30) | (ids < 5)).sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_independent_of_batch_size(backend):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 64, generator=g).to(DEVICE)
    full = omni_fast.ops.sample(logits, top_k=10, top_p=0.9, seed=77, offset=4, backend=backend)
    part = omni_fast.ops.sample(logits[:2], top_k=10, top_p=0.9, seed=77, offset=4, backend=backend)
    assert torch.equal(full[:2], part)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_single_id_and_all_suppressed(backend):
    kw = dict(top_k=3, top_p=0.5, seed=1, backend=backend)
    assert omni_fast.ops.sample(torch.randn(0, 10, device=DEVICE), **kw).shape == (0,)
    assert omni_fast.ops.sample(torch.randn(3, 1, device=DEVICE), **kw).tolist() == [0, 0, 0]
    assert omni_fast.ops.sample(torch.full((2, 5), float("-inf"), device=DEVICE), **kw).tolist() == [0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_seed_draws_ignore_the_row_position(backend):
    """Per-row seeds: a row's draw depends on its seed, offset and logits only. Identical logits with seed 7 in
    rows 0..2 all draw what row 0 alone draws; permuting the rows permutes the draws. One shared seed still gives
    the rows different streams (the row index is in the key then)."""
    g = torch.Generator().manual_seed(4)
    flat = (torch.randn(1, 64, generator=g) * 0.05).to(DEVICE)  # nearly uniform: streams show in the ids
    same = omni_fast.ops.sample(flat.expand(3, -1).contiguous(), seed=torch.full((3,), 7, device=DEVICE), offset=2,
                                backend=backend)
    alone = omni_fast.ops.sample(flat, seed=7, offset=2, backend=backend)
    assert same.tolist() == [alone.item()] * 3
    logits = (torch.randn(5, 64, generator=g) * 0.5).to(DEVICE)
    seeds = torch.tensor([11, 12, 13, 14, 15], device=DEVICE)
    perm = torch.tensor([3, 0, 4, 1, 2], device=DEVICE)
    kw = dict(top_k=40, top_p=0.95, offset=torch.tensor([5], device=DEVICE), backend=backend)
    base = omni_fast.ops.sample(logits, seed=seeds, **kw)
    assert torch.equal(omni_fast.ops.sample(logits[perm], seed=seeds[perm], **kw), base[perm])
    assert torch.equal(base, omni_fast.ops.sample(logits, seed=seeds, **{**kw, "backend": "reference"}))
    shared = omni_fast.ops.sample(flat.expand(8, -1).contiguous(), seed=7, offset=2, backend=backend)
    assert shared[0] == alone and len(set(shared.tolist())) > 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_offset_is_a_cached_device_zero(monkeypatch, backend):
    """offset=None makes no tensor per call (a host->device copy would break a CUDA-graph capture): one cached
    zero per device, equal to offset=0."""
    from omni_fast.ops import sampling as ops_sampling

    logits = torch.randn(3, 20, device=DEVICE)
    seed = torch.tensor([9], device=DEVICE)
    want = omni_fast.ops.sample(logits, seed=seed, offset=0, top_k=5, backend=backend)
    omni_fast.ops.sample(logits, seed=seed, top_k=5, backend=backend)  # warm-up: the zero is made here
    zero = ops_sampling._device_zero(logits.device)

    def no_new_tensor(*a, **k):
        raise AssertionError("torch.tensor called on the sampler path")

    monkeypatch.setattr(torch, "tensor", no_new_tensor)
    got = omni_fast.ops.sample(logits, seed=seed, top_k=5, backend=backend)
    monkeypatch.undo()
    assert torch.equal(got, want)
    assert ops_sampling._device_zero(logits.device) is zero and zero.tolist() == [0]


def test_offset_changes_draws_and_seed_tensor_equals_int():
    logits = torch.zeros(256, 16)
    a = omni_fast.ops.sample(logits, seed=5, offset=0, backend="reference")
    b = omni_fast.ops.sample(logits, seed=5, offset=1, backend="reference")
    c = omni_fast.ops.sample(logits, seed=torch.tensor(5), offset=torch.tensor([0]), backend="reference")
    assert not torch.equal(a, b) and torch.equal(a, c)


# --- bad input / tracing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,err,match", [
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(prev_ids=torch.zeros(2, 3, dtype=torch.long)), ValueError, "prev_ids"),
    (dict(prev_ids=torch.zeros(4, 3)), TypeError, "prev_ids"),
    (dict(seed=torch.zeros(3, dtype=torch.long)), ValueError, "seed"),
    (dict(offset=1.5), TypeError, "offset"),
    (dict(suppress_ranges=torch.zeros(3, dtype=torch.long)), ValueError, "suppress_ranges"),
    (dict(suppress_ranges=[(5, 2)]), ValueError, "suppress_ranges"),
])
def test_bad_input(kw, err, match):
    with pytest.raises(err, match=match):
        omni_fast.ops.sample(torch.randn(4, 10), **kw)


def test_bad_logits():
    with pytest.raises(ValueError, match="logits"):
        omni_fast.ops.sample(torch.randn(10))
    with pytest.raises(TypeError, match="logits"):
        omni_fast.ops.sample(torch.zeros(2, 10, dtype=torch.long))


def test_compile_traces():
    logits = torch.randn(3, 20)
    seed = torch.tensor([4])
    fn = torch.compile(lambda x: omni_fast.ops.sample(x, top_k=5, top_p=0.8, seed=seed, backend="reference"),
                       fullgraph=True, backend="eager")
    assert torch.equal(fn(logits), omni_fast.ops.sample(logits, top_k=5, top_p=0.8, seed=seed, backend="reference"))


# --- RVQ embedding ------------------------------------------------------------------------------------------------


def test_rvq_reference_matches_code2wav_and_talker_sum():
    g = torch.Generator().manual_seed(0)
    G, V, D = 4, 11, 8
    emb = torch.nn.Embedding(G * V, D)
    offset = (torch.arange(G) * V).view(1, G, 1)
    codes = torch.randint(0, V, (2, G, 5), generator=g)  # Code2Wav layout [B, G, T]
    want = emb(codes + offset).mean(1)  # Qwen3OmniMoeCode2Wav: code_embedding(codes + code_offset).mean(1)
    got = ref_rvq.rvq_embed(codes.transpose(1, 2), emb.weight, reduce="mean", offsets=offset.flatten())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    tables = [torch.randn(v, D, dtype=torch.bfloat16, generator=g) for v in (13, 11, 11, 11)]
    c = torch.stack([torch.randint(0, t.shape[0], (6,), generator=g) for t in tables], -1)
    want = torch.cat([tables[i][c[:, i:i + 1]] for i in range(4)], 1).sum(1)  # the Talker's codec_hiddens.sum(1)
    torch.testing.assert_close(ref_rvq.rvq_embed(c, tables), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("N,G,D", [(0, 3, 16), (1, 1, 8), (7, 16, 40), (5, 4, 1100)])
def test_rvq_triton_matches_reference(dtype, N, G, D):
    g = torch.Generator().manual_seed(N + G)
    tables = [torch.randn(5 + i, D, generator=g).to(DEVICE, dtype) for i in range(G)]
    codes = torch.stack([torch.randint(0, 5 + i, (N, 2), generator=g) for i in range(G)], -1).to(DEVICE)
    big = torch.randn(9 * G, D, generator=g).to(DEVICE, dtype)
    offs = torch.arange(G) * 9
    bcodes = torch.randint(0, 9, (N, G), generator=g).to(DEVICE).int()
    for got, args, kw in [
        (omni_fast.ops.rvq_embed(codes, tables, backend="triton"), (codes, tables), {}),
        (omni_fast.ops.rvq_embed(bcodes, big, offsets=offs, reduce="mean", backend="triton"), (bcodes, big),
         dict(offsets=offs, reduce="mean")),
    ]:
        exact = ref_rvq.rvq_embed(args[0], [t.double() for t in args[1]] if isinstance(args[1], list)
                                  else args[1].double(), **kw)
        same = ref_rvq.rvq_embed(*args, **kw)
        assert_matches_reference(got, exact, same)


@pytest.mark.parametrize("call,err,match", [
    (lambda t, c: omni_fast.ops.rvq_embed(c + 100, t), ValueError, "codes"),
    (lambda t, c: omni_fast.ops.rvq_embed(c - 100, t), ValueError, "codes"),
    (lambda t, c: omni_fast.ops.rvq_embed(c[:, :2], t), ValueError, "codebooks"),
    (lambda t, c: omni_fast.ops.rvq_embed(c.float(), t), TypeError, "codes"),
    (lambda t, c: omni_fast.ops.rvq_embed(c, t, reduce="max"), ValueError, "reduce"),
    (lambda t, c: omni_fast.ops.rvq_embed(c, torch.cat(t), offsets=[0, 5]), ValueError, "offsets"),
    (lambda t, c: omni_fast.ops.rvq_embed(c, torch.cat(t), offsets=[0, 5, 100]), ValueError, "offsets"),
    (lambda t, c: omni_fast.ops.rvq_embed(c, t, offsets=[0, 5, 10]), ValueError, "offsets"),
    (lambda t, c: omni_fast.ops.rvq_embed(c, [t[0], t[1], torch.randn(5, 3)]), ValueError, "tables"),
    (lambda t, c: omni_fast.ops.rvq_embed(c, [t[0], t[1], t[2].half()]), TypeError, "tables"),
])
def test_rvq_bad_input(call, err, match):
    tables = [torch.randn(5, 4) for _ in range(3)]
    codes = torch.randint(0, 5, (2, 3))
    with pytest.raises(err, match=match):
        call(tables, codes)


def test_rvq_unchecked_bad_codes_add_nothing():
    """With the value check off (as on CUDA by default: no host sync), an out-of-range code adds nothing in the
    Triton kernel instead of reading outside its table (list of tables, and one table with offsets)."""
    g = torch.Generator().manual_seed(3)
    tables = [torch.randn(5, 8, generator=g).to(DEVICE) for _ in range(3)]
    codes = torch.tensor([[1, 5, 2], [-1, 0, 4], [0, 1, 2]], device=DEVICE)  # 5 and -1 are out of range
    got = omni_fast.ops.rvq_embed(codes, tables, check_values=False, backend="triton")
    want = torch.stack([tables[0][1] + tables[2][2], tables[1][0] + tables[2][4],
                        tables[0][0] + tables[1][1] + tables[2][2]])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    big, offs = torch.cat(tables), torch.tensor([0, 5, 10], device=DEVICE)
    got = omni_fast.ops.rvq_embed(torch.tensor([[1, 2, 5]], device=DEVICE), big, offsets=offs, check_values=False,
                                  backend="triton")  # 5 + offset 10 = row 15: past the table's 15 rows
    torch.testing.assert_close(got, (tables[0][1] + tables[1][2])[None], rtol=1e-6, atol=1e-6)


def test_rvq_compile_traces():
    tables = torch.randn(12, 4)
    offs = torch.tensor([0, 4, 8])
    codes = torch.randint(0, 4, (3, 3))
    fn = torch.compile(lambda c: omni_fast.ops.rvq_embed(c, tables, offsets=offs, backend="reference"),
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(codes), ref_rvq.rvq_embed(codes, tables, offsets=offs))


def test_gumbel_noise_is_finite_at_the_extreme_bits(monkeypatch):
    """All-ones random bits must not round u up to 1 (noise +inf would let any kept id win the race)."""
    from omni_fast.reference import sampling as ref_sampling

    monkeypatch.setattr(ref_sampling, "uniform_bits",
                        lambda seed, offset, rows, vocab: torch.full((rows, vocab), 0xFFFFFFFF, dtype=torch.long))
    hi = ref_sampling.gumbel_noise(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 2, 3)
    monkeypatch.setattr(ref_sampling, "uniform_bits",
                        lambda seed, offset, rows, vocab: torch.zeros((rows, vocab), dtype=torch.long))
    lo = ref_sampling.gumbel_noise(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 2, 3)
    assert torch.isfinite(hi).all() and torch.isfinite(lo).all()


def test_strided_per_row_seeds_read_like_contiguous_ones():
    import omni_fast

    logits = torch.randn(4, 50, device=DEVICE)
    pairs = torch.randint(0, 2**31, (4, 2), device=DEVICE)
    kw = dict(top_k=10, top_p=0.9)
    strided = omni_fast.ops.sample(logits, seed=pairs[:, 0], **kw, backend="triton")
    contiguous = omni_fast.ops.sample(logits, seed=pairs[:, 0].contiguous(), **kw, backend="triton")
    reference = omni_fast.ops.sample(logits, seed=pairs[:, 0].contiguous(), **kw, backend="reference")
    assert torch.equal(strided, contiguous) and torch.equal(contiguous, reference)
