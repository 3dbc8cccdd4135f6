"""Quantized expert weights: :class:`QuantizedExperts`, the container :func:`omni_fast.ops.moe_experts` and
:func:`omni_fast.ops.moe_block` accept in place of the float ``w13`` / ``w2``.

Formats (``E`` local experts, ``I`` intermediate size, ``H`` hidden size; ``w13`` = gate rows ``0..I-1`` then up
rows ``I..2I-1`` of ``[2I, H]``, ``w2`` = ``[H, I]``, as the float experts):

``"fp8_block"`` -- FP8 W8A8, block-scaled (Qwen's / DeepSeek's ``quant_method: "fp8"`` with
``weight_block_size [bn, bk]``, usually ``[128, 128]``):

- ``w13`` ``float8_e4m3fn [E, 2I, H]``, ``w2`` ``float8_e4m3fn [E, H, I]``.
- ``w13_scale`` fp32 ``[E, 2*ceil(I/bn), ceil(H/bk)]``: the checkpoint's ``weight_scale_inv`` of gate_proj (the
  first ``ceil(I/bn)`` rows) then of up_proj; the weight value is ``w * scale[n // bn, k // bk]`` (scale rows of
  the up part start at ``ceil(I/bn)``, so ``I`` need not be a multiple of ``bn``).
  ``w2_scale`` fp32 ``[E, ceil(H/bn), ceil(I/bk)]``.
- Activations are quantized dynamically inside the GEMM, per token and per ``bk``-wide group of K, to e4m3 with an
  fp32 scale ``amax / 448``; products accumulate in fp32; the output is in the model dtype.

``"int4_w4a16"`` -- INT4 weights, 16-bit activations (compressed-tensors ``pack-quantized``, group strategy, as
llm-compressor writes GPTQ / AWQ models):

- ``w13`` ``int32 [E, 2I, ceil(H/8)]``, ``w2`` ``int32 [E, H, ceil(I/8)]``: compressed-tensors' ``weight_packed``
  (packed along K: value ``k`` sits in bits ``4*(k % 8) .. +3`` of word ``k // 8``, stored as ``q + 8``, ``q`` in
  ``[-8, 7]``), gate rows then up rows.
- ``w13_scale`` ``[E, 2I, H/g]``, ``w2_scale`` ``[E, H, I/g]`` (fp16 / bf16 / fp32; ``weight_scale``), ``g`` =
  ``group_size`` (a power of two >= 16 dividing H and I; 128 and 32 are the published ones).
- Optional zero points (asymmetric / AWQ-style schemes) ``w13_zero`` int8 ``[E, 2I, H/g]``, ``w2_zero`` int8
  ``[E, H, I/g]``, values in ``[-8, 7]``. compressed-tensors stores them packed along the *output* dim
  (``int32 [ceil(N/8), K/g]``); the loader unpacks them once (one byte per group: 1/64 of the weight bytes at
  g = 128) so the gate and up halves concatenate for any I and the kernel reads one byte per (row, group).
- The weight value is ``(q - zero) * scale`` (``zero`` = 0 when symmetric), dequantized in registers and fed to
  fp16/bf16 tensor cores.

``"fp8_channel"`` -- FP8 W8A8 with per-output-channel or per-tensor weight scales (compressed-tensors
``float-quantized``, strategies ``channel`` / ``tensor``, as llm-compressor's FP8_DYNAMIC / FP8 schemes write it;
vLLM's ``use_fp8_w8a8`` without ``block_shape``):

- ``w13`` ``float8_e4m3fn [E, 2I, H]``, ``w2`` ``float8_e4m3fn [E, H, I]``.
- ``w13_scale`` fp32 ``[E, 2I, 1]``, ``w2_scale`` fp32 ``[E, H, 1]``: one scale per output row (compressed-tensors'
  channel ``weight_scale [N, 1]`` stacked). A per-tensor scale is the same scale on every row of its linear: a
  broadcast view (stride 0 along the rows, e.g. ``s[:, None, None].expand(E, H, 1)``) is accepted, so no per-row
  copy is made; the weight value is ``w * scale[n]`` either way.
- ``w13_input_scale`` / ``w2_input_scale`` (each GEMM on its own): fp32 ``[E]`` static per-tensor scales (the
  checkpoint's ``input_scale``; a broadcast ``[1]`` -> ``[E]`` view is accepted), or None for dynamic activations,
  quantized as ``dynamic_scale`` says:

  - ``"per_token"`` (default): scale ``max(amax(row), 1e-10) / 448`` over the whole K row, computed inside the
    GEMM; activations ``e4m3(x / s)``.
  - ``"per_tensor"`` (vLLM's ``use_fp8_w8a8`` without ``per_act_token_quant``, vLLM's ``scaled_fp8_quant``
    dynamic path): one scale ``s = amax(|A|) / 448`` over the GEMM's whole input (no floor; every hidden_states
    row for the gate/up GEMM, every (token, expert) row the gate/up GEMM wrote for the down GEMM), computed on
    the device by one reduction launch per GEMM (:func:`omni_fast.kernels.moe_gemm_quant.per_tensor_scale`).

  Per-tensor scales, static or dynamic, quantize as vLLM's: ``e4m3(clamp(x * (1 / s), +-448))`` (``s = 0``: zeros,
  so the GEMM gives 0, as vLLM's). The e4m3 x e4m3 products accumulate in fp32 over the whole K (the scales are
  constant along K) and are scaled once by ``a_s`` then ``w_s[n]``.

Everything stays quantized in memory: nothing here holds a dequantized copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..validation import check_bool, check_tensor

FORMATS = ("fp8_block", "int4_w4a16", "fp8_channel")
DYNAMIC_SCALES = ("per_token", "per_tensor")  # fp8_channel's dynamic activation granularity
FP8_DTYPES = (torch.float8_e4m3fn,)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class QuantizedExperts:
    """Quantized routed-expert weights (see the module docstring for the shapes of each format).

    Build it with the keyword constructor (validated), or with :meth:`fp8_block` / :meth:`int4` for readability.
    ``block`` is ``(bn, bk)`` for ``fp8_block`` and ``None`` otherwise; ``group_size`` is ``g`` for ``int4_w4a16``
    and ``None`` otherwise; ``symmetric`` says whether zero points are absent (they must be when it is True);
    ``dynamic_scale`` (fp8_channel only; ``"per_token"`` elsewhere) is how dynamic activations (input scale None)
    are scaled: ``"per_token"`` or ``"per_tensor"``. A plain str, so the op passes it as a constant (traceable).
    """

    format: str
    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    w13_zero: torch.Tensor | None = None
    w2_zero: torch.Tensor | None = None
    block: tuple[int, int] | None = None
    group_size: int | None = None
    symmetric: bool = True
    w13_input_scale: torch.Tensor | None = None
    w2_input_scale: torch.Tensor | None = None
    dynamic_scale: str = "per_token"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        check_bool("symmetric", self.symmetric)  # a flag: "no" or 0 must not pass as one
        if self.format != "fp8_channel" and (self.w13_input_scale is not None or self.w2_input_scale is not None):
            raise ValueError(f"w13_input_scale / w2_input_scale are for fp8_channel (static activation scales); "
                             f"{self.format} quantizes activations {'per token group' if self.format == 'fp8_block' else 'not at all'}")
        if self.dynamic_scale not in DYNAMIC_SCALES:
            raise ValueError(f"dynamic_scale must be one of {DYNAMIC_SCALES}, got {self.dynamic_scale!r}")
        if self.format != "fp8_channel" and self.dynamic_scale != "per_token":
            raise ValueError(f"dynamic_scale={self.dynamic_scale!r} is for fp8_channel; {self.format} quantizes "
                             f"activations {'per token group' if self.format == 'fp8_block' else 'not at all'}")
        if self.format == "fp8_block":
            _validate_fp8(self)
        elif self.format == "fp8_channel":
            _validate_fp8_channel(self)
        else:
            _validate_int4(self)

    # -- constructors ---------------------------------------------------------------------------------------------
    @classmethod
    def fp8_block(cls, w13, w2, w13_scale, w2_scale, block=(128, 128)) -> "QuantizedExperts":
        """FP8 block-scaled experts (``weight`` + ``weight_scale_inv`` of a ``quant_method: fp8`` checkpoint)."""
        # a pair becomes a tuple (the constructor's check names anything else: tuple(None) would not)
        block = tuple(block) if isinstance(block, (tuple, list)) else block
        return cls("fp8_block", w13, w2, w13_scale, w2_scale, block=block)

    @classmethod
    def int4(cls, w13, w2, w13_scale, w2_scale, group_size=128, w13_zero=None, w2_zero=None,
             symmetric: bool | None = None) -> "QuantizedExperts":
        """INT4 W4A16 experts (compressed-tensors ``pack-quantized``); symmetric unless zero points are given."""
        if symmetric is None:
            symmetric = w13_zero is None and w2_zero is None
        return cls("int4_w4a16", w13, w2, w13_scale, w2_scale, w13_zero, w2_zero, group_size=group_size,
                   symmetric=symmetric)

    @classmethod
    def fp8_channel(cls, w13, w2, w13_scale, w2_scale, w13_input_scale=None, w2_input_scale=None,
                    dynamic_scale: str = "per_token") -> "QuantizedExperts":
        """FP8 experts with per-channel (or broadcast per-tensor) weight scales; activations static per tensor
        (fp32 ``[E]`` input scales) or dynamic (input scales None) per token or per tensor (``dynamic_scale``)."""
        return cls("fp8_channel", w13, w2, w13_scale, w2_scale, w13_input_scale=w13_input_scale,
                   w2_input_scale=w2_input_scale, dynamic_scale=dynamic_scale)

    @property
    def static_input(self) -> bool:
        """fp8_channel with static activation scales (for both GEMMs)."""
        return self.w13_input_scale is not None and self.w2_input_scale is not None

    # -- shape facts ----------------------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w2.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.w13.shape[1] // 2

    @property
    def device(self) -> torch.device:
        return self.w13.device

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(E, I, H)``."""
        return self.num_experts, self.intermediate_size, self.hidden_size

    def named_tensors(self) -> dict[str, torch.Tensor | None]:
        """Every tensor field by name (``w13``, ``w13_scale``, ...; None where absent), e.g. for overlap checks."""
        names = ("w13", "w2", "w13_scale", "w2_scale", "w13_zero", "w2_zero", "w13_input_scale", "w2_input_scale")
        return {n: getattr(self, n) for n in names}

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor held (for device / dispatch checks)."""
        return tuple(t for t in self.named_tensors().values() if t is not None)

    def nbytes(self) -> int:
        """Bytes held in memory (weights, scales, zero points; a broadcast view counts its distinct elements)."""
        return sum(math.prod(n for n, st in zip(t.shape, t.stride()) if st != 0) * t.element_size()
                   for t in self.tensors())

    def select(self, index: int) -> "QuantizedExperts":
        """A one-expert container of expert ``index`` (the shared expert path, tests)."""
        pick = (lambda t: None if t is None else t[index:index + 1])
        return QuantizedExperts(self.format, pick(self.w13), pick(self.w2), pick(self.w13_scale),
                                pick(self.w2_scale), pick(self.w13_zero), pick(self.w2_zero), self.block,
                                self.group_size, self.symmetric, pick(self.w13_input_scale),
                                pick(self.w2_input_scale), self.dynamic_scale)

    def __repr__(self) -> str:
        E, inter, hidden = self.shape
        extra = {"fp8_block": f"block={self.block}",
                 "fp8_channel": "activations=" + "/".join(
                     "dynamic " + self.dynamic_scale.replace("_", " ") if a is None else "static" for a in (
                     self.w13_input_scale, self.w2_input_scale))}.get(
            self.format, f"group_size={self.group_size}, symmetric={self.symmetric}")
        return f"QuantizedExperts({self.format}, E={E}, I={inter}, H={hidden}, {extra}, {self.nbytes()} bytes)"


def _check_pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _check_weights(q: QuantizedExperts, dtypes, k_of) -> tuple[int, int, int]:
    """w13 ``[E, 2I, k_of(H)]`` / w2 ``[E, H, k_of(I)]`` of ``dtypes``; returns (E, I, H)."""
    check_tensor("w13", q.w13, dtypes=dtypes, ndim=3, contiguous=True)
    E, two_i, _ = q.w13.shape
    if E == 0 or two_i == 0 or two_i % 2:
        raise ValueError(f"w13 must be [E, 2I, K] with E >= 1 and an even, non-zero 2I, got {list(q.w13.shape)}")
    inter = two_i // 2
    check_tensor("w2", q.w2, dtypes=dtypes, ndim=3, device=q.w13.device, contiguous=True)
    hidden = q.w2.shape[1]
    if hidden == 0:
        raise ValueError(f"w2 must be [E, H, K] with H >= 1, got {list(q.w2.shape)}")
    check_tensor("w13", q.w13, shape=(E, two_i, k_of(hidden)))
    check_tensor("w2", q.w2, shape=(E, hidden, k_of(inter)))
    return E, inter, hidden


def _validate_fp8(q: QuantizedExperts) -> None:
    if not isinstance(q.block, (tuple, list)) or len(q.block) != 2:
        raise ValueError(f"block must be (block_n, block_k) for fp8_block, got {q.block!r}")
    bn, bk = (_check_pos_int("block[0] (block_n)", q.block[0]), _check_pos_int("block[1] (block_k)", q.block[1]))
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"block[1] (block_k) must be a power of two >= 16 (one K tile per activation group), "
                         f"got {bk}")
    if q.group_size is not None:
        raise ValueError("group_size is for int4_w4a16; fp8_block uses block")
    if q.w13_zero is not None or q.w2_zero is not None or not q.symmetric:
        raise ValueError("w13_zero / w2_zero: fp8_block is a symmetric scheme (no zero points)")
    E, inter, hidden = _check_weights(q, FP8_DTYPES, lambda k: k)
    dev = q.w13.device
    check_tensor("w13_scale", q.w13_scale, dtypes=(torch.float32,), device=dev, contiguous=True,
                 shape=(E, 2 * _cdiv(inter, bn), _cdiv(hidden, bk)))
    check_tensor("w2_scale", q.w2_scale, dtypes=(torch.float32,), device=dev, contiguous=True,
                 shape=(E, _cdiv(hidden, bn), _cdiv(inter, bk)))


def _validate_fp8_channel(q: QuantizedExperts) -> None:
    if q.block is not None or q.group_size is not None:
        raise ValueError("block / group_size are not used by fp8_channel (one scale per output channel)")
    if q.w13_zero is not None or q.w2_zero is not None or not q.symmetric:
        raise ValueError("w13_zero / w2_zero: fp8_channel is a symmetric scheme (no zero points)")
    E, inter, hidden = _check_weights(q, FP8_DTYPES, lambda k: k)
    dev = q.w13.device
    # broadcast views (per-tensor scales) are fine: the kernel reads them through their strides
    check_tensor("w13_scale", q.w13_scale, dtypes=(torch.float32,), device=dev, shape=(E, 2 * inter, 1))
    check_tensor("w2_scale", q.w2_scale, dtypes=(torch.float32,), device=dev, shape=(E, hidden, 1))
    for name in ("w13_input_scale", "w2_input_scale"):
        if getattr(q, name) is not None:
            check_tensor(name, getattr(q, name), dtypes=(torch.float32,), device=dev, shape=(E,))


def _validate_int4(q: QuantizedExperts) -> None:
    if q.block is not None:
        raise ValueError("block is for fp8_block; int4_w4a16 uses group_size")
    g = _check_pos_int("group_size", q.group_size)
    if g < 16 or g & (g - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {g}")
    E, inter, hidden = _check_weights(q, (torch.int32,), lambda k: _cdiv(k, 8))
    for name, k in (("H (w2.shape[1])", hidden), ("I (w13.shape[1] // 2)", inter)):
        if k % g:
            raise ValueError(f"group_size {g} must divide {name} = {k}")
    dev = q.w13.device
    check_tensor("w13_scale", q.w13_scale, dtypes=SCALE_DTYPES, device=dev, contiguous=True,
                 shape=(E, 2 * inter, hidden // g))
    check_tensor("w2_scale", q.w2_scale, dtypes=(q.w13_scale.dtype,), device=dev, contiguous=True,
                 shape=(E, hidden, inter // g))
    if q.symmetric:
        for name in ("w13_zero", "w2_zero"):
            if getattr(q, name) is not None:
                raise ValueError(f"{name} given with a symmetric scheme (symmetric=True): zero points belong to "
                                 "asymmetric schemes")
        return
    if q.w13_zero is None or q.w2_zero is None:
        raise ValueError("w13_zero and w2_zero are required by an asymmetric scheme (symmetric=False)")
    check_tensor("w13_zero", q.w13_zero, dtypes=(torch.int8,), device=dev, contiguous=True,
                 shape=(E, 2 * inter, hidden // g))
    check_tensor("w2_zero", q.w2_zero, dtypes=(torch.int8,), device=dev, contiguous=True,
                 shape=(E, hidden, inter // g))


__all__ = ["FORMATS", "QuantizedExperts"]
