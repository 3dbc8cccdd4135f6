"""omni_fast.compat.flash_attn, the argument side (split from tests/test_compat_flash_attn.py): inference only, bad
input named as flash-attn 2.8 names it, and the flags and tensors flash-attn converts (truth values for its C++
bools, negative softcap, strided last dimensions and index tensors), the scale default and the module-swap recipe."""

from __future__ import annotations

import math

import pytest
import torch

import omni_fast
from omni_fast.compat import flash_attn as fa
from omni_fast.testing import DEVICE

from _attention_helpers import _cu, rand


# --- inference only, bad input ----------------------------------------------------------------------------------


def test_dropout_and_backward_raise():
    q = rand(1, 2, 2, 16)
    with pytest.raises(ValueError, match="dropout_p must be 0.0"):
        fa.flash_attn_func(q, q, q, 0.1)
    with pytest.raises(ValueError, match="inference-only"):
        fa.flash_attn_func(q.clone().requires_grad_(), q, q)
    with torch.no_grad():
        fa.flash_attn_func(q.clone().requires_grad_(), q, q)


def _kv(**over):
    a = dict(q=rand(2, 1, 4, 32), k_cache=torch.zeros(2, 16, 2, 32), v_cache=torch.zeros(2, 16, 2, 32),
             k=rand(2, 1, 2, 32), v=rand(2, 1, 2, 32), cache_seqlens=torch.tensor([1, 2], dtype=torch.int32))
    a.update(over)
    return fa.flash_attn_with_kvcache(**a)


@pytest.mark.parametrize("over,exc,match", [
    (dict(rotary_cos=torch.zeros(16, 8)), ValueError, "rotary_cos and rotary_sin"),
    (dict(rotary_cos=torch.zeros(16, 8), rotary_sin=torch.zeros(16, 8), k=None, v=None), ValueError, "need new k"),
    (dict(rotary_cos=torch.zeros(16, 4), rotary_sin=torch.zeros(16, 4)), ValueError, "multiple of 16"),
    (dict(rotary_cos=torch.zeros(8, 8), rotary_sin=torch.zeros(8, 8)), ValueError, "rotary_cos must have at least"),
    (dict(rotary_cos=torch.zeros(16, 8, dtype=torch.float16), rotary_sin=torch.zeros(16, 8, dtype=torch.float16)),
     TypeError, "rotary_cos must have dtype"),
    (dict(cache_batch_idx=torch.tensor([0, 1]), ), TypeError, "cache_batch_idx must have dtype"),
    (dict(cache_batch_idx=torch.tensor([0, 5], dtype=torch.int32)), ValueError, "cache_batch_idx must lie in"),
    (dict(block_table=torch.zeros(2, 1, dtype=torch.int32), cache_batch_idx=torch.zeros(2, dtype=torch.int32)),
     ValueError, "cache_batch_idx is not supported with a paged cache"),
    (dict(block_table=torch.zeros(2, 1, dtype=torch.int32), cache_leftpad=torch.zeros(2, dtype=torch.int32)),
     ValueError, "cache_leftpad is not supported with a paged cache"),
    (dict(cache_leftpad=torch.zeros(3, dtype=torch.int32)), ValueError, "cache_leftpad must have shape"),
    (dict(alibi_slopes=torch.zeros(3)), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=torch.zeros(4, dtype=torch.float16)), TypeError, "alibi_slopes must have dtype"),
    (dict(softcap=float("nan")), ValueError, "softcap must be a finite number"),
    (dict(softcap="1"), TypeError, "softcap must be a float"),
    (dict(cache_seqlens=None), ValueError, "cache_seqlens is required"),
    (dict(k=rand(2, 1, 2, 32), v=rand(2, 2, 2, 32)), ValueError, "v must have shape"),
    (dict(window_size=(-2, 0)), ValueError, r"window_size\[0\]"),
])
def test_kvcache_bad_input_names_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        _kv(**over)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fa.flash_attn_qkvpacked_func(rand(1, 2, 2, 2, 16)), ValueError, "qkv must have shape"),
    (lambda: fa.flash_attn_kvpacked_func(rand(1, 2, 2, 16), rand(1, 2, 3, 2, 16)), ValueError, "kv must have shape"),
    (lambda: fa.flash_attn_func(rand(1, 2, 3, 16), rand(1, 2, 2, 16), rand(1, 2, 2, 16)), ValueError, "multiple"),
    (lambda: fa.flash_attn_func(rand(2, 2, 2, 16), rand(1, 2, 2, 16), rand(1, 2, 2, 16)), ValueError,
     "k must have shape"),
    (lambda: fa.flash_attn_func(rand(1, 2, 2, 16), rand(1, 2, 2, 16), rand(1, 3, 2, 16)), ValueError,
     "v must have shape"),
    (lambda: fa.flash_attn_func(rand(1, 2, 2, 16), rand(1, 2, 2, 16), rand(1, 2, 2, 16), dropout_p="x"), TypeError,
     "dropout_p"),
    (lambda: fa.flash_attn_func(rand(1, 2, 2, 16), rand(1, 2, 2, 16).half(), rand(1, 2, 2, 16)), TypeError,
     "^k must have the same dtype as q"),  # (was named k_cache, the KV-cache op's name underneath)
    (lambda: fa.flash_attn_func(rand(1, 2, 2, 16), rand(1, 2, 2, 16), rand(1, 2, 2, 16).half()), TypeError,
     "^v must have the same dtype as q"),
    (lambda: fa.flash_attn_varlen_func(rand(3, 2, 16), rand(3, 2, 16), rand(3, 2, 16), _cu([3]), _cu([3]), 3, 3,
                                       block_table=torch.zeros(1, 1, dtype=torch.int32)), ValueError,
     "k must have 4 dimensions"),
    (lambda: fa.flash_attn_varlen_func(rand(3, 2, 16), rand(3, 2, 16), rand(3, 2, 16), _cu([3]), _cu([3]), 3, 3,
                                       seqused_k=torch.zeros(2, dtype=torch.int32)), ValueError,
     "seqused_k must have shape"),
])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- causal and softcap take what flash-attn's C++ bool / float take --------------------------------------------


