"""The thin pipeline's per-request clocks, request validation, text-only checkpoints, checkpoint layouts
(sharded, per-expert unfused) and the GPU end-to-end runs (``@pytest.mark.gpu``)."""

import json
import math
import re
import time

import pytest
import torch

pytest.importorskip("transformers")

from omni_fast.models import qwen3_omni  # noqa: E402
from omni_fast.models.presets import TINY_CODEC_IDS, TINY_IDS, tiny_qwen3_omni_config  # noqa: E402
from omni_fast.models.qwen3_omni import MIN_AUDIO_SAMPLES, Qwen3Omni, Request  # noqa: E402

EOS = TINY_IDS["im_end_token_id"]
CODEC_EOS = TINY_CODEC_IDS["codec_eos_token_id"]


@pytest.fixture(scope="module")
def pipe():
    return Qwen3Omni.random("tiny", patch=False)


def _wave(seconds=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(16000 * seconds)) / 16000
    return 0.3 * torch.sin(2 * math.pi * 180 * t) + 0.01 * torch.randn(t.shape, generator=g)


def _script(monkeypatch, text_eos_at: dict[int, int], codec_eos_at: dict[int, int]):
    """Make chosen rows stop: row r's text sampler returns EOS from its ``text_eos_at[r]``-th call on (call 1 is the
    prefill's first token), its codec sampler codec EOS from its ``codec_eos_at[r]``-th call (call 1: the talker
    prefill's first code). The other rows sample as usual (greedy)."""
    real = qwen3_omni.make_sampler
    made = []

    def fake(do_sample, **kw):
        sampler = real(do_sample, **kw)
        which = len(made)
        made.append(sampler)
        if which > 1:  # the MTP sampler: as is
            return sampler
        script, eos = (text_eos_at, EOS) if which == 0 else (codec_eos_at, CODEC_EOS)
        calls = [0]

        def scripted(logits):
            out = sampler(logits).clone()
            calls[0] += 1
            for row, n in script.items():
                if calls[0] >= n:
                    out[row] = eos
            return out

        scripted.do_sample = sampler.do_sample
        return scripted

    monkeypatch.setattr(qwen3_omni, "make_sampler", fake)


def _consume(stream):
    """Run a stream; per request: its events' arrival times (seconds after the consumer started it) and timing."""
    t0 = time.perf_counter()
    audio_at, text_at, timing, tokens, audio = {}, {}, {}, {}, {}
    for ev in stream:
        now = time.perf_counter() - t0
        if ev.kind == "audio":
            audio_at[ev.request] = now
            audio[ev.request] = audio.get(ev.request, 0) + ev.audio.numel()
        elif ev.kind == "text":
            text_at[ev.request] = now
            tokens[ev.request] = tokens.get(ev.request, 0) + len(ev.token_ids)
        else:
            timing[ev.request] = ev.timing
    return audio_at, text_at, timing, tokens, audio


# --------------------------------------------------------------------------------------------- per-request clocks
def test_rtf_counts_to_the_last_audio_chunk(pipe):
    """Text longer than the speech budget: the text after the last audio chunk does not count in the RTF (wall
    time to the last audio sample / audio duration), it does count in ``total``."""
    reqs = [Request(text=[5, 6, 7]), Request(text=[8])]
    audio_at, text_at, timing, tokens, audio = _consume(
        pipe.stream(reqs, max_new_tokens=24, talker_max_new_tokens=4, first_chunk=1, chunk=1))
    for i, t in timing.items():
        assert t.audio_seconds > 0 and t.audio_seconds == audio[i] / 24000
        assert t.rtf == t.last_audio / t.audio_seconds
        # the pipeline's clock starts after the consumer's, and stamps a chunk before handing it out
        assert 0 < t.first_packet <= t.last_audio <= audio_at[i]
        assert t.last_text <= text_at[i]
        assert tokens[i] == t.text_tokens == 24  # no EOS in 24 greedy tokens of this random model
        # the text went on after the speech: total ends at the last text token, the RTF's clock stopped before
        assert t.last_audio < t.last_text == t.total
        assert t.rtf < t.total / t.audio_seconds


