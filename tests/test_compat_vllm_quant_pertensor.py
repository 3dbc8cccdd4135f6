"""omni_fast.compat.vllm.fused_experts, FP8 W8A8 per tensor (no block_shape) with dynamic activations: vLLM 0.34
quantizes them per tensor unless per_act_token_quant.

vLLM's formula, as read in its source (``fused_moe.py`` ``fused_experts_impl`` -> ``moe_kernel_quantize_input``
-> ``scaled_fp8_quant(A, None, use_per_token_if_dynamic=False)`` -> ``dynamic_scaled_fp8_quant`` in
``csrc/quantization/w8a8/fp8/common.cu``), written out in plain torch below (no vLLM or omni-fast code):

- GEMM1's input is the whole ``hidden_states [T, H]`` (every token, routed or not): ``s1 = amax(|x|) / 448``
  (fp32, no floor), ``q = e4m3(clamp(x * (1 / s1), -448, 448))``; the kernel's fp32 dot is scaled by ``s1`` and
  the expert's weight scale, stored in the model dtype; SiLU-and-mul in the model dtype.
- GEMM2's input is that intermediate ``[T*k, I]``: ``s2 = amax / 448`` over it. Rows of pairs vLLM skips (id -1,
  ids past the last expert, remote experts) were never written there (``torch.empty``), so vLLM's amax reads
  undefined memory; here (and in the expectation) they count as zeros.
"""

from __future__ import annotations

import pytest
import torch

import omni_fast
from omni_fast.compat import vllm
from omni_fast.ops import QuantizedExperts
from omni_fast.testing import DEVICE, HostSyncs
from test_compat_vllm_quant import E, H, INTER, K_TOP, T, _cfg, _fp8_channel_weights

F8 = torch.float8_e4m3fn


def _q(v, s):
    """vLLM's per-tensor fp8 quantization (dequantized) of fp32 ``v`` with fp32 scale ``s``."""
    inv = 1.0 / s if float(s) > 0 else torch.zeros_like(s)
    return (v.float() * inv).clamp(-448, 448).to(F8).float() * s


def vllm_per_tensor(x, w1, s1w, w2, s2w, weights, ids, a1=None, a2=None, expert_map=None, per_token_act=False):
    """vLLM's fused_experts with per-tensor dynamic (or static a1 / a2) activation scales, plain torch in fp32.
    w1/w2 e4m3, s1w/s2w fp32 ``[E]`` weight scales; ids outside ``[0, E_global)`` or remote skipped."""
    E_global = expert_map.numel() if expert_map is not None else w1.shape[0]
    pairs = []
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            g = int(ids[t, j])
            e = -1 if not 0 <= g < E_global else (g if expert_map is None else int(expert_map[g]))
            pairs.append((t, j, e))

    def quant(v, static):
        if per_token_act:
            return torch.cat([_q(r[None], r.abs().amax().clamp(min=1e-10) / 448) for r in v]) if len(v) else v
        s = static.float().reshape(()) if static is not None else (v.float().abs().amax() if v.numel() else
                                                                  torch.zeros(())) / 448
        return _q(v, s)

    xq = quant(x, a1)
    inter = torch.zeros(len(pairs), INTER, dtype=x.dtype)  # skipped pairs: zeros (vLLM: never written)
    for p, (t, j, e) in enumerate(pairs):
        if e >= 0:
            h = (xq[t:t + 1] @ (w1[e].float() * s1w[e]).T).to(x.dtype)
            inter[p] = (torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:])[0]
    iq = quant(inter, a2)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for p, (t, j, e) in enumerate(pairs):
        if e >= 0:
            out[t] += float(weights[t, j]) * (iq[p:p + 1] @ (w2[e].float() * s2w[e]).T)[0]
    return out


