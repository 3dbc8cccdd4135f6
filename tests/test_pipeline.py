"""The thin pipeline (``omni_fast.models.Qwen3Omni``) against transformers' own ``generate`` on a tiny model."""

import math

import pytest
import torch

pytest.importorskip("transformers")

import omni_fast  # noqa: E402
from omni_fast.models.presets import TINY_IDS  # noqa: E402
from omni_fast.models.qwen3_omni import Qwen3Omni, Request, mel_features  # noqa: E402

GREEDY = dict(max_new_tokens=7, talker_max_new_tokens=10)


@pytest.fixture(scope="module")
def pipe():
    return Qwen3Omni.random("tiny", patch=False)


def _wave(seconds=1.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(16000 * seconds)) / 16000
    return 0.3 * torch.sin(2 * math.pi * 180 * t) + 0.01 * torch.randn(t.shape, generator=g)


def _hf_generate(pipe, req, n_audio=0, n_image=0, video_tokens=0, **extra):
    """transformers' Qwen3OmniMoeForConditionalGeneration.generate on the same prompt (greedy, no penalty)."""
    m = pipe.model
    ids = torch.tensor([pipe.build_prompt(req, n_audio, n_image, video_tokens)])
    codes = []
    real = m.code2wav.chunked_decode

    def record(c, *a, **k):
        codes.append(c.clone())
        return real(c, *a, **k)

    m.code2wav.chunked_decode = record
    try:
        text, wav = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               thinker_max_new_tokens=GREEDY["max_new_tokens"],
                               thinker_eos_token_id=TINY_IDS["im_end_token_id"], thinker_do_sample=False,
                               talker_max_new_tokens=GREEDY["talker_max_new_tokens"], talker_do_sample=False,
                               talker_repetition_penalty=1.0, **extra)
    finally:
        del m.code2wav.chunked_decode
    return text[0, ids.shape[1]:].tolist(), codes[0], wav.reshape(-1)


def _ours(pipe, req, **kw):
    frames = []
    decode = pipe.code2wav.decode
    pipe.code2wav.decode = lambda c: (frames.append(c.clone()), decode(c))[1]
    try:
        out = pipe.generate(req, **{**GREEDY, **kw})[0]
    finally:
        del pipe.code2wav.decode
    return out, frames


def test_text_prompt_matches_transformers_generate(pipe):
    req = Request(text=[5, 6, 7, 8, 9])
    want_ids, want_codes, want_wav = _hf_generate(pipe, req)
    out, frames = _ours(pipe, req, first_chunk=300, chunk=300)  # one chunk: transformers' chunked_decode
    assert out["token_ids"] == want_ids
    assert torch.equal(frames[0], want_codes)
    torch.testing.assert_close(out["audio"], want_wav, rtol=0, atol=0)
    t = out["timing"]
    assert t.frames == want_codes.shape[-1] and t.text_tokens == len(want_ids)
    assert t.audio_seconds == pytest.approx(want_wav.numel() / 24000)
    assert t.first_packet > 0 and t.rtf > 0 and t.mtp_per_frame > 0 and t.codec_per_code > 0


def test_audio_prompt_matches_transformers_generate(pipe):
    wave = _wave()
    req = Request(text=[5, 6], audio=wave)
    feats, fmask = mel_features([wave])
    from omni_fast.models.positions import audio_tokens

    n_audio = audio_tokens(int(fmask.sum()))
    want_ids, want_codes, _ = _hf_generate(pipe, req, n_audio=n_audio, input_features=feats,
                                           feature_attention_mask=fmask)
    out, frames = _ours(pipe, req, first_chunk=300, chunk=300)
    assert out["token_ids"] == want_ids
    assert torch.equal(frames[0], want_codes)


def test_mel_features_equal_whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor

    wave = _wave(0.7)
    feats, fmask = mel_features([wave, wave[:8000]])
    fe = WhisperFeatureExtractor(feature_size=128)
    ref = fe(wave.numpy(), sampling_rate=16000, return_tensors="pt", padding=True, truncation=False,
             return_attention_mask=True)
    assert feats.shape[1] == 128 and fmask[1].sum() < fmask[0].sum()
    torch.testing.assert_close(feats[0:1], ref["input_features"])


