"""Qwen2.5-Omni on omni-fast through ``omni_fast.patch``: the talker's decode steps on
:class:`omni_fast.models.MoeTextDecoder` (:mod:`omni_fast.integrations.qwen25_talker`), and transformers' full
``generate(..., return_audio=True)`` patched vs unpatched on a tiny random model (greedy): identical text tokens and
talker codes, and the waveform, for text, audio, image and video (``use_audio_in_video``) prompts. The Triton
kernels run on the CPU interpreter here."""

import pytest
import torch

import omni_fast
from omni_fast.testing import run_unpatched_then_patched, seeded_weights_

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25  # noqa: E402

from omni_fast.integrations import decode_takeover, qwen25_talker  # noqa: E402
from omni_fast.integrations.hf_compat import output_cache, with_cache  # noqa: E402
from omni_fast.models import MoeTextDecoder  # noqa: E402
from omni_fast.models.presets import tiny_qwen2_5_omni_config  # noqa: E402

AUDIO, IMAGE, VIDEO, AUDIO_START, VISION_START = 140, 141, 142, 146, 144  # tiny_qwen2_5_omni_config's ids
CODEC_EOS = 291


def tiny_qwen2_5_omni(seed: int = 0):
    """The tiny random Qwen2.5-Omni (fp32) with two speakers (random conditioning and reference mels)."""
    cfg = tiny_qwen2_5_omni_config()
    torch.manual_seed(seed)
    model = q25.Qwen2_5OmniForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    seeded_weights_(model.thinker, seed)
    seeded_weights_(model.talker, seed + 1)
    seeded_weights_(model.token2wav, seed + 2, scale=0.05)  # N(0, 0.05): BigVGAN's output stays inside its clamp
    dit = cfg.token2wav_config.dit_config
    g = torch.Generator().manual_seed(seed + 3)
    model.speaker_map = {name: {"bos_token": 150, "cond": torch.randn(dit.enc_emb_dim, generator=g),
                                "ref_mel": torch.randn(10, dit.mel_dim, generator=g)} for name in ("Chelsie", "Ethan")}
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_omni()


@pytest.fixture
def decode_steps(monkeypatch):
    """How many talker decode steps ran on omni-fast's decoder."""
    calls = []
    real = MoeTextDecoder.step
    monkeypatch.setattr(MoeTextDecoder, "step", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


def generate(model, ids, mask=None, talker_tokens=10, **extra):
    """transformers' full generate (greedy thinker and talker, 2 ODE steps): (text ids, talker codes, waveform)."""
    codes = []
    real = model.talker.generate
    model.talker.generate = lambda *a, **k: codes.append(real(*a, **k)) or codes[-1]
    try:
        torch.manual_seed(7)  # Token2Wav's initial noise
        text, wav = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                                   thinker_max_new_tokens=4, thinker_do_sample=False, talker_do_sample=False,
                                   talker_max_new_tokens=talker_tokens, talker_eos_token_id=[CODEC_EOS],
                                   token2wav_num_steps=2, **extra)
    finally:
        del model.talker.generate
    return text, codes[0], wav


def test_talker_decode_steps_match_transformers(model):
    """The talker text model called as generate calls it (an empty DynamicCache at the prefill, then one token a
    step with the cache it returned): hidden states of the prefill and of 4 decode steps, left-padded batch of 2."""
    talker = model.talker.model
    g = torch.Generator().manual_seed(11)
    prompt = torch.randn(2, 6, 32, generator=g)
    steps = torch.randn(4, 2, 1, 32, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])

    def run():
        with torch.no_grad():
            out = talker(inputs_embeds=prompt, attention_mask=mask, **with_cache(DynamicCache(), use_cache=True))
            hidden, cache, m = [out.last_hidden_state[:, -1]], output_cache(out), mask
            for i, x in enumerate(steps):
                m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
                pos = (m.cumsum(1)[:, -1:] - 1).expand(3, 2, 1) + 10 * (i % 2)  # any text positions
                out = talker(inputs_embeds=x, attention_mask=m, position_ids=pos, **with_cache(cache, use_cache=True))
                hidden.append(out.last_hidden_state[:, -1])
                cache = output_cache(out)
        return torch.stack(hidden), cache

    (want, _), (got, cache), report = run_unpatched_then_patched(model, run)
    assert isinstance(cache, qwen25_talker.FastTalkerCache) and cache.get_seq_length() == 6 + 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32; the kernels sum in another order
    assert any("[talker] Qwen2_5OmniTalkerModel: decode steps" in r for r in report.replaced)
    assert "forward" not in talker.__dict__ and not any(k.startswith("_omni_fast") for k in talker.__dict__)


