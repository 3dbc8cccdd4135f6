"""The issue-16 fast paths reached through the registry (``omni_fast.fast_paths``), not by constructing classes:
``fused_step`` (MoeTextDecoder(fused=True) for the thinker and the talker decode steps) and ``persistent_mtp``
(CodePredictor(persistent=True)) in the Qwen3-Omni pipeline and in ``omni_fast.patch``; decoders the fused step
cannot run (Qwen2.5-Omni's dense talker) keep the ops path and the patch report says so.

CPU: the tiny random models, the kernels on the Triton interpreter (the vocoder on the reference backend: its kernels
take minutes on the interpreter at 1920x upsampling, and it sees the same codes either way)."""

import pytest
import torch

pytest.importorskip("transformers")

import omni_fast  # noqa: E402
from omni_fast import fast_paths  # noqa: E402
from omni_fast.models import Code2Wav  # noqa: E402
from omni_fast.models.qwen3_omni import Qwen3Omni, Request  # noqa: E402
from omni_fast.pipeline.qwen3 import Qwen3Stages  # noqa: E402

RUN = dict(max_new_tokens=3, talker_max_new_tokens=3, first_chunk=300, chunk=300, graph_decode=True)


@pytest.fixture(scope="module")
def base():
    return Qwen3Omni.random("tiny", patch=False)


def _reference_vocoder(monkeypatch):
    real = Code2Wav.from_transformers.__func__
    monkeypatch.setattr(Code2Wav, "from_transformers",
                        classmethod(lambda cls, m, **kw: real(cls, m, **{**kw, "backend": "reference"})))


def _run(pipe, monkeypatch):
    """Greedy generate; (text ids, codes [frames, B, Q], waveform)."""
    codes = []
    real = Qwen3Stages.frame

    def spy(self, hidden, c0, sampler):
        out = real(self, hidden, c0, sampler)
        codes.append(out[0].clone())
        return out

    monkeypatch.setattr(Qwen3Stages, "frame", spy)
    pipe._codec_streams = None  # a fresh codec stream: a reused one matches a new one to 1e-4, not bit for bit
    out = pipe.generate(Request(text=[5, 6, 7, 8, 9]), **RUN)[0]
    monkeypatch.setattr(Qwen3Stages, "frame", real)
    return out["token_ids"], torch.stack(codes), out["audio"]


def test_pipeline_fused_step_and_persistent_mtp_equal_the_default_paths(base, monkeypatch, fast_path):
    """Flags on: the thinker and talker decoders take the phase-fused step and the MTP frame is one persistent
    launch; greedy text ids, codes and waveform equal the flags-off run."""
    _reference_vocoder(monkeypatch)
    pipe = Qwen3Omni(base.model, tokenizer=base.tokenizer)  # patched; backend None: triton on the interpreter
    try:
        text0, codes0, wav0 = _run(pipe, monkeypatch)
        cp = pipe.code_predictor.cp
        assert not cp.persistent and not cp._persistent
        assert all(not d.fused for part in ("thinker", "talker") for d, _ in pipe._decoders[part][1])
        fast_path("fused_step")
        fast_path("persistent_mtp")
        text1, codes1, wav1 = _run(pipe, monkeypatch)
        assert pipe.code_predictor.cp is cp and cp.persistent and cp._persistent  # the persistent frame ran
        for part in ("thinker", "talker"):
            (dec, _), = pipe._decoders[part][1]
            assert dec.fused and dec._state.fused is not None and dec.fused_fallback is None, part
    finally:
        omni_fast.unpatch(base.model)
    assert len(text0) > 1 and codes0.shape[0] > 1 and wav0.numel() > 0
    assert text1 == text0
    assert torch.equal(codes1, codes0)
    assert torch.equal(wav1, wav0)


def test_patch_report_and_talker_code_predictor_follow_persistent_mtp(base, fast_path):
    from omni_fast.models.talker_step import _fast_code_predictor

    talker = base.model.talker
    for on in (False, True):
        fast_path("persistent_mtp", on)
        report = omni_fast.patch(base.model, backend="reference")
        try:
            line, = [r for r in report.replaced if r.startswith("[code_predictor] per-frame")]
            assert ("persistent frame: one launch per frame" in line) == on and "persistent_mtp" in line
            assert _fast_code_predictor(talker).persistent is on
        finally:
            omni_fast.unpatch(base.model)


