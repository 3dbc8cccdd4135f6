"""Issue 17 on the model-level entry points: predict_frame / TalkerStep arguments named (parts 5, 6), seeds outside
int64 (4), NaN in Code2Wav never reaching a WAV file (7)."""

import os

import numpy as np
import pytest
import torch

from omni_fast.models import CodePredictor, TalkerStep

CFG = dict(vocab_size=24, hidden_size=48, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
           num_key_value_heads=2, head_dim=24, num_code_groups=4)


@pytest.fixture(scope="module")
def cp():
    torch.manual_seed(0)
    m = CodePredictor(CFG, codec_vocab_size=30)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _frame(cp, **kw):
    args = dict(talker_hidden=torch.randn(2, 48), c0=torch.tensor([1, 2]), do_sample=False, backend="reference",
                use_graph=False)
    args.update(kw)
    return cp.predict_frame(args.pop("talker_hidden"), args.pop("c0"), **args)


@pytest.mark.parametrize("kw, exc, name", [
    (dict(c0=[1, 2]), TypeError, "c0 must be a torch.Tensor"),
    (dict(c0=torch.tensor([True, False])), TypeError, "c0 must be an integer tensor"),
    (dict(c0=torch.tensor([1.0, 2.0])), TypeError, "c0 must be an integer tensor"),
    (dict(talker_hidden=torch.ones(2, 48, dtype=torch.int64)), TypeError, "talker_hidden must have dtype"),
    (dict(talker_hidden=np.zeros((2, 48))), TypeError, "talker_hidden must be a torch.Tensor"),
    (dict(top_p="x"), TypeError, "top_p must be a float"),
    (dict(top_p=float("nan")), ValueError, "top_p must be a finite"),
    (dict(temperature=0.0), ValueError, "temperature must be"),
    (dict(top_k=2.5), TypeError, "top_k must be an int"),
    (dict(do_sample="yes"), TypeError, "do_sample must be a bool"),
    (dict(seed=2**64), ValueError, "seed must fit int64"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed=torch.tensor([1.0])), TypeError, "seed must be an int or an integer tensor"),
    (dict(c0_embed=torch.randn(3, 48)), ValueError, "c0_embed must have shape"),
])
def test_predict_frame_bad_arguments_named(cp, kw, exc, name):
    with pytest.raises(exc, match=name):
        _frame(cp, **kw)


def test_predict_frame_numpy_and_tensor_seeds_agree(cp):
    kw = dict(do_sample=True, top_k=5)
    h = torch.randn(2, 48)
    a, _ = _frame(cp, talker_hidden=h, seed=np.int64(11), **kw)
    b, _ = _frame(cp, talker_hidden=h, seed=11, top_k=np.int64(5), do_sample=True)
    c, _ = _frame(cp, talker_hidden=h, seed=torch.tensor(11), top_k=torch.tensor(5), do_sample=True)
    assert torch.equal(a, b) and torch.equal(a, c)


def _step(cp, B=2):
    return TalkerStep(cp, torch.randn(B, 3, 48), torch.randn(1, 1, 48))


@pytest.mark.parametrize("call, exc, name", [
    (lambda s: s(torch.randn(3, 48), torch.tensor([1, 2, 3]), 0), ValueError, "talker_hidden must have shape"),
    (lambda s: s(torch.randn(2, 40), torch.tensor([1, 2]), 0), ValueError, "talker_hidden must have shape"),
    (lambda s: s(torch.randn(2, 48), torch.tensor([1, 2]), 1.0), TypeError, "generation_step must be an int"),
    (lambda s: s(torch.randn(2, 48), torch.tensor([1, 2]), -1), ValueError, "generation_step must be >= 0"),
    (lambda s: s.text_term(-1), ValueError, "generation_step must be >= 0"),
    (lambda s: s.next_input(torch.randn(2, 47), 0), ValueError, "codec_sum must have shape"),
    (lambda s: s(5, torch.tensor([1, 2]), 0), TypeError, "talker_hidden must be a torch.Tensor"),
])
def test_talker_step_bad_arguments_named(cp, call, exc, name):
    with pytest.raises(exc, match=name):
        call(_step(cp))


def test_talker_step_constructor_checks(cp):
    with pytest.raises(ValueError, match="tts_pad_embed must be"):
        TalkerStep(cp, torch.randn(2, 3, 48), torch.randn(1, 1, 40))
    with pytest.raises(TypeError, match="trailing_text_hidden must be a torch.Tensor"):
        TalkerStep(cp, 3, torch.randn(1, 1, 48))


def test_talker_step_accepts_numpy_generation_step(cp):
    s = _step(cp)
    torch.testing.assert_close(s.text_term(np.int64(1)), s.text_term(1))


# --- 7. NaN in Code2Wav ------------------------------------------------------------------------------------------


def test_write_wav_refuses_nan_and_writes_nothing(tmp_path):
    from omni_fast.__main__ import write_wav

    path = tmp_path / "out.wav"
    with pytest.raises(ValueError, match="non-finite"):
        write_wav(str(path), torch.tensor([0.0, float("nan"), 0.5]))
    assert not os.path.exists(path)
    write_wav(str(path), torch.tensor([0.0, 0.5]))
    assert os.path.getsize(path) > 0


def test_code2wav_check_finite_option():
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    from omni_fast.models import Code2Wav
    from omni_fast.models.presets import tiny_qwen3_omni_config

    module = q3.Qwen3OmniMoeCode2Wav(tiny_qwen3_omni_config().code2wav_config).eval()
    with torch.no_grad():
        next(p for n, p in module.named_parameters() if n.endswith("conv.weight")).view(-1)[0] = float("nan")
    Code2Wav.from_transformers(module)  # off by default: a load-time choice
    with pytest.raises(ValueError, match="non-finite"):
        Code2Wav.from_transformers(module, check_finite=True)


def test_pipelines_refuse_a_model_they_cannot_run():
    """Qwen3Omni / Qwen25Omni take the whole transformers model of their family: a part (the thinker), the other
    family's model or a path string was an AttributeError deep in the constructor, or (Qwen2.5-Omni's model in
    Qwen3Omni) accepted silently. A TypeError naming model and what to pass instead."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    from omni_fast.models import Qwen25Omni, Qwen3Omni
    from omni_fast.models.presets import tiny_qwen3_omni_config

    omni3 = q3.Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_omni_config())
    omni25 = Qwen25Omni.random(patch=False).model
    for pipeline, bad, hint in ((Qwen3Omni, omni3.thinker, "Qwen3OmniMoeForConditionalGeneration"),
                                (Qwen3Omni, omni25, "Qwen25Omni"), (Qwen3Omni, "/some/checkpoint", "from_pretrained"),
                                (Qwen25Omni, omni3, "Qwen3Omni"), (Qwen25Omni, omni25.thinker,
                                                                   "Qwen2_5OmniForConditionalGeneration")):
        with pytest.raises(TypeError, match=f"model must be .*{hint}"):
            pipeline(bad, patch=False)


def test_pipeline_takes_a_compiled_model_as_its_original():
    """A ``torch.compile`` wrapper of the whole model was refused (its class is OptimizedModule); the pipeline drives
    the parts itself, so it takes the original module (compiling nothing)."""
    from omni_fast.models import Qwen25Omni

    tiny = Qwen25Omni.random(patch=False)
    model = tiny.model
    pipe = Qwen25Omni(torch.compile(model), patch=False, speakers=tiny.speakers)
    assert pipe.model is model
    with pytest.raises(TypeError, match="model must be"):
        Qwen25Omni(torch.compile(model.thinker), patch=False)
