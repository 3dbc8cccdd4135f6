"""vLLM's quantized fused-MoE arguments (``quant_config`` of ``fused_experts``, vLLM v0.11 line to 0.34.0) mapped
onto :class:`omni_fast.ops.QuantizedExperts`.

vLLM's ``fused_experts(..., quant_config=None)`` (v0.11 and 0.34 alike) carries the quantization in a
``FusedMoEQuantConfig`` object; ``fused_experts`` reads its properties ``use_fp8_w8a8``, ``use_int8_w8a8``,
``use_int8_w8a16``, ``use_int4_w4a16``, ``ocp_mx_scheme``, ``weight_quant_dtype``, ``per_act_token_quant``,
``w1_scale``, ``w2_scale``, ``w1_zp``, ``w2_zp``, ``a1_scale``, ``a2_scale``, ``block_shape``, ``w1_bias``,
``w2_bias`` (0.34 adds ``gemm1_alpha`` / ``gemm1_beta`` / ``gemm1_clamp_limit`` and ``is_scale_transposed``: refused
here when set). They
are read here by attribute (vLLM need not be installed: any object with those attributes works). Layouts, as vLLM's
Triton fused MoE reads them (``fused_moe.py`` at commit ``13cb3e4``, unchanged in 0.34.0; ``E`` experts, ``I``
intermediate, ``H`` hidden):

``use_fp8_w8a8`` -- ``w1`` float8_e4m3fn ``[E, 2I, H]`` (gate rows then up rows), ``w2`` ``[E, H, I]``, and

- ``block_shape=[bn, bk]``: ``w1_scale`` fp32 ``[E, cdiv(2I, bn), cdiv(H, bk)]``, ``w2_scale`` ``[E, cdiv(H, bn),
  cdiv(I, bk)]``; activations dynamic per token and ``bk`` group (``a1_scale`` / ``a2_scale`` ignored, as vLLM
  does) -> ``fp8_block`` (zero-copy; needs ``I % bn == 0`` so that no scale block straddles gate and up, and
  ``bk`` a power of two >= 16).
- no ``block_shape``: ``w1_scale`` per tensor (``E`` values: ``[E]``, ``[E, 1]`` or ``[E, 1, 1]``; gate and up
  share it, as vLLM requantizes them) or per channel (``[E, 2I]`` or ``[E, 2I, 1]``), ``w2_scale`` likewise; ``a1_scale``
  / ``a2_scale`` static per-tensor (one value each) or None for dynamic activations -> ``fp8_channel`` (zero-copy:
  per-tensor scales become stride-0 views). Dynamic activations are quantized as vLLM's ``scaled_fp8_quant``
  quantizes them: per token with ``per_act_token_quant`` (``dynamic_scale="per_token"``), else per tensor
  (``"per_tensor"``: one scale ``amax(|A|) / 448`` over the GEMM's whole input, computed on the device).

``use_int4_w4a16`` -- ``w1`` uint8 (or int8) ``[E, 2I, H/2]``, two 4-bit values per byte along K (low nibble =
even k), unsigned ``u`` in [0, 15]; ``block_shape=[0, g]``; ``w1_scale`` ``[E, 2I, H/g]`` (fp16 / bf16 / fp32);
optional zero points ``w1_zp`` uint8 ``[E, 2I/2, H/g]`` packed along N (low nibble = even n); the weight is
``(u - zp) * scale``, ``zp = 8`` without zero points. Mapped onto ``int4_w4a16``: the bytes reinterpreted as
little-endian int32 words are exactly compressed-tensors' ``pack-quantized`` words (value k in bits ``4*(k%8)``,
stored ``q + 8``), so the weights are a zero-copy view; zero points are unpacked to int8 ``zp - 8`` on every call
(4 small elementwise launches; 1/64 of the weight bytes at g = 128). Activations stay 16-bit.

Everything else quantized (``use_int8_w8a8``, ``use_int8_w8a16``, OCP MX / NVFP4 schemes, FP8 weights with 16-bit
activations, biases) raises ``NotImplementedError`` naming it. Bad layouts raise ``TypeError`` / ``ValueError``
naming vLLM's argument (``w1``, ``w1_scale``, ``w1_zp``, ``a1_scale``, ``block_shape`` ...).
"""

from __future__ import annotations

import torch

from ..ops.quant import QuantizedExperts
from ..validation import check_tensor

_UNSUPPORTED = ("use_int8_w8a8", "use_int8_w8a16", "use_fp8_w8a16", "use_mxfp4_w4a4", "use_mxfp4_w4a16",
                "use_nvfp4_w4a4", "use_nvfp4_w4a16", "use_mxfp4_w4a8")