def test_streaming_yields_text_and_audio_chunks(pipe):
    req = Request(text="hi there")
    events = list(pipe.stream(req, max_new_tokens=6, talker_max_new_tokens=14, first_chunk=1, chunk=4))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and "text" in kinds
    audio = [e.audio for e in events if e.kind == "audio"]
    timing = events[-1].timing
    assert len(audio) >= 2 and audio[0].numel() <= 1920  # the first packet is one frame
    assert sum(a.numel() for a in audio) == round(timing.audio_seconds * 24000)
    assert all(torch.isfinite(a).all() for a in audio)
    # the first audio chunk comes out before the thinker has finished (talker starts after its first token)
    assert kinds.index("audio") < max(i for i, k in enumerate(kinds) if k == "text")
    assert timing.first_packet < timing.total


def test_batch_of_requests(pipe):
    reqs = [Request(text=[5, 6, 7]), Request(text=[9, 10, 11, 12, 13, 14]), Request(text=[20], audio=_wave(0.5))]
    outs = pipe.generate(reqs, **GREEDY, first_chunk=300, chunk=300)
    assert len(outs) == 3
    for req, out in zip(reqs, outs):
        alone = pipe.generate(req, **GREEDY, first_chunk=300, chunk=300)[0]
        assert out["token_ids"] == alone["token_ids"]
        assert out["timing"].frames > 0 and out["audio"].numel() > 0


def test_image_prompt_runs(pipe):
    img = torch.rand(3, 40, 70, generator=torch.Generator().manual_seed(0))
    out = pipe.generate(Request(text=[5], image=img), **GREEDY)[0]
    assert len(out["token_ids"]) > 0 and out["audio"].numel() > 0


def test_patched_pipeline_matches_unpatched(pipe):
    req = Request(text=[5, 6, 7, 8, 9])
    want, _ = _ours(pipe, req, first_chunk=300, chunk=300)
    # reference backend: the swapped-in vocoder's kernels take minutes under the Triton interpreter at 1920x
    # upsampling (tests/test_code2wav_ops.py and tests/test_patch.py cover the kernels).
    patched = Qwen3Omni(pipe.model, patch=True, tokenizer=pipe.tokenizer, backend="reference")
    try:
        got = patched.generate(req, **GREEDY, first_chunk=300, chunk=300)[0]
    finally:
        import omni_fast

        omni_fast.unpatch(pipe.model)
    assert patched.patch_report is not None and patched.patch_report.replaced
    assert got["token_ids"] == want["token_ids"]
    err = (got["audio"] - want["audio"]).norm() / want["audio"].norm()
    assert err < 1e-3


def test_from_pretrained_local_dir(pipe, tmp_path):
    pipe.model.save_pretrained(tmp_path)
    loaded = Qwen3Omni.from_pretrained(tmp_path, patch=False, tokenizer=pipe.tokenizer)
    req = Request(text=[5, 6, 7])
    a = pipe.generate(req, **GREEDY)[0]
    b = loaded.generate(req, **GREEDY)[0]
    assert a["token_ids"] == b["token_ids"] and a["audio"].shape == b["audio"].shape
    # from_pretrained may pick another attention implementation (sdpa vs eager): rounding-level differences,
    # which the random-weight vocoder amplifies
    assert (a["audio"] - b["audio"]).norm() / a["audio"].norm() < 1e-3


def test_bad_arguments(pipe, tmp_path):
    with pytest.raises(ValueError, match="preset"):
        Qwen3Omni.random("huge")
    with pytest.raises(ValueError, match="speaker"):
        pipe.generate(Request(text=[5]), speaker="nobody")
    with pytest.raises(FileNotFoundError):
        Qwen3Omni.from_pretrained(tmp_path / "missing")


