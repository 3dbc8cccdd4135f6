"""MoeTextDecoder(fused=True): the decode step as 3 phase-fused launches per layer (kernels/talker_fused.py).

CPU (interpreter): greedy tokens identical to the ops path (logits equal up to fp32 summation order) on a tiny
talker with the real structure (top-k 3 of 8 experts, sigmoid-gated shared expert, GQA 4/2 heads, general TM-RoPE
rows), batch 3 in bucket 4 with per-row cache lengths; per-row batch invariance (bit-exact); the arrival counters
back at zero; unsupported configs refused; 3 Triton launches per layer (counted). gpu: real-config bf16 B = 1 / 8
against the ops path, and CUDA-graph replay = eager.
"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from omni_fast.models.text_decoder import MoeTextDecoder  # noqa: E402

from test_text_decoder import _left_padded, _model, _prefill, _text_positions  # noqa: E402

TALKER = dict(num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=3)


def _decoders(m, head, mask, pos3, fused_flags=(False, True), backend="triton", max_new_tokens=4, **kw):
    out = []
    for fused in fused_flags:
        dec = MoeTextDecoder.from_transformers(m, head, backend=backend, fused=fused)
        dec.load_prefill(_prefill(m, mask, pos3), mask, max_new_tokens=max_new_tokens, **kw)
        out.append(dec)
    return out


def _steps(decs, B, H, pos, steps, seed=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    outs = [[] for _ in decs]
    for _ in range(steps):
        e = torch.randn(B, H, generator=g).to(dtype)
        for o, d in zip(outs, decs):
            o.append(d.step(e, pos))
        pos = pos + 1
    return outs


@pytest.mark.parametrize("max_new_tokens", [4, 1100])
def test_fused_step_matches_ops_path_greedy_tokens(max_new_tokens):
    """Batch 3 (bucket 4), left padding (cache lengths 6 / 3 / 5), three different TM-RoPE rows, 3 steps: the
    greedy tokens are identical, logits and hidden equal up to summation order; the counters end at zero. A cache
    of 1152 takes 2 attention splits (the second one empty: weight 0), in one step: every step runs the same split
    layout (the keys stay in the first split), and the steps' carry is the 4-token case's."""
    steps = 3 if max_new_tokens == 4 else 1
    m, head = _model("talker", seed=3, **TALKER)
    mask = _left_padded([6, 3, 5], 6)
    pos3 = _text_positions(mask, rows=(0, 1, 3))
    ops, fused = _decoders(m, head, mask, pos3, max_new_tokens=max_new_tokens)
    assert fused._state.fused.attn_part.shape[2] == (1 if max_new_tokens == 4 else 2)
    want, got = _steps([ops, fused], 3, m.config.hidden_size, pos3[:, :, -1] + 1, steps=steps)
    for (lw, hw), (lg, hg) in zip(want, got):
        assert torch.equal(lg.argmax(-1), lw.argmax(-1))
        torch.testing.assert_close(lg, lw, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(hg, hw, rtol=1e-5, atol=2e-5)
    assert fused.cache_seqlens.tolist() == [6 + steps, 3 + steps, 5 + steps]
    ws = fused._state.fused
    assert ws.counters.abs().sum().item() == ws.head_counters.abs().sum().item() == 0  # reset by the last programs
    # the KV caches hold the same keys / values
    for (kc, vc), (kf, vf) in zip(ops._state.caches, fused._state.caches):
        torch.testing.assert_close(kf[:3, :6 + steps], kc[:3, :6 + steps], rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(vf[:3, :6 + steps], vc[:3, :6 + steps], rtol=1e-5, atol=2e-5)


def test_fused_step_long_cache_two_splits():
    """700 / 300 cached tokens in a 1152-token cache: row 0's keys span both attention splits (merged by their
    lse), row 1's only the first."""
    m, head = _model("talker", seed=8, **TALKER)
    mask = _left_padded([700, 300], 700)
    pos3 = _text_positions(mask)
    ops, fused = _decoders(m, head, mask, pos3, max_new_tokens=400)
    assert fused._state.fused.attn_part.shape[2] == 2
    (lw, hw), (lg, hg) = (o[0] for o in _steps([ops, fused], 2, m.config.hidden_size, pos3[0, :, -1] + 1, 1))
    assert torch.equal(lg.argmax(-1), lw.argmax(-1))
    torch.testing.assert_close(lg, lw, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(hg, hw, rtol=1e-5, atol=2e-5)


def test_fused_step_two_row_tiles():
    """B = 17 (bucket 32): the qkv phase's programs span two 16-row tiles, each with its own head counters."""
    m, head = _model("talker", seed=9, **TALKER)
    mask = _left_padded([3 + i % 4 for i in range(17)], 6)
    pos3 = _text_positions(mask)
    ops, fused = _decoders(m, head, mask, pos3)
    assert fused._state.fused.head_counters.numel() == 2 * (4 + 2 * 2)
    (lw, hw), (lg, hg) = (o[0] for o in _steps([ops, fused], 17, m.config.hidden_size, pos3[0, :, -1] + 1, 1))
    assert torch.equal(lg.argmax(-1), lw.argmax(-1))
    torch.testing.assert_close(lg, lw, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(hg, hw, rtol=1e-5, atol=2e-5)
    assert fused._state.fused.head_counters.abs().sum().item() == 0


def test_fused_step_thinker_without_shared_expert():
    """The thinker's decoder (no shared expert, top-2) takes the same fused step."""
    m, head = _model("thinker", seed=10)
    mask = _left_padded([4, 2], 4)
    pos3 = _text_positions(mask, rows=(0, 2, 1))
    ops, fused = _decoders(m, head, mask, pos3)
    assert fused._state.fused is not None and getattr(m.layers[0].mlp, "shared_expert", None) is None
    (lw, hw), (lg, hg) = (o[0] for o in _steps([ops, fused], 2, m.config.hidden_size, pos3[0, :, -1] + 1, 1))
    assert torch.equal(lg.argmax(-1), lw.argmax(-1))
    torch.testing.assert_close(lg, lw, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(hg, hw, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_recorded_layer_outputs_are_transformers_hidden_states(fused):
    """``record_layers={i}``: each step keeps the residual after layer i - 1, transformers' ``hidden_states[i]``
    (what the decode takeover hands generate); ops path and fused step, 3 layers, left-padded batch of 2."""
    from transformers import DynamicCache

    from omni_fast.integrations.hf_compat import with_cache

    m, head = _model("talker", seed=4, num_hidden_layers=3, **TALKER)
    mask = _left_padded([4, 2], 4)
    pos3 = _text_positions(mask)
    dec = MoeTextDecoder.from_transformers(m, head, backend="triton", fused=fused)
    dec.record_layers = frozenset({1, 2})
    dec.load_prefill(_prefill(m, mask, pos3), mask, max_new_tokens=2)
    e = torch.randn(2, 1, m.config.hidden_size, generator=torch.Generator().manual_seed(6))
    pos = pos3[:, :, -1:] + 1
    _, hidden = dec.step(e[:, 0], pos[:, :, 0])
    cache = DynamicCache(config=m.config)  # transformers: the same prefill, then the same token
    with torch.no_grad():
        m(inputs_embeds=torch.randn(2, 4, m.config.hidden_size, generator=torch.Generator().manual_seed(1)),
          attention_mask=mask, position_ids=pos3, use_cache=True, **with_cache(cache))
        out = m(inputs_embeds=e, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                position_ids=pos, use_cache=True, output_hidden_states=True, **with_cache(cache))
    for i in (1, 2):
        torch.testing.assert_close(dec.recorded(i), out.hidden_states[i][:, 0], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(hidden, out.hidden_states[3][:, 0], rtol=1e-5, atol=2e-5)
    with pytest.raises(KeyError, match="not recorded"):
        dec.recorded(3)
    dec.record_layers = frozenset({3})  # N is the step's hidden, 0 its input: nothing to record
    with pytest.raises(ValueError, match="record_layers"):
        dec.load_prefill(_prefill(m, mask, pos3), mask)


def test_fused_step_fp16_greedy_tokens():
    """fp16 (the interpreter upcasts the dots): greedy tokens as the ops path, logits within fp16 rounding."""
    m, head = _model("talker", seed=4, dtype=torch.float16, **TALKER)
    mask = _left_padded([4, 2], 4)
    pos3 = _text_positions(mask)
    ops, fused = _decoders(m, head, mask, pos3)
    want, got = _steps([ops, fused], 2, m.config.hidden_size, pos3[0, :, -1] + 1, steps=2, dtype=torch.float16)
    for (lw, _), (lg, _) in zip(want, got):
        torch.testing.assert_close(lg.float(), lw.float(), rtol=1e-2, atol=1e-2)
        top2 = lw.float().topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2e-2  # rows whose argmax is not a near-tie in fp16
        assert torch.equal(lg.argmax(-1)[clear], lw.argmax(-1)[clear])


def test_fused_step_rows_are_batch_invariant():
    """Row 1 of a batch of 3 equals the same row decoded alone, bit for bit (each row is computed by its own
    programs with batch-independent instructions)."""
    m, head = _model("talker", seed=6, **TALKER)
    mask = _left_padded([5, 3, 4], 5)
    pos3 = _text_positions(mask)
    cache = _prefill(m, mask, pos3)
    batch = MoeTextDecoder.from_transformers(m, head, backend="triton", fused=True)
    batch.load_prefill(cache, mask, max_new_tokens=4)
    # the same prompt's KV for row 1 alone (bucket 1 instead of 4)
    row = SimpleNamespace(layers=[SimpleNamespace(keys=lay.keys[1:2], values=lay.values[1:2]) for lay in cache.layers])
    alone = MoeTextDecoder.from_transformers(m, head, backend="triton", fused=True)
    alone.load_prefill(row, mask[1:2], max_new_tokens=4)
    g = torch.Generator().manual_seed(7)
    pos = pos3[0, :, -1] + 1
    for _ in range(2):
        e = torch.randn(3, m.config.hidden_size, generator=g)
        lb, hb = batch.step(e, pos)
        la, ha = alone.step(e[1:2], pos[1:2])
        assert torch.equal(hb[1:2], ha)
        assert torch.equal(lb[1:2], la)
        pos = pos + 1


def test_fused_flag_validation_and_fallbacks():
    m, head = _model("talker", seed=3)
    with pytest.raises(TypeError, match="fused"):
        MoeTextDecoder.from_transformers(m, head, fused="yes")
    dense, dhead = _model("thinker", seed=5, mlp_only_layers=[0])
    with pytest.raises(ValueError, match="fused=True.*layer 0 is dense"):
        MoeTextDecoder.from_transformers(dense, dhead, fused=True)
    mask = _left_padded([3, 2], 3)
    pos3 = _text_positions(mask)
    # the reference backend and fractional positions keep the ops path
    (ref,) = _decoders(m, head, mask, pos3, fused_flags=(True,), backend="reference")
    assert ref._state.fused is None
    (frac,) = _decoders(m, head, mask, pos3, fused_flags=(True,), fractional_positions=True)
    assert frac._state.fused is None
    (on,) = _decoders(m, head, mask, pos3, fused_flags=(True,))
    assert on._state.fused is not None


def test_three_launches_per_layer():
    """Counted (the cost model's counter): 3 Triton launches per layer + the final norm and head, no host sync;
    today's path ~16 Triton launches and ~7 torch ops per layer."""
    from omni_fast.bench.costmodel.counter import summarize, trace

    m, head = _model("talker", seed=3, **TALKER)
    mask = _left_padded([3, 2], 3)
    pos3 = _text_positions(mask)
    counts = {}
    for dec in _decoders(m, head, mask, pos3):
        e, pos = torch.randn(2, m.config.hidden_size), pos3[0, :, -1] + 1

        def step(dec=dec, e=e, pos=pos):
            dec.step(e, pos)
            dec.rewind(1)

        tr = trace(step)
        assert tr.syncs == 0  # no host sync: graph-capturable (the gpu test captures it)
        counts[dec.fused] = tr.launches()
    L = len(m.layers)
    fused = counts[True]
    assert fused["triton:qkv_phase_kernel"] == fused["triton:attn_phase_kernel"] == L
    assert fused["triton:moe_phase_kernel"] == L
    assert summarize(fused)["triton"] == 3 * L + 2  # + the final RMSNorm and the head GEMV
    assert summarize(counts[False])["triton"] > 10 * L


# --- GPU ---------------------------------------------------------------------------------------------------------


def _real_talker(device, layers=4, tiny=False, part="talker"):
    from omni_fast.bench.cases.decode import _build, _prefill as bench_prefill

    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: F401

    m, head = _build(part, device, tiny=tiny, dtype=torch.float32 if tiny else torch.bfloat16,
                     layers=layers if part == "thinker" else None)
    m.layers = m.layers[:layers]  # the real layer shapes; decode is per-layer linear
    m.config.num_hidden_layers = layers
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = m.config.layer_types[:layers]
    return m, head, bench_prefill


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 8])
def test_gpu_real_config_bf16_matches_ops_path(B):
    """The real talker layer shapes in bf16 (4 of 20 layers, prompt 1200 with left padding in a 2240-token cache: 4
    attention splits, the keys in 3 of them): greedy tokens as the ops path except near-ties, logits and hidden
    within bf16 rounding (relative norm; loose like the thinker's bf16 test: a router near-tie may flip an expert),
    over 3 steps."""
    _check_real_config("talker", B)


@pytest.mark.gpu
def test_gpu_thinker_real_config_bf16_matches_ops_path():
    """The same on the real thinker layer shapes (4 of 48 layers: H 2048, 32 / 4 heads, 128 experts top-8, no
    shared expert; the fast path fused_step runs the thinker's decoder too), B = 1."""
    _check_real_config("thinker", 1)


def _check_real_config(part, B):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device("cuda")
    m, head, prefill = _real_talker(dev, part=part)
    decs = []
    for fused in (False, True):
        torch.manual_seed(0)  # the same prompt (the bench prefill draws random embeddings) for both decoders
        cache, mask, nxt = prefill(m, B, 1200)
        dec = MoeTextDecoder.from_transformers(m, head, fused=fused)
        dec.load_prefill(cache, mask, max_new_tokens=1000, use_graph=False)
        decs.append(dec)
    g = torch.Generator(device=dev).manual_seed(0)
    for _ in range(3):
        e = torch.randn(B, m.config.hidden_size, device=dev, generator=g).to(torch.bfloat16)
        (lw, hw), (lg, hg) = (d.step(e, nxt[0]) for d in decs)
        for got, want in ((lg, lw), (hg, hw)):
            err = (got.float() - want.float()).norm() / want.float().norm()
            assert err < 0.1, err
        top2 = lw.float().topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.02 * lw.float().abs().max()
        assert torch.equal(lg.argmax(-1)[clear], lw.argmax(-1)[clear])
        nxt = nxt + 1
    ws = decs[1]._state.fused
    assert ws.attn_part.shape[2] == 4
    assert ws.counters.abs().sum().item() == ws.head_counters.abs().sum().item() == 0


def _two_fused_steps(m, head, prefill, dev, use_graph: bool):
    """A fused decoder on the bench prefill (B = 8, prompt 64, seeded) and its outputs of two bf16 steps:
    ``(decoder, [(logits, hidden), ...])``."""
    torch.manual_seed(0)
    cache, mask, nxt = prefill(m, 8, 64)
    dec = MoeTextDecoder.from_transformers(m, head, fused=True)
    dec.load_prefill(cache, mask, max_new_tokens=4, use_graph=use_graph)
    g = torch.Generator(device=dev).manual_seed(1)
    res = []
    for _ in range(2):
        e = torch.randn(8, m.config.hidden_size, device=dev, generator=g).to(torch.bfloat16)
        res.append(dec.step(e, nxt[0]))
        nxt = nxt + 1
    return dec, res


@pytest.mark.gpu
def test_gpu_fused_graph_replay_equals_eager():
    """The fused step captured in a CUDA graph (static shapes, no host sync) replays to the eager result."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device("cuda")
    m, head, prefill = _real_talker(dev, layers=2)
    outs = []
    for use_graph in (False, True):
        dec, res = _two_fused_steps(m, head, prefill, dev, use_graph)
        assert (dec._state.graph is not None) == use_graph
        outs.append(res)
    for (le, he), (lg, hg) in zip(*outs):
        assert torch.equal(le, lg) and torch.equal(he, hg)


def test_pdl_is_off_where_it_cannot_run():
    """PDL (opt-in fast path fused_pdl, OMNI_FAST_PDL=1) never reaches a launch on the CPU interpreter or a
    non-CUDA device: the phases keep their plain launch (and the interpreter never sees griddepcontrol)."""
    from omni_fast.kernels.launch import pdl_meta

    assert pdl_meta(True, torch.device("cpu")) == {"PDL": False}
    assert pdl_meta(False, torch.device("cpu")) == {"PDL": False}


@pytest.mark.gpu
def test_gpu_pdl_phases_equal_plain_launches(fast_path):
    """The three phases launched with programmatic dependent launch (sm_90+) give bit-identical logits and hidden
    states to plain launches, eager and graph-replayed (PDL changes when a kernel starts, never what it computes:
    each phase waits for the previous kernel before touching memory); the counters end at zero."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs an sm_90+ GPU")
    dev = torch.device("cuda")
    m, head, prefill = _real_talker(dev, layers=2)
    outs = []
    for pdl, use_graph in ((False, False), (True, False), (True, True)):
        fast_path("fused_pdl", pdl)
        dec, res = _two_fused_steps(m, head, prefill, dev, use_graph)
        ws = dec._state.fused
        assert ws.counters.abs().sum().item() == ws.head_counters.abs().sum().item() == 0
        outs.append(res)
    for other in outs[1:]:
        for (lw, hw), (lg, hg) in zip(outs[0], other):
            assert torch.equal(lw, lg) and torch.equal(hw, hg)
