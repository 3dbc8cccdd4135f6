"""vLLM v0.11's quant_config builders in omni_fast.compat.vllm (omni_fast/compat/vllm_config.py): vLLM's exact
signatures (written out below from ``vllm/model_executor/layers/fused_moe/config.py`` of the v0.11 line), vLLM's
property values for the same arguments, and ``fused_experts`` results bitwise equal to passing the same tensors in
an attribute object (the existing way, tests/test_compat_vllm_quant.py)."""

from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_compat_vllm_quant import E, H, INTER, _cfg, _fp8_block_weights, _fp8_channel_weights  # noqa: E402
from test_compat_vllm_quant import _int4_weights, _routing  # noqa: E402

from omni_fast.compat import vllm  # noqa: E402
from omni_fast.testing import DEVICE  # noqa: E402

# vLLM v0.11's parameters, in order, with their defaults (inspect.Parameter.empty = required)
_R = inspect.Parameter.empty
_G1 = [("gemm1_alpha", None), ("gemm1_beta", None), ("gemm1_clamp_limit", None)]
_G1_CLAMP_FIRST = [("gemm1_clamp_limit", None), ("gemm1_alpha", None), ("gemm1_beta", None)]
# vLLM 0.34.0's builder signatures (fused_moe/config.py of its sdist); mxfp4_w4a4 is v0.11's (gone in 0.34)
SIGNATURES = {
    "fp8_w8a8_moe_quant_config": [("w1_scale", _R), ("w2_scale", _R), ("a1_scale", None), ("a2_scale", None),
                                  ("w1_bias", None), ("w2_bias", None), ("per_act_token_quant", False),
                                  ("per_out_ch_quant", False), ("block_shape", None), ("a1_gscale", None),
                                  ("a2_gscale", None), ("g1_alphas", None), ("g2_alphas", None),
                                  ("is_scale_transposed", False)] + _G1,
    "int4_w4a16_moe_quant_config": [("w1_scale", _R), ("w2_scale", _R), ("w1_zp", None), ("w2_zp", None),
                                    ("w1_bias", None), ("w2_bias", None), ("block_shape", None), ("a1_gscale", None),
                                    ("a2_gscale", None)] + _G1_CLAMP_FIRST,
    "int8_w8a8_moe_quant_config": [("w1_scale", _R), ("w2_scale", _R), ("a1_scale", _R), ("a2_scale", _R),
                                   ("w1_bias", None), ("w2_bias", None), ("per_act_token_quant", False)],
    "int8_w8a16_moe_quant_config": [("w1_scale", _R), ("w2_scale", _R), ("w1_zp", None), ("w2_zp", None),
                                    ("w1_bias", None), ("w2_bias", None), ("block_shape", None), ("a1_gscale", None),
                                    ("a2_gscale", None)] + _G1_CLAMP_FIRST,
    "mxfp4_w4a4_moe_quant_config": [("w1_scale", _R), ("w2_scale", _R), ("a1_scale", None), ("a2_scale", None),
                                    ("w1_bias", None), ("w2_bias", None), ("block_shape", None)],
    "nvfp4_moe_quant_config": [("g1_alphas", _R), ("g2_alphas", _R), ("a1_gscale", _R), ("a2_gscale", _R),
                               ("w1_scale", _R), ("w2_scale", _R), ("w1_bias", None), ("w2_bias", None),
                               ("is_scale_swizzled", True)] + _G1,
    "biased_moe_quant_config": [("w1_bias", _R), ("w2_bias", _R)] + _G1,
}
MAKE = [("quant_dtype", None), ("per_act_token_quant", False), ("per_out_ch_quant", False), ("block_shape", None)] + [
    (n, None) for n in ("w1_scale", "w2_scale", "a1_scale", "a2_scale", "g1_alphas", "g2_alphas", "a1_gscale",
                        "a2_gscale", "w1_bias", "w2_bias", "w1_zp", "w2_zp", "weight_dtype")] + [
    ("is_scale_swizzled", True), ("is_scale_transposed", False)] + _G1


