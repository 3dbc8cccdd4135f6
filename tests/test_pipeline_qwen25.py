"""The Qwen2.5-Omni streaming pipeline (:class:`omni_fast.models.Qwen25Omni`: the shared scheduler over
:class:`omni_fast.pipeline.qwen25.Qwen25Stages`) against transformers' ``Qwen2_5OmniForConditionalGeneration
.generate`` on the tiny random model (greedy): the same text ids, talker codes and waveform for audio, image, video
and audio-in-video prompts; and its bad-input errors."""

import functools

import pytest
import torch

pytest.importorskip("transformers")

from omni_fast.__main__ import synthetic_speech  # noqa: E402
from omni_fast.models import Qwen25Omni, Request  # noqa: E402
from omni_fast.pipeline import multimodal, qwen25  # noqa: E402
from omni_fast.pipeline.requests import mel_features  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return Qwen25Omni.random(patch=False)


def _generate_inputs(pipe, reqs) -> tuple[torch.Tensor, dict]:
    """(prompt ids, ``generate`` keywords) for the batch ``reqs``: the pipeline's prompt ids and mask, and the
    encoder inputs as a caller of transformers passes them (mel features; pixels to the thinker alone, ``thinker_``
    prefix: the talker's ``generate`` refuses them; grids, seconds per grid and ``use_audio_in_video`` to both: the
    talker's positions read them)."""
    prompt = pipe.stages().prepare(reqs)
    kw = {}
    if any(r.audio is not None for r in reqs):
        kw["input_features"], kw["feature_attention_mask"] = mel_features([r.audio for r in reqs
                                                                           if r.audio is not None])
    vcfg = pipe.config.thinker_config.vision_config
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        items = [getattr(r, kind) for r in reqs if getattr(r, kind) is not None]
        if items:
            px, grids = zip(*(multimodal.patchify(x[None] if kind == "image" else x, vcfg.patch_size,
                                                  vcfg.temporal_patch_size, vcfg.spatial_merge_size) for x in items))
            kw.update({f"thinker_{key}": torch.cat(px), f"{kind}_grid_thw": torch.tensor(grids)})
    if any(r.video is not None for r in reqs):
        kw["video_second_per_grid"] = torch.tensor([vcfg.temporal_patch_size / r.video_fps for r in reqs
                                                    if r.video is not None])
        kw["use_audio_in_video"] = any(r.audio_in_video for r in reqs)
    return prompt.ids, dict(kw, attention_mask=prompt.mask)


def _transformers_generate(pipe, reqs, max_new_tokens, talker_max_new_tokens, **talker):
    """transformers' generate on the pipeline's own prompt: per row (text ids, codes, waveform); seed 7 for the
    DiT (its noise is drawn row after row, as the pipeline's Token2Wav does)."""
    model, st = pipe.model, pipe.stages()
    ids, kw = _generate_inputs(pipe, reqs)
    codes = []
    real = model.talker.generate
    model.talker.generate = lambda *a, **k: codes.append(real(*a, **k)) or codes[-1]
    model.speaker_map = pipe.speakers
    try:
        torch.manual_seed(7)
        text, wavs = model.generate(
            input_ids=ids, **kw, thinker_max_new_tokens=max_new_tokens, thinker_do_sample=False,
            thinker_eos_token_id=st.text_eos, talker_do_sample=False, talker_max_new_tokens=talker_max_new_tokens,
            talker_repetition_penalty=1.0, talker_eos_token_id=list(st.codec_stop_ids), speaker="Chelsie",
            **talker)
    finally:
        del model.talker.generate
    S = ids.shape[1]
    wavs = [wavs] if len(reqs) == 1 else wavs
    return [(text[i, S:].tolist(), codes[0][i, S + 2:].tolist(), wavs[i]) for i in range(len(reqs))]


