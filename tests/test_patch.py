"""``omni_fast.patch``: patched transformers Qwen-Omni models generate what the unpatched ones do (tiny, fp32).

Every model is transformers' own module built from a tiny config (``omni_fast.models.presets``; nothing is
downloaded), with random weights large enough that routing and attention are not degenerate. Under the test
conftest the swapped-in ops run on the Triton interpreter (backend "auto" on CPU with TRITON_INTERPRET=1).
"""

import copy
import functools

import pytest
import torch

import omni_fast
from omni_fast import ops
from omni_fast._bound import BoundMethod
from omni_fast.backend import requested_backend
from omni_fast.testing import run_unpatched_then_patched, seeded_weights_

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402

from omni_fast.integrations.hf_compat import cache_keyword  # noqa: E402
from omni_fast.models.presets import (  # noqa: E402
    TINY_CODEC_IDS, TINY_IDS, tiny_qwen2_5_omni_thinker_config, tiny_qwen3_omni_config)


@pytest.fixture(scope="module")
def omni():
    torch.manual_seed(0)
    return seeded_weights_(q3.Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_omni_config()))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the fused ops that run (proves the patched path is taken, not the transformers one)."""
    calls = {"qk_norm_mrope": 0, "mrope": 0, "moe_experts": 0, "moe_backends": set()}
    for name in ("qk_norm_mrope", "mrope", "moe_experts"):
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            if _name == "moe_experts":
                calls["moe_backends"].add(requested_backend(kwargs.get("backend")))  # argument or ambient
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    return calls


def _assert_audio_close(got, want):
    """Audio within tolerance: the random-weight vocoder (SnakeBeta, ~30 convolutions at weight scale 0.2) amplifies
    fp32 rounding differences of the fused RoPE to ~4e-3 at single samples, so the bound is on the relative L2
    error over the signal (measured ~7e-5)."""
    err = (got - want).norm() / want.norm().clamp_min(1e-12)
    print(f"audio relative L2 error {err.item():.2e}, max abs {(got - want).abs().max().item():.2e}")
    assert err < 1e-3, err


def _prompt(batch=1):
    i = TINY_IDS
    rows = [[i["im_start_token_id"], i["user_token_id"], 5 + b, 6, 7, 8 + b, i["im_end_token_id"],
             i["im_start_token_id"], i["assistant_token_id"]] for b in range(batch)]
    return torch.tensor(rows)


def _generate(model, ids):
    """Greedy thinker -> talker -> code predictor -> Code2Wav; returns text ids, talker codes, waveform."""
    codes = []
    real = model.code2wav.chunked_decode

    def record(c, *a, **k):
        codes.append(c.clone())
        return real(c, *a, **k)

    model.code2wav.chunked_decode = record
    try:
        text, wav = model.generate(
            input_ids=ids, thinker_max_new_tokens=6, thinker_eos_token_id=TINY_IDS["im_end_token_id"],
            thinker_do_sample=False, talker_max_new_tokens=6, talker_do_sample=False,
            talker_repetition_penalty=1.0)
    finally:
        del model.code2wav.chunked_decode
    return text, codes[0], wav


def test_full_model_generate_parity_patch_unpatch(omni, kernel_calls):
    ids = _prompt()
    text0, codes0, wav0 = _generate(omni, ids)
    assert kernel_calls["qk_norm_mrope"] + kernel_calls["mrope"] + kernel_calls["moe_experts"] == 0
    assert codes0.shape[1] == omni.config.talker_config.num_code_groups and wav0.numel() > 0

    # The vocoder's Triton kernels take minutes under the interpreter at 1920x upsampling: the whole-model run
    # swaps it on the reference backend (test_code2wav_ops.py proves its kernels, test_code2wav_alone_parity the swap).
    report = omni_fast.patch(omni, parts=("thinker", "talker", "code_predictor", "audio", "vision"))
    report_c2w = omni_fast.patch(omni.code2wav, backend="reference")
    try:
        text1, codes1, wav1 = _generate(omni, ids)
    finally:
        omni_fast.unpatch(omni.code2wav)
        omni_fast.unpatch(omni)
    report.replaced += report_c2w.replaced
    assert kernel_calls["qk_norm_mrope"] > 0 and kernel_calls["moe_experts"] > 0
    torch.testing.assert_close(text1, text0, rtol=0, atol=0)
    torch.testing.assert_close(codes1, codes0, rtol=0, atol=0)
    _assert_audio_close(wav1, wav0)

    replaced = "\n".join(report.replaced)
    for part in ("thinker", "talker", "code_predictor", "code2wav"):
        assert f"[{part}]" in replaced, part
    assert "[thinker] Qwen3OmniMoeThinkerTextExperts" in replaced
    assert "[talker] Qwen3OmniMoeTalkerTextExperts" in replaced
    assert "[code2wav] Qwen3OmniMoeCode2Wav: whole vocoder" in replaced
    assert "[code_predictor] per-frame code_predictor.generate -> omni_fast.models.CodePredictor" in replaced
    assert "[audio]" in replaced and "[vision]" in replaced  # encoder attention -> omni_fast flash attention
    assert "omni-fast patch report" in str(report)

    # unpatch restores the exact transformers outputs
    text2, codes2, wav2 = _generate(omni, ids)
    assert torch.equal(text2, text0) and torch.equal(codes2, codes0) and torch.equal(wav2, wav0)
    assert not any("_omni_fast_forward" in m.__dict__ for m in omni.modules())


def test_patch_is_idempotent_and_unpatch_restores_config(omni):
    before = (omni.config.thinker_config.text_config._experts_implementation,
              omni.config.thinker_config.text_config._attn_implementation)
    first = omni_fast.patch(omni)
    second = omni_fast.patch(omni)
    try:
        assert first.replaced == second.replaced and first.left == second.left
        wrapped = 0
        for module in omni.modules():
            inner = module.__dict__.get("_omni_fast_forward")
            if inner is not None:  # wrapped once: the saved forward is transformers' own, not our wrapper
                assert inner.__func__ is type(module).forward
                wrapped += 1
        assert wrapped > 0
        assert omni.config.thinker_config.text_config._experts_implementation == "omni_fast"
    finally:
        omni_fast.unpatch(omni)
    assert (omni.config.thinker_config.text_config._experts_implementation,
            omni.config.thinker_config.text_config._attn_implementation) == before


def test_parts_limit_the_patch(omni):
    report = omni_fast.patch(omni, parts=["thinker"])
    try:
        assert all(r.startswith("[thinker]") for r in report.replaced)
        assert any(r.startswith("[talker]") and "part not selected" in r for r in report.left)
        assert omni.config.talker_config.text_config._experts_implementation != "omni_fast"
    finally:
        omni_fast.unpatch(omni)


def test_bad_arguments(omni):
    with pytest.raises(ValueError, match="parts"):
        omni_fast.patch(omni, parts=["thinker", "decoder"])
    with pytest.raises(ValueError):
        omni_fast.patch(omni, backend="nope")
    assert not getattr(omni, "_omni_fast_patched", False)


def test_attention_implementation_only_set_when_registered(omni):
    """Until an "omni_fast" AttentionInterface entry exists, attention stays on the model's own implementation."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = omni.config.thinker_config.text_config._attn_implementation
    report = omni_fast.patch(omni)
    try:
        now = omni.config.thinker_config.text_config._attn_implementation
        if "omni_fast" in ALL_ATTENTION_FUNCTIONS:
            assert now == "omni_fast"
        else:
            assert now == before
            assert any("no omni_fast attention implementation" in r for r in report.left)
    finally:
        omni_fast.unpatch(omni)


