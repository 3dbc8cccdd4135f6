"""omni_fast.compat.vllm_flash_attn: the signatures of vLLM's FlashAttention fork (``vllm.vllm_flash_attn``, as
vLLM 0.34.0 ships it, fork d8dca8f0; ``flash_attn_with_kvcache`` at 8e1b01d5) and its semantics, on the
omni-fast kernels, checked against :mod:`omni_fast.reference.attention` on random inputs. No fork code is used.
Under the CPU interpreter every call runs the Triton kernels."""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch

import omni_fast
from omni_fast.compat import flash_attn as cfa
from omni_fast.compat import vllm_flash_attn as vfa
from omni_fast.reference import attention as ref
from omni_fast.testing import DEVICE

TOL = dict(rtol=2e-4, atol=2e-4)
I32 = torch.int32
_REQ = inspect.Parameter.empty
_KW = inspect.Parameter.KEYWORD_ONLY
_PK = inspect.Parameter.POSITIONAL_OR_KEYWORD


def rand(*shape):
    return torch.randn(*shape, device=DEVICE)


def cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=I32, device=DEVICE)


# --- signatures: every parameter, in order, with its default and kind --------------------------------------------

_FA3_TAIL = [("scheduler_metadata", None), ("q_descale", None), ("k_descale", None), ("v_descale", None)]
_CP_TAIL = [("s_aux", None), ("cp_world_size", 1), ("cp_rank", 0), ("cp_tot_seqused_k", None)]
_SPARSE = [("q", _REQ), ("k", _REQ), ("v", _REQ), ("block_count", _REQ), ("block_offset", _REQ),
           ("column_count", _REQ), ("column_index", _REQ)]
_SPARSE_TAIL = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("softcap", 0.0),
                ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
SIGNATURES = {  # name -> ([(param, default)], index of the first keyword-only parameter or None)
    "flash_attn_varlen_func": ([
        ("q", _REQ), ("k", _REQ), ("v", _REQ), ("max_seqlen_q", _REQ), ("cu_seqlens_q", _REQ),
        ("max_seqlen_k", _REQ), ("cu_seqlens_k", None), ("seqused_k", None), ("q_v", None), ("dropout_p", 0.0),
        ("softmax_scale", None), ("causal", False), ("window_size", None), ("softcap", 0.0), ("alibi_slopes", None),
        ("deterministic", False), ("return_attn_probs", False), ("block_table", None),
        ("return_softmax_lse", False), ("out", None)] + _FA3_TAIL + [("num_splits", 0), ("output_scale", None),
                                                                     ("fa_version", 2)]
        + _CP_TAIL + [("mask_mod", None), ("block_sparse_tensors", None), ("aux_tensors", None),
                      ("aux_tensor_leading_dims", None), ("dynamic_causal", None), ("gather_kv_indices", None),
                      ("gather_kv_valid_length", None)], None),
    "flash_attn_with_kvcache": ([
        ("q", _REQ), ("k_cache", _REQ), ("v_cache", _REQ), ("k", None), ("v", None), ("rotary_cos", None),
        ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None), ("cache_leftpad", None),
        ("block_table", None), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
        ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
        ("return_softmax_lse", False), ("out", None)] + _FA3_TAIL + [("fa_version", 2)] + _CP_TAIL, 19),
    "get_scheduler_metadata": ([
        ("batch_size", _REQ), ("max_seqlen_q", _REQ), ("max_seqlen_k", _REQ), ("num_heads_q", _REQ),
        ("num_heads_kv", _REQ), ("headdim", _REQ), ("cache_seqlens", _REQ), ("qkv_dtype", torch.bfloat16),
        ("headdim_v", None), ("cu_seqlens_q", None), ("cu_seqlens_k_new", None), ("cache_leftpad", None),
        ("page_size", None), ("max_seqlen_k_new", 0), ("causal", False), ("window_size", (-1, -1)),
        ("has_softcap", False), ("num_splits", 0), ("pack_gqa", None), ("sm_margin", 0)], None),
    "is_fa_version_supported": ([("fa_version", _REQ), ("device", None)], 1),  # device: the old fork's, kept
    "fa_version_unsupported_reason": ([("fa_version", _REQ), ("device", None)], 1),
    "compile_flash_attn_varlen_func_from_specs": ([
        ("q_shape", _REQ), ("k_shape", _REQ), ("v_shape", _REQ), ("q_dtype", _REQ), ("v_stride", None),
        ("k_stride", None), ("cu_seqlens_q_shape", None), ("cu_seqlens_k_shape", None), ("max_seqlen_q", None),
        ("max_seqlen_k", None), ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", None),
        ("deterministic", False), ("return_softmax_lse", False), ("num_splits", 0), ("fa_version", 2),
        ("seqused_k_shape", None), ("page_table_shape", None), ("softcap", None)], 0),
    "sparse_attn_func": (_SPARSE + _SPARSE_TAIL + [("return_softmax_lse", False), ("out", None)], 14),
    "sparse_attn_varlen_func": (_SPARSE + [("cu_seqlens_q", _REQ), ("cu_seqlens_k", _REQ), ("max_seqlen_q", _REQ),
                                           ("max_seqlen_k", _REQ)] + _SPARSE_TAIL
                                + [("return_softmax_lse", False), ("out", None)], 18),
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_is_the_forks(name):
    params = list(inspect.signature(getattr(vfa, name)).parameters.values())
    expected, first_kw = SIGNATURES[name]
    assert [(p.name, p.default) for p in params] == expected
    kinds = [p.kind for p in params]
    n_pos = len(params) if first_kw is None else first_kw
    assert kinds == [_PK] * n_pos + [_KW] * (len(params) - n_pos)