def test_v011_positional_builder_calls_still_work():
    """v0.11's positional orders: fp8 (w1_scale, w2_scale, a1_scale, a2_scale, per_act_token_quant,
    per_out_ch_quant, block_shape) and int4 (w1_scale, w2_scale, w1_zp, w2_zp, block_shape) give the configs of
    the keyword calls; a value given both ways is a TypeError."""
    s1, s2, a = torch.ones(2, 4), torch.ones(2, 3), torch.ones(1)
    old = vllm.fp8_w8a8_moe_quant_config(s1, s2, a, a, True, False)
    new = vllm.fp8_w8a8_moe_quant_config(s1, s2, a, a, per_act_token_quant=True)
    assert (old.per_act_token_quant, old.per_out_ch_quant, old.block_shape, old.w1_bias) == (True, False, None, None)
    assert old.per_act_token_quant == new.per_act_token_quant and old.a1_scale is a
    old = vllm.fp8_w8a8_moe_quant_config(s1, s2, None, None, False, False, [2, 16])
    assert old.block_shape == [2, 16] and not old.per_act_token_quant and old.w2_bias is None
    with pytest.raises(TypeError, match="block_shape given twice"):
        vllm.fp8_w8a8_moe_quant_config(s1, s2, None, None, False, False, [2, 16], block_shape=[2, 16])
    z = torch.zeros(2, 2, 1, dtype=torch.uint8)
    old = vllm.int4_w4a16_moe_quant_config(s1, s2, z, z, [0, 16])
    assert old.block_shape == [0, 16] and old.use_int4_w4a16 and old.w1_zp is z and old.w1_bias is None
    assert vllm.int4_w4a16_moe_quant_config(s1, s2).w1_zp is None  # 0.34: zero points optional


def test_new_arguments_are_stored_and_refused_by_fused_experts():
    """0.34's builders take biases and SwiGLU variants (gemm1_*); fused_experts refuses them, naming them."""
    x, w1, w2 = torch.randn(3, 32), torch.randn(2, 32, 32).to(torch.float8_e4m3fn), torch.randn(2, 32, 16).to(
        torch.float8_e4m3fn)
    w, ids = torch.full((3, 1), 1.0), torch.zeros(3, 1, dtype=torch.int32)
    cfg = vllm.fp8_w8a8_moe_quant_config(torch.ones(2), torch.ones(2), gemm1_clamp_limit=7.0)
    assert cfg.gemm1_clamp_limit == 7.0 and cfg.is_scale_swizzled and not cfg.is_scale_transposed
    with pytest.raises(NotImplementedError, match="gemm1_clamp_limit"):
        vllm.fused_experts(x, w1, w2, w, ids, quant_config=cfg)
    cfg = vllm.fp8_w8a8_moe_quant_config(torch.ones(2), torch.ones(2), w1_bias=torch.zeros(2, 32))
    with pytest.raises(NotImplementedError, match="w1_bias"):
        vllm.fused_experts(x, w1, w2, w, ids, quant_config=cfg)
    with pytest.raises(NotImplementedError, match="is_scale_transposed"):
        vllm.fused_experts(x, w1, w2, w, ids, quant_config=vllm.fp8_w8a8_moe_quant_config(
            torch.ones(2), torch.ones(2), is_scale_transposed=True))
    assert vllm.FusedMoEQuantConfig.make(torch.float8_e4m3fn, weight_dtype="int4")._w1.dtype == "int4"
    with pytest.raises(ValueError, match="weight_dtype"):
        vllm.FusedMoEQuantConfig.make(weight_dtype="int3")


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_is_vllms(name):
    params = inspect.signature(getattr(vllm, name)).parameters.values()
    assert [(p.name, p.default) for p in params] == SIGNATURES[name]
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


def test_make_signature_is_vllms():
    params = inspect.signature(vllm.FusedMoEQuantConfig.make).parameters.values()
    assert [(p.name, p.default) for p in params] == MAKE


@pytest.mark.parametrize("name", ["int8_w8a8_moe_quant_config", "int8_w8a16_moe_quant_config",
                                  "mxfp4_w4a4_moe_quant_config", "nvfp4_moe_quant_config", "biased_moe_quant_config"])
def test_unsupported_builders_raise_naming_themselves(name):
    args = [torch.ones(1)] * sum(d is _R for _, d in SIGNATURES[name])
    with pytest.raises(NotImplementedError, match=name):
        getattr(vllm, name)(*args)


# --- vLLM's property values ---------------------------------------------------------------------------------------