_ALL_FLAGS = ("use_fp8_w8a8", "use_int4_w4a16") + _UNSUPPORTED
_SWIGLU_VARIANTS = ("gemm1_alpha", "gemm1_beta", "gemm1_clamp_limit")  # vLLM 0.34's clamped / scaled SwiGLU
_VLLM_NAMES = (("w13_input_scale", "a1_scale"), ("w2_input_scale", "a2_scale"), ("w13_scale", "w1_scale"),
               ("w13_zero", "w1_zp"), ("w2_zero", "w2_zp"), ("w13", "w1"))


def _get(cfg, name):
    return getattr(cfg, name, None)


def is_quantized(quant_config) -> bool:
    """Whether a vLLM quant_config asks for a quantized MoE (flags, a quantized dtype, scales or biases)."""
    if quant_config is None:
        return False
    return any(bool(_get(quant_config, f)) for f in _ALL_FLAGS + ("is_scale_transposed",)) or any(
        _get(quant_config, n) is not None for n in ("quant_dtype", "weight_quant_dtype", "ocp_mx_scheme", "w1_scale",
                                                    "w2_scale", "w1_bias", "w2_bias") + _SWIGLU_VARIANTS)


def experts_from_vllm(w1, w2, quant_config) -> QuantizedExperts:
    """vLLM's (w1, w2, quant_config) -> a :class:`QuantizedExperts` (see the module docstring)."""
    set_flags = [f for f in _UNSUPPORTED if bool(_get(quant_config, f))]
    set_flags += [n for n in ("ocp_mx_scheme", "w1_bias", "w2_bias") + _SWIGLU_VARIANTS
                  if _get(quant_config, n) is not None]
    set_flags += ["is_scale_transposed"] if bool(_get(quant_config, "is_scale_transposed")) else []
    if set_flags:
        raise NotImplementedError(f"quant_config sets {', '.join(set_flags)}: not supported by "
                                  "omni_fast.compat.vllm.fused_experts (supported: use_fp8_w8a8, use_int4_w4a16, "
                                  "plain SiLU-and-mul)")
    fp8, int4 = bool(_get(quant_config, "use_fp8_w8a8")), bool(_get(quant_config, "use_int4_w4a16"))
    if fp8 == int4:  # (neither: e.g. weights of a dtype no flag names, make(weight_dtype="mxfp8"))
        raise NotImplementedError("quant_config must set exactly one of use_fp8_w8a8 / use_int4_w4a16 (got "
                                  f"{'both' if fp8 else 'neither'}; quant_dtype={_get(quant_config, 'quant_dtype')!r}, "
                                  f"weight_quant_dtype={_get(quant_config, 'weight_quant_dtype')!r})")
    for name, t in (("w1_scale", _get(quant_config, "w1_scale")), ("w2_scale", _get(quant_config, "w2_scale"))):
        if t is None:
            raise ValueError(f"{name} is required by {'use_fp8_w8a8' if fp8 else 'use_int4_w4a16'}")
    check_tensor("w1", w1, ndim=3)
    check_tensor("w2", w2, ndim=3, device=w1.device)
    try:
        return _fp8(w1, w2, quant_config) if fp8 else _int4(w1, w2, quant_config)
    except (TypeError, ValueError) as exc:  # the container's checks, in vLLM's argument names
        msg = str(exc)
        for ours, theirs in _VLLM_NAMES:
            msg = msg.replace(ours, theirs)
        raise type(exc)(msg) from exc


def _block_shape(cfg):
    bs = _get(cfg, "block_shape")
    if bs is None:
        return None
    if not isinstance(bs, (list, tuple)) or len(bs) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                    for v in bs):
        raise ValueError(f"block_shape must be a list of two ints, got {bs!r}")
    return list(bs)


def _fp8(w1, w2, cfg) -> QuantizedExperts:
    check_tensor("w1", w1, dtypes=(torch.float8_e4m3fn,))
    check_tensor("w2", w2, dtypes=(torch.float8_e4m3fn,))
    E, two_i, _ = w1.shape
    hidden, inter = w2.shape[1], two_i // 2
    s1, s2, a1, a2 = (_get(cfg, n) for n in ("w1_scale", "w2_scale", "a1_scale", "a2_scale"))
    check_tensor("w1_scale", s1, dtypes=(torch.float32,), device=w1.device)
    check_tensor("w2_scale", s2, dtypes=(torch.float32,), device=w1.device)
    bs = _block_shape(cfg)
    if bs is not None:
        bn, bk = bs
        if bool(_get(cfg, "per_act_token_quant")):
            raise ValueError("per_act_token_quant and block_shape exclude each other (vLLM: 'illegal quantization')")
        # a1_scale / a2_scale are ignored here, as vLLM does (its per-token-group quantization recomputes them)
        if bn < 1 or bk < 16 or bk & (bk - 1):
            raise ValueError(f"block_shape must be [block_n >= 1, block_k a power of two >= 16], got {bs}")
        if inter % bn:
            raise ValueError(f"block_shape[0] = {bn} must divide I = w1.shape[1] // 2 = {inter} (a w1_scale block "
                             "straddling the gate and up rows is not supported)")
        return QuantizedExperts.fp8_block(w1, w2, s1, s2, (bn, bk))
    a1, a2 = _input_scale("a1_scale", a1, E), _input_scale("a2_scale", a2, E)  # each GEMM on its own
    # vLLM's activation granularity is per_act_token_quant alone (scaled_fp8_quant's use_per_token_if_dynamic),
    # whatever the weight scales' shape
    dynamic = "per_token" if bool(_get(cfg, "per_act_token_quant")) else "per_tensor"
    return QuantizedExperts.fp8_channel(w1, w2, _row_scale("w1_scale", s1, E, two_i),
                                        _row_scale("w2_scale", s2, E, hidden), a1, a2, dynamic)


