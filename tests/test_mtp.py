"""MTP code predictor: greedy codes and next input equal transformers' generate loop; same seed -> same codes on
every backend; per-row batch invariance; TalkerStep equals the Talker's prepare_inputs_for_generation; bad input;
CUDA-graph replay (gpu)."""

import pytest
import torch

from omni_fast.models import CodePredictor, TalkerStep, install_on_talker
from omni_fast.ops import mtp_layers
from omni_fast.testing import DEVICE, KERNEL_DTYPES, assert_matches_reference

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as q3  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (  # noqa: E402
    Qwen3OmniMoeTalkerCodePredictorConfig, Qwen3OmniMoeTalkerConfig)

from omni_fast.integrations.hf_compat import with_cache  # noqa: E402

TINY = [
    dict(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, head_dim=16, num_code_groups=5),
    dict(vocab_size=24, hidden_size=48, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
         num_key_value_heads=2, head_dim=24, num_code_groups=4),
]


def _hf_predictor(i, dtype=torch.float64, seed=0):
    cfg = Qwen3OmniMoeTalkerCodePredictorConfig(**TINY[i], rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 1e6})
    torch.manual_seed(seed)
    m = q3.Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration(cfg).to(dtype).eval()
    emb = torch.nn.Embedding(cfg.vocab_size + 7, cfg.hidden_size).to(dtype)
    with torch.no_grad():
        for p in list(m.parameters()) + list(emb.parameters()):
            p.normal_(0, 0.3)
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(1.0)
    return m, emb


@torch.no_grad()
def _hf_frame(m, emb, h, c0):
    """What Qwen3OmniMoeTalkerForConditionalGeneration.prepare_inputs_for_generation does for one frame."""
    G = m.config.num_code_groups
    last_id_hidden = emb(c0[:, None])
    r = m.generate(inputs_embeds=torch.cat((h[:, None], last_id_hidden), 1), max_new_tokens=G - 1, do_sample=False,
                   output_hidden_states=True, return_dict_in_generate=True)
    mids = [hid[0] for hid in r.hidden_states[1:]]
    last = m.get_input_embeddings()[-1](r.sequences[..., -1:])
    return r.sequences, torch.cat([last_id_hidden] + mids + [last], 1).sum(1)


@pytest.mark.parametrize("i", range(len(TINY)))
def test_greedy_matches_transformers_generate(i):
    m, emb = _hf_predictor(i)
    cp = CodePredictor.from_transformers(m, emb)
    g = torch.Generator().manual_seed(i)
    H = m.config.hidden_size
    for trial in range(20):
        B = (1, 3, 5, 8)[trial % 4]
        h = torch.randn(B, H, generator=g, dtype=torch.float64) * 2
        c0 = torch.randint(0, emb.num_embeddings, (B,), generator=g)
        want_codes, want_next = _hf_frame(m, emb, h, c0)
        codes, nxt = cp.predict_frame(h, c0, do_sample=False, backend="reference")
        assert torch.equal(codes[:, 0], c0)
        assert torch.equal(codes[:, 1:], want_codes), trial
        torch.testing.assert_close(nxt, want_next, rtol=1e-12, atol=1e-12)


def test_fp32_predictor_matches_transformers_and_triton():
    m, emb = _hf_predictor(0, torch.float32, seed=1)
    cp = CodePredictor.from_transformers(m, emb)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(4, 64, generator=g) * 2
    c0 = torch.randint(0, emb.num_embeddings, (4,), generator=g)
    want_codes, want_next = _hf_frame(m, emb, h, c0)
    ref_codes, ref_next = cp.predict_frame(h, c0, do_sample=False, backend="reference")
    assert torch.equal(ref_codes[:, 1:], want_codes)
    torch.testing.assert_close(ref_next, want_next, rtol=1e-5, atol=1e-5)
    cp_dev = CodePredictor.from_state_dict(m.config, m.state_dict(), codec_embedding=emb, device=DEVICE)
    tri_codes, tri_next = cp_dev.predict_frame(h.to(DEVICE), c0.to(DEVICE), do_sample=False, backend="triton",
                                           use_graph=False)
    assert torch.equal(tri_codes.cpu(), ref_codes)
    torch.testing.assert_close(tri_next.cpu(), ref_next, rtol=1e-5, atol=1e-5)