def test_fp8_block_properties():
    s1, s2 = torch.ones(E, 1, 1), torch.ones(E, 1, 1)
    cfg = vllm.fp8_w8a8_moe_quant_config(s1, s2, block_shape=[128, 128])
    assert cfg.use_fp8_w8a8 and cfg.is_quantized and cfg.is_block_quantized and cfg.block_shape == [128, 128]
    assert not (cfg.per_act_token_quant or cfg.per_out_ch_quant or cfg.is_per_tensor or cfg.use_int4_w4a16)
    assert cfg.quant_dtype == torch.float8_e4m3fn and cfg.w1_scale is s1 and cfg.w2_scale is s2
    assert cfg.a1_scale is None and cfg.w1_zp is None and cfg.w1_bias is None
    assert cfg.config_name(torch.bfloat16) == "fp8_w8a8"
    assert cfg.scale_shape(5, 300) == (5, 3) and cfg.batched_scale_shape(4, 5, 300) == (4, 5, 3)
    assert vllm.fp8_w8a8_moe_quant_config(s1, s2, block_shape=(128, 64)).block_shape == [128, 64]


def test_fp8_channel_and_tensor_properties():
    s, a = torch.ones(E, 8), torch.ones(1)
    tok = vllm.fp8_w8a8_moe_quant_config(s, s, per_act_token_quant=True, per_out_ch_quant=True)
    assert tok.per_act_token_quant and tok.is_per_act_token and tok.per_out_ch_quant and tok.block_shape is None
    assert tok.scale_shape(5, 300) == (5, 1)
    ten = vllm.fp8_w8a8_moe_quant_config(s, s, a1_scale=a, a2_scale=a)
    assert ten.is_per_tensor and not ten.per_act_token_quant and ten.a1_scale is a and ten.a2_scale is a
    assert ten.scale_shape(5, 300) == (1, 1)


def test_int4_properties():
    s, z = torch.ones(E, 8, 2), torch.zeros(E, 4, 2, dtype=torch.uint8)
    cfg = vllm.int4_w4a16_moe_quant_config(s, s, z, None, block_shape=[0, 128])
    assert cfg.use_int4_w4a16 and not cfg.use_fp8_w8a8 and cfg.quant_dtype is None and not cfg.is_quantized
    assert cfg.block_shape == [0, 128] and cfg.w1_zp is z and cfg.w2_zp is None and cfg.w1_scale is s
    assert cfg.config_name(torch.float16) == "int4_w4a16" and cfg.scale_shape(5, 300) is None


def test_unquantized_config():
    cfg = vllm.FUSED_MOE_UNQUANTIZED_CONFIG
    assert not (cfg.is_quantized or cfg.use_fp8_w8a8 or cfg.use_int4_w4a16) and cfg.block_shape is None
    assert cfg.config_name(torch.float32) == "float32" and cfg.config_name(torch.bfloat16) is None
    x, w, ids = _routing()
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(E, 2 * INTER, H, generator=g).to(DEVICE) / 10
    w2 = torch.randn(E, H, INTER, generator=g).to(DEVICE) / 10
    torch.testing.assert_close(vllm.fused_experts(x, w1, w2, w, ids, quant_config=cfg),
                               vllm.fused_experts(x, w1, w2, w, ids), rtol=0, atol=0)


def test_make_flags_of_other_schemes():
    assert vllm.FusedMoEQuantConfig.make(torch.int8).use_int8_w8a8
    assert vllm.FusedMoEQuantConfig.make("mxfp4").use_mxfp4_w4a4
    assert vllm.FusedMoEQuantConfig.make("nvfp4").use_nvfp4_w4a4