def test_per_request_clocks_follow_each_request(pipe, monkeypatch):
    """Two requests of different lengths in one batch (row 1's text stops after 3 tokens, row 0's speech after 2
    frames): each gets its own token counts, its own decode time (only the steps it took part in), its own last
    packet and RTF; the batch-level stage split is the same for both."""
    _script(monkeypatch, text_eos_at={1: 3}, codec_eos_at={0: 3})
    reqs = [Request(text=[5, 6, 7]), Request(text=[8, 9])]
    outs = pipe.generate(reqs, max_new_tokens=12, talker_max_new_tokens=8, first_chunk=1, chunk=1)
    t0, t1 = (o["timing"] for o in outs)
    # token counts: the tokens each request produced
    assert [t0.text_tokens, t1.text_tokens] == [len(outs[0]["token_ids"]), 3] and t0.text_tokens == 12
    assert outs[1]["token_ids"][-1] == EOS
    assert t0.frames == 2 and t0.talker_tokens == 3  # c0, one more code, codec EOS
    assert t1.frames > t0.frames and t1.talker_tokens == t1.frames + 1
    # decode time: row 1 stopped its text early, row 0 its speech early; rates are their own tokens over it
    assert 0 < t1.thinker_decode < t0.thinker_decode and 0 < t0.talker_decode < t1.talker_decode
    for t in (t0, t1):
        assert t.thinker_tokens_per_s == pytest.approx((t.text_tokens - 1) / t.thinker_decode)
        assert t.talker_tokens_per_s == pytest.approx((t.talker_tokens - 1) / t.talker_decode)
        assert t.mtp_per_frame > 0 and t.codec_per_code > 0
        assert t.first_packet <= t.last_audio <= t.total and t.rtf == t.last_audio / t.audio_seconds
    assert t0.mtp_per_frame * t0.frames < t1.mtp_per_frame * t1.frames  # row 0 was in fewer MTP frames
    # its speech ended two frames in, the other row's later; its text went on, the other row's ended early
    assert t0.last_audio < t1.last_audio and t0.audio_seconds < t1.audio_seconds
    assert t1.last_text < t0.last_text
    # the shared stages: one batch-level split, and the batch's first tokens are the same for both
    assert t0.stages == t1.stages and set(t0.stages) >= {"thinker decode", "talker decode", "MTP", "Code2Wav"}
    assert t0.thinker_ttft == t1.thinker_ttft and t0.talker_ttft == t1.talker_ttft
    assert t0.stages["thinker decode"] >= t0.thinker_decode


# ------------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("req,err,match", [
    (Request(text=[5], audio=torch.randn(2, 8000)), ValueError, r"requests\[0\]\.audio must be a 1-D mono"),
    (Request(text=[5], audio=torch.zeros(8000, dtype=torch.int16)), TypeError, r"requests\[0\]\.audio .*int16"),
    (Request(text=[5], audio=torch.randn(10)), ValueError, r"requests\[0\]\.audio has 10 samples; at least 400"),
    (Request(text=[5], audio=[0.0] * 800), TypeError, r"requests\[0\]\.audio must be a torch.Tensor"),
    (Request(text=[5], image=torch.rand(32, 32)), ValueError, r"requests\[0\]\.image must be \[3, H, W\]"),
    (Request(text=[5], image=torch.rand(1, 3, 32, 32)), ValueError, r"requests\[0\]\.image must be \[3, H, W\]"),
    (Request(text=[5], image=torch.zeros(3, 8, 8, dtype=torch.uint8)), TypeError, r"requests\[0\]\.image"),
    (Request(text=[5], video=torch.rand(3, 32, 32)), ValueError, r"requests\[0\]\.video must be \[F, 3, H, W\]"),
    (Request(text=[5], video=torch.rand(2, 3, 32, 32), video_fps=0.0), ValueError, r"video_fps must be a positive"),
    (Request(text=[5], video=torch.rand(2, 3, 32, 32), video_fps=float("nan")), ValueError, r"video_fps"),
    (Request(text=[100000]), ValueError, r"requests\[0\]\.text: token id 100000 outside the vocabulary"),
    (Request(text=[-3]), ValueError, r"requests\[0\]\.text: token id -3 outside"),
    (Request(text=[5, 2.5]), TypeError, r"requests\[0\]\.text: token ids must be ints"),
    (Request(text=None), TypeError, r"requests\[0\]\.text must be a str or a list"),
])
def test_bad_requests_raise_naming_the_field(pipe, req, err, match):
    with pytest.raises(err, match=match):
        pipe.generate(req, max_new_tokens=2, talker_max_new_tokens=2)