def test_full_preset_memory_plan():
    from omni_fast.models.presets import FULL_MIN_FREE_GIB, full_thinker_layers

    assert full_thinker_layers(139.0) is None and full_thinker_layers(75.0) is None
    assert 30 <= full_thinker_layers(60.0) < 48 and full_thinker_layers(18.0) == 1
    assert full_thinker_layers(5.0) == 0 and full_thinker_layers(FULL_MIN_FREE_GIB - 0.1) == 0  # use tiny
    with pytest.raises(ValueError, match="meant for a GPU"):
        Qwen3Omni.random("full", device="cpu")  # would allocate 131 GiB of fp32 weights


def test_bench_pipeline_cases():
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from omni_fast.bench.cases import pipeline

    cases = pipeline.cases("full")
    assert [c.params["concurrency"] for c in cases] == [1, 4, 6]
    cases[0].check()  # the tiny pipeline once, vs transformers' generate


def test_bench_pipeline_runner_on_tiny(pipe, monkeypatch):
    """The GPU benchmark's code paths (harness providers, report runner, markdown), on the tiny model on CPU."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from omni_fast.bench.cases import pipeline

    monkeypatch.setattr(pipeline, "TEXT_TOKENS", 4)
    monkeypatch.setattr(pipeline, "FRAMES", 3)
    monkeypatch.setattr(pipeline, "_pipeline", lambda device, layers=None: pipe)
    import omni_fast

    monkeypatch.setitem(pipeline.PRESETS, "quick", dict(pipeline.PRESETS["quick"], audio_seconds=0.5))
    providers = pipeline.cases("quick")[0].setup(torch.device("cpu"))
    assert set(providers) == {"omni_fast", "omni_fast_eager_decode", "eager", "transformers", "transformers_patched"}
    with omni_fast.use_backend("reference"):  # plumbing only: the interpreter would take a minute here
        for name, fn in providers.items():
            got = fn()
            if name.startswith("transformers"):  # transformers' generate got the same audio as the pipeline
                assert got[1] is not None
        result = pipeline.measure((1, 2), repeats=1, pipe=pipe, audio_seconds=0.5)
    assert [(r["provider"], r["concurrency"]) for r in result["runs"]] == [
        (p, c) for p in ("omni_fast", "eager", "transformers", "transformers_patched") for c in (1, 2)]
    assert all(r["first_packet_ms"] > 0 and r["rtf"] > 0 and r["total_ms"] > 0 for r in result["runs"])
    for r in result["runs"]:
        if r["provider"].startswith("transformers"):  # not streaming: what it cannot report is n/a, with a reason
            assert r["mtp_per_frame_ms"] is None and set(result["na"][r["provider"]]) >= {"mtp_per_frame_ms"}
            assert r["first_packet_ms"] == r["total_ms"] and r["thinker_ttft_ms"] > 0 and r["talker_ttft_ms"] > 0
        else:
            assert r["first_packet_ms"] <= r["total_ms"] and r["mtp_per_frame_ms"] > 0
    # transformers' generate gets the pipeline's input (the same audio placeholders and mel features): same text
    reqs = pipeline._requests(2, 0.5)
    inputs = pipeline._transformers_inputs(pipe, reqs)
    assert ((inputs["input_ids"] == pipe.spec.audio_token_id).sum(-1) > 0).all()
    assert inputs["input_features"].shape[0] == 2
    text, _ = pipeline._transformers_generate(pipe, reqs, sizes=(4, 3))
    ours = pipeline._run(pipe, reqs, False, (4, 3))
    assert [t[inputs["input_ids"].shape[1]:].tolist() for t in text] == [o["token_ids"] for o in ours]
    md = pipeline.markdown(result)
    assert "| tech report | 1 | 234 |" in md and "| transformers_patched | 2 |" in md and "n/a" in md
    assert not pipe.model.__dict__.get("_omni_fast_patched", False)  # measure leaves the model unpatched


def test_chunked_prefill_matches_one_chunk(pipe):
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    reqs = [Request(text=[5, 6, 7], audio=_wave(0.6), image=img), Request(text=[8, 9])]
    one = pipe.generate(reqs, **GREEDY)
    chunked = pipe.generate(reqs, **GREEDY, prefill_chunk=5)
    for a, b in zip(one, chunked):
        assert a["token_ids"] == b["token_ids"]
        assert a["timing"].frames == b["timing"].frames


def test_image_prompt_matches_transformers_generate(pipe):
    """Image (vision encoder, DeepStack into the first thinker layers, 3-D positions) vs transformers' generate.

    (Image + audio together cannot be compared: transformers' talker ``get_rope_index`` then reads
    ``talker_config.audio_config``, which does not exist, and raises.)"""
    from omni_fast.models.qwen3_omni import _patchify

    img = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(2))
    req = Request(text=[5, 6], image=img)
    vcfg = pipe.config.thinker_config.vision_config
    pixels, grid = _patchify(img[None], vcfg.patch_size, vcfg.temporal_patch_size, vcfg.spatial_merge_size)
    n_image = grid[0] * grid[1] * grid[2] // vcfg.spatial_merge_size ** 2
    want_ids, want_codes, _ = _hf_generate(pipe, req, n_image=n_image, pixel_values=pixels,
                                           image_grid_thw=torch.tensor([grid]))
    out, frames = _ours(pipe, req, first_chunk=300, chunk=300, prefill_chunk=7)
    assert out["token_ids"] == want_ids
    assert torch.equal(frames[0], want_codes)


def test_static_cache_matches_dynamic(pipe):
    reqs = [Request(text=[5, 6, 7]), Request(text=[8, 9, 10, 11, 12])]
    a = pipe.generate(reqs, **GREEDY)
    b = pipe.generate(reqs, **GREEDY, static_cache=True)
    for x, y in zip(a, b):
        assert x["token_ids"] == y["token_ids"] and torch.equal(x["audio"], y["audio"])


def test_full_shapes_on_meta_device():
    """The "full" preset builds transformers' modules at the 30B-A3B shapes (on the meta device: no memory), and
    patch() finds every layer of it."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    import omni_fast
    from omni_fast.models.presets import FULL_WEIGHTS_GIB, full_qwen3_omni_config

    cfg = full_qwen3_omni_config()
    with torch.device("meta"):
        model = q3.Qwen3OmniMoeForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert abs(2 * n / 2 ** 30 - FULL_WEIGHTS_GIB) < 0.1
    text = cfg.thinker_config.text_config
    assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size, text.num_hidden_layers) == \
        (128, 8, 768, 48)
    talker = cfg.talker_config
    assert (talker.text_config.num_experts_per_tok, talker.num_code_groups, cfg.code2wav_config.num_quantizers) == \
        (6, 16, 16)
    report = omni_fast.patch(model)
    assert "[thinker] Qwen3OmniMoeThinkerTextExperts: routed experts -> omni_fast fused MoE (x48)" in report.replaced
    assert "[talker] Qwen3OmniMoeTalkerTextExperts: routed experts -> omni_fast fused MoE (x20)" in report.replaced
    omni_fast.unpatch(model)


