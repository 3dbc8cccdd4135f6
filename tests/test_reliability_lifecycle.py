"""patch / unpatch lifecycle (issue 17, part 3): no half-patched part, patched models pickle, thread safety."""

import io
import threading

import pytest
import torch

import omni_fast
from omni_fast.testing import seeded_weights_


@pytest.fixture(scope="module")
def model():
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    from omni_fast.models.presets import tiny_qwen3_omni_config

    torch.manual_seed(0)
    return seeded_weights_(q3.Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_omni_config())).eval()


def _state(model):
    """Everything patch touches: instance attributes named like omni-fast's or swapped methods, and the
    implementation names of every config."""
    attrs = sorted((n, a) for n, m in model.named_modules() for a in m.__dict__
                   if a.startswith("_omni_fast") or a in ("forward", "get_rope_index", "prepare_inputs_for_generation"))
    configs = sorted({(n, str(getattr(m.config, "_attn_implementation", None)),
                       str(getattr(m.config, "_experts_implementation", None)))
                      for n, m in model.named_modules() if hasattr(m, "config")})
    return attrs, configs


def _thinker_logits(model):
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    with torch.no_grad():
        return model.thinker(input_ids=ids, use_cache=True).logits


def test_part_of_a_patched_model_is_refused_not_half_patched(model):
    clean = _state(model)
    omni_fast.patch(model, backend="reference")
    try:
        patched = _state(model)
        with pytest.raises(ValueError, match="part of a model patched as a whole"):
            omni_fast.patch(model.thinker)
        with pytest.raises(ValueError, match="part of a model patched as a whole"):
            omni_fast.unpatch(model.thinker)
        assert _state(model) == patched  # the refused calls changed nothing
    finally:
        omni_fast.unpatch(model)
    assert _state(model) == clean
    audio = next(m for n, m in model.named_modules() if n.endswith("audio_tower"))
    assert audio.config._attn_implementation != "omni_fast"


def test_part_then_whole_then_unpatch_restores_everything(model):
    clean = _state(model)
    omni_fast.patch(model.thinker, backend="reference")
    omni_fast.patch(model, backend="reference")  # unpatches the part first
    omni_fast.unpatch(model)
    assert _state(model) == clean


def test_unselected_part_can_be_patched_alone(model):
    clean = _state(model)
    omni_fast.patch(model, parts=("thinker",), backend="reference")
    omni_fast.patch(model.code2wav, backend="reference")  # not selected above: its own patch
    omni_fast.unpatch(model.code2wav)
    omni_fast.unpatch(model)
    assert _state(model) == clean


def test_patched_model_pickles_and_loads_back_patched(model):
    want = _thinker_logits(model)
    omni_fast.patch(model, backend="reference")
    try:
        buf = io.BytesIO()
        torch.save(model, buf)
    finally:
        omni_fast.unpatch(model)
    buf.seek(0)
    twin = torch.load(buf, weights_only=False)
    assert twin.__dict__.get("_omni_fast_patched")
    text = twin.thinker.model  # (transformers >= 5.2x nests the text model as .language_model; 5.17 does not)
    attn = getattr(text, "language_model", text).layers[0].self_attn
    assert attn.forward.__self__ is attn  # re-bound to the loaded module, not the saved one
    torch.testing.assert_close(_thinker_logits(twin), want, rtol=1e-4, atol=1e-5)
    clean = _state(model)
    omni_fast.unpatch(twin)
    assert _state(twin) == clean
    torch.testing.assert_close(_thinker_logits(twin), want, rtol=1e-4, atol=1e-5)


def test_concurrent_patch_unpatch_is_safe(model):
    clean = _state(model)
    errors = []

    def worker():
        try:
            for _ in range(5):
                omni_fast.patch(model, backend="reference")
                omni_fast.unpatch(model)
        except Exception as e:  # noqa: BLE001 - any error fails the test below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _state(model) == clean


@pytest.mark.parametrize("bad", [object(), None, "model", torch.zeros(2)])
def test_patch_rejects_non_modules_naming_model(bad):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        omni_fast.patch(bad)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        omni_fast.unpatch(bad)


def test_patch_rejects_bad_parts(model):
    with pytest.raises(TypeError, match="parts must be"):
        omni_fast.patch(model, parts="thinker")
    with pytest.raises(ValueError, match="parts must be a subset"):
        omni_fast.patch(model, parts=("thinker", "nope"))
    # 'token2wav' is Qwen2.5-Omni's name: for Qwen3-Omni the error names the valid parts and its waveform part
    with pytest.raises(ValueError, match=r"parts must be a subset of \('thinker'.*'code2wav'.*Qwen3-Omni's waveform"):
        omni_fast.patch(model, parts=("token2wav",))


@pytest.mark.parametrize("parts", [[None, "thinker"], [1, "bogus"], [["thinker"]], ("thinker", b"talker")])
def test_patch_rejects_parts_that_are_not_names(model, parts):
    """Each entry of parts must be a part name (str): not a crash sorting / hashing mixed entries."""
    with pytest.raises(TypeError, match=r"parts must be an iterable of names .* got entry"):
        omni_fast.patch(model, parts=parts)
    assert not model.__dict__.get("_omni_fast_patched", False)