def _compat_calls(causal, softcap):
    """Every compat entry point taking causal/softcap, on fixed inputs (fresh caches for the KV-cache call)."""
    torch.manual_seed(0)
    qkv, qkv_v, cu = rand(2, 4, 3, 2, 16), rand(5, 3, 2, 16), _cu([2, 3])
    q, k, v = qkv_v[:, 0], qkv_v[:, 1], qkv_v[:, 2]
    kv_args = (rand(2, 2, 2, 16), torch.zeros(2, 8, 2, 16, device=DEVICE), torch.zeros(2, 8, 2, 16, device=DEVICE),
               rand(2, 2, 2, 16), rand(2, 2, 2, 16))
    return [fa.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=causal, softcap=softcap),
            fa.flash_attn_qkvpacked_func(qkv, causal=causal, softcap=softcap),
            fa.flash_attn_kvpacked_func(qkv[:, :, 0], qkv[:, :, 1:], causal=causal, softcap=softcap),
            fa.flash_attn_varlen_func(q, k, v, cu, cu, 3, 3, causal=causal, softcap=softcap),
            fa.flash_attn_varlen_qkvpacked_func(qkv_v, cu, 3, causal=causal, softcap=softcap),
            fa.flash_attn_varlen_kvpacked_func(q, qkv_v[:, 1:], cu, cu, 3, 3, causal=causal, softcap=softcap),
            fa.flash_attn_with_kvcache(*kv_args, cache_seqlens=3, causal=causal, softcap=softcap)]


@pytest.mark.parametrize("causal,as_bool", [
    (1, True), (0, False), (2, True), (1.0, True), (None, False), (torch.tensor(1), True),
    (torch.tensor([0]), False), (torch.tensor(True), True)])