def test_sampling_and_repetition_penalty_run(pipe):
    reqs = [Request(text=[5, 6, 7]), Request(text=[8])]
    outs = pipe.generate(reqs, max_new_tokens=5, talker_max_new_tokens=8, do_sample=True, talker_do_sample=True,
                         talker_repetition_penalty=1.05, seed=3)
    again = pipe.generate(reqs, max_new_tokens=5, talker_max_new_tokens=8, do_sample=True, talker_do_sample=True,
                          talker_repetition_penalty=1.05, seed=3)
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in again]  # seeded
    assert all(o["audio"].numel() > 0 for o in outs)


def test_image_and_video_prompt_matches_transformers_generate(pipe):
    """An image and a 5-frame video (fractional seconds per grid step: 2 frames at 3 fps) in one prompt: vision
    encoder for both, DeepStack rows joined in prompt order, 3-D positions; vs transformers' generate."""
    from omni_fast.models.qwen3_omni import _patchify

    g = torch.Generator().manual_seed(6)
    img, video = torch.rand(3, 32, 64, generator=g), torch.rand(5, 3, 64, 32, generator=g)
    req = Request(text=[5, 6], image=img, video=video, video_fps=3.0)
    vcfg = pipe.config.thinker_config.vision_config
    args = (vcfg.patch_size, vcfg.temporal_patch_size, vcfg.spatial_merge_size)
    img_px, img_grid = _patchify(img[None], *args)
    vid_px, vid_grid = _patchify(video, *args)
    n = [g[0] * g[1] * g[2] // vcfg.spatial_merge_size ** 2 for g in (img_grid, vid_grid)]
    assert vid_grid[0] == 3  # 5 frames padded to 6, 2 per temporal patch
    want_ids, want_codes, _ = _hf_generate(
        pipe, req, n_image=n[0], pixel_values=img_px, image_grid_thw=torch.tensor([img_grid]),
        pixel_values_videos=vid_px, video_grid_thw=torch.tensor([vid_grid]),
        video_second_per_grid=torch.tensor([2 / 3.0]), video_tokens=n[1])
    out, frames = _ours(pipe, req, first_chunk=300, chunk=300)
    assert out["token_ids"] == want_ids
    assert torch.equal(frames[0], want_codes)


def test_audio_in_video_matches_transformers_thinker():
    """A video with its sound track (audio-in-video: one block, tokens interleaved by time): the pipeline's text
    equals transformers' thinker ``generate(use_audio_in_video=True)`` on the same prompt. (The full model's
    generate cannot run it: its talker ``get_rope_index`` reads ``talker_config.audio_config`` and raises.)"""
    from omni_fast.models.positions import audio_tokens
    from omni_fast.models.qwen3_omni import _patchify

    pipe = Qwen3Omni.random("tiny", patch=False, seed=1)
    g = torch.Generator().manual_seed(7)
    video, wave = torch.rand(4, 3, 32, 64, generator=g), _wave(2.0, seed=8)
    req = Request(text=[5], video=video, video_fps=2.0, audio=wave, audio_in_video=True)
    vcfg = pipe.config.thinker_config.vision_config
    px, grid = _patchify(video, vcfg.patch_size, vcfg.temporal_patch_size, vcfg.spatial_merge_size)
    feats, fmask = mel_features([wave])
    n_audio = audio_tokens(int(fmask.sum()))
    ids = torch.tensor([pipe.build_prompt(req, n_audio, 0, 0, video_grid=list(grid), seconds=1.0)])
    assert (ids == 140).sum() == n_audio and (ids == 142).sum() == grid[0] * grid[1] * grid[2] // 4
    want = pipe.model.thinker.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats, feature_attention_mask=fmask,
        pixel_values_videos=px, video_grid_thw=torch.tensor([grid]), video_second_per_grid=torch.tensor([1.0]),
        use_audio_in_video=True, max_new_tokens=6, do_sample=False, eos_token_id=None)
    out = pipe.generate(req, max_new_tokens=6, talker_max_new_tokens=4)[0]
    assert out["token_ids"] == want[0, ids.shape[1]:].tolist()
    with pytest.raises(ValueError, match="audio_in_video"):
        pipe.generate([req, Request(text=[5], audio=wave)], max_new_tokens=2, talker_max_new_tokens=2)


