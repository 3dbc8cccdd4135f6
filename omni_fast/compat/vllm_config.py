"""vLLM's ``FusedMoEQuantConfig`` and its builder functions (vLLM 0.34.0's signatures; v0.11's positional calls of
the fp8 / int4 builders still work), so that vLLM-style code

.. code-block:: python

    quant_config = fp8_w8a8_moe_quant_config(w1_scale, w2_scale, block_shape=[128, 128])
    out = fused_experts(x, w1, w2, topk_weights, topk_ids, quant_config=quant_config)

runs unchanged after importing these names from :mod:`omni_fast.compat.vllm` instead of
``vllm.model_executor.layers.fused_moe.config`` / ``.fused_moe``.

Written from vLLM's ``vllm/model_executor/layers/fused_moe/config.py`` (v0.11 line, then checked against 0.34.0's
sdist on 2026-12-07; not copied): a config is four descriptors
(``_a1``, ``_a2``, ``_w1``, ``_w2``: dtype, group shape, scale, global scale / alpha, zero point, bias) behind
read-only properties (``quant_dtype``, ``use_fp8_w8a8``, ``use_int4_w4a16``, ``per_act_token_quant``,
``block_shape``, ``w1_scale``, ``w1_zp``, ``a1_scale``, ...), with vLLM's values for the same arguments.
:func:`omni_fast.compat.vllm.fused_experts` reads those properties (:mod:`omni_fast.compat.vllm_quant`), so a
config built here and vLLM's own config object are interchangeable there.

Builders:

- ``fp8_w8a8_moe_quant_config(w1_scale, w2_scale, a1_scale=None, a2_scale=None, w1_bias=None, w2_bias=None,
  per_act_token_quant=False, per_out_ch_quant=False, block_shape=None, a1_gscale=None, ..., gemm1_clamp_limit=None)``
  (FP8 block, per channel, per tensor; see ``docs/compat.md``);
- ``int4_w4a16_moe_quant_config(w1_scale, w2_scale, w1_zp=None, w2_zp=None, w1_bias=None, w2_bias=None,
  block_shape=None, ...)``;
- ``int8_w8a8_moe_quant_config``, ``int8_w8a16_moe_quant_config``, ``mxfp4_w4a4_moe_quant_config``,
  ``nvfp4_moe_quant_config``, ``biased_moe_quant_config`` (vLLM's signatures): schemes ``fused_experts`` does not
  run, so they raise ``NotImplementedError`` naming the builder at once;
- ``FusedMoEQuantConfig.make(...)`` (vLLM's general builder) and ``FUSED_MOE_UNQUANTIZED_CONFIG``.

Differences to vLLM: bad arguments raise ``TypeError`` / ``ValueError`` naming the argument where vLLM asserts
(``per_act_token_quant`` with ``block_shape``: vLLM's "illegal quantization" assertion); ``block_shape`` may be a
tuple (vLLM asserts a list) and is stored as a list of ints; no ``PrecisionConfig`` (GPT-OSS Triton) scales.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from ..validation import as_int, check_bool, check_tensor


class GroupShape(NamedTuple):
    """A quantization group (rows, cols); -1 = the whole dimension. ``PER_TENSOR`` (-1, -1), ``PER_TOKEN``
    (1, -1), a block e.g. (128, 128), int4's ``block_shape`` (0, group)."""

    row: int
    col: int


GroupShape.PER_TENSOR = GroupShape(-1, -1)
GroupShape.PER_TOKEN = GroupShape(1, -1)


@dataclasses.dataclass
class FusedMoEQuantDesc:
    """How one operand (an activation or a weight) is quantized: dtype (a torch dtype, ``"int4"``, ``"mxfp4"``,
    ``"nvfp4"`` or None = not quantized), group shape, scale tensor, global scale / alpha, zero point, bias."""

    dtype: torch.dtype | str | None = None
    shape: GroupShape | None = None
    scale: torch.Tensor | None = None
    alpha_or_gscale: torch.Tensor | None = None
    zp: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def _desc_field(desc: str, field: str, doc: str) -> property:
    return property(lambda self: getattr(getattr(self, desc), field), doc=doc)


