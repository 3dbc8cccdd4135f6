"""Several GPUs, for real (2 GPUs; skipped otherwise): tensors and models on cuda:1 while cuda:0 is the current device
(transformers' ``device_map="auto"`` puts the talker on cuda:1; a serving worker's current device is another one).
Each result equals the same call on cuda:0. One op per kernel family (the good calls of the bad-argument sweep,
tests/reliability_cases.py) and one CUDA-graph capture per model module. NOT in tests/gpu_first_light.txt: the lent
machines have one GPU. The CPU side of the same rules: tests/test_multi_device.py, tests/test_cuda_graphs.py."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]

TOL = dict(rtol=1e-4, atol=1e-5)
OPS = ["mrope", "qk_norm_mrope", "flash_attn_varlen", "flash_attn_with_kvcache", "route_topk", "align_moe_blocks",
       "moe_experts", "moe_block", "rvq_embed", "sample", "snake_beta", "causal_conv1d", "causal_conv_transpose1d",
       "update_conv_states", "anti_aliased_snake", "padded_conv1d", "block_attention", "ada_layer_norm",
       "dit_qkv_rope"]
CUDA_OPS = {"mrope", "qk_norm_mrope", "route_topk", "align_moe_blocks", "sample"}  # with a CUDA C++ version


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def _from_cuda0(fn):
    """``fn()`` with cuda:0 current; cuda:0 is current again afterwards; both devices drained."""
    with torch.cuda.device(0):
        out = fn()
        assert torch.cuda.current_device() == 0
    for i in (0, 1):
        torch.cuda.synchronize(i)
    return out


def _close(got, want):
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _close(g, w)
    elif isinstance(want, torch.Tensor):
        assert got.device == torch.device("cuda:1"), got.device
        torch.testing.assert_close(got.to(want.device), want, **TOL)
    else:
        assert got == want


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", OPS)
def test_op_on_cuda1_while_cuda0_is_current(name, backend):
    """The op's kernels launch on cuda:1's current stream (the launcher's device guard, CuPy's device and stream):
    the result equals the call on cuda:0."""
    if backend == "cuda":
        if name not in CUDA_OPS:
            pytest.skip("no CUDA C++ version")
        pytest.importorskip("cupy")
    from reliability_cases import _entries

    fn, make, _ = _entries()[name]
    kw = make()
    with torch.no_grad():
        want = fn(**_to(kw, "cuda:0"), backend=backend)
        got = _from_cuda0(lambda: fn(**_to(kw, "cuda:1"), backend=backend))
    if name == "align_moe_blocks":  # (the order inside an expert's run is unspecified: compare the counts)
        got, want = got[-1], want[-1]
    _close(got, want)


def test_code_predictor_frame_graph_on_cuda1():
    """The MTP frame graph captured for a predictor on cuda:1 from cuda:0: its replays follow their inputs (an
    empty capture would repeat the capture run's outputs) and equal the predictor on cuda:0."""
    from omni_fast.models import CodePredictor

    cfg = dict(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_code_groups=4)
    cp0 = CodePredictor(cfg, codec_vocab_size=40, device="cuda:0")
    cp1 = CodePredictor(cfg, codec_vocab_size=40, device="cuda:1")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p0, p1 in zip(cp0.parameters(), cp1.parameters()):
            p0.copy_(torch.randn(p0.shape, generator=g) * 0.3)
            p1.copy_(p0)
    inputs = [(torch.randn(2, 64, generator=g), torch.randint(0, 40, (2,), generator=g)) for _ in range(3)]
    with torch.no_grad():
        want = [cp0.predict_frame(x.cuda(0), c.cuda(0), do_sample=False, use_graph=True) for x, c in inputs]
        got = _from_cuda0(lambda: [cp1.predict_frame(x.cuda(1), c.cuda(1), do_sample=False, use_graph=True)
                                   for x, c in inputs])
    assert len(cp1._graphs) == 1 and next(iter(cp1._graphs.values())).graph is not None
    for (gc, gn), (wc, wn) in zip(got, want):
        assert gc.device == torch.device("cuda:1") and torch.equal(gc.cpu(), wc.cpu())
        torch.testing.assert_close(gn.to("cuda:0"), wn, **TOL)
    assert not torch.equal(got[0][1], got[1][1])  # the replays followed their inputs


def test_text_decoder_graph_on_cuda1():
    """MoeTextDecoder on cuda:1 (a talker placed there by device_map) with cuda:0 current: load_prefill captures
    the step, step replays it; equal to the decoder on cuda:0."""
    from test_text_decoder import _left_padded, _model, _prefill, _text_positions

    from omni_fast.models import MoeTextDecoder

    runs = []
    for dev in ("cuda:0", "cuda:1"):
        m, head = _model("talker", dtype=torch.bfloat16, device=dev)
        mask = _left_padded([6, 3], 6)
        pos3 = _text_positions(mask)

        def run(m=m, head=head, mask=mask, pos3=pos3, dev=dev):
            cache = _prefill(m, mask, pos3)
            dec = MoeTextDecoder.from_transformers(m, head, backend="triton")
            dec.load_prefill(cache, mask.to(dev), max_new_tokens=6, use_graph=True)
            assert dec._state.graph is not None
            g = torch.Generator().manual_seed(0)
            return [dec.step(torch.randn(2, m.config.hidden_size, generator=g).to(dev, torch.bfloat16),
                             (pos3[0, :, -1] + 1 + s).to(dev))[0] for s in range(3)]

        with torch.no_grad():
            runs.append(run() if dev == "cuda:0" else _from_cuda0(run))
    for got, want in zip(runs[1], runs[0]):
        torch.testing.assert_close(got.to("cuda:0"), want, rtol=2e-2, atol=2e-2)
    assert not torch.equal(runs[1][0], runs[1][1])


def test_code2wav_stream_graphs_on_cuda1():
    """Code2Wav's stream graphs on cuda:1 from cuda:0 equal the eager stream there and the graphs on cuda:0."""
    import omni_fast
    from test_code2wav_graphs import _hf_model, _stream

    outs = []
    for dev in ("cuda:0", "cuda:1"):
        model = omni_fast.models.Code2Wav.from_transformers(_hf_model(0).to(dev), backend="triton")
        codes = torch.randint(0, 16, (2, 4, 30), generator=torch.Generator().manual_seed(3)).to(dev)

        def run(model=model, codes=codes):
            s = model.stream(2, cuda_graphs=True)
            got = torch.cat([s.push(codes[..., a:e]) for a, e in ((0, 2), (2, 3), (3, 13), (13, 30))], dim=-1)
            assert len(s._graphs) == 4
            return got, _stream(model, codes, [2, 1, 10, 17])

        with torch.no_grad():
            outs.append(run() if dev == "cuda:0" else _from_cuda0(run))
    (want, _), (got, eager1) = outs
    torch.testing.assert_close(got, eager1, rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(got.to("cuda:0"), want, rtol=1e-4, atol=5e-5)


def test_dit_solve_graph_on_cuda1():
    """The Token2Wav DiT solve captured on cuda:1 from cuda:0 equals its eager solve and the graph on cuda:0."""
    from test_dit_solve import _dit, _eager, _inputs, _ours

    from omni_fast.models import dit_solve

    outs = []
    for dev in ("cuda:0", "cuda:1"):
        dit = _dit(dev)
        cond, ref, code = _inputs(dit, 2, 7, device=dev)

        def run(dit=dit, cond=cond, ref=ref, code=code):
            got = _ours(dit, cond, ref, code, 5, num_steps=4, buckets=(8,))
            graphs = [g for k, g in dit.__dict__[dit_solve._CACHE].items() if k != "weights"]
            assert len(graphs) == 1 and graphs[0].graph is not None
            return got, _eager(dit, cond, ref, code, 5, num_steps=4)

        outs.append(run() if dev == "cuda:0" else _from_cuda0(run))
    (want, _), (got, eager1) = outs
    torch.testing.assert_close(got, eager1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.to("cuda:0"), want, rtol=1e-4, atol=1e-4)
