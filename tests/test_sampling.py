"""Sampling: reference vs transformers' processors/warpers, Triton (and the CUDA kernel's logic on the CPU
emulator) vs reference draw for draw, the chunked two-stage sampler, GPU draws. Also: test_sampling_behaviour.py,
test_sampling_rvq.py."""

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omni_fast
from omni_fast.reference import sampling as ref
from omni_fast.testing import DEVICE

transformers = pytest.importorskip("transformers")

from transformers.generation import logits_process as lp  # noqa: E402

from _sampling_helpers import _warp, emu_library, emu_sample, use_small_chunks  # noqa: E402


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
    return use_small_chunks(monkeypatch)


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
    return emu_library(build_cuda_emu)


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
    got = emu_sample(cuda_emu, logits, prev_ids=prev, seed=-77, offset=5, **kw)
    want = ref.sample(logits, prev_ids=prev, seed=torch.tensor([-77]), offset=torch.tensor([5]), **kw)
    assert torch.equal(got, want)


def test_cuda_kernel_per_row_seeds_emulated(cuda_emu):
    """The CUDA C++ kernel keys per-row seeds without the row index, like the reference: equal seeds on equal rows
    draw equal ids, and every row equals the reference."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 40, generator=g).expand(2, -1).contiguous() * 0.1  # flat: many ids are likely
    seeds = torch.tensor([7, 7])
    got = emu_sample(cuda_emu, logits, seed=seeds, offset=2, top_k=30)
    want = ref.sample(logits, seed=seeds, offset=torch.tensor([2]), top_k=30)
    assert torch.equal(got, want) and got[0] == got[1]
    shared = emu_sample(cuda_emu, logits, seed=7, offset=2, top_k=30)
    assert torch.equal(shared, ref.sample(logits, seed=torch.tensor([7]), offset=torch.tensor([2]), top_k=30))
    assert shared[0] == got[0]  # row 0 of a shared seed = that seed's stream


def test_cuda_kernel_16bit_loads_emulated(cuda_emu):
    """sampling.cu reads fp16 / bf16 logits as raw 16-bit values (no CUDA header under NVRTC, like rope.cu and
    moe_routing.cu); its host branch converts every bit pattern as torch does (the device branch is one PTX cvt)."""
    import ctypes

    for name, dtype in (("emu_load_fp16", torch.float16), ("emu_load_bf16", torch.bfloat16)):
        fn = getattr(cuda_emu, name)
        fn.argtypes, fn.restype = [ctypes.c_ushort], ctypes.c_float
        bits = torch.arange(1 << 16, dtype=torch.int32)
        want = bits.to(torch.int16).view(dtype).float()
        got = torch.tensor([fn(int(b)) for b in bits.tolist()])
        num = ~want.isnan()  # bit for bit (-0.0 included: the sampler's order key puts -0.0 below +0.0)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[num].view(torch.int32),
                                                                      want[num].view(torch.int32)), name


def _nvrtc_includes(path: Path, seen: set) -> list[str]:
    """The headers ``path`` includes as NVRTC sees it (``__CUDACC_RTC__`` defined: the ``#ifndef __CUDACC_RTC__``
    parts dropped, ``#else`` parts kept), the project's own headers followed; a header not in kernels/cuda is
    returned as foreign."""
    depth, skip, foreign = 0, None, []
    for line in path.read_text().splitlines():
        words = line.strip().split()
        if not words or not words[0].startswith("#"):
            pass
        elif words[0] in ("#if", "#ifdef", "#ifndef"):
            depth += 1
            if skip is None and words[:2] == ["#ifndef", "__CUDACC_RTC__"]:
                skip = depth
        elif words[0] == "#else" and skip == depth:
            skip = -depth  # the else part of an nvcc-only block: NVRTC sees it
        elif words[0] == "#endif":
            skip = None if skip in (depth, -depth) else skip
            depth -= 1
        elif words[0] == "#include" and (skip is None or skip < 0):
            name = words[1].strip('<>"')
            own = path.parent / name
            if not own.is_file():
                foreign.append(f"{path.name}: {name}")
            elif own not in seen:
                seen.add(own)
                foreign += _nvrtc_includes(own, seen)
    return foreign


def test_nvrtc_sources_include_no_toolkit_header():
    """NVRTC finds no CUDA toolkit header by itself (and CuPy bundles no cuda_bf16.h): no .cu compiled at run time
    includes one outside its nvcc-only (``#ifndef __CUDACC_RTC__``) part, directly or through a project header."""
    cuda = Path(__file__).resolve().parent.parent / "kernels" / "cuda"
    for src in sorted(cuda.glob("*.cu")):
        assert not _nvrtc_includes(src, set()), src.name
    # the checker itself: the project's host-side headers include the toolkit's runtime API for NVRTC too
    assert _nvrtc_includes(cuda / "moe.h", set()) == ["moe.h: stdint.h", "moe.h: cuda_runtime_api.h"]
    assert _nvrtc_includes(cuda / "sampling.h", set()) == []


# --- distribution -----------------------------------------------------------------------------------------------
