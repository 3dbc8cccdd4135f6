"""Code2Wav streaming state moves: ``ops.update_conv_states`` (several convs' contexts in one launch) against the
reference and against each conv's own ``update_state=True``; the convs' ``state_out=False``; bad input; streams with
the fast path ``code2wav_state_moves`` equal to the default streams."""

import pytest
import torch

import omni_fast
from omni_fast.testing import DEVICE, KERNEL_DTYPES

from _code2wav_helpers import (  # noqa: E402  (skips without transformers, as every Code2Wav test)
    _check_utterances,
    _hf_model,
    _run_with_resets,
    _snake_params,
)


def _want(state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The last ``ctx`` raw samples of ``cat(state, x)``."""
    return torch.cat((state, x), dim=-1)[..., x.shape[-1]:]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_update_conv_states_equals_the_concatenation(backend, dtype):
    """Odd channel counts (more than one channel block), contexts 1 .. 70 (more than one context chunk), pushes
    shorter than, equal to and longer than the context, a T = 0 input, an empty context, no channels, strided
    inputs and states, more pairs than one launch takes (8): exact, every dtype."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 1, 4), (70, 6, 2), (5, 6, 6), (17, 18, 40), (1, 54, 5), (66, 70, 71), (9, 3, 0), (4, 0, 3),
              (2, 7, 7), (0, 5, 3), (33, 9, 1), (8, 2, 2)]  # (C, ctx, T)
    B = 3
    states, inputs = [], []
    for i, (c, ctx, t) in enumerate(shapes):
        s = torch.randn(B, c, ctx, generator=g).to(DEVICE, dtype)
        x = torch.randn(B, c, t, generator=g).to(DEVICE, dtype)
        if i == 3:  # a time-major input (as a permuted [B, T, C] buffer) and a state inside a wider buffer
            x = torch.randn(B, t, c, generator=g).to(DEVICE, dtype).permute(0, 2, 1)
            s = torch.randn(B, c, ctx + 5, generator=g).to(DEVICE, dtype)[..., 2:2 + ctx]
        states.append(s)
        inputs.append(x)
    want = [_want(s, x) for s, x in zip(states, inputs)]
    wide = states[3]._base
    around = torch.cat((wide[..., :2], wide[..., 2 + shapes[3][1]:]), dim=-1).clone()
    omni_fast.ops.update_conv_states(states, inputs, backend=backend)
    for i, (s, w) in enumerate(zip(states, want)):
        assert torch.equal(s, w), f"pair {i} {shapes[i]}"
    # nothing outside the strided state was written
    assert torch.equal(torch.cat((wide[..., :2], wide[..., 2 + shapes[3][1]:]), dim=-1), around)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_state_out_false_then_one_move_equals_update_state(backend):
    """Convs run with ``state_out=False`` leave their states alone and return the same outputs; one
    ``update_conv_states`` afterwards gives what ``update_state=True`` writes, conv and transposed, for chunks
    shorter and longer than the context."""
    x = torch.randn(2, 6, 40, device=DEVICE)
    w = torch.randn(5, 6, 7, device=DEVICE) * 0.3
    wt = torch.randn(6, 5, 6, device=DEVICE) * 0.3
    snake = _snake_params(6, torch.float32)
    st, st_t = torch.randn(2, 6, 18, device=DEVICE), torch.randn(2, 6, 1, device=DEVICE)
    for a, e in ((0, 1), (1, 12), (12, 40)):
        chunk = x[..., a:e]
        want_st, want_t = st.clone(), st_t.clone()
        y, _ = omni_fast.ops.causal_conv1d(chunk, w, dilation=3, snake=snake, state=want_st, update_state=True,
                                           backend=backend)
        yt, _ = omni_fast.ops.causal_conv_transpose1d(chunk, wt, stride=3, snake=snake, state=want_t,
                                                      update_state=True, backend=backend)
        before, before_t = st.clone(), st_t.clone()
        y2, none = omni_fast.ops.causal_conv1d(chunk, w, dilation=3, snake=snake, state=st, state_out=False,
                                               backend=backend)
        yt2, none_t = omni_fast.ops.causal_conv_transpose1d(chunk, wt, stride=3, snake=snake, state=st_t,
                                                            state_out=False, backend=backend)
        assert none.numel() == 0 and none_t.numel() == 0
        assert torch.equal(st, before) and torch.equal(st_t, before_t)
        assert torch.equal(y2, y) and torch.equal(yt2, yt)
        omni_fast.ops.update_conv_states([st, st_t], [chunk, chunk], backend=backend)
        assert torch.equal(st, want_st) and torch.equal(st_t, want_t)


