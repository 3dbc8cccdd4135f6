"""Code2Wav streaming: several convs' left contexts moved to their next push in one launch.

A stateful causal conv keeps the last ``ctx`` raw inputs of ``cat(state, x)`` (:mod:`.code2wav`). Moving them is
one small copy per conv (and a concatenation when ``T < ctx``: the old context shifts inside its own buffer), ~20
graph nodes per Code2Wav push. :func:`update_conv_states` does it for up to :data:`MAX_PAIRS` convs at once, after
they have all read their old state: ``state[b, c, j] = cat(state, x)[b, c, T + j]`` for ``j < ctx``.

One program owns whole rows (``BLOCK_C`` channels of one batch row, every ``j``), loads a ``BLOCK_K`` chunk of the
sources, waits for the whole CTA (``debug_barrier``) and then stores: a shift by ``T < ctx`` inside one state buffer
reads positions ``>= j`` only, so chunk by chunk in increasing ``j`` nothing is overwritten before it is read. The
pairs travel as tuples (one constexpr ``N``, unrolled); a pure copy, exact in every dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .launch import interpreting, launch, static_case

MAX_PAIRS = 8  # convs per launch: the tuples are padded to this (one specialisation per dtype)
_BLOCK_C, _BLOCK_K = 16, 64  # 16 channel rows x 64 context samples per chunk (the real contexts are 1 .. 54)
_INTERP_BLOCK_C = 64  # fewer, larger programs under the interpreter (programs run one after another)


@triton.jit
def _shift_rows(s_ptr, x_ptr, n_ch, ctx, t_in, sb, sc, st, xb, xc, xt, b, c0, BLOCK_C: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """``state[b, c0:c0+BLOCK_C, :ctx] = cat(state, x)[b, c0:c0+BLOCK_C, t_in : t_in + ctx]``, chunk by chunk."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_ch
    s_row = s_ptr + b.to(tl.int64) * sb + offs_c[:, None].to(tl.int64) * sc
    x_row = x_ptr + b.to(tl.int64) * xb + offs_c[:, None].to(tl.int64) * xc
    for k0 in range(0, ctx, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        src = j + t_in  # position in cat(state, x)
        mask = mask_c[:, None] & (j < ctx)[None, :]
        old = (src < ctx)[None, :]
        v_s = tl.load(s_row + src[None, :].to(tl.int64) * st, mask=mask & old, other=0.0)
        v_x = tl.load(x_row + (src - ctx)[None, :].to(tl.int64) * xt, mask=mask & (~old), other=0.0)
        v = tl.where(old, v_s, v_x)
        tl.debug_barrier()  # every thread of the CTA has read its sources before any overwrites them
        tl.store(s_row + j[None, :].to(tl.int64) * st, v, mask=mask)


@triton.jit
def conv_states_kernel(states, inputs, n_ch, ctx, t_in, s_strides, x_strides, batch, N: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid ``(batch * max_i cdiv(n_ch[i], BLOCK_C), pairs)``: program ``(p, i)`` moves pair ``i``'s rows of batch
    row ``p // cdiv(n_ch[i], BLOCK_C)``. Tuples of ``N`` entries (pointers, ints; strides as ``(b, c, t)``)."""
    pid = tl.program_id(0)
    which = tl.program_id(1)
    for i in tl.static_range(N):
        if which == i:
            blocks = tl.cdiv(n_ch[i], BLOCK_C)
            b = pid // blocks
            if b < batch:
                _shift_rows(states[i], inputs[i], n_ch[i], ctx[i], t_in[i], s_strides[i][0], s_strides[i][1],
                            s_strides[i][2], x_strides[i][0], x_strides[i][1], x_strides[i][2], b,
                            (pid % blocks) * BLOCK_C, BLOCK_C, BLOCK_K)


def _padded(items: list, n: int) -> tuple:
    return tuple(items + [items[0]] * (n - len(items)))


def update_conv_states(states: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
    """In place, for each pair: ``state [B, C, ctx] <- cat(state, x [B, C, T])[..., T:T+ctx]`` (validated: one dtype
    and device, ``ctx > 0``, states disjoint from every input and from each other; any strides). One launch per
    :data:`MAX_PAIRS` pairs."""
    for lo in range(0, len(states), MAX_PAIRS):
        s, x = list(states[lo:lo + MAX_PAIRS]), list(inputs[lo:lo + MAX_PAIRS])
        B = s[0].shape[0]
        bc = _INTERP_BLOCK_C if interpreting() else _BLOCK_C
        rows = B * max(triton.cdiv(t.shape[1], bc) for t in s)
        launch(conv_states_kernel, (rows, len(s)), _padded(s, MAX_PAIRS), _padded(x, MAX_PAIRS),
               _padded([t.shape[1] for t in s], MAX_PAIRS), _padded([t.shape[2] for t in s], MAX_PAIRS),
               _padded([t.shape[2] for t in x], MAX_PAIRS), _padded([tuple(t.stride()) for t in s], MAX_PAIRS),
               _padded([tuple(t.stride()) for t in x], MAX_PAIRS), B, N=MAX_PAIRS, BLOCK_C=bc, BLOCK_K=_BLOCK_K,
               num_warps=4, device=s[0].device)


def _register_static_cases():
    for dt in ("bf16", "fp16", "fp32"):
        ptrs = tuple(f"*{dt}" for _ in range(MAX_PAIRS))
        ints = tuple("i32" for _ in range(MAX_PAIRS))
        strides = tuple(("i32", "i32", "i32") for _ in range(MAX_PAIRS))
        sig = dict(states=ptrs, inputs=ptrs, n_ch=ints, ctx=ints, t_in=ints, s_strides=strides, x_strides=strides,
                   batch="i32", N="constexpr", BLOCK_C="constexpr", BLOCK_K="constexpr")
        static_case(f"code2wav.conv_states[{dt},{MAX_PAIRS} pairs,any strides]", conv_states_kernel, sig,
                    dict(N=MAX_PAIRS, BLOCK_C=_BLOCK_C, BLOCK_K=_BLOCK_K))


_register_static_cases()
