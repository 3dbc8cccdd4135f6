"""Public Code2Wav ops: :func:`snake_beta`, :func:`causal_conv1d`, :func:`causal_conv_transpose1d`,
:func:`update_conv_states`.

Tensors are channels-first ``[B, C, T]`` like ``nn.Conv1d``. The convolutions follow transformers'
``Qwen3OmniMoeCausalConvNet`` / ``Qwen3OmniMoeCausalTransConvNet`` exactly and can fuse the SnakeBeta that precedes
them (``snake=(alpha, beta)``) and, for ``causal_conv1d``, the residual that follows (``residual=``). Both return
``(y, new_state)`` so a stream carries each layer's left context instead of recomputing it; see
:mod:`omni_fast.reference.code2wav` for the state's exact meaning (raw inputs, before the SnakeBeta).

Weights use the torch layouts (``[C_out, C_in/groups, k]`` and ``[C_in, C_out, k]``); any memory order is accepted,
and the packed order of :func:`pack_conv1d_weight` / :func:`pack_conv_transpose1d_weight` (same shape and values,
memory order ``[k][C_out][C_in]``) is the fast one for the Triton backend: pack once at load time.
"""

from __future__ import annotations

import torch

from ..reference import code2wav as ref
from ..validation import (FLOAT_DTYPES, check_bool, check_float, check_inference_only, check_output,
                          check_positive_int, check_same_dtype, check_tensor)

# Bound on stride / dilation / kernel span, checked before any allocation: the streaming state holds
# (k - 1) * dilation samples per channel (Code2Wav's largest is 9 * 9 = 81; a huge dilation would allocate TBs).
MAX_CONV_SPAN = 2**16
from ._dispatch import dispatched_op


def pack_conv1d_weight(weight: torch.Tensor) -> torch.Tensor:
    """conv1d weight ``[C_out, C_in/g, k]`` (any dtype) -> same shape, dtype and values, memory order
    ``[k][C_out][C_in]`` (C_in contiguous: the Triton kernels' coalesced layout, see
    :mod:`omni_fast.kernels.code2wav`)."""
    return weight.permute(2, 0, 1).contiguous().permute(1, 2, 0)


def pack_conv_transpose1d_weight(weight: torch.Tensor) -> torch.Tensor:
    """transposed-conv weight ``[C_in, C_out, k]`` (any dtype) -> same shape, dtype and values, memory order
    ``[k][C_out][C_in]``."""
    return weight.permute(2, 1, 0).contiguous().permute(2, 1, 0)


# --- custom ops ----------------------------------------------------------------------------------------------------


