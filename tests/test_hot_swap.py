"""Hot-swapped weights (docs/reliability.md, "Hot-swapped weights"): every copy omni-fast builds from a module's
weights (the patched Code2Wav, the talker's code predictor, text decoders, the DiT's fused weights, graphs) is
keyed on :func:`omni_fast.models.cuda_graphs.weights_key` and rebuilt when it changes. These tests write weights in
each way a server does and check that the key (so every cache on it) notices, and end to end that the patched
vocoder then equals transformers' own forward on the new weights."""

import pytest
import torch

pytest.importorskip("transformers")

import omni_fast  # noqa: E402
from omni_fast.models.cuda_graphs import weights_key  # noqa: E402
from omni_fast.models.presets import tiny_qwen3_omni_config  # noqa: E402
from omni_fast.testing import seeded_weights_  # noqa: E402
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402


def _tiny(inference: bool):
    """The tiny Qwen3-Omni model, built under torch.inference_mode when ``inference`` (its tensors are then
    inference tensors: no version counter)."""
    torch.manual_seed(0)
    with torch.inference_mode(inference):
        return seeded_weights_(q3.Qwen3OmniMoeForConditionalGeneration(tiny_qwen3_omni_config())).eval()


def _halved(module) -> dict:
    return {k: v * 0.5 if v.is_floating_point() else v.clone() for k, v in module.state_dict().items()}


def _data_copy(module, new):
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if name in new:
            t.data.copy_(new[name])  # (vLLM's default_weight_loader; EMA / RL weight syncs)


WRITES = {
    # how: (inference-built model?, write(module, new state dict), announce with weights_changed?)
    "no_grad copy_": (False, lambda m, new: [t.copy_(new[n]) for n, t in m.named_parameters()], False),
    "load_state_dict": (False, lambda m, new: m.load_state_dict(new), False),
    "load_state_dict under inference_mode, inference tensors": (True, lambda m, new: m.load_state_dict(new), False),
    "a parent's load_state_dict, inference tensors": (
        True, lambda m, new: m.parent.load_state_dict({"code2wav." + k: v for k, v in new.items()}, strict=False),
        False),
    "a submodule's load_state_dict, inference tensors": (
        True, lambda m, new: m.pre_transformer.load_state_dict(
            {k[len("pre_transformer."):]: v for k, v in new.items() if k.startswith("pre_transformer.")}), False),
    ".data.copy_ announced": (False, _data_copy, True),
    "in place into inference tensors, announced": (True, lambda m, new: [t.copy_(new[n]) for n, t in
                                                                          m.named_parameters()], True),
}


@pytest.mark.parametrize("how", list(WRITES))
def test_weights_key_sees_each_kind_of_write(how):
    """A model built under inference_mode and reloaded there kept every cached copy of its old weights: inference
    tensors have no version counter (the key counted them as never written). ``param.data.copy_`` bypasses the
    counter too: it needs ``omni_fast.weights_changed``."""
    inference, write, announce = WRITES[how]
    model = _tiny(inference)
    c2w = model.code2wav
    c2w.__dict__["parent"] = model  # (for the parent's load; not a submodule)
    before = weights_key(c2w)
    new = _halved(c2w)
    with torch.inference_mode(inference), torch.no_grad():
        write(c2w, new)
        if announce:
            omni_fast.weights_changed(c2w)
    assert weights_key(c2w) != before


def test_data_writes_unannounced_are_not_seen():
    """The documented limit: a ``.data`` write is invisible to the key until announced (nothing can see it without
    reading the values)."""
    c2w = _tiny(False).code2wav
    before = weights_key(c2w)
    _data_copy(c2w, _halved(c2w))
    assert weights_key(c2w) == before
    omni_fast.weights_changed(next(c2w.parameters()))  # one tensor is enough to change the key
    assert weights_key(c2w) != before