def test_same_seed_same_codes_across_backends_and_batch_sizes():
    m, emb = _hf_predictor(1, torch.float32, seed=2)
    cp = CodePredictor.from_transformers(m, emb)
    g = torch.Generator().manual_seed(9)
    h = torch.randn(3, 48, generator=g) * 3
    c0 = torch.randint(0, emb.num_embeddings, (3,), generator=g)
    kw = dict(do_sample=True, top_k=8, top_p=0.9, temperature=0.9, seed=123)
    ref_codes, _ = cp.predict_frame(h, c0, backend="reference", **kw)
    cp_dev = CodePredictor.from_state_dict(m.config, m.state_dict(), codec_embedding=emb, device=DEVICE)
    tri_codes, _ = cp_dev.predict_frame(h.to(DEVICE), c0.to(DEVICE), backend="triton", use_graph=False, **kw)
    assert torch.equal(ref_codes, tri_codes.cpu())
    part, _ = cp.predict_frame(h[:2], c0[:2], backend="reference", **kw)
    assert torch.equal(part, ref_codes[:2])
    again, _ = cp.predict_frame(h, c0, backend="reference", **kw)
    assert torch.equal(again, ref_codes)
    # Per-row seeds: a row's codes depend on its own seed only (not on its place in the batch), so row i with seed s
    # equals the frame alone with seed s, and equal seeds in two rows with equal inputs give equal codes.
    seeds = torch.tensor([123, 5, 9])
    per_row, _ = cp.predict_frame(h, c0, backend="reference", **{**kw, "seed": seeds})
    for i in range(3):
        alone, _ = cp.predict_frame(h[i:i + 1], c0[i:i + 1], backend="reference", **{**kw, "seed": int(seeds[i])})
        assert torch.equal(per_row[i:i + 1], alone), i
    assert torch.equal(per_row[0], ref_codes[0])  # row 0 of a shared seed = that seed alone
    twice, _ = cp.predict_frame(h[[1, 1]], c0[[1, 1]], backend="reference", **{**kw, "seed": torch.tensor([5, 5])})
    assert torch.equal(twice[0], twice[1]) and torch.equal(twice[0], per_row[1])


