"""TM-RoPE: reference vs transformers, kernel vs reference, bad input."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omni_fast
from omni_fast.reference import rope as ref
from omni_fast.testing import DEVICE, KERNEL_DTYPES, assert_matches_reference

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25  # noqa: E402
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig  # noqa: E402


def _positions(T, rows=3, high=4000, device="cpu"):
    return torch.randint(0, high, (rows, T), device=device) if rows == 3 else torch.randint(0, high, (T,),
                                                                                            device=device)


# --- reference vs transformers -------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim,section", [(128, (24, 20, 20)), (64, (12, 10, 10)), (32, (4, 6, 6)), (16, (2, 3, 3))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_matches_qwen3_omni_rotary(head_dim, section, dtype):
    cfg = Qwen3OmniMoeTextConfig(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=1,
                                 head_dim=head_dim,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(section),
                                                  "interleaved": True})
    rotary = q3.Qwen3OmniMoeThinkerTextRotaryEmbedding(cfg)
    T = 23
    pos = _positions(T)
    q = torch.randn(1, 4, T, head_dim, dtype=dtype)
    k = torch.randn(1, 2, T, head_dim, dtype=dtype)
    cos, sin = rotary(q, pos[:, None, :])
    q_hf, k_hf = q3.apply_rotary_pos_emb(q, k, cos, sin)
    q_ours, k_ours = ref.mrope(q[0].transpose(0, 1), k[0].transpose(0, 1), pos, mrope_section=section,
                               interleaved=True, inplace=False)
    torch.testing.assert_close(q_ours, q_hf[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(k_ours, k_hf[0].transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("head_dim,section", [(128, (16, 24, 24)), (64, (8, 12, 12)), (32, (4, 6, 6))])
def test_reference_matches_qwen2_5_omni_multimodal_rotary(head_dim, section):
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTextConfig

    cfg = Qwen2_5OmniTextConfig(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=1,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                 "mrope_section": list(section)})
    rotary = q25.Qwen2_5OmniRotaryEmbedding(cfg)
    T = 19
    pos = _positions(T)
    q = torch.randn(1, 4, T, head_dim, dtype=torch.bfloat16)
    k = torch.randn(1, 2, T, head_dim, dtype=torch.bfloat16)
    cos, sin = rotary(q, pos[:, None, :])
    q_hf, k_hf = q25.apply_rotary_pos_emb(q, k, cos, sin)
    q_ours, k_ours = ref.mrope(q[0].transpose(0, 1), k[0].transpose(0, 1), pos, mrope_section=section,
                               interleaved=False, inplace=False)
    torch.testing.assert_close(q_ours, q_hf[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(k_ours, k_hf[0].transpose(0, 1), rtol=0, atol=0)


def test_reference_qk_norm_matches_thinker_attention_norms():
    cfg = Qwen3OmniMoeTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 rms_norm_eps=1e-6,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [6, 5, 5],
                                                  "interleaved": True})
    norm_q = q3.Qwen3OmniMoeThinkerTextRMSNorm(32, eps=1e-6).to(torch.bfloat16)
    norm_k = q3.Qwen3OmniMoeThinkerTextRMSNorm(32, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm_q.weight.normal_()
        norm_k.weight.normal_()
    rotary = q3.Qwen3OmniMoeThinkerTextRotaryEmbedding(cfg)
    T = 9
    pos = _positions(T)
    q = torch.randn(1, T, 4, 32, dtype=torch.bfloat16)
    k = torch.randn(1, T, 2, 32, dtype=torch.bfloat16)
    cos, sin = rotary(q, pos[:, None, :])
    q_hf, k_hf = q3.apply_rotary_pos_emb(norm_q(q).transpose(1, 2), norm_k(k).transpose(1, 2), cos, sin)
    q_ours, k_ours = ref.qk_norm_mrope(q[0], k[0], norm_q.weight, norm_k.weight, pos, eps=1e-6,
                                       mrope_section=(6, 5, 5), inplace=False)
    torch.testing.assert_close(q_ours, q_hf[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(k_ours, k_hf[0].transpose(0, 1), rtol=0, atol=0)


def test_one_d_positions_equal_three_equal_rows():
    q, k = torch.randn(7, 2, 32), torch.randn(7, 1, 32)
    p = torch.randint(0, 100, (7,))
    a = ref.mrope(q, k, p, mrope_section=(6, 5, 5), inplace=False)
    b = ref.mrope(q, k, p.expand(3, -1), mrope_section=(6, 5, 5), inplace=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- kernel vs reference -------------------------------------------------------------------------------------


def _check_kernel(T, Hq, Hk, D, section, interleaved, dtype, rows, norm, scaling=1.0, non_contiguous=False):
    qkv = torch.randn(T, Hq + 2 * Hk, D, dtype=dtype, device=DEVICE)
    q, k = (qkv[:, :Hq], qkv[:, Hq:Hq + Hk]) if non_contiguous else (qkv[:, :Hq].clone(), qkv[:, Hq:Hq + Hk].clone())
    pos = _positions(T, rows, device=DEVICE)
    kw = dict(mrope_section=section, interleaved=interleaved, attention_scaling=scaling)
    args = (torch.randn(D, dtype=dtype, device=DEVICE), torch.randn(D, dtype=dtype, device=DEVICE)) if norm else ()
    fn = ref.qk_norm_mrope if norm else ref.mrope
    exact = fn(q.double(), k.double(), *(a.double() for a in args), pos, inplace=False, **kw)
    same = fn(q, k, *args, pos, inplace=False, **kw)
    op = omni_fast.ops.qk_norm_mrope if norm else omni_fast.ops.mrope
    q_in, k_in = q.clone(), k.clone()
    out = op(q, k, *args, pos, backend="triton", **kw)
    assert out[0].data_ptr() == q.data_ptr() and out[1].data_ptr() == k.data_ptr()
    for name, o, e, s in (("q", out[0], exact[0], same[0]), ("k", out[1], exact[1], same[1])):
        assert_matches_reference(o, e, s, name=name)
    if non_contiguous:  # the v slice between/after q and k is untouched
        assert torch.equal(qkv[:, Hq + Hk:], qkv[:, Hq + Hk:])
    return q_in, k_in


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("interleaved", [True, False])
def test_kernel_thinker_shapes(dtype, norm, interleaved):
    _check_kernel(5, 32, 4, 128, (24, 20, 20), interleaved, dtype, 3, norm)


@pytest.mark.parametrize("T", [0, 1, 3])
def test_kernel_edge_token_counts(T):
    _check_kernel(T, 3, 1, 64, (12, 10, 10), True, torch.float32, 3, False)
    _check_kernel(T, 3, 1, 64, (12, 10, 10), True, torch.float32, 1, True)


def test_kernel_strided_views_of_a_fused_qkv_buffer():
    _check_kernel(6, 4, 2, 32, (6, 5, 5), True, torch.float16, 3, True, non_contiguous=True)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 9), Hq=st.integers(1, 6), Hk=st.integers(1, 3), half=st.sampled_from([3, 8, 13, 16, 36]),
       interleaved=st.booleans(), rows=st.sampled_from([1, 3]), norm=st.booleans(),
       dtype=st.sampled_from(KERNEL_DTYPES), scaling=st.sampled_from([1.0, 0.7]), data=st.data())
def test_kernel_random_shapes(T, Hq, Hk, half, interleaved, rows, norm, dtype, scaling, data):
    s_h = data.draw(st.integers(0, half))
    s_w = data.draw(st.integers(0, half - s_h))
    _check_kernel(T, Hq, Hk, 2 * half, (half - s_h - s_w, s_h, s_w), interleaved, dtype, rows, norm, scaling)


def test_backends_agree_and_context_manager_selects():
    q, k = torch.randn(4, 2, 32, device=DEVICE), torch.randn(4, 1, 32, device=DEVICE)
    pos = _positions(4, device=DEVICE)
    with omni_fast.use_backend("reference"):
        a = omni_fast.ops.mrope(q, k, pos, mrope_section=(6, 5, 5), inplace=False)
    with omni_fast.use_backend("triton"):
        b = omni_fast.ops.mrope(q, k, pos, mrope_section=(6, 5, 5), inplace=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_not_inplace_leaves_inputs():
    q, k = torch.randn(4, 2, 32, device=DEVICE), torch.randn(4, 1, 32, device=DEVICE)
    q0, k0 = q.clone(), k.clone()
    omni_fast.ops.mrope(q, k, _positions(4, device=DEVICE), mrope_section=(6, 5, 5), inplace=False, backend="triton")
    assert torch.equal(q, q0) and torch.equal(k, k0)


def test_traces_under_torch_compile():
    q, k = torch.randn(4, 2, 32), torch.randn(4, 1, 32)
    pos = _positions(4)

    def f(q, k, pos):
        q2, k2 = omni_fast.ops.mrope(q, k, pos, mrope_section=(6, 5, 5), inplace=False, backend="reference")
        return q2 * 2, k2

    out = torch.compile(f, fullgraph=True, backend="eager")(q, k, pos)
    exp = f(q, k, pos)
    torch.testing.assert_close(out, exp)


# --- bad input -----------------------------------------------------------------------------------------------


def _call(**over):
    args = dict(q=torch.randn(4, 2, 32), k=torch.randn(4, 1, 32), positions=torch.randint(0, 9, (3, 4)),
                mrope_section=(6, 5, 5))
    args.update(over)
    return omni_fast.ops.mrope(args.pop("q"), args.pop("k"), args.pop("positions"), **args, backend="reference")


@pytest.mark.parametrize("over,exc,match", [
    (dict(mrope_section=(6, 5, 6)), ValueError, "mrope_section must sum"),
    (dict(mrope_section=(16,)), ValueError, "mrope_section must be 3"),
    (dict(positions=torch.randint(0, 9, (2, 4))), ValueError, "positions must have 3 rows"),
    (dict(positions=torch.randint(0, 9, (3, 5))), ValueError, "one entry per token"),
    (dict(positions=torch.rand(3, 4)), TypeError, "positions must be an integer"),
    (dict(k=torch.randn(5, 1, 32)), ValueError, "k must have shape"),
    (dict(k=torch.randn(4, 1, 32, dtype=torch.float16)), TypeError, "same dtype"),
    (dict(q=torch.randint(0, 3, (4, 2, 32))), TypeError, "q must have dtype"),
    (dict(q=torch.randn(4, 2, 31), k=torch.randn(4, 1, 31)), ValueError, "even"),
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
])
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        omni_fast.ops.mrope(torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.zeros(1, dtype=torch.long),
                            mrope_section=(2, 1, 1), backend="numba")
    with pytest.raises(ValueError, match="use_backend"):
        with omni_fast.use_backend("fast"):
            pass
    # not a str at all: a TypeError naming the argument (was a ValueError)
    with pytest.raises(TypeError, match="backend must be a str"):
        omni_fast.ops.mrope(torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.zeros(1, dtype=torch.long),
                            mrope_section=(2, 1, 1), backend=3)
    with pytest.raises(TypeError, match=r"use_backend\(name\) must be a str"):
        with omni_fast.use_backend(3):
            pass


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU-only behaviour")
def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        omni_fast.ops.mrope(torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.zeros(1, dtype=torch.long),
                            mrope_section=(2, 1, 1), backend="cuda")


def test_environment_variable_selects_backend(monkeypatch):
    from omni_fast.backend import requested_backend

    monkeypatch.setenv("OMNI_FAST_BACKEND", "reference")
    assert requested_backend() == "reference"
    with omni_fast.use_backend("triton"):
        assert requested_backend() == "triton"
        assert requested_backend("cuda") == "cuda"
    monkeypatch.setenv("OMNI_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="OMNI_FAST_BACKEND"):
        requested_backend()


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_real_shapes_on_gpu(T, dtype):
    # Thinker (32/4) with 3-row positions, talker (16/2) and MTP (16/8) with 1-D positions, D 128.
    _check_kernel(T, 32, 4, 128, (24, 20, 20), True, dtype, 3, True)
    _check_kernel(T, 16, 2, 128, (24, 20, 20), True, dtype, 3, True)
    _check_kernel(T, 16, 8, 128, (24, 20, 20), True, dtype, 1, True)


def test_use_backend_block_traces_under_torch_compile():
    q, k = torch.randn(4, 2, 32), torch.randn(4, 1, 32)
    pos = _positions(4)

    def f(q, k, pos):
        return omni_fast.ops.mrope(q, k, pos, mrope_section=(6, 5, 5), inplace=False)[0] * 2

    with omni_fast.use_backend("reference"):
        out = torch.compile(f, fullgraph=True, backend="eager")(q, k, pos)
        torch.testing.assert_close(out, f(q, k, pos))


def test_inference_only_ops_refuse_to_record_autograd():
    q = torch.randn(3, 2, 32, requires_grad=True)
    k = torch.randn(3, 1, 32)
    pos = _positions(3)
    with pytest.raises(ValueError, match="inference-only.*q require grad"):
        omni_fast.ops.mrope(q * 1, k, pos, mrope_section=(6, 5, 5), backend="reference")
    w = torch.ones(32, requires_grad=True)
    with pytest.raises(ValueError, match="q_weight"):
        omni_fast.ops.qk_norm_mrope(q.detach().clone(), k, w, w.detach(), pos, mrope_section=(6, 5, 5),
                                    backend="reference")
    with torch.no_grad():
        omni_fast.ops.mrope(q * 1, k, pos, mrope_section=(6, 5, 5), backend="reference")


def test_overlapping_inplace_outputs_are_refused():
    q = torch.randn(3, 1, 32).expand(3, 4, 32)  # four heads aliasing one
    with pytest.raises(ValueError, match="q has internally overlapping memory"):
        omni_fast.ops.mrope(q, torch.randn(3, 1, 32), _positions(3), mrope_section=(6, 5, 5), backend="reference")
    out, _ = omni_fast.ops.mrope(q, torch.randn(3, 1, 32), _positions(3), mrope_section=(6, 5, 5), inplace=False,
                                 backend="reference")
    assert out.shape == (3, 4, 32)


def test_non_integer_sections_are_refused():
    with pytest.raises(ValueError, match="mrope_section must be 3 non-negative ints"):
        _call(mrope_section=(6.0, 5, 5))
