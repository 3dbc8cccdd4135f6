"""Issue 17 on the public ops: aliasing (part 1), limits (4), errors naming the argument and one rule for numbers
(5, 6). One test per defect found by the hostile review; the hypothesis sweep is tests/test_reliability_sweep.py."""

import math
import random

import numpy as np
import pytest
import torch

from omni_fast import ops
from omni_fast.ops import mtp_layers
from omni_fast.reference import rope as ref_rope

BACKENDS = ("reference", "triton")


def _qk(T=3, Hq=2, Hk=1, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, Hq, D, generator=g), torch.randn(T, Hk, D, generator=g), torch.arange(T)


# --- 1. aliasing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_mrope_refuses_q_is_k(backend):
    q, _, pos = _qk(Hk=2)
    with pytest.raises(ValueError, match="k must not overlap q"):
        ops.mrope(q, q, pos, mrope_section=(4, 0, 0), backend=backend)
    w = torch.ones(8)
    with pytest.raises(ValueError, match="k must not overlap q"):
        ops.qk_norm_mrope(q, q, w, w, pos, mrope_section=(4, 0, 0), backend=backend)


def test_mrope_refuses_overlapping_head_views():
    buf = torch.randn(3, 3, 8)
    with pytest.raises(ValueError, match="k must not overlap q"):
        ops.mrope(buf[:, :2], buf[:, 1:], torch.arange(3), mrope_section=(4, 0, 0))


def test_mrope_refuses_q_aliasing_its_weights_or_positions():
    q, k, pos = _qk()
    with pytest.raises(ValueError, match="q must not overlap q_weight"):
        ops.qk_norm_mrope(q, k, q[0, 0], torch.ones(8), pos, mrope_section=(4, 0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mrope_accepts_fused_qkv_column_blocks(backend):
    """q and k as head blocks of one fused projection (Code2Wav's layout) are disjoint: accepted, exact."""
    qkv = torch.randn(3, 4, 8)  # [T, Hq + Hk + Hv, D]
    want_q, want_k = ref_rope.mrope(qkv[:, :2].clone(), qkv[:, 2:3].clone(), torch.arange(3), mrope_section=(4, 0, 0),
                                    interleaved=False)
    q, k = ops.mrope(qkv[:, :2], qkv[:, 2:3], torch.arange(3), mrope_section=(4, 0, 0), interleaved=False,
                     backend=backend)
    torch.testing.assert_close(qkv[:, :2], want_q)
    torch.testing.assert_close(qkv[:, 2:3], want_k)


def _moe(T=3, E=4, H=8, I=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1
    w, ids = torch.rand(T, k, generator=g), torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return x, w13, w2, w, ids.to(torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_experts_refuses_expanded_out(backend):
    x, w13, w2, w, ids = _moe()
    with pytest.raises(ValueError, match="out has internally overlapping memory"):
        ops.moe_experts(x, w13, w2, w, ids, out=torch.empty(1, 8).expand(3, 8), backend=backend)


def test_moe_experts_refuses_out_aliasing_an_input():
    x, w13, w2, w, ids = _moe()
    with pytest.raises(ValueError, match="out must not overlap hidden_states"):
        ops.moe_experts(x, w13, w2, w, ids, out=x)
    with pytest.raises(ValueError, match="out must not overlap w2"):
        ops.moe_experts(x, w13, w2, w, ids, out=w2.view(-1)[:24].view(3, 8))


def test_moe_block_refuses_out_aliasing_hidden_states():
    x, w13, w2, _, _ = _moe()
    gate = torch.randn(4, 8)
    with pytest.raises(ValueError, match="out must not overlap hidden_states"):
        ops.moe_block(x, gate, w13, w2, 2, out=x)


def _cache(B=2, S=6, Hk=1, D=8):
    return torch.randn(B, S, Hk, D), torch.randn(B, S, Hk, D)


def test_kvcache_refuses_k_cache_is_v_cache_when_appending():
    kc, _ = _cache()
    q, k = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 1, 8)
    with pytest.raises(ValueError, match="v_cache must not overlap k_cache"):
        ops.flash_attn_with_kvcache(q, kc, kc, k, k.clone(), cache_seqlens=2)


def test_kvcache_refuses_expanded_cache_when_appending():
    kc = torch.randn(1, 6, 1, 8).expand(2, 6, 1, 8)
    q, k = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 1, 8)
    with pytest.raises(ValueError, match="k_cache has internally overlapping memory"):
        ops.flash_attn_with_kvcache(q, kc, torch.randn(2, 6, 1, 8), k, k.clone(), cache_seqlens=2)


def test_kvcache_refuses_q_or_k_aliasing_the_cache():
    kc, vc = _cache()
    k = torch.randn(2, 1, 1, 8)
    with pytest.raises(ValueError, match="k_cache must not overlap q"):
        ops.flash_attn_with_kvcache(kc[:, :1].expand(2, 1, 2, 8), kc, vc, k, k.clone(), cache_seqlens=2)
    with pytest.raises(ValueError, match="k_cache must not overlap k"):
        ops.flash_attn_with_kvcache(torch.randn(2, 1, 2, 8), kc, vc, kc[:, 2:3], k, cache_seqlens=2)


def test_kvcache_paged_k_and_v_halves_of_one_buffer_are_accepted():
    """vLLM's layout: k and v caches as the two halves of one [blocks, 2, block, Hk, D] buffer: disjoint."""
    kv = torch.randn(3, 2, 4, 1, 8)
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 1, 8)
    table = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    ops.flash_attn_with_kvcache(q, kv[:, 0], kv[:, 1], k, k.clone(), cache_seqlens=2, block_table=table)


def test_mtp_cached_attention_and_norm_refuse_aliasing():
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 1, 8)
    kc = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="v_cache must not overlap k_cache"):
        mtp_layers.cached_attention(q, k, k.clone(), kc, kc, start=0)
    h = torch.randn(2, 8)
    with pytest.raises(ValueError, match="h must not overlap delta"):
        mtp_layers.add_rms_norm_(h, h, torch.ones(8))


