"""MoeTextDecoder (graph-capturable thinker/talker decode): step logits and hidden states equal transformers' text
model forward with a KV cache for several steps (batch with left padding, general TM-RoPE rows, StaticCache and
DynamicCache prefill, fractional positions, dense layers, the talker's shared expert); the pipeline with
``graph_decode`` gives the same text ids, codes and waveform; bad input; trace; CUDA-graph replay (gpu)."""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache, StaticCache  # noqa: E402
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402

import omni_fast  # noqa: E402
from omni_fast.models.presets import tiny_qwen3_omni_config  # noqa: E402
from omni_fast.models.text_decoder import MoeTextDecoder  # noqa: E402
from omni_fast.testing import randomize_  # noqa: E402
from omni_fast.integrations.hf_compat import with_cache  # noqa: E402

TOL = dict(rtol=1e-5, atol=2e-5)  # fp32: only summation order differs from transformers


def _model(part="thinker", dtype=torch.float32, device="cpu", seed=0, **overrides):
    """A tiny transformers thinker text model + lm_head, or talker model + codec_head, with random weights."""
    cfg = tiny_qwen3_omni_config()
    text_cfg = cfg.thinker_config.text_config if part == "thinker" else cfg.talker_config.text_config
    for k, v in overrides.items():
        setattr(text_cfg, k, v)
    torch.manual_seed(seed)
    cls = q3.Qwen3OmniMoeThinkerTextModel if part == "thinker" else q3.Qwen3OmniMoeTalkerModel
    with torch.device(device):
        m = cls._from_config(text_cfg, dtype=dtype).eval()
        head = torch.nn.Linear(text_cfg.hidden_size, text_cfg.vocab_size, bias=False, dtype=dtype)
    randomize_(m, head)
    return m, head


def _prefill(m, mask, positions, static=False, seed=1):
    """transformers' prefill of random embeddings; returns (cache, inputs)."""
    cfg = m.config
    g = torch.Generator().manual_seed(seed)
    B, S = mask.shape
    dev, dt = m.norm.weight.device, m.norm.weight.dtype
    x = torch.randn(B, S, cfg.hidden_size, generator=g).to(dev, dt)
    cache = StaticCache(config=cfg, max_cache_len=S + 8) if static else DynamicCache(config=cfg)
    with torch.no_grad():
        m(inputs_embeds=x, attention_mask=mask.to(dev), position_ids=positions.to(dev), **with_cache(cache),
          use_cache=True)
    return cache


def _left_padded(lengths, S):
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, S - n:] = 1
    return mask


def _text_positions(mask, rows=(0, 0, 0)):
    """[3, B, S] positions: per row the text position (pad tokens at 0), plus a per-row offset to make the three
    TM-RoPE rows differ (a general mrope, not just equal rows)."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return torch.stack([pos + r for r in rows])


def _compare(m, head, dec, mask, pos3, cache, steps=3, seed=2, tol=TOL):
    """Step both: transformers' text model with the growing mask and cache, and the decoder."""
    g = torch.Generator().manual_seed(seed)
    B = mask.shape[0]
    dev, dt = m.norm.weight.device, m.norm.weight.dtype
    mask = mask.to(dev)
    nxt = pos3[:, :, -1].to(dev) + 1
    for s in range(steps):
        e = torch.randn(B, m.config.hidden_size, generator=g).to(dev, dt)
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        with torch.no_grad():
            o = m(inputs_embeds=e[:, None], attention_mask=mask, position_ids=nxt[:, :, None], **with_cache(cache),
                  use_cache=True)
            want_h = o.last_hidden_state[:, -1]
            want = head(want_h)
        p = nxt[0] if s % 2 == 0 and torch.equal(nxt[0], nxt[1]) and torch.equal(nxt[0], nxt[2]) else nxt
        logits, hidden = dec.step(e, p)
        torch.testing.assert_close(logits, want, **tol)
        torch.testing.assert_close(hidden, want_h, **tol)
        nxt = nxt + 1


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("part", ["thinker", "talker"])
def test_decode_matches_transformers(part, backend):
    """Batch 3 (bucket 4) with left padding, 3 decode steps; thinker: DynamicCache, talker (shared expert):
    StaticCache prefill."""
    m, head = _model(part)
    mask = _left_padded([6, 3, 5], 6)
    pos3 = _text_positions(mask)
    cache = _prefill(m, mask, pos3, static=part == "talker")
    dec = MoeTextDecoder.from_transformers(m, head, backend=backend)
    dec.load_prefill(cache, mask, max_new_tokens=4)
    assert dec.cache_seqlens.tolist() == [6, 3, 5]
    steps = 3 if backend == "reference" else 2
    _compare(m, head, dec, mask, pos3, cache, steps=steps)
    assert dec.cache_seqlens.tolist() == [6 + steps, 3 + steps, 5 + steps]


