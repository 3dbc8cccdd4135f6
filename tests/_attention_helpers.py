"""Shared helpers of the flash-attention tests (tests/test_attention*.py): cu_seqlens, lse checks, and the
kernel-vs-reference checkers for the varlen and KV-cache ops."""

import torch

from omni_fast.ops import flash_attn_varlen, flash_attn_with_kvcache
from omni_fast.reference import attention as ref
from omni_fast.testing import DEVICE, assert_matches_reference


def rand(*shape):
    """Standard normal fp32 on the test device."""
    return torch.randn(*shape, device=DEVICE)


def _cu(lens):
    return torch.tensor([0] + list(lens), device=DEVICE).cumsum(0).to(torch.int32)


def _close_lse(lse, lse_ref):
    """lse: same -inf pattern, finite values within fp32 rounding of the scores."""
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref.float()))
    fin = torch.isfinite(lse)
    torch.testing.assert_close(lse[fin], lse_ref.float()[fin], rtol=1e-3, atol=1e-3)


def _check_varlen(lens_q, lens_k, Hq, Hk, D, dtype, causal=False, window=(-1, -1), scale=None, unknown_max=False):
    """Kernel vs reference; ``unknown_max``: the kernel gets ``max_seqlen=None`` (the packed grid)."""
    cq, ck = _cu(lens_q), _cu(lens_k)
    q = torch.randn(int(sum(lens_q)), Hq, D, dtype=dtype, device=DEVICE)
    k = torch.randn(int(sum(lens_k)), Hk, D, dtype=dtype, device=DEVICE)
    v = torch.randn_like(k)
    mq, mk = max(lens_q, default=0), max(lens_k, default=0)
    kw = dict(softmax_scale=scale, causal=causal, window_size=window, return_lse=True)
    exact, lse_exact = ref.flash_attn_varlen(q.double(), k.double(), v.double(), cq, ck, mq, mk, **kw)
    same = ref.flash_attn_varlen(q, k, v, cq, ck, mq, mk, **kw)[0]
    if unknown_max:
        mq = mk = None
    out, lse = flash_attn_varlen(q, k, v, cq, ck, mq, mk, **kw, backend="triton")
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (Hq, q.shape[0])
    assert_matches_reference(out, exact, same)
    _close_lse(lse, lse_exact)


def _paged(cache: torch.Tensor, page: int):
    """Scatter a contiguous cache [B, S, H, D] into shuffled pages; returns (pages, block_table)."""
    B, S = cache.shape[:2]
    nb = S // page
    perm = torch.randperm(B * nb + 3, device=cache.device)[: B * nb].to(torch.int32)
    pages = torch.randn(B * nb + 3, page, *cache.shape[2:], dtype=cache.dtype, device=cache.device)
    pages[perm.long()] = cache.reshape(B * nb, page, *cache.shape[2:])
    return pages, perm.reshape(B, nb)


def _check_kvcache(B, S, Sq, Hq, Hk, D, dtype, lens, *, append=True, causal=True, window=(-1, -1), page=None,
                   num_splits=1, key_padding_mask=None):
    kc = torch.randn(B, S, Hk, D, dtype=dtype, device=DEVICE)
    vc = torch.randn_like(kc)
    bt = None
    if page is not None:
        kc, bt = _paged(kc, page)
        vc = torch.randn_like(kc)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, Sq, Hk, D, dtype=dtype, device=DEVICE) if append else None
    v = torch.randn_like(k) if append else None
    kw = dict(causal=causal, window_size=window, block_table=bt, key_padding_mask=key_padding_mask)
    kc_exact, vc_exact = kc.double(), vc.double()
    exact, lse_exact = ref.flash_attn_with_kvcache(q.double(), kc_exact, vc_exact, seqlens,
                                                   k=k.double() if append else None,
                                                   v=v.double() if append else None, return_lse=True, **kw)
    kc_same, vc_same = kc.clone(), vc.clone()
    same = ref.flash_attn_with_kvcache(q, kc_same, vc_same, seqlens, k=k, v=v, **kw)
    out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, num_splits=num_splits,
                                       return_softmax_lse=True,
                                       backend="triton", **kw)
    assert torch.equal(kc, kc_same) and torch.equal(vc, vc_same), "appended cache differs from the reference"
    assert_matches_reference(out, exact, same)
    assert lse.shape == (B, Hq, Sq)
    _close_lse(lse, lse_exact)