def test_patched_pipeline_streams_exactly(pipe):
    """Patched, the codec streams through omni-fast's stateful Code2Wav: small chunks (1 then 3 frames) give the
    same audio as one chunk, with no left context re-decoded."""
    import omni_fast
    from omni_fast.models.components import ExactStreamingCodec

    req = Request(text=[5, 6, 7, 8, 9])
    patched = Qwen3Omni(pipe.model, patch=True, tokenizer=pipe.tokenizer, backend="reference")
    try:
        assert patched.fast_code2wav is not None
        one = patched.generate(req, **GREEDY, first_chunk=300, chunk=300)[0]
        events = list(patched.stream(req, **GREEDY, first_chunk=1, chunk=3))
    finally:
        omni_fast.unpatch(pipe.model)
    chunks = [e.audio for e in events if e.kind == "audio"]
    assert len(chunks) > 1
    streamed = torch.cat(chunks)
    assert streamed.shape == one["audio"].shape
    # fp32 rounding differs between chunkings (other GEMM shapes); the random-weight vocoder amplifies it at
    # single samples, so the bound is on the relative L2 error (the exact property is tested in test_code2wav_stream.py)
    err = (streamed - one["audio"]).norm() / one["audio"].norm()
    print(f"streamed vs one chunk: relative L2 error {err.item():.2e}")
    assert err < 1e-3, err
    assert isinstance(ExactStreamingCodec, type)