def test_update_conv_states_bad_input():
    s, x = torch.zeros(1, 4, 3, device=DEVICE), torch.zeros(1, 4, 5, device=DEVICE)
    ops = omni_fast.ops
    with pytest.raises(TypeError, match="lists"):
        ops.update_conv_states(s, x)
    with pytest.raises(ValueError, match="same length"):
        ops.update_conv_states([s], [])
    with pytest.raises(ValueError, match="agree in"):
        ops.update_conv_states([s], [torch.zeros(1, 3, 5, device=DEVICE)])
    with pytest.raises(ValueError, match="states\\[1\\]"):  # another batch size
        ops.update_conv_states([s, torch.zeros(2, 4, 3, device=DEVICE)], [x, torch.zeros(2, 4, 5, device=DEVICE)])
    with pytest.raises(TypeError, match="dtype"):
        ops.update_conv_states([s], [x.half()])
    with pytest.raises(TypeError, match="states\\[0\\]"):
        ops.update_conv_states([s.long()], [x])
    buf = torch.zeros(1, 4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="overlap"):  # a state inside its own input
        ops.update_conv_states([buf[..., :3]], [buf[..., 1:6]])
    with pytest.raises(ValueError, match="overlap"):  # two pairs sharing a state
        ops.update_conv_states([s, s], [x, x.clone()])
    ops.update_conv_states([], [])  # nothing to do
    w = torch.zeros(4, 4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="state_out=False needs a state"):
        ops.causal_conv1d(x, w, state_out=False)
    with pytest.raises(ValueError, match="state_out=False needs a state"):
        ops.causal_conv1d(x, w, state=torch.zeros(1, 4, 2, device=DEVICE), update_state=True, state_out=False)
    with pytest.raises(TypeError, match="state_out"):
        ops.causal_conv1d(x, w, state=torch.zeros(1, 4, 2, device=DEVICE), state_out=0)


def test_update_conv_states_writes_nothing_outside_the_states():
    """Guard bytes around every state (and input): the Triton kernel writes inside the states only."""
    from omni_fast.testing import guarded_allocations

    with guarded_allocations() as guards:
        states = [torch.empty(2, c, ctx, device=DEVICE).normal_() for c, ctx in ((19, 3), (5, 54), (40, 1))]
        inputs = [torch.empty(2, c, t, device=DEVICE).normal_() for c, t in ((19, 1), (5, 70), (40, 9))]
        assert len(guards.slabs) == 6  # every state and input is guarded
        want = [_want(s, x) for s, x in zip(states, inputs)]
        omni_fast.ops.update_conv_states(states, inputs, backend="triton")
    assert not guards.violations()
    assert all(torch.equal(s, w) for s, w in zip(states, want))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_stream_with_state_moves_equals_the_default_stream(backend):
    """The fast path code2wav_state_moves (read when a stream is made): B = 3 rows with resets (some twice), one
    frame and several frames per push (shorter and longer than the convs' contexts), odd layouts: bit-equal to the
    default stream, and every row's utterances equal their one-shot decodes."""
    from omni_fast import fast_paths

    layout, schedule = ((0, [(3, []), (1, []), (2, [1]), (1, [2]), (4, [1, 0]), (1, [])]) if backend == "reference"
                        else (1, [(2, []), (1, [1]), (3, [0]), (1, [])]))
    hf = _hf_model(layout, num_hidden_layers=1 if backend == "triton" else 2)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend=backend)
    codes = torch.randint(0, 16, (3, 4, sum(f for f, _ in schedule)))
    runs = []
    for on in (False, True):
        with fast_paths.enable("code2wav_state_moves", on):
            stream = model.stream(3, cuda_graphs=False)
        assert stream._move_states is on
        runs.append(_run_with_resets(model, codes, schedule, stream=stream))
    (wav, starts), (wav_moves, starts_moves) = runs
    assert torch.equal(wav_moves, wav) and starts_moves == starts
    _check_utterances(model, codes, wav_moves, starts_moves, rtol=1e-4, atol=5e-5)
