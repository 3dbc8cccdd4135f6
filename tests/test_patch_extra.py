"""``omni_fast.patch``: the pinned backend, host syncs, parts and inputs test_patch.py does not cover, GPU parity.

- ``patch(model, backend=X)`` runs EVERY op the patched model reaches on X, whatever the ambient choice
  (``use_backend`` block, ``OMNI_FAST_BACKEND``): spied on each op's backend resolution.
- Host syncs of a patched thinker forward: none per layer; float positions cost one per forward, integer ones
  (what ``generate`` hands a patched model) none.
- The code predictor loaded alone, a 3 fps video (fractional positions: transformers' cos/sin fallback) and a
  Qwen2.5-Omni thinker with audio, patched on Triton (the interpreter on a CPU): same greedy tokens.
- GPU (``@pytest.mark.gpu``): bf16 greedy parity within bf16's near-ties, the talker's MTP graph replay, and
  ``torch.cuda.set_sync_debug_mode("error")`` around a patched decode step.
"""

import math
import sys
from collections import Counter

import pytest
import torch

import omni_fast
from omni_fast.ops._dispatch import DispatchedOp
from omni_fast.testing import HostSyncs, run_unpatched_then_patched, seeded_weights_

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402

from omni_fast.integrations.hf_compat import with_cache  # noqa: E402
from omni_fast.models.presets import (  # noqa: E402
    TINY_CODEC_IDS, TINY_IDS, TINY_THINKER_IDS, tiny_qwen2_5_omni_thinker_config, tiny_qwen3_omni_config)

PATCH_MODULE = sys.modules["omni_fast.patch"]  # (``omni_fast.patch`` the attribute is the function)


def _omni(layers=2):
    torch.manual_seed(0)
    return seeded_weights_(q3.Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_omni_config(layers)))


@pytest.fixture(scope="module")
def omni():
    return _omni()


@pytest.fixture
def resolved(monkeypatch):
    """Every op call's resolved backend: a Counter of (op name, backend)."""
    calls = Counter()
    real = DispatchedOp.resolve

    def spy(self, tensors, backend):
        be = real(self, tensors, backend)
        calls[(self.name, be)] += 1
        return be

    monkeypatch.setattr(DispatchedOp, "resolve", spy)
    return calls


def _wave(seconds=1.0):
    t = torch.arange(int(16000 * seconds)) / 16000
    return 0.3 * torch.sin(2 * math.pi * 180 * t) + 0.05 * torch.sin(2 * math.pi * 1100 * t)


def _prompt(*blocks):
    """``<im_start>user`` + the given id blocks + text + ``<im_end><im_start>assistant`` as a [1, T] batch."""
    i = TINY_IDS
    ids = [i["im_start_token_id"], i["user_token_id"]]
    for block in blocks:
        ids += block
    ids += [5, 6, 7, i["im_end_token_id"], i["im_start_token_id"], i["assistant_token_id"]]
    return torch.tensor([ids])


def _audio_inputs(out_lengths):
    """Mel features of a 1 s tone and the audio block of the prompt (``out_lengths``: frames -> tokens)."""
    from omni_fast.models.qwen3_omni import mel_features

    feats, fmask = mel_features([_wave()])
    n = int(out_lengths(fmask.sum(-1))[0])
    start = TINY_THINKER_IDS["audio_start_token_id"]
    return dict(input_features=feats, feature_attention_mask=fmask), [start] + [TINY_THINKER_IDS[
        "audio_token_id"]] * n + [start + 1]


def _qwen3_audio_inputs():
    from omni_fast.models.positions import audio_tokens

    return _audio_inputs(lambda lengths: [audio_tokens(int(lengths[0]))])