def test_generate_greedy_codes_identical_left_padded_batch(model, decode_steps, monkeypatch):
    """Batch of 2 prompts (left padded): same text tokens, same talker codes, same waveform (Token2Wav is not
    swapped by default: same codes and noise give transformers' waveform bit for bit). The decoder's cache starts
    with room for 3 steps: generate runs past it and the cache grows (``MoeTextDecoder.reserve``)."""
    monkeypatch.setattr(decode_takeover, "INITIAL_STEPS", 3)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    (text0, codes0, wav0), (text1, codes1, wav1), _ = run_unpatched_then_patched(
        model, lambda: generate(model, ids, mask), backend="triton")
    assert len(decode_steps) == codes0.shape[1] - 1 - (ids.shape[1] + 2)  # every decode step after the prefill
    assert torch.equal(text1, text0) and torch.equal(codes1, codes0)
    assert len(wav0) == len(wav1) == 2 and all(torch.equal(a, b) for a, b in zip(wav1, wav0))
    assert torch.equal(generate(model, ids, mask)[1], codes0)  # unpatched again: transformers' own path


def _image(vcfg, grid=(1, 4, 4)):
    n = grid[0] * grid[1] * grid[2]
    px = torch.randn(n, vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2,
                     generator=torch.Generator().manual_seed(21))
    return px, torch.tensor([grid]), n // vcfg.spatial_merge_size ** 2


def _audio(model, seconds=1.0):
    frames = int(100 * seconds)
    feats = torch.randn(1, 128, frames, generator=torch.Generator().manual_seed(22))
    fmask = torch.ones(1, frames, dtype=torch.long)
    enc = next(m for m in model.thinker.modules() if type(m).__name__ == "Qwen2_5OmniAudioEncoder")
    n = int(enc._get_feat_extract_output_lengths(fmask.sum(-1))[1][0])
    return dict(input_features=feats, feature_attention_mask=fmask), n


def _inputs(model, kind):
    """(prompt ids [1, T], generate keywords) for a prompt with one ``kind`` item. Pixels go to the thinker alone
    (``thinker_`` prefix): transformers hands un-prefixed keywords to the talker too, whose ``generate`` refuses
    ``pixel_values``; the grids go to both (the talker's positions read them)."""
    vcfg = model.config.thinker_config.vision_config
    text = [5, 6, 7]
    if kind == "audio":
        extra, n = _audio(model)
        block = [AUDIO_START] + [AUDIO] * n + [AUDIO_START + 1]
    elif kind == "image":
        px, grid, n = _image(vcfg)
        extra, block = dict(thinker_pixel_values=px, image_grid_thw=grid), [VISION_START] + [IMAGE] * n + [VISION_START + 1]
    else:  # a 2-frame video with its audio track (use_audio_in_video): video and audio tokens in one block
        px, grid, n = _image(vcfg, (2, 4, 4))
        extra, na = _audio(model, 0.5)
        extra.update(thinker_pixel_values_videos=px, video_grid_thw=grid, video_second_per_grid=torch.tensor([1.0]),
                     use_audio_in_video=True)
        block = [VISION_START, AUDIO_START] + [VIDEO] * n + [AUDIO] * na + [AUDIO_START + 1, VISION_START + 1]
    return torch.tensor([text + block + text]), extra