def test_general_mrope_rows_and_state_reuse():
    """Three different TM-RoPE rows (a prompt after an image: t, h, w differ), a mask with a hole; a second batch
    of the same bucket with a shorter prompt reuses the buffers and starts clean."""
    m, head = _model("thinker", seed=3)
    dec = MoeTextDecoder.from_transformers(m, head, backend="reference")
    for trial in range(2):
        mask = _left_padded([5, 7], 7) if trial == 0 else _left_padded([5, 4], 5)
        if trial:
            mask[0, 4] = 0  # any mask pattern: only the valid tokens are moved, in order
        pos3 = _text_positions(mask, rows=(0, 2, 5))
        cache = _prefill(m, mask, pos3, seed=10 + trial)
        dec.load_prefill(cache, mask, max_new_tokens=3)
        state = dec._state
        _compare(m, head, dec, mask, pos3, cache, steps=3, seed=20 + trial)
        if trial == 0:
            first = state
    assert dec._state is first  # same bucket, room enough: buffers reused
    dec.load_prefill(cache, mask, max_new_tokens=200)  # needs a larger cache: new buffers
    assert dec._state is not first and dec._state.capacity == 256


def test_fractional_positions_match_transformers():
    """Non-integer positions (video at a fractional timestamp scale) take the PyTorch RoPE, as transformers."""
    m, head = _model("thinker", seed=4)
    mask = _left_padded([4, 6], 6)
    pos3 = _text_positions(mask).double() * 1.5
    cache = _prefill(m, mask, pos3)
    dec = MoeTextDecoder.from_transformers(m, head, backend="reference")
    dec.load_prefill(cache, mask, max_new_tokens=3, fractional_positions=True)
    _compare(m, head, dec, mask, pos3, cache, steps=2)


def test_dense_layers_match_transformers():
    """Configs with dense SwiGLU layers (``mlp_only_layers``) take the dense path."""
    m, head = _model("thinker", seed=5, mlp_only_layers=[0])
    assert not hasattr(m.layers[0].mlp, "experts") and hasattr(m.layers[1].mlp, "experts")
    mask = _left_padded([3, 5], 5)
    pos3 = _text_positions(mask)
    cache = _prefill(m, mask, pos3)
    dec = MoeTextDecoder.from_transformers(m, head, backend="reference")
    dec.load_prefill(cache, mask, max_new_tokens=2)
    _compare(m, head, dec, mask, pos3, cache, steps=2)


def test_batch_of_one_without_padding_and_triton_fp16():
    """B = 1 (no padding) on the Triton kernels in fp16 against transformers in fp32 (loose: fp16 rounding)."""
    m, head = _model("talker", seed=6)
    mask = torch.ones(1, 4, dtype=torch.long)
    pos3 = _text_positions(mask)
    cache = _prefill(m, mask, pos3)
    m16, head16 = _model("talker", seed=6, dtype=torch.float16)
    cache16 = _prefill(m16, mask, pos3)
    dec = MoeTextDecoder.from_transformers(m16, head16, backend="triton")
    dec.load_prefill(cache16, mask, max_new_tokens=1)
    e = torch.randn(1, m.config.hidden_size)
    nxt = pos3[0, :, -1] + 1
    logits, _ = dec.step(e.half(), nxt)
    with torch.no_grad():
        o = m(inputs_embeds=e[:, None], attention_mask=torch.ones(1, 5, dtype=torch.long),
              position_ids=nxt.view(1, 1, 1).expand(3, 1, 1), **with_cache(cache), use_cache=True)
        want = head(o.last_hidden_state[:, -1])
    assert logits.dtype == torch.float16
    torch.testing.assert_close(logits.float(), want, rtol=2e-2, atol=3e-2)


