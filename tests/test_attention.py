"""Flash attention: reference mask semantics, kernel vs reference (varlen, KV cache, paged, split-KV), bad input."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omni_fast
from omni_fast.ops import flash_attn_varlen, flash_attn_with_kvcache
from omni_fast.reference import attention as ref
from omni_fast.testing import DEVICE, KERNEL_DTYPES, assert_matches_reference


def _cu(lens):
    return torch.tensor([0] + list(lens), device=DEVICE).cumsum(0).to(torch.int32)


def _close_lse(lse, lse_ref):
    """lse: same -inf pattern, finite values within fp32 rounding of the scores."""
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref.float()))
    fin = torch.isfinite(lse)
    torch.testing.assert_close(lse[fin], lse_ref.float()[fin], rtol=1e-3, atol=1e-3)


# --- reference semantics ------------------------------------------------------------------------------------


def test_visible_mask_bottom_right_causal_and_window():
    # 2 queries against 5 keys: the queries sit at key positions 3 and 4.
    m = ref.visible(2, 5, -1, 0)
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]
    m = ref.visible(2, 5, 1, 0)  # causal window of 2 (transformers' sliding_window=2)
    assert m.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]
    m = ref.visible(3, 3, 0, 1)
    assert m.tolist() == [[True, True, False], [False, True, True], [False, False, True]]
    # More queries than keys, causal: the first queries see nothing.
    assert ref.visible(3, 1, -1, 0).tolist() == [[False], [False], [True]]


def test_varlen_mask_is_block_diagonal():
    m = ref.varlen_mask(_cu([2, 0, 3]).cpu(), _cu([1, 2, 3]).cpu(), causal=True)
    expect = torch.zeros(5, 6, dtype=torch.bool)
    expect[0:2, 0:1] = torch.tensor([[False], [True]])
    expect[2:5, 3:6] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    assert torch.equal(m, expect)


def test_reference_matches_dense_masked_softmax():
    lens_q, lens_k = [3, 1, 4], [5, 1, 4]
    q, k, v = torch.randn(8, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    out, lse = ref.flash_attn_varlen(q, k, v, _cu(lens_q).cpu(), _cu(lens_k).cpu(), 4, 5, causal=True,
                                     window_size=(2, -1), return_lse=True)
    mask = ref.varlen_mask(_cu(lens_q).cpu(), _cu(lens_k).cpu(), causal=True, window_size=(2, -1))
    s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, 1)) / 4.0
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num()
    torch.testing.assert_close(out, torch.einsum("hqk,khd->qhd", p, v.repeat_interleave(2, 1)))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


def test_reference_matches_transformers_eager_attention():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import eager_attention_forward

    class M(torch.nn.Module):
        num_key_value_groups = 4

    B, Hq, Hk, S, P, D = 1, 8, 2, 5, 7, 32
    q = torch.randn(B, Hq, S, D, dtype=torch.bfloat16)
    k, v = torch.randn(B, Hk, P + S, D, dtype=torch.bfloat16), torch.randn(B, Hk, P + S, D, dtype=torch.bfloat16)
    allowed = ref.visible(S, P + S, 3, 0)
    add = torch.zeros(S, P + S, dtype=torch.bfloat16).masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    hf, _ = eager_attention_forward(M().eval(), q, k, v, add[None, None], scaling=D ** -0.5)
    cache_k, cache_v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    ours = ref.flash_attn_with_kvcache(q.transpose(1, 2), cache_k, cache_v, torch.tensor([P + S], dtype=torch.int32),
                                       window_size=(3, -1))
    torch.testing.assert_close(ours, hf, rtol=0, atol=0)


# --- kernel vs reference: varlen -----------------------------------------------------------------------------


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


@pytest.mark.parametrize("D,Hq,Hk", [(64, 2, 1), (72, 2, 2), (96, 4, 1), (128, 8, 1)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_varlen_head_dims_and_gqa(D, Hq, Hk, dtype):
    _check_varlen([5, 0, 1, 19], [5, 0, 1, 19], Hq, Hk, D, dtype, causal=D != 72)


@pytest.mark.parametrize("D", [160, 256])
def test_head_dims_above_128(D):
    """Head dims over 128 (up to MAX_HEAD_DIM 256; 160 is padded to 256): varlen, chunked prefill, paged decode."""
    _check_varlen([5, 0, 9], [5, 0, 12], 4, 2, D, torch.float32, causal=True)
    _check_kvcache(2, 24, 3, 4, 1, D, torch.float16, [0, 21])
    _check_kvcache(2, 24, 1, 2, 2, D, torch.float32, [7, 23], page=8)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_varlen_gqa_ratios_causal_tq_ne_tk(group):
    _check_varlen([3, 7, 1, 0], [9, 7, 4, 2], group, 1, 32, torch.float32, causal=True)


@pytest.mark.parametrize("causal,window", [(True, (3, -1)), (False, (2, 2)), (False, (0, 0)), (False, (-1, 4)),
                                           (True, (0, -1)), (False, (5, 0))])
def test_varlen_windows(causal, window):
    _check_varlen([20, 6, 1], [20, 9, 3], 2, 1, 32, torch.float16, causal=causal, window=window)


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (True, (37, -1)), (False, (20, 33)), (False, (-1, -1))])
def test_varlen_long_sequences_edge_and_interior_blocks(causal, window):
    # Long enough for key blocks that every row sees entirely (the unmasked interior) between masked edges.
    _check_varlen([90, 3, 71], [90, 40, 100], 4, 1, 16, torch.float32, causal=causal, window=window)


def test_varlen_empty_rows_give_zeros_and_minus_inf_lse():
    # More queries than keys with a causal mask: the first queries see nothing; sequence 2 has no keys at all.
    cq, ck = _cu([4, 2]), _cu([2, 0])
    q, k = torch.randn(6, 2, 16, device=DEVICE), torch.randn(2, 2, 16, device=DEVICE)
    out, lse = flash_attn_varlen(q, k, k.clone(), cq, ck, 4, 2, causal=True, return_lse=True, backend="triton")
    assert torch.equal(out[:2], torch.zeros_like(out[:2])) and torch.equal(out[4:], torch.zeros_like(out[4:]))
    assert torch.isneginf(lse[:, :2]).all() and torch.isneginf(lse[:, 4:]).all() and torch.isfinite(lse[:, 2:4]).all()


def test_varlen_no_tokens_and_strided_views():
    _check_varlen([], [], 2, 1, 16, torch.float32)
    _check_varlen([0, 0], [0, 3], 2, 1, 16, torch.float32)
    # q/k/v as strided views of a fused qkv buffer [T, Hq + 2 Hk, D]
    T, Hq, Hk, D = 9, 4, 2, 24
    qkv = torch.randn(T, Hq + 2 * Hk, D, device=DEVICE)
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hk], qkv[:, Hq + Hk:]
    cu = _cu([4, 5])
    out = flash_attn_varlen(q, k, v, cu, cu, 5, 5, causal=True, backend="triton")
    exp = ref.flash_attn_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, 5, 5, causal=True)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=4),
       D=st.sampled_from([8, 24, 40]), Hk=st.integers(1, 2), group=st.sampled_from([1, 2, 4, 8]),
       causal=st.booleans(), left=st.integers(-1, 6), right=st.integers(-1, 6), dtype=st.sampled_from(KERNEL_DTYPES),
       scale=st.sampled_from([None, 0.3]), unknown_max=st.booleans())
def test_varlen_random(lens, D, Hk, group, causal, left, right, dtype, scale, unknown_max):
    lens_q, lens_k = [a for a, _ in lens], [b for _, b in lens]
    _check_varlen(lens_q, lens_k, Hk * group, Hk, D, dtype, causal=causal, window=(left, right), scale=scale,
                  unknown_max=unknown_max)


@pytest.mark.parametrize("group", [1, 4])
def test_varlen_packed_grid_many_unequal_sequences(group, monkeypatch):
    """The packed grid (sized by the token count, sequence found by a binary search over cu_seqlens): more
    sequences than rows per block, empty ones, one spanning several blocks; taken when max_seqlen is None and when
    it launches fewer programs than the classic grid, not for one long sequence."""
    from omni_fast.kernels import flash_attn as fa

    grids = []
    real = fa.attn_fwd
    monkeypatch.setattr(fa, "attn_fwd", lambda *a, **kw: grids.append(kw["packed_grid"]) or real(*a, **kw))
    lens = [1] * 12 + [0, 37, 0, 0, 5] + [1] * 6  # 23 sequences; BLOCK_M is 16 under the interpreter
    for unknown in (True, False):
        _check_varlen(lens, lens, 2 * group, 2, 16, torch.float32, causal=group > 1, unknown_max=unknown)
    _check_varlen([40], [40], group, 1, 16, torch.float32)
    assert grids == [True, True, False]


# --- kernel vs reference: KV cache ---------------------------------------------------------------------------


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


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("Hq,Hk,D", [(4, 1, 128), (2, 2, 72)])
def test_kvcache_chunked_prefill(dtype, Hq, Hk, D):
    _check_kvcache(3, 48, 7, Hq, Hk, D, dtype, [0, 17, 41])


@pytest.mark.parametrize("group", [1, 2, 8])
def test_kvcache_decode(group):
    _check_kvcache(4, 40, 1, group, 1, 64, torch.float16, [0, 1, 22, 39])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_kvcache_paged(num_splits):
    _check_kvcache(3, 64, 3, 4, 2, 32, torch.float32, [0, 30, 61], page=16, num_splits=num_splits)


@pytest.mark.parametrize("num_splits,Sq", [(2, 1), (4, 1), (3, 5)])
def test_kvcache_split_kv(num_splits, Sq):
    _check_kvcache(2, 300, Sq, 4, 2, 32, torch.float32, [280, 9], num_splits=num_splits)


def test_kvcache_split_kv_padded_head_dim():
    """d 72 (padded to 128) through the split combine's D slices (4 rows: 16-wide slices, the last one masked)."""
    _check_kvcache(1, 300, 1, 4, 1, 72, torch.float32, [287], num_splits=3)