# --- 4. limits ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size, num_experts, arg", [(2**31, 8, "block_size"), (16, 2**31, "num_experts")])
def test_moe_align_sizes_bounded_before_allocation(block_size, num_experts, arg):
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=arg):
        ops.align_moe_blocks(ids, block_size, num_experts)


def test_moe_align_padded_size_must_fit_int32():
    ids = torch.zeros((), dtype=torch.int32).expand(2**31)  # no memory: the bound is checked from the shape
    with pytest.raises(ValueError, match="topk_ids has 2147483648 entries.*int32"):
        ops.align_moe_blocks(ids, 4, 8)


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**70])
def test_seeds_outside_int64_name_the_seed(seed):
    with pytest.raises(ValueError, match="seed must fit int64"):
        ops.sample(torch.randn(2, 5), seed=seed)
    with pytest.raises(ValueError, match="offset must fit int64"):
        ops.sample(torch.randn(2, 5), seed=1, offset=seed)


def test_kvcache_int_cache_seqlens_bounded():
    kc, vc = _cache()
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0 and <= "):
        ops.flash_attn_with_kvcache(torch.randn(2, 1, 2, 8), kc, vc, cache_seqlens=2**40)


# --- 5/6. one rule for numbers; nonsense refused ------------------------------------------------------------------


def test_numpy_and_0d_tensor_ints_accepted_everywhere():
    logits = torch.randn(3, 6)
    for top_k in (np.int64(2), np.int32(2), torch.tensor(2)):
        w, i = ops.route_topk(logits, top_k)
        assert i.shape == (3, 2)
    a = ops.sample(logits, seed=np.int64(7), top_k=np.int64(3))
    assert torch.equal(a, ops.sample(logits, seed=7, top_k=3))
    assert torch.equal(a, ops.sample(logits, seed=torch.tensor(7), top_k=torch.tensor(3)))
    ids = torch.randint(0, 8, (4, 2), dtype=torch.int32)
    ref = ops.align_moe_blocks(ids, 4, 8)
    got = ops.align_moe_blocks(ids, np.int64(4), torch.tensor(8))
    assert all(torch.equal(r, g) for r, g in zip(ref, got))
    kc, vc = _cache()
    q = torch.randn(2, 1, 2, 8)
    torch.testing.assert_close(ops.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=np.int32(3)),
                               ops.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=3))