def test_thinker_alone_generate_parity(omni, kernel_calls):
    thinker = omni.thinker
    ids = _prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the batch

    def run():
        return thinker.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                eos_token_id=None)

    want, got, report = run_unpatched_then_patched(thinker, run, backend="triton")
    assert kernel_calls["qk_norm_mrope"] > 0 and kernel_calls["moe_experts"] > 0
    assert kernel_calls["moe_backends"] == {"triton"}  # patch(backend=...) reaches the experts too
    assert torch.equal(got, want)
    assert all(r.startswith(("[thinker]", "[audio]", "[vision]")) for r in report.replaced + report.left)
    assert not any("_omni_fast_backend" in m.__dict__ for m in thinker.modules())


def test_thinker_continuous_batching_parity(omni, kernel_calls):
    """transformers' continuous batching (``generate_batch``, a ``PagedAttentionCache`` written with per-batch
    indices) on a patched thinker: the attention layers and the text model hand those calls to transformers' own
    forwards (before, the fused attention called ``cache.update(k, v, layer_idx)`` without the indices: a
    TypeError in every forward, each request came back failed with no tokens, on 5.17 and 5.25 alike). 2 tokens: the
    prefill and one decode step, the two forms of the call (each later step is the decode one again; transformers'
    batching loop, unpatched and patched, took ~2 s a token a run here)."""
    from transformers import GenerationConfig

    thinker = omni.thinker
    if not hasattr(thinker, "generate_batch"):
        pytest.skip("this transformers has no continuous batching")
    config = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=0)

    def run():
        out = thinker.generate_batch(inputs=[[5, 6, 7, 8, 9], [10, 11, 12]], generation_config=config,
                                     progress_bar=False)
        return {k: list(v.generated_tokens) for k, v in out.items()}

    want, got, _ = run_unpatched_then_patched(thinker, run, backend="triton")
    assert all(len(tokens) == 2 for tokens in want.values())
    assert got == want
    assert kernel_calls["moe_experts"] > 0  # the experts still run on omni-fast there