def test_bad_request_in_a_batch_names_its_index(pipe):
    with pytest.raises(ValueError, match=r"requests\[1\]\.audio"):
        pipe.generate([Request(text=[5]), Request(text=[5], audio=torch.randn(1, 100))], max_new_tokens=2)
    with pytest.raises(TypeError, match=r"requests\[0\] must be an omni_fast.models.Request"):
        pipe.generate([{"text": [5]}])


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(talker_max_new_tokens=0), "talker_max_new_tokens"), (dict(first_chunk=0), "first_chunk"),
    (dict(chunk=0), "chunk"), (dict(left_context=-1), "left_context"), (dict(prefill_chunk=-2), "prefill_chunk"),
    (dict(prefill_chunk=0), "prefill_chunk"), (dict(talker_repetition_penalty=0.0), "talker_repetition_penalty"),
    (dict(talker_min_new_tokens=-1), "talker_min_new_tokens"),
])
def test_bad_generation_arguments(pipe, kw, match):
    """``max_new_tokens=0`` is an error (the first text token is what starts the talker), not an empty answer."""
    with pytest.raises(ValueError, match=match):
        pipe.generate(Request(text=[5]), **{**dict(max_new_tokens=2, talker_max_new_tokens=2), **kw})
    with pytest.raises(TypeError, match="max_new_tokens must be an int"):
        pipe.generate(Request(text=[5]), max_new_tokens=2.0)


def test_shortest_audio_and_lower_precision_run(pipe):
    """The shortest accepted waveform (one STFT window) and a float16 one run end to end."""
    out = pipe.generate([Request(text=[5], audio=_wave(MIN_AUDIO_SAMPLES / 16000)),
                         Request(text=[6], audio=_wave(0.3).half())], max_new_tokens=2, talker_max_new_tokens=3)
    assert all(len(o["token_ids"]) == 2 and o["audio"].numel() > 0 for o in out)