@pytest.mark.parametrize("bad", [2.0, True, "2", None])
def test_bools_floats_strings_refused_as_ints(bad):
    with pytest.raises(TypeError, match="top_k must be an int"):
        ops.route_topk(torch.randn(3, 6), bad)
    with pytest.raises(TypeError, match="top_k must be an int"):
        ops.sample(torch.randn(3, 6), top_k=bad if bad is not None else 1.5)


@pytest.mark.parametrize("name, kwargs, exc", [
    ("mrope_section", dict(mrope_section=None), TypeError),
    ("theta", dict(theta="x"), TypeError),
    ("theta", dict(theta=float("nan")), ValueError),
    ("attention_scaling", dict(attention_scaling=float("nan")), ValueError),
    ("attention_scaling", dict(attention_scaling=float("inf")), ValueError),
    ("interleaved", dict(interleaved="no"), TypeError),
])
def test_mrope_bad_arguments_named(name, kwargs, exc):
    q, k, pos = _qk()
    kwargs.setdefault("mrope_section", (4, 0, 0))
    with pytest.raises(exc, match=name):
        ops.mrope(q, k, pos, **kwargs)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "x"])
def test_attention_scale_must_be_finite(scale):
    kc, vc = _cache()
    with pytest.raises((TypeError, ValueError), match="softmax_scale"):
        ops.flash_attn_with_kvcache(torch.randn(2, 1, 2, 8), kc, vc, cache_seqlens=1, softmax_scale=scale)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises((TypeError, ValueError), match="softmax_scale"):
        ops.flash_attn_varlen(torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8), cu, cu, 3, 3,
                              softmax_scale=scale)


@pytest.mark.parametrize("bad", [[-2, 0, 1, 2], [0, 1, 2, 4]])
def test_expert_map_values_out_of_range(bad):
    x, w13, w2, w, ids = _moe()
    with pytest.raises(ValueError, match="expert_map must lie in"):
        ops.moe_experts(x, w13, w2, w, ids, expert_map=torch.tensor(bad, dtype=torch.int32))
    with pytest.raises(ValueError, match="expert_map must lie in"):
        ops.align_moe_blocks(ids, 4, 4, torch.tensor(bad, dtype=torch.int32))


def test_sample_suppress_ranges_rules():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"suppress_ranges\[0\] must be a \(lo, hi\) pair"):
        ops.sample(logits, suppress_ranges=[1, 2], seed=0)
    with pytest.raises(ValueError, match="lo <= hi"):  # a tensor follows the list's rule
        ops.sample(logits, suppress_ranges=torch.tensor([[5, 2]]), seed=0)
    with pytest.raises(ValueError, match="whole vocabulary"):
        ops.sample(logits, suppress_ranges=[(0, 4), (3, 10)], seed=0)
    with pytest.raises(ValueError, match="whole vocabulary"):
        ops.sample(logits, suppress_ranges=torch.tensor([[0, 12]]), seed=0)
    ops.sample(logits, suppress_ranges=[(0, 4), (5, 10)], seed=0)  # id 4 left: fine


def test_sample_suppress_ranges_check_is_not_quadratic_in_eager():
    """The whole-vocabulary check (run on every eager call) went over the ranges once per range that grew the
    covered prefix when they came out of order: R passes of R ranges (R = 2,000 single ids, shuffled: ~1,000 passes,
    every sampled token). Eager sorts first (only a compiled trace cannot sort SymInts): a bounded number of passes,
    the same answers."""
    from omni_fast.ops import sampling

    class Counted(tuple):  # the caller's pairs: counts the passes over them
        passes = 0

        def __iter__(self):
            Counted.passes += 1
            return super().__iter__()

    R = 2000
    pairs = [(i, i + 1) for i in range(R)]
    random.Random(0).shuffle(pairs)
    sampling._check_ranges(Counted(pairs), R + 1)  # id R left
    assert Counted.passes <= 3
    with pytest.raises(ValueError, match="whole vocabulary"):
        sampling._check_ranges(Counted(pairs[::-1]), R)


