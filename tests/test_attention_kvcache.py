"""Flash attention with a KV cache: kernel vs reference (chunked prefill, decode, paged, split-KV, windows, key
padding mask), the real bf16 head shapes, the opt-in split head dim."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni_fast.ops import flash_attn_with_kvcache
from omni_fast.reference import attention as ref
from omni_fast.testing import DEVICE, KERNEL_DTYPES

from _attention_helpers import _check_kvcache, _check_varlen


# --- kernel vs reference: KV cache ---------------------------------------------------------------------------


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
def split_head_dim(fast_path):
    """The opt-in split head dim (the split_head_dim fast path: d 72 as a 64 + 16 tile pair)."""
    fast_path("split_head_dim")  # OMNI_FAST_SPLIT_HEAD_DIM=1


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


