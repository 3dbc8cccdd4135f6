"""Qwen3-Omni's thinker and talker decode through ``omni_fast.patch``: transformers' ``generate`` hands the text
models' prefill KV to :class:`omni_fast.models.MoeTextDecoder` and runs every later step on it
(:mod:`omni_fast.integrations.decode_takeover`), on by default; the phase-fused step with the opt-in ``fused_step``
fast path. Tiny random model (fp32), kernels on the CPU's Triton interpreter."""

import pytest
import torch

import omni_fast

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402

from omni_fast.integrations import decode_takeover  # noqa: E402
from omni_fast.integrations.hf_compat import output_cache, with_cache  # noqa: E402
from omni_fast.models import MoeTextDecoder  # noqa: E402
from omni_fast.models.presets import TINY_IDS, tiny_qwen3_omni_config  # noqa: E402
from omni_fast.testing import run_unpatched_then_patched, seeded_weights_  # noqa: E402

PARTS = ("thinker", "talker", "code_predictor")  # Code2Wav unpatched: same codes give transformers' waveform exactly


@pytest.fixture(scope="module")
def omni():
    torch.manual_seed(0)
    # 3 layers: the thinker's accept_hidden_layer (2) is a middle layer, and layer 1's output is not kept
    return seeded_weights_(q3.Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_omni_config(layers=3)))


@pytest.fixture
def decoders(monkeypatch):
    """The decoders whose ``step`` ran (one entry per decode step on omni-fast)."""
    ran = []
    real = MoeTextDecoder.step
    monkeypatch.setattr(MoeTextDecoder, "step", lambda self, *a: ran.append(self) or real(self, *a))
    return ran


def _generate(model, device="cpu"):
    """Greedy thinker -> talker -> MTP -> Code2Wav on a batch of 2: (text ids, talker codes, both waveforms)."""
    i = TINY_IDS
    ids = torch.tensor([[i["im_start_token_id"], i["user_token_id"], 5 + b, 6, 7, 8 + b, i["im_end_token_id"],
                         i["im_start_token_id"], i["assistant_token_id"]] for b in range(2)], device=device)
    codes = []
    real = model.code2wav.chunked_decode
    model.code2wav.chunked_decode = lambda c, *a, **k: codes.append(c.clone()) or real(c, *a, **k)
    try:
        text, wav = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), thinker_max_new_tokens=4,
                                   thinker_eos_token_id=i["im_end_token_id"],
                                   thinker_do_sample=False, talker_max_new_tokens=5, talker_do_sample=False,
                                   talker_repetition_penalty=1.0)
    finally:
        del model.code2wav.chunked_decode
    return text, codes[0], torch.cat([w.flatten() for w in wav])  # a batch gives one waveform per row


def _thinker_text(omni):
    """The thinker's text model (transformers >= 5.2x nests it as ``language_model``; 5.17 has it as ``model``)."""
    return getattr(omni.thinker.model, "language_model", omni.thinker.model)


def test_generate_fused_on_and_off_equal_unpatched(omni, decoders, fast_path):
    """Greedy generate (return_audio): the thinker's and the talker's decode steps on their decoders, ops path
    (default) and phase-fused step (fused_step), give transformers' text ids, talker codes and waveform bit for bit
    (the thinker's steps hand the talker hidden states 0 and accept_hidden_layer)."""
    text0, codes0, wav0 = _generate(omni)
    assert not decoders and codes0.shape[-1] > 2
    results, lines = [], []
    for fused in (False, True):
        fast_path("fused_step", fused)
        report = omni_fast.patch(omni, parts=PARTS)
        try:
            results.append(_generate(omni))
            talker = decode_takeover.fast_decoder(omni.talker.model)
            thinker = decode_takeover.fast_decoder(_thinker_text(omni))
        finally:
            omni_fast.unpatch(omni)
        assert set(map(id, decoders)) == {id(talker), id(thinker)}, fused  # every decode step ran on a decoder
        assert decoders.count(thinker) == 3 and decoders.count(talker) > 2  # 4 text tokens; 5 codec frames at most
        for dec in (talker, thinker):
            assert dec.fused is fused and (dec._state.fused is not None) is fused and dec.fused_fallback is None
        accept = omni.config.talker_config.accept_hidden_layer
        assert thinker.record_layers == {accept} == {2} and not talker.record_layers
        decoders.clear()
        lines.append([r for r in report.replaced if "Qwen3OmniMoeTalkerModel" in r or "ThinkerTextModel" in r])
    for text, codes, wav in results:
        assert torch.equal(text, text0) and torch.equal(codes, codes0) and torch.equal(wav, wav0)
    (off_thinker, off), (on_thinker, on) = sorted(lines[0], reverse=True), sorted(lines[1], reverse=True)
    assert off.startswith("[talker] Qwen3OmniMoeTalkerModel: decode steps after transformers' prefill -> "
                          "omni_fast.models.MoeTextDecoder") and "phase-fused step off (opt-in fast path" in off
    assert off_thinker.startswith("[thinker] Qwen3OmniMoeThinkerTextModel: decode steps")
    assert "hidden states 0, 2, 3 per step" in off_thinker
    assert "phase-fused step (fast path fused_step): 3 launches per layer" in on and on_thinker
    # unpatch restores transformers' forward and drops the cached decoder
    talker = omni.talker.model
    assert "forward" not in talker.__dict__ and not any(k.startswith("_omni_fast") for k in talker.__dict__)
    assert torch.equal(_generate(omni)[1], codes0) and not decoders