def _batch_invariance(dtype, device):
    m, emb = _hf_predictor(1, torch.float32, seed=6)
    cp = CodePredictor.from_state_dict(m.config, m.state_dict(), codec_embedding=emb, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(8)
    h = (torch.randn(5, 48, generator=g) * 2).to(device, dtype)
    c0 = torch.randint(0, emb.num_embeddings, (5,), generator=g).to(device)
    seeds = torch.tensor([3, 40, 41, 3, 1000], device=device)
    for kw, rows in ((dict(do_sample=False), (3,)), (dict(do_sample=True, top_k=10, top_p=0.9), (0, 3))):
        kw = dict(kw, backend="triton", use_graph=False)
        codes, nxt = cp.predict_frame(h, c0, seed=seeds, **kw)
        for i in rows:  # the frame alone (B = 1, its own seed) = its row of the batch of 5, bit for bit
            c1, n1 = cp.predict_frame(h[i:i + 1], c0[i:i + 1], seed=seeds[i:i + 1], **kw)
            assert torch.equal(c1, codes[i:i + 1]), (i, kw)
            assert torch.equal(n1, nxt[i:i + 1]), (i, kw)


def test_frame_rows_are_batch_invariant_triton():
    """A frame run alone (B=1) and as row i of B=5 gives bit-identical codes and next_input on the triton backend
    (greedy, and sampling with per-row seeds): the GEMVs' tile config does not depend on the batch (fp32 here: the
    interpreter is slow; fp16 rows of every GEMV form in test_mtp_gemv.py; bf16 in the gpu test)."""
    _batch_invariance(torch.float32, DEVICE)


@pytest.mark.gpu
def test_gpu_frame_rows_are_batch_invariant_bf16():
    _batch_invariance(torch.bfloat16, "cuda")


def test_graph_buckets_emulated_on_cpu():
    """The bucket path (static buffers, padding to 1/2/4/.../64, 128 above) equals the eager frame."""
    m, emb = _hf_predictor(1, torch.float32, seed=4)
    cp = CodePredictor.from_transformers(m, emb)
    g = torch.Generator().manual_seed(1)
    for B in (3, 1, 70, 3):
        h = torch.randn(B, 48, generator=g)
        c0 = torch.randint(0, emb.num_embeddings, (B,), generator=g)
        for kw in (dict(do_sample=False), dict(seed=21), dict(seed=torch.arange(B) * 7)):
            eager = cp.predict_frame(h, c0, use_graph=False, backend="reference", **kw)
            graph = cp.predict_frame(h, c0, use_graph=True, backend="reference", **kw)
            assert torch.equal(eager[0], graph[0]), (B, kw)
            torch.testing.assert_close(eager[1], graph[1], rtol=0, atol=0)


def test_graph_frame_under_inference_mode_then_outside_it():
    """A frame graph's static buffers made under torch.inference_mode() cannot be written outside it ('Inplace
    update to inference tensor'): a frame outside after one inside (a patched talker's generate under inference_mode,
    then a plain one) crashed on CUDA. Checked through the CPU emulation of the graph path."""
    m, emb = _hf_predictor(1, torch.float32, seed=4)
    cp = CodePredictor.from_transformers(m, emb)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 48, generator=g)
    c0 = torch.randint(0, emb.num_embeddings, (2,), generator=g)
    want = cp.predict_frame(h, c0, use_graph=False, backend="reference", do_sample=False)
    for inference in (True, False, True):
        with torch.inference_mode(inference):
            got = cp.predict_frame(h, c0, use_graph=True, backend="reference", do_sample=False)
        assert torch.equal(got[0], want[0]), inference
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_graph_frames_from_threads_do_not_mix():
    """Requests of several server threads share the code predictor: a frame's copy into the graph's static inputs,
    its replay and the copy of its outputs now happen as one (ReplayGuard); before, another thread's copy-in landed
    in between and a request got the other's codes (CPU emulation of the graph path; ~0.3 s)."""
    from _thread_helpers import run_threads

    m, emb = _hf_predictor(1, torch.float32, seed=4)
    cp = CodePredictor.from_transformers(m, emb)
    g = torch.Generator().manual_seed(3)
    hs = [torch.randn(2, 48, generator=g) for _ in range(2)]
    c0s = [torch.randint(0, emb.num_embeddings, (2,), generator=g) for _ in range(2)]
    want = [cp.predict_frame(h, c, use_graph=False, backend="reference", do_sample=False) for h, c in zip(hs, c0s)]
    mixed = []

    def work(i):
        for _ in range(20):
            got = cp.predict_frame(hs[i], c0s[i], use_graph=True, backend="reference", do_sample=False)
            mixed.append(not torch.equal(got[0], want[i][0]))

    assert run_threads(work) == []
    assert len(mixed) == 40 and not any(mixed)
    assert len(cp._graphs) == 1


def test_graphs_dropped_when_weights_move_or_change():
    """A captured frame reads the weights by address: after an in-place update, a .to(dtype) or a reload the cached
    graphs are dropped and re-captured (checked through the CPU emulation: new graph objects, eager results)."""
    m, emb = _hf_predictor(1, torch.float32, seed=4)
    cp = CodePredictor.from_transformers(m, emb)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 48, generator=g)
    c0 = torch.randint(0, emb.num_embeddings, (3,), generator=g)
    kw = dict(do_sample=False, backend="reference")

    def check():
        eager = cp.predict_frame(h, c0, use_graph=False, **kw)
        graph = cp.predict_frame(h, c0, use_graph=True, **kw)
        assert torch.equal(eager[0], graph[0]) and torch.equal(eager[1], graph[1])
        assert graph[1].dtype == cp.table.dtype and len(cp._graphs) == 1
        return next(iter(cp._graphs.values()))

    first = check()
    assert check() is first  # unchanged weights: the same graph replays
    with torch.no_grad():
        cp.lm_head.mul_(-1.0)  # in place: same storage, new version
    assert check() is not first
    cp.double()  # new dtype and storage
    second = check()
    cp.load_state_dict(cp.state_dict())  # copies in place (a reload)
    assert check() is not second