@pytest.fixture
def as_h100(monkeypatch):
    """Split-KV choices as on an H100 (132 SMs; under the interpreter choose_splits never splits); returns the
    list of the split counts chosen."""
    from omni_fast.kernels import flash_attn_kvcache as fkv

    orig, chosen = fkv.choose_splits, []

    def choose(device, programs, capacity, **kw):
        saved = fkv._sm_count, fkv.interpreting
        fkv._sm_count, fkv.interpreting = (lambda index: 132), (lambda: False)
        try:
            chosen.append(orig(torch.device("cuda", 0), programs, capacity, **kw))
        finally:
            fkv._sm_count, fkv.interpreting = saved
        return chosen[-1]

    monkeypatch.setattr(fkv, "choose_splits", choose)
    return chosen


@pytest.mark.parametrize("lens,page", [([0], None), ([1], None), ([522], None), ([0, 1, 300, 522], None),
                                       ([0, 1, 300, 517], 16)])
def test_kvcache_split_kv_auto(as_h100, lens, page):
    """num_splits=0 at small batch splits the keys (flash-decoding) as on an H100: odd cache length (523: four
    full 128-key chunks and a partial one), cache_seqlens 0 and 1, per-row different lengths, a paged cache."""
    S = 528 if page else 523
    _check_kvcache(len(lens), S, 1, 8, 1, 32, torch.float32, lens, num_splits=0, page=page)
    assert as_h100 and as_h100[-1] > 1, as_h100