def test_module_exports_what_vllm_imports():
    """vLLM's fa_utils imports flash_attn_varlen_func and get_scheduler_metadata from the package and the two
    version helpers from flash_attn_interface; the fork's __init__ also exports the sparse functions."""
    for name in ("flash_attn_varlen_func", "get_scheduler_metadata", "is_fa_version_supported",
                 "fa_version_unsupported_reason", "sparse_attn_func", "sparse_attn_varlen_func",
                 "flash_attn_with_kvcache", "compile_flash_attn_varlen_func_from_specs"):
        assert name in vfa.__all__ and callable(getattr(vfa, name))
    assert vfa.FA2_AVAILABLE and vfa.FA3_AVAILABLE and not vfa.FA4_AVAILABLE  # vLLM 0.34's __init__ imports them
    assert vfa.DEFAULT_FA_VERSION == 2


def test_kvcache_positional_part_is_flash_attn_2_8s():
    """The fork's flash_attn_with_kvcache adds keyword-only arguments only: its positional part is flash-attn
    2.8's (so omni_fast.ops.flash_attn_with_kvcache, which follows flash-attn, binds fork calls the same way)."""
    def positional(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.kind == _PK]
    assert positional(vfa.flash_attn_with_kvcache) == positional(cfa.flash_attn_with_kvcache)
    assert positional(omni_fast.ops.flash_attn_with_kvcache) == positional(cfa.flash_attn_with_kvcache)


# --- version helpers and the scheduler ---------------------------------------------------------------------------


def test_version_helpers():
    assert vfa.is_fa_version_supported(2) and vfa.is_fa_version_supported(3, device=DEVICE)
    assert vfa.fa_version_unsupported_reason(2) is None and vfa.fa_version_unsupported_reason(3) is None
    assert not vfa.is_fa_version_supported(4)
    assert "FA4" in vfa.fa_version_unsupported_reason(4)
    with pytest.raises(ValueError, match="fa_version"):
        vfa.is_fa_version_supported(5)
    with pytest.raises(TypeError, match="fa_version"):
        vfa.fa_version_unsupported_reason("3")


def test_compile_from_specs_is_fa4_only():
    """vLLM 0.34's FA4 compile-only entry: other versions are a ValueError (as the fork); FA4 is not offered."""
    spec = dict(q_shape=(2, 4, 64), k_shape=(8, 16, 1, 64), v_shape=(8, 16, 1, 64), q_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="FA4"):
        vfa.compile_flash_attn_varlen_func_from_specs(**spec)
    with pytest.raises(NotImplementedError, match="FA4"):
        vfa.compile_flash_attn_varlen_func_from_specs(**spec, fa_version=4)
    with pytest.raises(TypeError):
        vfa.compile_flash_attn_varlen_func_from_specs((2, 4, 64), (8, 16, 1, 64), (8, 16, 1, 64), torch.bfloat16)