def test_vllm_034_config_properties():
    """vLLM 0.34's properties, method and field of FusedMoEQuantConfig (missing before: AttributeError), its
    ``use_mxfp4_w4a4`` (activations *and* weights mxfp4) and ``config_name`` (fp8_w8a16; None for OCP MX)."""
    make, Desc = vllm.FusedMoEQuantConfig.make, vllm.FusedMoEQuantDesc
    fp8_w = make(weight_dtype=torch.float8_e4m3fn)
    assert fp8_w.use_fp8_w8a16 and not fp8_w.use_fp8_w8a8 and fp8_w.weight_quant_dtype == torch.float8_e4m3fn
    assert fp8_w.config_name(torch.bfloat16) == "fp8_w8a16" and fp8_w.ocp_mx_scheme is None
    assert make(weight_dtype="nvfp4").use_nvfp4_w4a16 and make(weight_dtype="mxfp4").use_mxfp4_w4a16
    mx = make("mxfp4")
    assert mx.use_mxfp4_w4a4 and mx.ocp_mx_scheme == "w_mxfp4_a_mxfp4" and mx.config_name(torch.bfloat16) is None
    assert make(weight_dtype="mxfp4").ocp_mx_scheme == "w_mxfp4"
    assert make("mxfp6_e3m2", weight_dtype="mxfp4").ocp_mx_scheme == "w_mxfp4_a_mxfp6_e3m2"
    assert make("mxfp6_e2m3").ocp_mx_scheme == "w_mxfp6_e2m3_a_mxfp6_e2m3"
    assert make("mxfp6_e2m3", weight_dtype="mxfp6_e3m2").ocp_mx_scheme is None  # no such scheme in 0.34
    assert not make("mxfp4", weight_dtype="nvfp4").use_mxfp4_w4a4 and make("mxfp8").ocp_mx_scheme is None
    w4a8 = vllm.FusedMoEQuantConfig(_a1=Desc("fp8"), _a2=Desc("fp8"), _w1=Desc("mxfp4"), _w2=Desc("mxfp4"))
    assert w4a8.use_mxfp4_w4a8 and w4a8.ocp_mx_scheme == "w_mxfp4_a_fp8"
    s = torch.ones(E)
    fp8 = vllm.fp8_w8a8_moe_quant_config(s, s)
    assert fp8.ocp_mx_scheme is None and fp8.mx_alignment == 0 and fp8.weight_quant_dtype == torch.float8_e4m3fn
    assert fp8.act_scale_is_tensor_wide(None) and not fp8.act_scale_is_tensor_wide(torch.ones(1))
    tok = vllm.fp8_w8a8_moe_quant_config(torch.ones(E, 8), torch.ones(E, 8), per_act_token_quant=True)
    assert not tok.act_scale_is_tensor_wide(None) and not vllm.FUSED_MOE_UNQUANTIZED_CONFIG.act_scale_is_tensor_wide(None)
    assert vllm.FusedMoEQuantConfig(Desc(), Desc(), Desc(), Desc(), mx_alignment=256).mx_alignment == 256


@pytest.mark.parametrize("weight_dtype, flag", [(torch.float8_e4m3fn, "use_fp8_w8a16"), ("mxfp4", "use_mxfp4_w4a16"),
                                                ("nvfp4", "use_nvfp4_w4a16")])
def test_weight_only_schemes_are_refused_by_fused_experts(weight_dtype, flag):
    """A weight-only config built by ``make(weight_dtype=...)`` (16-bit activations): fused_experts raises naming
    the scheme (before: no flag said it was quantized, so the experts ran unquantized, the config ignored)."""
    x, w, ids = _routing()
    w1 = torch.ones(E, 2 * INTER, H, device=DEVICE)
    w2 = torch.ones(E, H, INTER, device=DEVICE)
    with pytest.raises(NotImplementedError, match=flag):
        vllm.fused_experts(x, w1, w2, w, ids, quant_config=vllm.FusedMoEQuantConfig.make(weight_dtype=weight_dtype))


@pytest.mark.parametrize("weight_dtype", ["mxfp8", torch.float8_e5m2])
def test_weight_only_dtypes_without_a_flag_are_refused(weight_dtype):
    """A weight-only config whose dtype no ``use_*`` flag or OCP MX scheme names (``make(weight_dtype="mxfp8")``,
    fp8 e5m2): still quantized weights, so fused_experts refuses it (before: ``is_quantized`` looked at flags,
    activation dtype and scales only, and the experts ran unquantized, the config ignored)."""
    x, w, ids = _routing()
    w1 = torch.ones(E, 2 * INTER, H, device=DEVICE)
    w2 = torch.ones(E, H, INTER, device=DEVICE)
    with pytest.raises(NotImplementedError, match="weight_quant_dtype"):
        vllm.fused_experts(x, w1, w2, w, ids, quant_config=vllm.FusedMoEQuantConfig.make(weight_dtype=weight_dtype))


# --- fused_experts: the builder's config == the same tensors in an attribute object ------------------------------