def test_kvcache_split_kv_explicit_is_honoured():
    """An explicit num_splits is used (trimmed to the chunks that hold keys: 300 keys have three 128-key chunks)."""
    from omni_fast.kernels.flash_attn_kvcache import effective_splits

    assert effective_splits(300, 64) == (3, 128) and effective_splits(300, 2) == (2, 256)
    assert effective_splits(4096, 3) == (3, 1408) and effective_splits(1, 5) == (1, 128)
    _check_kvcache(2, 300, 1, 4, 2, 32, torch.float32, [299, 0], num_splits=64)


def test_choose_splits_fills_the_gpu_from_shapes_only(monkeypatch):
    """The automatic choice at 132 SMs (the cost model's thinker / talker decode shapes): B=1 fills the SMs, B=8
    stays within one wave, a full GPU or a one-chunk cache does not split. Inputs are shapes only (no
    cache_seqlens values: CUDA-graph safe)."""
    from omni_fast.kernels import flash_attn_kvcache as fkv

    monkeypatch.setattr(fkv, "_sm_count", lambda index: 132)
    monkeypatch.setattr(fkv, "interpreting", lambda: False)
    dev = torch.device("cuda", 0)

    def pick(B, hq, hk, cap, d=128):
        return fkv.choose_splits(dev, B * hk, cap, kv_bytes=2 * B * hk * cap * d * 2,
                                 part_bytes=2 * B * hq * (d + 1) * 4)

    assert pick(1, 32, 4, 4097) == 33 and pick(1, 32, 4, 4096) == 32   # thinker: 132 / 128 CTAs (was 32)
    assert pick(1, 16, 2, 4097) == 33                                   # talker: 66 CTAs (was 16)
    assert pick(8, 32, 4, 4097) == 4                                    # 128 CTAs, one wave
    assert pick(64, 32, 4, 4097) == 1 and pick(1, 32, 4, 128) == 1
    assert all(pick(1, 16, 2, cap) <= fkv.MAX_SPLITS for cap in (1, 300, 4097, 32769, 1 << 20))
    assert fkv.choose_splits(torch.device("cpu"), 1, 1 << 20) == 1