def test_bad_input():
    m, head = _model("thinker")
    dec = MoeTextDecoder.from_transformers(m, head, backend="reference")
    H = m.config.hidden_size
    with pytest.raises(RuntimeError, match="load_prefill"):
        dec.step(torch.zeros(2, H), torch.zeros(2, dtype=torch.long))
    mask = _left_padded([2, 3], 3)
    pos3 = _text_positions(mask)
    cache = _prefill(m, mask, pos3)
    with pytest.raises(ValueError, match="attention_mask"):
        dec.load_prefill(cache, mask[0], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.load_prefill(cache, mask, max_new_tokens=-1)
    with pytest.raises(ValueError, match="layer 0 of the cache"):
        dec.load_prefill(cache, _left_padded([2, 3, 1], 3), max_new_tokens=1)
    with pytest.raises(TypeError, match="transformers Cache"):
        dec.load_prefill(object(), mask, max_new_tokens=1)
    with pytest.raises(ValueError, match="use_graph needs a CUDA device"):
        dec.load_prefill(cache, mask, max_new_tokens=1, use_graph=True)
    with pytest.raises(ValueError, match="all 2 layers"):
        dec.load_prefill(DynamicCache(config=m.config), mask, max_new_tokens=1)
    dec.load_prefill(cache, mask, max_new_tokens=1)
    with pytest.raises(ValueError, match="input_embeds"):
        dec.step(torch.zeros(3, H), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        dec.step(torch.zeros(2, H), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="fractional_positions"):
        dec.step(torch.zeros(2, H), torch.zeros(2))
    pos = torch.full((2,), 3)
    for _ in range(dec._state.steps_left):  # capacity is rounded up: fill it
        dec.step(torch.zeros(2, H), pos)
    with pytest.raises(RuntimeError, match="KV cache is full"):
        dec.step(torch.zeros(2, H), pos)
    dec.release()
    assert dec.cache_seqlens is None
    with pytest.raises(RuntimeError, match="load_prefill"):
        dec.step(torch.zeros(2, H), pos)
    with pytest.raises(ValueError, match="no bias"):
        MoeTextDecoder.from_transformers(m, torch.nn.Linear(H, 4))


def _talker_rows_4_2(max_new_tokens: int):
    """A tiny talker's decoder after the prefill of a left-padded batch of 2 rows (4 and 2 tokens)."""
    m, head = _model("talker", seed=7)
    mask = _left_padded([4, 2], 4)
    cache = _prefill(m, mask, _text_positions(mask))
    dec = MoeTextDecoder.from_transformers(m, head, backend="reference")
    dec.load_prefill(cache, mask, max_new_tokens=max_new_tokens)
    return m, dec


def test_rewind_repeats_a_step():
    """rewind(n) forgets the last n tokens: the same input then gives the same output (speculative rejection)."""
    m, dec = _talker_rows_4_2(2)
    e, pos = torch.randn(2, m.config.hidden_size), torch.tensor([4, 2])
    first = dec.step(e, pos)
    dec.step(torch.randn(2, m.config.hidden_size), pos + 1)
    dec.rewind(2)
    assert dec.cache_seqlens.tolist() == [4, 2]
    again = dec.step(e, pos)
    torch.testing.assert_close(again[0], first[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="steps"):
        dec.rewind(-1)


def test_rewind_keeps_bucket_padding_rows_at_zero():
    """B = 3 runs in bucket 4: the hidden padding row holds no token, and rewinding must not drive it negative
    (the next step would then refuse the batch on a CPU, or write before the row on a GPU)."""
    m, head = _model("thinker")
    mask = _left_padded([6, 3, 5], 6)
    pos3 = _text_positions(mask)
    dec = MoeTextDecoder.from_transformers(m, head, backend="reference")
    dec.load_prefill(_prefill(m, mask, pos3), mask, max_new_tokens=4)
    dec.rewind(1)
    assert dec._state.cache_seqlens.tolist() == [5, 2, 4, 0]
    dec.step(torch.randn(3, m.config.hidden_size), pos3[0, :, -1])
    assert dec._state.cache_seqlens.tolist() == [6, 3, 5, 1]


def test_interleaved_streams_get_their_own_decoders():
    """Two pipeline streams advanced alternately with graph decode give the ids each gives alone: a live stream's
    decoder (its KV cache) is never handed to another; once a stream ends its decoder is reused."""
    from omni_fast.models.qwen3_omni import Qwen3Omni, Request

    pipe = Qwen3Omni.random("tiny", patch=False, seed=2)
    kw = dict(max_new_tokens=6, talker_max_new_tokens=4, first_chunk=300, chunk=300, graph_decode=True)
    r1, r2 = [Request(text=[5, 6, 7, 8, 9])], [Request(text=[30, 31])]

    def ids(events):
        return [t for ev in events if ev.kind == "text" for t in ev.token_ids]

    with omni_fast.use_backend("reference"):
        want1, want2 = ids(pipe.stream(r1, **kw)), ids(pipe.stream(r2, **kw))
        assert len(pipe._decoders["thinker"][1]) == 1  # sequential streams share one decoder
        g1, g2 = pipe.stream(r1, **kw), pipe.stream(r2, **kw)
        got1, got2, live = [], [], {0: g1, 1: g2}
        while live:
            for j in list(live):
                try:
                    ev = next(live[j])
                except StopIteration:
                    del live[j]
                    continue
                if ev.kind == "text":
                    (got1 if j == 0 else got2).extend(ev.token_ids)
        del g1, g2
    assert (got1, got2) == (want1, want2)
    assert len(pipe._decoders["thinker"][1]) == 2


def test_bench_decode_cases_on_tiny():
    """bench/cases/decode.py: the CPU check passes; on tiny shapes every provider computes the same step, and
    repeated calls decode at the same length (the transformers cache is cropped, the decoder rewound)."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from omni_fast.bench.cases import decode

    cases = decode.cases("quick")
    # the talker first (a deadline-cut first-light run keeps it)
    assert [c.name for c in cases] == ["talker step B=1", "talker step B=8", "thinker step B=1",
                                       "thinker step B=8"]
    assert all(c.bytes > 0 and c.flops > 0 for c in cases)
    cases[2].check()
    import omni_fast
    from omni_fast.bench.case import Unavailable

    tiny = decode.cases("smoke")  # the same cases on the tiny config (fp32, a 6-token prompt)
    assert [c.name for c in tiny] == ["talker step B=1", "talker step B=3", "thinker step B=1", "thinker step B=3"]
    with omni_fast.use_backend("reference"):
        providers = tiny[1].setup(torch.device("cpu"))
        assert isinstance(providers.pop("omni_fast"), Unavailable)  # graph replay needs CUDA
        want = providers["transformers"]()
        for _ in range(2):
            torch.testing.assert_close(providers["transformers"](), want, rtol=0, atol=0)
            torch.testing.assert_close(providers["eager"]()[0], want, **TOL)


def test_step_body_traces_fullgraph():
    """The captured body has no graph breaks (no host sync, fixed shapes): torch.compile traces it whole."""
    m, head = _model("talker")
    mask = _left_padded([2, 3], 3)
    pos3 = _text_positions(mask)
    cache = _prefill(m, mask, pos3)
    dec = MoeTextDecoder.from_transformers(m, head, backend="reference")
    dec.load_prefill(cache, mask, max_new_tokens=2)
    st = dec._state
    st.x.normal_()
    st.pos.fill_(3)
    want = dec._body(st)[0]
    st.cache_seqlens.sub_(1)  # the same step again
    got = torch.compile(lambda: dec._body(st), fullgraph=True, backend="eager")()[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- the pipeline ---------------------------------------------------------------------------------------------


def test_pipeline_graph_decode_matches_transformers_decode():
    """Batch 2 with left padding (prompts of different lengths): the same greedy text ids, codes and waveform with
    the thinker and talker decode on MoeTextDecoder (Triton on the interpreter) as on transformers' text models;
    not patched, so graph decode is off by default (CPU) and the default run is transformers' decode."""
    from omni_fast.models.qwen3_omni import Qwen3Omni, Request

    pipe = Qwen3Omni.random("tiny", patch=False)
    reqs = [Request(text=[5, 6, 7, 8, 9]), Request(text=[11, 12])]
    kw = dict(max_new_tokens=6, talker_max_new_tokens=6, first_chunk=300, chunk=300)
    runs = []
    for graph_decode in (False, True):  # graph decode from a StaticCache prefill (the default is a DynamicCache)
        frames = []
        decode = pipe.code2wav.decode
        pipe.code2wav.decode = lambda c: (frames.append(c.clone()), decode(c))[1]
        try:
            runs.append((pipe.generate(reqs, graph_decode=graph_decode, static_cache=graph_decode, **kw), frames))
        finally:
            del pipe.code2wav.decode
    (want, want_codes), (got, got_codes) = runs
    assert set(pipe._decoders) == {"thinker", "talker"}
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]
    assert len(got_codes) == len(want_codes) and all(torch.equal(a, b) for a, b in zip(got_codes, want_codes))
    for a, b in zip(got, want):
        assert a["audio"].numel() > 0
        torch.testing.assert_close(a["audio"], b["audio"], rtol=0, atol=0)


@pytest.mark.parametrize("eos_scale", [1.0, 2.0])
def test_text_after_speech_matches_transformers_thinker_generate(eos_scale):
    """Text longer than the speech budget: the thinker's tail runs with the stop check one step behind the device
    (ids read while the next step runs); with and without graph decode the text equals transformers' thinker
    ``generate`` (batch 2, left padding, greedy). ``eos_scale`` 2: row 1 emits EOS inside the tail while row 0
    goes on (its later steps feed EOS, tracked on the device)."""
    import omni_fast
    from omni_fast.models.presets import TINY_IDS
    from omni_fast.models.qwen3_omni import Qwen3Omni, Request

    pipe = Qwen3Omni.random("tiny", patch=False, seed=4)
    with torch.no_grad():
        pipe.model.thinker.lm_head.weight[TINY_IDS["im_end_token_id"]] *= eos_scale
    reqs = [Request(text=[5, 6, 7, 8, 9]), Request(text=[11, 12])]
    prompts = [pipe.build_prompt(r, 0, 0) for r in reqs]
    S = max(map(len, prompts))
    ids = torch.tensor([[0] * (S - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (S - len(p)) + [1] * len(p) for p in prompts])
    eos = TINY_IDS["im_end_token_id"]
    n = 9
    hf = pipe.model.thinker.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                     eos_token_id=eos, pad_token_id=eos)[:, S:].tolist()
    want = [row[:row.index(eos) + 1] if eos in row else row for row in hf]
    assert (eos in want[1] and len(want[1]) < n == len(want[0])) == (eos_scale == 2.0)
    for graph_decode in (False, True):
        with omni_fast.use_backend("reference"):
            out = pipe.generate(reqs, max_new_tokens=n, talker_max_new_tokens=3, graph_decode=graph_decode)
        assert [o["token_ids"] for o in out] == want
        assert max(o["timing"].frames for o in out) <= 2 < max(len(w) for w in want)  # the tail ran
        assert all(o["timing"].thinker_tokens_per_s > 0 for o in out)


def test_pipeline_graph_decode_multimodal_fractional_positions():
    """A batch of an image + 3 fps video prompt (fractional TM-RoPE positions: the whole batch decodes with float
    positions through the PyTorch RoPE) and an audio prompt (rope deltas != 0): same text ids, codes and audio."""
    import math

    import omni_fast
    from omni_fast.models.qwen3_omni import Qwen3Omni, Request

    pipe = Qwen3Omni.random("tiny", patch=False, seed=3)
    g = torch.Generator().manual_seed(0)
    t = torch.arange(16000) / 16000
    wave = 0.3 * torch.sin(2 * math.pi * 180 * t) + 0.01 * torch.randn(t.shape, generator=g)
    reqs = [Request(text=[5, 6], image=torch.rand(3, 32, 64, generator=g),
                    video=torch.rand(5, 3, 64, 32, generator=g), video_fps=3.0),
            Request(text=[7], audio=wave)]
    kw = dict(max_new_tokens=5, talker_max_new_tokens=5, first_chunk=300, chunk=300)
    with omni_fast.use_backend("reference"):  # plumbing: the kernels are compared with transformers above
        want = pipe.generate(reqs, graph_decode=False, **kw)
        got = pipe.generate(reqs, graph_decode=True, **kw)
    assert pipe._decoders["thinker"][1][0][0]._state.pos.is_floating_point()
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]
    for a, b in zip(got, want):
        assert a["audio"].numel() > 0
        torch.testing.assert_close(a["audio"], b["audio"], rtol=0, atol=0)


def test_patched_pipeline_graph_decode_on_pinned_backend():
    """Patched with a pinned backend: graph decode is off by default on a CPU, and on (eager, same body) it uses the
    pinned backend and gives the same text ids and audio as the patched pipeline's transformers decode."""
    import omni_fast
    from omni_fast.models.qwen3_omni import Qwen3Omni, Request

    base = Qwen3Omni.random("tiny", patch=False, seed=2)
    patched = Qwen3Omni(base.model, patch=True, tokenizer=base.tokenizer, backend="reference")
    try:
        reqs = [Request(text=[7, 8, 9]), Request(text=[21, 22, 23, 24])]
        kw = dict(max_new_tokens=5, talker_max_new_tokens=5, first_chunk=300, chunk=300)
        want = patched.generate(reqs, **kw)
        assert not patched._decoders  # default on a CPU: transformers' decode
        got = patched.generate(reqs, graph_decode=True, **kw)
        assert patched._decoders["thinker"][1][0][0].backend == "reference"
        again = patched.generate(reqs, graph_decode=True, **kw)  # decoders (and their buffers) are reused
    finally:
        omni_fast.unpatch(base.model)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want] == [o["token_ids"] for o in again]
    for a, b in zip(got, want):
        torch.testing.assert_close(a["audio"], b["audio"], rtol=0, atol=0)


