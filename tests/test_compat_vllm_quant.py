"""omni_fast.compat.vllm.fused_experts with vLLM v0.11's quantized ``quant_config`` (FP8 W8A8 block / channel /
tensor, INT4 W4A16 with and without zero points), in vLLM's weight layouts.

The expected values are written out densely here from vLLM's documented layouts (fp64 dequantized weights,
activations fake-quantized to e4m3 the way the scheme says); no vLLM code and none of omni-fast's repacking is used.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from omni_fast.compat import vllm
from omni_fast.testing import DEVICE

E, H, INTER, T, K_TOP = 4, 80, 32, 7, 2


def _cfg(**kw):
    base = dict(use_fp8_w8a8=False, use_int4_w4a16=False, use_int8_w8a8=False, use_int8_w8a16=False,
                per_act_token_quant=False, block_shape=None, w1_scale=None, w2_scale=None, w1_zp=None, w2_zp=None,
                a1_scale=None, a2_scale=None, w1_bias=None, w2_bias=None, ocp_mx_scheme=None)
    base.update(kw)
    return SimpleNamespace(**base)


def _fq(v, s):
    """e4m3 fake quantization of fp64 ``v`` with scales ``s`` (broadcast)."""
    return (v / s).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s


def per_token(v, e):
    return _fq(v, v.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 448)


def per_group(bk):
    def q(v, e):
        n, k = v.shape
        g = torch.nn.functional.pad(v.abs(), (0, -k % bk)).reshape(n, -1, bk).amax(-1).clamp(min=1e-10) / 448
        return _fq(v, g.repeat_interleave(bk, -1)[:, :k])
    return q


def static(scale):
    return lambda v, e: _fq(v, scale.double().reshape(()))


def dense(x, w1, w2, weights, ids, qa1=None, qa2=None, expert_map=None):
    """fp64 routed SwiGLU experts on dequantized weights, inputs of each GEMM fake-quantized by qa1 / qa2."""
    x, w1, w2 = x.double(), w1.double(), w2.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) if expert_map is None else int(expert_map[int(ids[t, j])])
            if e < 0:
                continue
            xin = x[t:t + 1] if qa1 is None else qa1(x[t:t + 1], e)
            h = xin @ w1[e].T
            a = torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:]
            a = a if qa2 is None else qa2(a, e)
            out[t] += float(weights[t, j]) * (a @ w2[e].T)[0]
    return out


def _routing(seed=0, num_experts=E):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w = torch.rand(T, K_TOP, generator=g)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:K_TOP] for _ in range(T)]).int()
    return x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE)


def _fp8(w, scale):
    return (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)


def _close(out, exp, tol=1e-2):
    assert out.shape == exp.shape and torch.isfinite(out).all()
    rel = (out.double() - exp).pow(2).mean().sqrt() / exp.pow(2).mean().sqrt()
    assert rel < tol, f"relative RMS error {rel:.2e}"


# --- FP8 W8A8 ------------------------------------------------------------------------------------------------------


def _fp8_block_weights(bn, bk, seed=1):
    g = torch.Generator().manual_seed(seed)
    deq, packed, scales = [], [], []
    for n, k in ((2 * INTER, H), (H, INTER)):
        s = torch.rand(E, -(-n // bn), -(-k // bk), generator=g) * 0.01 + 0.002
        full = s.repeat_interleave(bn, 1)[:, :n].repeat_interleave(bk, 2)[:, :, :k]
        q = _fp8(torch.randn(E, n, k, generator=g) * k ** -0.5, full)
        packed.append(q.to(DEVICE)), scales.append(s.to(DEVICE)), deq.append(q.double() * full.double())
    return packed, scales, deq


def test_fp8_block():
    bn, bk = 16, 32
    (w1, w2), (s1, s2), (d1, d2) = _fp8_block_weights(bn, bk)
    x, w, ids = _routing()
    cfg = _cfg(use_fp8_w8a8=True, quant_dtype=torch.float8_e4m3fn, block_shape=[bn, bk], w1_scale=s1, w2_scale=s2)
    out = vllm.fused_experts(x, w1, w2, w, ids, quant_config=cfg)
    _close(out, dense(x, d1, d2, w, ids, per_group(bk), per_group(bk)))


def _fp8_channel_weights(per_tensor, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, k in ((2 * INTER, H), (H, INTER)):
        s = torch.rand(E, 1 if per_tensor else n, generator=g) * 0.01 + 0.002
        q = _fp8(torch.randn(E, n, k, generator=g) * k ** -0.5, s[:, :, None])
        out.append((q.to(DEVICE), s.squeeze(1).to(DEVICE) if per_tensor else s.to(DEVICE),
                    q.double() * s[:, :, None].double()))
    return out


@pytest.mark.parametrize("scale_shape", ["[E,N]", "[E,N,1]"])
def test_fp8_per_channel_per_token(scale_shape):
    (w1, s1, d1), (w2, s2, d2) = _fp8_channel_weights(False)
    if scale_shape == "[E,N,1]":
        s1, s2 = s1[..., None], s2[..., None]
    x, w, ids = _routing(3)
    cfg = _cfg(use_fp8_w8a8=True, per_act_token_quant=True, w1_scale=s1, w2_scale=s2)
    _close(vllm.fused_experts(x, w1, w2, w, ids, quant_config=cfg), dense(x, d1, d2, w, ids, per_token, per_token))


def test_fp8_per_tensor_static_and_expert_map():
    (w1, s1, d1), (w2, s2, d2) = _fp8_channel_weights(True)
    a1, a2 = torch.tensor([3.0 / 448], device=DEVICE), torch.tensor([0.3 / 448], device=DEVICE)
    x, w, ids = _routing(4, num_experts=6)
    emap = torch.tensor([-1, 0, 1, -1, 2, 3], dtype=torch.int32, device=DEVICE)
    cfg = _cfg(use_fp8_w8a8=True, w1_scale=s1, w2_scale=s2, a1_scale=a1, a2_scale=a2)
    out = vllm.fused_experts(x, w1, w2, w, ids, global_num_experts=6, expert_map=emap, quant_config=cfg)
    _close(out, dense(x, d1, d2, w, ids, static(a1), static(a2), expert_map=emap))


# Dynamic per-tensor activations (vLLM's per-tensor path without per_act_token_quant): vLLM's formula in full in
# tests/test_compat_vllm_quant_pertensor.py.


# --- INT4 W4A16 ----------------------------------------------------------------------------------------------------


def _int4_weights(group, zero_points, scale_dtype, seed=6):
    """vLLM's layout: uint8 [E, N, K/2] (low nibble = even k), scales [E, N, K/g], zp uint8 [E, N/2, K/g]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, k in ((2 * INTER, H), (H, INTER)):
        u = torch.randint(0, 16, (E, n, k), generator=g, dtype=torch.uint8)
        s = (torch.rand(E, n, k // group, generator=g) * 0.02 / (k ** 0.5) + 0.01 / k ** 0.5).to(scale_dtype)
        zp = torch.randint(0, 16, (E, n, k // group), generator=g, dtype=torch.uint8) if zero_points else None
        z = zp.double() if zero_points else torch.full((E, n, k // group), 8.0, dtype=torch.float64)
        deq = (u.double() - z.repeat_interleave(group, -1)) * s.double().repeat_interleave(group, -1)
        packed = u[..., 0::2] | (u[..., 1::2] << 4)
        zpp = None if zp is None else (zp[:, 0::2] | (zp[:, 1::2] << 4)).to(DEVICE)
        out.append((packed.to(DEVICE), s.to(DEVICE), zpp, deq))
    return out


@pytest.mark.parametrize("group,zero_points,dtype", [(16, False, torch.float32), (16, True, torch.float32),
                                                     (16, True, torch.float16)])
def test_int4_w4a16(group, zero_points, dtype):
    (w1, s1, z1, d1), (w2, s2, z2, d2) = _int4_weights(group, zero_points, dtype)
    x, w, ids = _routing(7)
    x = x.to(dtype)
    cfg = _cfg(use_int4_w4a16=True, block_shape=[0, group], w1_scale=s1, w2_scale=s2, w1_zp=z1, w2_zp=z2)
    out = vllm.fused_experts(x, w1, w2, w, ids, quant_config=cfg)
    assert out.dtype == dtype
    exp = dense(x, d1, d2, w, ids)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exp, rtol=1e-4, atol=1e-4)
    else:
        _close(out, exp, tol=5e-3)


# --- bad input -------------------------------------------------------------------------------------------------


def _bad_calls():
    (w1, s1, d1), (w2, s2, d2) = _fp8_channel_weights(False)
    (b1, bs1, _, _), (b2, bs2, _, _) = _int4_weights(16, False, torch.float32)
    z = torch.zeros(E, INTER, H // 16, dtype=torch.uint8, device=DEVICE)
    x, w, ids = _routing()
    fp8 = dict(use_fp8_w8a8=True, per_act_token_quant=True, w1_scale=s1, w2_scale=s2)
    int4 = dict(use_int4_w4a16=True, block_shape=[0, 16], w1_scale=bs1, w2_scale=bs2)
    run = (lambda a, b, **kw: (lambda: vllm.fused_experts(x, a, b, w, ids, quant_config=_cfg(**kw))))
    one = torch.ones(1, device=DEVICE)
    return [
        (run(w1.float(), w2, **fp8), TypeError, "w1 must have dtype"),
        (run(w1, w2, **dict(fp8, w1_scale=s1[:, :5])), ValueError, "w1_scale must have shape"),
        (run(w1, w2, **dict(fp8, w2_scale=s2.half())), TypeError, "w2_scale must have dtype"),
        (run(w1, w2, **dict(fp8, a1_scale=one.repeat(2), a2_scale=one)), ValueError, "a1_scale must hold one"),
        (run(w1, w2, **dict(fp8, a1_scale=one.half(), a2_scale=one)), TypeError, "a1_scale must have dtype"),
        (run(w1, w2, **dict(fp8, w2_scale=None)), ValueError, "w2_scale is required"),
        (run(w1, w2, **dict(fp8, per_act_token_quant=False, block_shape=[16, 24], w1_scale=s1[..., None])),
         ValueError, "block_shape"),
        (run(w1, w2, **dict(fp8, per_act_token_quant=False, block_shape=[16, 32])), ValueError,
         "w1_scale must have shape"),
        (run(b1.view(torch.int32), b2, **int4), TypeError, "w1 must have dtype"),
        (run(b1, b2, **dict(int4, block_shape=None)), ValueError, "block_shape"),
        (run(b1, b2, **dict(int4, w1_scale=bs1[..., :3].contiguous())), ValueError, "w1_scale must have shape"),
        (run(b1, b2, **dict(int4, w1_zp=z[:, :3], w2_zp=z)), ValueError, "w1_zp must have shape"),
        (run(b1, b2, **dict(int4, w1_zp=z)), ValueError, "w1_zp and w2_zp"),
        (run(b1, b2, **dict(int4, a1_scale=one)), ValueError, "a1_scale"),
        (run(w1, w2, use_int8_w8a16=True, w1_scale=s1, w2_scale=s2), NotImplementedError, "use_int8_w8a16"),
        (run(w1, w2, **dict(fp8, w1_bias=one)), NotImplementedError, "w1_bias"),
    ]


@pytest.mark.parametrize("i", range(16))
def test_bad_quantized_input_names_the_argument(i):
    call, exc, match = _bad_calls()[i]
    with pytest.raises(exc, match=match):
        call()


def test_quantized_fused_experts_under_torch_compile():
    """The mapping (views, the zero-point unpack) and the quantized op trace into one graph."""
    (w1, s1, _), (w2, s2, _) = _fp8_channel_weights(True)
    (b1, bs1, z1, _), (b2, bs2, z2, _) = _int4_weights(16, True, torch.float32)
    x, w, ids = _routing(8)
    fp8 = _cfg(use_fp8_w8a8=True, w1_scale=s1, w2_scale=s2, a1_scale=torch.tensor([0.01], device=DEVICE))
    int4 = _cfg(use_int4_w4a16=True, block_shape=[0, 16], w1_scale=bs1, w2_scale=bs2, w1_zp=z1, w2_zp=z2)

    def f(x):
        return vllm.fused_experts(x, w1, w2, w, ids, quant_config=fp8) + vllm.fused_experts(x, b1, b2, w, ids,
                                                                                           quant_config=int4)

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x), rtol=0, atol=0)