# ----------------------------------------------------------------------------------------------- text-only models
def test_checkpoint_without_talker_streams_text_only():
    """``enable_audio_output=False``: no talker and no Code2Wav in the model. The pipeline streams text only (the
    thinker's greedy text, equal to transformers' thinker ``generate``), no audio events, and the timing says so."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    cfg = tiny_qwen3_omni_config()
    cfg.enable_audio_output = False
    torch.manual_seed(0)
    model = q3.Qwen3OmniMoeForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    qwen3_omni._randomize(model, 0, 0.2)
    assert not hasattr(model, "talker") and not hasattr(model, "code2wav")
    p = Qwen3Omni(model, patch=False, tokenizer=qwen3_omni.ByteTokenizer(128))
    assert not p.has_talker and p.code2wav is None and p.code_predictor is None
    req = Request(text=[5, 6, 7], audio=_wave(0.5))
    events = list(p.stream(req, max_new_tokens=6))
    assert {e.kind for e in events} == {"text", "done"}
    t = events[-1].timing
    assert t.frames == 0 and t.audio_seconds == 0 and math.isnan(t.rtf) and math.isnan(t.first_packet)
    assert t.text_tokens == 6 and t.total == t.last_text > 0 and "talker decode" not in t.stages
    ids = [i for e in events if e.kind == "text" for i in e.token_ids]
    # transformers' thinker on the same prompt
    feats, fmask = qwen3_omni.mel_features([req.audio])
    from omni_fast.models.positions import audio_tokens

    prompt = torch.tensor([p.build_prompt(req, audio_tokens(int(fmask.sum())), 0)])
    want = model.thinker.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), input_features=feats,
                                  feature_attention_mask=fmask, max_new_tokens=6, do_sample=False, eos_token_id=EOS)
    assert ids == want[0, prompt.shape[1]:].tolist()
    # patched (omni_fast.patch finds the thinker's parts; reference backend: plumbing), the same text
    patched = Qwen3Omni(model, patch=True, backend="reference", tokenizer=p.tokenizer)
    try:
        assert patched.patch_report.replaced and not patched.has_talker
        assert patched.generate(req, max_new_tokens=6)[0]["token_ids"] == ids
    finally:
        import omni_fast

        omni_fast.unpatch(model)


# -------------------------------------------------------------------------------------------- checkpoint layouts
def test_from_pretrained_sharded_safetensors(pipe, tmp_path):
    """A checkpoint in several safetensors shards with ``model.safetensors.index.json`` (how the real one ships)."""
    pipe.model.save_pretrained(tmp_path, max_shard_size="300KB")
    shards = sorted(f.name for f in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    loaded = Qwen3Omni.from_pretrained(tmp_path, patch=False, tokenizer=pipe.tokenizer)
    want, got = pipe.model.state_dict(), loaded.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    req = Request(text=[5, 6, 7])
    assert loaded.generate(req, max_new_tokens=4, talker_max_new_tokens=3)[0]["token_ids"] == \
        pipe.generate(req, max_new_tokens=4, talker_max_new_tokens=3)[0]["token_ids"]


def test_from_pretrained_real_checkpoint_key_layout(pipe, tmp_path):
    """The released checkpoint's layout: per-expert unfused ``...mlp.experts.{e}.gate_proj/up_proj/down_proj
    .weight`` and ``thinker.model.layers.*`` names (no ``language_model``), in two shards with an index; loading
    fuses them into transformers' ``gate_up_proj`` / ``down_proj`` and maps the names."""
    from safetensors.torch import save_file

    pipe.model.config.save_pretrained(tmp_path)
    want = {k: v.contiguous() for k, v in pipe.model.state_dict().items()}
    out = {}
    for k, v in want.items():
        fused = re.match(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", k)
        if fused is None:
            out[k] = v
            continue
        for e in range(v.shape[0]):
            if fused[2] == "gate_up_proj":
                inter = v.shape[1] // 2
                out[f"{fused[1]}.{e}.gate_proj.weight"] = v[e, :inter].clone()
                out[f"{fused[1]}.{e}.up_proj.weight"] = v[e, inter:].clone()
            else:
                out[f"{fused[1]}.{e}.down_proj.weight"] = v[e].clone()
    out = {k.replace("thinker.model.language_model.", "thinker.model."): v for k, v in out.items()}
    assert any(k.startswith("thinker.model.layers.0.mlp.experts.0.gate_proj") for k in out)
    keys = list(out)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    half = len(keys) // 2
    save_file({k: out[k] for k in keys[:half]}, str(tmp_path / names[0]), metadata={"format": "pt"})
    save_file({k: out[k] for k in keys[half:]}, str(tmp_path / names[1]), metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: names[i >= half] for i, k in enumerate(keys)}}))
    loaded = Qwen3Omni.from_pretrained(tmp_path, patch=False, tokenizer=pipe.tokenizer)
    got = loaded.model.state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


# ------------------------------------------------------------------------------------------------------ positions
def _positions_case(seconds: float):
    """Two rows: text + audio + image + video, left padded, and one with a hole in its mask."""
    from omni_fast.models.positions import PositionSpec, audio_tokens

    cfg = tiny_qwen3_omni_config().thinker_config
    spec = PositionSpec.from_config(cfg)
    vs, as_ = spec.vision_start_token_id, spec.audio_start_token_id
    n_audio = audio_tokens(130, spec.n_window)
    row0 = ([5, 6, as_] + [spec.audio_token_id] * n_audio + [as_ + 1, vs] + [spec.image_token_id] * 2
            + [vs + 1, 7, vs] + [spec.video_token_id] * 4 + [vs + 1, 8])
    row1 = [9, 10, vs] + [spec.image_token_id] * 2 + [vs + 1, 11, 12]
    S = len(row0) + 2
    ids = torch.zeros(2, S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, 2:], mask[0, 2:] = torch.tensor(row0), 1
    ids[1, :3], ids[1, 4:4 + len(row1) - 3] = torch.tensor(row1[:3]), torch.tensor(row1[3:])
    mask[1, :3], mask[1, 4:4 + len(row1) - 3] = 1, 1  # a hole at column 3
    grids = dict(image_grid_thw=torch.tensor([[1, 2, 4], [1, 4, 2]]), video_grid_thw=torch.tensor([[2, 2, 4]]),
                 audio_feature_lengths=torch.tensor([130]), second_per_grids=torch.tensor([seconds]))
    return cfg, spec, ids, mask, grids