@dataclasses.dataclass
class FusedMoEQuantConfig:
    """The quantization of one fused-MoE call: descriptors of the gate/up input (``_a1``), the down input
    (``_a2``), and the two weights (``_w1`` ``[E, 2I, H]``, ``_w2`` ``[E, H, I]``)."""

    _a1: FusedMoEQuantDesc
    _a2: FusedMoEQuantDesc
    _w1: FusedMoEQuantDesc
    _w2: FusedMoEQuantDesc
    # vLLM 0.34's extra fields: scale layouts and SwiGLU variants (fused_experts runs the defaults only)
    is_scale_swizzled: bool = True
    is_scale_transposed: bool = False
    gemm1_alpha: float | None = None
    gemm1_beta: float | None = None
    gemm1_clamp_limit: float | None = None
    mx_alignment: int = 0  # vLLM 0.34: the OCP MX kernels' row alignment (stored; nothing here reads it)

    def __post_init__(self):
        if self.per_act_token_quant and self.block_shape is not None:
            raise ValueError("per_act_token_quant and block_shape exclude each other (vLLM: 'illegal quantization')")

    a1_scale = _desc_field("_a1", "scale", "fp32 static input scale of the gate/up GEMM, or None (dynamic)")
    a2_scale = _desc_field("_a2", "scale", "fp32 static input scale of the down GEMM, or None (dynamic)")
    a1_gscale = _desc_field("_a1", "alpha_or_gscale", "global activation scale (nvfp4)")
    a2_gscale = _desc_field("_a2", "alpha_or_gscale", "global activation scale (nvfp4)")
    w1_scale = _desc_field("_w1", "scale", "w1's scales (layout by scheme: docs/compat.md)")
    w2_scale = _desc_field("_w2", "scale", "w2's scales")
    w1_zp = _desc_field("_w1", "zp", "w1's zero points (int4: uint8 [E, 2I/2, H/g], packed along N)")
    w2_zp = _desc_field("_w2", "zp", "w2's zero points")
    w1_bias = _desc_field("_w1", "bias", "w1's bias (not supported by fused_experts)")
    w2_bias = _desc_field("_w2", "bias", "w2's bias (not supported by fused_experts)")
    g1_alphas = _desc_field("_w1", "alpha_or_gscale", "w1's global scales (nvfp4)")
    g2_alphas = _desc_field("_w2", "alpha_or_gscale", "w2's global scales (nvfp4)")
    quant_dtype = _desc_field("_a1", "dtype", "the activations' quantized dtype (None: 16-bit activations)")
    weight_quant_dtype = _desc_field("_w1", "dtype", "the weights' quantized dtype (a torch dtype, 'int4', ...)")

    @property
    def is_quantized(self) -> bool:
        return self.quant_dtype is not None

    @property
    def per_act_token_quant(self) -> bool:
        return self._a1.shape == GroupShape.PER_TOKEN

    is_per_act_token = per_act_token_quant

    @property
    def per_out_ch_quant(self) -> bool:
        return self._w1.shape == GroupShape.PER_TOKEN

    @property
    def is_per_tensor(self) -> bool:
        return self._a1.shape == GroupShape.PER_TENSOR

    @property
    def block_shape(self) -> list[int] | None:
        """``[bn, bk]`` (fp8 blocks) / ``[0, group]`` (int4) from the activation group shape, else None."""
        s = self._a1.shape
        return None if s is None or s in (GroupShape.PER_TENSOR, GroupShape.PER_TOKEN) else [s.row, s.col]

    @property
    def is_block_quantized(self) -> bool:
        return self.block_shape is not None

    @property
    def use_fp8_w8a8(self) -> bool:
        return self.quant_dtype == torch.float8_e4m3fn

    @property
    def use_int8_w8a8(self) -> bool:
        return self.quant_dtype == torch.int8

    @property
    def use_int8_w8a16(self) -> bool:
        return self._a1.dtype is None and self._w1.dtype == torch.int8

    @property
    def use_int4_w4a16(self) -> bool:
        return self._a1.dtype is None and self._w1.dtype == "int4"

    def _weight_only(self, dtype) -> bool:
        return self._a1.dtype is None and self._w1.dtype == dtype

    @property
    def use_fp8_w8a16(self) -> bool:
        return self._weight_only(torch.float8_e4m3fn)

    @property
    def use_nvfp4_w4a16(self) -> bool:
        return self._weight_only("nvfp4")

    @property
    def use_mxfp4_w4a16(self) -> bool:
        return self._weight_only("mxfp4")

    @property
    def use_mxfp4_w4a4(self) -> bool:
        return self._a1.dtype == "mxfp4" and self._w1.dtype == "mxfp4"

    @property
    def use_mxfp4_w4a8(self) -> bool:
        return self._a1.dtype == "fp8" and self._w1.dtype == "mxfp4"

    @property
    def use_nvfp4_w4a4(self) -> bool:
        return self.quant_dtype == "nvfp4"

    @property
    def ocp_mx_scheme(self) -> str | None:
        """vLLM 0.34's OCP MX scheme name (``"w_mxfp4"``, ``"w_mxfp4_a_mxfp4"``, ``"w_mxfp6_e3m2_a_fp8"``, ...):
        weights mxfp4 / mxfp6 with 16-bit activations, activations of the weights' dtype or ``"fp8"``, or mxfp6
        activations with mxfp4 weights; None otherwise (``fused_experts`` refuses a config that has one)."""
        a, w = self._a1.dtype, self._w1.dtype
        if w not in _OCP_MX_WEIGHTS or not (a is None or isinstance(a, str)):
            return None
        if a is None or a in (w, "fp8") or (w == "mxfp4" and a in _OCP_MX_WEIGHTS):
            return f"w_{w}" if a is None else f"w_{w}_a_{a}"
        return None

    def act_scale_is_tensor_wide(self, scale: torch.Tensor | None) -> bool:
        """vLLM 0.34: whether an activation scale is reduced over the whole (routed) tensor at run time: no static
        ``scale``, per-tensor activations, fp8 or int8 W8A8."""
        return scale is None and self.is_per_tensor and (self.use_fp8_w8a8 or self.use_int8_w8a8)

    def config_name(self, dtype: torch.dtype) -> str | None:
        """The ``dtype=`` part of vLLM's tuned-config file names (``fp8_w8a8``, ``fp8_w8a16``, ``int8_w8a16``,
        ``int4_w4a16``; ``float32`` for fp32 activations; None for OCP MX schemes and 16-bit unquantized)."""
        for flag, name in (("use_fp8_w8a8", "fp8_w8a8"), ("use_fp8_w8a16", "fp8_w8a16"),
                           ("use_int8_w8a16", "int8_w8a16"), ("use_int4_w4a16", "int4_w4a16")):
            if getattr(self, flag):
                return name
        return "float32" if dtype == torch.float32 and self.ocp_mx_scheme is None else None

    def scale_shape(self, max_tokens: int, hidden_dim: int) -> tuple[int, int] | None:
        """Shape of a dynamic activation scale: ``(T, cdiv(H, bk))`` blocked, ``(T, 1)`` per token, ``(1, 1)``
        per tensor; None without quantized activations."""
        if not self.is_quantized:
            return None
        if self.is_block_quantized:
            return (max_tokens, -(-hidden_dim // self.block_shape[1]))
        return (max_tokens, 1) if self.per_act_token_quant else (1, 1)

    def batched_scale_shape(self, num_experts: int, max_tokens: int, hidden_dim: int) -> tuple[int, ...] | None:
        shape = self.scale_shape(max_tokens, hidden_dim)
        return None if shape is None else (num_experts, *shape)

    @staticmethod
    def make(quant_dtype=None, per_act_token_quant=False, per_out_ch_quant=False, block_shape=None, w1_scale=None,
             w2_scale=None, a1_scale=None, a2_scale=None, g1_alphas=None, g2_alphas=None, a1_gscale=None,
             a2_gscale=None, w1_bias=None, w2_bias=None, w1_zp=None, w2_zp=None, weight_dtype=None,
             is_scale_swizzled=True, is_scale_transposed=False, gemm1_alpha=None, gemm1_beta=None,
             gemm1_clamp_limit=None) -> "FusedMoEQuantConfig":
        """vLLM's general builder: every descriptor gets ``quant_dtype``; activations are grouped by
        ``block_shape``, else per token (``per_act_token_quant``) / per tensor (quantized) / none; weights by
        ``block_shape``, else per output channel (``per_out_ch_quant``) / none."""
        if isinstance(quant_dtype, str) and quant_dtype not in _STR_DTYPES:
            raise ValueError(f"quant_dtype must be a torch dtype, one of {_STR_DTYPES} or None, got {quant_dtype!r}")
        if isinstance(weight_dtype, str) and weight_dtype not in _STR_DTYPES + ("int4",):
            raise ValueError(f"weight_dtype must be a torch dtype, one of {_STR_DTYPES + ('int4',)} or None, got "
                             f"{weight_dtype!r}")
        weight_dtype = quant_dtype if weight_dtype is None else weight_dtype
        per_act, per_out = check_bool("per_act_token_quant", per_act_token_quant), check_bool(
            "per_out_ch_quant", per_out_ch_quant)
        block = _check_block_shape(block_shape)
        if block is not None and (per_act or per_out):
            raise ValueError("block_shape excludes per_act_token_quant and per_out_ch_quant (vLLM: 'illegal "
                             "quantization')")
        if block is not None:
            a_shape = w_shape = GroupShape(*block)
        else:
            a_shape = GroupShape.PER_TOKEN if per_act else (None if quant_dtype is None else GroupShape.PER_TENSOR)
            w_shape = GroupShape.PER_TOKEN if per_out else None
        return FusedMoEQuantConfig(
            _a1=FusedMoEQuantDesc(quant_dtype, a_shape, a1_scale, a1_gscale),
            _a2=FusedMoEQuantDesc(quant_dtype, a_shape, a2_scale, a2_gscale),
            _w1=FusedMoEQuantDesc(weight_dtype, w_shape, w1_scale, g1_alphas, w1_zp, w1_bias),
            _w2=FusedMoEQuantDesc(weight_dtype, w_shape, w2_scale, g2_alphas, w2_zp, w2_bias),
            is_scale_swizzled=check_bool("is_scale_swizzled", is_scale_swizzled),
            is_scale_transposed=check_bool("is_scale_transposed", is_scale_transposed), gemm1_alpha=gemm1_alpha,
            gemm1_beta=gemm1_beta, gemm1_clamp_limit=gemm1_clamp_limit)


_STR_DTYPES = ("nvfp4", "mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8")  # vLLM 0.34's string quant dtypes
_OCP_MX_WEIGHTS = ("mxfp4", "mxfp6_e3m2", "mxfp6_e2m3")  # the weight dtypes of vLLM 0.34's OCP MX schemes


def _check_block_shape(block_shape) -> list[int] | None:
    """None, or a list/tuple of two ints (Python, numpy or 0-d tensors) -> a list of Python ints."""
    if block_shape is None:
        return None
    if not isinstance(block_shape, (list, tuple)) or len(block_shape) != 2:
        raise ValueError(f"block_shape must be None or a list of two ints, got {block_shape!r}")
    return [as_int("block_shape", v) for v in block_shape]


def _check_tensors(required: dict, optional: dict) -> None:
    for name, t in required.items():
        check_tensor(name, t)
    for name, t in optional.items():
        if t is not None:
            check_tensor(name, t)


def fp8_w8a8_moe_quant_config(w1_scale: torch.Tensor, w2_scale: torch.Tensor, a1_scale: torch.Tensor | None = None,
                              a2_scale: torch.Tensor | None = None, w1_bias: torch.Tensor | None = None,
                              w2_bias: torch.Tensor | None = None, per_act_token_quant: bool = False,
                              per_out_ch_quant: bool = False, block_shape: list[int] | None = None,
                              a1_gscale: torch.Tensor | None = None, a2_gscale: torch.Tensor | None = None,
                              g1_alphas: torch.Tensor | None = None, g2_alphas: torch.Tensor | None = None,
                              is_scale_transposed: bool = False, gemm1_alpha: float | None = None,
                              gemm1_beta: float | None = None, gemm1_clamp_limit: float | None = None
                              ) -> FusedMoEQuantConfig:
    """FP8 (e4m3) weights and activations (vLLM 0.34's signature). ``block_shape=[bn, bk]``: block-scaled weights,
    activations dynamic per token and ``bk`` group; else per-channel (``w1_scale [E, 2I]``) or per-tensor (``[E]``)
    weight scales, ``a1_scale`` / ``a2_scale`` static (one fp32 value) or None (dynamic). Shapes are checked by
    ``fused_experts`` against ``w1`` / ``w2`` (layouts: ``docs/compat.md``); biases are stored (``fused_experts``
    then raises ``NotImplementedError``). A v0.11 positional call ``(w1_scale, w2_scale, a1_scale, a2_scale,
    per_act_token_quant, per_out_ch_quant, block_shape)`` puts bools where the biases are: read in that order."""
    if isinstance(w1_bias, bool):  # v0.11's positional per_act_token_quant (a bias is never a bool)
        w1_bias, w2_bias, per_act_token_quant, per_out_ch_quant, block_shape = _fp8_v011(
            w1_bias, w2_bias, per_act_token_quant, per_out_ch_quant, block_shape)
    _check_tensors(dict(w1_scale=w1_scale, w2_scale=w2_scale),
                   dict(a1_scale=a1_scale, a2_scale=a2_scale, w1_bias=w1_bias, w2_bias=w2_bias, a1_gscale=a1_gscale,
                        a2_gscale=a2_gscale, g1_alphas=g1_alphas, g2_alphas=g2_alphas))
    return FusedMoEQuantConfig.make(torch.float8_e4m3fn, per_act_token_quant=per_act_token_quant,
                                    per_out_ch_quant=per_out_ch_quant, block_shape=block_shape, w1_scale=w1_scale,
                                    w2_scale=w2_scale, a1_scale=a1_scale, a2_scale=a2_scale, w1_bias=w1_bias,
                                    w2_bias=w2_bias, a1_gscale=a1_gscale, a2_gscale=a2_gscale, g1_alphas=g1_alphas,
                                    g2_alphas=g2_alphas, is_scale_transposed=is_scale_transposed,
                                    gemm1_alpha=gemm1_alpha, gemm1_beta=gemm1_beta, gemm1_clamp_limit=gemm1_clamp_limit)


def _fp8_v011(per_act, w2_bias_slot, per_act_slot, per_out, block_shape):
    """v0.11 positional (…, per_act_token_quant, per_out_ch_quant, block_shape) shifted into (w1_bias, w2_bias,
    per_act_token_quant) -> (w1_bias, w2_bias, per_act_token_quant, per_out_ch_quant, block_shape)."""
    if isinstance(w2_bias_slot, bool):  # v0.11's positional per_out_ch_quant
        if per_out:
            raise TypeError("fp8_w8a8_moe_quant_config: per_out_ch_quant given twice (v0.11 positional and keyword)")
        per_out = w2_bias_slot
    elif w2_bias_slot is not None:
        raise TypeError("fp8_w8a8_moe_quant_config: a bool 5th argument (v0.11's per_act_token_quant) cannot go with "
                        "a w2_bias tensor")
    if isinstance(per_act_slot, (list, tuple)):  # v0.11's positional block_shape
        if block_shape is not None:
            raise TypeError("fp8_w8a8_moe_quant_config: block_shape given twice (v0.11 positional and keyword)")
        block_shape = per_act_slot
    elif per_act_slot is not False:
        raise TypeError("fp8_w8a8_moe_quant_config: per_act_token_quant given twice (v0.11 positional and keyword)")
    return None, None, per_act, per_out, block_shape


def int4_w4a16_moe_quant_config(w1_scale: torch.Tensor, w2_scale: torch.Tensor, w1_zp: torch.Tensor | None = None,
                                w2_zp: torch.Tensor | None = None, w1_bias: torch.Tensor | None = None,
                                w2_bias: torch.Tensor | None = None, block_shape: list[int] | None = None,
                                a1_gscale: torch.Tensor | None = None, a2_gscale: torch.Tensor | None = None,
                                gemm1_clamp_limit: float | None = None, gemm1_alpha: float | None = None,
                                gemm1_beta: float | None = None) -> FusedMoEQuantConfig:
    """INT4 weights (uint8 ``[E, N, K/2]``, two values per byte), 16-bit activations (vLLM 0.34's signature);
    ``block_shape=[0, group]`` (required by ``fused_experts``); scales ``[E, N, K/group]``; zero points uint8
    ``[E, N/2, K/group]`` or None (symmetric, zero point 8). A v0.11 positional call ``(w1_scale, w2_scale, w1_zp,
    w2_zp, block_shape)`` puts a list where ``w1_bias`` is: read as the block shape."""
    if isinstance(w1_bias, (list, tuple)):  # v0.11's positional block_shape (a bias is never a list)
        if block_shape is not None:
            raise TypeError("int4_w4a16_moe_quant_config: block_shape given twice (v0.11 positional and keyword)")
        w1_bias, block_shape = None, w1_bias
    _check_tensors(dict(w1_scale=w1_scale, w2_scale=w2_scale),
                   dict(w1_zp=w1_zp, w2_zp=w2_zp, w1_bias=w1_bias, w2_bias=w2_bias, a1_gscale=a1_gscale,
                        a2_gscale=a2_gscale))
    block = _check_block_shape(block_shape)
    shape = GroupShape(*block) if block is not None else None
    return FusedMoEQuantConfig(_a1=FusedMoEQuantDesc(shape=shape, alpha_or_gscale=a1_gscale),
                               _a2=FusedMoEQuantDesc(shape=shape, alpha_or_gscale=a2_gscale),
                               _w1=FusedMoEQuantDesc("int4", shape, w1_scale, None, w1_zp, w1_bias),
                               _w2=FusedMoEQuantDesc("int4", shape, w2_scale, None, w2_zp, w2_bias),
                               gemm1_alpha=gemm1_alpha, gemm1_beta=gemm1_beta, gemm1_clamp_limit=gemm1_clamp_limit)


def _unsupported(name: str, scheme: str):
    raise NotImplementedError(f"{name}: {scheme} is not supported by omni_fast.compat.vllm.fused_experts "
                              "(supported: fp8_w8a8_moe_quant_config, int4_w4a16_moe_quant_config)")


def int8_w8a8_moe_quant_config(w1_scale, w2_scale, a1_scale, a2_scale, w1_bias=None, w2_bias=None,
                               per_act_token_quant=False):
    """vLLM's INT8 W8A8 builder: not supported (raises ``NotImplementedError``)."""
    _unsupported("int8_w8a8_moe_quant_config", "INT8 W8A8")


def int8_w8a16_moe_quant_config(w1_scale, w2_scale, w1_zp=None, w2_zp=None, w1_bias=None, w2_bias=None,
                                block_shape=None, a1_gscale=None, a2_gscale=None, gemm1_clamp_limit=None,
                                gemm1_alpha=None, gemm1_beta=None):
    """vLLM's INT8 W8A16 builder: not supported (raises ``NotImplementedError``)."""
    _unsupported("int8_w8a16_moe_quant_config", "INT8 W8A16")


def mxfp4_w4a4_moe_quant_config(w1_scale, w2_scale, a1_scale=None, a2_scale=None, w1_bias=None, w2_bias=None,
                                block_shape=None):
    """vLLM v0.11's MXFP4 builder (gone in 0.34): not supported (raises ``NotImplementedError``)."""
    _unsupported("mxfp4_w4a4_moe_quant_config", "MXFP4 W4A4")


def nvfp4_moe_quant_config(g1_alphas, g2_alphas, a1_gscale, a2_gscale, w1_scale, w2_scale, w1_bias=None,
                           w2_bias=None, is_scale_swizzled=True, gemm1_alpha=None, gemm1_beta=None,
                           gemm1_clamp_limit=None):
    """vLLM's NVFP4 builder: not supported (raises ``NotImplementedError``)."""
    _unsupported("nvfp4_moe_quant_config", "NVFP4")


def biased_moe_quant_config(w1_bias, w2_bias, gemm1_alpha=None, gemm1_beta=None, gemm1_clamp_limit=None):
    """vLLM's unquantized-with-biases builder: not supported (raises ``NotImplementedError``)."""
    _unsupported("biased_moe_quant_config", "an expert bias (w1_bias / w2_bias)")


FUSED_MOE_UNQUANTIZED_CONFIG: FusedMoEQuantConfig = FusedMoEQuantConfig.make()

BUILDERS = ("fp8_w8a8_moe_quant_config", "int4_w4a16_moe_quant_config", "int8_w8a8_moe_quant_config",
            "int8_w8a16_moe_quant_config", "mxfp4_w4a4_moe_quant_config", "nvfp4_moe_quant_config",
            "biased_moe_quant_config")

__all__ = ["FUSED_MOE_UNQUANTIZED_CONFIG", "FusedMoEQuantConfig", "FusedMoEQuantDesc", "GroupShape", *BUILDERS]