@pytest.mark.parametrize("how", ["load_state_dict under inference_mode, inference tensors", ".data.copy_ announced"])
def test_patched_code2wav_runs_the_new_weights(how):
    """End to end: the patched vocoder (a copy with packed convs and folded scales) after the swap equals
    transformers' forward on the new weights. Before: the old packed copies ran (a mix of old and new weights)."""
    inference, write, announce = WRITES[how]
    c2w = _tiny(inference).code2wav
    codes = torch.randint(0, c2w.config.codebook_size, (1, c2w.config.num_quantizers, 3),
                          generator=torch.Generator().manual_seed(1))
    new = _halved(c2w)
    with torch.inference_mode(inference), torch.no_grad():
        omni_fast.patch(c2w, backend="reference")
        try:
            c2w(codes)  # builds the fast copy
            write(c2w, new)
            if announce:
                omni_fast.weights_changed(c2w)
            got = c2w(codes)
        finally:
            omni_fast.unpatch(c2w)
        want = c2w(codes)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_talker_code_predictor_rebuilt_after_an_announced_data_write():
    """The talker's cached CodePredictor (weights copied) is rebuilt after ``.data`` writes once announced."""
    from omni_fast.models.talker_step import _fast_code_predictor

    talker = _tiny(False).talker
    first = _fast_code_predictor(talker)
    assert _fast_code_predictor(talker) is first
    _data_copy(talker.code_predictor, _halved(talker.code_predictor))
    omni_fast.weights_changed(talker.code_predictor)
    second = _fast_code_predictor(talker)
    assert second is not first
    for (name, got), want in zip(second.state_dict().items(), first.state_dict().values()):
        if got.is_floating_point() and want.abs().max() > 0 and "rope" not in name:
            assert not torch.equal(got, want), name


def test_weights_changed_refuses_other_objects():
    with pytest.raises(TypeError, match="weights must be"):
        omni_fast.weights_changed([torch.zeros(1)])


def test_a_watched_module_still_pickles_and_copies(tmp_path):
    """The load hook weights_key registers is a module-level function: the module still pickles and deep-copies,
    and the copy's loads are counted too."""
    import copy

    c2w = _tiny(True).code2wav
    weights_key(c2w)
    torch.save(c2w, tmp_path / "c2w.pt")
    twin = copy.deepcopy(c2w)
    before = weights_key(twin)
    with torch.inference_mode():
        twin.load_state_dict(_halved(twin))
    assert weights_key(twin) != before


# --- the old copy dropped while another stream still reads it -------------------------------------------------------


def test_a_dropped_copy_is_recorded_on_the_streams_that_used_it(monkeypatch):
    """A copy (here a stand-in with a dict, a list and a tuple of tensors, as Code2Wav keeps them) made on stream S0
    is looked up by a request on S1; a hot swap then drops it from its cache, and the request's last reference goes
    while its kernels on S1 may still be queued. The caching allocator hands a freed block straight to the next
    allocation of the stream that made it unless the block was recorded on S1: every lookup records its stream,
    once per stream (torch's record_stream)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _fake_cuda import FakeCuda

    from omni_fast import _cache_memory

    fake = FakeCuda(monkeypatch, devices=1)
    recorded = []
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: recorded.append((id(self), stream)))
    monkeypatch.setattr(_cache_memory, "capturing", lambda device: False)
    class Copy:  # (a plain object with tensors in its attributes, as Code2Wav)
        def __init__(self, **attrs):
            vars(self).update(attrs)

    copy = Copy(sd={"w": torch.zeros(2)}, layers=[{"qkv": torch.zeros(3)}], folded=(torch.zeros(1),),
                           device=torch.device("cuda", 0))
    tensors = {id(t) for t in (copy.sd["w"], copy.layers[0]["qkv"], copy.folded[0])}
    s1 = fake.Stream(0)
    with torch.cuda.stream(s1):
        for _ in range(3):  # a request's frames
            _cache_memory.record_copy_use(copy, copy.device)
    assert {t for t, s in recorded if s is s1} == tensors  # every tensor, on the request's stream
    assert len(recorded) == len(tensors)  # once per stream, not per lookup
    _cache_memory.record_copy_use(copy, torch.device("cpu"))  # (a CPU copy: nothing to record)
    assert len(recorded) == len(tensors)


def test_the_cached_copies_record_their_lookups(monkeypatch):
    """The talker's CodePredictor and the patched Code2Wav go through record_copy_use at each lookup."""
    from omni_fast import _cache_memory
    from omni_fast.models import talker_step

    seen = []
    monkeypatch.setattr(talker_step, "record_copy_use", lambda copy, device: seen.append(type(copy).__name__))
    monkeypatch.setattr(_cache_memory, "record_copy_use", lambda copy, device: seen.append(type(copy).__name__))
    model = _tiny(False)
    talker_step._fast_code_predictor(model.talker)
    c2w = model.code2wav
    codes = torch.zeros(1, c2w.config.num_quantizers, 2, dtype=torch.long)
    with torch.no_grad():
        omni_fast.patch(c2w, backend="reference")
        try:
            c2w(codes)
        finally:
            omni_fast.unpatch(c2w)
    assert seen == ["CodePredictor", "Code2Wav"]


