"""MoE routing (top-k softmax, non-finite logits) and block alignment (out-of-range ids, expert maps) kernels vs
the reference, through the public ops."""

import pytest
import torch

from omni_fast import ops
from omni_fast.kernels import moe_gemm
from omni_fast.reference import moe as ref
from omni_fast.testing import DEVICE, KERNEL_DTYPES, assert_matches_reference

from _moe_helpers import (  # noqa: F401  (fixtures)
    _align_dropping_bad_ids,
    _assert_same_alignment,
    _block_weights,
    _ids,
    _weights,
    _with_bad_ids,
    weight_path,
)


# --- routing -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,k", [(0, 8, 2), (1, 128, 8), (13, 6, 6), (33, 12, 4), (7, 5, 3), (70, 3, 1)])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_softmax_kernel(T, E, k, renorm, dtype):
    logits = torch.randn(T, E, device=DEVICE).to(dtype)
    w, i = ops.route_topk(logits, k, renorm, backend="triton")
    rw, ri = ref.topk_softmax(logits, k, renorm)
    assert w.dtype == torch.float32 and i.dtype == torch.int32 and w.shape == (T, k)
    assert torch.equal(i, ri)
    torch.testing.assert_close(w, rw, rtol=2e-6, atol=1e-7)


def test_topk_softmax_kernel_ties_lowest_index_first():
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0], [5.0, -1.0, 5.0, 5.0, 0.0]],
                          device=DEVICE)
    _, i = ops.route_topk(logits, 2, backend="triton")
    assert i.tolist() == [[1, 2], [0, 1], [0, 2]]


INF, NAN = float("inf"), float("nan")


def _nonfinite_logits(E):
    """Finite rows around every kind of non-finite row: each row's softmax is NaN except the -inf-but-finite-max
    rows, which route normally."""
    rows = [torch.randn(E) for _ in range(3)]
    bad = [
        [NAN] + [0.5] * (E - 1),  # a NaN logit
        [0.1] * (E - 1) + [NAN],
        [INF] + [0.0] * (E - 1),  # +inf logits
        [0.0] * (E - 2) + [INF, INF],
        [-INF] * E,  # every logit -inf
        [INF] + [-INF] * (E - 1),
        [NAN] * E,
        [-INF] * (E - 1) + [1.0],  # -inf with a finite maximum: ordinary routing
        [2.0] + [-INF] * (E - 1),
    ]
    for i, row in enumerate(bad):
        rows.insert(2 * i + 1, torch.tensor(row))
    return torch.stack(rows).to(DEVICE)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN / inf
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("E,k", [(6, 4), (8, 2), (128, 8), (3, 3)])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_softmax_nonfinite_rows_match_reference(backend, E, k, renorm, dtype):
    """NaN / +inf / all -inf rows: ids 0..k-1 (NaN ranks first, as torch.sort / torch.topk), NaN weights, like the
    reference; never an id >= E (which the alignment would use as an atomic address); other rows unaffected."""
    if backend == "cuda":
        pytest.importorskip("cupy")
    logits = _nonfinite_logits(E).to(dtype)
    w, i = ops.route_topk(logits, k, renorm, backend=backend)
    rw, ri = ref.topk_softmax(logits, k, renorm)
    assert bool(((i >= 0) & (i < E)).all())
    assert torch.equal(i, ri)
    torch.testing.assert_close(w, rw, rtol=2e-6, atol=1e-7, equal_nan=True)
    nan_rows = torch.isnan(torch.softmax(logits.float(), dim=-1)).any(dim=-1)
    assert bool(torch.isnan(w[nan_rows]).all()) and not bool(torch.isnan(w[~nan_rows]).any())
    assert (i[nan_rows] == torch.arange(k, dtype=torch.int32, device=i.device)).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("shared", [0, 16], ids=["thinker", "talker"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_moe_block_nonfinite_tokens_do_not_touch_others(shared, dtype, weight_path):
    """Tokens whose router row is NaN, +/-inf or all -inf: their output is NaN (as the reference's); every other
    token's output is finite, matches the reference, and is reproducible bit for bit."""
    E, k, H, I, T = 6, 2, 32, 16, 70  # 140 pairs: the multi-program alignment path
    g, w13, w2, sw13, sw2, sg = _block_weights(E, H, I, shared, dtype)
    g = -g.abs()  # every router weight < 0: a +inf token gets all -inf logits
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    bad = torch.tensor([3, 20, 21, 64], device=DEVICE)
    x[3, 5] = NAN  # NaN logits
    x[20] = INF  # all logits -inf
    x[21, 0] = -INF  # all logits +inf
    x[64, :2] = torch.tensor([INF, -INF])  # +inf - inf = NaN logits
    kw = dict(shared_w13=sw13, shared_w2=sw2, shared_gate_weight=sg)
    out = ops.moe_block(x, g, w13, w2, k, backend="triton", **kw)
    want = ops.moe_block(x, g, w13, w2, k, backend="reference", **kw)
    good = torch.ones(T, dtype=torch.bool, device=DEVICE)
    good[bad] = False
    assert bool(torch.isnan(out[bad]).all()) and bool(torch.isnan(want[bad]).all())
    assert bool(torch.isfinite(out[good]).all())
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out[good], want[good], rtol=tol, atol=tol)
    again = ops.moe_block(x, g, w13, w2, k, backend="triton", **kw)
    torch.testing.assert_close(again, out, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("renorm", [True, False])
def test_reference_topk_softmax_outputs_are_contiguous_like_the_fake(renorm):
    from omni_fast.ops.moe import _topk_softmax_fake

    logits = torch.randn(5, 12)
    for got, fake in zip(ref.topk_softmax(logits, 3, renorm), _topk_softmax_fake(logits, 3, renorm, "reference")):
        assert got.is_contiguous() and got.stride() == fake.stride() and got.dtype == fake.dtype
        assert got.untyped_storage().nbytes() == got.numel() * got.element_size()  # not a view into [T, E]


# --- alignment ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,k,bs", [(0, 4, 2, 16), (1, 128, 8, 16), (13, 6, 3, 4), (40, 5, 5, 8), (7, 9, 2, 1),
                                      (300, 12, 4, 16), (5, 1, 1, 32), (90, 1, 1, 16), (1100, 3, 2, 64)])