def test_codec_streams_outlive_requests(pipe):
    """Patched, a request's Code2Wav stream (its states and, on CUDA, its graphs) is kept for the next request of
    the same batch size: reset, its lead zeros dropped, the same audio as a new stream; interleaved requests get a
    stream each."""
    import omni_fast

    req = Request(text=[5, 6, 7, 8, 9])
    patched = Qwen3Omni(pipe.model, patch=True, tokenizer=pipe.tokenizer, backend="reference")
    try:
        first = patched.generate(req, **GREEDY, first_chunk=1, chunk=3)[0]
        (stream, _), = patched._codec_streams[1][1]
        used = stream.frames
        assert used > 0
        again = patched.generate(req, **GREEDY, first_chunk=2, chunk=2)[0]
        assert patched._codec_streams[1][1][0][0] is stream and stream.frames > used  # reused, not rebuilt
        a, b = patched.stream(req, **GREEDY), patched.stream(req, **GREEDY)
        events_a = []
        for e in a:  # up to a's first audio chunk: a holds its codec stream now
            events_a.append(e)
            if e.kind == "audio":
                break
        events_b = list(b)  # runs while a is suspended: needs a stream of its own
        events_a += list(a)
    finally:
        omni_fast.unpatch(pipe.model)
    assert again["audio"].shape == first["audio"].shape
    err = (again["audio"] - first["audio"]).norm() / first["audio"].norm()
    assert err < 1e-4, err
    assert len(patched._codec_streams[1][1]) == 2
    wav = [torch.cat([e.audio for e in ev if e.kind == "audio"]) for ev in (events_a, events_b)]
    for w in wav:
        assert w.shape == first["audio"].shape
        assert (w - first["audio"]).norm() / first["audio"].norm() < 1e-4


@pytest.mark.gpu
def test_codec_stream_reuse_replays_graphs_on_cuda(monkeypatch):
    """On CUDA (graphs), a reused codec stream gives the same audio as the first request, and from its second reuse
    on no new graph is captured (the first reuse captures its first-push-after-reset graphs)."""
    import omni_fast

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    base = Qwen3Omni.random("tiny", patch=False, device="cuda", dtype=torch.float32)
    pipe = Qwen3Omni(base.model, tokenizer=base.tokenizer)  # patched
    req = Request(text=[5, 6, 7, 8, 9])
    kw = dict(**GREEDY, first_chunk=1, chunk=3)
    try:
        outs = [pipe.generate(req, **kw)[0]["audio"] for _ in range(2)]
        (stream, _), = pipe._codec_streams[1][1]
        assert stream.cuda_graphs and stream._graphs and stream._fresh_graphs
        graphs = (dict(stream._graphs), dict(stream._fresh_graphs))
        outs.append(pipe.generate(req, **kw)[0]["audio"])
        assert (stream._graphs, stream._fresh_graphs) == graphs  # the same graph objects: nothing captured
    finally:
        omni_fast.unpatch(base.model)
    for o in outs[1:]:
        assert o.shape == outs[0].shape
        assert (o - outs[0]).norm() / outs[0].norm() < 1e-4