@pytest.mark.parametrize("name, value", [("repetition_penalty", math.inf), ("repetition_penalty", math.nan),
                                         ("temperature", math.nan), ("top_p", math.nan), ("temperature", "1")])
def test_sample_nonsense_floats_refused(name, value):
    with pytest.raises((TypeError, ValueError), match=name):
        ops.sample(torch.randn(2, 10), seed=0, **{name: value})


def test_rvq_offsets_named():
    codes = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(TypeError, match="offsets"):
        ops.rvq_embed(codes, torch.randn(12, 4), offsets="abc")
    with pytest.raises(TypeError, match=r"offsets\[1\]"):
        ops.rvq_embed(codes, torch.randn(12, 4), offsets=[0, 1.5, 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rvq_accepts_stacked_tables(backend):
    tables = torch.randn(3, 5, 4)
    codes = torch.randint(0, 5, (2, 7, 3))
    want = ops.rvq_embed(codes, list(tables), backend=backend)
    torch.testing.assert_close(ops.rvq_embed(codes, tables, backend=backend), want)
    with pytest.raises(ValueError, match="one table per codebook"):
        ops.rvq_embed(codes, torch.randn(2, 5, 4))


@pytest.mark.parametrize("layout", ["list", "offsets"])
def test_rvq_unchecked_bad_codes_backends_agree(layout):
    torch.manual_seed(0)
    codes = torch.tensor([[0, 1, 2], [-1, 7, 1], [4, 0, 99]])
    if layout == "list":
        tables, kw = [torch.randn(5, 4) for _ in range(3)], {}
    else:
        tables, kw = torch.randn(15, 4), dict(offsets=[0, 5, 10])
    got = {be: ops.rvq_embed(codes, tables, check_values=False, backend=be, **kw) for be in BACKENDS}
    torch.testing.assert_close(got["reference"], got["triton"])
    for be in BACKENDS:  # and the valid row still equals the checked call
        torch.testing.assert_close(got[be][0], ops.rvq_embed(codes[:1], tables, backend=be, **kw)[0])


# --- Code2Wav convolutions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op", ["causal_conv1d", "causal_conv_transpose1d"])
def test_conv_zero_input_channels_refused(op, backend):
    # torch's conv raised RuntimeError (transposed) or returned [B, 0, T] (conv1d) while Triton returned the bias
    x = torch.randn(1, 0, 6)
    if op == "causal_conv1d":
        call = lambda: ops.causal_conv1d(x, torch.randn(3, 0, 3), torch.randn(3), backend=backend)  # noqa: E731
    else:
        call = lambda: ops.causal_conv_transpose1d(x, torch.randn(0, 3, 4), torch.randn(3), stride=2,  # noqa: E731
                                                   backend=backend)
    with pytest.raises(ValueError, match=r"x must have at least one input channel"):
        call()


@pytest.mark.parametrize("snake, match", [
    ((None, torch.zeros(4)), "snake alpha"), ((torch.zeros(3), torch.zeros(4)), "snake alpha"),
    ((torch.zeros(4), torch.zeros(4, dtype=torch.float64)), "snake beta"), ((torch.zeros(4),) * 3, "snake"),
    ("ab", "snake"), ({"a": 1, "b": 2}, "snake")])
def test_conv_transpose_snake_pair_named(snake, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ops.causal_conv_transpose1d(torch.randn(1, 4, 5), torch.randn(4, 3, 4), stride=2, snake=snake)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight=torch.randn(4, 3, 4), stride=8), "stride 8"), (dict(weight=torch.randn(4, 3, 0), stride=2), "weight"),
    (dict(weight=torch.randn(4, 3, 2), stride=2, state=torch.randn(1, 4, 1)), "state"),
    (dict(weight=torch.randn(4, 3, 4), stride=2, state=torch.randn(1, 4, 1).double()), "state")])
def test_conv_transpose_bad_shapes_named(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ops.causal_conv_transpose1d(torch.randn(1, 4, 5), **kwargs)
