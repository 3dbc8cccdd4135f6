"""Quantized-experts reference: our dequantization equals compressed-tensors' own; the container's validation."""

import pytest
import torch

from omni_fast.ops.quant import QuantizedExperts
from omni_fast.reference import moe_quant as rq

ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
ct_pack = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_dequant_matches_compressed_tensors(group, symmetric):
    torch.manual_seed(0)
    N, K = 37, 2 * group + (group if group == 32 else 0)
    w = torch.randn(N, K)
    packed, scale, zero = rq.quantize_int4(w, group, symmetric)
    # Our packing is compressed-tensors' packing of the same int values.
    q = rq.unpack_int4(packed, K)
    assert torch.equal(packed, ct_pack.pack_to_int32(q, 4))
    assert torch.equal(ct_pack.unpack_from_int32(packed, 4, torch.Size([N, K])), q)
    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=group, symmetric=symmetric)
    theirs = ct_forward.dequantize(q, scale, zero, args=args, dtype=torch.float32)
    ours = rq.dequantize_int4(packed, scale, zero, group, K)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if not symmetric:  # the checkpoint packs zero points along the output dim; unpacking gives ours back
        zp_packed = ct_pack.pack_to_int32(zero, 4, packed_dim=0)
        assert torch.equal(ct_pack.unpack_from_int32(zp_packed, 4, zero.shape, packed_dim=0), zero)


@pytest.mark.parametrize("block", [(128, 128), (16, 32)])
def test_fp8_block_dequant_matches_compressed_tensors(block):
    torch.manual_seed(1)
    N, K = 200, 300  # neither a multiple of the block: partial edge blocks
    w = torch.randn(N, K) * 3
    q, scale = rq.quantize_fp8_block(w, block)
    assert scale.shape == (-(-N // block[0]), -(-K // block[1]))
    args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=list(block))
    theirs = ct_forward.dequantize(q, scale, None, args=args, dtype=torch.float32)
    ours = rq.dequantize_fp8_block(q, scale, block)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # quantization error of e4m3 (3 mantissa bits): at most half a step, 2^-4 relative
    assert ((ours - w).abs() <= w.abs() * 2 ** -4 + scale.max() * 2 ** -9).all()


def test_fake_quant_fp8_groups():
    x = torch.randn(5, 70)
    x[1] = 0
    y = rq.fake_quant_fp8_groups(x, 32)
    assert torch.isfinite(y).all() and (y[1] == 0).all()
    # each group's largest magnitude is exactly representable (it maps to 448)
    for g in range(3):
        xs, ys = x[:, g * 32:(g + 1) * 32], y[:, g * 32:(g + 1) * 32]
        i = xs.abs().argmax(1)
        torch.testing.assert_close(ys.gather(1, i[:, None]), xs.gather(1, i[:, None]), rtol=1e-6, atol=0)
    assert ((y - x).abs() <= x.abs() * 2 ** -4 + 1e-6).all()


def _fp8_parts(E=2, inter=48, hidden=64, block=(32, 32)):
    w13, w2 = torch.randn(E, 2 * inter, hidden), torch.randn(E, hidden, inter)
    return rq.quantize_experts(w13, w2, "fp8_block", block=block)


def _int4_parts(E=2, inter=64, hidden=96, group=32, symmetric=False):
    w13, w2 = torch.randn(E, 2 * inter, hidden), torch.randn(E, hidden, inter)
    return rq.quantize_experts(w13, w2, "int4_w4a16", group_size=group, symmetric=symmetric)


def test_container_shapes_and_roundtrip():
    q = _fp8_parts()
    assert q.shape == (2, 48, 64) and q.w13_scale.shape == (2, 4, 2)
    w13, w2 = rq.dequantize_experts(q)
    assert w13.shape == (2, 96, 64) and w2.shape == (2, 64, 48)
    q4 = _int4_parts()
    assert q4.w13.shape == (2, 128, 12) and q4.w13_zero.shape == (2, 128, 3) and not q4.symmetric
    assert q4.nbytes() < 2 * 128 * 96  # well under one byte per weight
    assert "int4_w4a16" in repr(q4) and q4.select(1).num_experts == 1


def _replace(q, **kw):
    fields = dict(format=q.format, w13=q.w13, w2=q.w2, w13_scale=q.w13_scale, w2_scale=q.w2_scale,
                  w13_zero=q.w13_zero, w2_zero=q.w2_zero, block=q.block, group_size=q.group_size,
                  symmetric=q.symmetric, w13_input_scale=q.w13_input_scale, w2_input_scale=q.w2_input_scale)
    fields.update(kw)
    return QuantizedExperts(**fields)


def test_container_validation_names_the_argument():
    q = _fp8_parts()
    with pytest.raises(ValueError, match="w13_scale"):
        _replace(q, w13_scale=q.w13_scale[:, :3].contiguous())
    with pytest.raises(ValueError, match="w2_scale"):
        _replace(q, w2_scale=q.w2_scale[:, :, :1].contiguous())
    with pytest.raises(TypeError, match="w13 must have dtype"):
        _replace(q, w13=q.w13.float())
    with pytest.raises(ValueError, match="block_k"):
        _replace(q, block=(32, 24))
    with pytest.raises(ValueError, match="format"):
        _replace(q, format="nf4")
    with pytest.raises(ValueError, match="w13_zero"):
        _replace(q, w13_zero=torch.zeros(1, dtype=torch.int8))
    q4 = _int4_parts()
    with pytest.raises(ValueError, match="group_size 64 must divide"):
        _replace(q4, group_size=64)
    with pytest.raises(ValueError, match="group_size must be a power of two"):
        _replace(q4, group_size=48)
    with pytest.raises(TypeError, match="w13 must have dtype"):
        _replace(q4, w13=q4.w13.to(torch.int64))
    with pytest.raises(TypeError, match="w2 must have dtype"):
        _replace(q4, w2=q4.w2.view(torch.float32))
    with pytest.raises(ValueError, match="w13_zero given with a symmetric scheme"):
        _replace(q4, symmetric=True)
    with pytest.raises(ValueError, match="required by an asymmetric"):
        _replace(q4, w2_zero=None)
    with pytest.raises(ValueError, match="w13_scale"):
        _replace(q4, w13_scale=q4.w13_scale[:, :, :2].contiguous())
    with pytest.raises(TypeError, match="w2_zero"):
        _replace(q4, w2_zero=q4.w2_zero.to(torch.int32))
    with pytest.raises(ValueError, match="block is for fp8_block"):
        _replace(q4, block=(128, 128))


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_channel_dequant_matches_compressed_tensors(strategy):
    torch.manual_seed(2)
    N, K = 37, 83
    w = torch.randn(N, K) * 2
    q, scale = rq.quantize_fp8_channel(w, per_tensor=strategy == "tensor")
    # compressed-tensors' own scale shapes: [N, 1] per channel, [1] per tensor
    ct_scale = scale.reshape(N, 1) if strategy == "channel" else scale.reshape(1)
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True)
    theirs = ct_forward.dequantize(q, ct_scale, None, args=args, dtype=torch.float32)
    torch.testing.assert_close(rq.dequantize_fp8_channel(q, scale), theirs, rtol=0, atol=0)
    # and their quantization of w with that scale is ours
    assert torch.equal(ct_forward.quantize(w, ct_scale, None, args=args, dtype=torch.float8_e4m3fn).view(torch.uint8),
                       q.view(torch.uint8))