def test_generate_under_inference_mode_then_outside_it(omni):
    """A patched generate under torch.inference_mode() (a warm-up, a server) left the decoder's KV cache as inference
    tensors; the next plain generate (no_grad, as transformers runs it) crashed writing them in place ('Inplace update
    to inference tensor outside InferenceMode'). Unpatched, both work: so must patched, with the same tokens."""
    thinker = omni.thinker
    ids = _prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0

    def run(inference: bool):
        with torch.inference_mode(inference):
            return thinker.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                    eos_token_id=None)

    want = run(False)
    omni_fast.patch(thinker)
    try:
        got = [run(True), run(False), run(True)]
    finally:
        omni_fast.unpatch(thinker)
    assert all(torch.equal(g, want) for g in got)


@pytest.mark.skipif(cache_keyword() != "cache",
                    reason="checked on transformers >= 5.24 (crop(-n) rollback); older releases crop differently")
def test_assisted_generate_prompt_lookup(omni):
    """Assisted decoding (prompt_lookup_num_tokens: candidate tokens verified several per forward, rejected ones
    cropped) crashed patched (AttributeError: FastTalkerCache has no is_croppable); unpatched it runs. The decoder
    takes the candidates one step each and rewinds on crop: the same greedy tokens."""
    thinker = omni.thinker
    i = TINY_IDS
    ids = torch.tensor([[i["im_start_token_id"], i["user_token_id"], 5, 6, 5, 6, 5, 6, i["im_end_token_id"],
                         i["im_start_token_id"], i["assistant_token_id"]]])

    def run():
        return thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                eos_token_id=None, prompt_lookup_num_tokens=2)

    want, got, _ = run_unpatched_then_patched(thinker, run)
    assert torch.equal(got, want)
    plain = thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=None)
    assert torch.equal(got, plain)  # greedy assisted decoding is exact


def test_talker_alone_generate_parity(omni, kernel_calls):
    """The talker with its code predictor, fed as the full model feeds it: same codebook-0 ids and residual codes."""
    talker = omni.talker
    gen = torch.Generator().manual_seed(1)
    hidden = talker.config.text_config.hidden_size
    embeds = torch.randn(1, 9, hidden, generator=gen)
    trailing = torch.randn(1, 3, hidden, generator=gen)
    pad = torch.randn(1, 1, hidden, generator=gen)
    vocab = talker.config.text_config.vocab_size
    eos = TINY_CODEC_IDS["codec_eos_token_id"]

    def run():
        out = talker.generate(
            inputs_embeds=embeds, trailing_text_hidden=trailing, tts_pad_embed=pad,
            talker_input_ids=torch.full((1, 9), TINY_IDS["tts_pad_token_id"]),
            attention_mask=torch.ones(1, 9, dtype=torch.long),
            max_new_tokens=5, do_sample=False, eos_token_id=eos, output_hidden_states=True,
            return_dict_in_generate=True, suppress_tokens=[i for i in range(vocab - 1024, vocab) if i != eos])
        codes = torch.stack([h[-1] for h in out.hidden_states if h[-1] is not None], dim=1)
        return out.sequences, codes

    seq0, codes0 = run()
    report = omni_fast.patch(talker)
    try:
        seq1, codes1 = run()
    finally:
        omni_fast.unpatch(talker)
    assert kernel_calls["qk_norm_mrope"] > 0 and kernel_calls["moe_experts"] > 0
    assert torch.equal(seq1, seq0) and torch.equal(codes1, codes0)
    replaced = "\n".join(report.replaced)
    assert "[talker]" in replaced and "[code_predictor]" in replaced