@pytest.mark.parametrize("seconds", [1.0, 0.3])
def test_positions_read_the_layout_on_the_host_only(seconds):
    """``rope_positions`` with the layout on the host and the values on another device never reads the device:
    on the meta device (which has no values to read) it runs; on the CPU it equals transformers' ``get_rope_index``
    (left padding and a mask with a hole); ``integer=True`` gives int64 unless a video's positions are fractional."""
    import functools
    import types

    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    from omni_fast.models.positions import rope_positions

    cfg, spec, ids, mask, grids = _positions_case(seconds)
    owner = q3.Qwen3OmniMoePreTrainedModelForConditionalGeneration
    fake = types.SimpleNamespace(config=cfg, spatial_merge_size=spec.spatial_merge_size)
    fake.get_llm_pos_ids_for_vision = functools.partial(owner.get_llm_pos_ids_for_vision, fake)
    want, want_delta = owner.get_rope_index(
        fake, ids, image_grid_thw=grids["image_grid_thw"], video_grid_thw=grids["video_grid_thw"],
        attention_mask=mask, use_audio_in_video=False, audio_seqlens=grids["audio_feature_lengths"],
        second_per_grids=grids["second_per_grids"])
    got, delta = rope_positions(ids, spec, attention_mask=mask, **grids)
    torch.testing.assert_close(got, want.float(), rtol=0, atol=0)
    torch.testing.assert_close(delta, want_delta.to(delta.dtype), rtol=0, atol=0)
    meta, meta_delta = rope_positions(ids, spec, attention_mask=mask, device="meta", integer=True, **grids)
    assert meta.device.type == "meta" and meta.shape == got.shape and meta_delta.shape == (2, 1)
    assert meta.dtype == (torch.int64 if seconds == 1.0 else torch.float32)
    as_int, int_delta = rope_positions(ids, spec, attention_mask=mask, integer=True, **grids)
    assert torch.equal(as_int.double(), got.double()) and torch.equal(int_delta.double(), delta.double())


# ---------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_full_shapes_stream_one_request_on_gpu():
    """The 30B-A3B shapes (thinker trimmed to 2 layers: ~12.5 GiB of bf16 weights), random weights, patched (graph
    decode), one short audio + text request streamed end to end."""
    free = torch.cuda.mem_get_info()[0] / 2 ** 30
    if free < 20:
        pytest.skip(f"needs ~20 GiB free, {free:.0f} GiB free")
    p = Qwen3Omni.random("full", device="cuda", thinker_layers=2)
    try:
        assert p.model.dtype == torch.bfloat16 and p.patch_report is not None
        req = Request(text="Hello, how are you?", audio=_wave(1.0).cuda())
        audio_at, text_at, timing, tokens, audio = _consume(
            p.stream(req, max_new_tokens=6, talker_max_new_tokens=6, first_chunk=1, chunk=2))
        t = timing[0]
        assert tokens[0] == t.text_tokens > 0 and t.frames > 0 and audio[0] == round(t.audio_seconds * 24000)
        assert 0 < t.first_packet <= t.last_audio <= t.total and t.rtf > 0 and math.isfinite(t.rtf)
    finally:
        del p
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_bench_pipeline_measure_on_cuda_tiny():
    """The pipeline benchmark's report runner, every provider, on the tiny model on CUDA."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from omni_fast.bench.cases import pipeline

    p = Qwen3Omni.random("tiny", device="cuda", dtype=torch.float32, patch=False)
    result = pipeline.measure((1, 2), repeats=1, pipe=p, audio_seconds=0.5, sizes=(4, 3))
    assert result["device"] == torch.cuda.get_device_name()
    assert {r["provider"] for r in result["runs"]} == set(pipeline.PROVIDERS)
    assert all(r["rtf"] > 0 and r["total_ms"] > 0 and r["first_packet_ms"] <= r["total_ms"] for r in result["runs"])
    assert "transformers_patched" in pipeline.markdown(result)


@pytest.mark.gpu
def test_positions_from_host_layout_do_not_sync_on_cuda():
    """The thinker prompt's positions (layout on the host, values on the GPU) run with no host sync."""
    from omni_fast.models.positions import rope_positions

    _, spec, ids, mask, grids = _positions_case(1.0)
    want, _ = rope_positions(ids, spec, attention_mask=mask, integer=True, **grids)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got, _ = rope_positions(ids, spec, attention_mask=mask, device="cuda", integer=True, **grids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), want)