def test_get_scheduler_metadata_is_none_and_ignorable():
    lens = torch.tensor([5, 9], dtype=I32, device=DEVICE)
    md = vfa.get_scheduler_metadata(batch_size=2, max_seqlen_q=3, max_seqlen_k=9, num_heads_q=4, num_heads_kv=2,
                                    headdim=16, cache_seqlens=lens, qkv_dtype=torch.float16, page_size=16,
                                    causal=True, window_size=(-1, -1), num_splits=16)
    assert md is None
    with pytest.raises(TypeError, match="cache_seqlens"):
        vfa.get_scheduler_metadata(2, 3, 9, 4, 2, 16, [5, 9])


# --- varlen against the reference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fa_version", [2, 3])
@pytest.mark.parametrize("lens_q,lens_k,Hq,Hk,causal,window,softcap", [
    ([3, 1, 4], [5, 1, 9], 4, 2, True, None, 0.0),      # GQA, causal bottom-right with Sq < Sk
    ([5, 2], [3, 2], 4, 1, True, None, 0.0),             # MQA, Sq > Sk: rows that see no key
    ([4, 6], [7, 6], 2, 2, False, [2, 1], 0.0),          # window (a list, as vLLM's sliding window)
    ([1, 1, 1], [6, 3, 8], 6, 2, True, (3, 0), 5.0),     # decode rows, window, softcap
    ([2, 0, 3], [4, 0, 3], 2, 1, False, None, 0.0),      # an empty sequence
])
def test_varlen_matches_reference(lens_q, lens_k, Hq, Hk, causal, window, softcap, fa_version):
    D = 16
    q, k, v = rand(sum(lens_q), Hq, D), rand(sum(lens_k), Hk, D), rand(sum(lens_k), Hk, D)
    cq, ck = cu(lens_q), cu(lens_k)
    out, lse = vfa.flash_attn_varlen_func(q, k, v, max(lens_q), cq, max(lens_k), ck, causal=causal,
                                          window_size=window, softcap=softcap, return_softmax_lse=True,
                                          fa_version=fa_version)
    exp, exp_lse = ref.flash_attn_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=causal,
                                         window_size=(-1, -1) if window is None else tuple(window),
                                         softcap=softcap, return_lse=True, fa_lse=fa_version == 2)
    torch.testing.assert_close(out, exp, **TOL)
    torch.testing.assert_close(lse, exp_lse, **TOL)  # inf entries compared exactly, sign included
    assert lse.shape == (Hq, sum(lens_q)) and lse.dtype == torch.float32


def test_empty_rows_lse_is_plus_inf_for_fa2_and_minus_inf_for_fa3():
    """Causal with Sq > Sk: the first rows see no key. FA2 (flash-attn's kernel) stores +inf, FA3 -inf."""
    q, k = rand(4, 2, 16), rand(2, 2, 16)
    cq, ck = cu([4]), cu([2])
    for fa_version, sign in ((2, 1), (3, -1)):
        out, lse = vfa.flash_attn_varlen_func(q, k, k, 4, cq, 2, ck, causal=True, return_softmax_lse=True,
                                              fa_version=fa_version)
        assert torch.equal(out[:2], torch.zeros_like(out[:2]))
        assert torch.equal(lse[:, :2], torch.full_like(lse[:, :2], sign * float("inf")))
        assert torch.isfinite(lse[:, 2:]).all()


def test_alibi_fa2_matches_reference():
    q, k, v = rand(5, 4, 16), rand(9, 2, 16), rand(9, 2, 16)
    cq, ck = cu([2, 3]), cu([4, 5])
    slopes = torch.rand(4, device=DEVICE)
    out = vfa.flash_attn_varlen_func(q, k, v, 3, cq, 5, ck, causal=True, alibi_slopes=slopes)
    exp = ref.flash_attn_varlen(q, k, v, cq, ck, 3, 5, causal=True, alibi_slopes=slopes)
    torch.testing.assert_close(out, exp, **TOL)