# --------------------------------------------------------------------------------------------- the pinned backend
def test_patch_backend_pins_every_op_of_the_full_model(omni, resolved, monkeypatch):
    """patch(backend="reference") under an ambient "triton" (env and use_backend): thinker (attention, q/k norm +
    RoPE, experts), audio encoder (varlen attention), talker, MTP frame step and Code2Wav all run on "reference"."""
    extra, block = _qwen3_audio_inputs()
    ids = _prompt(block)
    monkeypatch.setenv("OMNI_FAST_BACKEND", "triton")
    omni_fast.patch(omni, backend="reference")
    try:
        with omni_fast.use_backend("triton"), torch.no_grad():
            text, wav = omni.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), thinker_max_new_tokens=3,
                thinker_eos_token_id=TINY_IDS["im_end_token_id"], thinker_do_sample=False,
                talker_max_new_tokens=3, talker_do_sample=False, talker_repetition_penalty=1.0, **extra)
    finally:
        omni_fast.unpatch(omni)
    assert wav.numel() > 0
    names = {name for name, _ in resolved}
    # attention (thinker, talker, audio encoder), fused RoPE, experts, MTP layers + sampling, Code2Wav convolutions
    assert {"kvcache_attention", "flash_attn_varlen", "mrope_", "fused_moe_", "mtp_cached_attention", "sample",
            "causal_conv1d"} <= names, names
    assert {be for _, be in resolved} == {"reference"}, resolved


def test_a_cuda_pin_takes_the_cuda_twins_and_triton_elsewhere(omni, monkeypatch):
    """patch(backend="cuda"): an op with a CUDA C++ twin (RoPE, routing, sampling) resolves to "cuda", every other
    op (attention, GEMMs, MTP layers, convs) to "triton" (omni_fast.backend's one fallback rule) -- never a
    "backend 'cuda' is not implemented" error. CPU stand-in: the pin is set by hand (patch refuses "cuda" for CPU
    tensors), and every call's resolution is recorded, then the call runs on the reference backend: the resolutions
    are what is checked (on the interpreter's kernels the recorded set was the same, ~30 s later)."""
    seen = {}
    real = DispatchedOp.resolve

    def spy(self, tensors, backend):
        try:
            be = real(self, tensors, backend)
        except ValueError as err:
            if "needs CUDA tensors" not in str(err):
                raise
            be = "cuda"  # what a GPU runs
        seen.setdefault(self.name, set()).add((be, "cuda" in self.backends))
        return "reference"  # (the kernels themselves: their own tests; here only the resolution counts)

    extra, block = _qwen3_audio_inputs()
    ids = _prompt(block)
    omni_fast.patch(omni, backend="triton")
    try:
        for module in omni.modules():
            if "_omni_fast_backend" in module.__dict__:
                module.__dict__["_omni_fast_backend"] = "cuda"
        monkeypatch.setattr(DispatchedOp, "resolve", spy)
        with torch.no_grad():
            omni.generate(input_ids=ids, attention_mask=torch.ones_like(ids), thinker_max_new_tokens=3,
                          thinker_eos_token_id=TINY_IDS["im_end_token_id"], thinker_do_sample=False,
                          talker_max_new_tokens=2, talker_do_sample=False, talker_repetition_penalty=1.0, **extra)
    finally:
        omni_fast.unpatch(omni)
    assert {"kvcache_attention", "flash_attn_varlen", "mrope_", "fused_moe_", "mtp_cached_attention", "sample",
            "causal_conv1d"} <= set(seen), seen
    for name, outcomes in seen.items():
        for be, has_cuda in outcomes:
            assert be == ("cuda" if has_cuda else "triton"), (name, be)


