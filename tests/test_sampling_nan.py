"""NaN logits in ``omni_fast.ops.sample``: a NaN is -inf on every backend (never drawn, never counted by top-k or
top-p, out of the softmax), so a row draws exactly what the same row with its NaNs replaced by -inf draws, and a
row of only NaN (and -inf) gives id 0, as a row of only -inf. Reference, Triton (interpreter; the single-CTA and the
chunked sampler) and the CUDA C++ sampler on the host emulator. Tiny shapes: every test well under a second."""

import pytest
import torch

import omni_fast
from omni_fast.reference import sampling as ref
from omni_fast.testing import DEVICE

from _sampling_helpers import emu_library, emu_sample, use_small_chunks  # noqa: E402

NAN, NEG = float("nan"), float("-inf")
WARPERS = [
    dict(greedy=True),
    dict(top_k=1),
    dict(top_k=3),
    dict(top_p=0.5),
    dict(temperature=1.3),
    dict(temperature=0.7, top_k=3, top_p=0.8),
    dict(top_k=3, repetition_penalty=1.5, suppress_ranges=[(9, 11)]),
]


@pytest.fixture(scope="module")
def cuda_emu(build_cuda_emu):
    return emu_library(build_cuda_emu)


def _draw(backend, request, logits, **kw):
    """int64 ``[B]`` ids from ``backend`` ("reference", "triton", or "cuda": the CUDA C++ sampler emulated)."""
    if backend == "cuda":
        seed = kw.pop("seed")
        return emu_sample(request.getfixturevalue("cuda_emu"), logits.cpu().float(), seed=seed.cpu(), **kw)
    return omni_fast.ops.sample(logits.to(DEVICE), backend=backend, **kw).cpu()


def _nan_rows() -> torch.Tensor:
    """fp32 ``[5, 12]``: one NaN; 6 NaNs; all NaN; NaN and -inf only; 4 NaNs beside -inf and ties (integer scores,
    the max tied at ids 0 and 5, ties at every top-k threshold). More NaNs than any k of :data:`WARPERS`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, generator=g) * 2
    x[0, 4] = NAN
    x[1, [0, 2, 3, 7, 8, 11]] = NAN
    x[2] = NAN
    x[3] = torch.tensor([NAN, NEG, NAN, NAN, NEG, NEG, NAN, NAN, NEG, NAN, NAN, NEG])
    x[4] = torch.tensor([2.0, NAN, 1.0, NEG, NAN, 2.0, 1.0, NEG, NAN, 1.0, 0.0, NAN])
    return x


def _as_neg_inf(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.isnan(), torch.full_like(x, NEG), x)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_audit_row_draws_the_finite_max(backend, request):
    """The audit's row [0.1, nan, 0.3, 5.0]: greedy, top-k 1 and top-p 0.5 all give id 3 (before, the reference
    gave 1, 0, 0: NaN as torch.argmax's maximum, a NaN-poisoned top-k / top-p; Triton gave 3, 3, 3)."""
    logits = torch.tensor([[0.1, NAN, 0.3, 5.0]])
    for kw in (dict(greedy=True), dict(top_k=1), dict(top_p=0.5)):
        assert _draw(backend, request, logits, seed=torch.tensor([3]), **kw).tolist() == [3], kw


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("kw", WARPERS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_nan_is_neg_inf(backend, kw, request):
    """Every backend draws, for shared and per-row seeds, the reference's ids for the row with NaN -> -inf; no NaN
    id is ever drawn; rows of only NaN (and -inf) give id 0 (the all -inf rule)."""
    x, seeds = _nan_rows(), (torch.tensor([11]), torch.tensor([5, 6, 7, 8, 9]))
    if backend == "cuda":  # the emulator runs each search pass as ~80 barriers of 64 host threads: 2 rows, 1 seed
        x, seeds = x[[2, 4]].contiguous(), (torch.tensor([6, 9]),)
    B = x.shape[0]
    prev = torch.tensor([[4, 1, -1]] * B) if "repetition_penalty" in kw else None  # the penalty lands on NaNs too
    dead = (x.isnan() | (x == NEG)).all(1)
    for seed in seeds:
        want = ref.sample(_as_neg_inf(x), prev_ids=prev, seed=seed, offset=torch.tensor([2]), **kw)
        got = _draw(backend, request, x, prev_ids=None if prev is None else prev.to(DEVICE),
                    seed=seed.to(DEVICE) if backend != "cuda" else seed, offset=2, **kw)
        assert torch.equal(got, want), (seed, got, want)
        assert (got[dead] == 0).all() and not x[torch.arange(B), got][~dead].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nan_16bit_logits_triton(dtype):
    """fp16 / bf16 NaNs (loaded and widened by the kernel) are -inf too."""
    x = _nan_rows().to(dtype)
    for kw in (dict(greedy=True), dict(top_k=4, top_p=0.8)):
        want = ref.sample(_as_neg_inf(x.float()), seed=torch.tensor([4]), **kw)
        assert torch.equal(omni_fast.ops.sample(x.to(DEVICE), seed=4, backend="triton", **kw).cpu(), want), kw


@pytest.mark.parametrize("kw", [dict(greedy=True), dict(top_k=1), dict(top_k=16, top_p=0.7, temperature=0.6)])
def test_nan_chunked_sampler(monkeypatch, kw):
    """The two-stage sampler (chunks of 128 ids, 16 candidates each): a chunk with more NaNs than candidates, a
    row of NaN and -inf only, one NaN at a chunk's max; the draws are the reference's with NaN -> -inf."""
    use_small_chunks(monkeypatch)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 300, generator=g) * 3
    x[0, :40] = NAN  # chunk 0: 40 NaNs > 16 candidates
    x[1] = torch.where(torch.rand(300, generator=g) < 0.5, NAN, NEG)
    x[2, int(x[2].argmax())] = NAN
    seed = torch.tensor([1, 2, 3])
    want = ref.sample(_as_neg_inf(x), seed=seed, **kw)
    assert torch.equal(omni_fast.ops.sample(x.to(DEVICE), seed=seed.to(DEVICE), backend="triton", **kw).cpu(), want)
    assert want[1] == 0 and not x[0, want[0]].isnan() and not x[2, want[2]].isnan()