def _run_text_model(talker, prompt, steps, mask, **kw):
    """The talker text model called as the talker's generate calls it: prefill on an empty DynamicCache, then one
    token a step with the cache it returned and 4-row positions; returns (last hidden per call, outputs)."""
    with torch.no_grad():
        out = talker(inputs_embeds=prompt, attention_mask=mask, **with_cache(DynamicCache(), use_cache=True), **kw)
        outs, cache, m = [out], output_cache(out), mask
        for x in steps:
            m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
            pos = (m.cumsum(1)[:, -1:] - 1).expand(4, 2, 1)
            out = talker(inputs_embeds=x, attention_mask=m, position_ids=pos, **with_cache(cache, use_cache=True),
                         **kw)
            outs.append(out)
            cache = output_cache(out)
    return torch.stack([o.last_hidden_state[:, -1] for o in outs]), outs


def _inputs():
    g = torch.Generator().manual_seed(11)
    return (torch.randn(2, 6, 32, generator=g), torch.randn(3, 2, 1, 32, generator=g),
            torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))


def test_decode_steps_answer_the_last_hidden_state(omni, decoders):
    """Left-padded batch of 2, output_hidden_states=True as generate asks: the decode steps' hidden states match
    transformers' (fp32; the kernels sum in another order), ``hidden_states[-1]`` is the last hidden state (what the
    talker reads), entry 0 the step's input and the layer outputs in between None (not kept for the talker)."""
    talker = omni.talker.model
    prompt, steps, mask = _inputs()
    (want, outs0), (got, outs1), _ = run_unpatched_then_patched(
        omni, lambda: _run_text_model(talker, prompt, steps, mask, output_hidden_states=True), parts=("talker",))
    assert len(decoders) == len(steps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    last = outs1[-1]
    assert isinstance(output_cache(last), decode_takeover.FastTalkerCache)
    assert output_cache(last).get_seq_length() == 6 + len(steps)
    hs = last.hidden_states
    assert len(hs) == len(outs0[-1].hidden_states) == len(talker.layers) + 1
    assert hs[-1] is last.last_hidden_state and torch.equal(hs[0], steps[-1]) and all(h is None for h in hs[1:-1])


@pytest.mark.parametrize("case", ["no_cache", "attentions", "middle_hidden_state", "autograd", "several_devices"])
def test_fallbacks_run_transformers_forward(omni, decoders, case, monkeypatch):
    """Calls the decoder does not serve run transformers' forward (its own cache, its outputs). "several_devices":
    a text model whose weights device_map split over two GPUs (seen as two devices here): the decoder runs on one
    device, so transformers decodes (before, the takeover built a decoder whose layers' weights sat on cuda:0 and
    cuda:1 and its first step failed on mixed devices)."""
    if case == "several_devices":
        monkeypatch.setattr(decode_takeover, "devices_of", lambda *m: [torch.device("cpu"), torch.device("cuda:1")])
    talker = omni.talker.model
    prompt, steps, mask = _inputs()
    kw = {"attentions": dict(output_attentions=True), "middle_hidden_state": dict(output_hidden_states=[1])}.get(
        case, {})

    def run():
        if case == "no_cache":
            with torch.no_grad():
                return talker(inputs_embeds=prompt, attention_mask=mask).last_hidden_state, None
        if case == "autograd":
            x = prompt.clone().requires_grad_()
            out = talker(inputs_embeds=x, attention_mask=mask, **with_cache(DynamicCache(), use_cache=True))
            w = mask[..., None].to(x.dtype)  # the padded rows are meaningless (and masked by any loss)
            (grad,) = torch.autograd.grad((out.last_hidden_state.square() * w).sum(), x)  # through the attention
            return torch.cat([out.last_hidden_state.detach() * w, grad]), output_cache(out)
        hidden, outs = _run_text_model(talker, prompt, steps, mask, **kw)
        return hidden, output_cache(outs[-1])

    (want, _), (got, cache), _ = run_unpatched_then_patched(omni, run, parts=("talker",))
    assert not decoders and not isinstance(cache, decode_takeover.FastTalkerCache)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the patched RoPE / experts kernels


def test_thinker_generate_hidden_states(omni, decoders):
    """The thinker's own generate asking for hidden states: patched as part of the whole model, the decode steps
    answer entries 0, accept_hidden_layer and N (others None); patched alone, every entry. Same ids as transformers,
    hidden states within fp32 rounding."""
    thinker = omni.thinker
    ids = torch.tensor([[TINY_IDS["im_start_token_id"], TINY_IDS["user_token_id"], 5, 6, 7, 8]])

    def run():
        with torch.no_grad():
            out = thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                   do_sample=False, output_hidden_states=True, return_dict_in_generate=True)
        return out.sequences, out.hidden_states

    (seq0, hs0), (seq1, hs1), _ = run_unpatched_then_patched(omni, run, parts=("thinker",))
    accept, n = omni.config.talker_config.accept_hidden_layer, 3
    assert torch.equal(seq1, seq0) and len(decoders) == 2 and len(hs1) == 3
    for step0, step1 in zip(hs0[1:], hs1[1:]):  # the decode steps (entry 0 of hs is the prefill's)
        for i, (a, b) in enumerate(zip(step0, step1)):
            if i in (0, accept % (n + 1), n):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            else:
                assert b is None
    decoders.clear()
    (_, hs0), (seq1, hs1), _ = run_unpatched_then_patched(thinker, run)
    assert torch.equal(seq1, seq0) and len(decoders) == 2
    for step0, step1 in zip(hs0[1:], hs1[1:]):
        torch.testing.assert_close(torch.stack(step1), torch.stack(step0), rtol=1e-5, atol=1e-5)


