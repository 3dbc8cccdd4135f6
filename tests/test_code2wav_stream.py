"""The Code2Wav model: one shot and streamed vs transformers, windows, random chunkings, batched streams, rows reset
mid-stream, stream-state resume, bad input to the model."""

import random

import pytest
import torch

import omni_fast
import omni_fast.models  # noqa: F401  (not imported by omni_fast itself)
from omni_fast.testing import assert_matches_reference

transformers = pytest.importorskip("transformers")

from _code2wav_helpers import (  # noqa: E402
    DOWN,
    LAYOUTS,
    ONE_SHOT,
    UP,
    _check_utterances,
    _hf_config,
    _hf_model,
    _models,
    _pre_transformer_reference,
    _pre_transformer_streamed,
    _run_with_resets,
    _stream,
)


# --- the model: one-shot, streaming ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_model_forward_matches_transformers(layout):
    hf, model = _models(layout)
    codes = torch.randint(0, 16, (2, 4, 14))
    with torch.no_grad():
        want = hf(codes)
    torch.testing.assert_close(model(codes), want, rtol=1e-4, atol=5e-5)


def test_model_bf16_error_is_within_transformers_own_bf16_error():
    """bf16 end to end (reference backend): the error vs the fp32 decode is at most 2x transformers' bf16 error."""
    hf, _ = _models(0)
    codes = torch.randint(0, 16, (2, 4, 20))
    with torch.no_grad():
        exact = hf(codes)
        hf_bf16 = hf.to(torch.bfloat16)
        want = hf_bf16(codes)
    model = omni_fast.models.Code2Wav.from_transformers(hf_bf16, backend="reference")
    got = model(codes)
    assert got.dtype == torch.bfloat16
    assert_matches_reference(got, exact, want)


def test_model_forward_triton_matches_transformers():
    hf = _hf_model(1)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    codes = torch.randint(0, 16, (2, 4, 9))
    with torch.no_grad():
        want = hf(codes)
    torch.testing.assert_close(model(codes), want, rtol=1e-4, atol=5e-5)



# (the interpreter is slow: the Triton cases split the chunkings between the dtypes)
@pytest.mark.parametrize("backend,dtype,chunkings", [("reference", torch.float32, [ONE_SHOT, UP, DOWN]),
                                                     ("triton", torch.float32, [ONE_SHOT, UP]),
                                                     ("triton", torch.float16, [DOWN])])
def test_pre_transformer_longer_than_the_window_one_shot_and_streamed(backend, dtype, chunkings):
    """The real window (72) over 153 frames: one shot and streamed in chunks of 1, 7, 72 and 73 frames equal the
    reference's one-shot hidden states (FlashAttention's error rule against the fp64 reference)."""
    hf = _hf_model(0, sliding_window=72, num_hidden_layers=2 if backend == "reference" else 1)
    model = omni_fast.models.Code2Wav.from_transformers(hf.to(dtype), backend=backend)
    emb = torch.randn(2 if backend == "reference" else 1, 153, hf.config.hidden_size)
    with torch.no_grad():
        exact = _pre_transformer_reference(hf, emb.double(), torch.float64)
        want = _pre_transformer_reference(hf, emb, dtype)
        if dtype == torch.float32:  # the reference itself equals transformers' module
            torch.testing.assert_close(want, hf.pre_transformer(inputs_embeds=emb).last_hidden_state, rtol=1e-5,
                                       atol=1e-5)
        for sizes in chunkings:
            got = _pre_transformer_streamed(model, emb.to(dtype), sizes)
            assert_matches_reference(got, exact, want, name=f"chunks {sizes}")


