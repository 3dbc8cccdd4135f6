"""Sampling: distribution (chi-square), suppression, batch invariance, per-row seeds and offsets, bad input, compile
trace, CUDA-graph capture, extreme random bits."""

import math

import pytest
import torch

import omni_fast
from omni_fast.testing import DEVICE

transformers = pytest.importorskip("transformers")

from _sampling_helpers import BACKENDS, _warp  # noqa: E402


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