def _paged(lens_k, page, Hk, D, spare=3):
    """Random pages and a random block table holding each sequence's keys: (pages_k, pages_v, table,
    packed k, packed v) with packed k/v the keys gathered in order (the expectation's input)."""
    blocks = [-(-n // page) for n in lens_k]
    width = max(blocks + [1])
    n_pages = len(lens_k) * width + spare
    pages_k, pages_v = rand(n_pages, page, Hk, D), rand(n_pages, page, Hk, D)
    table = torch.randperm(n_pages, device=DEVICE)[:len(lens_k) * width].view(len(lens_k), width).to(I32)
    gather = [torch.cat([pages[table[b].long()].reshape(-1, Hk, D)[:n] for b, n in enumerate(lens_k)])
              for pages in (pages_k, pages_v)]
    return pages_k, pages_v, table, *gather


@pytest.mark.parametrize("fa_version", [2, 3])
@pytest.mark.parametrize("page", [16, 5])
@pytest.mark.parametrize("seed", range(2))
def test_paged_varlen_random_block_tables(page, seed, fa_version):
    """vLLM's call: paged k/v, block_table + seqused_k, cu_seqlens_k None, causal, GQA, out= the output buffer."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hk, D = 3, 4, 2, 16
    lens_k = torch.randint(1, 40, (B,), generator=g).tolist()
    lens_q = [min(n, int(x)) for n, x in zip(lens_k, torch.randint(1, 6, (B,), generator=g))]
    pages_k, pages_v, table, k, v = _paged(lens_k, page, Hk, D)
    q = rand(sum(lens_q), Hq, D)
    cq = cu(lens_q)
    seqused = torch.tensor(lens_k, dtype=I32, device=DEVICE)
    out_buf = torch.full((sum(lens_q) + 2, Hq, D), float("nan"), device=DEVICE)  # vLLM passes output[:n]
    res = vfa.flash_attn_varlen_func(q=q, k=pages_k, v=pages_v, out=out_buf[:sum(lens_q)], cu_seqlens_q=cq,
                                     max_seqlen_q=max(lens_q), seqused_k=seqused, max_seqlen_k=max(lens_k),
                                     softmax_scale=D ** -0.5, causal=True, alibi_slopes=None, window_size=(-1, -1),
                                     block_table=table, softcap=0, scheduler_metadata=None, fa_version=fa_version,
                                     q_descale=torch.ones(1, device=DEVICE).expand(B, Hk),
                                     k_descale=torch.ones(1, device=DEVICE).expand(B, Hk),
                                     v_descale=torch.ones(1, device=DEVICE).expand(B, Hk), num_splits=0, s_aux=None)
    assert res.data_ptr() == out_buf.data_ptr() and res.shape == q.shape
    exp = ref.flash_attn_varlen(q, k, v, cq, cu(lens_k), max(lens_q), max(lens_k), causal=True)
    torch.testing.assert_close(out_buf[:sum(lens_q)], exp, **TOL)
    assert torch.isnan(out_buf[sum(lens_q):]).all()  # nothing written past the view


def test_cascade_form_lse_merges_to_the_full_attention():
    """vLLM's cascade attention: a shared prefix (block_table[:1], non-causal) and the per-request suffix
    (block_table[:, n:], causal), both with return_softmax_lse; merged by their lse they give full attention."""
    page, Hq, Hk, D = 16, 2, 1, 16
    prefix, suffix, lens_q = 32, [5, 9], [2, 3]
    lens_k = [prefix + s for s in suffix]
    pages_k, pages_v, table, k, v = _paged(lens_k, page, Hk, D)
    table[1, :2] = table[0, :2]  # the shared prefix pages
    k, v = (torch.cat([p[table[b].long()].reshape(-1, Hk, D)[:n] for b, n in enumerate(lens_k)])
            for p in (pages_k, pages_v))
    q, cq, T = rand(sum(lens_q), Hq, D), cu(lens_q), sum(lens_q)
    o1, l1 = vfa.flash_attn_varlen_func(q=q, k=pages_k, v=pages_v, cu_seqlens_q=cu([T]), max_seqlen_q=T,
                                        seqused_k=torch.tensor([prefix], dtype=I32, device=DEVICE),
                                        max_seqlen_k=prefix, causal=False, block_table=table[:1],
                                        return_softmax_lse=True, fa_version=3)
    o2, l2 = vfa.flash_attn_varlen_func(q=q, k=pages_k, v=pages_v, cu_seqlens_q=cq, max_seqlen_q=3,
                                        seqused_k=torch.tensor(suffix, dtype=I32, device=DEVICE),
                                        max_seqlen_k=max(suffix), causal=True, block_table=table[:, prefix // page:],
                                        return_softmax_lse=True, fa_version=3)
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m).T[..., None], torch.exp(l2 - m).T[..., None]
    merged = (o1 * w1 + o2 * w2) / (w1 + w2)
    exp = ref.flash_attn_varlen(q, k, v, cq, cu(lens_k), 3, max(lens_k), causal=True)
    torch.testing.assert_close(merged, exp, **TOL)


# --- the KV-cache function -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("splits", [0, 1, 3])
def test_kvcache_matches_reference_and_writes_out(paged, splits, backend):
    """Append k/v at cache_seqlens, causal with Sq != cache length, GQA; contiguous or paged (random table)
    caches; out= written in place; lse flash-attn 2.8's (the fork ran its FA2 kernel whatever fa_version)."""
    B, Sq, Hq, Hk, D, cap = 2, 3, 4, 2, 16, 24
    lens = torch.tensor([5, 17], dtype=I32, device=DEVICE)
    q, k, v = rand(B, Sq, Hq, D), rand(B, 2, Hk, D), rand(B, 2, Hk, D)
    if paged:
        page = 8
        kc, vc = rand(B * cap // page + 2, page, Hk, D), rand(B * cap // page + 2, page, Hk, D)
        table = torch.randperm(kc.shape[0], device=DEVICE)[:B * cap // page].view(B, -1).to(I32)
    else:
        kc, vc, table = rand(B, cap, Hk, D), rand(B, cap, Hk, D), None
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = torch.empty_like(q)
    with omni_fast.use_backend(backend):
        res, lse = vfa.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=table, causal=True,
                                               num_splits=splits, return_softmax_lse=True, out=out, fa_version=3)
    assert res is out
    ref.append_kv(kc_ref, vc_ref, lens, k, v, table, None, None)
    exp, exp_lse = ref.kvcache_attention(q, kc_ref, vc_ref, lens, 2, causal=True, block_table=table, fa_lse=True)
    torch.testing.assert_close(kc, kc_ref)
    torch.testing.assert_close(out, exp, **TOL)
    torch.testing.assert_close(lse, exp_lse, **TOL)


def test_kvcache_equals_flash_attn_2_8s_call():
    """Same positional call as flash-attn 2.8's (rotary, left padding, windows): the same result."""
    B, Sq, H, D = 2, 2, 2, 32
    kc, vc = rand(B, 12, H, D), rand(B, 12, H, D)
    q, k = rand(B, Sq, H, D), rand(B, 2, H, D)
    cos, sin = rand(12, 8), rand(12, 8)
    lens, leftpad = torch.tensor([3, 6], dtype=I32, device=DEVICE), torch.tensor([1, 0], dtype=I32, device=DEVICE)
    args = (q, None, None, k, k, cos, sin, lens, None, leftpad, None, None, True, (4, 0), 0.0, False)
    a = vfa.flash_attn_with_kvcache(args[0], kc.clone(), vc.clone(), *args[3:])
    b = cfa.flash_attn_with_kvcache(args[0], kc.clone(), vc.clone(), *args[3:])
    torch.testing.assert_close(a, b)


# --- out=, bad input ---------------------------------------------------------------------------------------------


def _varlen_kw(**over):
    q, k = rand(5, 2, 16), rand(6, 1, 16)
    kw = dict(q=q, k=k, v=k.clone(), max_seqlen_q=3, cu_seqlens_q=cu([2, 3]), max_seqlen_k=4, cu_seqlens_k=cu([2, 4]))
    kw.update({n: (f(kw) if callable(f) else f) for n, f in over.items()})
    return kw


@pytest.mark.parametrize("out", [
    lambda kw: kw["q"],                                   # out is q
    lambda kw: kw["q"].view(-1)[:80].view(5, 1, 16).expand(5, 2, 16),  # internally overlapping
])
def test_out_aliasing_is_rejected(out):
    kw = _varlen_kw()
    with pytest.raises(ValueError, match="out"):
        vfa.flash_attn_varlen_func(**kw, out=out(kw))


def test_out_sharing_k_storage_is_rejected():
    buf = rand(11, 2, 16)
    kw = _varlen_kw(q=buf[:5])
    with pytest.raises(ValueError, match="out"):
        vfa.flash_attn_varlen_func(**kw, out=buf[3:8])  # overlaps q
    kc = rand(2, 8, 1, 16)
    with pytest.raises(ValueError, match="out"):
        vfa.flash_attn_with_kvcache(rand(2, 1, 1, 16), kc, rand(2, 8, 1, 16), cache_seqlens=3,
                                    out=kc[:, :1])


@pytest.mark.parametrize("over,exc,match", [
    (dict(out=lambda kw: torch.empty(5, 2, 8)), ValueError, "out"),
    (dict(out=lambda kw: torch.empty(5, 2, 16, dtype=torch.float64)), TypeError, "out"),
    (dict(out=lambda kw: "buffer"), TypeError, "out"),
    (dict(fa_version=4), ValueError, "fa_version"),
    (dict(fa_version=1), ValueError, "fa_version"),
    (dict(fa_version="2"), TypeError, "fa_version"),
    (dict(cu_seqlens_k=None), ValueError, "cu_seqlens_k or seqused_k"),
    (dict(seqused_k=lambda kw: torch.tensor([2, 4], dtype=I32)), ValueError, "seqused_k"),
    (dict(cu_seqlens_k=None, seqused_k=lambda kw: torch.tensor([2, 4], dtype=I32)), ValueError, "block_table"),
    (dict(block_table=lambda kw: torch.zeros(2, 1, dtype=I32)), ValueError, "seqused_k"),
    (dict(window_size=(1, 2, 3)), ValueError, "window_size"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(alibi_slopes=lambda kw: torch.rand(2), fa_version=3), ValueError, "alibi_slopes"),
    (dict(dropout_p=0.1), ValueError, "dropout_p"),
    (dict(dropout_p="0"), TypeError, "dropout_p"),
    (dict(num_splits=2), NotImplementedError, "num_splits"),
    (dict(num_splits=-1), ValueError, "num_splits"),
    (dict(s_aux=lambda kw: torch.zeros(2)), NotImplementedError, "s_aux"),
    (dict(s_aux=lambda kw: torch.zeros(3), fa_version=3), ValueError, "s_aux"),
    (dict(s_aux=lambda kw: torch.zeros(2, dtype=torch.int32), fa_version=3), TypeError, "s_aux"),
    (dict(q_v=lambda kw: kw["q"]), NotImplementedError, "q_v"),
    (dict(cp_world_size=2), NotImplementedError, "cp_world_size"),
    (dict(q_descale=1.0), TypeError, "q_descale"),
    (dict(scheduler_metadata=lambda kw: torch.zeros(3, dtype=I32), q_descale=lambda kw: torch.ones(2, 1),
          k_descale=lambda kw: torch.ones(2, 1), v_descale=lambda kw: torch.ones(2, 1)),
     NotImplementedError, "scheduler_metadata"),
    (dict(q=lambda kw: kw["q"].to(torch.float8_e4m3fn)), NotImplementedError, "fp8 q"),
    (dict(return_softmax_lse=[1]), TypeError, "return_softmax_lse"),
    (dict(causal="yes"), TypeError, "causal"),
    (dict(causal=lambda kw: torch.tensor([1, 0])), TypeError, "causal"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(output_scale=lambda kw: torch.ones(1)), ValueError, "output_scale"),  # FA4 only (vLLM 0.34)
    (dict(gather_kv_indices=lambda kw: torch.zeros(5, 2, dtype=I32), fa_version=3), ValueError, "gather_kv_indices"),
    (dict(mask_mod=lambda kw: (lambda *a: True)), NotImplementedError, "mask_mod"),
    (dict(aux_tensors=lambda kw: [torch.zeros(1)], fa_version=3), NotImplementedError, "aux_tensors"),
    (dict(dynamic_causal=lambda kw: torch.zeros(2, dtype=I32)), NotImplementedError, "dynamic_causal"),
    (dict(block_sparse_tensors=lambda kw: (torch.zeros(1),)), NotImplementedError, "block_sparse_tensors"),
    (dict(cu_seqlens_q=lambda kw: torch.tensor([0, 2, 5])), TypeError, "cu_seqlens_q"),
])
def test_bad_input_names_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        vfa.flash_attn_varlen_func(**_varlen_kw(**over))


@pytest.mark.parametrize("fa_version", [2, 3])
def test_causal_and_softcap_as_the_forks_ops_take_them(fa_version):
    """The fork's ops take causal as a C++ bool (1 / None / a one-element tensor convert) and cap only when
    softcap > 0 (negative = off), FA2 and FA3 alike; its KV-cache call too."""
    kw = _varlen_kw(fa_version=fa_version)
    for causal, as_bool in ((1, True), (0.0, False), (None, False), (torch.tensor([1]), True)):
        torch.testing.assert_close(vfa.flash_attn_varlen_func(**kw, causal=causal, softcap=-2.0),
                                   vfa.flash_attn_varlen_func(**kw, causal=as_bool, softcap=0.0), rtol=0, atol=0)
    q, k = rand(2, 2, 2, 16), rand(2, 2, 1, 16)

    def kv(causal, softcap):
        caches = torch.zeros(2, 8, 1, 16, device=DEVICE), torch.zeros(2, 8, 1, 16, device=DEVICE)
        return vfa.flash_attn_with_kvcache(q, *caches, k, k, cache_seqlens=3, causal=causal, softcap=softcap,
                                           fa_version=fa_version)
    torch.testing.assert_close(kv(1, -1.0), kv(True, 0.0), rtol=0, atol=0)
    with pytest.raises(TypeError, match="causal"):
        kv("no", 0.0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("paged", [False, True])
def test_fa3_sinks_match_the_dense_definition(paged, backend):
    """s_aux (FA3's attention sinks): per head one more logit s_h, unscaled, in the softmax denominator with a
    zero value: out_i = sum_j e^{x_ij} v_j / (sum_j e^{x_ij} + e^{s_h}), lse_i = log(sum_j e^{x_ij} + e^{s_h});
    rows that see no key (causal, Sq > Sk; an empty sequence): zeros and lse = s_h."""
    Hq, Hk, D, scale = 4, 2, 16, 0.3
    lens_q, lens_k = [5, 2, 3], [3, 0, 9]
    q = rand(sum(lens_q), Hq, D)
    sinks = torch.randn(Hq, device=DEVICE).to(torch.bfloat16)  # the fork's dtype
    if paged:
        pk, pv, table, k, v = _paged(lens_k, 4, Hk, D)
        kw = dict(k=pk, v=pv, block_table=table, seqused_k=torch.tensor(lens_k, dtype=I32, device=DEVICE))
    else:
        k, v = rand(sum(lens_k), Hk, D), rand(sum(lens_k), Hk, D)
        kw = dict(k=k, v=v, cu_seqlens_k=cu(lens_k))
    with omni_fast.use_backend(backend):
        out, lse = vfa.flash_attn_varlen_func(q=q, max_seqlen_q=5, cu_seqlens_q=cu(lens_q), max_seqlen_k=9, **kw,
                                              softmax_scale=scale, causal=True, return_softmax_lse=True,
                                              fa_version=3, s_aux=sinks)
    s64 = sinks.double()
    cq, ck = cu(lens_q).tolist(), cu(lens_k).tolist()
    for b in range(3):
        qb, kb, vb = (t.double() for t in (q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]))
        Lq, Lk = qb.shape[0], kb.shape[0]
        x = torch.einsum("qhd,khd->hqk", qb, kb.repeat_interleave(Hq // Hk, 1)) * scale
        visible = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + Lk - Lq
        x = x.masked_fill(~visible, float("-inf"))
        denom = torch.exp(x).sum(-1) + torch.exp(s64)[:, None]
        exp = torch.einsum("hqk,khd->qhd", torch.exp(x) / denom[..., None], vb.repeat_interleave(Hq // Hk, 1))
        torch.testing.assert_close(out[cq[b]:cq[b + 1]].double(), exp, **TOL)
        torch.testing.assert_close(lse[:, cq[b]:cq[b + 1]].double(), torch.log(denom), **TOL)
    assert torch.equal(lse[:, :2].double(), s64[:, None].expand(Hq, 2))  # rows 0, 1 see no key


def test_huge_softcap_keeps_the_scores():
    """softcap far above the scores: cap * tanh(s / cap) = s (the kernel's tanh is accurate for small |x|)."""
    kw = _varlen_kw()
    for cap in (1e6, 2.0 ** 40):
        got = vfa.flash_attn_varlen_func(**kw, softcap=cap)
        torch.testing.assert_close(got, vfa.flash_attn_varlen_func(**kw), **TOL)


def test_fa3_ignores_dropout_and_the_hints():
    """FA3 takes no dropout (the fork drops dropout_p on that path); num_splits and scheduler_metadata only
    schedule; descales only apply to fp8 tensors."""
    kw = _varlen_kw()
    base = vfa.flash_attn_varlen_func(**kw, fa_version=3)
    got = vfa.flash_attn_varlen_func(**kw, fa_version=3, dropout_p=0.3, num_splits=16, deterministic=True,
                                     scheduler_metadata=torch.zeros(3, dtype=I32), q_descale=torch.full((2, 1), 7.0),
                                     k_descale=torch.full((2, 1), 7.0), v_descale=torch.full((2, 1), 7.0),
                                     return_attn_probs=True)
    torch.testing.assert_close(got, base)  # return_attn_probs ignored, as the fork: out alone


def test_sparse_functions_raise_not_implemented():
    with pytest.raises(NotImplementedError, match="sparse_attn_func"):
        vfa.sparse_attn_func(*[None] * 7)
    with pytest.raises(NotImplementedError, match="sparse_attn_varlen_func"):
        vfa.sparse_attn_varlen_func(*[None] * 11)


def test_requires_grad_is_refused():
    kw = _varlen_kw()
    kw["q"].requires_grad_(True)
    with pytest.raises(ValueError, match="inference-only"):
        vfa.flash_attn_varlen_func(**kw)


# --- torch.compile, and the module swap of the recipe ---------------------------------------------------------------


def test_torch_compile_fullgraph_paged_with_out():
    B, Hq, Hk, D, page = 2, 4, 2, 16, 8
    lens_k, lens_q = [11, 6], [3, 1]
    pages_k, pages_v, table, k, v = _paged(lens_k, page, Hk, D)
    q, cq = rand(sum(lens_q), Hq, D), cu(lens_q)
    seqused = torch.tensor(lens_k, dtype=I32, device=DEVICE)
    sinks = rand(Hq)

    def f(q, pk, pv, table, seqused, out):
        vfa.flash_attn_varlen_func(q=q, k=pk, v=pv, out=out, cu_seqlens_q=cq, max_seqlen_q=3, seqused_k=seqused,
                                   max_seqlen_k=11, causal=True, block_table=table, fa_version=3)
        o, lse = vfa.flash_attn_varlen_func(q, pk, pv, 3, cq, 11, None, seqused, block_table=table, causal=True,
                                            return_softmax_lse=True, fa_version=3, s_aux=sinks)
        return out * 2, o, lse

    want = f(q, pages_k, pages_v, table, seqused, torch.empty_like(q))
    out = torch.empty_like(q)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, pages_k, pages_v, table, seqused, out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(out * 2, want[0])  # the compiled graph wrote the caller's buffer


def test_module_swap_recipe(monkeypatch):
    """docs/compat.md's recipe: install the module under the fork's names before vLLM imports them."""
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.__path__ = []
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", vfa)
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn.flash_attn_interface", vfa)
    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata  # noqa: F401
    from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported

    assert flash_attn_varlen_func is vfa.flash_attn_varlen_func and is_fa_version_supported(3)


# --- GPU: bf16 kernels (sinks, out=) against the reference, and vLLM's call inside a CUDA graph --------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fa_version", [2, 3])
def test_gpu_vllm_paged_call_bf16_and_cuda_graph(fa_version):
    """vLLM's decode/prefill call (paged bf16 cache of 16-token pages, GQA 32/4, d 128, out= a slice of the output
    buffer, FA3 with sinks) against the reference in fp32, then captured in a CUDA graph and replayed."""
    dev, dt = "cuda", torch.bfloat16
    B, Hq, Hk, D, page = 3, 32, 4, 128, 16
    lens_k, lens_q = [700, 33, 1], [1, 17, 1]
    pk = torch.randn(200, page, Hk, D, device=dev, dtype=dt)
    pv = torch.randn(200, page, Hk, D, device=dev, dtype=dt)
    table = torch.randperm(200, device=dev)[:3 * 45].view(3, 45).to(I32)
    q = torch.randn(sum(lens_q), Hq, D, device=dev, dtype=dt)
    cq = torch.tensor([0, 1, 18, 19], dtype=I32, device=dev)
    seqused = torch.tensor(lens_k, dtype=I32, device=dev)
    sinks = torch.randn(Hq, device=dev, dtype=dt) if fa_version == 3 else None
    buf = torch.zeros(sum(lens_q) + 5, Hq, D, device=dev, dtype=dt)

    def run():
        vfa.flash_attn_varlen_func(q=q, k=pk, v=pv, out=buf[:sum(lens_q)], cu_seqlens_q=cq, max_seqlen_q=17,
                                   seqused_k=seqused, max_seqlen_k=700, softmax_scale=D ** -0.5, causal=True,
                                   window_size=(-1, -1), block_table=table, softcap=0, fa_version=fa_version,
                                   scheduler_metadata=None, s_aux=sinks, num_splits=0)
        return buf.clone()

    got = run()[:sum(lens_q)]
    exp = ref.flash_attn_varlen(q.float(), pk.float(), pv.float(), cq, cq, 17, 700, causal=True, block_table=table,
                                seqused_k=seqused, sinks=None if sinks is None else sinks.float())
    torch.testing.assert_close(got.float(), exp, rtol=2e-2, atol=2e-2)
    from omni_fast.testing import assert_graph_replay_matches

    assert_graph_replay_matches(run)
