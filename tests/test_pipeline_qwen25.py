"""The Qwen2.5-Omni streaming pipeline (:class:`omni_fast.models.Qwen25Omni`: the shared scheduler over
:class:`omni_fast.pipeline.qwen25.Qwen25Stages`) against transformers' ``Qwen2_5OmniForConditionalGeneration
.generate`` on the tiny random model (greedy): the same text ids, talker codes and waveform; and its bad-input
errors."""

import pytest
import torch

pytest.importorskip("transformers")

from omni_fast.__main__ import synthetic_speech  # noqa: E402
from omni_fast.models import Qwen25Omni, Request  # noqa: E402
from omni_fast.pipeline import qwen25  # noqa: E402
from omni_fast.pipeline.requests import mel_features  # noqa: E402


def _transformers_generate(pipe, req, max_new_tokens, talker_max_new_tokens):
    """transformers' generate on the pipeline's own prompt: (text ids, codes, waveform); seed 7 for the DiT."""
    model, st = pipe.model, pipe.stages()
    prompt = st.prepare([req])
    feats, fmask = mel_features([req.audio])
    codes = []
    real = model.talker.generate
    model.talker.generate = lambda *a, **k: codes.append(real(*a, **k)) or codes[-1]
    model.speaker_map = pipe.speakers
    try:
        torch.manual_seed(7)
        text, wav = model.generate(
            input_ids=prompt.ids, attention_mask=prompt.mask, input_features=feats, feature_attention_mask=fmask,
            thinker_max_new_tokens=max_new_tokens, thinker_do_sample=False, thinker_eos_token_id=st.text_eos,
            talker_do_sample=False, talker_max_new_tokens=talker_max_new_tokens, talker_repetition_penalty=1.0,
            speaker="Chelsie")
    finally:
        del model.talker.generate
    S = prompt.ids.shape[1]
    return text[0, S:].tolist(), codes[0][0, S + 2:].tolist(), wav


@pytest.mark.parametrize("patched", [False, True])
def test_stream_matches_transformers_generate(patched, monkeypatch):
    """Unpatched, and patched (Triton on the interpreter; thinker decode on omni-fast's decoder, talker decode
    through the patch): the same text, codes and waveform (bit for bit: same codes and DiT noise)."""
    pipe = Qwen25Omni.random(patch=False)
    req = Request(text=[5, 6, 7], audio=synthetic_speech(0.5))
    want_text, want_codes, want_wav = _transformers_generate(pipe, req, 5, 10)
    seen = []
    real_step = qwen25.Token2WavCodec.step
    monkeypatch.setattr(qwen25.Token2WavCodec, "step",
                        lambda self, codes, n: seen.append((codes.clone(), n)) or real_step(self, codes, n))
    if patched:
        pipe = Qwen25Omni(pipe.model, backend="triton", speakers=pipe.speakers, tokenizer=pipe.tokenizer)
    try:
        torch.manual_seed(7)
        out = pipe.generate(req, max_new_tokens=5, talker_max_new_tokens=10, speaker="chelsie",
                            graph_decode=patched)[0]
    finally:
        pipe.set_patched(False)
    assert out["token_ids"] == want_text
    codes, n = seen[0]
    assert codes[0, 0, :n[0]].tolist() == [c for c in want_codes if c not in (291, 292)][:n[0]] == want_codes[:n[0]]
    assert torch.equal(out["audio"], want_wav)


def test_bad_input():
    pipe = Qwen25Omni.random(patch=False)
    req = Request(text=[5, 6])
    with pytest.raises(ValueError, match="speaker: unknown speaker 'nobody'"):
        list(pipe.stream(req, speaker="nobody"))
    with pytest.raises(ValueError, match=r"requests\[0\]\.image"):
        list(pipe.stream(Request(text=[5], image=torch.rand(3, 28, 28))))
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