def test_causal_takes_any_truth_value_as_flash_attn(causal, as_bool):
    """flash-attn hands causal to a C++ bool (torch's op schema, pybind11 for the KV cache): 1, 0.0, None, a
    one-element tensor all convert; ours gives what the bool gives."""
    for got, want in zip(_compat_calls(causal, 0.0), _compat_calls(as_bool, 0.0)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("softcap", [-1.0, -30, -1e-3])
def test_negative_softcap_is_off_as_flash_attn(softcap):
    """flash-attn caps only when softcap > 0 (its C++ ``if (softcap > 0.0)``): a negative one is no cap."""
    for got, want in zip(_compat_calls(True, softcap), _compat_calls(True, 0.0)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("causal", ["yes", "", [1], (), torch.tensor([1, 1]), torch.zeros(0), object()])
def test_causal_without_a_truth_value_is_refused_as_flash_attn(causal):
    """What flash-attn's bool conversion refuses (a str, a list/tuple, a tensor of another size than one)."""
    q = rand(1, 2, 2, 16)
    calls = [lambda: fa.flash_attn_func(q, q, q, causal=causal),
             lambda: fa.flash_attn_varlen_func(q[0], q[0], q[0], _cu([2]), _cu([2]), 2, 2, causal=causal),
             lambda: _kv(causal=causal)]
    for call in calls:
        with pytest.raises(TypeError, match="^causal must be a bool"):
            call()


def test_scale_default_is_inverse_sqrt_head_dim():
    q = rand(1, 3, 2, 16)
    a = fa.flash_attn_func(q, q, q)
    b = fa.flash_attn_func(q, q, q, softmax_scale=1 / math.sqrt(16))
    torch.testing.assert_close(a, b)


def test_module_swap_recipe(monkeypatch):
    """docs/compat.md's recipe for code that imports ``flash_attn`` itself: the two module names installed, then the
    imports such code writes (the package, its ``flash_attn_interface`` module, ``__version__`` for version gates)
    work and call the omni-fast functions."""
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "flash_attn", fa)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", fa)
    flash_attn = importlib.import_module("flash_attn")
    from flash_attn.flash_attn_interface import flash_attn_func  # noqa: F401 (the import is what is tested)

    assert flash_attn.__version__.startswith(fa.FLASH_ATTN_VERSION + ".")
    assert flash_attn.__version__ == "2.8.3.post2"  # pip's newest flash-attn, whose interface this module mirrors
    assert flash_attn_func is fa.flash_attn_func and flash_attn.flash_attn_with_kvcache is fa.flash_attn_with_kvcache
    q, k, v = (torch.randn(1, 5, 2, 16, device=DEVICE) for _ in range(3))
    torch.testing.assert_close(flash_attn_func(q, k, v, causal=True), fa.flash_attn_func(q, k, v, causal=True))


def test_strided_last_dimension_is_copied_as_flash_attn_does():
    """flash-attn 2.8 makes q, k, v contiguous in the last dimension (``maybe_contiguous``) in every function; here
    such inputs raised ValueError. The KV caches are written in place and must stay unit-stride, as in flash-attn."""
    B, S, H, D = 1, 5, 2, 16
    strided = [rand(B, S, H, 2 * D)[..., ::2] for _ in range(3)]
    q, k, v = strided
    dense = [t.contiguous() for t in strided]
    torch.testing.assert_close(fa.flash_attn_func(q, k, v, causal=True), fa.flash_attn_func(*dense, causal=True))
    cu = _cu([S])
    torch.testing.assert_close(fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, S, S),
                               fa.flash_attn_varlen_func(dense[0][0], dense[1][0], dense[2][0], cu, cu, S, S))
    kc, vc = torch.zeros(B, 8, H, D, device=DEVICE), torch.zeros(B, 8, H, D, device=DEVICE)
    seq = torch.full((B,), 2, dtype=torch.int32, device=DEVICE)
    got = fa.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seq, causal=True)
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    want = fa.flash_attn_with_kvcache(dense[0], kc2, vc2, dense[1], dense[2], cache_seqlens=seq, causal=True)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    with pytest.raises(ValueError, match="k_cache"):
        fa.flash_attn_with_kvcache(dense[0], rand(B, 8, H, 2 * D)[..., ::2], vc, cache_seqlens=seq)