def _fake_records(monkeypatch):
    """Faked CUDA (one device) where every tensor is a CUDA tensor and ``record_stream`` logs ``(id, stream)``."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _fake_cuda import FakeCuda

    from omni_fast import _cache_memory

    fake, recorded = FakeCuda(monkeypatch, devices=1), []
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: recorded.append((id(self), stream)))
    monkeypatch.setattr(_cache_memory, "capturing", lambda device: False)
    return fake, recorded


def test_a_text_decoder_records_its_copies_and_its_state(monkeypatch):
    """A leased text decoder holds copies of the weights (the talker's ``shared_w13`` gate|up concatenation, the
    dense layers' ``gate_up``) and its KV state: a swap drops it from its cache while the last request may still
    have kernels reading them queued on its stream. Recorded: every tensor of its layers and of its state (before:
    only the attributes' own tensors, not the layers' nor the state's); a new state (load_prefill, reserve) makes
    every stream record it anew (it was made on the stream current then)."""
    from omni_fast import _cache_memory
    from omni_fast.models import text_decoder
    from omni_fast.models.text_decoder import MoeTextDecoder

    talker = _tiny(False).talker
    dec = MoeTextDecoder.from_transformers(talker.model, talker.codec_head)
    assert dec.layers[0].shared_w13 is not None
    dec._state = text_decoder._State(dec, 1, 16, False)  # (what load_prefill makes)
    changed = []
    monkeypatch.setattr(text_decoder, "copy_changed", changed.append)
    mask = torch.ones(1, 3, dtype=torch.long)
    from transformers.cache_utils import DynamicCache

    from omni_fast.integrations.hf_compat import with_cache

    cache = DynamicCache(config=talker.model.config)
    with torch.no_grad():
        talker.model(inputs_embeds=torch.randn(1, 3, talker.model.config.hidden_size), attention_mask=mask,
                     use_cache=True, **with_cache(cache))
    dec.load_prefill(cache, mask, max_new_tokens=40)  # (a larger state than the one above: made anew)
    assert changed == [dec]

    fake, recorded = _fake_records(monkeypatch)
    st = dec._state
    want = {id(dec.layers[0].shared_w13), id(dec.layers[0].q), id(st.caches[0][0]), id(st.cache_seqlens)}
    s1 = fake.Stream(0)
    with torch.cuda.stream(s1):
        _cache_memory.record_copy_use(dec, torch.device("cuda", 0))
        n = len(recorded)
        _cache_memory.record_copy_use(dec, torch.device("cuda", 0))
    assert want <= {t for t, s in recorded if s is s1}
    assert len(recorded) == n  # once per stream
    _cache_memory.copy_changed(dec)
    with torch.cuda.stream(s1):
        _cache_memory.record_copy_use(dec, torch.device("cuda", 0))
    assert len(recorded) == 2 * n  # recorded anew after a change


def test_the_leased_decoders_record_their_lookups(monkeypatch):
    """Every lookup of a leased text decoder (the decode takeover's ``fast_decoder``, the pipeline's thinker and
    talker decoders) and codec stream records it on the current stream, and the lease lists it (to record it on
    each stream a generator resumes on). Before: none did."""
    from omni_fast.models import Qwen3Omni
    from omni_fast.integrations import decode_takeover
    from omni_fast.pipeline import device as pipeline_device

    seen = []
    monkeypatch.setattr(pipeline_device, "record_copy_use", lambda copy, device: seen.append(type(copy).__name__))
    pipe = Qwen3Omni.random("tiny", patch=True)
    lease = pipeline_device.Lease()
    stages = pipe.stages()
    stages._decoder("thinker", lease)
    stages._decoder("talker", lease)
    stages._codec_stream(1, lease)
    decode_takeover.fast_decoder(stages.model.talker.model, lease)
    want = ["MoeTextDecoder", "MoeTextDecoder", "Code2WavStream", "MoeTextDecoder"]
    assert seen == want
    assert [type(o).__name__ for o, _ in lease.held] == want
    seen.clear()
    lease.record()
    assert seen == want


def test_a_generator_resumed_on_another_stream_records_its_lease_there(monkeypatch):
    """A stream generator looked its decoders up on stream a, then a server thread resumes it on stream b: b's
    kernels read them too, so the first resume on b records the lease on b (once per new stream, not per resume).
    Before: only the lookup's stream was recorded."""
    from omni_fast.pipeline import device as pipeline_device

    fake, _ = _fake_records(monkeypatch)
    recorded = []

    class _Lease(pipeline_device.Lease):
        def record(self):
            recorded.append(fake.current_stream())

    a, b = fake.streams[0], fake.Stream(0)
    gen = pipeline_device.resumed_in_order(iter(range(4)), torch.device("cuda"), _Lease())
    assert next(gen) == 0 and next(gen) == 1
    fake.streams[0] = b
    assert next(gen) == 2 and next(gen) == 3
    assert recorded == [a, b]


def test_the_pipeline_code_predictor_records_each_frame_stream(monkeypatch):
    """The Qwen3-Omni pipeline reads its code predictor stage at each frame (it may have been swapped since the
    request began, and the request resumed on another stream): the frame records it on the current stream."""
    from omni_fast.models import Qwen3Omni
    from omni_fast.models import components

    pipe = Qwen3Omni.random("tiny", patch=True)
    seen = []
    monkeypatch.setattr(components, "record_copy_use", lambda copy, device: seen.append(type(copy).__name__))
    talker = pipe.model.talker
    hidden = torch.randn(1, 1, talker.model.config.hidden_size)
    with torch.no_grad():
        pipe.code_predictor.frame(hidden, torch.zeros(1, dtype=torch.long), lambda logits: logits.argmax(-1))
    assert seen == ["CodePredictor"]


def test_a_decode_takeover_step_records_its_decoder(monkeypatch):
    """A generate whose cache holds a takeover decoder (the Qwen2.5 pipeline's talker decode; transformers'
    generate) may be resumed on another stream than its prefill's lookup: each step records the decoder on the
    current stream (once per stream). Before: only the lookup did."""
    from transformers.cache_utils import DynamicCache

    from omni_fast.integrations import decode_takeover
    from omni_fast.integrations.hf_compat import with_cache

    text_model = _tiny(False).talker.model
    dec = decode_takeover.fast_decoder(text_model)
    mask, H = torch.ones(1, 3, dtype=torch.long), text_model.config.hidden_size
    cache = DynamicCache(config=text_model.config)
    with torch.no_grad():
        text_model(inputs_embeds=torch.randn(1, 3, H), attention_mask=mask, use_cache=True, **with_cache(cache))
        dec.load_prefill(cache, mask, max_new_tokens=4)
        seen = []
        monkeypatch.setattr(decode_takeover, "record_copy_use", lambda copy, device: seen.append(copy))
        decode_takeover._decode_step(text_model, decode_takeover.FastTalkerCache(dec, 3), None, None,
                                     torch.randn(1, 1, H))
    assert seen == [dec]


def test_code_predictor_tensors_made_later_are_recorded_at_the_next_lookup(monkeypatch):
    """A CodePredictor makes tensors after its first lookups (eager-frame constants per batch size, frame graphs'
    static buffers, persistent workspaces), on the stream current then: another stream that recorded it before must
    record them at its next lookup (before: once per stream, so a swap could free them to the making stream while
    that other stream's kernels still read them)."""
    from omni_fast import _cache_memory
    from omni_fast.models.talker_step import _fast_code_predictor

    talker = _tiny(False).talker
    cp = _fast_code_predictor(talker)
    fake, recorded = _fake_records(monkeypatch)
    s1, s2 = fake.Stream(0), fake.Stream(0)
    with torch.cuda.stream(s1):
        _cache_memory.record_copy_use(cp, torch.device("cuda", 0))
    with torch.cuda.stream(s2):
        consts = cp._constants(torch.device("cpu"), 3, torch.float32)  # (made on s2: a batch of 3's eager frame)
    with torch.cuda.stream(s1):
        _cache_memory.record_copy_use(cp, torch.device("cuda", 0))
    assert {id(consts["rows"]), id(consts["cos"])} <= {t for t, s in recorded if s is s1}


def test_a_submodule_attached_later_counts_its_loads():
    """Inference tensors have no version counter: a load into them counts through a load_state_dict hook. A
    submodule attached after the first key (a swapped block) is hooked at the next key (before: only the tree the
    first call saw, so reloading the new block in inference mode left the key, and every copy, as they were)."""
    with torch.inference_mode():
        parent = torch.nn.Sequential(torch.nn.Linear(2, 2))
        weights_key(parent)
        parent.append(torch.nn.Linear(2, 2))
        before = weights_key(parent)
        parent[1].load_state_dict({k: v + 1 for k, v in parent[1].state_dict().items()})
        assert weights_key(parent) != before