def test_align_kernel(T, E, k, bs):
    ids = _ids(T, E, k)
    got = ops.align_moe_blocks(ids, bs, E, backend="triton")
    _assert_same_alignment(got, ref.moe_align_block_size(ids, bs, E), ids.reshape(-1).long())


@pytest.mark.parametrize("T,E,k,bs", [(1, 128, 8, 16), (13, 6, 3, 4), (8, 8, 8, 16), (21, 3, 3, 32)])
def test_align_kernel_decode_path_is_exactly_the_reference(T, E, k, bs):
    """Up to 64 pairs, one program aligns in a stable order: bit-identical to the reference."""
    ids = _ids(T, E, k)
    emap = torch.where(torch.arange(E) % 3 == 1, -1, torch.arange(E) // 2).to(DEVICE, torch.int32)
    for m in (None, emap):
        got = ops.align_moe_blocks(ids, bs, E, m, backend="triton")
        for g, w in zip(got, ref.moe_align_block_size(ids, bs, E, m)):
            assert torch.equal(g, w)


def test_align_kernel_expert_map_and_int64_ids():
    E = 7
    ids = _ids(51, E, 3).long()  # 153 pairs: the multi-program path
    emap = torch.tensor([2, -1, 0, -1, 1, -1, -1], dtype=torch.int32, device=DEVICE)
    got = ops.align_moe_blocks(ids, 4, E, emap, backend="triton")
    _assert_same_alignment(got, ref.moe_align_block_size(ids, 4, E, emap), ids.reshape(-1))
    assert (got[1] == -1).any()


@pytest.mark.parametrize("T,E,k,bs", [(1, 8, 2, 4), (13, 6, 3, 4), (9, 5, 5, 16), (120, 7, 3, 8)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_align_kernel_drops_out_of_range_ids(T, E, k, bs, id_dtype):
    """The kernels themselves (validation bypassed, as on CUDA where ids are not value-checked): a pair whose id
    is outside [0, E) gets no row and no count and touches no memory outside the buffers; both the one-program
    decode path (exactly the expected output) and the count/prefix/scatter path (up to order inside a run)."""
    from omni_fast.kernels import moe_align

    g = torch.Generator().manual_seed(T * 31 + E)
    ids = _with_bad_ids(T, E, k, id_dtype, g)
    emap = torch.tensor([2, -1, 0, -4, 1, 3, -1, 5][:E], dtype=torch.int32, device=DEVICE)
    for m in (None, emap):
        got = moe_align.moe_align_block_size(ids, bs, E, m)
        want = _align_dropping_bad_ids(ids, bs, E, m)
        for a, b in zip(ref.moe_align_block_size(ids, bs, E, m), want):  # the reference drops them too
            assert torch.equal(a, b)
        if T * k <= moe_align.SMALL:
            for a, b in zip(got, want):
                assert torch.equal(a, b)
        else:
            _assert_same_alignment(got, want, ids.reshape(-1).long())
        assert int(got[1].min()) >= -1  # negative map values (-4) read as remote


def test_align_kernel_audit_example():
    """moe_align_block_size([[0, 1], [2, 9]], 4, 4) used to put pair 3 (id 9) over pair 0's row."""
    from omni_fast.kernels import moe_align

    s, e, n = moe_align.moe_align_block_size(torch.tensor([[0, 1], [2, 9]], dtype=torch.int32, device=DEVICE), 4, 4)
    assert s.tolist()[:12] == [0, 4, 4, 4, 1, 4, 4, 4, 2, 4, 4, 4] and e.tolist()[:3] == [0, 1, 2]
    assert int(n) == 12


class _PoisonedEmpty:
    """Stands in for the ``torch`` module inside kernels.moe_gemm: its float ``empty`` buffers start as NaN, so a
    row the GEMMs never write (a dropped pair's) would reach the output if the combine read it."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*size, dtype=None, device=None):
        t = torch.empty(*size, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t


def test_fused_moe_kernel_drops_out_of_range_ids_and_map_values(monkeypatch):
    """moe_gemm.fused_moe on unvalidated input: ids outside [0, E_global) and expert_map values outside
    [-1, E_local) act exactly like a remote expert (the pair contributes zero; no weight outside w13/w2 is read)."""
    monkeypatch.setattr(moe_gemm, "torch", _PoisonedEmpty())
    T, E, k, H, I = 7, 6, 3, 32, 16
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, H, device=DEVICE)
    w = torch.rand(T, k, device=DEVICE)
    for id_dtype in (torch.int32, torch.int64):
        ids = _with_bad_ids(T, E, k, id_dtype, g)
        ids[3] = E + 1  # a token whose every pair is bad: exactly zero
        bad = (ids < 0) | (ids >= E)
        w13, w2 = _weights(E, H, I, torch.float32)
        out = moe_gemm.fused_moe(x, w13, w2, w, ids)
        # The reference on the same pairs with the bad ones given weight 0 (and a valid id); the reference on the
        # bad ids drops them the same way.
        clean_w, clean_ids = torch.where(bad, 0.0, w), torch.where(bad, 0, ids)
        # (not bitwise: the extra zero-weight rows change expert 0's GEMM batch)
        torch.testing.assert_close(ref.fused_moe(x, w13, w2, w, ids), ref.fused_moe(x, w13, w2, clean_w, clean_ids),
                                   rtol=1e-5, atol=1e-6)
        assert_matches_reference(out, ref.fused_moe(x.double(), w13.double(), w2.double(), clean_w.double(),
                                                     clean_ids),
                                 ref.fused_moe(x, w13, w2, clean_w, clean_ids), name="fused_moe bad ids")
        assert bool((out[3] == 0).all())
    # expert_map values 3 and 7 are past E_local = 3 and -5 is below -1: those experts act as remote.
    emap = torch.tensor([0, 3, -1, 1, -5, 7], dtype=torch.int32, device=DEVICE)
    clean_map = torch.where((emap < 0) | (emap >= 3), -1, emap)
    ids = _ids(T, E, k)
    w13, w2 = _weights(3, H, I, torch.float32)
    out = moe_gemm.fused_moe(x, w13, w2, w, ids, expert_map=emap)
    torch.testing.assert_close(ref.fused_moe(x, w13, w2, w, ids, expert_map=emap),
                               ref.fused_moe(x, w13, w2, w, ids, expert_map=clean_map), rtol=0, atol=0)
    assert_matches_reference(out, ref.fused_moe(x.double(), w13.double(), w2.double(), w.double(), ids,
                                                 expert_map=clean_map),
                             ref.fused_moe(x, w13, w2, w, ids, expert_map=clean_map), name="fused_moe bad map")


def test_align_all_pairs_to_one_expert():
    ids = torch.full((37, 1), 3, dtype=torch.int32, device=DEVICE)
    s, e, n = ops.align_moe_blocks(ids, 16, 8, backend="triton")
    assert int(n[0]) == 48 and e[:3].tolist() == [3, 3, 3] and bool((e[3:] == -1).all())


