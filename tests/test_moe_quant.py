"""Quantized fused MoE (FP8 block W8A8, INT4 W4A16): the Triton kernels (the interpreter on CPU) vs the reference,
through the public ops; odd shapes, T = 0/1, several block / group sizes, expert_map, the talker's shared expert.

Tolerance (FlashAttention's rule, :func:`omni_fast.testing.assert_matches_reference`): the error against the
fp64 reference on the same quantized weights (fp8: and the same per-token-group activation quantization) is at
most 2x the error of that reference run in the kernel's dtype. The quantization itself is in both, so the bound
measures the kernel's arithmetic, not the format's loss.

FP8 W8A8 is compared by RMS error instead of max error: the activations are rounded to e4m3 (steps of 2^-4
relative), and a last-bit difference in an activation (another summation order in the gate/up GEMM) moves it to
the neighbouring e4m3 value. Such flips hit single elements of both the kernel and the same-dtype reference at
random places, so a max-error ratio is a coin toss between two flips, while the RMS error measures the whole
output's arithmetic (measured ratios 0.35-1.6 on the interpreter over seeds and block shapes).
"""

import pytest
import torch

from omni_fast import ops
from omni_fast.reference import moe_quant as rq
from omni_fast.testing import DEVICE, assert_matches_reference

DTYPES = [torch.float16, torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
if DEVICE.type == "cuda":
    DTYPES = [torch.float16, torch.float32, torch.bfloat16]

# (format, quantization kwargs, H, I): H and I odd where the format allows (fp8: any; int4: multiples of g).
CASES = [
    ("fp8_block", dict(block=(128, 128)), 200, 136),
    ("fp8_block", dict(block=(16, 32)), 100, 72),
    ("fp8_block", dict(block=(32, 64)), 70, 40),
    ("int4_w4a16", dict(group_size=32, symmetric=True), 96, 64),
    ("int4_w4a16", dict(group_size=32, symmetric=False), 96, 64),
    ("int4_w4a16", dict(group_size=128, symmetric=False), 256, 128),
    ("int4_w4a16", dict(group_size=16, symmetric=True), 80, 48),
    ("fp8_channel", dict(), 200, 136),
    ("fp8_channel", dict(per_tensor=True), 70, 40),
    ("fp8_channel", dict(static=True), 100, 72),
    ("fp8_channel", dict(per_tensor=True, static=True), 37, 24),
    ("fp8_channel", dict(static="w13"), 48, 40),  # static gate/up input, dynamic down input
]


def _ids(T, E, k):
    if T == 0:
        return torch.zeros(0, k, dtype=torch.int32, device=DEVICE)
    return torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(device=DEVICE, dtype=torch.int32)


def _experts(fmt, kw, E, H, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    kw = dict(kw)
    static = kw.pop("static", False)
    if static:  # static activation scales near amax/448 of randn inputs and of the SwiGLU rows
        grow = 1 + 0.1 * torch.arange(E, dtype=torch.float32)
        kw["input_scales"] = (3.0 / 448 * grow, None if static == "w13" else 0.4 / 448 * grow)
    q = rq.quantize_experts(w13, w2, fmt, **kw)
    return q if DEVICE.type == "cpu" else _to(q, DEVICE)


def _to(q, device):
    from omni_fast.ops.quant import QuantizedExperts

    mv = (lambda t: None if t is None else t.to(device))
    return QuantizedExperts(q.format, mv(q.w13), mv(q.w2), mv(q.w13_scale), mv(q.w2_scale), mv(q.w13_zero),
                            mv(q.w2_zero), q.block, q.group_size, q.symmetric, mv(q.w13_input_scale),
                            mv(q.w2_input_scale), dynamic_scale=q.dynamic_scale)


def _check(out, x, q, weights, ids, expert_map=None):
    exact = rq.fused_moe(x.double(), q, weights.double(), ids, expert_map=expert_map)
    same = rq.fused_moe(x, q, weights, ids, expert_map=expert_map)
    _assert_matches(q.format, out, exact, same)


def _assert_matches(fmt, out, exact, same, factor=2.0):
    if not fmt.startswith("fp8") or out.numel() == 0:
        assert_matches_reference(out, exact, same, factor=factor, name=fmt)
        return
    assert out.shape == exact.shape and torch.isfinite(out).all()
    rms = (lambda d: d.double().pow(2).mean().sqrt().item())
    err, ref_err = rms(out.double() - exact), rms(same.double() - exact)
    atol = 2 * torch.finfo(out.dtype).eps * max(rms(exact), 1e-3)
    assert err <= factor * ref_err + atol, f"{fmt}: RMS error {err:.3e} > {factor} x {ref_err:.3e} + {atol:.1e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 7, 33])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_fused_moe_quant_matches_reference(case, T, dtype):
    fmt, kw, H, I = case
    torch.manual_seed(T)
    E, k = 5, 2
    q = _experts(fmt, kw, E, H, I)
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    weights = torch.rand(T, k, device=DEVICE).to(dtype)
    ids = _ids(T, E, k)
    out = ops.moe_experts(x, q, None, weights, ids, backend="triton")
    assert out.shape == (T, H) and out.dtype == dtype
    _check(out, x, q, weights, ids)
    ref_out = ops.moe_experts(x, q, None, weights, ids, backend="reference")
    torch.testing.assert_close(ref_out, rq.fused_moe(x, q, weights, ids))


@pytest.mark.parametrize("fmt,kw", [("fp8_block", dict(block=(16, 32))), ("int4_w4a16", dict(group_size=32))])
def test_fused_moe_quant_expert_map_and_out(fmt, kw):
    torch.manual_seed(3)
    E_local, E_global, k, T, H, I = 3, 6, 3, 9, 64, 32
    q = _experts(fmt, kw, E_local, H, I)
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32, device=DEVICE)
    x = torch.randn(T, H, device=DEVICE).half()
    weights = torch.rand(T, k, device=DEVICE).half()
    ids = _ids(T, E_global, k)
    out = torch.full((T, H), float("nan"), device=DEVICE, dtype=torch.float16)
    got = ops.moe_experts(x, q, None, weights, ids, expert_map=expert_map, out=out, backend="triton")
    assert got is out
    _check(out, x, q, weights, ids, expert_map)


@pytest.mark.parametrize("fmt,kw", [("fp8_block", dict(block=(16, 32))),
                                    ("int4_w4a16", dict(group_size=16, symmetric=False))])
def test_moe_block_quant_with_shared_expert(fmt, kw):
    torch.manual_seed(4)
    E, k, H, I, Is = 6, 2, 48, 32, 16
    q = _experts(fmt, kw, E, H, I)
    x = torch.randn(2, 5, H, device=DEVICE).half()
    gate = (torch.randn(E, H, device=DEVICE) * 0.3).half()
    sw13 = (torch.randn(2 * Is, H, device=DEVICE) * H ** -0.5).half()
    sw2 = (torch.randn(H, Is, device=DEVICE) * Is ** -0.5).half()
    sg = (torch.randn(1, H, device=DEVICE) * 0.3).half()
    kwargs = dict(shared_w13=sw13, shared_w2=sw2, shared_gate_weight=sg)
    out = ops.moe_block(x, gate, q, None, k, backend="triton", **kwargs)
    exact = rq.moe_block(x.double(), gate.double(), q, k, True, sw13.double(), sw2.double(), sg.double())
    same = rq.moe_block(x, gate, q, k, True, sw13, sw2, sg)
    assert out.shape == x.shape
    _assert_matches(fmt, out, exact, same)
    ref_out = ops.moe_block(x, gate, q, None, k, backend="reference", **kwargs)
    torch.testing.assert_close(ref_out, same)


def test_fused_moe_quant_bad_input():
    q = _experts("int4_w4a16", dict(group_size=32), 2, 64, 32)
    x = torch.randn(3, 64, device=DEVICE).half()
    w = torch.rand(3, 1, device=DEVICE).half()
    ids = torch.zeros(3, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="w2 must be None"):
        ops.moe_experts(x, q, q.w2, w, ids)
    with pytest.raises(ValueError, match="hidden size"):
        ops.moe_experts(torch.randn(3, 32, device=DEVICE).half(), q, None, w, ids)
    with pytest.raises(TypeError, match="hidden_states must have dtype"):
        ops.moe_experts(x.double(), q, None, w, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        ops.moe_experts(x, q, None, w, ids + 5)
    with pytest.raises(ValueError, match="w2 must be None"):
        ops.moe_block(x, torch.randn(2, 64, device=DEVICE).half(), q, q.w2, 1)


@pytest.mark.parametrize("fmt,kw", [("fp8_block", dict(block=(16, 32))), ("int4_w4a16", dict(group_size=16))])
def test_quantized_moe_block_traces_under_torch_compile(fmt, kw):
    """The container is unpacked into the custom op's tensor arguments: one graph, no break."""
    torch.manual_seed(5)
    E, k, H, I = 4, 2, 32, 16
    q = _experts(fmt, kw, E, H, I)
    g = (torch.randn(E, H, device=DEVICE) * 0.3).half()
    x = torch.randn(5, H, device=DEVICE).half()

    def f(x):
        return ops.moe_block(x, g, q, None, k, backend="triton")

    out = torch.compile(f, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, f(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 333, 4096])
@pytest.mark.parametrize("fmt,kw", [("fp8_block", dict(block=(128, 128))),
                                    ("int4_w4a16", dict(group_size=128, symmetric=False)),
                                    ("fp8_channel", dict()), ("fp8_channel", dict(per_tensor=True, static=True)),
                                    ("fp8_channel", dict(per_tensor=True, dynamic_scale="per_tensor"))],
                         ids=["fp8", "int4", "fp8ch", "fp8t-static", "fp8t-dynamic"])
def test_fused_moe_quant_real_shapes_bf16(fmt, kw, T):
    """The thinker's experts (E 128, top-8, H 2048, I 768) in bf16 on a GPU: decode, mid and prefill tiles
    (fp8t-dynamic: vLLM's dynamic per-tensor activations, the 256-partial scale reduction before each GEMM)."""
    torch.manual_seed(T)
    E, k, H, I = 128, 8, 2048, 768
    q = _experts(fmt, kw, E, H, I)
    x = torch.randn(T, H, device=DEVICE).bfloat16()
    weights = torch.rand(T, k, device=DEVICE).bfloat16()
    ids = _ids(T, E, k)
    out = ops.moe_experts(x, q, None, weights, ids, backend="triton")
    _check(out, x, q, weights, ids)