def test_frame_compiles_fullgraph():
    m, emb = _hf_predictor(1, torch.float32)
    cp = CodePredictor.from_transformers(m, emb)
    h = torch.randn(3, 48)
    c0 = torch.randint(0, emb.num_embeddings, (3,))
    seed = torch.tensor([5])
    sampling = (True, 8, 0.9, 1.0)
    fn = torch.compile(lambda a, b: cp.frame(a, b, None, seed, sampling, "reference"), fullgraph=True,
                       backend="eager")
    got, want = fn(h, c0), cp.frame(h, c0, None, seed, sampling, "reference")
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_sampled_codes_respect_top_k():
    m, emb = _hf_predictor(0, torch.float32)
    cp = CodePredictor.from_transformers(m, emb)
    h = torch.randn(64, 64)
    c0 = torch.randint(0, emb.num_embeddings, (64,))
    codes, _ = cp.predict_frame(h, c0, top_k=1, top_p=1.0, seed=4, backend="reference")
    greedy, _ = cp.predict_frame(h, c0, do_sample=False, backend="reference")
    assert torch.equal(codes, greedy)  # top_k = 1 leaves only the argmax


def test_c0_embed_and_state_dict_paths():
    m, emb = _hf_predictor(1)
    sd = {"talker.code_predictor." + k: v for k, v in m.state_dict().items()}
    cp = CodePredictor.from_state_dict(m.config, sd, codec_embedding=emb.weight)
    bare = CodePredictor.from_transformers(m)
    h = torch.randn(3, 48, dtype=torch.float64)
    c0 = torch.randint(0, emb.num_embeddings, (3,))
    codes, nxt = cp.predict_frame(h, c0, do_sample=False)
    codes2, nxt2 = bare.predict_frame(h, c0, do_sample=False, c0_embed=emb(c0).detach())
    assert torch.equal(codes, codes2)
    torch.testing.assert_close(nxt, nxt2)
    with pytest.raises(ValueError, match="c0_embed"):
        bare.predict_frame(h, c0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_next_input_rounds_once_like_transformers_sum(dtype):
    """next_input (from codec_embedding, and from c0_embed) is transformers' cat(16 rows).sum(1) in the model dtype:
    one fp32 sum rounded once, not the 15-codebook sum rounded and then e0 added (two roundings). The reference
    backend (the triton frame sums with the same rvq_embed op: test_frame_rows_are_batch_invariant_triton)."""
    backend = "reference"
    m, emb = _hf_predictor(0, torch.float32, seed=3)
    emb = emb.to(dtype)
    with_table = CodePredictor.from_state_dict(m.config, m.state_dict(), codec_embedding=emb, dtype=dtype)
    bare = CodePredictor.from_state_dict(m.config, m.state_dict(), dtype=dtype)
    g = torch.Generator().manual_seed(2)
    h = (torch.randn(4, 64, generator=g) * 2).to(dtype)
    c0 = torch.randint(0, emb.num_embeddings, (4,), generator=g)
    e0 = emb(c0).detach() * 3  # large next to the other rows: the double rounding shows
    codes, nxt = bare.predict_frame(h, c0, c0_embed=e0, seed=torch.arange(4), backend=backend, use_graph=False)
    rows = [e0] + [bare.table[g_ * 32 + codes[:, g_ + 1]] for g_ in range(4)]
    want = torch.stack(rows, 1).sum(1)  # transformers: cat([last_id_hidden] + mids + [last], 1).sum(1)
    assert torch.equal(nxt, want)
    codes2, nxt2 = with_table.predict_frame(h, c0, seed=torch.arange(4), backend=backend, use_graph=False)
    want2 = torch.stack([emb(c0).detach()] + [with_table.table[emb.num_embeddings + g_ * 32 + codes2[:, g_ + 1]]
                                             for g_ in range(4)], 1).sum(1)
    assert torch.equal(nxt2, want2)
    # graph emulation: the static c0_embed buffer goes through the same single sum
    _, nxt3 = bare.predict_frame(h, c0, c0_embed=e0, seed=torch.arange(4), backend=backend, use_graph=True)
    assert torch.equal(nxt3, nxt)


def _tiny_talker():
    cp_cfg = dict(TINY[1], rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    tc = dict(vocab_size=40, hidden_size=48, intermediate_size=32, moe_intermediate_size=16,
              shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
              head_dim=24, num_experts=4, num_experts_per_tok=2)
    cfg = Qwen3OmniMoeTalkerConfig(text_config=tc, code_predictor_config=cp_cfg, num_code_groups=4,
                                   thinker_hidden_size=48, spatial_merge_size=2)
    torch.manual_seed(3)
    talker = q3.Qwen3OmniMoeTalkerForConditionalGeneration(cfg).double().eval()
    with torch.no_grad():
        for p in talker.code_predictor.parameters():
            p.normal_(0, 0.3)
    return talker, cfg


def _prepare(talker, cfg, ids, hid, gen_step, tth, pad):
    B = ids.shape[0]
    cache = DynamicCache(config=cfg.text_config)
    zeros = torch.zeros(B, 2, 4, 24, dtype=torch.float64)
    cache.update(zeros, zeros, 0)
    with torch.no_grad():
        return talker.prepare_inputs_for_generation(
            ids, **with_cache(cache), attention_mask=torch.ones(B, 5, dtype=torch.long), use_cache=True,
            hidden_states=((hid,), None), generation_step=gen_step, trailing_text_hidden=tth, tts_pad_embed=pad,
            is_first_iteration=False)


def test_talker_step_matches_prepare_inputs_for_generation():
    talker, cfg = _tiny_talker()
    cp = CodePredictor.from_transformers(talker.code_predictor, talker.get_input_embeddings())
    B = 2
    tth = torch.randn(B, 3, 48, dtype=torch.float64)
    pad = torch.randn(1, 1, 48, dtype=torch.float64)
    step = TalkerStep(cp, tth, pad)
    for gen_step in (0, 2, 3, 5):  # inside the trailing text, and past it (tts_pad)
        ids = torch.randint(0, 40, (B, 5))
        hid = torch.randn(B, 5, 48, dtype=torch.float64)
        want = _prepare(talker, cfg, ids, hid, gen_step, tth, pad)
        codes, embeds = step(hid[:, -1], ids[:, -1], gen_step, do_sample=False, backend="reference")
        assert torch.equal(codes, want["residual_codes"])
        torch.testing.assert_close(embeds, want["inputs_embeds"], rtol=1e-12, atol=1e-12)


def test_install_on_talker_is_a_drop_in():
    talker, cfg = _tiny_talker()
    B = 3
    tth = torch.randn(B, 2, 48, dtype=torch.float64)
    pad = torch.randn(1, 1, 48, dtype=torch.float64)
    ids = torch.randint(0, 40, (B, 5))
    hid = torch.randn(B, 5, 48, dtype=torch.float64)
    wants = [_prepare(talker, cfg, ids, hid, s, tth, pad) for s in (1, 4)]
    cp = install_on_talker(talker)
    calls = []
    frame = cp.predict_frame
    cp.predict_frame = lambda *a, **k: calls.append(1) or frame(*a, **k)
    for s, want in zip((1, 4), wants):
        got = _prepare(talker, cfg, ids, hid, s, tth, pad)
        assert torch.equal(got["residual_codes"], want["residual_codes"])
        torch.testing.assert_close(got["inputs_embeds"], want["inputs_embeds"], rtol=1e-12, atol=1e-12)
        # (transformers 5.17 adds position_ids=None, "prepared in forward"; absent means the same)
        assert {k for k, v in got.items() if v is not None} == {k for k, v in want.items() if v is not None}
    assert len(calls) == 2  # the frames ran through omni-fast


@pytest.mark.parametrize("kw,err,match", [
    (dict(h=torch.randn(2, 10)), ValueError, "hidden size"),
    (dict(h=torch.randn(2, 1, 48)), ValueError, "talker_hidden"),
    (dict(c0=torch.zeros(3, dtype=torch.long)), ValueError, "c0"),
    (dict(c0=torch.zeros(2)), TypeError, "c0"),
    (dict(c0=torch.tensor([0, 1000])), ValueError, "c0"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.2), ValueError, "top_p"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(seed=torch.zeros(3, dtype=torch.long)), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(seed=torch.tensor([1.0, 2.0])), TypeError, "seed"),
    (dict(c0_embed=torch.zeros(3, 48)), ValueError, "c0_embed"),
])
def test_bad_input(kw, err, match):
    m, emb = _hf_predictor(1, torch.float32)
    cp = CodePredictor.from_transformers(m, emb)
    h = kw.pop("h", torch.randn(2, 48))
    c0 = kw.pop("c0", torch.zeros(2, dtype=torch.long))
    with pytest.raises(err, match=match):
        cp.predict_frame(h, c0, **kw)


def test_state_dict_with_another_number_of_codebooks_is_refused():
    import copy

    m, emb = _hf_predictor(1, torch.float32)
    for groups in (m.config.num_code_groups - 1, m.config.num_code_groups + 1):
        cfg = copy.deepcopy(m.config)
        cfg.num_code_groups = groups
        with pytest.raises(ValueError, match="num_code_groups"):
            CodePredictor.from_state_dict(cfg, m.state_dict(), codec_embedding=emb)


UNSUPPORTED = [(dict(attention_bias=True), "attention_bias"), (dict(hidden_act="gelu"), "hidden_act"),
               (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}), "rope_type"),
               (dict(sliding_window=3, max_window_layers=0), "sliding_window")]