def _check_stream(pipe, reqs, patched: bool, monkeypatch, **talker):
    """The pipeline (unpatched, or a patched pipeline over the same model) against :func:`_transformers_generate`:
    per row the same text ids, talker codes and waveform (bit for bit: same codes and DiT noise). ``talker``:
    ``talker_*`` options both take."""
    want = _transformers_generate(pipe, reqs, 5, 10, **talker)
    seen = []
    real_step = qwen25.Token2WavCodec.step
    monkeypatch.setattr(qwen25.Token2WavCodec, "step",
                        lambda self, codes, n: seen.append((codes.clone(), n)) or real_step(self, codes, n))
    if patched:
        pipe = Qwen25Omni(pipe.model, backend="triton", speakers=pipe.speakers, tokenizer=pipe.tokenizer)
    try:
        torch.manual_seed(7)
        outs = pipe.generate(reqs, max_new_tokens=5, talker_max_new_tokens=10, speaker="chelsie",
                             graph_decode=patched, **talker)
    finally:
        pipe.set_patched(False)
    codes, n = seen[0]
    for i, (out, (want_text, want_codes, want_wav)) in enumerate(zip(outs, want)):
        assert out["token_ids"] == want_text
        # the row's codes up to its codec EOS / pad (the tiny talker's: generate's default ids are the real ones)
        ends = [k for k, c in enumerate(want_codes) if c in pipe.stages().codec_stop_ids]
        assert codes[i, 0, :n[i]].tolist() == want_codes[:ends[0] if ends else len(want_codes)]
        assert torch.equal(out["audio"], want_wav)


def _request(kind: str) -> Request:
    g = torch.Generator().manual_seed(11)
    if kind == "audio":
        return Request(text=[5, 6, 7], audio=synthetic_speech(0.5))
    if kind == "image":  # 56 x 84 pixels: a 4 x 6 patch grid, 6 tokens
        return Request(text=[5, 6, 7], image=torch.rand(3, 56, 84, generator=g))
    if kind == "video":  # 5 frames at 3 fps: 2/3 s per grid step, positions 0, 16, 33 (truncated, as transformers)
        return Request(text=[5, 6], video=torch.rand(5, 3, 56, 56, generator=g), video_fps=3.0)
    # a 6-frame 1 fps video (2 s per grid step: one step per 2 s chunk) with its 2.5 s sound track (62 audio tokens:
    # chunks of 50 and 12): video, audio, video, audio, video in one block
    g.manual_seed(2)  # (a seed and a level whose greedy text and codes vary)
    return Request(text=[5], video=torch.rand(6, 3, 28, 56, generator=g), video_fps=1.0,
                   audio=0.3 * synthetic_speech(2.5), audio_in_video=True)


@pytest.mark.parametrize("kind,patched", [("audio", False), ("image", False), ("video", False),
                                          ("audio_in_video", False), ("audio", True), ("video", True)])
def test_stream_matches_transformers_generate(pipe, kind, patched, monkeypatch):
    """Unpatched, and patched (Triton on the interpreter; thinker decode on omni-fast's decoder, talker decode
    through the patch): the same text, codes and waveform as transformers' ``generate(return_audio=True)`` given
    the same prompt and media. (One row, no padding: on transformers >= 5.2x ``generate`` drops the all-ones mask
    and the talker runs on positions 0, 1, ...; with the mask (5.17) on its M-RoPE positions.)"""
    _check_stream(pipe, [_request(kind)], patched, monkeypatch)


def test_batch_matches_transformers_generate(pipe, monkeypatch):
    """A left-padded batch (an image row and an audio-in-video row, so ``use_audio_in_video`` for the batch):
    ``generate`` passes the mask on every release and the talker runs on its M-RoPE positions (grids, audio in
    video, seconds per grid; the padding discounted)."""
    _check_stream(pipe, [_request("image"), _request("audio_in_video")], False, monkeypatch)


@pytest.mark.parametrize("minimum", [3, 9])
def test_talker_min_new_tokens_matches_transformers(pipe, minimum, monkeypatch):
    """``talker_min_new_tokens`` (transformers routes it to the talker's ``min_new_tokens``): no stop code (codec
    EOS or pad) before that many codes, then the same codes and waveform as transformers. 3: the tiny greedy talker
    stops right after; 9: it runs to ``talker_max_new_tokens`` (10). Without it this request gets no code at all
    (the demo's request: its first greedy code is a stop code)."""
    req = Request(text="Please answer in a friendly voice: what did I just say?", audio=synthetic_speech(2.0))
    assert pipe.generate(req, max_new_tokens=5, talker_max_new_tokens=10)[0]["audio"].numel() == 0
    _check_stream(pipe, [req], False, monkeypatch, talker_min_new_tokens=minimum)


