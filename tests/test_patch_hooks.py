"""accelerate's device hooks (transformers' ``device_map``) changed on a module AFTER ``omni_fast.patch``:
``unpatch`` must still give the module transformers' forward, with whatever hook it has then (~0.1 s, no model).

accelerate's ``add_hook_to_module`` keeps the module's forward as ``_old_forward`` and makes ``forward`` a wrapper
around it; ``remove_hook_from_module`` puts ``_old_forward`` back as ``forward`` and deletes it. ``patch`` swaps
``_old_forward`` on a hooked module, ``forward`` on another (omni_fast._bound.swap_forward). accelerate's own
functions when installed, else the same three steps written out."""

import importlib

import pytest
import torch

from omni_fast._bound import swap_forward


def _unpatch(module):
    importlib.import_module("omni_fast.patch")._unpatch(module)  # (the package's ``patch`` is the function)


def _hooks(calls):
    try:
        from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
    except ImportError:
        ModelHook, add_hook_to_module, remove_hook_from_module = object, None, None

    class _Hook(ModelHook):
        no_grad = False

        def init_hook(self, m):
            return m

        def pre_forward(self, m, *args, **kwargs):
            calls.append("hook")
            return args, kwargs

        def post_forward(self, m, output):
            return output

        def detach_hook(self, m):
            return m

    def add(m):
        if add_hook_to_module is not None:
            return add_hook_to_module(m, _Hook())
        if not ("_hf_hook" in m.__dict__ and "_old_forward" in m.__dict__):
            m._old_forward = m.forward
        m._hf_hook = _Hook()

        def wrapper(*args, **kwargs):
            args, kwargs = m._hf_hook.pre_forward(m, *args, **kwargs)
            return m._hf_hook.post_forward(m, m._old_forward(*args, **kwargs))

        m.forward = wrapper

    def remove(m):
        if remove_hook_from_module is not None:
            return remove_hook_from_module(m)
        del m._hf_hook
        m.forward = m._old_forward
        del m._old_forward

    return add, remove


def _fast(self, x):
    """The swapped-in forward: transformers' (``_omni_fast_forward``) plus one, to tell them apart."""
    return self._omni_fast_forward(x) + 1


@pytest.fixture
def linear():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 3)
    return m, torch.randn(2, 3)


def test_hook_removed_after_patch(linear):
    """remove_hook_from_module after patch made ``forward`` omni-fast's swapped-in method (it was ``_old_forward``);
    unpatch then restored ``_old_forward`` only, leaving that method as ``forward`` with its state deleted
    ('no attribute _omni_fast_forward' at the next call). Now: transformers' forward, as remove_hook_from_module
    leaves an unpatched module, and no stray ``_old_forward``."""
    m, x = linear
    want = m(x)
    calls = []
    add, remove = _hooks(calls)
    add(m)
    swap_forward(m, _fast)
    torch.testing.assert_close(m(x), want + 1)
    remove(m)
    torch.testing.assert_close(m(x), want + 1)  # (omni-fast's forward, now without the hook)
    _unpatch(m)
    torch.testing.assert_close(m(x), want)
    assert "_old_forward" not in m.__dict__ and not any(k.startswith("_omni_fast") for k in m.__dict__)


def test_hook_added_after_patch(linear):
    """add_hook_to_module after patch (a model dispatched after it) wraps omni-fast's swapped ``forward`` (now its
    ``_old_forward``); unpatch popped ``forward``, dropping the hook (inputs no longer moved to the weights'
    device) and leaving omni-fast's method as ``_old_forward``. Now the hook stays around transformers' forward."""
    m, x = linear
    want = m(x)
    calls = []
    add, _ = _hooks(calls)
    swap_forward(m, _fast)
    add(m)
    torch.testing.assert_close(m(x), want + 1)
    _unpatch(m)
    calls.clear()
    torch.testing.assert_close(m(x), want)
    assert calls == ["hook"]


def test_hook_kept_through_patch_and_unpatch(linear):
    """The usual order (hooked, patched, unpatched): the hook runs around omni-fast's forward, then transformers'."""
    m, x = linear
    want = m(x)
    calls = []
    add, _ = _hooks(calls)
    add(m)
    hook_forward = m.forward
    swap_forward(m, _fast)
    torch.testing.assert_close(m(x), want + 1)
    _unpatch(m)
    calls.clear()
    torch.testing.assert_close(m(x), want)
    assert calls == ["hook"] and m.forward is hook_forward


def test_plain_module_unpatch_leaves_no_instance_forward(linear):
    m, x = linear
    want = m(x)
    swap_forward(m, _fast)
    _unpatch(m)
    torch.testing.assert_close(m(x), want)
    assert "forward" not in m.__dict__