def test_fp8_activation_fake_quant_matches_compressed_tensors():
    """Dynamic per-token (FP8_DYNAMIC's input_activations) and static per-tensor (FP8's, input_scale)."""
    torch.manual_seed(3)
    x = torch.randn(6, 70) * 3
    x[2] = 0
    token = QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
    scale = (x.abs().amax(-1, keepdim=True).clamp(min=rq.FP8_EPS) / rq.FP8_MAX)
    theirs = ct_forward.fake_quantize(x, scale, None, token)
    torch.testing.assert_close(rq.fake_quant_fp8_groups(x, x.shape[1]), theirs, rtol=0, atol=0)
    tensor = QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True)
    s = torch.tensor([0.004])
    torch.testing.assert_close(rq.fake_quant_fp8_static(x, s), ct_forward.fake_quantize(x, s, None, tensor),
                               rtol=0, atol=0)


def test_fp8_channel_container_validation():
    w13, w2 = torch.randn(3, 64, 48), torch.randn(3, 48, 32)
    q = rq.quantize_experts(w13, w2, "fp8_channel", per_tensor=True)
    assert q.w2_scale.stride(1) == 0 and q.shape == (3, 32, 48)  # per-tensor scales: broadcast views, no copy
    w13d, _ = rq.dequantize_experts(q)
    torch.testing.assert_close(w13d, w13, rtol=2 ** -4, atol=1e-6)
    with pytest.raises(ValueError, match="w13_scale must have shape"):
        _replace(q, w13_scale=torch.ones(3, 64))
    with pytest.raises(TypeError, match="w2_scale must have dtype"):
        _replace(q, w2_scale=q.w2_scale.half())
    half = _replace(q, w13_input_scale=torch.ones(3))  # each GEMM static or dynamic on its own
    assert not half.static_input and "static/dynamic per token" in repr(half)
    with pytest.raises(ValueError, match="w2_input_scale must have shape"):
        _replace(q, w13_input_scale=torch.ones(3), w2_input_scale=torch.ones(1))
    with pytest.raises(ValueError, match="input_scale are for fp8_channel"):
        _replace(_fp8_parts(), w13_input_scale=torch.ones(2), w2_input_scale=torch.ones(2))
    with pytest.raises(ValueError, match="not used by fp8_channel"):
        _replace(q, block=(128, 128))
    assert "dynamic per token" in repr(q)