def test_patch_backend_pins_the_thinker_on_triton_under_a_reference_context(omni, resolved):
    """The other way round, a thinker part alone: patch(backend="triton") wins over use_backend("reference")."""
    extra, block = _qwen3_audio_inputs()
    ids = _prompt(block)
    omni_fast.patch(omni.thinker, backend="triton")
    try:
        with omni_fast.use_backend("reference"), torch.no_grad():
            omni.thinker(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
    finally:
        omni_fast.unpatch(omni.thinker)
    assert {"kvcache_attention", "flash_attn_varlen", "mrope_", "fused_moe_"} <= {n for n, _ in resolved}
    assert {be for _, be in resolved} == {"triton"}, resolved


# ----------------------------------------------------------------------------------------------------- host syncs
def test_patched_thinker_forward_has_no_host_sync_per_layer(cuda_like_validation):
    """Decode steps of a patched 2-layer thinker text model: float positions (as transformers builds them) cost ONE
    sync per forward, not one per layer (the whole-number check runs in the rotary module), integer positions
    none."""
    torch.manual_seed(0)
    thinker = seeded_weights_(q3.Qwen3OmniMoeThinkerForConditionalGeneration(tiny_qwen3_omni_config(2).thinker_config))
    omni_fast.patch(thinker, backend="triton")
    try:
        cache = DynamicCache(config=thinker.config.text_config)
        with torch.no_grad():
            thinker.model(input_ids=torch.tensor([[5, 6, 7, 8]]), **with_cache(cache), use_cache=True,
                          position_ids=torch.arange(4.0).view(1, 1, 4).expand(3, 1, 4))
            counts = []
            for pos in (torch.full((3, 1, 1), 4.0), torch.full((3, 1, 1), 5, dtype=torch.long)):
                with HostSyncs() as syncs:
                    thinker.model(input_ids=torch.tensor([[9]]), position_ids=pos, **with_cache(cache),
                                  use_cache=True)
                counts.append(sum(syncs.count.values()))
    finally:
        omni_fast.unpatch(thinker)
    assert counts == [1, 0], counts


def test_generate_hands_the_patched_thinker_integer_positions(omni, monkeypatch):
    """get_rope_index of a patched thinker returns whole-number positions as int64, so every decode step's positions
    are int64 (no sync); the tokens stay transformers' own."""
    seen = []
    real = PATCH_MODULE._whole_positions
    monkeypatch.setattr(PATCH_MODULE, "_whole_positions", lambda pos: (seen.append(pos.dtype), real(pos))[1])
    thinker = omni.thinker
    ids = torch.tensor([[5, 6, 7, 8], [1, 9, 9, 10]])
    mask = torch.ones_like(ids)
    mask[1, 0] = 0

    def run():
        return thinker.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                eos_token_id=None)

    want, got, _ = run_unpatched_then_patched(thinker, run, backend="reference")
    assert torch.equal(got, want)
    assert seen and set(seen) == {torch.int64}, seen
    assert "get_rope_index" not in thinker.__dict__  # unpatched


# --------------------------------------------------------------------------------- parts and inputs, on Triton
def test_code_predictor_alone_generate_parity(omni, resolved):
    """The MTP code predictor loaded alone (its own generate, as the talker calls it): same residual codes."""
    cp = omni.talker.code_predictor
    groups = cp.config.num_code_groups
    embeds = torch.randn(2, 2, cp.config.hidden_size, generator=torch.Generator().manual_seed(4))

    def run():
        out = cp.generate(inputs_embeds=embeds, max_new_tokens=groups - 1, do_sample=False,
                          output_hidden_states=True, return_dict_in_generate=True)
        return out.sequences

    want, got, report = run_unpatched_then_patched(cp, run, backend="triton")
    assert got.shape == (2, groups - 1) and torch.equal(got, want)
    assert resolved[("mrope_", "triton")] > 0 and resolved[("kvcache_attention", "triton")] > 0
    assert all(r.startswith("[code_predictor]") for r in report.replaced)
    assert any("qk_norm_mrope" in r for r in report.replaced)


def test_fractional_video_positions_fall_back_inside_a_patched_thinker(omni, resolved, monkeypatch):
    """A 5-frame video at 3 fps (2/3 s per temporal patch x 13 positions per second: fractional positions): the
    patched thinker applies transformers' cos/sin in every layer (the RoPE kernel takes integer positions) and
    still runs its attention, experts and vision encoder on Triton: same greedy tokens."""
    from omni_fast.models.qwen3_omni import _patchify

    verdicts = []
    real = PATCH_MODULE._whole_positions
    monkeypatch.setattr(PATCH_MODULE, "_whole_positions", lambda pos: verdicts.append(real(pos)) or verdicts[-1])
    thinker = omni.thinker
    vcfg = thinker.config.vision_config
    video = torch.rand(5, 3, 64, 32, generator=torch.Generator().manual_seed(6))
    px, grid = _patchify(video, vcfg.patch_size, vcfg.temporal_patch_size, vcfg.spatial_merge_size)
    n = grid[0] * grid[1] * grid[2] // vcfg.spatial_merge_size ** 2
    start = TINY_THINKER_IDS["vision_start_token_id"]
    ids = _prompt([start] + [TINY_THINKER_IDS["video_token_id"]] * n + [start + 1])

    def run():
        return thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=px,
                                video_grid_thw=torch.tensor([grid]), video_second_per_grid=torch.tensor([2 / 3.0]),
                                max_new_tokens=4, do_sample=False, eos_token_id=None)

    want, got, _ = run_unpatched_then_patched(thinker, run, backend="triton")
    assert torch.equal(got, want)
    assert verdicts and all(v is None for v in verdicts)  # every forward took the fallback
    assert resolved[("mrope_", "triton")] == 0
    for op in ("kvcache_attention", "fused_moe_", "flash_attn_varlen"):
        assert resolved[(op, "triton")] > 0, op