def _offload(module) -> None:
    """accelerate's CPU / disk offload (``attach_align_device_hook(offload=True)``), written out: every submodule
    with weights of its own keeps them on the meta device, its hook loads them for its own forward only."""
    for sub in module.modules():
        own = dict(sub.named_parameters(recurse=False))
        if not own:
            continue
        store = {k: v.detach().clone() for k, v in own.items()}

        def put(m, values):
            for k, v in values.items():
                setattr(m, k, torch.nn.Parameter(v, requires_grad=False))

        def forward(*args, _m=sub, _store=store, **kwargs):
            put(_m, _store)
            try:
                return _m._old_forward(*args, **kwargs)
            finally:
                put(_m, {k: v.to("meta") for k, v in _store.items()})

        put(sub, {k: v.to("meta") for k, v in store.items()})
        sub._old_forward, sub._hf_hook, sub.forward = sub.forward, object(), forward


def test_offloaded_code2wav_runs_transformers_forward():
    """A Code2Wav offloaded by device_map (its weights on meta outside each submodule's own hooked forward, its
    non-persistent buffers on the execution device: accelerate keeps those there) shows as weights on several
    devices, so the patched forward runs transformers' (its submodules' hooks load their weights): the same audio.
    (A check of the multi-GPU merge's claim that offload still works; it passed before this file.)"""
    import omni_fast
    from omni_fast.models.presets import tiny_qwen3_omni_config
    from omni_fast.testing import seeded_weights_
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    torch.manual_seed(0)
    model = seeded_weights_(q3.Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_omni_config()))
    code2wav, cfg = model.code2wav, model.config.code2wav_config
    codes = torch.randint(0, cfg.codebook_size, (1, cfg.num_quantizers, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = code2wav(codes)
        _offload(code2wav)
        torch.testing.assert_close(code2wav(codes), want)  # (the offload as accelerate runs it)
        omni_fast.patch(model, backend="reference")
        try:
            got = code2wav(codes)
        finally:
            omni_fast.unpatch(model)
    err = (got - want).norm() / want.norm()  # (the patched RoPE's fp32 rounding, amplified: test_patch's bound)
    assert err < 1e-3, err


def test_offloaded_attention_layers_run_transformers_attention():
    """A text model whose layers device_map offloaded (CPU / disk: each submodule's weights on meta outside its own
    hooked forward): the patched attention forward read ``q_norm.weight`` / ``k_norm.weight`` directly (for the
    fused q/k norm + RoPE kernel) without calling the norms, whose hooks never loaded them: 'q_weight must be on
    device cpu, got meta' where the unpatched model ran. Such a layer now runs transformers' attention forward."""
    import omni_fast
    from omni_fast.models.presets import tiny_qwen3_omni_config
    from omni_fast.testing import seeded_weights_
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    torch.manual_seed(0)
    model = seeded_weights_(q3.Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_omni_config()))
    thinker = model.thinker.model
    text = getattr(thinker, "language_model", thinker)
    embeds = text.embed_tokens(torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        want = text(inputs_embeds=embeds).last_hidden_state
        _offload(text.layers)
        omni_fast.patch(model, backend="reference")
        try:
            got = text(inputs_embeds=embeds).last_hidden_state
        finally:
            omni_fast.unpatch(model)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_offloaded_code_predictor_runs_transformers_code_predictor():
    """A talker whose code predictor device_map offloaded (weights on meta outside each submodule's hooked forward):
    the patched frame step copied those weights into omni-fast's CodePredictor ('Cannot copy out of meta tensor'
    at the first frame, where the unpatched talker ran). Transformers' code predictor runs while it is offloaded:
    the same codes."""
    import omni_fast
    from omni_fast.models.presets import TINY_CODEC_IDS, TINY_IDS, tiny_qwen3_omni_config
    from omni_fast.testing import seeded_weights_
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3

    torch.manual_seed(0)
    talker = seeded_weights_(q3.Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_omni_config())).talker
    gen, hidden = torch.Generator().manual_seed(1), talker.config.text_config.hidden_size
    embeds, trailing, pad = (torch.randn(1, n, hidden, generator=gen) for n in (9, 3, 1))
    vocab, eos = talker.config.text_config.vocab_size, TINY_CODEC_IDS["codec_eos_token_id"]

    def run():
        out = talker.generate(
            inputs_embeds=embeds, trailing_text_hidden=trailing, tts_pad_embed=pad,
            talker_input_ids=torch.full((1, 9), TINY_IDS["tts_pad_token_id"]),
            attention_mask=torch.ones(1, 9, dtype=torch.long), max_new_tokens=4, do_sample=False, eos_token_id=eos,
            output_hidden_states=True, return_dict_in_generate=True,
            suppress_tokens=[i for i in range(vocab - 1024, vocab) if i != eos])
        return out.sequences, torch.stack([h[-1] for h in out.hidden_states if h[-1] is not None], dim=1)

    want = run()
    _offload(talker.code_predictor)
    omni_fast.patch(talker, backend="reference")
    try:
        got = run()
    finally:
        omni_fast.unpatch(talker)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
