"""omni_fast.compat.flash_attn: flash-attn 2.8's signatures and documented semantics, on the Triton kernels.

The expected values are computed here from FlashAttention's documentation (dense fp64 attention with the mask,
softcap, ALiBi and rotary rules written out), not from omni-fast's reference module, and no flash-attn code is
used. Shapes are tiny: under the CPU interpreter every call runs the Triton kernels.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import omni_fast
from omni_fast import reference
from omni_fast.compat import flash_attn as fa
from omni_fast.testing import DEVICE, assert_graph_replay_matches

from _attention_helpers import _cu, rand

F64 = torch.float64
TOL = dict(rtol=2e-4, atol=2e-4)


# --- FlashAttention's documented semantics, written out densely in fp64 ------------------------------------------


def fa_is_causal(causal, window, seqlen_k):
    """flash-attn 2.8's host rule (flash_api.cpp): window bounds >= seqlen_k (k's length, the cache capacity or
    max_seqlen_k) are unbounded, causal sets right = 0, and the kernel is the causal one when left is unbounded
    and right is 0."""
    left, right = (-1 if w >= seqlen_k else w for w in window)
    return left < 0 and (0 if causal else right) == 0


def naive(q, k, v, *, scale=None, causal=False, window=(-1, -1), softcap=0.0, slopes=None, k_lo=0, seqlen_k=None):
    """q ``[Lq, Hq, D]``, k/v ``[Lk, Hk, D]`` -> (out ``[Lq, Hq, D]``, lse ``[Hq, Lq]``), fp64, as flash-attn 2.8.

    Query i sits at key position ``i + Lk - Lq`` (bottom-right); it sees keys ``p - left .. p + right`` (-1 =
    unbounded, causal: right = 0) from ``k_lo`` on; scores ``scale * q.k``, then ``softcap * tanh(s / softcap)``,
    then the ALiBi bias: ``- slope * |p - j|`` as documented, except where flash-attn runs its causal kernel
    (:func:`fa_is_causal`, ``seqlen_k`` default Lk), which adds ``slope * (j - k_lo)`` (its key columns start at
    the left padding): the same softmax, another lse. Rows that see nothing: zeros and lse ``+inf`` (flash-attn's
    value, softmax.h / the early exit of flash_fwd_kernel.h / the split-KV combine).
    """
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    Lq, Hq, D = q.shape
    Lk, Hk, _ = k.shape
    scale = D ** -0.5 if scale is None else scale
    kk, vv = k.repeat_interleave(Hq // Hk, 1), v.repeat_interleave(Hq // Hk, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    p_ = torch.arange(Lq)[:, None] + Lk - Lq
    j = torch.arange(Lk)[None, :]
    if slopes is not None and fa_is_causal(causal, window, Lk if seqlen_k is None else seqlen_k):
        s = s + slopes.to(F64)[:, None, None] * (j - k_lo)
    elif slopes is not None:
        s = s - slopes.to(F64)[:, None, None] * (p_ - j).abs()
    left, right = window
    right = 0 if causal else right
    ok = (j >= k_lo) & ((j >= p_ - left) if left >= 0 else True) & ((j <= p_ + right) if right >= 0 else True)
    s = s.masked_fill(~torch.as_tensor(ok), float("-inf"))
    lse = torch.logsumexp(s, -1)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    prob = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return torch.einsum("hqk,khd->qhd", prob, vv), lse


def rope(x, cos, sin, pos, interleaved):
    """Rotary embedding of x ``[L, H, D]`` at positions pos ``[L]``: complex pairs (GPT-J) or rotate-half."""
    x = x.to(F64)
    rd = 2 * cos.shape[1]
    c, s = cos.to(F64)[pos][:, None, :], sin.to(F64)[pos][:, None, :]
    xr = x[..., :rd]
    if interleaved:
        z = torch.view_as_complex(xr.reshape(*xr.shape[:-1], rd // 2, 2).contiguous()) * torch.complex(c, s)
        xr = torch.view_as_real(z).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, -1)
        xr = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    return torch.cat([xr, x[..., rd:]], -1)


def close_lse(got, exp):
    inf = torch.isinf(exp)
    assert torch.equal(torch.isinf(got), inf)
    assert torch.equal(got[inf].to(F64), exp[inf])  # the sign too: +inf, as flash-attn
    torch.testing.assert_close(got[~inf].to(F64), exp[~inf], **TOL)


# --- signatures ------------------------------------------------------------------------------------------------

_COMMON = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
           ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
_REQ = inspect.Parameter.empty
SIGNATURES = {
    "flash_attn_func": [("q", _REQ), ("k", _REQ), ("v", _REQ)] + _COMMON,
    "flash_attn_qkvpacked_func": [("qkv", _REQ)] + _COMMON,
    "flash_attn_kvpacked_func": [("q", _REQ), ("kv", _REQ)] + _COMMON,
    "flash_attn_varlen_func": [("q", _REQ), ("k", _REQ), ("v", _REQ), ("cu_seqlens_q", _REQ), ("cu_seqlens_k", _REQ),
                               ("max_seqlen_q", _REQ), ("max_seqlen_k", _REQ)] + _COMMON
    + [("block_table", None), ("seqused_k", None)],
    "flash_attn_varlen_qkvpacked_func": [("qkv", _REQ), ("cu_seqlens", _REQ), ("max_seqlen", _REQ)] + _COMMON,
    "flash_attn_varlen_kvpacked_func": [("q", _REQ), ("kv", _REQ), ("cu_seqlens_q", _REQ), ("cu_seqlens_k", _REQ),
                                        ("max_seqlen_q", _REQ), ("max_seqlen_k", _REQ)] + _COMMON,
    "flash_attn_with_kvcache": [("q", _REQ), ("k_cache", _REQ), ("v_cache", _REQ), ("k", None), ("v", None),
                                ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
                                ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None),
                                ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
                                ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None),
                                ("num_splits", 0), ("return_softmax_lse", False)],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_is_flash_attn_2_8(name):
    """Parameter names, positional order and defaults of flash-attn 2.8 (``seqused_k``: a keyword-only
    extension of flash_attn_varlen_func, after every flash-attn parameter)."""
    params = list(inspect.signature(getattr(fa, name)).parameters.values())
    assert [(p.name, p.default) for p in params] == SIGNATURES[name]
    kinds = {p.name: p.kind for p in params}
    for pname, _ in SIGNATURES[name]:
        expected = inspect.Parameter.KEYWORD_ONLY if pname == "seqused_k" else inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert kinds[pname] == expected, pname


def test_native_kvcache_op_has_flash_attn_order_and_defaults():
    """No same-name trap: omni_fast.ops.flash_attn_with_kvcache binds flash-attn's positional arguments the same
    way and defaults to causal=False (extensions are keyword-only)."""
    native = list(inspect.signature(omni_fast.ops.flash_attn_with_kvcache).parameters.values())
    positional = [(p.name, p.default) for p in native if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == SIGNATURES["flash_attn_with_kvcache"]
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in native[len(positional):])
    # the case: keyword k/v, 3 query tokens, no causal flag -> non-causal, as flash-attn
    kc, vc, q, k = torch.zeros(1, 8, 1, 16), torch.zeros(1, 8, 1, 16), rand(1, 3, 2, 16), rand(1, 3, 1, 16)
    lens = torch.tensor([2], dtype=torch.int32)
    out = omni_fast.ops.flash_attn_with_kvcache(q, kc, vc, k=k, v=k, cache_seqlens=lens)
    keys = kc[0, :5]
    exp, _ = naive(q[0], keys, keys)
    torch.testing.assert_close(out[0].to(F64), exp, **TOL)


# --- fixed-length -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Sq,Sk,Hq,Hk,causal,window,softcap,alibi", [
    (3, 7, 4, 1, True, (-1, -1), 0.0, None),   # MQA, causal bottom-right with Sq < Sk
    (7, 3, 4, 2, True, (-1, -1), 0.0, None),   # Sq > Sk: the first rows see nothing
    (5, 5, 2, 2, False, (2, 1), 0.0, None),    # window
    (4, 6, 4, 2, True, (-1, -1), 3.0, None),   # softcap
    (4, 6, 4, 2, False, (-1, -1), 0.0, "1d"),  # alibi per head
    (4, 6, 4, 2, True, (1, -1), 2.0, "2d"),    # all at once, alibi per (batch, head)
])
def test_flash_attn_func(Sq, Sk, Hq, Hk, causal, window, softcap, alibi):
    B, D = 2, 16
    q, k, v = rand(B, Sq, Hq, D), rand(B, Sk, Hk, D), rand(B, Sk, Hk, D)
    slopes = None if alibi is None else (torch.rand(Hq) if alibi == "1d" else torch.rand(B, Hq)).to(DEVICE)
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, 0.0, None, causal, window, softcap, slopes, False, True)
    assert out.shape == q.shape and lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    assert s_dmask.numel() == 0 and s_dmask.dtype == q.dtype
    for b in range(B):
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b])
        exp, lse_exp = naive(q[b], k[b], v[b], causal=causal, window=window, softcap=softcap, slopes=sl)
        torch.testing.assert_close(out[b].to(F64), exp, **TOL)
        close_lse(lse[b], lse_exp)
    # one return value without return_attn_probs
    assert isinstance(fa.flash_attn_func(q, k, v, causal=causal), torch.Tensor)


def test_packed_variants_equal_unpacked():
    B, S, H, D = 2, 5, 2, 16
    qkv = rand(B, S, 3, H, D)
    want = fa.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    torch.testing.assert_close(fa.flash_attn_qkvpacked_func(qkv, causal=True), want)
    torch.testing.assert_close(fa.flash_attn_kvpacked_func(qkv[:, :, 0], qkv[:, :, 1:], causal=True), want)
    lens = [2, 0, 3]
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32, device=DEVICE)
    qkv_v = rand(5, 3, H, D)
    want_v = fa.flash_attn_varlen_func(qkv_v[:, 0], qkv_v[:, 1], qkv_v[:, 2], cu, cu, max(lens), max(lens),
                                       causal=True)
    torch.testing.assert_close(fa.flash_attn_varlen_qkvpacked_func(qkv_v, cu, max(lens), causal=True), want_v)
    torch.testing.assert_close(fa.flash_attn_varlen_kvpacked_func(qkv_v[:, 0], qkv_v[:, 1:], cu, cu, 3, 3,
                                                                  causal=True), want_v)


# --- varlen -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,window,softcap,alibi", [
    (True, (-1, -1), 0.0, False), (False, (1, 2), 0.0, True), (True, (3, -1), 5.0, True)])
def test_flash_attn_varlen_func(causal, window, softcap, alibi):
    lens_q, lens_k, Hq, Hk, D = [2, 0, 5, 1], [4, 3, 2, 0], 4, 2, 16
    q, k, v = rand(sum(lens_q), Hq, D), rand(sum(lens_k), Hk, D), rand(sum(lens_k), Hk, D)
    slopes = torch.rand(len(lens_q), Hq, device=DEVICE) if alibi else None
    cq, ck = _cu(lens_q), _cu(lens_k)
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=causal,
                                            window_size=window, softcap=softcap, alibi_slopes=slopes,
                                            return_attn_probs=True)
    assert lse.shape == (Hq, q.shape[0])
    for b in range(len(lens_q)):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if lens_q[b] == 0:
            continue
        exp, lse_exp = naive(q[qs], k[ks], v[ks], causal=causal, window=window, softcap=softcap,
                             slopes=None if slopes is None else slopes[b], seqlen_k=max(lens_k))
        torch.testing.assert_close(out[qs].to(F64), exp, **TOL)
        close_lse(lse[:, qs], lse_exp)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("seqused", [False, True])
def test_flash_attn_varlen_func_paged(seqused, backend):
    """Paged keys (vLLM's FlashAttention backend): block_table with random pages; cu_seqlens_k gives the key
    counts, or seqused_k replaces them."""
    page, Hq, Hk, D = 4, 4, 2, 16
    lens_q, lens_k = [3, 1, 2], [7, 5, 10]
    used = [6, 5, 3]
    n_pages = 3 * 3 + 2
    pages_k, pages_v = rand(n_pages, page, Hk, D), rand(n_pages, page, Hk, D)
    table = torch.randperm(n_pages)[:9].view(3, 3).to(torch.int32).to(DEVICE)
    q = rand(sum(lens_q), Hq, D)
    cq, ck = _cu(lens_q), _cu(lens_k)
    seqused_k = torch.tensor(used, dtype=torch.int32, device=DEVICE) if seqused else None
    with omni_fast.use_backend(backend):
        out = fa.flash_attn_varlen_func(q, pages_k, pages_v, cq, ck, 3, 10, causal=True, block_table=table,
                                        seqused_k=seqused_k)
    for b in range(3):
        n = used[b] if seqused else lens_k[b]
        keys = pages_k[table[b].long()].reshape(-1, Hk, D)[:n]
        vals = pages_v[table[b].long()].reshape(-1, Hk, D)[:n]
        exp, _ = naive(q[cq[b]:cq[b + 1]], keys, vals, causal=True)
        torch.testing.assert_close(out[cq[b]:cq[b + 1]].to(F64), exp, **TOL)


# --- KV cache ---------------------------------------------------------------------------------------------------


def _tables(S, rd):
    ang = torch.rand(S, rd // 2, device=DEVICE) * 6.28
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("case", [
    dict(),                                                          # plain append, non-causal default
    dict(causal=True, Snew=2),                                       # Snew != Sq
    dict(causal=True, paged=True),                                   # paged, random block table
    dict(causal=True, batch_idx=True, leftpad=True),                 # cache_batch_idx permutation + left padding
    dict(causal=True, rotary="neox"),                                # rotary, q at cache_seqlens + i
    dict(causal=False, rotary="gptj", Snew=1),                       # interleaved, q all at cache_seqlens
    dict(causal=False, window=(2, 0), rotary="neox", softcap=4.0),   # window -> q rotated per position too
    dict(causal=True, alibi=True, softcap=2.0, splits=2, leftpad=True),
    dict(causal=True, append=False),                                 # no new keys
    dict(causal=True, seqlens=None, append=False),                   # cache_seqlens None: the whole cache
])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_flash_attn_with_kvcache(case, backend):
    with omni_fast.use_backend(backend):
        _check_kvcache(case)


def _check_kvcache(case):
    B, Bc, S, Hq, Hk, D, page = 2, 3, 16, case.get("Hq", 4), case.get("Hk", 2), 32, 4
    Sq = case.get("Sq", 3)
    Snew = case.get("Snew", Sq)
    append = case.get("append", True)
    causal, window = case.get("causal", False), case.get("window", (-1, -1))
    batch_idx = torch.tensor(case.get("rows", [2, 0]), dtype=torch.int32, device=DEVICE) \
        if case.get("batch_idx") else None
    rows = batch_idx.tolist() if batch_idx is not None else list(range(B))
    logical = rand(Bc if batch_idx is not None else B, S, Hk, D)
    logical_v = rand(*logical.shape)
    lens = case.get("lens", [5, 9]) if case.get("seqlens", 1) is not None else [S - Snew * append] * B
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE) if case.get("seqlens", 1) is not None else None
    leftpad = torch.tensor(case.get("pads", [2, 4]), dtype=torch.int32, device=DEVICE) if case.get("leftpad") else None
    q = rand(B, Sq, Hq, D)
    k, v = (rand(B, Snew, Hk, D), rand(B, Snew, Hk, D)) if append else (None, None)
    cos = sin = None
    if case.get("rotary"):
        cos, sin = _tables(S, 16)
    slopes = torch.rand(Hq, device=DEVICE) if case.get("alibi") else None
    softcap = case.get("softcap", 0.0)
    table = None
    if case.get("paged"):
        n_pages = B * S // page + 3
        table = torch.randperm(n_pages)[:B * S // page].view(B, S // page).to(torch.int32).to(DEVICE)
        k_cache, v_cache = rand(n_pages, page, Hk, D), rand(n_pages, page, Hk, D)
        for b in range(B):
            k_cache[table[b].long()] = logical[b].view(-1, page, Hk, D)
            v_cache[table[b].long()] = logical_v[b].view(-1, page, Hk, D)
    else:
        k_cache, v_cache = logical.clone(), logical_v.clone()
    # expected: the caches after the append (k rotated at its positions), then attention
    exp_k, exp_v = logical.clone(), logical_v.clone()
    interleaved = case.get("rotary") == "gptj"
    for b in range(B):
        if append:
            pos = torch.arange(Snew) + lens[b]
            kb = rope(k[b], cos, sin, pos, interleaved).float() if cos is not None else k[b]
            exp_k[rows[b], lens[b]:lens[b] + Snew], exp_v[rows[b], lens[b]:lens[b] + Snew] = kb, v[b]
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin,
                                          seqlens if seqlens is not None else None, batch_idx, leftpad, table,
                                          None, causal, window, softcap, interleaved, slopes,
                                          case.get("splits", 0), True)
    assert out.shape == q.shape and lse.shape == (B, Hq, Sq)
    got_k = k_cache if table is None else torch.stack([k_cache[table[b].long()].reshape(S, Hk, D) for b in range(B)])
    torch.testing.assert_close(got_k, exp_k, **TOL)
    local = causal or window != (-1, -1)
    for b in range(B):
        n = lens[b] + Snew * append
        qb = q[b]
        if cos is not None:
            qb = rope(qb, cos, sin, torch.arange(Sq) * local + lens[b], interleaved)
        exp, lse_exp = naive(qb, exp_k[rows[b], :n], exp_v[rows[b], :n], causal=causal, window=window,
                             softcap=softcap, slopes=slopes, k_lo=0 if leftpad is None else int(leftpad[b]),
                             seqlen_k=S)
        torch.testing.assert_close(out[b].to(F64), exp, **TOL)
        close_lse(lse[b], lse_exp)


@pytest.mark.parametrize("seed", range(6))
def test_flash_attn_with_kvcache_random_combinations(seed):
    """Random mixes of every kvcache feature (GQA/MQA, lengths incl. 0 and full, Snew, paged or cache_batch_idx
    with left padding, rotary either way, windows, softcap, ALiBi, split-KV)."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    Sq, Snew = pick([1, 2, 4]), pick([0, 1, 3])
    lens = [int(torch.randint(0, 16 - Snew + 1, (1,), generator=g)) for _ in range(2)]
    paged = pick([False, True])
    case = dict(Sq=Sq, Snew=max(Snew, 1), append=Snew > 0, lens=lens, causal=pick([False, True]),
                window=pick([(-1, -1), (3, -1), (2, 0), (20, 1)]), softcap=pick([0.0, 1.5]), alibi=pick([False, True]),
                splits=pick([0, 1, 2]), Hq=pick([2, 4]), Hk=pick([1, 2]), rotary=pick([None, "neox", "gptj"]),
                paged=paged, batch_idx=not paged and pick([False, True]), rows=pick([[2, 0], [1, 2], [0, 0]]))
    if case["rotary"] is not None and not case["append"]:
        case["rotary"] = None  # flash-attn rotates only with new keys
    if not paged and pick([False, True]):
        case.update(leftpad=True, pads=[int(torch.randint(0, n + case["append"] * case["Snew"] + 1, (1,),
                                                         generator=g)) for n in lens])
    if case["rows"] == [0, 0] and case["append"]:
        case["rows"] = [0, 1]  # two sequences appending into one cache row: flash-attn leaves the winner undefined
    _check_kvcache(case)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("splits", [1, 3])
def test_rows_without_keys_give_zeros_and_plus_inf(splits, backend):
    """flash-attn 2.8 writes out = 0 and lse = +inf for a query row that sees no key, in every path: the
    fixed-length kernel (rows above a causal diagonal with Sq > Sk), varlen (an empty key sequence) and the
    KV cache (cache_seqlens 0 without new keys, split-KV or not). The native ops keep their documented -inf."""
    Hq, Hk, D = 2, 1, 16
    with omni_fast.use_backend(backend):
        q, k = rand(1, 5, Hq, D), rand(1, 2, Hk, D)
        out, lse, _ = fa.flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
        assert torch.equal(lse[0, :, :3], torch.full((Hq, 3), float("inf"), device=DEVICE))
        assert torch.isfinite(lse[0, :, 3:]).all() and not out[0, :3].any()

        qv, kv = rand(3, Hq, D), rand(2, Hk, D)
        out, lse, _ = fa.flash_attn_varlen_func(qv, kv, kv, _cu([2, 1]), _cu([0, 2]), 2, 2, return_attn_probs=True)
        assert torch.equal(lse[:, :2], torch.full((Hq, 2), float("inf"), device=DEVICE)) and not out[:2].any()
        assert torch.isfinite(lse[:, 2]).all()
        native = omni_fast.ops.flash_attn_varlen(qv, kv, kv, _cu([2, 1]), _cu([0, 2]), 2, 2, return_lse=True)[1]
        assert torch.equal(native[:, :2], torch.full((Hq, 2), float("-inf"), device=DEVICE))

        kc = rand(2, 300, Hk, D)
        seqlens = torch.tensor([0, 257], dtype=torch.int32, device=DEVICE)
        qc = rand(2, 1, Hq, D)
        out, lse = fa.flash_attn_with_kvcache(qc, kc, kc, cache_seqlens=seqlens, num_splits=splits,
                                              return_softmax_lse=True)
        assert torch.equal(lse[0], torch.full((Hq, 1), float("inf"), device=DEVICE)) and not out[0].any()
        exp, lse_exp = naive(qc[1], kc[1, :257], kc[1, :257])
        torch.testing.assert_close(out[1].to(F64), exp, **TOL)
        close_lse(lse[1], lse_exp)
        native = omni_fast.ops.flash_attn_with_kvcache(qc, kc, kc, cache_seqlens=seqlens, num_splits=splits,
                                                       return_softmax_lse=True)[1]
        assert torch.equal(native[0], torch.full((Hq, 1), float("-inf"), device=DEVICE))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("causal,window,causal_kernel", [
    (True, (-1, -1), True),     # causal: flash-attn's causal kernel, bias slope * (j - leftpad)
    (False, (-1, 0), True),     # window (-1, 0) is causal in flash-attn too
    (True, (40, -1), True),     # a left window as long as the cache counts as unbounded: causal again
    (True, (5, -1), False),     # a real left window: the local kernel, documented bias -slope * |p - j|
    (False, (-1, -1), False),   # non-causal: documented bias
])
@pytest.mark.parametrize("splits", [1, 2])
def test_alibi_lse_is_flash_attns(causal, window, causal_kernel, splits, backend):
    """The lse with ALiBi equals flash-attn 2.8's: under its causal kernel the bias is ``slope * (j - leftpad)``
    (written here directly: logsumexp over the visible keys of ``scale * q.k + slope * (j - leftpad)``), else
    ``-slope * |p - j|``; the outputs agree either way."""
    B, S, Sq, Hq, Hk, D = 2, 40, 3, 4, 2, 16
    lens, pads = [20, 33], [0, 6]
    q, kc, vc = rand(B, Sq, Hq, D), rand(B, S, Hk, D), rand(B, S, Hk, D)
    slopes = torch.rand(B, Hq, device=DEVICE)
    with omni_fast.use_backend(backend):
        out, lse = fa.flash_attn_with_kvcache(
            q, kc, vc, cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
            cache_leftpad=torch.tensor(pads, dtype=torch.int32, device=DEVICE), causal=causal, window_size=window,
            alibi_slopes=slopes, num_splits=splits, return_softmax_lse=True)
    assert fa_is_causal(causal, window, S) == causal_kernel
    for b in range(B):
        n, lp = lens[b], pads[b]
        qq, kk = q[b].to(F64), kc[b, :n].repeat_interleave(Hq // Hk, 1).to(F64)
        s = torch.einsum("qhd,khd->hqk", qq, kk) * D ** -0.5
        p_, j = torch.arange(Sq)[:, None] + n - Sq, torch.arange(n)[None, :]
        sl = slopes[b].to(F64)[:, None, None]
        s = s + (sl * (j - lp) if causal_kernel else -sl * (p_ - j).abs())
        left, right = window
        right = 0 if causal else right
        ok = (j >= lp) & ((j >= p_ - left) if left >= 0 else True) & ((j <= p_ + right) if right >= 0 else True)
        torch.testing.assert_close(lse[b].to(F64), torch.logsumexp(s.masked_fill(~ok, float("-inf")), -1), **TOL)
        exp, _ = naive(q[b], kc[b, :n], vc[b, :n], causal=causal, window=window, slopes=slopes[b], k_lo=lp)
        torch.testing.assert_close(out[b].to(F64), exp, **TOL)


def test_kvcache_int_seqlens_and_single_return():
    kc, vc = torch.zeros(2, 8, 1, 16, device=DEVICE), torch.zeros(2, 8, 1, 16, device=DEVICE)
    q, k = rand(2, 1, 2, 16), rand(2, 1, 1, 16)
    out = fa.flash_attn_with_kvcache(q, kc, vc, k, k.clone(), cache_seqlens=0)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, k.expand(2, 1, 2, 16))


# --- torch.compile, CUDA graphs ---------------------------------------------------------------------------------


def test_torch_compile_fullgraph():
    B, S, H, D = 1, 6, 2, 16
    q, k = rand(B, S, H, D), rand(B, S, H, D)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=DEVICE)
    cos, sin = _tables(8, 16)

    def f(q, k, kc, vc, lens):
        a = fa.flash_attn_func(q, k, k, causal=True, softcap=2.0)
        b = fa.flash_attn_varlen_func(q[0], k[0], k[0], cu, cu, 4, 4, causal=True)
        c = fa.flash_attn_with_kvcache(q[:, :1], kc, vc, k[:, :1], k[:, :1], cos, sin, lens, causal=True)
        return a.sum() + b.sum() + c.sum()

    kc = torch.zeros(1, 8, H, D, device=DEVICE)
    lens = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    want = f(q, k, kc.clone(), kc.clone(), lens)
    got = torch.compile(f, fullgraph=True, backend="eager")(q, k, kc.clone(), kc.clone(), lens)
    torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_cuda_graph_capture_kvcache_decode():
    """Decode with rotary, paged cache, ALiBi and softcap captured once, replayed with new lengths."""
    dev, dt = "cuda", torch.bfloat16
    B, S, Hq, Hk, D, page = 2, 256, 8, 2, 128, 64
    table = torch.randperm(B * S // page, device=dev).view(B, -1).to(torch.int32)
    kc = torch.randn(B * S // page, page, Hk, D, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    cos, sin = (t.to(dt) for t in _tables(S, 64))
    q, k, v = (torch.randn(B, 1, h, D, device=dev, dtype=dt) for h in (Hq, Hk, Hk))
    lens = torch.tensor([10, 100], dtype=torch.int32, device=dev)
    slopes = torch.rand(Hq, device=dev)

    def step():
        return fa.flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, lens, block_table=table, causal=True,
                                          softcap=30.0, alibi_slopes=slopes, rotary_interleaved=False)

    kc0, vc0 = kc.clone(), vc.clone()
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for new_lens in ([10, 100], [200, 3]):
        kc.copy_(kc0), vc.copy_(vc0)
        lens.copy_(torch.tensor(new_lens))
        graph.replay()
        kc_e, vc_e = kc0.clone(), vc0.clone()
        exp = reference.attention.flash_attn_with_kvcache(
            q.float(), kc_e.float(), vc_e.float(), lens, k=k.float(), v=v.float(), block_table=table, causal=True,
            softcap=30.0, alibi_slopes=slopes, rotary=(cos.float(), sin.float(), False))
        torch.testing.assert_close(out.float(), exp, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cuda_graph_capture_varlen_paged():
    dev, dt = "cuda", torch.float16
    Hq, Hk, D, page = 4, 2, 64, 16
    pages = torch.randn(12, page, Hk, D, device=dev, dtype=dt)
    table = torch.randperm(12, device=dev)[:8].view(2, 4).to(torch.int32)
    q = torch.randn(5, Hq, D, device=dev, dtype=dt)
    cq = torch.tensor([0, 2, 5], dtype=torch.int32, device=dev)
    ck = torch.tensor([0, 30, 50], dtype=torch.int32, device=dev)
    used = torch.tensor([30, 20], dtype=torch.int32, device=dev)
    run = (lambda: fa.flash_attn_varlen_func(q, pages, pages, cq, ck, 3, 64, causal=True, block_table=table,  # noqa
                                             seqused_k=used))
    assert_graph_replay_matches(run)