@pytest.mark.parametrize("setting,name", UNSUPPORTED)
def test_settings_the_predictor_does_not_compute_are_refused(setting, name):
    """A code-predictor config asking for what CodePredictor does not compute (biases, another activation or RoPE,
    a window shorter than a frame) is refused by name; it ran silently as the default before (the biases' keys were
    never read). A window no shorter than the frame changes nothing and is accepted."""
    from omni_fast.models.code_predictor import unsupported_setting

    cfg = Qwen3OmniMoeTalkerCodePredictorConfig(**dict(TINY[1], **setting))
    assert name in unsupported_setting(cfg)
    with pytest.raises(ValueError, match=name):
        CodePredictor.from_state_dict(cfg, {})
    long = Qwen3OmniMoeTalkerCodePredictorConfig(**dict(TINY[1], sliding_window=TINY[1]["num_code_groups"] + 1,
                                                        max_window_layers=0))
    assert "sliding_attention" in long.layer_types and unsupported_setting(long) is None


def test_patch_leaves_an_unsupported_predictor_to_transformers():
    """patch() on a talker whose code predictor has biases says so under "left as is" and installs nothing: the
    frames stay transformers' (before: omni-fast's predictor ran without the biases)."""
    import omni_fast
    from omni_fast.models.talker_step import _fast_code_predictor

    talker, _ = _tiny_talker()
    talker.code_predictor.config.attention_bias = True  # (the modules' biases: what such a checkpoint loads)
    for layer in talker.code_predictor.model.layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, proj)
            lin.bias = torch.nn.Parameter(torch.randn(lin.out_features, dtype=lin.weight.dtype))
    assert _fast_code_predictor(talker) is None
    report = omni_fast.patch(talker, parts=("code_predictor",))
    try:
        assert any("attention_bias" in line for line in report.left), report
        assert "prepare_inputs_for_generation" not in talker.__dict__
    finally:
        omni_fast.unpatch(talker)


