"""MoE kernels (Triton; the interpreter on CPU) vs the reference, through the public ops; bad input; tracing."""

import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omni_fast
from omni_fast import ops
from omni_fast.kernels import moe_gemm
from omni_fast.reference import moe as ref
from omni_fast.testing import DEVICE, KERNEL_DTYPES, assert_matches_reference

GPU_DTYPES = [pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _ids(T, E, k, device=DEVICE):
    """Distinct experts per token (as top-k gives), int32 [T, k]."""
    if T == 0:
        return torch.zeros(0, k, dtype=torch.int32, device=device)
    return torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(device=device, dtype=torch.int32)


def _weights(E, H, I, dtype, device=DEVICE):
    w13 = (torch.randn(E, 2 * I, H) * H ** -0.5).to(device=device, dtype=dtype)
    w2 = (torch.randn(E, H, I) * I ** -0.5).to(device=device, dtype=dtype)
    return w13, w2


@pytest.fixture(params=[False, True], ids=["ptr", "tma"])
def weight_path(request, monkeypatch):
    """Run the fused-MoE GEMMs with the weight tiles read through pointers or through TMA tensor descriptors
    (``USE_TMA`` in both GEMMs' configs). ``.used`` records, per GEMM launch, whether a descriptor was used (the
    TMA path falls back to pointers where the layout does not allow a descriptor); ``.config(cfg)`` adds the
    choice to an explicit config."""
    use_tma = request.param

    def with_tma(cfg):
        cfg = dict(cfg, USE_TMA=use_tma)
        cfg["down"] = dict(cfg.get("down", {}), USE_TMA=use_tma)
        return cfg

    real_config, real_source, used = moe_gemm.get_config, moe_gemm.weight_source, []

    def weight_source(b, cfg):
        src = real_source(b, cfg)
        used.append(src is not b)
        return src

    monkeypatch.setattr(moe_gemm, "get_config", lambda *a, **kw: with_tma(real_config(*a, **kw)))
    monkeypatch.setattr(moe_gemm, "weight_source", weight_source)
    return types.SimpleNamespace(use_tma=use_tma, used=used, config=with_tma)


def _tma_expected(path, T, H, I, dtype):
    """What ``path.used`` must be after one fused_moe call: a descriptor for w13 ``[E, 2I, H]`` when its rows
    (H elements) are 16-byte multiples, for w2 ``[E, H, I]`` when I elements are; no launch at all for T = 0."""
    if T == 0:
        return []
    elem = torch.finfo(dtype).bits // 8
    return [path.use_tma and H * elem % 16 == 0, path.use_tma and I * elem % 16 == 0]


def _check_fused(x, w13, w2, w, ids, expert_map=None, config=None, backend="triton"):
    if config is None:
        out = ops.moe_experts(x, w13, w2, w, ids, expert_map=expert_map, backend=backend)
    else:
        out = moe_gemm.fused_moe(x, w13, w2, w, ids, expert_map=expert_map, config=config)
    exact = ref.fused_moe(x.double(), w13.double(), w2.double(), w.double(), ids, expert_map=expert_map)
    same = ref.fused_moe(x, w13, w2, w, ids, expert_map=expert_map)
    assert_matches_reference(out, exact, same, name="fused_moe")
    return out


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


def _assert_same_alignment(got, want, flat_ids):
    (s, e, n), (rs, re, rn) = got, want
    assert s.shape == rs.shape and e.shape == re.shape and n.shape == rn.shape == (1,)
    assert torch.equal(n, rn) and torch.equal(e, re)
    sentinel = flat_ids.numel()
    assert torch.equal(s == sentinel, rs == sentinel)
    real = s != sentinel
    # Same expert at every row (order inside an expert's run is unspecified), each (kept) pair exactly once.
    assert torch.equal(flat_ids[s[real].long()], flat_ids[rs[real].long()])
    assert torch.equal(torch.sort(s[real]).values, torch.sort(rs[real]).values)
    assert torch.unique(s[real]).numel() == int(real.sum())


def _align_dropping_bad_ids(ids, bs, E, expert_map=None):
    """What the kernels must give for ids with values outside ``[0, E)`` (never value-checked on CUDA): those
    pairs dropped, like pairs of a remote expert. Built from the reference: the bad pairs moved to an extra last
    expert ``E``, whose run (the last one) is then cut off; negative map values read as -1."""
    flat = ids.reshape(-1).cpu().long()
    n = flat.numel()
    bad = (flat < 0) | (flat >= E)
    emap = None if expert_map is None else torch.cat([expert_map.cpu(), torch.tensor([-1], dtype=torch.int32)])
    s, e, npost = ref.moe_align_block_size(torch.where(bad, E, flat), bs, E + 1, emap)
    keep = int(npost) - -(-int(bad.sum()) // bs) * bs
    blocks = -(-ref.max_padded_tokens(n, E, bs) // bs)
    want_s = torch.full((blocks * bs,), n, dtype=torch.int32)
    want_s[:keep] = s[:keep]
    want_e = torch.full((blocks,), -1, dtype=torch.int32)
    want_e[:keep // bs] = e[:keep // bs].clamp(min=-1)
    dev = ids.device
    return want_s.to(dev), want_e.to(dev), torch.tensor([keep], dtype=torch.int32, device=dev)


def _with_bad_ids(T, E, k, dtype, g, device=DEVICE):
    """Random top-k ids with some pairs out of range: E, E + 5, -1, -3 and (int64) 2**32 + 1, which an int32
    truncation would turn into the valid id 1."""
    ids = _ids(T, E, k, device).to(dtype)
    bad = [E, E + 5, -1, -3] + ([2 ** 32 + 1] if dtype == torch.int64 else [])
    flat = ids.view(-1)
    where = torch.randperm(flat.numel(), generator=g)[:max(1, flat.numel() // 4)]
    flat[where] = torch.tensor(bad, dtype=dtype)[torch.arange(where.numel()) % len(bad)].to(flat.device)
    return ids


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


# --- moe_experts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,k,H,I", [
    (0, 4, 2, 32, 16),      # no tokens
    (1, 8, 2, 32, 16),      # decode
    (13, 6, 3, 40, 24),     # odd T, E not a power of two, H and I not multiples of the tiles
    (9, 4, 4, 48, 32),      # top_k == E
    (3, 12, 2, 64, 40),     # most experts get no token
    (45, 5, 2, 36, 20),     # several M tiles per expert
])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_fused_moe_kernel(T, E, k, H, I, dtype, weight_path):
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    w13, w2 = _weights(E, H, I, dtype)
    w = torch.rand(T, k, device=DEVICE)
    _check_fused(x, w13, w2, w, _ids(T, E, k))
    assert weight_path.used == _tma_expected(weight_path, T, H, I, dtype)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(0, 40), E=st.integers(1, 12), H=st.integers(1, 70), I=st.integers(1, 50), data=st.data(),
       dtype=st.sampled_from(KERNEL_DTYPES))
def test_fused_moe_kernel_random_shapes(T, E, H, I, data, dtype, weight_path):
    k = data.draw(st.integers(1, E))
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    w13, w2 = _weights(E, H, I, dtype)
    weight_path.used.clear()  # one fixture for every hypothesis example
    _check_fused(x, w13, w2, torch.rand(T, k, device=DEVICE), _ids(T, E, k))
    assert weight_path.used == _tma_expected(weight_path, T, H, I, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_fused_moe_all_tokens_to_one_expert(dtype, weight_path):
    T, E, H, I = 21, 6, 32, 24
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    w13, w2 = _weights(E, H, I, dtype)
    ids = torch.full((T, 1), 4, dtype=torch.int32, device=DEVICE)
    _check_fused(x, w13, w2, torch.rand(T, 1, device=DEVICE), ids)


@pytest.mark.parametrize("cfg", [
    dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=16, BLOCK_SIZE_K=16, GROUP_SIZE_M=2, num_warps=4, num_stages=2),
    dict(BLOCK_SIZE_M=32, BLOCK_SIZE_N=32, BLOCK_SIZE_K=16, GROUP_SIZE_M=4, num_warps=4, num_stages=2,
         down=dict(BLOCK_SIZE_N=16, BLOCK_SIZE_K=32, GROUP_SIZE_M=1)),
])
def test_fused_moe_kernel_small_tiles_grouped_order(cfg, weight_path):
    """Several K iterations, partial N/K tiles, grouped (m, n) order, separate down-GEMM config. On the TMA path,
    gate tiles that run past I read the first up rows and the last expert's tiles run past the end of the weights
    (zero fill): only output columns that are never stored see them."""
    T, E, k, H, I = 19, 5, 2, 56, 40
    x = torch.randn(T, H, device=DEVICE)
    w13, w2 = _weights(E, H, I, torch.float32)
    _check_fused(x, w13, w2, torch.rand(T, k, device=DEVICE), _ids(T, E, k), config=weight_path.config(cfg))
    assert weight_path.used == _tma_expected(weight_path, T, H, I, torch.float32)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_fused_moe_expert_map(dtype, weight_path):
    """Expert parallelism: this rank holds global experts 5, 0, 3 (local 0, 1, 2); the others contribute zero."""
    T, E, k, H, I = 17, 8, 3, 32, 24
    emap = torch.full((E,), -1, dtype=torch.int32)
    emap[[5, 0, 3]] = torch.tensor([0, 1, 2], dtype=torch.int32)
    emap = emap.to(DEVICE)
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    w13, w2 = _weights(3, H, I, dtype)
    ids = _ids(T, E, k)
    out = _check_fused(x, w13, w2, torch.rand(T, k, device=DEVICE), ids, expert_map=emap)
    # A token routed only to remote experts gets exactly zero.
    remote_only = ~((emap[ids.long()] >= 0).any(dim=1))
    assert bool((out[remote_only] == 0).all())
    assert weight_path.used == _tma_expected(weight_path, T, H, I, dtype)


def test_fused_moe_out_argument_and_model_dtype_weights():
    T, E, k, H, I = 6, 4, 2, 32, 16
    x = torch.randn(T, H, device=DEVICE, dtype=torch.float16)
    w13, w2 = _weights(E, H, I, torch.float16)
    w = torch.rand(T, k, device=DEVICE).half()
    ids = _ids(T, E, k)
    out = torch.full_like(x, float("nan"))
    res = ops.moe_experts(x, w13, w2, w, ids, out=out, backend="triton")
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, ops.moe_experts(x, w13, w2, w, ids, backend="reference"), rtol=2e-3, atol=2e-3)


def test_tuned_file_fallback_prefers_the_newest_triton_version(tmp_path, monkeypatch):
    """Another Triton version's file is used when this version has none: 3.10 beats 3.9 (numeric, not text)."""
    from omni_fast.kernels import launch

    assert moe_gemm.version_key("3.10.0+git1a2b") == (3, 10, 0) > moe_gemm.version_key("3.9.1") == (3, 9, 1)
    assert moe_gemm.version_key("nightly") == ()
    family = tmp_path / moe_gemm.CONFIG_FAMILY
    family.mkdir()
    dev = torch.device("cpu")
    for ver, bm in (("3.9.0", 16), ("3.10.0", 32), ("3.2.0", 64)):
        stem = moe_gemm.config_file_stem(8, 16, torch.float16, dev, triton_version=ver)
        (family / f"{stem}.json").write_text('{"1": {"BLOCK_SIZE_M": %d}}' % bm)
    monkeypatch.setattr(launch, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(moe_gemm, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(moe_gemm.triton, "__version__", "9.9.9")  # no file for "this" version
    find = moe_gemm._find_tuned.__wrapped__  # uncached
    assert find(8, 16, torch.float16, dev, 1) == {"BLOCK_SIZE_M": 32}
    assert find(8, 16, torch.bfloat16, dev, 1) is None


def test_tuned_config_directory_is_in_the_package():
    """``omni_fast/configs/moe`` exists in the checkout (so kernels.launch reads it) and omni_fast.bench.tune_moe writes
    there by default."""
    from omni_fast.bench import tune_moe
    from omni_fast.kernels import launch

    assert launch.CONFIG_DIR.name == "configs" and launch.CONFIG_DIR.parent.name == "omni_fast"
    assert tune_moe.OUT_DIR.resolve() == (launch.CONFIG_DIR / moe_gemm.CONFIG_FAMILY).resolve()
    assert (tune_moe.OUT_DIR / "README.md").is_file()


def test_fused_moe_is_deterministic(weight_path):
    T, E, k, H, I = 40, 6, 3, 32, 16
    x = torch.randn(T, H, device=DEVICE)
    w13, w2 = _weights(E, H, I, torch.float32)
    w, ids = torch.rand(T, k, device=DEVICE), _ids(T, E, k)
    a = ops.moe_experts(x, w13, w2, w, ids, backend="triton")
    b = ops.moe_experts(x, w13, w2, w, ids, backend="triton")
    assert torch.equal(a, b)


# --- TMA descriptors for the weight tiles -------------------------------------------------------------------------


def test_stacked_weight_descriptor_layout_checks():
    """A descriptor over ``[E, N, K]`` seen as ``[E*N, K]`` exactly when TMA can address it; ``None`` otherwise."""
    from omni_fast.kernels.tma import matrix_descriptor, stacked_matrix_descriptor

    w = torch.randn(3, 10, 24, dtype=torch.float16)
    d = stacked_matrix_descriptor(w, (16, 32))
    assert d is not None and list(d.shape) == [30, 24] and list(d.strides) == [24, 1]
    assert list(d.block_shape) == [16, 32] and d.base.data_ptr() == w.data_ptr()
    assert stacked_matrix_descriptor(w[1:], (16, 32)).base.data_ptr() == w[1].data_ptr()  # 480 B offset: aligned
    flat = torch.randn(3 * 10 * 24 + 1, dtype=torch.float16)
    rejected = {
        "base not 16-byte aligned": flat[1:].view(3, 10, 24),
        "row stride 36 * 2 B": torch.randn(3, 10, 36, dtype=torch.float16),
        "experts not evenly spaced rows": torch.randn(3, 16, 24, dtype=torch.float16)[:, :10],
        "last dim not unit-stride": torch.randn(3, 24, 10, dtype=torch.float16).transpose(1, 2),
        "integer weights": torch.zeros(3, 10, 24, dtype=torch.int32),
        "no experts": torch.randn(0, 10, 24, dtype=torch.float16),
    }
    for why, bad in rejected.items():
        assert stacked_matrix_descriptor(bad, (16, 32)) is None, why
    for block in ((16, 24), (512, 32), (16, 4), (0, 32)):  # not a power of two, > 256 rows, 8-byte rows, empty
        assert matrix_descriptor(w, 30, 24, 24, block) is None, block
    # Size-1 dimensions may carry any stride: one expert, or one row per expert.
    one_expert = torch.randn(300).as_strided((1, 10, 24), (7, 24, 1))
    assert list(stacked_matrix_descriptor(one_expert, (16, 16)).shape) == [10, 24]
    one_row = torch.randn(4, 32)[:, None, :8]  # [4, 1, 8] with experts 32 elements apart
    assert list(stacked_matrix_descriptor(one_row, (16, 8)).strides) == [32, 1]


@pytest.mark.parametrize("layout", ["unaligned_base", "unaligned_rows", "strided_experts"])
def test_fused_moe_tma_falls_back_to_pointers(layout):
    """USE_TMA with weights TMA cannot address: the kernels take the pointer path and stay exact."""
    T, E, k, H, I = 9, 4, 2, 32, 24
    dtype = torch.float16
    w13, w2 = _weights(E, H, I, dtype)
    if layout == "unaligned_base":
        buf = torch.empty(w13.numel() + 1, dtype=dtype, device=DEVICE)
        w13 = buf[1:].view_as(w13).copy_(w13)
    elif layout == "unaligned_rows":  # H = 36 fp16: 72-byte rows
        H = 36
        w13, w2 = _weights(E, H, I, dtype)
    else:  # every expert's block sits inside a larger allocation
        w13 = torch.cat([w13, w13[:, :8]], dim=1)[:, : 2 * I]
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    cfg = dict(moe_gemm.default_config(T, E, k, H, I, dtype), USE_TMA=True)
    up, down = moe_gemm._split(cfg)
    assert down["USE_TMA"] and moe_gemm.weight_source(w13, up) is w13
    _check_fused(x, w13, w2, torch.rand(T, k, device=DEVICE), _ids(T, E, k), config=cfg)


def test_tuned_config_selects_the_weight_path_per_gemm():
    """``USE_TMA`` at the top level drives the gate/up GEMM; ``down`` may choose differently; absent = pointers."""
    base = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=3)
    assert [c["USE_TMA"] for c in moe_gemm._split(base)] == [False, False]
    assert [c["USE_TMA"] for c in moe_gemm._split(dict(base, USE_TMA=True))] == [True, True]
    assert [c["USE_TMA"] for c in moe_gemm._split(dict(base, USE_TMA=True, down={"USE_TMA": False}))] == [True,
                                                                                                         False]
    assert all(not c.get("USE_TMA", False) for c in moe_gemm._split(moe_gemm.default_config(1, 128, 8, 2048, 768,
                                                                                             torch.bfloat16)))


def test_tune_search_space_includes_the_tma_path():
    from omni_fast.bench import tune_moe

    space = tune_moe.search_space(True, 16, True, 2)
    assert {c["USE_TMA"] for c in space} == {False, True}
    assert all(c["BLOCK_SIZE_N"] <= 256 and c["BLOCK_SIZE_K"] <= 256 for c in space if c["USE_TMA"])


def test_tuner_runs_end_to_end_on_the_interpreter_and_its_file_round_trips(tmp_path, monkeypatch):
    """omni_fast.bench.tune_moe's whole CLI on the CPU (interpreter; on a GPU machine, on the GPU) with a stub timer and a two-config search space (pointer
    and TMA weight path): every candidate launch runs, the JSON lands in --out-dir, and the op's own lookup
    (``moe_gemm._find_tuned`` -> ``kernels.launch.tuned_config``, what get_config uses on a GPU) reads it back into a
    config fused_moe runs with."""
    import json

    from omni_fast.bench import tune_moe
    from omni_fast.kernels import launch

    calls = []

    def bench(fn):
        fn()  # the real launch, on the interpreter
        calls.append(fn)
        return 10.0 - len(calls)  # each candidate "faster" than the last: the last (TMA) one wins

    def space(block_m, gated, elem):
        return [dict(BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=16, BLOCK_SIZE_K=16, GROUP_SIZE_M=1, num_warps=4,
                     num_stages=2, USE_TMA=tma) for tma in (False, True)]

    out = tmp_path / moe_gemm.CONFIG_FAMILY
    E, N, H, k = 4, 16, 32, 2
    argv = ["--device", DEVICE.type, "--n", str(N), "--experts", str(E), "--hidden", str(H), "--top-k", str(k),
            "--tokens", "1", "5", "--dtype", "fp16", "--out-dir", str(out)]
    assert tune_moe.main(argv, bench=bench, space=space) == 0
    assert len(calls) == 2 * 2 * 2  # buckets x GEMMs x candidates (BLOCK_M 16 only at these sizes)
    dev = DEVICE
    path = out / f"{moe_gemm.config_file_stem(E, N, torch.float16, dev)}.json"
    table = json.loads(path.read_text())
    want = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=16, BLOCK_SIZE_K=16, GROUP_SIZE_M=1, num_warps=4, num_stages=2,
                USE_TMA=True, down=dict(BLOCK_SIZE_N=16, BLOCK_SIZE_K=16, GROUP_SIZE_M=1, num_warps=4, num_stages=2,
                                        USE_TMA=True))
    assert table == {"1": want, "5": want}
    monkeypatch.setattr(launch, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(moe_gemm, "CONFIG_DIR", tmp_path)
    cfg = moe_gemm._find_tuned.__wrapped__(E, N, torch.float16, dev, 4)
    assert cfg == want
    x = torch.randn(3, H, device=DEVICE).to(torch.float16)
    w13, w2 = _weights(E, H, N, torch.float16)
    _check_fused(x, w13, w2, torch.rand(3, k, device=DEVICE), _ids(3, E, k), config=cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path of the CLI")
def test_tuner_cli_without_a_gpu_exits_2(tmp_path, capsys):
    from omni_fast.bench import tune_moe

    assert tune_moe.main(["--tokens", "1", "--out-dir", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --- moe_block ---------------------------------------------------------------------------------------------------


def _block_weights(E, H, I, Is, dtype):
    g = (torch.randn(E, H) * H ** -0.5).to(DEVICE, dtype)
    w13, w2 = _weights(E, H, I, dtype)
    if not Is:
        return g, w13, w2, None, None, None
    sw13, sw2 = _weights(1, H, Is, dtype)
    sg = (torch.randn(1, H) * H ** -0.5).to(DEVICE, dtype)
    return g, w13, w2, sw13[0], sw2[0], sg


@pytest.mark.parametrize("shared", [0, 40], ids=["thinker", "talker"])
@pytest.mark.parametrize("T", [1, 11, 70])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_moe_block_kernel(shared, T, dtype, weight_path):
    E, k, H, I = 10, 3, 48, 24
    g, w13, w2, sw13, sw2, sg = _block_weights(E, H, I, shared, dtype)
    x = torch.randn(1, T, H, device=DEVICE).to(dtype)
    out = ops.moe_block(x, g, w13, w2, k, shared_w13=sw13, shared_w2=sw2, shared_gate_weight=sg, backend="triton")
    same = ref.moe_block(x, g, w13, w2, k, True, sw13, sw2, sg)
    # fp64 reference with the same routing decisions (routing in fp64 could flip near-ties).
    xf = x.reshape(T, H)
    w, ids = ref.router(xf, g, k)
    d = torch.float64
    exact = ref.fused_moe(xf.to(d), w13.to(d), w2.to(d), w.to(d), ids)
    if shared:
        exact = exact + ref.shared_expert(xf.to(d), sw13.to(d), sw2.to(d), sg.to(d))
    assert out.shape == x.shape
    assert_matches_reference(out.reshape(T, H), exact, same.reshape(T, H), name="moe_block")
    assert weight_path.used and all(u == weight_path.use_tma for u in weight_path.used)  # every shape aligned


def test_moe_block_kernel_expert_map_and_no_renorm():
    E, k, H, I, T = 9, 3, 32, 24, 13
    g, w13, w2, sw13, sw2, sg = _block_weights(E, H, I, 40, torch.float32)
    emap = torch.where(torch.arange(E) % 2 == 0, torch.arange(E) // 2, -1).to(DEVICE, torch.int32)
    local = emap >= 0
    x = torch.randn(T, H, device=DEVICE)
    kw = dict(renormalize=False, shared_w13=sw13, shared_w2=sw2, shared_gate_weight=sg, expert_map=emap)
    out = ops.moe_block(x, g, w13[local], w2[local], k, backend="triton", **kw)
    want = ops.moe_block(x, g, w13[local], w2[local], k, backend="reference", **kw)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# --- backends, tracing, bad input --------------------------------------------------------------------------------


def test_backends_agree_and_context_manager_selects():
    T, E, k, H, I = 5, 4, 2, 32, 16
    x = torch.randn(T, H, device=DEVICE)
    w13, w2 = _weights(E, H, I, torch.float32)
    w, ids = torch.rand(T, k, device=DEVICE), _ids(T, E, k)
    with omni_fast.use_backend("reference"):
        a = ops.moe_experts(x, w13, w2, w, ids)
    b = ops.moe_experts(x, w13, w2, w, ids, backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_traces_under_torch_compile():
    T, E, k, H, I = 4, 4, 2, 32, 16
    x = torch.randn(T, H, device=DEVICE)
    g = torch.randn(E, H, device=DEVICE)
    w13, w2 = _weights(E, H, I, torch.float32)

    def f(x):
        # An explicit backend: dynamo cannot trace the use_backend() context variable lookup.
        w, ids = ops.route_topk(x @ g.T, k, backend="triton")
        s, e, n = ops.align_moe_blocks(ids, 16, E, backend="triton")
        return ops.moe_experts(x, w13, w2, w, ids, backend="triton"), s, n

    out, s, n = torch.compile(f, fullgraph=True, backend="eager")(x)
    w, ids = ref.topk_softmax(x @ g.T, k)
    torch.testing.assert_close(out, ref.fused_moe(x, w13, w2, w, ids), rtol=1e-5, atol=1e-5)
    assert s.shape == ref.moe_align_block_size(ids, 16, E)[0].shape


def _good():
    T, E, k, H, I = 3, 4, 2, 16, 8
    return dict(hidden_states=torch.randn(T, H), w13=torch.randn(E, 2 * I, H), w2=torch.randn(E, H, I),
                topk_weights=torch.rand(T, k), topk_ids=torch.tensor([[0, 1], [2, 3], [1, 0]], dtype=torch.int32))


@pytest.mark.parametrize("over,exc,match", [
    (dict(topk_ids=torch.tensor([[0, 1], [2, 4], [1, 0]], dtype=torch.int32)), ValueError, "topk_ids"),
    (dict(topk_ids=torch.tensor([[0, 1], [2, -1], [1, 0]], dtype=torch.int32)), ValueError, "topk_ids"),
    (dict(topk_ids=torch.zeros(3, 2)), TypeError, "topk_ids"),
    (dict(topk_ids=torch.zeros(3, 5, dtype=torch.int32)), ValueError, "top_k"),
    (dict(topk_ids=torch.zeros(2, 2, dtype=torch.int32)), ValueError, "topk_ids"),
    (dict(topk_weights=torch.rand(3, 3)), ValueError, "topk_weights"),
    (dict(w13=torch.randn(4, 16, 16).half()), TypeError, "w13"),
    (dict(w13=torch.randn(4, 15, 16)), ValueError, "w13"),
    (dict(w13=torch.randn(4, 16, 12)), ValueError, "w13"),
    (dict(w2=torch.randn(3, 16, 8)), ValueError, "w2"),
    (dict(w2=torch.randn(4, 16, 9)), ValueError, "w2"),
    (dict(hidden_states=torch.randn(3, 16, 1)), ValueError, "hidden_states"),
    (dict(hidden_states=torch.randint(0, 3, (3, 16))), TypeError, "hidden_states"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(expert_map=torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)), ValueError, "expert_map"),
    (dict(expert_map=torch.tensor([0, 1, 2, 3], dtype=torch.int64)), TypeError, "expert_map"),
    (dict(out=torch.empty(3, 15)), ValueError, "out"),
    (dict(out=torch.empty(3, 16, dtype=torch.float16)), TypeError, "out"),
])
def test_fused_moe_bad_input(over, exc, match):
    args = _good()
    args.update(over)
    kw = {key: args.pop(key) for key in ("activation", "expert_map", "out") if key in args}
    with pytest.raises(exc, match=match):
        ops.moe_experts(*args.values(), **kw)


def test_expert_map_with_fewer_global_experts_than_top_k():
    a = _good()
    emap = torch.tensor([0], dtype=torch.int32)  # one global expert but k = 2
    with pytest.raises(ValueError, match="top_k"):
        ops.moe_experts(a["hidden_states"], a["w13"], a["w2"], a["topk_weights"], a["topk_ids"], expert_map=emap)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.route_topk(torch.randn(3, 4), 5), ValueError, "top_k"),
    (lambda: ops.route_topk(torch.randn(3, 4), 0), ValueError, "top_k"),
    (lambda: ops.route_topk(torch.randn(3, 4, 2), 1), ValueError, "router_logits"),
    (lambda: ops.route_topk(torch.randint(0, 3, (3, 4)), 1), TypeError, "router_logits"),
    (lambda: ops.align_moe_blocks(torch.tensor([[0, 4]]), 16, 4), ValueError, "topk_ids"),
    (lambda: ops.align_moe_blocks(torch.tensor([[0, 1]]), 0, 4), ValueError, "block_size"),
    (lambda: ops.align_moe_blocks(torch.tensor([[0.0, 1.0]]), 16, 4), TypeError, "topk_ids"),
    (lambda: ops.align_moe_blocks(torch.tensor([[0, 1]]), 16, 4, torch.zeros(3, dtype=torch.int32)),
     ValueError, "expert_map"),
    (lambda: ops.moe_block(torch.randn(3, 16), torch.randn(5, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8), 2),
     ValueError, "gate_weight"),
    (lambda: ops.moe_block(torch.randn(3, 16), torch.randn(4, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8), 2,
                           out=torch.empty(16, 3).T), ValueError, "out"),
    (lambda: ops.moe_block(torch.randn(3, 16), torch.randn(4, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8), 5),
     ValueError, "top_k"),
    (lambda: ops.moe_block(torch.randn(3, 16), torch.randn(4, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8), 2,
                           shared_w13=torch.randn(8, 16)), ValueError, "together"),
    (lambda: ops.moe_block(torch.randn(3, 16), torch.randn(4, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8), 2,
                           shared_w13=torch.randn(8, 16), shared_w2=torch.randn(16, 5),
                           shared_gate_weight=torch.randn(1, 16)), ValueError, "shared_w2"),
])
def test_other_ops_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- GPU: bf16 and the real shapes -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("E,k,H,I,T", [(128, 8, 2048, 768, 1), (128, 8, 2048, 768, 333), (128, 6, 1024, 384, 64),
                                       (128, 6, 1024, 192, 4096)])
def test_fused_moe_real_shapes_bf16(E, k, H, I, T):
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    w13, w2 = _weights(E, H, I, torch.bfloat16)
    logits = torch.randn(T, E, device=DEVICE)
    w, ids = ops.route_topk(logits, k)
    _check_fused(x, w13, w2, w, ids)


@pytest.mark.gpu
@pytest.mark.parametrize("E,k,H,I,T", [(128, 8, 2048, 768, 1), (128, 8, 2048, 768, 4096), (128, 6, 1024, 384, 64),
                                       (128, 6, 1024, 192, 333)])
def test_fused_moe_tma_real_shapes_bf16(E, k, H, I, T, weight_path):
    """Both weight paths on the GPU at the real shapes (descriptors really used: the layouts are aligned), and the
    TMA output within the reference tolerance of the pointer output's."""
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    w13, w2 = _weights(E, H, I, torch.bfloat16)
    w, ids = ops.route_topk(torch.randn(T, E, device=DEVICE), k)
    _check_fused(x, w13, w2, w, ids)
    assert weight_path.used == [weight_path.use_tma] * 2


@pytest.mark.gpu
def test_fused_moe_tma_cuda_graph_replay(weight_path):
    """Descriptors are encoded on the host at capture; replays on new activations give the eager result."""
    E, k, H, I, T = 128, 8, 2048, 768, 8
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    w13, w2 = _weights(E, H, I, torch.bfloat16)
    w, ids = ops.route_topk(torch.randn(T, E, device=DEVICE), k)
    ops.moe_experts(x, w13, w2, w, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.moe_experts(x, w13, w2, w, ids)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ops.moe_experts(x, w13, w2, w, ids), rtol=0, atol=0)
    assert all(u == weight_path.use_tma for u in weight_path.used)


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [0, 768])
def test_moe_block_bf16_gpu(shared):
    E, k, H, I, T = 128, 6, 1024, 384, 77
    g, w13, w2, sw13, sw2, sg = _block_weights(E, H, I, shared, torch.bfloat16)
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    out = ops.moe_block(x, g, w13, w2, k, shared_w13=sw13, shared_w2=sw2, shared_gate_weight=sg)
    same = ref.moe_block(x, g, w13, w2, k, True, sw13, sw2, sg)
    w, ids = ref.router(x, g, k)
    d = torch.float64
    exact = ref.fused_moe(x.to(d), w13.to(d), w2.to(d), w.to(d), ids)
    if shared:
        exact = exact + ref.shared_expert(x.to(d), sw13.to(d), sw2.to(d), sg.to(d))
    assert_matches_reference(out, exact, same)


# --- CUDA C++ routing / alignment ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (333, 128, 6), (17, 60, 60), (5, 256, 32)])
def test_cuda_topk_softmax_matches(dtype, T, E, k):
    pytest.importorskip("cupy")
    logits = torch.randn(T, E, device=DEVICE).to(dtype)
    w, i = ops.route_topk(logits, k, backend="cuda")
    rw, ri = ref.topk_softmax(logits, k)
    assert torch.equal(i, ri)
    torch.testing.assert_close(w, rw, rtol=2e-6, atol=1e-7)
    tw, ti = ops.route_topk(logits, k, backend="triton")
    assert torch.equal(i, ti)


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,k,bs", [(1, 128, 8, 16), (4096, 128, 8, 64), (77, 9, 3, 16)])
@pytest.mark.parametrize("with_map", [False, True])
def test_cuda_align_matches(T, E, k, bs, with_map):
    pytest.importorskip("cupy")
    ids = _ids(T, E, k)
    emap = torch.where(torch.arange(E) % 3 == 1, -1, torch.arange(E) // 2).to(DEVICE, torch.int32) if with_map else None
    got = ops.align_moe_blocks(ids, bs, E, emap, backend="cuda")
    _assert_same_alignment(got, ref.moe_align_block_size(ids, bs, E, emap), ids.reshape(-1).long())
    _assert_same_alignment(got, ops.align_moe_blocks(ids, bs, E, emap, backend="triton"),
                           ids.reshape(-1).long())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("T,E,k,bs", [(3, 128, 8, 16), (600, 60, 6, 64)])
def test_gpu_out_of_range_ids_are_dropped(backend, T, E, k, bs):
    """On CUDA the ops skip the (host-syncing) value check: ids outside [0, E) and expert_map values outside
    [-1, E_local) reach the kernels, which drop those pairs (no out-of-bounds access; the output as if the
    pairs were routed to a remote expert)."""
    if backend == "cuda":
        pytest.importorskip("cupy")
    g = torch.Generator().manual_seed(T)
    for id_dtype in (torch.int32, torch.int64):
        ids = _with_bad_ids(T, E, k, id_dtype, g)
        got = ops.align_moe_blocks(ids, bs, E, backend=backend)
        _assert_same_alignment(got, _align_dropping_bad_ids(ids, bs, E), ids.reshape(-1).long())
        torch.cuda.synchronize()
    if backend != "cuda":  # moe_experts has no CUDA C++ backend
        H, I = 256, 128
        x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
        w13, w2 = _weights(E, H, I, torch.bfloat16)
        w = torch.rand(T, k, device=DEVICE)
        bad = (ids < 0) | (ids >= E)
        out = ops.moe_experts(x, w13, w2, w, ids, backend=backend)
        clean_w, clean_ids = torch.where(bad, 0.0, w), torch.where(bad, 0, ids)
        assert_matches_reference(out, ref.fused_moe(x.double(), w13.double(), w2.double(), clean_w.double(),
                                                     clean_ids),
                                 ref.fused_moe(x, w13, w2, clean_w, clean_ids), name="fused_moe bad ids")
        emap = torch.arange(E, dtype=torch.int32, device=DEVICE)
        emap[::3] = E + 4  # past E_local = E
        emap[1::5] = -9
        clean_map = torch.where((emap < 0) | (emap >= E), -1, emap)
        out = ops.moe_experts(x, w13, w2, w, clean_ids, expert_map=emap, backend=backend)
        assert_matches_reference(out, ref.fused_moe(x.double(), w13.double(), w2.double(), w.double(), clean_ids,
                                                     expert_map=clean_map),
                                 ref.fused_moe(x, w13, w2, w, clean_ids, expert_map=clean_map), name="bad map")


# --- the CUDA C++ kernels' logic on the CPU emulator (tests/cuda_emu) ---------------------------------------------


@pytest.fixture(scope="module")
def _moe_emu_lib(build_cuda_emu):
    """kernels/cuda/moe_routing.cu compiled for the host with the CUDA emulator tests/cuda_emu/emu.h."""
    return build_cuda_emu("emu_moe.cpp")


@pytest.fixture
def cuda_moe_emulated(_moe_emu_lib, monkeypatch):
    """kernels/cuda_moe.py's own host code (buffers, grids, blocks, launch order) on CPU tensors, with every
    kernel launch run by the emulator instead of CuPy. Returns the list of launched kernel names."""
    import ctypes

    from omni_fast.kernels import cuda_moe

    launched = []

    def run(name, device, grid, block, args):
        fn = getattr(_moe_emu_lib, f"emu_{name}")
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint] + [
            ctypes.c_void_p if a.dtype.name == "uint64" else ctypes.c_longlong if a.dtype.name == "int64"
            else ctypes.c_int for a in args]
        fn.restype = None
        launched.append(name)
        fn(grid[0], block[0], *[int(a) for a in args])

    monkeypatch.setattr(cuda_moe, "_run", run)
    monkeypatch.setattr(cuda_moe, "_check_device", lambda name, t: None)
    return launched


@pytest.mark.parametrize("T,E,k", [(0, 8, 2), (1, 128, 8), (6, 6, 6), (9, 60, 4), (2, 256, 32), (5, 33, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_topk_softmax_logic_emulated(cuda_moe_emulated, T, E, k, dtype):
    """The CUDA C++ router (one warp per token, warp arg-max rounds) on the emulator vs the reference: E not a
    power of two, top_k == E, T = 0/1, T not a multiple of the 4 warps of a block (idle warps), ties, NaN rows."""
    from omni_fast.kernels import cuda_moe

    g = torch.Generator().manual_seed(T * 7 + E)
    logits = (torch.randn(T, E, generator=g) * 3).to(dtype)
    if T >= 6:
        logits[1] = logits[1].round()  # ties: lowest index first
        logits[2, E // 2] = float("nan")  # a NaN row: ids 0..k-1, NaN weights
    for renorm in (True, False):
        w, i = cuda_moe.topk_softmax(logits, k, renorm)
        rw, ri = ref.topk_softmax(logits, k, renorm)
        assert torch.equal(i, ri)
        torch.testing.assert_close(w, rw, rtol=2e-6, atol=1e-7, equal_nan=True)
    assert cuda_moe_emulated == ([] if T == 0 else [f"omni_fast_topk_softmax_kernel_{ref_name}"
                                                    for ref_name in [{torch.float32: "fp32", torch.float16: "fp16",
                                                                      torch.bfloat16: "bf16"}[dtype]] * 2])


@pytest.mark.parametrize("T,E,k,bs", [(0, 4, 2, 16), (1, 128, 8, 16), (13, 6, 6, 4), (70, 9, 3, 8),
                                      (300, 60, 4, 16), (40, 1, 1, 32)])
@pytest.mark.parametrize("with_map", [False, True])
def test_cuda_align_logic_emulated(cuda_moe_emulated, T, E, k, bs, with_map):
    """The CUDA C++ alignment (atomic counts -> one-block Hillis-Steele scan + binary search per block -> atomic
    scatter) on the emulator vs the reference and the Triton kernel: T = 0/1, E not a power of two, top_k == E,
    several count/scatter blocks, one expert, int32 and int64 ids, expert_map with remote experts."""
    from omni_fast.kernels import cuda_moe, moe_align

    emap = (torch.where(torch.arange(E) % 3 == 1, -1, torch.arange(E) // 2).to(torch.int32) if with_map else None)
    for id_dtype in (torch.int32, torch.int64):
        ids = _ids(T, E, k, "cpu").to(id_dtype)  # host memory: the emulator dereferences the pointers
        got = cuda_moe.moe_align_block_size(ids, bs, E, emap)
        flat = ids.reshape(-1).long()
        _assert_same_alignment(got, ref.moe_align_block_size(ids, bs, E, emap), flat)
        triton_out = moe_align.moe_align_block_size(ids.to(DEVICE), bs, E, None if emap is None else emap.to(DEVICE))
        _assert_same_alignment(got, tuple(t.cpu() for t in triton_out), flat)
    assert cuda_moe_emulated == ([] if T == 0 else ["omni_fast_moe_align_count_i32", "omni_fast_moe_align_prefix",
                                                    "omni_fast_moe_align_scatter_i32", "omni_fast_moe_align_count_i64",
                                                    "omni_fast_moe_align_prefix", "omni_fast_moe_align_scatter_i64"])


@pytest.mark.parametrize("T,E,k,bs", [(3, 8, 2, 4), (90, 7, 3, 8)])
def test_cuda_align_logic_emulated_drops_out_of_range_ids(cuda_moe_emulated, T, E, k, bs):
    """Unchecked bad ids (E, E + 5, -1, -3, and 2**32 + 1 as int64) on the CUDA alignment: dropped, no
    out-of-bounds atomics; negative expert_map values read as -1."""
    from omni_fast.kernels import cuda_moe

    g = torch.Generator().manual_seed(T)
    emap = torch.tensor([2, -1, 0, -4, 1, 3, -1, 5][:E], dtype=torch.int32)
    for id_dtype in (torch.int32, torch.int64):
        ids = _with_bad_ids(T, E, k, id_dtype, g, "cpu")
        for m in (None, emap):
            got = cuda_moe.moe_align_block_size(ids, bs, E, m)
            _assert_same_alignment(got, _align_dropping_bad_ids(ids, bs, E, m), ids.reshape(-1).long())


def test_cuda_fill_kernel_emulated(_moe_emu_lib):
    """omni_fast_moe_fill_i32 (the C-ABI launcher's sentinel fill; the CuPy path fills with torch): a grid-stride
    loop over more rows than threads."""
    import ctypes

    out = torch.zeros(1000, dtype=torch.int32)
    fn = _moe_emu_lib.emu_omni_fast_moe_fill_i32
    fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int]
    fn(3, 64, out.data_ptr(), 999, 7)
    assert bool((out[:999] == 7).all()) and int(out[999]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 40, 1000])
def test_fused_moe_cuda_graph_capture_and_replay(T):
    """No host sync, fixed sizes: the whole block captures in a CUDA graph and replays on new inputs."""
    E, k, H, I = 128, 6, 1024, 384
    g, w13, w2, sw13, sw2, sg = _block_weights(E, H, I, 768, torch.bfloat16)
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)

    def run():
        return ops.moe_block(x, g, w13, w2, k, shared_w13=sw13, shared_w2=sw2, shared_gate_weight=sg)

    run()  # compile the kernels before capturing
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, run(), rtol=0, atol=0)


def test_bench_cases_build_and_check():
    from omni_fast.bench.cases import moe as cases

    full = cases.cases("full")
    assert len(full) == 2 * len(cases.TOKENS["full"]) + len(cases.BLOCK_TOKENS["full"])
    assert all(c.op == "moe" and c.bytes > 0 and c.flops > 0 for c in full)
    decode = next(c for c in full if c.name == "thinker experts T=1")
    assert decode.params["touched_experts"] == 8
    # The talker block runs at every T of the issue, like the experts.
    assert sorted(c.params["T"] for c in full if c.params.get("block")) == sorted(cases.TOKENS["full"])
    for check in {c.check for c in full}:
        check()
    # The omni_fast_tma provider: omni_fast's launch config with the TMA weight path in both GEMMs.
    cfg = cases.tma_config(1, 128, 8, 2048, 768, torch.device("cpu"))
    plain = moe_gemm.get_config(1, 128, 8, 2048, 768, torch.bfloat16, torch.device("cpu"))
    assert [c["USE_TMA"] for c in moe_gemm._split(cfg)] == [True, True]
    assert [dict(c, USE_TMA=True) for c in moe_gemm._split(plain)] == list(moe_gemm._split(cfg))


def test_bench_cases_bound_is_the_issues_roofline():
    """% of roofline as the issue defines it: decode (T <= 64) against HBM bandwidth (touched weight bytes),
    prefill (T >= 4096) against the bf16 matmul rate (FLOPs), set explicitly per case, so the thinker at T=4096
    (byte floor larger on an H100-like roofline) still reports % of the compute roof. In between the harness
    picks the larger floor ("auto"): thinker experts at T=1024 are memory bound there."""
    from omni_fast.bench import harness
    from omni_fast.bench.cases import moe as cases

    roof = {"copy_gbps": 3000.0, "matmul_tflops": 800.0}  # bytes/s 3.0e12, flop/s 8.0e14
    by_name = {c.name: c for c in cases.cases("full")}
    for name, c in by_name.items():
        T = c.params["T"]
        numbers = "memory" if c.bytes / 3.0e12 >= c.flops / 8.0e14 else "compute"
        want = "memory" if T <= 64 else "compute" if T >= 4096 else numbers
        assert c.bound == ("memory" if T <= 64 else "compute" if T >= 4096 else "auto"), name
        assert harness.resolve_bound(c, roof) == want, name
        assert c.tags == (("decode",) if T <= 64 else ("prefill",) if T >= 4096 else ()), name
    assert harness.resolve_bound(by_name["thinker experts T=4096"], roof) == "compute"
    assert by_name["thinker experts T=4096"].bytes / 3.0e12 > by_name["thinker experts T=4096"].flops / 8.0e14
    assert harness.resolve_bound(by_name["thinker experts T=1024"], roof) == "memory"
    assert harness.resolve_bound(by_name["talker block T=16384"], roof) == "compute"
    fixed = cases.Case(op="x", name="x", params={}, setup=lambda d: {}, flops=1e15, bytes=1.0, bound="memory")
    assert harness.resolve_bound(fixed, roof) == "memory"


def test_bench_block_case_bytes_use_the_block_routing():
    """The talker block case counts the experts its own router picks for its (fixed) inputs."""
    from omni_fast.bench.cases import moe as cases

    E, k, H, I, Is = cases.MODELS["talker"]
    for T in cases.BLOCK_TOKENS["full"][:3]:
        x, g, touched = cases._block_inputs(T)
        assert touched == int(torch.unique(ref.router(x, g, k)[1]).numel())
        case = next(c for c in cases.cases("full") if c.name == f"talker block T={T}")
        assert case.params["touched_experts"] == touched
        assert case.bytes == float((touched * 3 * H * I + 3 * H * Is + (E + 1) * H) * 2 + 2 * T * H * 2)


def test_bench_block_liger_provider_composes_the_block():
    """The block case's ``liger`` provider: liger's fused experts (stubbed here by the reference experts, which
    take the same arguments) between transformers' router and shared expert equals the whole block; without the
    liger wheel or CUDA it is reported as unavailable."""
    from omni_fast.bench.case import Unavailable
    from omni_fast.bench.cases import moe as cases

    T, E, k, H, I, Is = 7, 6, 2, 32, 16, 24
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: (torch.randn(*s, generator=gen) * 0.2).to(DEVICE)  # noqa: E731
    x, g, w13, w2, sw13, sw2, sg = r(T, H), r(E, H), r(E, 2 * I, H), r(E, H, I), r(2 * Is, H), r(H, Is), r(1, H)
    got = cases.liger_block(ref.fused_moe, x, g, w13, w2, k, sw13, sw2, sg)
    torch.testing.assert_close(got, ref.moe_block(x, g, w13, w2, k, True, sw13, sw2, sg), rtol=1e-6, atol=1e-6)
    if not torch.cuda.is_available():
        fns = cases._block_setup(3, "smoke")(torch.device("cpu"))
        assert isinstance(fns["liger"], Unavailable)


def test_bench_compile_baseline_is_the_reference_without_host_syncs():
    """The ``compile`` provider's grouped formulation: same result as the reference, and one graph (no host sync,
    no data-dependent shapes) under ``torch.compile(fullgraph=True)``."""
    from omni_fast.bench.cases import moe as cases

    if cases._grouped_mm() is None:
        pytest.skip("this torch has no grouped_mm")
    T, E, k, H, I, Is = 13, 6, 3, 32, 16, 24
    dt = torch.bfloat16  # torch.compile's grouped_mm takes bf16 only
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=gen) * 0.3).to(DEVICE, dt)  # noqa: E731
    x, g, w13, w2, sw13, sw2, sg = r(T, H), r(E, H), r(E, 2 * I, H), r(E, H, I), r(2 * Is, H), r(H, Is), r(1, H)
    try:
        cases.grouped_experts(x[:1], w13, w2, *ref.router(x[:1], g, k))
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"grouped_mm does not run on {DEVICE}: {exc}")
    w, ids = ref.router(x, g, k)
    compiled = torch.compile(cases.grouped_experts, fullgraph=True, dynamic=False, backend="eager")
    for got in (cases.grouped_experts(x, w13, w2, w, ids), compiled(x, w13, w2, w, ids)):
        torch.testing.assert_close(got, ref.fused_moe(x, w13, w2, w, ids), rtol=2e-2, atol=2e-2)
    block = torch.compile(cases.grouped_block, fullgraph=True, dynamic=False, backend="eager")
    want = ref.moe_block(x, g, w13, w2, k, True, sw13, sw2, sg)
    torch.testing.assert_close(block(x, g, w13, w2, k, sw13, sw2, sg), want, rtol=2e-2, atol=2e-2)