def test_qwen2_5_omni_thinker_with_audio_parity_and_report(resolved):
    """Qwen2.5-Omni thinker with an audio clip on Triton: audio encoder varlen attention, contiguous M-RoPE through
    ``ops.mrope`` (no q/k norm), same greedy tokens; the report names the op actually used."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25

    torch.manual_seed(0)
    thinker = seeded_weights_(q25.Qwen2_5OmniThinkerForConditionalGeneration(tiny_qwen2_5_omni_thinker_config()))
    encoder = next(m for m in thinker.modules() if type(m).__name__ == "Qwen2_5OmniAudioEncoder")
    extra, block = _audio_inputs(lambda lengths: encoder._get_feat_extract_output_lengths(lengths)[1])
    ids = _prompt(block)

    def run():
        return thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                do_sample=False, eos_token_id=None, **extra)

    want, got, report = run_unpatched_then_patched(thinker, run, backend="triton")
    assert torch.equal(got, want)
    assert resolved[("flash_attn_varlen", "triton")] > 0 and resolved[("mrope_", "triton")] > 0
    text = str(report)
    assert "qk_norm" not in text and "q/k" not in text, text
    assert "Qwen2_5OmniRotaryEmbedding: positions handed to the attention layers' omni_fast.ops.mrope kernel" in text
    assert "Qwen2_5OmniAttention: RoPE -> omni_fast.ops.mrope" in text


# ------------------------------------------------------------------------------------------------------------ GPU
def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    diff = (a != b).nonzero()
    return None if diff.numel() == 0 else int(diff[0, 0])


def _margin(logits: torch.Tensor) -> float:
    top = logits.float().topk(2).values
    return float(top[0] - top[1])


def assert_greedy_within(want_tokens, got_tokens, want_logits, got_logits, atol: float):
    """Greedy runs of the same model in two implementations agree up to rounding: step by step the tokens are equal
    and the logits within ``atol``, until a step where the reference's top-2 margin is below ``2 * atol`` (a
    near-tie that rounding may flip); after it the sequences may part. ``*_tokens`` ``[steps]``, ``*_logits``
    ``[steps, V]`` (row i: the logits that chose token i)."""
    split = _first_difference(want_tokens, got_tokens)
    end = len(want_tokens) if split is None else split
    for i in range(end):
        err = float((want_logits[i].float() - got_logits[i].float()).abs().max())
        assert err <= atol, f"step {i}: logits differ by {err} > {atol}"
    if split is not None:
        assert _margin(want_logits[split]) <= 2 * atol, (
            f"tokens part at step {split} though the reference's top-2 margin {_margin(want_logits[split])} is "
            f"above 2 x {atol}")


def test_assert_greedy_within_rules():
    logits = torch.tensor([[0.0, 1.0, 3.0], [0.0, 1.0, 1.01]])
    assert_greedy_within(torch.tensor([2, 2]), torch.tensor([2, 1]), logits, logits + 0.005, atol=0.01)
    with pytest.raises(AssertionError, match="margin"):
        assert_greedy_within(torch.tensor([2, 2]), torch.tensor([1, 2]), logits, logits, atol=0.01)
    with pytest.raises(AssertionError, match="differ"):
        assert_greedy_within(torch.tensor([2, 2]), torch.tensor([2, 2]), logits, logits + 0.1, atol=0.01)


def _bf16_logit_atol(logits: torch.Tensor) -> float:
    """bf16 rounding of the logits: a few ulps (2^-8 relative) of their scale, plus the drift of a 2-layer model."""
    return 0.05 * float(logits.float().abs().max()) + 0.02


@pytest.mark.gpu
def test_gpu_bf16_thinker_greedy_parity():
    model = _omni().to("cuda", torch.bfloat16)
    thinker = model.thinker
    ids = _prompt([9, 10, 11]).cuda()

    def run():
        out = thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                               do_sample=False, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
        return out.sequences[0, ids.shape[1]:], torch.cat(out.logits)

    with torch.no_grad():
        want_tokens, want_logits = run()
        omni_fast.patch(model)
        try:
            got_tokens, got_logits = run()
        finally:
            omni_fast.unpatch(model)
    assert_greedy_within(want_tokens, got_tokens, want_logits, got_logits, _bf16_logit_atol(want_logits))


def _talker_generate(talker, seed=1):
    """The talker (with its code predictor) fed as the full model feeds it. Returns codebook-0 ids ``[steps]``, their
    logits over the ids generate may pick (the codebook and codec EOS; the other specials are suppressed, so a
    near-tie with one of them is none) ``[steps, V']``, and per audio frame its codes ``[frames, G]`` and the talker hidden state ``[frames, H]``
    the code predictor started from (last layer, last token of the step that chose the frame's codebook 0)."""
    dev, dtype = talker.device, talker.dtype
    gen = torch.Generator().manual_seed(seed)
    hidden = talker.config.text_config.hidden_size
    embeds, trailing, pad = (torch.randn(1, n, hidden, generator=gen).to(dev, dtype) for n in (9, 3, 1))
    vocab = talker.config.text_config.vocab_size
    eos = TINY_CODEC_IDS["codec_eos_token_id"]
    suppressed = [i for i in range(vocab - 1024, vocab) if i != eos]
    out = talker.generate(
        inputs_embeds=embeds, trailing_text_hidden=trailing, tts_pad_embed=pad,
        talker_input_ids=torch.full((1, 9), TINY_IDS["tts_pad_token_id"], device=dev),
        attention_mask=torch.ones(1, 9, dtype=torch.long, device=dev), max_new_tokens=6, do_sample=False,
        eos_token_id=eos, output_hidden_states=True, output_logits=True, return_dict_in_generate=True,
        suppress_tokens=suppressed)
    allowed = sorted(set(range(vocab)) - set(suppressed))
    steps = out.hidden_states  # per step: (all layers' hidden states, the residual codes of the frame or None)
    frames = [s for s in range(1, len(steps)) if steps[s][-1] is not None]
    codes = torch.stack([steps[s][-1][0] for s in frames])
    talker_hidden = torch.stack([steps[s - 1][0][-1][0, -1] for s in frames])
    return out.sequences[0], torch.cat(out.logits)[:, allowed], codes, talker_hidden


def _mtp_reference_logits(talker, talker_hidden, codes):
    """transformers' code predictor (as it is now: unpatched) teacher-forced on one frame: the logits ``[G-1, V]``
    that choose codes 1..G-1 given ``talker_hidden`` ``[H]`` and the frame's codes ``[G]`` (position g reads the
    embeddings of codes < g; position g-1's hidden state through ``lm_head[g-1]`` chooses code g)."""
    cp = talker.code_predictor
    G = codes.shape[0]
    tables = cp.model.get_input_embeddings()
    embeds = [talker_hidden, talker.get_input_embeddings()(codes[0])]
    embeds += [tables[g - 1](codes[g]) for g in range(1, G - 1)]
    hidden = cp.model(inputs_embeds=torch.stack(embeds)[None]).last_hidden_state[0]
    return torch.stack([cp.lm_head[g - 1](hidden[g]) for g in range(1, G)])


def assert_mtp_codes_within(talker, codes, talker_hidden, atol: float):
    """Each frame's residual codes are what transformers' code predictor picks from the same inputs (the talker
    hidden state and codes the patched run had), up to the first near-tie (top-2 margin below ``2 * atol``)."""
    for f in range(codes.shape[0]):
        logits = _mtp_reference_logits(talker, talker_hidden[f], codes[f])
        assert_greedy_within(logits.argmax(-1), codes[f, 1:], logits, logits, atol)


def test_mtp_codes_check_on_cpu(omni):
    """The GPU test's MTP rule, exact in fp32 on the CPU: the patched talker's residual codes are transformers'
    code predictor's argmax on the same inputs, frame by frame."""
    talker = omni.talker
    with torch.no_grad():
        omni_fast.patch(talker, backend="reference")
        try:
            seq, _, codes, talker_hidden = _talker_generate(talker)
        finally:
            omni_fast.unpatch(talker)
        assert codes.shape[0] >= 2 and torch.equal(codes[:, 0], seq[:codes.shape[0]])
        assert_mtp_codes_within(talker, codes, talker_hidden, atol=0.0)
        bad = codes.clone()
        bad[0, 1] = (bad[0, 1] + 1) % talker.code_predictor.config.vocab_size
        with pytest.raises(AssertionError):
            assert_mtp_codes_within(talker, bad, talker_hidden, atol=0.0)


@pytest.mark.gpu
def test_gpu_bf16_talker_codes_parity_and_mtp_graph_replay(monkeypatch):
    """bf16 on CUDA: the patched talker's codebook-0 ids follow the unpatched ones within bf16 near-ties; its
    residual codes come from the MTP frame step replayed as one CUDA graph per frame, equal those of the same frame
    step run eagerly (same kernels: exactly), and are transformers' code predictor's picks on the same inputs up to
    bf16 near-ties."""
    from omni_fast.models.code_predictor import CodePredictor

    model = _omni().to("cuda", torch.bfloat16)
    talker = model.talker
    with torch.no_grad():
        want_seq, want_logits, _, _ = _talker_generate(talker)
        omni_fast.patch(talker)
        try:
            replays = []
            real_graph = CodePredictor._graph_frame
            monkeypatch.setattr(CodePredictor, "_graph_frame",
                                lambda self, *a, **k: replays.append(1) or real_graph(self, *a, **k))
            got_seq, got_logits, got_codes, got_hidden = _talker_generate(talker)
            assert replays, "the patched talker did not replay the MTP graph on CUDA"
            real_predict = CodePredictor.predict_frame
            monkeypatch.setattr(CodePredictor, "predict_frame",
                                lambda self, *a, **k: real_predict(self, *a, **{**k, "use_graph": False}))
            eager_seq, _, eager_codes, _ = _talker_generate(talker)
        finally:
            omni_fast.unpatch(talker)
        assert torch.equal(eager_seq, got_seq) and torch.equal(eager_codes, got_codes)  # graph replay == eager
        n = len(want_logits)
        assert_greedy_within(want_seq[-n:], got_seq[-n:], want_logits, got_logits, _bf16_logit_atol(want_logits))
        mtp_logits = _mtp_reference_logits(talker, got_hidden[0], got_codes[0])
        assert_mtp_codes_within(talker, got_codes, got_hidden, _bf16_logit_atol(mtp_logits))


@pytest.mark.gpu
def test_gpu_patched_decode_step_is_sync_free():
    """A patched thinker decode step on CUDA (integer positions, as generate hands them; no padding mask) makes no
    synchronizing CUDA call: torch's sync debug mode raises on any."""
    model = _omni().to("cuda", torch.bfloat16)
    thinker = model.thinker
    omni_fast.patch(thinker)
    try:
        cache = DynamicCache(config=thinker.config.text_config)
        with torch.no_grad():
            thinker.model(input_ids=torch.tensor([[5, 6, 7, 8]], device="cuda"), **with_cache(cache),
                          use_cache=True, position_ids=torch.arange(4, device="cuda").view(1, 1, 4).expand(3, 1, 4))
            for step in range(3):  # the first steps compile (and autotune) the decode kernels; the last runs warm
                pos = torch.full((3, 1, 1), 4 + step, dtype=torch.long, device="cuda")
                token = torch.full((1, 1), 9, dtype=torch.long, device="cuda")
                torch.cuda.synchronize()
                if step == 2:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    thinker.model(input_ids=token, position_ids=pos, **with_cache(cache), use_cache=True)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    finally:
        omni_fast.unpatch(thinker)