def test_pipeline_runs_transformers_frames_for_an_unsupported_predictor():
    """The Qwen3Omni pipeline on a model whose code predictor's config CodePredictor does not compute (here
    ``hidden_act='gelu'``): its frame stage is transformers' own loop (before: the constructor raised ValueError
    after patching the model, which stayed patched), the vocoder stays omni-fast's, and a request speaks."""
    import omni_fast
    from omni_fast.models import Qwen3Omni
    from omni_fast.models.components import HFCodePredictor
    from omni_fast.models.presets import tiny_qwen3_omni_config
    from omni_fast.pipeline.requests import Request
    from omni_fast.testing import seeded_weights_

    config = tiny_qwen3_omni_config()
    config.talker_config.code_predictor_config.hidden_act = "gelu"
    torch.manual_seed(0)
    model = seeded_weights_(q3.Qwen3OmniMoeForConditionalGeneration(config)).eval()
    pipe = Qwen3Omni(model, patch=True, backend="reference")
    try:
        assert isinstance(pipe.code_predictor, HFCodePredictor) and pipe.fast_code2wav is not None
        out = pipe.generate(Request(text=[5, 6, 7]), max_new_tokens=3, talker_max_new_tokens=4)[0]
        assert out["audio"].numel() > 0
    finally:
        omni_fast.unpatch(model)