def test_qwen25_dense_talker_keeps_the_ops_path_under_fused_step(fast_path):
    """Qwen2.5-Omni's talker is dense: with fused_step on, patch keeps its decoder on the ops path (no error) and the
    report says why; the decode steps still run on omni-fast (tests/test_patch_qwen25.py checks their outputs)."""
    from omni_fast.integrations import qwen25_talker
    from test_patch_qwen25 import tiny_qwen2_5_omni

    model = tiny_qwen2_5_omni()
    fast_path("fused_step")
    report = omni_fast.patch(model, backend="reference")
    try:
        line, = [r for r in report.replaced if "Qwen2_5OmniTalkerModel" in r]
        assert "fast path fused_step not applicable, ops path kept: layer 0 is dense" in line
        dec = qwen25_talker.fast_decoder(model.talker.model)
        assert not dec.fused and "dense" in dec.fused_fallback
    finally:
        omni_fast.unpatch(model)
    fast_path("fused_step", False)
    report = omni_fast.patch(model, backend="reference")
    omni_fast.unpatch(model)
    line, = [r for r in report.replaced if "Qwen2_5OmniTalkerModel" in r]
    assert "phase-fused step off (opt-in fast path fused_step)" in line
    assert fast_paths.enabled("fused_step") is False


def test_opt_in_decoder_falls_back_where_the_fused_step_cannot_run(fast_path, monkeypatch):
    """fused_step on: a supported decoder is fused; the ambient reference backend, and a CPU without the Triton
    interpreter ("auto" resolves to the reference ops there), keep the ops path; a dense decoder is not fused and
    says why. Same for the persistent MTP frame (op path on a CPU without the interpreter)."""
    from omni_fast.models import text_decoder
    from omni_fast.models.text_decoder import opt_in_decoder
    from test_text_decoder import _left_padded, _model, _prefill, _text_positions

    m, head = _model("thinker", seed=5)
    mask = _left_padded([3, 2], 3)
    pos3 = _text_positions(mask)
    fast_path("fused_step")

    def state(**kw):
        dec = opt_in_decoder(m, head)
        dec.load_prefill(_prefill(m, mask, pos3), mask, max_new_tokens=2, **kw)
        return dec

    assert state()._state.fused is not None
    with omni_fast.use_backend("reference"):
        assert state()._state.fused is None
    monkeypatch.setattr(text_decoder, "triton_interpreter_enabled", lambda: False)
    dec = state()
    assert dec.fused and dec._state.fused is None
    dense, dhead = _model("thinker", seed=5, mlp_only_layers=[0])
    dec = opt_in_decoder(dense, dhead)
    assert not dec.fused and "layer 0 is dense" in dec.fused_fallback
    fast_path("fused_step", False)
    dec = opt_in_decoder(m, head)
    assert not dec.fused and dec.fused_fallback is None


def test_persistent_frame_needs_triton_to_run(monkeypatch):
    """persistent on a CPU tensor: the op path under the ambient reference backend and without the interpreter."""
    from omni_fast.models import code_predictor as cpm
    from test_persistent import _models

    _, cp = _models(device="cpu")
    ran = []
    monkeypatch.setattr(cpm.CodePredictor, "_persistent_frame", lambda self, *a: ran.append(1) or 1 / 0)
    h, c0 = torch.randn(2, cp.config.hidden_size), torch.zeros(2, dtype=torch.long)
    with omni_fast.use_backend("reference"):
        cp.predict_frame(h, c0, use_graph=False)
        monkeypatch.setattr(cpm, "triton_interpreter_enabled", lambda: False)
        cp.predict_frame(h, c0, use_graph=False, backend="triton")  # (the ops themselves still interpret)
    assert not ran
    monkeypatch.setattr(cpm, "triton_interpreter_enabled", lambda: True)
    with pytest.raises(ZeroDivisionError):  # and with it, the persistent frame
        cp.predict_frame(h, c0, use_graph=False, backend="triton")
    assert ran


def test_an_own_persistent_setting_wins_over_the_fast_path(base, fast_path):
    """The pipeline re-reads persistent_mtp before each stream (``_refresh_fast_stages``): a code predictor whose
    ``persistent`` was set by hand keeps it whichever way the switch goes; ``None`` hands it back to the switch."""
    pipe = Qwen3Omni(base.model, tokenizer=base.tokenizer)
    try:
        cp = pipe.code_predictor.cp
        for own in (True, False):
            cp.persistent = own
            for on in (False, True):
                fast_path("persistent_mtp", on)
                pipe._refresh_fast_stages()
                assert pipe.code_predictor.cp is cp and cp.persistent is own, (own, on)
        cp.persistent = None
        for on in (False, True):
            fast_path("persistent_mtp", on)
            pipe._refresh_fast_stages()
            assert cp.persistent is on
        # constructor argument: the object's own choice too
        from omni_fast.models import CodePredictor

        talker = base.model.talker
        own = CodePredictor.from_transformers(talker.code_predictor, talker.get_input_embeddings(), persistent=False)
        assert own.follow_fast_path().persistent is False
    finally:
        omni_fast.unpatch(base.model)