@pytest.mark.parametrize("kind", ["audio", "image", "video_with_audio"])
def test_generate_multimodal_parity(model, decode_steps, kind):
    ids, extra = _inputs(model, kind)
    (text0, codes0, wav0), (text1, codes1, wav1), _ = run_unpatched_then_patched(
        model, lambda: generate(model, ids, **extra), backend="triton")
    assert decode_steps and torch.equal(text1, text0) and torch.equal(codes1, codes0)
    assert torch.equal(wav1, wav0)


def test_generate_with_token2wav_swapped(model, decode_steps, fast_path, monkeypatch):
    """Token2Wav switched on too (opt-in until GPU-tested): its forward runs ``dit_solve.synthesize`` (DiT solve +
    padded BigVGAN, one graph per bucket: emulated here), on the reference backend (the Triton vocoder on the
    interpreter over a padded bucket takes minutes; kernel vs reference: tests/test_bigvgan*.py, test_dit*.py,
    test_token2wav*.py): same text and codes; the waveform within 1e-6 absolute. Why that bound: fp32 end to end,
    the padded solve and vocoder add the same terms in another order (~1e-7 relative per op) through the DiT's RK4
    steps and BigVGAN's 6 upsampling stages (tests/test_token2wav_forward.py measured 1.9e-9 on a peak of 6.2e-3);
    1e-6 is far below audibility and still catches a wrong tap, mask or padding leak."""
    from omni_fast.models import dit_solve

    fast_path("token2wav")
    calls = []
    real = dit_solve.synthesize
    monkeypatch.setattr(dit_solve, "synthesize", lambda *a, **k: calls.append(a[4].shape) or real(*a, **k))
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(4))
    (text0, codes0, wav0), (text1, codes1, wav1), report = run_unpatched_then_patched(
        model, lambda: generate(model, ids, talker_tokens=6), backend="reference")
    assert torch.equal(text1, text0) and torch.equal(codes1, codes0)
    assert len(calls) == 1 and wav1.shape == wav0.shape == (calls[0][1] * 2 * 240,)  # the forward ran synthesize
    assert 0 < wav0.abs().max() < 1  # not clamped: a real comparison
    torch.testing.assert_close(wav1, wav0, atol=1e-6, rtol=0)
    assert any("Qwen2_5OmniToken2WavModel.forward" in r for r in report.replaced)
    assert any("AntiAliasedActivation1d" in r for r in report.replaced)