def test_thinker_beam_search_and_crop(omni, decoders):
    """Beam search reorders the taken-over cache (``reorder_cache`` -> ``MoeTextDecoder.reorder_rows``): the same
    sequences as transformers; ``crop`` rewinds it as DynamicCache.crop does."""
    ids = torch.tensor([[TINY_IDS["im_start_token_id"], TINY_IDS["user_token_id"], 5, 6, 7, 8]])

    def run():
        with torch.no_grad():
            return omni.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                         do_sample=False, num_beams=3, num_return_sequences=3)

    want, got, _ = run_unpatched_then_patched(omni, run, parts=("thinker",))
    assert torch.equal(got, want) and len(decoders) >= 3
    cache = decode_takeover.FastTalkerCache(decoders[-1], 9)
    before = decoders[-1].cache_seqlens.clone()
    cache.crop(-2)
    assert cache.get_seq_length() == 7 and torch.equal(decoders[-1].cache_seqlens, (before - 2).clamp(min=0))
    cache.crop(9)  # longer than held: nothing
    assert cache.get_seq_length() == 7
    cache.crop(0)  # transformers >= 5.24: remove 0 tokens (assisted decoding accepted every candidate)
    assert cache.get_seq_length() == 7
    decoders.clear()


def test_decoder_refuses_weights_on_several_devices(omni):
    """MoeTextDecoder keeps one static KV cache and captures one graph per step: a text model split over devices
    (one layer moved to the meta device here, as device_map moves layers to cuda:1) is refused by name."""
    import copy

    text = copy.deepcopy(omni.talker.model)
    text.layers[1].to("meta")
    with pytest.raises(ValueError, match=r"several devices \(cpu, meta"):
        MoeTextDecoder.from_transformers(text, omni.talker.codec_head)


@pytest.mark.gpu
def test_gpu_thinker_and_talker_graph_decode(omni):
    """On CUDA (fp32) the thinker's and talker's decode steps are CUDA-graph replays of their decoders: the same
    greedy text and codes as transformers on the same GPU, the same waveform (Code2Wav unpatched)."""
    import copy

    m = copy.deepcopy(omni).cuda()
    want = _generate(m, "cuda")
    omni_fast.patch(m, parts=PARTS)
    try:
        got = _generate(m, "cuda")
        for text_model in (_thinker_text(m), m.talker.model):
            st = decode_takeover.fast_decoder(text_model)._state
            assert st is not None and st.graph is not None  # captured, replayed per step
    finally:
        omni_fast.unpatch(m)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=0)