def test_strided_index_tensors_as_flash_attn_does():
    """A block_table (or cache_batch_idx) with a strided last dimension: flash-attn 2.8's kvcache call copies it
    (``maybe_contiguous``), its varlen call refuses it; here the kernels read page j of row b at
    ``b * stride(0) + j``, so a strided table attended to other rows' pages silently (review of session 6)."""
    from omni_fast.compat import vllm_flash_attn as vfa

    g = torch.Generator().manual_seed(11)
    B, H, D, page, n_pages = 2, 2, 16, 16, 8
    q = torch.randn(B, 1, H, D, generator=g).to(DEVICE)
    kc, vc = (torch.randn(n_pages, page, H, D, generator=g).to(DEVICE) for _ in range(2))
    wide = torch.randperm(n_pages, generator=g).to(torch.int32).reshape(B, 4).to(DEVICE)
    table = wide[:, ::2]  # stride (4, 2)
    seq = torch.tensor([20, 30], dtype=torch.int32, device=DEVICE)
    for fn in (fa.flash_attn_with_kvcache, vfa.flash_attn_with_kvcache):
        got = fn(q, kc, vc, cache_seqlens=seq, block_table=table)
        torch.testing.assert_close(got, fn(q, kc, vc, cache_seqlens=seq, block_table=table.contiguous()))
    caches = [torch.randn(4, 32, H, D, generator=g).to(DEVICE) for _ in range(2)]
    idx = torch.tensor([3, 9, 1, 9], dtype=torch.int32, device=DEVICE)[::2]  # [3, 1], stride 2
    torch.testing.assert_close(fa.flash_attn_with_kvcache(q, *caches, cache_seqlens=seq, cache_batch_idx=idx),
                               fa.flash_attn_with_kvcache(q, *caches, cache_seqlens=seq,
                                                          cache_batch_idx=idx.contiguous()))
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 20, 50], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="block_table"):
        fa.flash_attn_varlen_func(q[:, 0], kc, vc, cu_q, cu_k, 1, 30, block_table=table, seqused_k=seq)
    with pytest.raises(ValueError, match="block_table"):
        omni_fast.ops.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seq, block_table=table)


def test_other_flags_take_truth_values_as_flash_attn():
    """rotary_interleaved (a C++ bool there), return_softmax_lse and return_attn_probs (Python truth there) convert
    as causal does: 1 / 0 / None / a one-element tensor give what the bool gives; a list is refused by name."""
    q = rand(1, 2, 2, 16)
    assert isinstance(fa.flash_attn_func(q, q, q, return_attn_probs=1), tuple)
    assert torch.is_tensor(fa.flash_attn_func(q, q, q, return_attn_probs=None))
    assert len(fa.flash_attn_varlen_func(q[0], q[0], q[0], _cu([2]), _cu([2]), 2, 2,
                                         return_attn_probs=torch.tensor(1))) == 3
    assert len(_kv(return_softmax_lse=1)) == 2
    assert torch.is_tensor(_kv(return_softmax_lse=0))
    cos, sin = torch.rand(8, 8, device=DEVICE), torch.rand(8, 8, device=DEVICE)

    def rotated(flag):
        k_cache = torch.zeros(1, 8, 2, 16, device=DEVICE)
        v_cache = torch.zeros(1, 8, 2, 16, device=DEVICE)
        out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, q, q, cos, sin, cache_seqlens=1,
                                         rotary_interleaved=flag)
        return out, k_cache

    for flag, as_bool in ((1, True), (0, False), (None, False)):
        for got, want in zip(rotated(flag), rotated(as_bool)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name in ("rotary_interleaved", "return_softmax_lse"):
        with pytest.raises(TypeError, match=f"^{name} must be a bool"):
            _kv(**{name: [1]})
    with pytest.raises(TypeError, match="^return_attn_probs must be a bool"):
        fa.flash_attn_func(q, q, q, return_attn_probs="yes")