def test_kvcache_window_and_no_append():
    _check_kvcache(2, 40, 4, 2, 1, 32, torch.float16, [25, 3], window=(5, -1))
    _check_kvcache(2, 300, 2, 2, 1, 32, torch.float32, [290, 150], window=(100, -1), num_splits=3)
    _check_kvcache(2, 40, 3, 2, 1, 32, torch.float32, [25, 3], append=False)
    _check_kvcache(2, 40, 3, 2, 1, 32, torch.float32, [25, 3], causal=False)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kvcache_key_padding_mask(dtype):
    """A padded batch in its own layout: left / right padding, holes, a fully padded row; decode, chunked prefill
    (GQA 4), windows, split-KV, a paged cache, no append. Padding queries give zeros."""
    B, S = 4, 40
    mask = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    mask[0, :7] = False  # left padding
    mask[1, 20:] = False  # right padding (its queries, the last positions, are padding)
    mask[2, 3:9] = False  # holes
    mask[2, 15] = False
    mask[3] = False  # nothing real
    lens = [33, 25, 37, 30]
    _check_kvcache(B, S, 3, 4, 1, 32, dtype, lens, key_padding_mask=mask)
    _check_kvcache(B, S, 1, 2, 2, 24, dtype, lens, key_padding_mask=mask, window=(5, -1))
    _check_kvcache(B, S, 3, 2, 1, 16, dtype, lens, key_padding_mask=mask, causal=False, window=(4, 4),
                   append=False)
    big = torch.ones(B, 300, dtype=torch.bool, device=DEVICE)
    big[:, :100] = False
    big[1, 150:160] = False
    _check_kvcache(B, 300, 1, 2, 1, 16, dtype, [290, 150, 200, 5], key_padding_mask=big, num_splits=3)
    _check_kvcache(B, S, 2, 2, 1, 16, dtype, lens, key_padding_mask=mask, page=8)