def _snake_fake(x, alpha, beta, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@dispatched_op("snake_beta", fake=_snake_fake)
def _snake_op(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, backend: str) -> torch.Tensor:
    """SnakeBeta of x ``[B, C, T]``."""


@_snake_op.impl("reference")
def _snake_reference(x, alpha, beta):
    return ref.snake_beta(x, alpha, beta)


@_snake_op.impl("triton")
def _snake_triton(x, alpha, beta):
    from ..kernels import code2wav as kernels

    return kernels.snake_beta(x, alpha, beta)


# ``update_state``: the new state is written into ``state`` in place (declared mutated) and the op's second output
# is an empty placeholder: a stream then moves its context with one copy, not a fresh tensor plus a copy into its
# fixed buffer (one launch fewer per stateful conv; the state's address stays fixed for CUDA graphs).
# ``state_out=False``: the op leaves ``state`` alone and returns the placeholder; the caller moves the contexts of
# several convs later with one :func:`update_conv_states` launch (Code2WavStream: 4 launches a push instead of ~20).


def _state_result(x, ctx: int, update_state: bool, state_out: bool = True) -> torch.Tensor:
    return x.new_empty(0) if update_state or not state_out else x.new_empty(x.shape[0], x.shape[1], ctx)


def _conv_out(x: torch.Tensor, c_out: int, t_out: int, channels_last_out: bool) -> torch.Tensor:
    """A new ``[B, C_out, t_out]`` output; ``channels_last_out``: a transposed view of a ``[B, t_out, C_out]``
    buffer (``y.transpose(1, 2)`` is contiguous)."""
    if channels_last_out:
        return x.new_empty(x.shape[0], t_out, c_out).transpose(1, 2)
    return x.new_empty(x.shape[0], c_out, t_out)


def _conv_fake(x, weight, bias, stride, dilation, groups, alpha, beta, residual, state, update_state, state_out,
               clamp, channels_last_out, backend):
    B, c_in, T = x.shape
    ctx = ref.conv1d_context(weight.shape[-1], dilation, stride)
    y = _conv_out(x, weight.shape[0], -(-T // stride), channels_last_out)
    return y, _state_result(x, ctx, update_state, state_out)


@dispatched_op("causal_conv1d", mutates_args=("state",), fake=_conv_fake)
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, dilation: int,
             groups: int, alpha: torch.Tensor | None, beta: torch.Tensor | None, residual: torch.Tensor | None,
             state: torch.Tensor | None, update_state: bool, state_out: bool, clamp: float | None,
             channels_last_out: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal conv1d (+ SnakeBeta in, + residual out, clamped); returns (y, new_state or an empty placeholder)."""


def _kept(new: torch.Tensor, state, update_state: bool, state_out: bool) -> torch.Tensor:
    """The reference backend's state result under ``update_state`` (copied into ``state``) / ``state_out``."""
    if not state_out:
        return new.new_empty(0)
    if not update_state:
        return new
    state.copy_(new)
    return new.new_empty(0)


@_conv_op.impl("reference")
def _conv_reference(x, weight, bias, stride, dilation, groups, alpha, beta, residual, state, update_state,
                    state_out, clamp, channels_last_out):
    snake = (alpha, beta) if alpha is not None else None
    y, new = ref.causal_conv1d(x, weight, bias, stride=stride, dilation=dilation, groups=groups, snake=snake,
                               residual=residual, state=state)
    y = y if clamp is None else y.clamp(-clamp, clamp)
    if channels_last_out:  # (the reference computes channels-first: one copy into the asked layout)
        y = _conv_out(x, y.shape[1], y.shape[2], True).copy_(y)
    return y, _kept(new, state, update_state, state_out)


@_conv_op.impl("triton")
def _conv_triton(x, weight, bias, stride, dilation, groups, alpha, beta, residual, state, update_state, state_out,
                 clamp, channels_last_out):
    from ..kernels import code2wav as kernels

    return kernels.causal_conv1d(x, weight, bias, stride, dilation, groups, alpha, beta, residual, state,
                                 update_state=update_state, state_out=state_out, clamp=clamp,
                                 out=_conv_out(x, weight.shape[0], -(-x.shape[-1] // stride), channels_last_out))


def _convt_fake(x, weight, bias, stride, alpha, beta, state, update_state, state_out, backend):
    B, c_in, L = x.shape
    m = weight.shape[-1] // stride
    full = L + (m - 1 if state is not None else 0)
    return (x.new_empty(B, weight.shape[1], max(full - m + 1, 0) * stride),
            _state_result(x, m - 1, update_state, state_out))


@dispatched_op("causal_conv_transpose1d", mutates_args=("state",), fake=_convt_fake)
def _convt_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
              alpha: torch.Tensor | None, beta: torch.Tensor | None, state: torch.Tensor | None,
              update_state: bool, state_out: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal transposed conv (+ SnakeBeta in); returns (y, new_state or an empty placeholder)."""


@_convt_op.impl("reference")
def _convt_reference(x, weight, bias, stride, alpha, beta, state, update_state, state_out):
    snake = (alpha, beta) if alpha is not None else None
    y, new = ref.causal_conv_transpose1d(x, weight, bias, stride=stride, snake=snake, state=state)
    return y, _kept(new, state, update_state, state_out)


@_convt_op.impl("triton")
def _convt_triton(x, weight, bias, stride, alpha, beta, state, update_state, state_out):
    from ..kernels import code2wav as kernels

    return kernels.causal_conv_transpose1d(x, weight, bias, stride, alpha, beta, state, update_state=update_state,
                                           state_out=state_out)


@dispatched_op("code2wav_update_states", mutates_args=("states",))
def _states_op(states: list[torch.Tensor], inputs: list[torch.Tensor], backend: str) -> None:
    """In place: each state ``[B, C, ctx]`` <- the last ``ctx`` samples of ``cat(state, x)``."""


@_states_op.impl("reference")
def _states_reference(states, inputs):
    for state, x in zip(states, inputs):
        state.copy_(torch.cat((state, x), dim=-1)[..., x.shape[-1]:])


@_states_op.impl("triton")
def _states_triton(states, inputs):
    from ..kernels import code2wav_states

    code2wav_states.update_conv_states(states, inputs)


# --- validation ----------------------------------------------------------------------------------------------------


def _check_kernel_size(k: int) -> None:
    """A conv weight's kernel size (its last dimension) is at least 1 (k = 0 spans -1 samples)."""
    if k < 1:
        raise ValueError("weight needs a kernel size of at least 1")


def _check_x(x: torch.Tensor) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3)


def _check_snake(snake, channels: int, x: torch.Tensor):
    if snake is None:
        return None, None
    if not isinstance(snake, (tuple, list)) or len(snake) != 2:
        raise TypeError(f"snake must be a pair (alpha, beta) of [C_in] tensors, got {type(snake).__name__}")
    alpha, beta = snake
    check_tensor("snake alpha", alpha, dtypes=FLOAT_DTYPES, shape=(channels,), device=x.device, contiguous=True)
    check_tensor("snake beta", beta, dtypes=FLOAT_DTYPES, shape=(channels,), device=x.device, contiguous=True)
    check_same_dtype(x=x, **{"snake alpha": alpha, "snake beta": beta})
    return alpha, beta


def _check_channels(x: torch.Tensor) -> None:
    # torch's conv refuses C_in = 0 (or, for conv1d, returns a wrong-shaped result) while the Triton kernels
    # return the bias alone: refuse it up front so the backends cannot disagree.
    if x.shape[1] == 0:
        raise ValueError(f"x must have at least one input channel (C_in), got shape {list(x.shape)}")


def _check_bias(bias, channels: int, x: torch.Tensor):
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, shape=(channels,), device=x.device, contiguous=True)
        check_same_dtype(x=x, bias=bias)


def _check_state(state, x: torch.Tensor, ctx: int, what: str, update_state=False, state_out=True, **inputs):
    update_state = check_bool("update_state", update_state)
    if not check_bool("state_out", state_out) and (update_state or state is None):
        raise ValueError("state_out=False needs a state and update_state=False (the caller moves the state later)")
    if state is None:
        if update_state:
            raise ValueError("update_state=True needs a state to update (the first push of a stream has none)")
        return False
    check_tensor("state", state, dtypes=FLOAT_DTYPES, ndim=3, device=x.device)
    check_same_dtype(x=x, state=state)
    want = (x.shape[0], x.shape[1], ctx)
    if tuple(state.shape) != want:
        raise ValueError(f"state must have shape [B, C_in, context] = {list(want)} for {what}, got "
                         f"{list(state.shape)} (a state from another layer or config?)")
    if update_state:  # written in place: it must not share memory with what the op reads
        check_output("state", state, x=x, **{k: v for k, v in inputs.items() if v is not None})
    return update_state


# --- public functions ----------------------------------------------------------------------------------------------


def snake_beta(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, *, backend: str | None = None
               ) -> torch.Tensor:
    """SnakeBeta ``x + 1 / (exp(beta) + 1e-9) * sin(x * exp(alpha))**2`` of x ``[B, C, T]`` (fp16/bf16/fp32),
    alpha/beta ``[C]`` in log space, same dtype. Returns a new ``[B, C, T]`` tensor."""
    _check_x(x)
    alpha, beta = _check_snake((alpha, beta), x.shape[1], x)
    be = _snake_op.resolve((x, alpha, beta), backend)
    return _snake_op(x, alpha, beta, be)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    snake: tuple[torch.Tensor, torch.Tensor] | None = None,
    residual: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    update_state: bool = False,
    state_out: bool = True,
    clamp: float | None = None,
    channels_last_out: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' causal conv1d with an optional fused input SnakeBeta, output residual and output clamp.

    x ``[B, C_in, T]``; weight ``[C_out, C_in/groups, k]``; bias ``[C_out]``; snake ``(alpha, beta)`` ``[C_in]``;
    residual ``[B, C_out, ceil(T/stride)]``; state ``[B, C_in, (k-1)*dilation]`` raw inputs (``stride=1`` only).
    All floats in one dtype. Returns ``(y [B, C_out, ceil(T/stride)], new_state [B, C_in, (k-1)*d + 1 - stride])``.
    ``update_state=True``: the new state is written into ``state`` in place (it must not overlap any input) and
    returned as ``state`` itself (a stream's fixed buffer: one copy per push, no new tensor). ``state_out=False``
    (with a state): ``state`` is left as it is and an empty placeholder returned; move it later with
    :func:`update_conv_states` (``x`` must then stay unchanged until that call). ``clamp``: y clamped to
    ``[-clamp, clamp]`` after the bias and residual (``y.clamp(-clamp, clamp)``, NaN passes: Code2Wav's final
    ``clamp(-1, 1)`` fused into its output conv). ``channels_last_out``: y (same shape and values) is a transposed
    view of a ``[B, ceil(T/stride), C_out]`` buffer, so ``y.transpose(1, 2)`` is contiguous: a consumer that works
    channels-last (Code2Wav's ConvNeXt LayerNorm) then reads it without a copy (the kernels store through y's
    strides: no extra launch on the Triton backend).
    """
    _check_x(x)
    _check_channels(x)
    B, c_in, T = x.shape
    stride = check_positive_int("stride", stride, maximum=MAX_CONV_SPAN)
    dilation = check_positive_int("dilation", dilation, maximum=MAX_CONV_SPAN)
    groups = check_positive_int("groups", groups, maximum=max(c_in, 1))
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=3, device=x.device)
    check_same_dtype(x=x, weight=weight)
    c_out, ci_g, k = weight.shape
    if c_out == 0:
        raise ValueError(f"weight must have at least one output channel, got shape {list(weight.shape)}")
    if (k - 1) * dilation > MAX_CONV_SPAN:
        raise ValueError(f"dilation={dilation} with kernel size {k} spans {(k - 1) * dilation} samples, more than "
                         f"{MAX_CONV_SPAN}")
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide C_in={c_in} and C_out={c_out}")
    if ci_g * groups != c_in:
        raise ValueError(f"channel mismatch: weight expects {ci_g * groups} input channels ({ci_g} per group x "
                         f"{groups} groups), x has C_in={c_in}")
    _check_kernel_size(k)
    if stride > (k - 1) * dilation + 1:
        raise ValueError(f"stride={stride} must not exceed the effective kernel size {(k - 1) * dilation + 1}")
    _check_bias(bias, c_out, x)
    alpha, beta = _check_snake(snake, c_in, x)
    t_out = -(-T // stride)
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES, shape=(B, c_out, t_out), device=x.device)
        check_same_dtype(x=x, residual=residual)
    if state is not None and stride != 1:
        raise ValueError("state (streaming) needs stride=1")
    update_state = _check_state(state, x, ref.conv1d_context(k, dilation, stride), f"k={k}, dilation={dilation}",
                                update_state, state_out, weight=weight, bias=bias, residual=residual, alpha=alpha,
                                beta=beta)
    if clamp is not None:
        clamp = check_float("clamp", clamp, minimum=0.0)
    channels_last_out = check_bool("channels_last_out", channels_last_out)
    be = _conv_op.resolve((x, weight), backend)
    y, new = _conv_op(x, weight, bias, stride, dilation, groups, alpha, beta, residual, state, update_state,
                      bool(state_out), clamp, channels_last_out, be)
    return y, (state if update_state else new)


def causal_conv_transpose1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int,
    snake: tuple[torch.Tensor, torch.Tensor] | None = None,
    state: torch.Tensor | None = None,
    update_state: bool = False,
    state_out: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' causal transposed conv (``k - stride`` samples trimmed at both ends), optional input SnakeBeta.

    x ``[B, C_in, L]`` (fp16/bf16/fp32; weight, bias, snake and state in x's dtype); weight ``[C_in, C_out, k]``
    with ``k = m * stride`` (Code2Wav: m = 1 or 2); bias
    ``[C_out]``; snake ``[C_in]`` pairs; state ``[B, C_in, m-1]`` raw inputs. Returns
    ``(y [B, C_out, (L' - m + 1) * stride], new_state [B, C_in, m-1])`` with ``L' = L (+ m - 1 with a state)``.
    ``update_state=True``: the new state is written into ``state`` in place; ``state_out=False``: left for
    :func:`update_conv_states` (both as :func:`causal_conv1d`).
    """
    _check_x(x)
    _check_channels(x)
    B, c_in, L = x.shape
    stride = check_positive_int("stride", stride, maximum=MAX_CONV_SPAN)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=3, device=x.device)
    check_same_dtype(x=x, weight=weight)
    w_in, c_out, k = weight.shape
    if c_out == 0:
        raise ValueError(f"weight must have at least one output channel, got shape {list(weight.shape)}")
    _check_kernel_size(k)
    if w_in != c_in:
        raise ValueError(f"channel mismatch: weight [C_in, C_out, k] expects C_in={w_in}, x has C_in={c_in}")
    if k % stride:
        raise ValueError(f"kernel size {k} must be a multiple of stride {stride} (k = m * stride)")
    m = k // stride
    _check_bias(bias, c_out, x)
    alpha, beta = _check_snake(snake, c_in, x)
    update_state = _check_state(state, x, m - 1, f"k={k}, stride={stride}", update_state, state_out, weight=weight,
                                bias=bias, alpha=alpha, beta=beta)
    if state is None and L < m - 1:
        raise ValueError(f"starting without a state needs at least {m - 1} input samples to form one, got {L}")
    be = _convt_op.resolve((x, weight), backend)
    y, new = _convt_op(x, weight, bias, stride, alpha, beta, state, update_state, bool(state_out), be)
    return y, (state if update_state else new)


def update_conv_states(states, inputs, *, backend: str | None = None) -> None:
    """Move several streaming convs' states at once, in place: ``state <- cat(state, x)[..., T:T + ctx]`` (the last
    ``ctx`` raw inputs), what each conv's ``update_state=True`` would have written; for convs run with
    ``state_out=False``, after all of them. One launch per 8 pairs on the Triton backend.

    states / inputs: sequences of equal length of ``[B, C_i, ctx_i]`` and ``[B, C_i, T_i]`` tensors (one float dtype,
    one device, any strides; empty states, e.g. ``ctx_i = 0``, are skipped). A state must not share memory with any input or
    another state. Inference-only: states or inputs that require grad (with grad mode on) raise ``ValueError``."""
    if not isinstance(states, (list, tuple)) or not isinstance(inputs, (list, tuple)):
        raise TypeError("states and inputs must be lists (or tuples) of tensors")
    if len(states) != len(inputs):
        raise ValueError(f"states and inputs must have the same length, got {len(states)} and {len(inputs)}")
    pairs = []
    for i, (state, x) in enumerate(zip(states, inputs)):
        check_tensor(f"states[{i}]", state, dtypes=FLOAT_DTYPES, ndim=3)
        check_tensor(f"inputs[{i}]", x, dtypes=FLOAT_DTYPES, ndim=3, device=state.device)
        if state.shape[:2] != x.shape[:2]:
            raise ValueError(f"states[{i}] {list(state.shape)} and inputs[{i}] {list(x.shape)} must agree in [B, C]")
        if state.numel():  # (nothing to move without context, channels or rows)
            pairs.append((i, state, x))  # i: the caller's index, for the messages
    if not pairs:
        return
    # the states are written in place from the inputs: grads of either would be lost without a word
    check_inference_only("update_conv_states", **{f"{n}[{i}]": t for i, s, x in pairs for n, t in
                                                  (("states", s), ("inputs", x))})
    i0, first, _ = pairs[0]
    for i, state, x in pairs:
        check_same_dtype(**{f"states[{i0}]": first, f"states[{i}]": state, f"inputs[{i}]": x})
        check_tensor(f"states[{i}]", state, device=first.device, shape=(first.shape[0],) + tuple(state.shape[1:]))
        others = {f"inputs[{j}]": t for j, _, t in pairs}
        others.update({f"states[{j}]": t for j, t, _ in pairs if j != i})
        check_output(f"states[{i}]", state, **others)
    s, x = [p[1] for p in pairs], [p[2] for p in pairs]
    _states_op(s, x, _states_op.resolve(s + x, backend))


__all__ = ["snake_beta", "causal_conv1d", "causal_conv_transpose1d", "update_conv_states", "pack_conv1d_weight",
           "pack_conv_transpose1d_weight"]