def _spread_routing(seed, num_experts=E, T_=T):
    """Token magnitudes over four decades (per-token and per-tensor scales then differ measurably)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T_, H, generator=g) * torch.logspace(-3, 1, T_)[torch.randperm(T_, generator=g)][:, None]
    w = torch.rand(T_, K_TOP, generator=g)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:K_TOP] for _ in range(T_)]).int()
    return x, w, ids


def _weights(seed=2):
    (w1, s1, _), (w2, s2, _) = _fp8_channel_weights(True, seed)
    return w1, s1, w2, s2


def _run(x, w, ids, cfg, **kw):
    return vllm.fused_experts(x.to(DEVICE), w1_, w2_, w.to(DEVICE), ids.to(DEVICE), quant_config=cfg, **kw).cpu()


w1_, s1_, w2_, s2_ = _weights()
_CPU = [t.cpu() for t in (w1_, s1_, w2_, s2_)]


def _rel(a, b):
    return float((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt())


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_dynamic_per_tensor_is_vllms_formula(backend):
    """Both scales dynamic: equals vLLM's per-tensor formula within fp8 rounding (fp32 accumulation order), and
    differs from the per-token result by far more (so the test tells which one ran)."""
    x, w, ids = _spread_routing(11)
    cfg = _cfg(use_fp8_w8a8=True, w1_scale=s1_, w2_scale=s2_)
    with omni_fast.use_backend(backend):
        out = _run(x, w, ids, cfg)
    want = vllm_per_tensor(x, _CPU[0], _CPU[1], _CPU[2], _CPU[3], w, ids)
    tok = vllm_per_tensor(x, _CPU[0], _CPU[1], _CPU[2], _CPU[3], w, ids, per_token_act=True)
    err, gap = _rel(out, want), _rel(tok, want)
    assert err < 1e-3, err
    assert gap > 20 * max(err, 1e-4), (err, gap)


@pytest.mark.parametrize("which", ["a1 static", "a2 static"])
def test_mixed_static_and_dynamic(which):
    """Each GEMM on its own: a static scale where given, vLLM's dynamic per-tensor scale where not."""
    x, w, ids = _spread_routing(12)
    a = {"a1 static": dict(a1_scale=torch.tensor([2.5 / 448])), "a2 static": dict(a2_scale=torch.tensor([0.4 / 448]))}[which]
    cfg = _cfg(use_fp8_w8a8=True, w1_scale=s1_, w2_scale=s2_, **{k: v.to(DEVICE) for k, v in a.items()})
    want = vllm_per_tensor(x, *_CPU[:2], *_CPU[2:], w, ids, a1=a.get("a1_scale"), a2=a.get("a2_scale"))
    assert _rel(_run(x, w, ids, cfg), want) < 1e-3


def test_per_act_token_quant_stays_per_token():
    """per_act_token_quant=True (per-tensor weight scales too): activations per token, as vLLM's
    use_per_token_if_dynamic."""
    x, w, ids = _spread_routing(13)
    cfg = _cfg(use_fp8_w8a8=True, per_act_token_quant=True, w1_scale=s1_, w2_scale=s2_)
    out = _run(x, w, ids, cfg)
    assert _rel(out, vllm_per_tensor(x, *_CPU, w, ids, per_token_act=True)) < 1e-3
    assert _rel(out, vllm_per_tensor(x, *_CPU, w, ids)) > 1e-2


def test_skipped_pairs_and_expert_map():
    """GEMM1's scale is over all of hidden_states, including a token whose pairs are all skipped (vLLM quantizes
    hidden_states whole): its magnitude coarsens every other token's quantization. GEMM2's is over the routed pairs
    only (ids -1 / past the end / remote experts count as zeros)."""
    x, w, ids = _spread_routing(14, num_experts=6)
    emap = torch.tensor([-1, 0, 1, -1, 2, 3], dtype=torch.int32)
    x[2] *= 1000.0
    ids[2] = torch.tensor([-1, 7], dtype=torch.int32)  # token 2: nothing routed, largest magnitude
    ids[4, 1] = 0  # a remote pair
    cfg = _cfg(use_fp8_w8a8=True, w1_scale=s1_, w2_scale=s2_)
    out = _run(x, w, ids, cfg, global_num_experts=6, expert_map=emap.to(DEVICE))
    want = vllm_per_tensor(x, *_CPU, w, ids, expert_map=emap)
    assert float(out[2].abs().max()) == 0.0
    assert _rel(out, want) < 1e-3
    # what a per-tensor amax over the routed tokens only would give: measurably not it
    routed = [t for t in range(T) if t != 2]
    alt = vllm_per_tensor(x[routed], *_CPU, w[routed], ids[routed], expert_map=emap)
    assert _rel(out[routed], alt) > 1e-2