def test_code2wav_alone_parity(omni, kernel_calls):
    code2wav = omni.code2wav
    groups, size = omni.config.code2wav_config.num_quantizers, omni.config.code2wav_config.codebook_size
    codes = torch.randint(0, size, (2, groups, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = code2wav.chunked_decode(codes, chunk_size=4, left_context_size=2)
        report = omni_fast.patch(code2wav, backend="reference")  # Triton Code2Wav: tests/test_code2wav_ops.py
        try:
            got = code2wav.chunked_decode(codes, chunk_size=4, left_context_size=2)
        finally:
            omni_fast.unpatch(code2wav)
    _assert_audio_close(got, want)
    assert all(r.startswith("[code2wav]") for r in report.replaced)
    assert any("whole vocoder (forward; chunked_decode runs on it) -> omni_fast.models.Code2Wav" in r for r in report.replaced)
    assert "forward" not in code2wav.__dict__ and "chunked_decode" not in code2wav.__dict__  # unpatched


def test_qwen2_5_omni_thinker_generate_parity(kernel_calls):
    """Qwen2.5-Omni: no q/k norm, contiguous M-RoPE sections, q/k/v bias -> omni_fast.ops.mrope."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25

    torch.manual_seed(0)
    thinker = seeded_weights_(q25.Qwen2_5OmniThinkerForConditionalGeneration(tiny_qwen2_5_omni_thinker_config()))
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))

    def run():
        return thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                do_sample=False, eos_token_id=None)

    want, got, report = run_unpatched_then_patched(thinker, run)
    assert kernel_calls["mrope"] > 0 and kernel_calls["qk_norm_mrope"] == 0
    assert torch.equal(got, want)
    assert any("Qwen2_5OmniAttention" in r for r in report.replaced)
    assert torch.equal(run(), want)


def test_qwen2_5_omni_full_model_patch(kernel_calls):
    """``Qwen2_5OmniForConditionalGeneration`` with talker and Token2Wav: the thinker's and the talker's attention
    RoPE are swapped (contiguous M-RoPE sections), Token2Wav (DiT + BigVGAN) is reported as left.
    Parity: the thinker's greedy ``generate`` and the talker model's hidden states (3-row positions). transformers'
    full-model ``generate`` needs a speaker file (``speaker_map``: conditioning mels) to make audio, so it is not
    run here."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25

    from omni_fast.models.presets import tiny_qwen2_5_omni_config

    torch.manual_seed(0)
    model = seeded_weights_(q25.Qwen2_5OmniForConditionalGeneration(tiny_qwen2_5_omni_config()))
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(4))
    emb = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(5))
    pos = torch.stack([torch.arange(7), torch.arange(7) // 2, torch.arange(7) % 3]).view(3, 1, 7).expand(3, 2, 7)

    def run():
        text = model.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                      do_sample=False, eos_token_id=None)
        with torch.no_grad():
            hidden = model.talker.model(inputs_embeds=emb, position_ids=pos).last_hidden_state
        return text, hidden

    want_text, want_hidden = run()
    report = omni_fast.patch(model)
    try:
        got_text, got_hidden = run()
    finally:
        omni_fast.unpatch(model)
    assert kernel_calls["mrope"] > 0 and kernel_calls["qk_norm_mrope"] == 0
    assert torch.equal(got_text, want_text)
    torch.testing.assert_close(got_hidden, want_hidden, rtol=1e-5, atol=1e-5)
    replaced, left = "\n".join(report.replaced), "\n".join(report.left)
    assert "[thinker] Qwen2_5OmniAttention" in replaced and "[talker] Qwen2_5OmniAttention" in replaced
    # Token2Wav's swaps are opt-in: the report names each piece and the switch, not "no replacement yet"
    assert "[code2wav] Qwen2_5OmniToken2WavModel.forward" in left and "OMNI_FAST_TOKEN2WAV=1" in left
    assert "no omni-fast replacement yet" not in left


def test_nested_patches_deepcopy_and_weight_changes():
    """Part-then-whole and whole-then-part patches unwind cleanly; a deep copy runs its own weights; the swapped-in
    vocoder follows in-place weight updates."""
    import copy

    from omni_fast.models.presets import tiny_qwen3_omni_config
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    torch.manual_seed(0)
    model = seeded_weights_(q3.Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_omni_config())).eval()

    def swapped():
        return [n for n, m in model.named_modules() if "forward" in m.__dict__ or "_omni_fast_forward" in m.__dict__]

    omni_fast.patch(model.thinker)
    omni_fast.patch(model, backend="reference")
    omni_fast.unpatch(model)
    assert swapped() == []
    omni_fast.patch(model, backend="reference")
    with pytest.raises(ValueError, match="part of a model patched as a whole"):  # never half-patched (issue 17)
        omni_fast.patch(model.thinker, backend="reference")
    with pytest.raises(ValueError, match="part of a model patched as a whole"):
        omni_fast.unpatch(model.thinker)
    omni_fast.unpatch(model)
    assert swapped() == []

    c2w = model.code2wav
    codes = torch.randint(0, c2w.config.codebook_size, (1, c2w.config.num_quantizers, 3))
    with torch.no_grad():
        omni_fast.patch(c2w, backend="reference")
        before = c2w(codes)
        twin = copy.deepcopy(c2w)
        for p in twin.parameters():
            p.mul_(0.5)
        assert not torch.allclose(twin(codes), before)  # the copy runs its own (changed) weights
        torch.testing.assert_close(c2w(codes), before)  # the original is untouched
        for p in c2w.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(c2w(codes), twin(codes))  # in-place updates reach the swapped-in vocoder
        omni_fast.unpatch(twin)
        omni_fast.unpatch(c2w)
    torch.testing.assert_close(c2w(codes), twin(codes), rtol=1e-4, atol=1e-4)