# --- fused layer ops: Triton vs reference ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("N,H", [(0, 32), (1, 8), (5, 40), (3, 1024)])
def test_add_rms_norm_and_silu_mul_kernels(dtype, N, H):
    g = torch.Generator().manual_seed(N * H)
    h = torch.randn(N, H, generator=g).to(DEVICE, dtype)
    d = torch.randn(N, H, generator=g).to(DEVICE, dtype)
    w = (torch.randn(H, generator=g) + 1).to(DEVICE, dtype)
    for delta in (None, d):
        outs = {}
        for name, hh, be in (("tri", h.clone(), "triton"), ("same", h.clone(), "reference")):
            outs[name] = (mtp_layers.add_rms_norm_(hh, delta, w, backend=be), hh)
        exact = mtp_layers._add_rms_norm_reference(h.double(), None if delta is None else delta.double(), w.double(),
                                                   1e-6)
        outs["exact"] = (exact, None)
        # The residual add rounds to the model dtype, as transformers: the updated h equals the same-dtype reference.
        torch.testing.assert_close(outs["tri"][1], outs["same"][1], rtol=0, atol=0)
        assert_matches_reference(outs["tri"][0], outs["exact"][0], outs["same"][0])
    gu = torch.randn(N, 2 * (H + 3), generator=g).to(DEVICE, dtype)
    assert_matches_reference(mtp_layers.silu_mul(gu, backend="triton"), mtp_layers._silu_mul_reference(gu.double()),
                             mtp_layers.silu_mul(gu, backend="reference"))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,Hq,Hk,D,L", [(2, 4, 2, 16, 6), (1, 2, 2, 24, 16), (3, 8, 1, 32, 5)])
def test_cached_attention_kernel(dtype, B, Hq, Hk, D, L):
    g = torch.Generator().manual_seed(B * D)
    for start, T in ((0, 2), (0, 1), (2, 1), (L - 2, 2), (L - 1, 1)):
        q, k, v = (torch.randn(B, T, n, D, generator=g).to(DEVICE, dtype) for n in (Hq, Hk, Hk))
        kc, vc = (torch.randn(B, Hk, L, D, generator=g).to(DEVICE, dtype) for _ in range(2))
        kt, vt, ks, vs = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        out = mtp_layers.cached_attention(q, k, v, kt, vt, start=start, backend="triton")
        same = mtp_layers.cached_attention(q, k, v, ks, vs, start=start, backend="reference")
        exact = mtp_layers._attn_reference(q.double(), k.double(), v.double(), kc.double(), vc.double(), start,
                                           D**-0.5)
        assert torch.equal(kt, ks) and torch.equal(vt, vs)
        assert_matches_reference(out, exact, same)


def test_layer_ops_bad_input_and_trace():
    q = torch.randn(1, 1, 4, 16)
    kv = torch.randn(1, 1, 2, 16)
    cache = torch.zeros(1, 2, 4, 16)
    with pytest.raises(ValueError, match="start"):
        mtp_layers.cached_attention(q, kv, kv, cache, cache.clone(), start=4)
    with pytest.raises(ValueError, match="multiple"):
        mtp_layers.cached_attention(torch.randn(1, 1, 3, 16), kv, kv, cache, cache.clone(), start=0)
    with pytest.raises(ValueError, match="k_cache"):
        mtp_layers.cached_attention(q, kv, kv, torch.zeros(1, 3, 4, 16), cache.clone(), start=0)
    with pytest.raises(ValueError, match="even"):
        mtp_layers.silu_mul(torch.randn(2, 5))
    with pytest.raises(ValueError, match="weight"):
        mtp_layers.add_rms_norm_(torch.randn(2, 8), None, torch.ones(7))
    with pytest.raises(TypeError, match="delta"):
        mtp_layers.add_rms_norm_(torch.randn(2, 8), torch.randn(2, 8).half(), torch.ones(8))
    fn = torch.compile(lambda a, b, c, kc, vc: mtp_layers.cached_attention(a, b, c, kc, vc, start=1,
                                                                           backend="reference"),
                       fullgraph=True, backend="eager")
    c1, c2 = cache.clone(), cache.clone()
    torch.testing.assert_close(fn(q, kv, kv, c1, c1.clone()),
                               mtp_layers.cached_attention(q, kv, kv, c2, c2.clone(), start=1, backend="reference"))


# --- GPU: CUDA graph, bf16, real shapes ---------------------------------------------------------------------------