def _schemes():
    """(name, w1, w2, builder config, attribute-object config) for every supported scheme."""
    (b1, b2), (bs1, bs2), _ = _fp8_block_weights(16, 32)
    (c1, cs1, _), (c2, cs2, _) = _fp8_channel_weights(False)
    (t1, ts1, _), (t2, ts2, _) = _fp8_channel_weights(True)
    a1, a2 = torch.tensor([3.0 / 448], device=DEVICE), torch.tensor([0.3 / 448], device=DEVICE)
    (i1, is1, iz1, _), (i2, is2, iz2, _) = _int4_weights(16, True, torch.float32)
    (j1, js1, _, _), (j2, js2, _, _) = _int4_weights(16, False, torch.float32)
    f = vllm.fp8_w8a8_moe_quant_config
    i = vllm.int4_w4a16_moe_quant_config
    return [
        ("fp8_block", b1, b2, f(bs1, bs2, block_shape=[16, 32]),
         _cfg(use_fp8_w8a8=True, block_shape=[16, 32], w1_scale=bs1, w2_scale=bs2)),
        ("fp8_channel_per_token", c1, c2, f(cs1, cs2, per_act_token_quant=True),
         _cfg(use_fp8_w8a8=True, per_act_token_quant=True, w1_scale=cs1, w2_scale=cs2)),
        ("fp8_tensor_static", t1, t2, f(ts1, ts2, a1, a2),
         _cfg(use_fp8_w8a8=True, w1_scale=ts1, w2_scale=ts2, a1_scale=a1, a2_scale=a2)),
        ("fp8_tensor_dynamic", t1, t2, f(ts1, ts2), _cfg(use_fp8_w8a8=True, w1_scale=ts1, w2_scale=ts2)),
        ("int4_zero_points", i1, i2, i(is1, is2, iz1, iz2, [0, 16]),
         _cfg(use_int4_w4a16=True, block_shape=[0, 16], w1_scale=is1, w2_scale=is2, w1_zp=iz1, w2_zp=iz2)),
        ("int4_symmetric", j1, j2, i(js1, js2, None, None, block_shape=[0, 16]),
         _cfg(use_int4_w4a16=True, block_shape=[0, 16], w1_scale=js1, w2_scale=js2)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_builder_config_equals_attribute_config(index):
    name, w1, w2, built, attrs = _schemes()[index]
    x, w, ids = _routing(11)
    out = vllm.fused_experts(x, w1, w2, w, ids, quant_config=built)
    torch.testing.assert_close(out, vllm.fused_experts(x, w1, w2, w, ids, quant_config=attrs), rtol=0, atol=0,
                               msg=name)


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,exc,match", [
    (dict(w1_scale=[1.0]), TypeError, "w1_scale must be a torch.Tensor"),
    (dict(a2_scale=0.1), TypeError, "a2_scale must be a torch.Tensor"),
    (dict(per_act_token_quant=1), TypeError, "per_act_token_quant must be a bool"),
    (dict(per_out_ch_quant="no"), TypeError, "per_out_ch_quant must be a bool"),
    (dict(block_shape=[128]), ValueError, "block_shape must be None or a list of two ints"),
    (dict(block_shape=[128, 1.5]), TypeError, "block_shape must be an int"),
    (dict(block_shape=[128, 128], per_act_token_quant=True), ValueError, "block_shape excludes per_act_token"),
])
def test_bad_builder_arguments_are_named(kw, exc, match):
    args = dict(w1_scale=torch.ones(E), w2_scale=torch.ones(E))
    args.update(kw)
    with pytest.raises(exc, match=match):
        vllm.fp8_w8a8_moe_quant_config(**args)


def test_bad_int4_builder_arguments_are_named():
    s = torch.ones(E, 8, 2)
    with pytest.raises(TypeError, match="w2_zp must be a torch.Tensor"):
        vllm.int4_w4a16_moe_quant_config(s, s, None, 3)
    with pytest.raises(ValueError, match="block_shape"):
        vllm.int4_w4a16_moe_quant_config(s, s, None, None, block_shape="0,128")


def test_layout_errors_come_from_fused_experts_in_vllms_names():
    (w1, s1, _), (w2, s2, _) = _fp8_channel_weights(False)
    x, w, ids = _routing()
    cfg = vllm.fp8_w8a8_moe_quant_config(s1[:, :5], s2, per_act_token_quant=True)
    with pytest.raises(ValueError, match="w1_scale must have shape"):
        vllm.fused_experts(x, w1, w2, w, ids, quant_config=cfg)