def test_patch_refuses_a_backend_that_cannot_run_here():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        omni_fast.patch(model, backend="cuda")


def test_a_patch_that_replaces_nothing_warns(omni):
    """A model omni-fast does not know (or ``parts=[]``) used to give a silent, empty report."""
    with pytest.warns(UserWarning, match=r"replaced nothing in Linear \(Linear is not a supported Qwen-Omni model; "
                                         r"omni_fast.patch takes transformers' Qwen3OmniMoeForConditionalGeneration"):
        report = omni_fast.patch(torch.nn.Linear(2, 2))
    assert "replaced:\n    (nothing)" in str(report)
    with pytest.warns(UserWarning, match=r"parts=\[\]"):
        omni_fast.patch(omni, parts=[])
    omni_fast.unpatch(omni)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        omni_fast.patch(omni, parts=["audio"], backend="reference")
    omni_fast.unpatch(omni)



def test_a_module_of_another_family_is_named_as_not_a_qwen_omni_model():
    """Not "[thinker] no omni-fast replacement yet": the report and the warning name the class and what is
    supported; a wrapper or subclass around a Qwen-Omni module is not called unsupported."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    with pytest.warns(UserWarning, match="Sequential is not a supported Qwen-Omni model"):
        report = omni_fast.patch(model)
    omni_fast.unpatch(model)
    assert report.replaced == [] and len(report.left) == 1
    line = report.left[0]
    assert line.startswith("[model] Sequential is not a supported Qwen-Omni model") and "nothing replaced" in line
    assert "Qwen3OmniMoeForConditionalGeneration" in line and "Qwen2_5OmniForConditionalGeneration" in line
    assert "no omni-fast replacement yet" not in str(report)
    from omni_fast.integrations.patch_parts import is_qwen_omni

    assert not is_qwen_omni(model)
    fake = type("Qwen3OmniMoeThinkerTextMLP", (torch.nn.Module,), {})
    assert is_qwen_omni(torch.nn.Sequential(torch.nn.Sequential(fake())))  # a wrapper around a Qwen-Omni module
    assert is_qwen_omni(type("MyThinker", (fake,), {})())  # a subclass of one


def test_nothing_replaced_names_the_selected_parts_not_the_unselected_ones():
    """Qwen2.5-Omni has no code predictor: the warning said 'left as is: [audio] ...; part not selected', a line
    about a part nobody asked for."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as q25

    from omni_fast.models.presets import tiny_qwen2_5_omni_config

    torch.manual_seed(0)
    model = q25.Qwen2_5OmniForConditionalGeneration(tiny_qwen2_5_omni_config())
    with pytest.warns(UserWarning, match=r"parts=\['code_predictor'\]: nothing there") as seen:
        omni_fast.patch(model, parts=["code_predictor"], backend="reference")
    assert not [w for w in seen if "part not selected" in str(w.message)]
    omni_fast.unpatch(model)


