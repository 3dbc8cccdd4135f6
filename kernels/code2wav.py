"""Code2Wav's convolutions in Triton: causal conv1d / transposed conv as implicit GEMMs with SnakeBeta fused on the
input load and the residual fused on the output, a depthwise causal conv (the ConvNeXt k7), and SnakeBeta itself.

Every kernel reads its input as the virtual concatenation ``cat(state, x)`` along time (``state`` = the carried
left context of a stream, or implicit zeros at the start), so streaming never copies the context into a new buffer.
The SnakeBeta is applied to each loaded tile in fp32 and rounded to the activation dtype (the conv sees what
transformers' separate SnakeBeta module would have stored); accumulation is fp32; bias and residual are added in fp32
and the result is rounded once.

One GEMM kernel serves both convolutions. Output row ``n``, column ``t``::

    acc[n, t] = sum_j sum_ci W_j[n, ci] * act(cat(state, x))[ci, t * STRIDE + j * DIL]

- dense causal conv1d (weight ``[C_out, C_in/groups, k]``): rows are output channels, ``W_j = weight[:, :, j]``.
- causal transposed conv (weight ``[C_in, C_out, k]``, ``k = m * s``): output block ``q`` (``s`` samples) depends on
  inputs ``q .. q+m-1`` only, so it is an ``m``-tap "valid" conv with ``s * C_out`` rows ``n = r * C_out + co``
  (``r`` = phase inside the block), ``W_j[n, ci] = weight[ci, co, r + (m-1-j) * s]``, stored at sample
  ``q * s + r`` (``PHASES = s``).

Weight layout ("packed", done once at load time by ``omni_fast.ops.code2wav.pack_conv1d_weight`` and
``pack_conv_transpose1d_weight``): the same shape and values as the torch
layout, but with memory order ``[k][C_out][C_in]`` (tap-major, C_in contiguous). Each (tap, row tile, C_in tile)
weight read is then a contiguous run along C_in (coalesced), and for the transposed conv the rows
``n = r * C_out + co`` of one tap are a single ``[s * C_out, C_in]`` matrix, so the kernel walks them with one
stride. The dense kernel accepts any strides (an unpacked weight works, slower); the transposed conv packs an
unpacked weight on the fly (a copy per call: pack once instead).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import autotune, interpreting, launch

SNAKE_EPS = 1e-9


# --- shared helpers ----------------------------------------------------------------------------------------------


@triton.jit
def _snake_params(alpha_ptr, beta_ptr, offs_c, mask_c):
    """Per-channel ``exp(alpha)`` and ``1 / (exp(beta) + 1e-9)`` in fp32, ``[BLOCK_C]``."""
    a = tl.exp(tl.load(alpha_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32))
    b = tl.exp(tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32))
    return a, 1.0 / (b + 1e-9)


@triton.jit
def _sin_fast(x):
    """sin of fp32 ``x``: a two-constant reduction to [-pi, pi], then the MUFU ``sin.approx.f32`` (abs error
    ~1e-6, far below fp16/bf16 resolution). ``tl.sin`` is libdevice's accurate ``sinf`` (~20 FP32 instructions with
    a slow path), and the fused SnakeBeta runs once per tap, so its cost is comparable to the tensor-core work."""
    k = tl.floor(x * 0.15915494309189535 + 0.5)
    r = x - k * 6.28125  # 2*pi split: 6.28125 is exact in a few bits, so k * 6.28125 is exact for |k| < 2^15
    r = r - k * 0.0019353071795864769
    return tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _snake(x, a, inv_b, MODE: tl.constexpr):
    """SnakeBeta on an fp32 tile ``[BLOCK_C, BLOCK_T]`` with per-row parameters from :func:`_snake_params`.
    ``MODE`` 1: accurate ``tl.sin``; 2: :func:`_sin_fast` (GPU, 16-bit activations)."""
    if MODE == 2:
        s = _sin_fast(x * a[:, None])
    else:
        s = tl.sin(x * a[:, None])
    return x + inv_b[:, None] * (s * s)


@triton.jit
def _load_window(x_ptr, s_ptr, stride_xc, stride_xt, stride_sc, stride_st, offs_c, mask_c, pos, ctx, t_in,
                 HAS_STATE: tl.constexpr):
    """fp32 tile ``[BLOCK_C, BLOCK_T]`` of ``cat(state, x)`` at time positions ``pos`` (0 = first state sample).

    Positions before ``ctx`` come from the state (zeros without one: the causal zero padding), positions past the
    end of x are zeros (transformers' extra right padding of strided convs).

    Channel offsets are 64-bit, computed once per row into a vector of row pointers: ``C * T`` of a long one-shot
    decode passes 2^31 (96 channels x 22.4 M samples = 15 min of audio in the last decoder block). Time offsets stay
    32-bit (``T * stride_t < 2^31``: true for channels-first inputs, and for the model's one channels-last view, the
    pre-transformer output, whose length is in frames), so the per-element address math is unchanged.
    """
    in_x = (pos >= ctx) & (pos < ctx + t_in)
    x_rows = x_ptr + offs_c.to(tl.int64) * stride_xc
    v = tl.load(x_rows[:, None] + ((pos - ctx) * stride_xt)[None, :],
                mask=mask_c[:, None] & in_x[None, :], other=0.0).to(tl.float32)
    if HAS_STATE:
        in_s = (pos >= 0) & (pos < ctx)
        s_rows = s_ptr + offs_c.to(tl.int64) * stride_sc
        v += tl.load(s_rows[:, None] + (pos * stride_st)[None, :],
                     mask=mask_c[:, None] & in_s[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _load_activated(x_ptr, s_ptr, alpha_ptr, beta_ptr, stride_xc, stride_xt, stride_sc, stride_st, offs_c, mask_c,
                    pos, ctx, t_in, a, inv_b, HAS_STATE: tl.constexpr, SNAKE: tl.constexpr):
    """:func:`_load_window`, then the SnakeBeta (when fused), rounded to the activation dtype and back to fp32."""
    v = _load_window(x_ptr, s_ptr, stride_xc, stride_xt, stride_sc, stride_st, offs_c, mask_c, pos, ctx, t_in,
                     HAS_STATE)
    if SNAKE:
        v = _snake(v, a, inv_b, SNAKE)
    return v.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _epilogue(acc, b, g, offs_n, offs_t, mask_n, mask_t, n_rows_g, co_g, bias_ptr, res_ptr, out_ptr,
              stride_rb, stride_rc, stride_rt, stride_ob, stride_oc, stride_ot,
              PHASES: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, CLAMP: tl.constexpr = None):
    """Row ``n`` -> (phase ``r``, channel ``co``); add bias and residual in fp32, clamp to ``[-CLAMP, CLAMP]``
    (unless None; NaN passes, as ``torch.clamp``); one rounding on store (rounding is monotonic and the bounds are
    what a caller passes, e.g. 1.0, exact in every dtype: the same as clamping the rounded output).
    Channel offsets are 64-bit row pointers, time offsets 32-bit (see :func:`_load_window`)."""
    r = offs_n // co_g
    ch = g * co_g + offs_n % co_g
    t_out = offs_t[None, :] * PHASES + r[:, None]
    ch64 = ch.to(tl.int64)
    mask = mask_n[:, None] & mask_t[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ch, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if RESIDUAL:
        res_rows = res_ptr + b * stride_rb + ch64 * stride_rc
        acc += tl.load(res_rows[:, None] + t_out * stride_rt, mask=mask, other=0.0).to(tl.float32)
    if CLAMP is not None:
        acc = tl.minimum(tl.maximum(acc, -CLAMP, propagate_nan=tl.PropagateNan.ALL), CLAMP,
                         propagate_nan=tl.PropagateNan.ALL)
    out_rows = out_ptr + b * stride_ob + ch64 * stride_oc
    tl.store(out_rows[:, None] + t_out * stride_ot, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --- kernels -----------------------------------------------------------------------------------------------------


@triton.jit
def conv_gemm_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, alpha_ptr, beta_ptr, res_ptr, out_ptr,
    t_in, ctx, n_cols, n_cols_bucket, n_rows_g, ci_g, co_g, n_groups, dil, conv_stride, w_off0,
    stride_xb, stride_xc, stride_xt, stride_sb, stride_sc, stride_st,
    stride_wn, stride_wc, stride_wk,
    stride_rb, stride_rc, stride_rt, stride_ob, stride_oc, stride_ot, stride_ok,
    KSIZE: tl.constexpr, PHASES: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SNAKE: tl.constexpr, RESIDUAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr = 1,
    CLAMP: tl.constexpr = None,
):
    """One ``[BLOCK_N, BLOCK_T]`` output tile of the implicit GEMM (see the module docstring). Grid:
    ``(cdiv(n_cols, BLOCK_T), cdiv(n_rows_g, BLOCK_N), B * n_groups * SPLIT_K)``. ``n_cols_bucket`` (unused in the
    body) is the autotuning key for the length, so a server does not re-tune for every distinct input length.

    With ``SPLIT_K > 1`` program ``ks`` reduces the input-channel blocks ``ks, ks + SPLIT_K, ...`` and stores its fp32
    partial sum at ``out_ptr + ks * stride_ok`` (a workspace); :func:`splitk_reduce_kernel` adds them up. Short
    streaming chunks have few output tiles, and splitting the reduction spreads the weight read over more SMs."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    ks = pid_z % SPLIT_K
    pid_bg = pid_z // SPLIT_K
    b = (pid_bg // n_groups).to(tl.int64)
    g = pid_bg % n_groups
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_n = offs_n < n_rows_g
    mask_t = offs_t < n_cols
    c0 = (g * ci_g).to(tl.int64)  # the group's first channel; 64-bit offsets (see _load_window)
    x_base = x_ptr + b * stride_xb + c0 * stride_xc
    s_base = state_ptr + b * stride_sb + c0 * stride_sc
    # Tap j's weights start at w_off0 + j * stride_wk (the transposed conv walks its taps backwards).
    w_rows = w_ptr + w_off0 + (g * n_rows_g + offs_n)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    a = tl.zeros((BLOCK_K,), dtype=tl.float32)
    inv_b = a
    # One flat loop over (input-channel block, tap), taps innermost: the same accumulation order as two nested
    # loops, but a single runtime loop that the software pipeliner can stream through (an unrolled tap loop keeps
    # KSIZE tiles' addresses and masks live at once and spills; a nested loop pipelines only the short tap loop).
    n_kb = tl.cdiv(ci_g - ks * BLOCK_K, SPLIT_K * BLOCK_K)
    for it in range(0, n_kb * KSIZE):
        kb = it // KSIZE
        j = it - kb * KSIZE
        offs_c = (ks + kb * SPLIT_K) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_c = offs_c < ci_g
        if SNAKE:  # per-channel parameters: BLOCK_K values, cheap next to the tile's sin
            a, inv_b = _snake_params(alpha_ptr + g * ci_g, beta_ptr + g * ci_g, offs_c, mask_c)
        xt = _load_activated(x_base, s_base, alpha_ptr, beta_ptr, stride_xc, stride_xt, stride_sc, stride_st,
                             offs_c, mask_c, offs_t * conv_stride + j * dil, ctx, t_in, a, inv_b, HAS_STATE, SNAKE)
        w = tl.load(w_rows + offs_c[None, :] * stride_wc + j * stride_wk, mask=mask_n[:, None] & mask_c[None, :],
                    other=0.0)
        if UPCAST:  # the interpreter's low-precision tl.dot is wrong: do it in fp32 there
            w = w.to(tl.float32)
        else:
            xt = xt.to(w.dtype)
        if IEEE:
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    if SPLIT_K == 1:
        _epilogue(acc, b, g, offs_n, offs_t, mask_n, mask_t, n_rows_g, co_g, bias_ptr, res_ptr, out_ptr,
                  stride_rb, stride_rc, stride_rt, stride_ob, stride_oc, stride_ot, PHASES, HAS_BIAS, RESIDUAL, CLAMP)
    else:  # fp32 partial sum into the workspace; bias, residual and clamp come with the reduction
        _epilogue(acc, b, g, offs_n, offs_t, mask_n, mask_t, n_rows_g, co_g, bias_ptr, res_ptr,
                  out_ptr + ks * stride_ok, stride_rb, stride_rc, stride_rt, stride_ob, stride_oc, stride_ot,
                  PHASES, False, False)


@triton.jit
def splitk_reduce_kernel(ws_ptr, bias_ptr, res_ptr, out_ptr, n_ch, n_t,
                         stride_wsk, stride_wsb, stride_wsc, stride_wst,
                         stride_rb, stride_rc, stride_rt, stride_ob, stride_oc, stride_ot,
                         SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, CLAMP: tl.constexpr = None):
    """Sum the ``SPLIT_K`` fp32 partials ``[SPLIT_K, B, C, T]`` in a fixed order (deterministic), add bias and
    residual, clamp (``CLAMP``, see :func:`_epilogue`), store. Grid ``(cdiv(T, BLOCK_T), cdiv(C, BLOCK_C), B)``."""
    b = tl.program_id(2).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_c = offs_c < n_ch
    mask_t = offs_t < n_t
    ws_rows = ws_ptr + b * stride_wsb + offs_c.to(tl.int64) * stride_wsc  # 64-bit row pointers (_load_window)
    ptrs = ws_rows[:, None] + (offs_t * stride_wst)[None, :]
    mask = mask_c[:, None] & mask_t[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for k in tl.static_range(SPLIT_K):
        acc += tl.load(ptrs + k * stride_wsk, mask=mask, other=0.0)
    _epilogue(acc, b, 0, offs_c, offs_t, mask_c, mask_t, n_ch, n_ch, bias_ptr, res_ptr, out_ptr,
              stride_rb, stride_rc, stride_rt, stride_ob, stride_oc, stride_ot, 1, HAS_BIAS, RESIDUAL, CLAMP)


@triton.jit
def dwconv_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, alpha_ptr, beta_ptr, res_ptr, out_ptr,
    t_in, ctx, n_cols, n_ch, dil, conv_stride,
    stride_xb, stride_xc, stride_xt, stride_sb, stride_sc, stride_st, stride_wc, stride_wk,
    stride_rb, stride_rc, stride_rt, stride_ob, stride_oc, stride_ot,
    KSIZE: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, SNAKE: tl.constexpr,
    RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, CLAMP: tl.constexpr = None,
):
    """Depthwise causal conv (groups = C_in = C_out), a ``[BLOCK_C, BLOCK_T]`` tile. Grid:
    ``(cdiv(n_cols, BLOCK_T), cdiv(C, BLOCK_C), B)``."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_c = offs_c < n_ch
    mask_t = offs_t < n_cols
    a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    inv_b = a
    if SNAKE:
        a, inv_b = _snake_params(alpha_ptr, beta_ptr, offs_c, mask_c)
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for j in tl.static_range(KSIZE):
        xt = _load_activated(x_ptr + b * stride_xb, state_ptr + b * stride_sb, alpha_ptr, beta_ptr, stride_xc,
                             stride_xt, stride_sc, stride_st, offs_c, mask_c, offs_t * conv_stride + j * dil, ctx,
                             t_in, a, inv_b, HAS_STATE, SNAKE)
        w = tl.load(w_ptr + offs_c * stride_wc + j * stride_wk, mask=mask_c, other=0.0).to(tl.float32)
        acc += w[:, None] * xt
    _epilogue(acc, b, 0, offs_c, offs_t, mask_c, mask_t, n_ch, n_ch, bias_ptr, res_ptr, out_ptr,
              stride_rb, stride_rc, stride_rt, stride_ob, stride_oc, stride_ot, 1, HAS_BIAS, RESIDUAL, CLAMP)


@triton.jit
def snake_kernel(x_ptr, state_ptr, alpha_ptr, beta_ptr, out_ptr, n_ch, t_in, ctx, stride_xb, stride_xc, stride_xt,
                 stride_sb, stride_sc, stride_st, stride_ob, stride_oc, stride_ot, BLOCK_C: tl.constexpr,
                 BLOCK_T: tl.constexpr, MODE: tl.constexpr = 1, HAS_STATE: tl.constexpr = False):
    """Elementwise SnakeBeta of ``cat(state, x)`` (``ctx`` state samples, then ``t_in`` of x; ``ctx = 0`` without a
    state), a ``[BLOCK_C, BLOCK_T]`` tile of the ``[B, C, ctx + t_in]`` output. Grid
    ``(cdiv(ctx + t_in, BLOCK_T), cdiv(C, BLOCK_C), B)``. The same fp32 math and rounding as the conv's fused
    SnakeBeta (:func:`_load_activated`), so a conv on this output equals the fused conv bit for bit."""
    b = tl.program_id(2).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_c = offs_c < n_ch
    a, inv_b = _snake_params(alpha_ptr, beta_ptr, offs_c, mask_c)
    v = _load_window(x_ptr + b * stride_xb, state_ptr + b * stride_sb, stride_xc, stride_xt, stride_sc, stride_st,
                     offs_c, mask_c, offs_t, ctx, t_in, HAS_STATE)
    v = _snake(v, a, inv_b, MODE)
    mask = mask_c[:, None] & (offs_t < ctx + t_in)[None, :]
    out_rows = out_ptr + b * stride_ob + offs_c.to(tl.int64) * stride_oc  # 64-bit row pointers (_load_window)
    tl.store(out_rows[:, None] + (offs_t * stride_ot)[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


_GEMM_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_T": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_T": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_T": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_T": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_T": 16, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 32, "BLOCK_T": 16, "BLOCK_K": 128}, num_warps=4, num_stages=3),
]
# Under the interpreter each program costs a fixed overhead, so fewer, larger tiles run much faster (the tests
# shrink these to exercise multi-tile grids on small shapes).
_INTERP_GEMM = triton.Config({"BLOCK_N": 32, "BLOCK_T": 64, "BLOCK_K": 32}, num_warps=4)
_INTERP_DW = (32, 64)

conv_gemm = autotune(_GEMM_CONFIGS, key=["n_cols_bucket", "n_rows_g", "ci_g", "n_groups", "KSIZE", "PHASES"],
                     interpreter_config=_INTERP_GEMM)(conv_gemm_kernel)


def _length_bucket(n: int) -> int:
    """Power-of-two bucket of an output length (the autotuning key), capped at 4096."""
    return min(triton.next_power_of_2(max(n, 1)), 4096)


# Short inputs (streaming chunks): a fixed tile with a split reduction instead of the autotuned tiles.
_SMALL_COLS = 32
_SMALL_GEMM = triton.Config({"BLOCK_N": 64, "BLOCK_T": 16, "BLOCK_K": 64}, num_warps=4, num_stages=4)
_MAX_SPLIT_K = 16
# Elementwise tiles hold 8 elements per thread: the split-K reduce keeps SPLIT_K (up to 16) loads of each in
# flight, the depthwise conv 7 shifted taps (two masked loads each with a state), and larger tiles spill on sm_90
# (32 x 128 with 4 warps did: 864 B for the reduce, 1-3 KB for the depthwise conv). The depthwise conv uses 8 warps:
# with 4 (8 x 128) ptxas still spilled its 7 tap weights on fp16 (56 B at 72 registers).
_DW_BLOCK = (8, 256)
_DW_WARPS = 8
_REDUCE_BLOCKS_T = (16, 32, 64, 128)


def _reduce_block(t_out: int) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_T)`` of :func:`splitk_reduce_kernel`: 1024 elements, the time tile no wider than the
    (short, streaming) output so few lanes idle."""
    bt = min(max(triton.next_power_of_2(max(t_out, 1)), _REDUCE_BLOCKS_T[0]), _REDUCE_BLOCKS_T[-1])
    return 1024 // bt, bt
_FORCE_SPLIT_K: int | None = None  # tests: force a split under the interpreter


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _choose_split_k(tiles: int, k_blocks: int, device: torch.device) -> int:
    """Power-of-two split of the reduction so that ``tiles * split`` programs cover about twice the SMs."""
    if _FORCE_SPLIT_K is not None:
        return max(1, min(_FORCE_SPLIT_K, k_blocks))
    if interpreting() or device.type != "cuda":
        return 1
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    while split * 2 <= min(_MAX_SPLIT_K, k_blocks) and tiles * split < target:
        split *= 2
    return split


def _launch_gemm(n_cols: int, n_rows: int, n_batch: int, head: tuple, ints: tuple, *, out: torch.Tensor, bias,
                 residual, ci_g: int, device, clamp: float | None = None, **meta) -> None:
    """Launch :func:`conv_gemm_kernel`: under the interpreter one fixed config; on a GPU the autotuned kernel, or
    for short inputs (streaming chunks) a fixed tile with split-K (fp32 workspace + :func:`splitk_reduce_kernel`).

    ``head``: the pointer arguments before ``res_ptr``; ``ints``: the integer arguments from ``t_in`` to
    ``stride_wk``; residual/output pointers and strides are filled in here. (``launch.autotune``'s interpreter
    stand-in loses the kernel object -- ``functools.update_wrapper`` copies the InterpretedFunction's ``fn``
    attribute over its own -- so the interpreter path launches the raw kernel.) ``clamp``: the output clamped to
    ``[-clamp, clamp]`` in the epilogue (the reduction's with split-K).
    """
    res = residual if residual is not None else out
    has_bias = bias is not None
    clamped = {} if clamp is None else dict(CLAMP=float(clamp))  # (absent = None: the same compiles as before)
    small = interpreting() or n_cols <= _SMALL_COLS
    cfg = (_INTERP_GEMM if interpreting() else _SMALL_GEMM).kwargs
    split = 1
    if small:
        tiles = triton.cdiv(n_cols, cfg["BLOCK_T"]) * triton.cdiv(n_rows, cfg["BLOCK_N"]) * n_batch
        split = _choose_split_k(tiles, triton.cdiv(ci_g, cfg["BLOCK_K"]), device)
    if split == 1:
        full = (*head, res, out, *ints, *res.stride(), *out.stride(), 0)
        flags = dict(meta, HAS_BIAS=has_bias, RESIDUAL=residual is not None, **clamped)
        if small:
            grid = (triton.cdiv(n_cols, cfg["BLOCK_T"]), triton.cdiv(n_rows, cfg["BLOCK_N"]), n_batch)
            extra = {} if interpreting() else dict(num_warps=_SMALL_GEMM.num_warps, num_stages=_SMALL_GEMM.num_stages)
            launch(conv_gemm_kernel, grid, *full, device=device, **flags, **cfg, **extra)
        else:
            launch(conv_gemm, lambda m: (triton.cdiv(n_cols, m["BLOCK_T"]), triton.cdiv(n_rows, m["BLOCK_N"]),
                                         n_batch), *full, device=device, **flags)
        return
    B, c_out, t_out = out.shape
    ws = torch.empty(split, B, c_out, t_out, device=out.device, dtype=torch.float32)
    full = (*head, ws, ws, *ints, 0, 0, 0, *ws.stride()[1:], ws.stride(0))
    grid = (triton.cdiv(n_cols, cfg["BLOCK_T"]), triton.cdiv(n_rows, cfg["BLOCK_N"]), n_batch * split)
    extra = {} if interpreting() else dict(num_warps=_SMALL_GEMM.num_warps, num_stages=_SMALL_GEMM.num_stages)
    launch(conv_gemm_kernel, grid, *full, device=device, **meta, HAS_BIAS=False, RESIDUAL=False, SPLIT_K=split,
           **cfg, **extra)
    bc, bt = _INTERP_DW if interpreting() else _reduce_block(t_out)
    launch(splitk_reduce_kernel, (triton.cdiv(t_out, bt), triton.cdiv(c_out, bc), B),
           ws, bias if has_bias else ws, res, out, c_out, t_out, *ws.stride(), *res.stride(), *out.stride(),
           SPLIT_K=split, HAS_BIAS=has_bias, RESIDUAL=residual is not None, BLOCK_C=bc, BLOCK_T=bt, **clamped,
           num_warps=4,
           device=device)


# --- host wrappers -----------------------------------------------------------------------------------------------


def pack_transposed(weight: torch.Tensor) -> torch.Tensor:
    """Transposed-conv weight ``[C_in, C_out, k]`` with memory order ``[k][C_out][C_in]`` (C_in contiguous)."""
    return weight.permute(2, 1, 0).contiguous().permute(2, 1, 0)


def packed_transposed_strides(weight: torch.Tensor) -> tuple[int, int, int]:
    """The strides of the packed layout of a ``[C_in, C_out, k]`` weight: ``(1, C_in, C_in * C_out)``."""
    ci, co, _ = weight.shape
    return 1, ci, ci * co


def is_packed_transposed(weight: torch.Tensor) -> bool:
    """Whether a transposed-conv weight ``[C_in, C_out, k]`` already has the packed strides
    (:func:`packed_transposed_strides`), so the launch can use it without a :func:`pack_transposed` copy."""
    # Size-1 dims are skipped: their strides address nothing, and torch keeps whatever stride they had (so the
    # permute-contiguous-permute of a C_in = C_out = 1 weight keeps its torch strides); the launch passes
    # packed_transposed_strides, which the kernel's row arithmetic (rows n = r * C_out + co) relies on.
    return all(size == 1 or have == want
               for size, have, want in zip(weight.shape, weight.stride(), packed_transposed_strides(weight)))


FAST_SIN = True  # on a GPU with fp16/bf16 activations the fused SnakeBeta uses :func:`_sin_fast`


def _snake_mode(x: torch.Tensor, on: bool) -> int:
    """The ``SNAKE`` constexpr: 0 off, 1 accurate sin (fp32, interpreter), 2 fast sin (GPU, fp16/bf16)."""
    if not on:
        return 0
    fast = FAST_SIN and not interpreting() and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    return 2 if fast else 1


def _flags(x: torch.Tensor) -> dict:
    return dict(UPCAST=interpreting(), IEEE=x.dtype == torch.float32)


def _new_state(x: torch.Tensor, state: torch.Tensor | None, ctx: int, update_state: bool = False) -> torch.Tensor:
    """The last ``ctx`` raw samples of ``cat(state or zeros, x)``; ``update_state``: written into ``state`` (after
    the conv that read it, stream-ordered; one copy when ``T >= ctx``) and an empty placeholder returned."""
    B, C, T = x.shape
    if update_state:
        if ctx and T >= ctx:
            state.copy_(x[..., T - ctx:])
        elif ctx:  # the shifted old context overlaps its destination: through a fresh tensor
            state.copy_(torch.cat((state[..., T:], x), dim=-1))
        return x.new_empty(0)
    if ctx == 0:
        return x.new_empty(B, C, 0)
    if T >= ctx:
        return x[..., T - ctx:].clone(memory_format=torch.contiguous_format)
    prev = state if state is not None else x.new_zeros(B, C, ctx)
    return torch.cat((prev[..., T:], x), dim=-1)


def snake_beta(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
               state: torch.Tensor | None = None) -> torch.Tensor:
    """SnakeBeta of x ``[B, C, T]`` (alpha/beta ``[C]``, log space) into a new contiguous tensor; with ``state``
    ``[B, C, ctx]``, of ``cat(state, x)`` (``[B, C, ctx + T]``: the pre-activated input of a streaming conv)."""
    B, C, T = x.shape
    ctx = state.shape[-1] if state is not None else 0
    out = torch.empty(B, C, ctx + T, device=x.device, dtype=x.dtype)
    st = state if state is not None else x
    bc, bt = _INTERP_DW if interpreting() else (8, 256)
    launch(snake_kernel, (triton.cdiv(ctx + T, bt), triton.cdiv(C, bc), B), x, st, alpha, beta, out, C, T, ctx,
           *x.stride(), *st.stride(), *out.stride(), BLOCK_C=bc, BLOCK_T=bt, MODE=_snake_mode(x, True),
           HAS_STATE=state is not None, num_warps=4, device=x.device)
    return out


def causal_conv1d(x, weight, bias, stride, dilation, groups, alpha, beta, residual, state, padding=None, *,
                  update_state: bool = False, state_out: bool = True, clamp: float | None = None,
                  out: torch.Tensor | None = None):
    """Dense or depthwise causal conv; arguments as :func:`omni_fast.reference.code2wav.causal_conv1d` (validated).

    x ``[B, C_in, T]``, weight ``[C_out, C_in/groups, k]`` (any strides; packed is fastest), state
    ``[B, C_in, (k-1)*dilation]`` or None. Returns ``(y [B, C_out, ceil(T/stride)], new_state)``;
    ``update_state``: the new state is written into ``state`` and an empty placeholder returned; ``state_out=False``:
    neither (the caller moves it, :mod:`.code2wav_states`). ``clamp``: y clamped to ``[-clamp, clamp]`` in the
    epilogue (Code2Wav's final ``clamp(-1, 1)``: no launch of its own). ``out``: the ``[B, C_out, n_cols]`` tensor
    to write y into, any strides (the kernels store through them: e.g. a transposed view of a ``[B, n_cols, C_out]``
    buffer for a channels-last consumer); returned as y.

    ``padding`` (non-causal, no state): ``nn.Conv1d(padding=p)``'s zero padding of ``p`` samples on both sides
    instead of the causal left context. The kernels read ``cat(zeros[ctx], x)`` and zeros past the end of x, so this
    is the same kernel with ``ctx = p`` and ``(T + 2p - (k-1)*dilation - 1) // stride + 1`` output columns; returns
    ``(y, None)``.
    """
    B, c_in, T = x.shape
    c_out, ci_g, k = weight.shape
    if padding is None:
        ctx, n_cols = (k - 1) * dilation + 1 - stride, -(-T // stride)
    else:
        ctx, n_cols = padding, max((T + 2 * padding - (k - 1) * dilation - 1) // stride + 1, 0)
    if out is None:
        out = torch.empty(B, c_out, n_cols, device=x.device, dtype=x.dtype)
    snake = alpha is not None
    has_state = state is not None
    st = state if has_state else x
    res = residual if residual is not None else out
    if groups == c_in and groups == c_out and ci_g == 1:
        bc, bt = _INTERP_DW if interpreting() else _DW_BLOCK
        launch(dwconv_kernel, (triton.cdiv(n_cols, bt), triton.cdiv(c_out, bc), B),
               x, st, weight, bias if bias is not None else x, alpha if snake else x, beta if snake else x, res, out,
               T, ctx, n_cols, c_out, dilation, stride, *x.stride(), *st.stride(), weight.stride(0), weight.stride(2),
               *res.stride(), *out.stride(),
               KSIZE=k, HAS_STATE=has_state, HAS_BIAS=bias is not None, SNAKE=_snake_mode(x, snake),
               RESIDUAL=residual is not None, **({} if clamp is None else dict(CLAMP=float(clamp))),
               BLOCK_C=bc, BLOCK_T=bt, num_warps=_DW_WARPS, device=x.device)
    else:
        co_g = c_out // groups
        xin, st, t_in, ctx_in, has_state, snake = _preactivated(
            x, state, alpha, beta, snake, ctx, dict(taps=k, rows=co_g, weight_numel=weight.numel(), n_cols=n_cols))
        _launch_gemm(n_cols, co_g, B * groups,
                     (xin, st, weight, bias if bias is not None else x, alpha if snake else x, beta if snake else x),
                     (t_in, ctx_in, n_cols, _length_bucket(n_cols), co_g, ci_g, co_g, groups, dilation, stride, 0,
                      *xin.stride(), *st.stride(), weight.stride(0), weight.stride(1), weight.stride(2)),
                     out=out, bias=bias, residual=residual, ci_g=ci_g, device=x.device, clamp=clamp,
                     KSIZE=k, PHASES=1, HAS_STATE=has_state, SNAKE=_snake_mode(x, snake), **_flags(x))
    if not state_out:
        return out, x.new_empty(0)
    return out, (_new_state(x, state, ctx, update_state) if padding is None else None)


def causal_conv_transpose1d(x, weight, bias, stride, alpha, beta, state, *, update_state: bool = False,
                            state_out: bool = True):
    """Causal transposed conv (k = m * stride); arguments as the reference's (validated).

    x ``[B, C_in, L]``, weight ``[C_in, C_out, k]`` (packed with :func:`pack_transposed` to avoid a copy), state
    ``[B, C_in, m-1]`` or None. Returns ``(y [B, C_out, (L' - m + 1) * stride], new_state)``, ``L'`` = L + state
    (``update_state`` / ``state_out`` as :func:`causal_conv1d`).
    """
    B, c_in, L = x.shape
    _, c_out, k = weight.shape
    m = k // stride
    if not is_packed_transposed(weight):
        weight = pack_transposed(weight)
    ctx = m - 1 if state is not None else 0
    full = L + ctx
    n_cols = max(full - m + 1, 0)
    out = torch.empty(B, c_out, n_cols * stride, device=x.device, dtype=x.dtype)
    xin, st, t_in, ctx_in, has_state, snake = _preactivated(
        x, state, alpha, beta, alpha is not None, ctx,
        dict(taps=m, rows=stride * c_out, weight_numel=weight.numel(), n_cols=n_cols))
    # Tap j reads input q + j with kernel index (m-1-j) * stride + r: start at the last tap, walk backwards.
    # rows n = r * C_out + co are evenly spaced (row stride C_in) in the packed layout
    s_ci, row_stride, s_k = packed_transposed_strides(weight)
    _launch_gemm(n_cols, stride * c_out, B,
                 (xin, st, weight, bias if bias is not None else x, alpha if snake else x, beta if snake else x),
                 (t_in, ctx_in, n_cols, _length_bucket(n_cols), stride * c_out, c_in, c_out, 1, 1, 1,
                  (m - 1) * stride * s_k, *xin.stride(), *st.stride(),
                  row_stride, s_ci, -stride * s_k),
                 out=out, bias=bias, residual=None, ci_g=c_in, device=x.device,
                 KSIZE=m, PHASES=stride, HAS_STATE=has_state, SNAKE=_snake_mode(x, snake), **_flags(x))
    if not state_out:
        return out, x.new_empty(0)
    if update_state:  # (validated: a state is given; as a conv1d state with the transposed conv's context)
        return out, _new_state(x, state, m - 1, True)
    return out, _new_state_transposed(x, state, m - 1)


def _preactivated(x, state, alpha, beta, snake: bool, ctx: int, shape: dict):
    """The GEMM's input ``(x, state, t_in, ctx, HAS_STATE, SNAKE)``: unchanged (the SnakeBeta fused), or, where
    :func:`.code2wav_preact.use_preactivation` picks it, ``cat(state, x)`` activated once into a buffer (read
    from position 0: no state, ``ctx = 0``; without a state the causal zero padding stays, as SnakeBeta(0) = 0)."""
    from . import code2wav_preact

    has_state = state is not None
    B, c_in, T = x.shape
    window = T + (ctx if has_state else 0)
    if not snake or not code2wav_preact.use_preactivation(B, c_in, window, elt=x.element_size(), **shape):
        return x, (state if has_state else x), T, ctx, has_state, snake
    act = snake_beta(x, alpha, beta, state)
    return act, act, window, (0 if has_state else ctx), False, False


def _new_state_transposed(x: torch.Tensor, state: torch.Tensor | None, ctx: int) -> torch.Tensor:
    B, C, L = x.shape
    if ctx == 0:
        return x.new_empty(B, C, 0)
    if L >= ctx:
        return x[..., L - ctx:].clone(memory_format=torch.contiguous_format)
    return torch.cat((state[..., L:], x), dim=-1)  # validated: state given whenever L < ctx