# --- GPU: CUDA-graph replay, bf16, real shapes ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("part", ["thinker", "talker"])
@pytest.mark.parametrize("B", [1, 3])
def test_graph_replay_equals_eager(part, B):
    """The captured step replays what the eager body computes (same kernels, same buffers: expected bitwise; the
    bound allows for a cuBLAS algorithm choice that differs under capture)."""
    m, head = _model(part, dtype=torch.bfloat16, device="cuda")
    mask = _left_padded([6, 3, 5][:B], 6)
    pos3 = _text_positions(mask)
    runs = []
    for use_graph in (False, True):
        cache = _prefill(m, mask, pos3)
        dec = MoeTextDecoder.from_transformers(m, head, backend="triton")
        dec.load_prefill(cache, mask.cuda(), max_new_tokens=6, use_graph=use_graph)
        assert (dec._state.graph is not None) == use_graph
        g = torch.Generator().manual_seed(0)
        outs = []
        for s in range(4):
            e = torch.randn(B, m.config.hidden_size, generator=g).cuda().bfloat16()
            outs.append(dec.step(e, (pos3[0, :, -1] + 1 + s).cuda()))
        runs.append(outs)
    for (le, he), (lg, hg) in zip(*runs):
        assert torch.equal(lg.argmax(-1), le.argmax(-1))
        torch.testing.assert_close(lg, le)
        torch.testing.assert_close(hg, he)