def test_decoder_bad_input(model):
    dec = MoeTextDecoder.from_transformers(model.talker.model, None)
    assert dec.config.qk_norm is False and dec.config.interleaved is False
    with pytest.raises(RuntimeError, match="load_prefill"):
        dec.reserve(4)
    cache = DynamicCache()
    with torch.no_grad():
        out = model.talker.model(inputs_embeds=torch.randn(1, 3, 32), **with_cache(cache, use_cache=True))
    dec.load_prefill(output_cache(out), torch.ones(1, 3, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match="steps"):
        dec.reserve(-1)
    fast = qwen25_talker.FastTalkerCache(dec, 3)
    for bad in (torch.randn(1, 0, 32), torch.randn(2, 32)):
        with pytest.raises(ValueError, match="inputs_embeds"):
            qwen25_talker._decode_step(model.talker.model, fast, None, None, bad)
    # several tokens (assisted decoding's candidates): one decoder step each, the cache grows past max_new_tokens
    out = qwen25_talker._decode_step(model.talker.model, fast, None, None, torch.randn(1, 2, 32))
    assert out.last_hidden_state.shape == (1, 2, 32) and fast.get_seq_length() == 5


@pytest.mark.gpu
def test_talker_graph_decode_cuda(model):
    """On CUDA (fp32) the talker's decode steps are CUDA-graph replays of the decoder: the same greedy text, codes
    and waveform as transformers on the same GPU."""
    import copy

    m = copy.deepcopy(model).cuda()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    want = generate(m, ids, mask)
    omni_fast.patch(m, backend="triton")
    try:
        got = generate(m, ids, mask)
        dec = m.talker.model.__dict__["_omni_fast_talker_decoder"][1]
        assert dec._state is not None and dec._state.graph is not None  # captured, replayed per step
    finally:
        omni_fast.unpatch(m)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(torch.cat(got[2]), torch.cat(want[2]), atol=1e-6, rtol=0)


def test_parts_token2wav_names_the_qwen25_waveform_part(model):
    """Qwen2.5-Omni's waveform model is Token2Wav: ``parts=("token2wav",)`` patches it (the part ``code2wav``, the
    same report), where it was refused as an unknown part."""
    import warnings

    try:
        with warnings.catch_warnings():  # (with the token2wav fast path off nothing is replaced: a warning)
            warnings.simplefilter("ignore")
            by_alias = omni_fast.patch(model, parts=("token2wav",))
            omni_fast.unpatch(model)
            by_name = omni_fast.patch(model, parts=("code2wav",))
    finally:
        omni_fast.unpatch(model)
    assert by_alias.replaced == by_name.replaced and by_alias.left == by_name.left
    # the Token2Wav's modules are the selected part (replaced, or left only as an opt-in fast path)
    assert any("[code2wav]" in r and "part not selected" not in r for r in by_alias.replaced + by_alias.left)


@pytest.mark.parametrize("setting", ["sliding", "hidden_act"])
def test_talker_config_the_decoder_does_not_compute_keeps_transformers_decode(setting):
    """A talker config with sliding-window layers (``use_sliding_window=True``: ``layer_types`` "sliding_attention"
    from ``max_window_layers`` on; :class:`MoeTextDecoder` attends to the whole cache) or another MLP activation:
    the decode takeover leaves such a text model's steps to transformers and the report says so. Before, patch
    reported the takeover and the patched forward then raised ``ValueError`` (``only full-attention layers are
    supported`` / ``the dense MLP must be SwiGLU``) from inside ``MoeTextDecoder.from_transformers`` at the first
    prefill with a cache."""
    cfg = tiny_qwen2_5_omni_config().talker_config
    if setting == "sliding":
        cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 3, 1
        cfg.layer_types = ["full_attention"] + ["sliding_attention"] * (cfg.num_hidden_layers - 1)
    else:
        cfg.hidden_act = "gelu"
    torch.manual_seed(0)
    talker = seeded_weights_(q25.Qwen2_5OmniTalkerForConditionalGeneration._from_config(cfg, dtype=torch.float32),
                             1).eval()
    text = talker.model
    assert setting != "sliding" or text.layers[-1].self_attn.sliding_window == 3
    g = torch.Generator().manual_seed(11)
    prompt, steps = torch.randn(2, 6, 32, generator=g), torch.randn(3, 2, 1, 32, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])

    def run():
        with torch.no_grad():
            out = text(inputs_embeds=prompt, attention_mask=mask,
                       **with_cache(DynamicCache(config=text.config), use_cache=True))
            hidden, cache, m = [out.last_hidden_state[:, -1]], output_cache(out), mask
            for x in steps:  # past the window of 3
                m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
                out = text(inputs_embeds=x, attention_mask=m, position_ids=(m.cumsum(1)[:, -1:] - 1).expand(3, 2, 1),
                           **with_cache(cache, use_cache=True))
                hidden.append(out.last_hidden_state[:, -1])
                cache = output_cache(out)
        return torch.stack(hidden), cache

    (want, _), (got, cache), report = run_unpatched_then_patched(talker, run)
    assert not isinstance(cache, qwen25_talker.FastTalkerCache)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    word = "sliding" if setting == "sliding" else "hidden_act 'gelu'"
    assert any("decode steps stay on transformers" in r and word in r for r in report.replaced + report.left)
