"""Flash attention: reference mask semantics, kernel vs reference for the varlen op. Also:
test_attention_kvcache.py (KV cache, paged, split-KV, split head dim), test_attention_api.py (dispatch, bad input,
malformed index values)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni_fast.ops import flash_attn_varlen
from omni_fast.reference import attention as ref
from omni_fast.testing import DEVICE, KERNEL_DTYPES

from _attention_helpers import _check_kvcache, _check_varlen, _cu


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