@pytest.mark.parametrize("minimum", [3, 5])
def test_talker_min_new_tokens_in_a_batch_matches_transformers(pipe, minimum, monkeypatch):
    """A batch whose rows stop at different times: with 3 the demo's request stops at its 4th code (the first it
    may) while the image row runs to ``talker_max_new_tokens``; with 5 it runs on. Same codes and waveforms as
    transformers' batched ``generate`` (one new-token count for the batch)."""
    req = Request(text="Please answer in a friendly voice: what did I just say?", audio=synthetic_speech(2.0))
    _check_stream(pipe, [req, _request("image")], False, monkeypatch, talker_min_new_tokens=minimum)


def test_audio_in_video_block_layout(pipe):
    """The audio-in-video block in the processor's chunk order (worked out by hand for :func:`_request`'s video:
    grid (3, 2, 4) -> 2 tokens per 2 s step; 62 audio tokens, 50 per 2 s chunk), and the chunking against
    transformers' own ``get_chunked_index`` on positions that jump over several chunks."""
    import numpy as np
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor

    ids = pipe.stages().prepare([_request("audio_in_video")]).ids[0].tolist()
    t = pipe.config.thinker_config
    V, A = t.video_token_id, t.audio_token_id
    block = [t.vision_start_token_id, t.audio_start_token_id] + [V] * 2 + [A] * 50 + [V] * 2 + [A] * 12 + [V] * 2
    assert ids[3:3 + len(block) + 2] == block + [t.audio_start_token_id + 1, t.vision_start_token_id + 1]
    for values in ([0, 0, 25, 25, 50, 50, 75], [0, 100, 100, 100, 250], list(range(120)), [0]):
        want = [e - s for s, e in Qwen2_5OmniProcessor.get_chunked_index(None, np.array(values), 50)]
        assert multimodal.chunk_sizes(values, 50) == want


def test_patchify_matches_the_image_processor(pipe):
    """The shared patchify gives the Qwen2-VL image processor's patches and grid (its resize and normalisation off:
    the pipeline takes [0, 1] float frames of any size and resizes them itself)."""
    from transformers import Qwen2VLImageProcessor

    vcfg = pipe.config.thinker_config.vision_config
    img = torch.rand(3, 56, 84, generator=torch.Generator().manual_seed(2))
    proc = Qwen2VLImageProcessor(do_resize=False, do_rescale=False, do_normalize=False, patch_size=vcfg.patch_size,
                                 temporal_patch_size=vcfg.temporal_patch_size, merge_size=vcfg.spatial_merge_size)
    want = proc(images=[img], return_tensors="pt")
    px, grid = multimodal.patchify(img[None], vcfg.patch_size, vcfg.temporal_patch_size, vcfg.spatial_merge_size)
    assert list(grid) == want["image_grid_thw"][0].tolist()
    torch.testing.assert_close(px, want["pixel_values"].float(), rtol=0, atol=1e-6)