def test_kvcache_key_padding_mask_matches_eager_with_explicit_mask():
    """The reference's key padding mask == transformers' eager attention with the 4-D mask a padded batch gets
    (causal & padding, positions of the padded layout), on the rows that are not padding."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import eager_attention_forward

    class M(torch.nn.Module):
        num_key_value_groups = 2

    B, S, D = 2, 9, 16
    q, k, v = torch.randn(B, 4, S, D), torch.randn(B, 2, S, D), torch.randn(B, 2, S, D)
    real = torch.ones(B, S, dtype=torch.bool)
    real[0, :3] = False
    real[1, 4] = False
    allowed = torch.tril(torch.ones(S, S, dtype=torch.bool)) & real[:, None, :]
    add = torch.zeros(B, 1, S, S).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    want, _ = eager_attention_forward(M(), q, k, v, add, D ** -0.5)
    got = ref.flash_attn_with_kvcache(q.transpose(1, 2), k.transpose(1, 2).contiguous(),
                                      v.transpose(1, 2).contiguous(), torch.full((B,), S, dtype=torch.int32),
                                      key_padding_mask=real)
    torch.testing.assert_close(got[real], want[real])
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))


def test_kvcache_int_seqlens_and_zero_batch():
    kc, vc = torch.zeros(2, 8, 1, 16, device=DEVICE), torch.zeros(2, 8, 1, 16, device=DEVICE)
    q, k = torch.randn(2, 1, 2, 16, device=DEVICE), torch.randn(2, 1, 1, 16, device=DEVICE)
    out = flash_attn_with_kvcache(q, kc, vc, k, k.clone(), cache_seqlens=0, causal=True, backend="triton")
    # One visible key: the output is that key's value for every query head.
    torch.testing.assert_close(out, k.expand(2, 1, 2, 16))
    empty = flash_attn_with_kvcache(q[:0], kc[:0], vc[:0], cache_seqlens=torch.zeros(0, dtype=torch.int32,
                                                                                     device=DEVICE),
                                    backend="triton")
    assert empty.shape == (0, 1, 2, 16)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), B=st.integers(1, 3), Sq=st.sampled_from([1, 1, 2, 5]), Hk=st.integers(1, 2),
       group=st.sampled_from([1, 2, 4]), D=st.sampled_from([16, 40, 96]), causal=st.booleans(),
       left=st.sampled_from([-1, 0, 1, 3, 7]), right=st.sampled_from([-1, 0, 2]),
       page=st.sampled_from([None, None, 3, 5, 8]), num_splits=st.sampled_from([1, 1, 2, 3]),
       append=st.sampled_from([True, True, True, False]), dtype=st.sampled_from(KERNEL_DTYPES))
def test_kvcache_random(data, B, Sq, Hk, group, D, causal, left, right, page, num_splits, append, dtype):
    """Random KV-cache calls: decode (Sq 1) and chunked prefill (Sq > 1), per-row cache lengths including 0 and
    full-minus-Sq, GQA, windows, causal or not, head dims incl. 96 (padded to 128), contiguous or paged caches
    (odd page sizes), split-KV (a long cache when splitting, so the splits really cut it), fp32/fp16."""
    step = page or 1
    if num_splits > 1:  # splits are 128-key aligned: only a cache over 128 keys is really cut
        S = step * -(-260 // step)
    else:
        S = step * data.draw(st.integers(-(-max(Sq, 1) // step), 40 // step), label="pages")
    top = S - Sq if append else S
    lens = [data.draw(st.one_of(st.just(0), st.just(top), st.integers(0, top)), label=f"len{b}") for b in range(B)]
    _check_kvcache(B, S, Sq, Hk * group, Hk, D, dtype, lens, append=append, causal=causal, window=(left, right),
                   page=page, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(20, 20, 64, 104), (16, 16, 72, 256), (32, 4, 128, 300)])
def test_bf16_real_head_shapes(shape):
    Hq, Hk, D, L = shape
    _check_varlen([L, L // 3, 1], [L, L // 3, 1], Hq, Hk, D, torch.bfloat16, causal=Hq != Hk)
    _check_kvcache(2, 4096, 1, Hq, Hk, D, torch.bfloat16, [4000, 17], num_splits=0)
    mask = torch.ones(2, 4096, dtype=torch.bool, device=DEVICE)
    mask[0, :1000] = False  # a left-padded row
    mask[1, 5:9] = False
    _check_kvcache(2, 4096, 1, Hq, Hk, D, torch.bfloat16, [4000, 17], num_splits=0, key_padding_mask=mask)
    _check_kvcache(2, 512, 300, Hq, Hk, D, torch.bfloat16, [200, 0], key_padding_mask=mask[:, :512])


@pytest.fixture
def split_head_dim(monkeypatch):
    """The opt-in split head dim (kernels.flash_attn.SPLIT_HEAD_DIM: d 72 as a 64 + 16 tile pair)."""
    from omni_fast.kernels import flash_attn as fa

    monkeypatch.setattr(fa, "SPLIT_HEAD_DIM", True)


def test_head_tiles():
    from omni_fast.kernels.flash_attn import head_tiles

    assert [head_tiles(d, True) for d in (72, 80, 96, 112, 128, 160, 40, 24, 8)] == [
        (64, 16), (64, 16), (64, 32), (128, 0), (128, 0), (128, 32), (32, 16), (32, 0), (16, 0)]
    assert head_tiles(72, False) == (128, 0)


@pytest.mark.parametrize("D", [72, 80, 96, 40, 160])
def test_split_head_dim_matches_reference(split_head_dim, D):
    """Split head dims on the interpreter: varlen (GQA, causal, an empty sequence), KV cache with split-KV and a
    paged cache, key padding mask; fp32 and fp16."""
    _check_varlen([5, 0, 9], [5, 0, 9], 4, 2, D, torch.float32, causal=True)
    _check_varlen([7, 3], [7, 3], 2, 2, D, torch.float16, causal=False)
    _check_kvcache(2, 300, 2, 4, 2, D, torch.float32, [280, 0], num_splits=3)
    mask = torch.ones(2, 48, dtype=torch.bool, device=DEVICE)
    mask[0, :5] = False
    _check_kvcache(2, 48, 3, 2, 1, D, torch.float16, [30, 41], page=16, key_padding_mask=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16, 16, 72, 1024), (16, 16, 80, 300), (8, 8, 96, 256)])
def test_bf16_split_head_dim_gpu(split_head_dim, shape):
    """The opt-in split head dim at the vision encoders' real shapes (Qwen3-Omni d 72, Qwen2.5-Omni d 80), bf16:
    it becomes the default once this passes on a GPU."""
    Hq, Hk, D, L = shape
    _check_varlen([L, L // 3, 1], [L, L // 3, 1], Hq, Hk, D, torch.bfloat16, causal=False)
    _check_kvcache(2, 4096, 1, Hq, Hk, D, torch.bfloat16, [4000, 17], num_splits=0)


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
    _close_lse(lse, lse_exp)


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