@pytest.mark.gpu
def test_graph_decode_matches_transformers_fp32_cuda(monkeypatch):
    """fp32 on CUDA: graph replay against transformers' forward (TF32 off; the kernels use IEEE fp32 dots)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    m, head = _model("talker", device="cuda")
    mask = _left_padded([6, 3], 6)
    pos3 = _text_positions(mask, rows=(0, 1, 2))
    cache = _prefill(m, mask, pos3)
    dec = MoeTextDecoder.from_transformers(m, head, backend="triton")
    dec.load_prefill(cache, mask.cuda(), max_new_tokens=4)
    assert dec._state.graph is not None
    _compare(m, head, dec, mask, pos3, cache, steps=3, tol=dict(rtol=1e-4, atol=1e-4))


@pytest.mark.gpu
def test_real_shapes_graph_bf16():
    """The thinker's real layer shapes (hidden 2048, 32/4 heads, 128 experts top-8; 2 layers) in bf16: graph replay
    vs transformers' forward. Loose: bf16 rounding differs (flash vs SDPA attention), and a token whose 8th and 9th
    router logits are within a rounding of each other may pick another expert; the fp32 tests are the exact ones."""
    from omni_fast.models.presets import full_qwen3_omni_config

    cfg = full_qwen3_omni_config(thinker_layers=2).thinker_config.text_config
    with torch.device("cuda"):
        m = q3.Qwen3OmniMoeThinkerTextModel._from_config(cfg, dtype=torch.bfloat16).eval()
        head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=torch.bfloat16)
    mask = _left_padded([40, 17], 40)
    pos3 = _text_positions(mask)
    cache = _prefill(m, mask, pos3)
    dec = MoeTextDecoder.from_transformers(m, head)
    dec.load_prefill(cache, mask.cuda(), max_new_tokens=8)
    g = torch.Generator().manual_seed(0)
    nxt = pos3[:, :, -1].cuda() + 1
    full = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1).cuda()
    e = torch.randn(2, cfg.hidden_size, generator=g).cuda().bfloat16()
    logits, hidden = dec.step(e, nxt[0])
    with torch.no_grad():
        o = m(inputs_embeds=e[:, None], attention_mask=full, position_ids=nxt[:, :, None], **with_cache(cache),
              use_cache=True)
    err = (hidden.float() - o.last_hidden_state[:, -1].float()).norm() / o.last_hidden_state[:, -1].float().norm()
    assert err < 0.1, err
    assert torch.isfinite(logits).all()


@pytest.mark.gpu
def test_pipeline_graph_decode_cuda(monkeypatch):
    """The tiny pipeline on CUDA in fp32: graph decode gives transformers' greedy text ids, codes and audio, with
    the text tail after the speech budget; patched, graph decode is the default."""
    import omni_fast
    from omni_fast.models.qwen3_omni import Qwen3Omni, Request

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    pipe = Qwen3Omni.random("tiny", patch=False, device="cuda", dtype=torch.float32)
    reqs = [Request(text=[5, 6, 7, 8, 9]), Request(text=[11, 12])]
    for kw in (dict(max_new_tokens=6, talker_max_new_tokens=6), dict(max_new_tokens=9, talker_max_new_tokens=3)):
        kw.update(first_chunk=300, chunk=300)
        want = pipe.generate(reqs, graph_decode=False, **kw)
        got = pipe.generate(reqs, graph_decode=True, **kw)
        assert pipe._decoders["thinker"][1][0][0]._state.graph is not None
        assert pipe._decoders["talker"][1][0][0]._state.graph is not None
        assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]
        for a, b in zip(got, want):
            torch.testing.assert_close(a["audio"], b["audio"])
    patched = Qwen3Omni(pipe.model, tokenizer=pipe.tokenizer)  # patch=True
    try:
        eager = patched.generate(reqs, graph_decode=False, **kw)
        assert not patched._decoders
        default = patched.generate(reqs, **kw)
        assert patched._decoders["thinker"][1][0][0]._state.graph is not None
    finally:
        omni_fast.unpatch(pipe.model)
    assert [o["token_ids"] for o in default] == [o["token_ids"] for o in eager]



def test_reorder_rows_moves_each_rows_cache():
    """reorder_rows (beam search's cache reorder): after index [1, 0] row 0 continues from row 1's tokens, exactly
    as row 1 would have; [0, 0] duplicates a row; bad indices name the argument."""
    m, dec = _talker_rows_4_2(3)
    e, pos = torch.randn(2, m.config.hidden_size), torch.tensor([4, 2])
    before = dec.step(e, pos)[0]
    dec.rewind(1)
    dec.reorder_rows(torch.tensor([1, 0]))
    assert dec.cache_seqlens.tolist() == [2, 4]
    swapped = dec.step(e.flip(0), pos.flip(0))[0]
    # (not bit for bit: the experts group the rows in another order; a wrong cache would be off by O(1))
    torch.testing.assert_close(swapped, before.flip(0), rtol=1e-5, atol=1e-5)
    dec.rewind(1)
    dec.reorder_rows(torch.tensor([0, 0]))  # both rows now hold the old row 1
    assert dec.cache_seqlens.tolist() == [2, 2]
    for bad in (torch.tensor([0]), torch.tensor([0.0, 1.0]), [0, 1]):
        with pytest.raises(ValueError, match="index"):
            dec.reorder_rows(bad)
