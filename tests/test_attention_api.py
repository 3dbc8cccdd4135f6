"""Flash attention: backends, torch.compile tracing, bad input, malformed index values (memory-safe kernels,
check_values), the benchmark's unmasked-work count."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omni_fast
from omni_fast.ops import flash_attn_varlen, flash_attn_with_kvcache
from omni_fast.reference import attention as ref
from omni_fast.testing import DEVICE

from _attention_helpers import _close_lse, _cu


# --- dispatch, tracing, bad input ---------------------------------------------------------------------------


def test_backends_agree():
    cu = _cu([3, 4])
    q, k = torch.randn(7, 2, 16, device=DEVICE), torch.randn(7, 1, 16, device=DEVICE)
    with omni_fast.use_backend("reference"):
        a = flash_attn_varlen(q, k, k, cu, cu, 4, 4, causal=True)
    with omni_fast.use_backend("triton"):
        b = flash_attn_varlen(q, k, k, cu, cu, 4, 4, causal=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_traces_under_torch_compile():
    cu = _cu([3, 4]).cpu()
    q, k = torch.randn(7, 2, 16), torch.randn(7, 1, 16)

    def f(q, k):
        return flash_attn_varlen(q, k, k, cu, cu, 4, 4, causal=True, backend="reference") * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(q, k), f(q, k))

    def f_triton(q, k):
        return flash_attn_varlen(q, k, k, cu, cu, 4, 4, causal=True, backend="triton") * 2

    torch.testing.assert_close(torch.compile(f_triton, fullgraph=True, backend="eager")(q, k), f(q, k),
                               rtol=1e-5, atol=1e-5)

    def f_no_max(q, k):  # max_seqlen None (the packed grid): no host value needed while tracing either
        return flash_attn_varlen(q, k, k, cu, cu, None, None, causal=True, backend="triton") * 2

    torch.testing.assert_close(torch.compile(f_no_max, fullgraph=True, backend="eager")(q, k), f(q, k),
                               rtol=1e-5, atol=1e-5)

    def g(q, kc, vc, lens, kn):
        return flash_attn_with_kvcache(q, kc, vc, kn, kn, cache_seqlens=lens, causal=True, backend="reference") + 1

    kc = torch.zeros(2, 6, 1, 16)
    args = (torch.randn(2, 1, 2, 16), torch.tensor([1, 4], dtype=torch.int32), torch.randn(2, 1, 1, 16))
    out = torch.compile(g, fullgraph=True, backend="eager")(args[0], kc.clone(), kc.clone(), args[1], args[2])
    torch.testing.assert_close(out, g(args[0], kc.clone(), kc.clone(), args[1], args[2]))


def _varlen(**over):
    a = dict(q=torch.randn(7, 4, 16), k=torch.randn(7, 2, 16), v=torch.randn(7, 2, 16), cu_seqlens_q=_cu([3, 4]).cpu(),
             cu_seqlens_k=_cu([3, 4]).cpu(), max_seqlen_q=4, max_seqlen_k=4)
    a.update(over)
    pos = [a.pop(n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
    return flash_attn_varlen(*pos, **a, backend="reference")


@pytest.mark.parametrize("over,exc,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 7])), TypeError, "cu_seqlens_q must have dtype"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 3, 7], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, "total number of tokens"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, r"cu_seqlens_q\[0\] must be 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32)), ValueError, "entries like cu_seqlens_q"),
    (dict(k=torch.randn(7, 3, 16), v=torch.randn(7, 3, 16)), ValueError, "multiple of the number of key/value"),
    (dict(q=torch.randn(7, 4, 264), k=torch.randn(7, 2, 264), v=torch.randn(7, 2, 264)), ValueError, "head_dim"),
    (dict(k=torch.randn(7, 2, 8), v=torch.randn(7, 2, 8)), ValueError, "head_dim 16"),
    (dict(v=torch.randn(7, 2, 16, dtype=torch.float16)), TypeError, "same dtype"),
    (dict(q=torch.randn(7, 4, 16).to(torch.int32)), TypeError, "q must have dtype"),
    (dict(max_seqlen_q=3), ValueError, "max_seqlen_q"),
    (dict(max_seqlen_q=4.0), TypeError, "max_seqlen_q must be an int"),
    (dict(window_size=(-2, 0)), ValueError, r"window_size\[0\]"),
    (dict(window_size=3), ValueError, "window_size must be a pair"),
    (dict(softmax_scale="x"), TypeError, "softmax_scale"),
])
def test_varlen_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _varlen(**over)


def test_varlen_key_counts_beyond_the_keys_are_refused():
    """Paged keys: a sequence's key count (``seqused_k[b]``, or ``cu_seqlens_k``'s span) beyond its block-table row
    (max_blocks * page rows) or negative was clamped by the kernel and the reference without a word (attention
    over fewer keys than asked); the kvcache call's ``cache too small`` check has always caught the same. Packed
    keys: ``seqused_k[b]`` past the keys after ``cu_seqlens_k[b]``. ``check_values=False`` still clamps."""
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    q, kc = torch.randn(2, 2, 16), torch.randn(4, 4, 1, 16)  # 4 pages of 4 rows
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)  # 8 rows per sequence

    def paged(seqused=None, cu_k=None, **kw):
        return flash_attn_varlen(q, kc, kc, cu_q, cu_q if cu_k is None else cu_k, 1, None, block_table=table,
                                 seqused_k=seqused, backend="reference", **kw)

    paged(torch.tensor([8, 3], dtype=torch.int32))  # a full row is fine
    for used in ([9, 3], [3, -1]):
        with pytest.raises(ValueError, match="seqused_k"):
            paged(torch.tensor(used, dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        paged(cu_k=torch.tensor([0, 9, 12], dtype=torch.int32))
    paged(torch.tensor([9, 3], dtype=torch.int32), check_values=False)
    cu = _cu([3, 4]).cpu()
    packed = dict(q=torch.randn(7, 2, 16), k=torch.randn(7, 1, 16), v=torch.randn(7, 1, 16))
    flash_attn_varlen(*packed.values(), cu, cu, 4, None, seqused_k=torch.tensor([3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="seqused_k"):  # sequence 1's keys start at row 3 of 7
        flash_attn_varlen(*packed.values(), cu, cu, 4, None, seqused_k=torch.tensor([3, 5], dtype=torch.int32))


def _kvcache(**over):
    a = dict(q=torch.randn(2, 3, 4, 16), k_cache=torch.zeros(2, 8, 2, 16), v_cache=torch.zeros(2, 8, 2, 16),
             cache_seqlens=torch.tensor([0, 5], dtype=torch.int32), k=torch.randn(2, 3, 2, 16),
             v=torch.randn(2, 3, 2, 16))
    a.update(over)
    pos = [a.pop(n) for n in ("q", "k_cache", "v_cache")]
    return flash_attn_with_kvcache(*pos, **a, backend="reference")


@pytest.mark.parametrize("over,exc,match", [
    (dict(cache_seqlens=torch.tensor([0, 6], dtype=torch.int32)), ValueError, "cache too small"),
    (dict(k_cache=torch.zeros(2, 2, 2, 16), v_cache=torch.zeros(2, 2, 2, 16)), ValueError, "too few for the 3"),
    (dict(cache_seqlens=torch.tensor([0, 5])), TypeError, "cache_seqlens must have dtype"),
    (dict(k_cache=torch.zeros(2, 8, 3, 16), v_cache=torch.zeros(2, 8, 3, 16), k=None, v=None), ValueError,
     "multiple of the number of key/value"),
    (dict(k=None), ValueError, "together"),
    (dict(k=torch.randn(2, 3, 2, 8)), ValueError, "k must have shape"),
    (dict(k=torch.randn(2, 2, 2, 16)), ValueError, "v must have shape"),  # k may be longer/shorter than q
    (dict(v_cache=torch.zeros(2, 8, 2, 16, dtype=torch.float16)), TypeError, "same dtype"),
    (dict(k_cache=torch.zeros(3, 8, 2, 16), v_cache=torch.zeros(3, 8, 2, 16)), ValueError, "one row per sequence"),
    (dict(block_table=torch.tensor([[0], [5]], dtype=torch.int32)), ValueError, "block_table must lie in"),
    (dict(block_table=torch.tensor([[0], [1]], dtype=torch.int32), k_cache=torch.zeros(2, 4, 2, 16),
          v_cache=torch.zeros(2, 4, 2, 16)), ValueError, "too few|cache too small"),
    (dict(q=torch.randn(2, 3, 4, 264), k_cache=torch.zeros(2, 8, 2, 264), v_cache=torch.zeros(2, 8, 2, 264),
          k=torch.randn(2, 3, 2, 264), v=torch.randn(2, 3, 2, 264)), ValueError, r"head_dim must be in \[1, 256\]"),
    (dict(num_splits=-1), ValueError, "num_splits"),
    (dict(block_table=torch.tensor([[0], [0]], dtype=torch.int32), k_cache=torch.zeros(0, 8, 2, 16),
          v_cache=torch.zeros(0, 8, 2, 16)), ValueError, "no pages"),
    (dict(key_padding_mask=torch.ones(2, 8)), TypeError, "key_padding_mask must have dtype"),
    (dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
])
def test_kvcache_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _kvcache(**over)


def test_default_scale_is_inverse_sqrt_head_dim():
    cu = _cu([5]).cpu()
    q, k = torch.randn(5, 1, 16), torch.randn(5, 1, 16)
    a = flash_attn_varlen(q, k, k, cu, cu, 5, 5, backend="reference")
    b = flash_attn_varlen(q, k, k, cu, cu, 5, 5, softmax_scale=1 / math.sqrt(16), backend="reference")
    assert torch.equal(a, b)


def test_alignment_hint_only_when_pointers_and_strides_allow():
    from omni_fast.kernels.flash_attn import alignment

    buf = torch.zeros(64, 4, 72, dtype=torch.float16)
    assert alignment((buf,), buf.stride()[:-1]) == 8  # 72-element rows of fp16: 16-byte aligned
    assert alignment((buf[:, :, 1:],), buf.stride()[:-1]) == 1  # shifted by one element
    assert alignment((buf,), (buf.stride(0), 4)) == 4
    assert alignment((torch.zeros(8, 3, 8),), (24, 8)) == 4  # fp32: at most 16 bytes = 4 elements
    # a misaligned view still runs correctly (no alignment promise is made to the compiler)
    cu = _cu([9]).to(DEVICE)
    q = torch.randn(9, 2, 17, device=DEVICE)[:, :, 1:]
    out = flash_attn_varlen(q, q, q, cu, cu, 9, 9, causal=True, backend="triton")
    torch.testing.assert_close(out, ref.flash_attn_varlen(q, q, q, cu, cu, 9, 9, causal=True), rtol=1e-5, atol=1e-5)


def test_int_max_window_means_unbounded():
    import omni_fast

    T, H, D = 37, 2, 16
    q, k, v = (torch.randn(T, H, D, device=DEVICE) for _ in range(3))
    cu = torch.tensor([0, 20, T], dtype=torch.int32, device=DEVICE)
    big = omni_fast.ops.flash_attn_varlen(q, k, v, cu, cu, 20, 20, window_size=(2**31 - 1, 2**31 - 1),
                                          backend="triton")
    none = omni_fast.ops.flash_attn_varlen(q, k, v, cu, cu, 20, 20, backend="triton")
    torch.testing.assert_close(big, none)


def test_kvcache_output_is_contiguous_like_its_fake():
    import omni_fast

    B, S, Hq, Hk, D, Sq = 2, 16, 4, 2, 16, 3
    q = torch.randn(B, Hq, Sq, D, device=DEVICE).transpose(1, 2)  # transformers' layout: non-contiguous
    k_cache, v_cache = torch.zeros(B, S, Hk, D, device=DEVICE), torch.zeros(B, S, Hk, D, device=DEVICE)
    k, v = torch.randn(B, Sq, Hk, D, device=DEVICE), torch.randn(B, Sq, Hk, D, device=DEVICE)
    seqlens = torch.tensor([2, 5], dtype=torch.int32, device=DEVICE)
    outs = [omni_fast.ops.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=seqlens,
                                                  causal=True,
                                                  backend=be) for be in ("triton", "reference")]
    assert all(o.is_contiguous() for o in outs)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


# --- malformed index values: memory-safe kernels, check_values -----------------------------------------------

GUARD = 2  # guard rows/pages on each side of a buffer: NaN where the kernels read, a sentinel where they write


def _guarded(shape, fill=None, dtype=torch.float32):
    """(inner view, whole buffer): ``shape`` rows inside ``GUARD`` rows of ``fill`` (NaN by default) on each side
    along dim 0; the inner rows are random. An out-of-bounds read shows up as NaN, an out-of-bounds write as a
    changed guard."""
    buf = torch.full((shape[0] + 2 * GUARD, *shape[1:]), float("nan") if fill is None else fill, dtype=dtype,
                     device=DEVICE)
    inner = buf[GUARD:GUARD + shape[0]]
    inner.copy_(torch.randn(shape, dtype=dtype, device=DEVICE))
    return inner, buf


def _guards_intact(buf, fill=None):
    g = torch.cat([buf[:GUARD], buf[-GUARD:]])
    return bool(torch.isnan(g).all()) if fill is None else bool((g == fill).all())


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_kernels_with_bad_lengths_and_pages_touch_no_neighbour(paged):
    """cache_seqlens + Sq over the capacity, negative lengths, block_table entries outside the cache (values the
    public op does not check on a GPU) straight into the launchers: appended tokens that do not fit are dropped (no
    write into the next sequence's rows or past the cache), lengths are clamped to the capacity, pages to the
    cache; the outputs are finite and equal the reference's clamped meaning."""
    from omni_fast.kernels import flash_attn_kvcache as kv

    B, Hq, Hk, D, Sq = 4, 2, 1, 16, 3
    if paged:
        page, nb = 4, 5  # capacity 2 pages = 8 rows; entries 5 and -1 point at the guard pages
        kc, kbuf = _guarded((nb, page, Hk, D))
        vc, vbuf = _guarded((nb, page, Hk, D))
        table = torch.tensor([[0, 5], [-1, 2], [3, 4], [1, -9]], dtype=torch.int32, device=DEVICE)
        lens = [3, 2, 6, 20]
    else:
        kc, kbuf = _guarded((B, 8, Hk, D))
        vc, vbuf = _guarded((B, 8, Hk, D))
        table = None
        lens = [7, -2, 6, 20]  # the audit's overflow (7 + 3 > 8), a negative length, the last row past the end
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, Sq, Hq, D, device=DEVICE)
    k, v = torch.randn(B, Sq, Hk, D, device=DEVICE), torch.randn(B, Sq, Hk, D, device=DEVICE)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    before = kc.clone()
    kv.append_kv(kc, vc, seqlens, k, v, table)
    out, lse = kv.kvcache_attention(q, kc, vc, seqlens, Sq, table, D ** -0.5, True, -1, -1, 1)
    assert _guards_intact(kbuf) and _guards_intact(vbuf), "a write outside the cache"
    assert torch.isfinite(out).all() and not torch.isnan(lse).any(), "a read outside the cache"
    ref.append_kv(kc_ref, vc_ref, seqlens, k, v, table)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    if not paged:
        assert torch.equal(kc[0, :7], before[0, :7]) and torch.equal(kc[0, 7], k[0, 0])  # one token fitted
        assert torch.equal(kc[1, 1:], before[1, 1:]), "sequence 0's overflow reached sequence 1"
        assert torch.equal(kc[3], before[3])  # nothing fits at 20
    exp, lse_exp = ref.flash_attn_with_kvcache(q, kc_ref, vc_ref, seqlens + Sq, block_table=table, return_lse=True)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    _close_lse(lse.transpose(0, 1), lse_exp)  # the kernel API returns the head-major [Hq, B, Sq]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cu_q,cu_k,exact", [
    ([0, 3, 9], [-4, 2, 12], True),  # ends past the totals, a negative start: clamped to [0, 3, 7] / [0, 2, 6]
    ([0, 5, 2, 7], [0, 4, 1, 6], False),  # decreasing: an empty sequence and an overlapping one
    ([0, 1000, -1000, 7], [0, 6, -5, 6], True),  # huge jumps: sequences 0 and 2 clamp to the same rows
    ([5, 7, 7], [-1, 3, 2], True),  # cu_q[0] != 0: rows 0..4 belong to no sequence and stay unwritten
])
def test_varlen_kernel_with_bad_cu_seqlens_stays_in_bounds(packed, cu_q, cu_k, exact):
    """Malformed cu_seqlens straight into the launcher (both grids): the sequence bounds are clamped into the
    tensors, no read or write leaves q/k/v/out/lse, rows of no sequence are left as they were; where the clamped
    sequences do not overlap (or coincide), the result is the reference's on the clamped bounds."""
    from omni_fast.kernels.flash_attn import attn_fwd

    Tq, Tk, Hq, Hk, D, sentinel = 7, 6, 2, 1, 16, 7.0
    q, _ = _guarded((Tq, Hq, D))
    k, _ = _guarded((Tk, Hk, D))
    v, _ = _guarded((Tk, Hk, D))
    out, obuf = _guarded((Tq, Hq, D), fill=sentinel)
    out.fill_(sentinel)
    lbuf = torch.full((Hq, Tq + 2 * GUARD), sentinel, device=DEVICE)
    lse = lbuf[:, GUARD:GUARD + Tq]
    cq, ck = (torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in (cu_q, cu_k))
    attn_fwd(q, k, v, out, lse, batch=cq.numel() - 1, rows_per_seq=Tq * Hq, cu_q=cq, seqlen_q=0, cu_k=ck,
             seqused_k=None, k_extra=0, block_table=None, softmax_scale=D ** -0.5, causal=True, window_size=(-1, -1),
             packed_grid=packed)
    assert _guards_intact(obuf, sentinel) and bool((lbuf[:, :GUARD] == sentinel).all()) \
        and bool((lbuf[:, -GUARD:] == sentinel).all()), "a write outside out/lse"
    assert torch.isfinite(out).all() and not torch.isnan(lse).any(), "a read outside q/k/v"
    if exact:
        exp, lse_exp = ref.flash_attn_varlen(q, k, v, cq, ck, None, None, causal=True, return_lse=True)
        owned = torch.zeros(Tq, dtype=torch.bool, device=DEVICE)
        for b in range(len(cu_q) - 1):
            s = min(max(cu_q[b], 0), Tq)
            owned[s:min(max(cu_q[b + 1], s), Tq)] = True
        torch.testing.assert_close(out[owned], exp[owned], rtol=1e-5, atol=1e-5)
        _close_lse(lse[:, owned], lse_exp[:, owned])
        assert bool((out[~owned] == sentinel).all())