def test_empty_batch_and_zero_input():
    """T = 0: no scale is computed (vLLM's amax of nothing is never read); an all-zero input (scale 0) gives zeros,
    as vLLM's ``acc * 0``."""
    cfg = _cfg(use_fp8_w8a8=True, w1_scale=s1_, w2_scale=s2_)
    empty = torch.empty(0, K_TOP)
    out = vllm.fused_experts(torch.empty(0, H, device=DEVICE), w1_, w2_, empty.to(DEVICE),
                             empty.int().to(DEVICE), quant_config=cfg)
    assert out.shape == (0, H)
    x, w, ids = _spread_routing(15)
    out = _run(torch.zeros_like(x), w, ids, cfg)
    assert bool(torch.isfinite(out).all()) and float(out.abs().max()) == 0.0


def test_container_carries_the_mode():
    """The mode is a plain str field of fp8_channel (the op passes it as a constant); bad values name it."""
    (w1, s1, _), (w2, s2, _) = _fp8_channel_weights(False)
    q = QuantizedExperts.fp8_channel(w1, w2, s1[..., None], s2[..., None], dynamic_scale="per_tensor")
    assert "dynamic per tensor" in repr(q) and q.select(1).dynamic_scale == "per_tensor"
    assert QuantizedExperts.fp8_channel(w1, w2, s1[..., None], s2[..., None]).dynamic_scale == "per_token"
    with pytest.raises(ValueError, match="dynamic_scale must be one of"):
        QuantizedExperts.fp8_channel(w1, w2, s1[..., None], s2[..., None], dynamic_scale="tensor")
    blk = torch.ones(E, 2 * INTER // 16, H // 16, device=DEVICE)
    with pytest.raises(ValueError, match="dynamic_scale='per_tensor' is for fp8_channel"):
        QuantizedExperts("fp8_block", w1, w2, blk, torch.ones(E, H // 16, INTER // 16, device=DEVICE),
                         block=(16, 16), dynamic_scale="per_tensor")


def test_under_torch_compile():
    x, w, ids = (t.to(DEVICE) for t in _spread_routing(16))
    cfg = _cfg(use_fp8_w8a8=True, w1_scale=s1_, w2_scale=s2_)

    def f(x):
        return vllm.fused_experts(x, w1_, w2_, w, ids, quant_config=cfg)

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x), rtol=0, atol=0)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the CPU's check (interpreter counter, HostSyncs)")
def test_two_reduction_launches_and_no_host_sync(cuda_like_validation):
    """Per-tensor dynamic activations cost one reduction launch per dynamic GEMM input (Triton, through the one
    launcher) and no PyTorch op, no host sync: 4 + 2 launches with both dynamic, 4 + 1 with a static a1."""
    from omni_fast.bench.costmodel.counter import count_launches, summarize

    x, w, ids = _spread_routing(17)
    for a1, extra in ((None, 2), (torch.tensor([0.01]), 1)):
        cfg = _cfg(use_fp8_w8a8=True, w1_scale=s1_, w2_scale=s2_, a1_scale=a1)

        def body():
            return vllm.fused_experts(x, w1_, w2_, w, ids, quant_config=cfg)

        assert summarize(count_launches(body)) == {"triton": 4 + extra, "torch": 0, "total": 4 + extra}
        with torch.no_grad(), HostSyncs(host_data=True) as syncs:
            body()
        assert not syncs.count, syncs.report()