def _real_predictor(dtype=torch.bfloat16):
    cfg = Qwen3OmniMoeTalkerCodePredictorConfig(num_code_groups=16, rope_parameters={"rope_type": "default",
                                                                                       "rope_theta": 1e6})
    with torch.device("cuda"):
        m = q3.Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration(cfg).to(dtype).eval()
        emb = torch.nn.Embedding(3072, cfg.hidden_size).to(dtype)
    return m, emb


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])  # the foundation's reference mrope copies host->device per call
def test_graph_replay_equals_eager(backend):
    m, emb = _real_predictor()
    cp = CodePredictor.from_transformers(m, emb)
    for B in (1, 3, 16, 70):
        h = torch.randn(B, 1024, device="cuda", dtype=torch.bfloat16)
        c0 = torch.randint(0, 2048, (B,), device="cuda")
        for kw in (dict(do_sample=False), dict(seed=11), dict(seed=torch.arange(B, device="cuda"))):
            eager = cp.predict_frame(h, c0, use_graph=False, backend=backend, **kw)
            graph = cp.predict_frame(h, c0, use_graph=True, backend=backend, **kw)
            assert torch.equal(eager[0], graph[0]), (B, kw)
            torch.testing.assert_close(eager[1], graph[1])
            again = cp.predict_frame(h, c0, use_graph=True, backend=backend, **kw)
            assert torch.equal(again[0], graph[0])


@pytest.mark.gpu
def test_gpu_frame_on_backend_cuda(monkeypatch):
    """predict_frame(backend="cuda") and OMNI_FAST_BACKEND=cuda run the whole frame: the sampler (and the unfused
    path's RoPE) on their CUDA C++ twins, every op without one on triton (the per-op fallback)."""
    pytest.importorskip("cupy")
    m, emb = _real_predictor()
    cp = CodePredictor.from_transformers(m, emb)
    h = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    c0 = torch.randint(0, 2048, (4,), device="cuda")
    want = cp.predict_frame(h, c0, do_sample=False, backend="triton")
    got = cp.predict_frame(h, c0, do_sample=False, backend="cuda")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # greedy: the same kernels but the argmax
    monkeypatch.setenv("OMNI_FAST_BACKEND", "cuda")
    env = cp.predict_frame(h, c0, do_sample=False, use_graph=False)
    assert torch.equal(env[0], want[0])
    unfused = cp.predict_frame(h, c0, do_sample=False, use_graph=False, fused=False)
    assert unfused[0].shape == (4, 16) and (unfused[0][:, 1:] < 2048).all()
    monkeypatch.delenv("OMNI_FAST_BACKEND")
    seeds = torch.arange(4, device="cuda") + 100
    sampled_cuda = cp.predict_frame(h, c0, seed=seeds, backend="cuda")[0]
    sampled_triton = cp.predict_frame(h, c0, seed=seeds, backend="triton")[0]
    # same seed, same draws (up to a rare ulp-level near-tie of two race keys, which then changes that row)
    assert (sampled_cuda != sampled_triton).any(1).sum() <= 1


@pytest.mark.gpu
def test_gpu_greedy_matches_transformers_bf16_mostly():
    m, emb = _real_predictor()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    cp = CodePredictor.from_transformers(m, emb)
    h = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    c0 = torch.randint(0, 2048, (8,), device="cuda")
    want, _ = _hf_frame(m, emb, h, c0)
    got, _ = cp.predict_frame(h, c0, do_sample=False)
    # bf16 kernels round differently from cuBLAS/SDPA paths: the first code must agree on nearly every row.
    assert (got[:, 1] == want[:, 0]).float().mean() >= 0.75


def test_weights_key_of_inference_tensors():
    """Modules built under torch.inference_mode (no version counter) still get a weights key."""
    from omni_fast.models.talker_step import weights_key

    with torch.inference_mode():
        lin = torch.nn.Linear(4, 4)
    assert weights_key(lin) == weights_key(lin)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CUDA where there is none")
@pytest.mark.parametrize("device,exc", [(0, ValueError), ("gpu", ValueError), (1.5, TypeError)])
def test_from_state_dict_device_checked_naming_it(device, exc):
    """device=0 is cuda:0 (it silently built on the weights' CPU device: `device or ref.device`); without CUDA it is
    refused before anything is built, as the pipelines' loaders do; a non-device names the argument too."""
    m, emb = _hf_predictor(0, torch.float32, seed=1)
    with pytest.raises(exc, match="^device"):
        CodePredictor.from_state_dict(m.config, m.state_dict(), codec_embedding=emb, device=device)