def test_generate_mask_drop_detection():
    """hf_compat's feature check agrees with what the installed ``generate`` does: a tiny decoder-only model given an
    all-ones mask sees it in its forward (5.17) or sees None (5.25); a padded mask always reaches it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from omni_fast.integrations.hf_compat import generate_drops_all_ones_mask, generate_passes_mask

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, pad_token_id=0)).eval()
    seen, real = [], model.forward
    model.forward = functools.wraps(real)(lambda *a, **k: seen.append(k.get("attention_mask")) or real(*a, **k))
    for mask in (torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 1, 1]])):
        seen.clear()
        model.generate(torch.tensor([[3, 4, 5]]), attention_mask=mask, max_new_tokens=1, do_sample=False)
        assert (seen[0] is not None) == generate_passes_mask(mask)
    assert generate_drops_all_ones_mask() == (not generate_passes_mask(torch.ones(1, 3)))


def test_bad_input(pipe):
    req = Request(text=[5, 6])
    with pytest.raises(ValueError, match="speaker: unknown speaker 'nobody'"):
        list(pipe.stream(req, speaker="nobody"))
    with pytest.raises(ValueError, match="talker_max_new_tokens must be <="):
        list(pipe.stream(req, talker_max_new_tokens=20000))
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(pipe.stream(req, max_new_tokens=0))
    codec = qwen25.Token2WavCodec(pipe.model.token2wav, pipe.speakers["Chelsie"], 2)
    with pytest.raises(ValueError, match="codes: .* outside Token2Wav's codec vocabulary"):  # mismatched parts
        codec.step(torch.tensor([[[3, 300]]]), [2])
    bad = dict(pipe.speakers, Odd={"bos_token": 150, "cond": torch.zeros(3), "ref_mel": torch.zeros(4, 80)})
    with pytest.raises(ValueError, match=r"speakers\['Odd'\]\['cond'\]"):
        Qwen25Omni(pipe.model, patch=False, speakers=bad)
    with pytest.raises(ValueError, match="speakers: the model has no voices"):
        Qwen25Omni(pipe.model, patch=False, speakers={})


@pytest.mark.parametrize("reqs, error, match", [
    ([Request(text=[5], image=torch.rand(4, 28, 28))], ValueError, r"requests\[0\]\.image must be \[3, H, W\]"),
    ([Request(text=[5], image=torch.rand(28, 28))], ValueError, r"requests\[0\]\.image must be \[3, H, W\]"),
    ([Request(text=[5], image=torch.zeros(3, 28, 28, dtype=torch.uint8))], TypeError, r"requests\[0\]\.image"),
    ([Request(text=[5], video=torch.rand(3, 28, 28))], ValueError, r"requests\[0\]\.video must be \[F, 3, H, W\]"),
    ([Request(text=[5], video=torch.rand(2, 3, 28, 28), video_fps=0.0)], ValueError, r"requests\[0\]\.video_fps"),
    ([Request(text=[5], video=torch.rand(2, 3, 28, 28), audio_in_video=True)], ValueError,
     r"requests\[0\]\.audio_in_video=True needs both"),
    ([Request(text=[5], video=torch.rand(2, 3, 28, 28), audio=torch.zeros(800), audio_in_video=True),
      Request(text=[5], video=torch.rand(2, 3, 28, 28))], ValueError, r"requests\[1\]\.audio_in_video: .* whole batch"),
])
def test_bad_media(pipe, reqs, error, match):
    """Media the Qwen2.5 adapter refuses as the Qwen3 one does (the same shared checks), before any work."""
    with pytest.raises(error, match=match):
        list(pipe.stream(reqs))


def _patched_codec_step(pipe, fast_path, codes, lens, calls=None):
    """The pipeline's Token2Wav step on the model patched (token2wav fast path, reference backend, one 24-code
    bucket), unpatched after; ``calls`` (a dict) counts the eager vocoder's calls (their mel lengths) and the
    one-graph ``synthesize`` calls (their code lengths). Returns (waveforms, the DiT's cached graph keys)."""
    import omni_fast
    from omni_fast.integrations import token2wav_synth
    from omni_fast.models import dit_solve

    calls = {} if calls is None else calls
    calls.update(eager=[], graph=[])
    t2w = pipe.model.token2wav
    codec = qwen25.Token2WavCodec(t2w, pipe.speakers["Chelsie"], 2)
    fast_path("token2wav")
    omni_fast.patch(pipe.model, backend="reference")
    vocoder, synthesize = t2w.code2wav_bigvgan_model, dit_solve.synthesize
    real = vocoder.forward
    vocoder.forward = lambda mel, **kw: calls["eager"].append(mel.shape[-1]) or real(mel, **kw)
    dit_solve.synthesize = lambda *a, **kw: calls["graph"].append(a[4].shape[1]) or synthesize(*a, **kw)
    try:
        token2wav_synth.set_code_buckets(t2w, (16,))  # rows of up to 24 codes in one bucket (48 mel frames)
        torch.manual_seed(5)
        with torch.no_grad():  # as the pipeline's stream runs it (the graph refuses autograd)
            got = codec.step(codes, lens)
        dit = t2w.code2wav_dit_model
        graphs = [k for name in (dit_solve._CACHE, dit_solve._CACHE + "_wave")
                  for k in dit.__dict__.get(name, {}) if k != "weights"]
    finally:
        del vocoder.forward
        dit_solve.synthesize = synthesize
        omni_fast.unpatch(pipe.model)
    return got, graphs, codec


def _unpatched_codec_step(pipe, codes, lens):
    codec = qwen25.Token2WavCodec(pipe.model.token2wav, pipe.speakers["Chelsie"], 2)
    torch.manual_seed(5)
    return codec.step(codes, lens)  # unpatched: transformers' sample and vocoder


def test_token2wav_codec_vocoder_runs_on_the_real_mel(pipe, fast_path, monkeypatch):
    """The pipeline's Token2Wav on a patched model (token2wav fast path, reference backend) for rows above the
    crossover (set to 0 here): the DiT's solve on its length bucket graph, then BigVGAN on the row's REAL mel (not
    the bucket's), each timed (``parts``); the waveform is transformers' forward's for the same noise (1e-6
    absolute, the routed forward's tolerance)."""
    monkeypatch.setattr(qwen25, "GRAPHED_VOCODER_MAX_CODES", 0)
    codes = torch.randint(0, 200, (2, 1, 7), generator=torch.Generator().manual_seed(3))
    want = _unpatched_codec_step(pipe, codes, [7, 5])
    calls = {}
    got, graphs, codec = _patched_codec_step(pipe, fast_path, codes, [7, 5], calls)
    repeats = pipe.config.token2wav_config.dit_config.repeats
    assert calls == dict(eager=[7 * repeats, 5 * repeats], graph=[]) and [k[1] for k in graphs] == [24]
    assert set(codec.parts) == {"DiT solve", "BigVGAN"} and all(v > 0 for v in codec.parts.values())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_token2wav_codec_graphs_the_vocoder_of_short_rows_only(pipe, fast_path, monkeypatch):
    """Per row: at most ``GRAPHED_VOCODER_MAX_CODES`` codes -> DiT + BigVGAN in ONE graph (the patched forward's
    ``synthesize``, vocoder on the padded bucket), longer -> the DiT's sample graph then BigVGAN eagerly on the real
    mel; the same waveform either way (transformers' forward's, 1e-6). The crossover is lowered to 6 so that a short
    (5 codes) and a long (7) row of the tiny model fall on either side; an unpatched model always runs the pieces."""
    assert qwen25.GRAPHED_VOCODER_MAX_CODES == 45  # the cost model's prediction (test below), until first light
    codes = torch.randint(0, 200, (2, 1, 7), generator=torch.Generator().manual_seed(3))
    want = _unpatched_codec_step(pipe, codes, [7, 5])
    calls = {}
    monkeypatch.setattr(qwen25, "GRAPHED_VOCODER_MAX_CODES", 6)
    got, graphs, codec = _patched_codec_step(pipe, fast_path, codes, [7, 5], calls)
    repeats = pipe.config.token2wav_config.dit_config.repeats
    assert calls == dict(eager=[7 * repeats], graph=[5])  # the long row eager, the short one graphed
    assert sorted(k[1] for k in graphs) == [24, 24]  # one sample graph, one solve + vocoder graph
    assert set(codec.parts) == {"DiT solve", "BigVGAN", qwen25.ONE_GRAPH} and min(codec.parts.values()) > 0
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # both rows short: all on the one graph, the same waveform
    monkeypatch.setattr(qwen25, "GRAPHED_VOCODER_MAX_CODES", 45)
    got, _, codec = _patched_codec_step(pipe, fast_path, codes, [7, 5], calls)
    assert calls == dict(eager=[], graph=[7, 5]) and set(codec.parts) == {qwen25.ONE_GRAPH}
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_graphed_vocoder_crossover_is_the_cost_models():
    """``GRAPHED_VOCODER_MAX_CODES`` is what the cost model predicts (H100 constants, default buckets): the graph
    cheaper up to it, eager at every length above (checked to 200 codes here; the CLI checks to 1500). Calibrated
    on first light, this pin moves with it."""
    from omni_fast.bench.costmodel.token2wav_padding import vocoder_crossover

    c = vocoder_crossover(hi=200)
    assert c["max_graph_codes"] == qwen25.GRAPHED_VOCODER_MAX_CODES and c["eager_wins_above"]