@pytest.mark.parametrize("window,T,sizes", [(72, 153, [1, 7, 72, 73]), (1, 9, [1, 3, 5])])
def test_model_window_matches_transformers_one_shot_and_streamed(window, T, sizes):
    """The whole model past the real window (72), and with window 1 (each frame sees itself only; the KV caches
    are empty ``[B, 0, Hk, D]``), one shot and streamed."""
    hf, model = _models(0, sliding_window=window)
    codes = torch.randint(0, 16, (2, 4, T))
    with torch.no_grad():
        want = hf(codes)
    torch.testing.assert_close(model(codes), want, rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(_stream(model, codes, sizes), want, rtol=1e-4, atol=5e-5)


def _random_chunks(rng, T, max_chunk):
    sizes = []
    while sum(sizes) < T:
        sizes.append(min(rng.choice([0, 1, 1, 2, 3, max_chunk]), T - sum(sizes)))
    return sizes


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_streaming_equals_one_shot_reference_backend(layout):
    _, model = _models(layout)
    rng = random.Random(layout)
    for trial in range(3):
        T = rng.randint(1, 17)
        codes = torch.randint(0, 16, (2, 4, T))
        whole = model(codes)
        got = _stream(model, codes, _random_chunks(rng, T, 7))
        torch.testing.assert_close(got, whole, rtol=1e-4, atol=5e-5)


def test_streaming_equals_one_shot_triton_backend():
    hf = _hf_model(1, num_hidden_layers=1)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    codes = torch.randint(0, 16, (2, 4, 8))
    with torch.no_grad():
        want = hf(codes)
    torch.testing.assert_close(_stream(model, codes, [1, 2, 5]), want, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("layout,seed", [(0, 13), (2, 18)])  # seeds drawing [1, 4, 1] and [0, 4, 1] (few pushes)
def test_streaming_random_chunkings_triton_backend(layout, seed):
    """Random chunkings (sizes 0..4, single frames included) through the Triton kernels equal transformers'
    one-shot decode sample for sample, first and last chunk included."""
    hf = _hf_model(layout, num_hidden_layers=1)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    rng = random.Random(seed)
    T = rng.randint(4, 7)
    codes = torch.randint(0, 16, (1, 4, T))
    with torch.no_grad():
        want = hf(codes)
    torch.testing.assert_close(_stream(model, codes, _random_chunks(rng, T, 4)), want, rtol=1e-4, atol=5e-5)


def test_batched_streams_of_different_lengths_triton_backend():
    hf = _hf_model(0, num_hidden_layers=1)
    model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
    lengths = [6, 2]
    codes = torch.randint(0, 16, (2, 4, max(lengths)))
    wav = _stream(model, codes, [1, 5])
    for b, n in enumerate(lengths):
        with torch.no_grad():
            alone = hf(codes[b:b + 1, :, :n])
        torch.testing.assert_close(wav[b:b + 1, :, :model.num_samples(n)], alone, rtol=1e-4, atol=5e-5)


def test_batched_streams_of_different_lengths_equal_separate_decodes():
    _, model = _models(0)
    lengths = [13, 4, 9]
    codes = torch.randint(0, 16, (3, 4, max(lengths)))
    wav = _stream(model, codes, [3, 1, 6, 3])
    for b, n in enumerate(lengths):
        alone = model(codes[b:b + 1, :, :n])
        torch.testing.assert_close(wav[b:b + 1, :, :model.num_samples(n)], alone, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rows_reset_mid_stream_equal_their_separate_one_shot_decodes(backend):
    """Rows started at different times (reset mid-stream, some twice) give exactly the one-shot decodes of their
    utterances; the other rows are not disturbed. Window 5 < the utterances, so per-row positions and KV lengths
    matter (the rows' caches are at different fill levels when they attend)."""
    if backend == "reference":
        _, model = _models(0)
        schedule = [(3, []), (2, []), (4, [1]), (1, [2]), (3, [1, 0]), (6, [])]
    else:
        hf = _hf_model(1, num_hidden_layers=1)
        model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
        schedule = [(2, []), (3, [1]), (1, [0]), (4, [])]
    T = sum(f for f, _ in schedule)
    codes = torch.randint(0, 16, (3, 4, T))
    wav, starts = _run_with_resets(model, codes, schedule)
    _check_utterances(model, codes, wav, starts, rtol=1e-4, atol=5e-5)


def test_reset_rows_forms_and_bad_input():
    _, model = _models(0)
    codes = torch.randint(0, 16, (3, 4, 9))
    s = model.stream(3)
    s.push(codes[..., :3])
    s.reset(torch.tensor([False, True, False]))  # a bool mask
    s.reset(2)  # an index
    assert s.state.fresh.tolist() == [False, True, True] and s.state.pos.tolist() == [3, 0, 0]
    s.push(codes[..., 3:5])
    assert s.state.pos.tolist() == [5, 2, 2] and not s.state.fresh.any() and not s.state.reset_pending
    s.reset(torch.tensor([0]))  # an index tensor
    wav = s.push(codes[..., 5:9])
    assert s.state.pos.tolist() == [4, 6, 6]
    torch.testing.assert_close(wav[:1, :, s.lead_samples:], model(codes[:1, :, 5:9]), rtol=1e-4, atol=5e-5)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 3\)"):
        s.reset([3])
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        s.reset(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="bool mask"):
        s.reset(True)
    with pytest.raises(TypeError, match="row indices"):
        s.reset(["a"])
    s.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        s.reset([0])


def test_stream_state_with_resets_resumes_in_a_new_stream():
    """A state saved with per-row positions and a reset still pending resumes exactly."""
    _, model = _models(0)
    codes = torch.randint(0, 16, (2, 4, 12))
    s = model.stream(2)
    a, starts = _run_with_resets(model, codes[..., :7], [(4, []), (3, [1])], stream=s)
    s.reset([0])  # pending when the state moves
    resumed = model.stream(2, state=s.state)
    b = resumed.push(codes[..., 7:])
    wav = torch.cat((a, b), -1)
    starts[0].append((7, a.shape[-1] + resumed.lead_samples))
    _check_utterances(model, codes, wav, starts, rtol=1e-4, atol=5e-5)


def test_old_format_stream_state_is_refused():
    _, model = _models(0)
    s = model.stream(2)
    s.push(torch.zeros(2, 4, 2, dtype=torch.long))
    st = s.state
    st.pos = st.pos[0].clone()  # the former shared 0-d position
    with pytest.raises(ValueError, match="former format"):
        model.stream(2, state=st)
    st.pos = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"pos must be an int64 \[B\]"):
        model.stream(2, state=st)


def test_stream_state_resumes_in_a_new_stream():
    _, model = _models(0)
    codes = torch.randint(0, 16, (1, 4, 10))
    s = model.stream(1)
    a = s.push(codes[..., :6])
    b = model.stream(1, state=s.state).push(codes[..., 6:])
    torch.testing.assert_close(torch.cat((a, b), -1), model(codes), rtol=1e-4, atol=5e-5)


def test_chunked_decode_matches_transformers():
    hf, model = _models(0)
    codes = torch.randint(0, 16, (1, 4, 23))
    with torch.no_grad():
        want = hf.chunked_decode(codes, chunk_size=7, left_context_size=3)
    torch.testing.assert_close(model.chunked_decode(codes, chunk_size=7, left_context_size=3), want, rtol=1e-4,
                               atol=5e-5)


def test_from_state_dict_equals_from_transformers():
    hf, model = _models(2)
    sd = {"code2wav." + k: v for k, v in hf.state_dict().items()}
    other = omni_fast.models.Code2Wav.from_state_dict(hf.config, sd, backend="reference")
    codes = torch.randint(0, 16, (1, 4, 6))
    torch.testing.assert_close(other(codes), model(codes), rtol=0, atol=0)


# --- bad input -------------------------------------------------------------------------------------------------


def test_first_push_too_short_for_the_layout_is_refused():
    """A layout with little upsampling before the decoder makes no sample from one frame: the stream's first push
    (like the first after a reset) says how many frames it needs instead of failing inside a conv."""
    _, model = _models(0, upsampling_ratios=[1], upsample_rates=[2, 3])
    stream = model.stream(1)
    need = stream._min_reset_frames()
    assert need > 1
    codes = torch.randint(0, 16, (1, 4, need + 2))
    with pytest.raises(ValueError, match=f"first push .* needs at least {need} frames"):
        stream.push(codes[..., :1])
    got = torch.cat([stream.push(codes[..., :need])] + [stream.push(codes[..., i:i + 1])
                                                          for i in range(need, need + 2)], -1)
    torch.testing.assert_close(got, model(codes), rtol=1e-5, atol=1e-6)


def test_model_bad_codes():
    _, model = _models(0)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        model(torch.full((1, 4, 3), 16))
    with pytest.raises(ValueError, match=r"codes must lie in"):
        model(torch.full((1, 4, 3), -1))
    with pytest.raises(ValueError, match="4 codebooks"):
        model(torch.zeros(1, 5, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="3 dimensions"):
        model(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must lie in"):  # check_values=True checks on any device
        model(torch.full((1, 4, 3), 16), check_values=True)
    s = model.stream(2)
    with pytest.raises(ValueError, match=r"codes must lie in"):
        s.push(torch.full((2, 4, 1), 99), check_values=True)
    with pytest.raises(ValueError, match="batch size 2"):
        s.push(torch.zeros(1, 4, 3, dtype=torch.long))
    s.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        s.push(torch.zeros(2, 4, 1, dtype=torch.long))


def test_model_state_from_another_config():
    _, model = _models(0)
    _, other = _models(1)
    s = other.stream(1)
    s.push(torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="another config"):
        model.stream(1, state=s.state)
    with pytest.raises(ValueError, match="batch size"):
        other.stream(2, state=s.state)


def test_model_state_with_bad_kv_caches():
    _, model = _models(0)
    s = model.stream(1)
    s.push(torch.zeros(1, 4, 2, dtype=torch.long))
    st = s.state
    k, v = st.kv[0]
    assert k.shape == (1, 4, 2, 8)  # [B, W-1, Hk, D]
    st.kv[0] = (k.transpose(1, 2).contiguous(), v)  # the former [B, Hk, W-1, D] layout
    with pytest.raises(ValueError, match=r"kv\[0\] k has shape \[1, 2, 4, 8\], expected \[1, 4, 2, 8\]"):
        model.stream(1, state=st)
    st.kv[0] = (k, v.half())
    with pytest.raises(ValueError, match=r"kv\[0\] v has torch.float16"):
        model.stream(1, state=st)
    st.kv[0] = (k, v)
    st.kv.pop()
    with pytest.raises(ValueError, match="1 KV caches, the model 2"):
        model.stream(1, state=st)


def test_model_bad_state_dict():
    hf = _hf_model(0)
    sd = dict(hf.state_dict())
    with pytest.raises(ValueError, match="missing"):
        omni_fast.models.Code2Wav.from_state_dict(hf.config, {k: v for k, v in sd.items() if "decoder.0" not in k})
    with pytest.raises(ValueError, match="the config expects"):
        omni_fast.models.Code2Wav.from_state_dict(_hf_config(0, decoder_dim=16), sd)