def _add_device_hook(module, calls: list) -> None:
    """accelerate's ``add_hook_to_module`` as transformers' ``device_map="auto"`` uses it: ``forward`` becomes a
    wrapper running the hook's ``pre_forward`` (which moves the inputs to the module's execution device) around
    ``_old_forward``. accelerate's own function when it is installed, else the same mechanism written out."""
    try:
        from accelerate.hooks import ModelHook, add_hook_to_module
    except ImportError:
        ModelHook, add_hook_to_module = object, None

    class _Hook(ModelHook):
        no_grad = False

        def init_hook(self, m):
            return m

        def pre_forward(self, m, *args, **kwargs):
            calls.append(type(m).__name__)
            return args, kwargs

        def post_forward(self, m, output):
            return output

    if add_hook_to_module is not None:
        add_hook_to_module(module, _Hook())
        return
    module._hf_hook, module._old_forward = _Hook(), module.forward

    def new_forward(m, *args, **kwargs):
        args, kwargs = m._hf_hook.pre_forward(m, *args, **kwargs)
        return m._hf_hook.post_forward(m, m._old_forward(*args, **kwargs))

    module.forward = functools.update_wrapper(functools.partial(new_forward, module), module._old_forward)


def test_patch_keeps_accelerate_device_hooks(omni, kernel_calls):
    """A model dispatched with device_map="auto" has accelerate's hooks on its blocks (the Code2Wav module, decoder
    layers, ...): patch swapped ``forward`` itself, so the hook that moves the inputs to the module's device no
    longer ran (codes from the talker on cuda:0 reached Code2Wav's weights on cuda:1). Now the hook's inner
    ``_old_forward`` is swapped: the hook runs, then omni-fast's forward; unpatch gives the hook back transformers'
    forward."""
    model = copy.deepcopy(omni)
    calls = []
    code2wav, attention = model.code2wav, model.thinker.model.language_model.layers[0].self_attn \
        if hasattr(model.thinker.model, "language_model") else model.thinker.model.layers[0].self_attn
    for module in (code2wav, attention):
        _add_device_hook(module, calls)
    hook_forward = code2wav.forward
    omni_fast.patch(model, backend="reference")
    groups, size = model.config.code2wav_config.num_quantizers, model.config.code2wav_config.codebook_size
    codes = torch.randint(0, size, (1, groups, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        code2wav(codes)
        model.thinker(input_ids=_prompt(), attention_mask=torch.ones_like(_prompt()))
    assert type(code2wav).__name__ in calls and type(attention).__name__ in calls
    assert "_omni_fast_code2wav" in code2wav.__dict__ and kernel_calls["qk_norm_mrope"] > 0  # omni-fast ran inside
    omni_fast.unpatch(model)
    assert code2wav.forward is hook_forward and not isinstance(code2wav._old_forward, BoundMethod)


def test_code2wav_split_over_devices_keeps_transformers_forward(omni, monkeypatch):
    """A Code2Wav module whose weights device_map split over two GPUs (seen as two devices here): omni-fast's
    Code2Wav reads every weight on one device and refuses such weights by name, so the patched forward runs
    transformers' (before: the patched forward raised that ValueError where the unpatched model ran)."""
    from omni_fast.models import Code2Wav, cuda_graphs

    code2wav = omni.code2wav
    sd = dict(code2wav.state_dict())
    moved = next(k for k in sd if k.startswith("upsample."))
    sd[moved] = sd[moved].to("meta")
    with pytest.raises(ValueError, match=f"{moved} is torch.float32 on meta; all weights must share"):
        Code2Wav.from_state_dict(code2wav.config, sd)
    groups, size = omni.config.code2wav_config.num_quantizers, omni.config.code2wav_config.codebook_size
    codes = torch.randint(0, size, (1, groups, 5), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(cuda_graphs, "key_devices", lambda key: {torch.device("cpu"), torch.device("cuda:1")})
    with torch.no_grad():
        want = code2wav(codes)
        omni_fast.patch(code2wav, backend="reference")
        try:
            got = code2wav(codes)
            assert "_omni_fast_code2wav" not in code2wav.__dict__
        finally:
            omni_fast.unpatch(code2wav)
    _assert_audio_close(got, want)  # (transformers' forward, its pre-transformer on the patched RoPE kernel)