def test_patched_pipeline_runs_the_mtp_step_on_omni_fast(pipe):
    """Patched, the MTP stage is CodePredictor.predict_frame: greedy gives transformers' audio (checked above);
    sampling runs with omni-fast's RNG and stays within the codebook."""
    import omni_fast
    from omni_fast.models.components import OmniCodePredictor

    patched = Qwen3Omni(pipe.model, patch=True, tokenizer=pipe.tokenizer, backend="reference")
    try:
        assert isinstance(patched.code_predictor, OmniCodePredictor)
        out = patched.generate(Request(text=[5, 6, 7]), max_new_tokens=4, talker_max_new_tokens=6, do_sample=True,
                               talker_do_sample=True, seed=3)[0]
    finally:
        omni_fast.unpatch(pipe.model)
    assert out["audio"].numel() > 0 and torch.isfinite(out["audio"]).all()


def test_set_patched_switches_every_stage(pipe):
    """One pipeline, timed both ways by the benchmark: ``set_patched`` moves the model, the MTP frame step and the
    codec together (an unpatched pipeline patched later must not keep transformers' MTP and codec)."""
    import omni_fast
    from omni_fast.models.components import HFCodePredictor, OmniCodePredictor

    p = Qwen3Omni(pipe.model, patch=False, tokenizer=pipe.tokenizer, backend="reference")
    try:
        assert isinstance(p.code_predictor, HFCodePredictor) and p.fast_code2wav is None
        p.set_patched(True)
        assert pipe.model.__dict__.get("_omni_fast_patched") and p.patch_report is not None
        assert isinstance(p.code_predictor, OmniCodePredictor) and p.fast_code2wav is not None
        fast = p.code_predictor
        p.set_patched(False)
        assert not pipe.model.__dict__.get("_omni_fast_patched", False)
        assert isinstance(p.code_predictor, HFCodePredictor) and p.fast_code2wav is None
        p.set_patched(True)
        assert p.code_predictor is fast  # built once, reused
    finally:
        if pipe.model.__dict__.get("_omni_fast_patched", False):
            omni_fast.unpatch(pipe.model)


def test_fast_stages_follow_weight_changes(pipe):
    """The patched pipeline's MTP step and Code2Wav copy (repack) transformers' weights: after an in-place weight
    edit they are rebuilt, so the audio equals a freshly built pipeline's."""
    import omni_fast

    req = Request(text=[5, 6, 7, 8, 9])
    p = Qwen3Omni(pipe.model, patch=True, tokenizer=pipe.tokenizer, backend="reference")
    saved = {n: t.clone() for n, t in pipe.model.code2wav.state_dict().items()}
    try:
        before = p.generate(req, **GREEDY)[0]["audio"]
        with torch.no_grad():
            for t in pipe.model.code2wav.parameters():
                if t.dim() == 3:
                    t.mul_(1.5)
        after = p.generate(req, **GREEDY)[0]["audio"]
        fresh = Qwen3Omni(pipe.model, patch=True, tokenizer=pipe.tokenizer, backend="reference")
        assert not torch.equal(after, before)
        torch.testing.assert_close(after, fresh.generate(req, **GREEDY)[0]["audio"], rtol=0, atol=0)
    finally:
        pipe.model.code2wav.load_state_dict(saved)
        omni_fast.unpatch(pipe.model)


def test_graph_defaults_follow_the_backend(monkeypatch):
    """CUDA-graph defaults are off under the reference backend (its ops read values on the host), however it was
    chosen: argument, use_backend block or environment."""
    from omni_fast.backend import graph_capturable

    assert graph_capturable() and graph_capturable("triton") and not graph_capturable("reference")
    with omni_fast.use_backend("reference"):
        assert not graph_capturable() and graph_capturable("cuda")
    monkeypatch.setenv("OMNI_FAST_BACKEND", "reference")
    assert not graph_capturable()


@pytest.mark.parametrize("flag", ["--repeats", "--thinker-layers", "--concurrency"])
def test_pipeline_bench_refuses_counts_below_one(flag, capsys):
    """0 or negative repeats / layers / concurrency measured nothing (or failed late on a GPU): argparse refuses."""
    from omni_fast.bench.cases import pipeline as bench_pipeline

    with pytest.raises(SystemExit):
        bench_pipeline.main([flag, "0"])
    assert "must be >= 1" in capsys.readouterr().err