def _row_scale(name: str, s: torch.Tensor, E: int, rows: int) -> torch.Tensor:
    """vLLM's per-tensor (E values) or per-channel ([E, rows] / [E, rows, 1]) scale -> an [E, rows, 1] view."""
    if s.numel() == E and (s.dim() == 1 or all(d == 1 for d in s.shape[1:])) and s.shape[0] == E:
        return s.reshape(E, 1, 1).expand(E, rows, 1)
    if tuple(s.shape) in ((E, rows), (E, rows, 1)):
        return s.reshape(E, rows, 1)
    raise ValueError(f"{name} must have shape [E] (per tensor) or [E, {rows}] / [E, {rows}, 1] (per channel) with "
                     f"E = {E}, got {list(s.shape)}")


def _input_scale(name: str, a, E: int):
    """A static activation scale (one fp32 value) -> an [E] stride-0 view; None stays None (dynamic)."""
    if a is None:
        return None
    check_tensor(name, a, dtypes=(torch.float32,))
    if a.numel() != 1:
        raise ValueError(f"{name} must hold one value (a static per-tensor scale), got shape {list(a.shape)}")
    return a.reshape(1).expand(E)


def _int4(w1, w2, cfg) -> QuantizedExperts:
    for name, w in (("w1", w1), ("w2", w2)):
        check_tensor(name, w, dtypes=(torch.uint8, torch.int8), contiguous=True)
        if w.shape[2] % 4:
            raise ValueError(f"{name} must have K/2 bytes with K a multiple of 8, got {list(w.shape)}")
    if _get(cfg, "a1_scale") is not None or _get(cfg, "a2_scale") is not None:
        raise ValueError("a1_scale / a2_scale: use_int4_w4a16 keeps activations in 16 bits (no activation scales)")
    bs = _block_shape(cfg)
    if bs is None or bs[0] != 0 or bs[1] < 16 or bs[1] & (bs[1] - 1):
        raise ValueError(f"block_shape must be [0, group_size] with group_size a power of two >= 16 for "
                         f"use_int4_w4a16, got {bs!r}")
    E, two_i = w1.shape[:2]
    hidden = w2.shape[1]
    z1, z2 = _get(cfg, "w1_zp"), _get(cfg, "w2_zp")
    if (z1 is None) != (z2 is None):
        raise ValueError("w1_zp and w2_zp must be given together")
    zeros = [None, None]
    if z1 is not None:
        zeros = [_unpack_zp(n, z, E, rows, s) for n, z, rows, s in (("w1_zp", z1, two_i, _get(cfg, "w1_scale")),
                                                                    ("w2_zp", z2, hidden, _get(cfg, "w2_scale")))]
    # little-endian bytes -> int32 words: compressed-tensors' pack-quantized layout (a view)
    return QuantizedExperts.int4(w1.view(torch.int32), w2.view(torch.int32), _get(cfg, "w1_scale"),
                                 _get(cfg, "w2_scale"), bs[1], zeros[0], zeros[1])


def _unpack_zp(name: str, zp: torch.Tensor, E: int, rows: int, scale) -> torch.Tensor:
    """uint8 ``[E, cdiv(rows, 2), G]`` packed along N (low nibble = even row) -> int8 ``[E, rows, G]`` = zp - 8."""
    check_tensor(name, zp, dtypes=(torch.uint8, torch.int8), ndim=3)
    groups = scale.shape[-1] if isinstance(scale, torch.Tensor) and scale.dim() == 3 else zp.shape[2]
    check_tensor(name, zp, shape=(E, -(-rows // 2), groups))
    b = zp.view(torch.uint8)
    nib = torch.stack([b & 0xF, b >> 4], dim=2).reshape(E, -1, groups)[:, :rows]
    return (nib.to(torch.int8) - 8).contiguous()


__all__ = ["experts_from_vllm", "is_quantized"]