def _as_on_gpu(monkeypatch):
    """Value checks as on a CUDA tensor: skipped unless ``check_values=True``; counts the host copies made."""
    import omni_fast.ops.attention as ops_attn
    import omni_fast.validation as validation

    copies = []
    real_copies = validation.host_copies

    def checkable(t, check_values=None):
        return False if validation._is_tracing() else bool(check_values)

    def counting(*ts):
        copies.append(len(ts))
        return real_copies(*ts)

    for mod in (validation, ops_attn):
        monkeypatch.setattr(mod, "values_checkable", checkable)
    monkeypatch.setattr(ops_attn, "host_copies", counting)
    return copies


def test_check_values_forces_value_checks_off_cpu(monkeypatch):
    """On the device path (simulated: CPU tensors treated as CUDA ones) the value checks are skipped by default and
    the kernels clamp; ``check_values=True`` runs them all from one host copy; ``False`` skips them on the CPU."""
    bad_cu = dict(cu_seqlens_q=torch.tensor([0, 3, 9], dtype=torch.int32))  # last != total
    with pytest.raises(ValueError, match="total number of tokens"):
        _varlen(**bad_cu)
    _varlen(**bad_cu, check_values=False)  # CPU, checks off: the reference clamps like the kernel
    bad_kv = dict(cache_seqlens=torch.tensor([7, 3], dtype=torch.int32))  # 7 + 3 > 8
    bad_bt = dict(block_table=torch.tensor([[0], [5]], dtype=torch.int32))
    _kvcache(**bad_kv, check_values=False)
    copies = _as_on_gpu(monkeypatch)
    _varlen(**bad_cu)
    _varlen(max_seqlen_q=3)
    _kvcache(**bad_kv)
    _kvcache(**bad_bt)
    assert copies == []  # no host sync by default
    for call, over, match in [(_varlen, bad_cu, "total number of tokens"), (_varlen, dict(max_seqlen_q=3),
                              "max_seqlen_q"), (_kvcache, bad_kv, "cache too small"),
                              (_kvcache, bad_bt, "block_table must lie in")]:
        with pytest.raises(ValueError, match=match):
            call(**over, check_values=True)
    assert copies == [2, 2, 1, 2]  # one host copy per call, holding every index tensor it checks
    cu = _cu([3, 4]).cpu()
    q, k = torch.randn(7, 2, 16), torch.randn(7, 1, 16)
    out = flash_attn_varlen(q, k, k, cu, cu, 4, 4, check_values=True, backend="triton")
    torch.testing.assert_close(out, flash_attn_varlen(q, k, k, cu, cu, 4, 4, backend="reference"), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.gpu
def test_gpu_bad_values_unchecked_without_sync_and_checked_on_request():
    """On CUDA: malformed cache_seqlens pass unchecked with no host sync (CUDA sync debug mode "error") and the
    overflow stays out of the neighbour's rows; ``check_values=True`` catches them (and bad cu_seqlens)."""
    dev, dt = "cuda", torch.float16
    B, S, Hq, Hk, D, Sq = 2, 8, 2, 1, 64, 3
    kc, vc = torch.randn(B, S, Hk, D, device=dev, dtype=dt), torch.randn(B, S, Hk, D, device=dev, dtype=dt)
    q = torch.randn(B, Sq, Hq, D, device=dev, dtype=dt)
    k, v = torch.randn(B, Sq, Hk, D, device=dev, dtype=dt), torch.randn(B, Sq, Hk, D, device=dev, dtype=dt)
    ok = torch.tensor([4, 3], dtype=torch.int32, device=dev)
    bad = torch.tensor([7, 3], dtype=torch.int32, device=dev)  # 7 + 3 > 8
    flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=ok, causal=True, backend="triton")  # compile first
    before = kc.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=bad, causal=True, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(kc[1, :3], before[1, :3]), "sequence 0's overflow reached sequence 1"
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="cache too small"):
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=bad, causal=True, backend="triton",
                                check_values=True)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32, device=dev)
    x = torch.randn(7, Hq, D, device=dev, dtype=dt)
    with pytest.raises(ValueError, match="total number of tokens"):
        flash_attn_varlen(x, x, x, cu, cu, None, None, backend="triton", check_values=True)


def test_host_copies_cpu_tensors_as_they_are():
    from omni_fast.validation import host_copies

    a, b = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([[1, 2]], dtype=torch.int32)
    assert all(x is y for x, y in zip(host_copies(a, b), (a, b)))


# --- the benchmark's unmasked-work count ---------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=5),
       causal=st.booleans(), left=st.integers(-1, 12), right=st.integers(-1, 12))
def test_bench_visible_pairs_equals_reference_mask_count(lens, causal, left, right):
    """``omni_fast.bench.cases.attention.visible_pairs`` (the FLOP count behind the TFLOP/s the benchmark reports: unmasked
    work only) summed over sequences == the number of True entries of the reference's packed mask."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:  # `bench` is a folder of the repository, not an installed package
        sys.path.insert(0, root)
    from omni_fast.bench.cases.attention import visible_pairs

    lq, lk = [a for a, _ in lens], [b for _, b in lens]
    mask = ref.varlen_mask(_cu(lq).cpu(), _cu(lk).cpu(), causal=causal, window_size=(left, right))
    l, r = ref.normalize_window(causal, (left, right))
    assert sum(visible_pairs(a, b, l, r) for a, b in zip(lq, lk)) == int(mask.sum())
