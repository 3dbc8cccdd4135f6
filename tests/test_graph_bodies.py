"""The bodies the model modules capture as CUDA graphs, run on the CPU (Triton interpreter) under
:class:`omni_fast.testing.HostSyncs`: no host read of a device value and no tensor made from host data once warmed
up, the two things that fail a capture (or silently bake a host value into it) and that no CPU test saw before a GPU
run: the text decoder's step (ops path and phase-fused), the MTP frame (unfused, fused, persistent; greedy and
sampled), a Code2Wav stream push (plain and the first after a reset), the DiT solve, and the compat entry points. The
ops' CPU-only value checks are switched off as on CUDA (``cuda_like_validation``)."""

import pytest
import torch

import omni_fast.models  # noqa: F401  (imported before the fixture switches the value checks off)
import omni_fast.models.persistent  # noqa: F401
from omni_fast.compat import flash_attn as fa
from omni_fast.compat import vllm
from omni_fast.compat import vllm_flash_attn as vfa
from omni_fast.models import dit_solve
from omni_fast.models.text_decoder import MoeTextDecoder
from omni_fast.testing import DEVICE, HostSyncs

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda", reason="the CPU's check; on a GPU the capture tests run")


def _assert_capturable(body) -> None:
    body()  # warm-up: caches and constants built outside, as capture()'s warm-up does
    with torch.no_grad(), HostSyncs(host_data=True) as syncs:
        body()
    assert not syncs.count, syncs.report()


@pytest.mark.parametrize("fused", [False, True])
def test_text_decoder_step_body(cuda_like_validation, fused):
    from test_text_decoder import _left_padded, _model, _prefill, _text_positions

    m, head = _model("talker")
    mask = _left_padded([6, 3], 6)
    pos3 = _text_positions(mask)
    dec = MoeTextDecoder.from_transformers(m, head, backend="triton", fused=fused)
    dec.load_prefill(_prefill(m, mask, pos3), mask, max_new_tokens=4, use_graph=False)
    st = dec._state
    st.x[:2].normal_()
    st.pos[:, :2].copy_(pos3[:, :, -1] + 1)
    _assert_capturable(lambda: dec._body(st))


@pytest.mark.parametrize("path,sampling", [("unfused", (False, 0, 1.0, 1.0)), ("fused", (True, 5, 0.8, 0.9)),
                                           ("persistent", (True, 5, 0.8, 0.9))])
def test_mtp_frame_body(cuda_like_validation, path, sampling):
    from test_persistent import _models

    base, pers = _models()
    cp = pers if path == "persistent" else base
    x, c0 = torch.randn(3, cp.config.hidden_size), torch.randint(0, 32, (3,))
    seed = torch.tensor([5])
    _assert_capturable(lambda: cp.frame(x, c0, None, seed, sampling, None, path != "unfused"))


@pytest.mark.parametrize("moves", [False, True])
def test_code2wav_push_bodies(cuda_like_validation, fast_path, moves):
    """Plain and, with ``code2wav_state_moves``, the convs' states moved several per launch after them."""
    from _code2wav_helpers import _hf_model

    fast_path("code2wav_state_moves", moves)  # (read when the stream is made)
    model = omni_fast.models.Code2Wav.from_transformers(_hf_model(0), backend="triton")
    stream = model.stream(2, cuda_graphs=False)
    assert stream._move_states == moves
    codes = torch.randint(0, 16, (2, 4, 3))
    stream.push(codes)  # the first push creates the states (eager, as with graphs on)
    _assert_capturable(lambda: stream._step(codes[..., :2], False))
    stream.reset([1])
    _assert_capturable(lambda: stream._step(codes[..., :1], True))


def test_dit_solve_body(cuda_like_validation):
    from test_dit_solve import _dit

    dit = _dit(layers=1)
    with torch.no_grad():
        graph = dit_solve._SolveGraph(dit, 1, 4, 2, torch.float32, torch.device("cpu"), (2, 0.5, -1.0), "triton")
    _assert_capturable(graph._run)


def test_compat_entry_points_in_a_graph(cuda_like_validation):
    """The drop-in calls the first GPU run captures (flash-attn's kvcache decode with rotary / paged cache / ALiBi /
    softcap, vLLM's fused_topk + fused_experts, the vLLM fork's varlen FA3 call with out= and sinks)."""
    from test_compat_flash_attn import _tables
    from test_compat_vllm import _moe_inputs

    dt, i32, Hq, Hk, D = torch.float16, torch.int32, 8, 2, 64
    table = torch.randperm(8).view(2, 4).to(i32)
    kc = torch.randn(8, 16, Hk, D, dtype=dt)
    vc = torch.randn_like(kc)
    cos, sin = (t.to(dt) for t in _tables(64, 32))
    q, k, v = (torch.randn(2, 1, h, D, dtype=dt) for h in (Hq, Hk, Hk))
    lens = torch.tensor([10, 40], dtype=i32)
    slopes = torch.rand(Hq)
    _assert_capturable(lambda: fa.flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, lens, block_table=table,
                                                          causal=True, softcap=30.0, alibi_slopes=slopes))
    x, w1, w2, logits = (t.to(dt) if t.dim() == 3 or i == 0 else t
                         for i, t in enumerate(_moe_inputs(T=4, H=64, inter=32, E=4)))
    _assert_capturable(lambda: vllm.fused_experts(x, w1, w2, *vllm.fused_topk(x, logits, 2, True)[:2]))
    qv, cu_q, sinks = torch.randn(3, Hq, D, dtype=dt), torch.tensor([0, 1, 3], dtype=i32), torch.randn(Hq, dtype=dt)
    out = torch.zeros(5, Hq, D, dtype=dt)
    _assert_capturable(lambda: vfa.flash_attn_varlen_func(
        q=qv, k=kc, v=vc, out=out[:3], cu_seqlens_q=cu_q, max_seqlen_q=2, seqused_k=lens, max_seqlen_k=40,
        softmax_scale=D ** -0.5, causal=True, window_size=(-1, -1), block_table=table, softcap=0, fa_version=3,
        scheduler_metadata=None, s_aux=sinks, num_splits=0))


def test_host_syncs_sees_what_a_capture_fails_on():
    """The checker itself: each host read and data-sized output is counted (else every test above passes
    vacuously), their capturable forms are not."""
    x, r = torch.arange(6.0), torch.ones(6, dtype=torch.long)
    mask = x > 2
    syncs = [lambda: x.max().item(), lambda: bool(x.sum()), lambda: torch.equal(x, x), lambda: mask.nonzero(),
             lambda: x[mask], lambda: torch.masked_select(x, mask), lambda: torch.unique(x),
             lambda: torch.bincount(r), lambda: torch.repeat_interleave(r), lambda: x.repeat_interleave(r)]
    for i, op in enumerate(syncs):
        with HostSyncs() as s:
            op()
        assert sum(s.count.values()) >= 1, i
    with HostSyncs() as s:
        x[r[:2]], x.repeat_interleave(r, output_size=6), x.masked_fill(mask, 0.0), torch.where(mask, x, 0.0)
        torch.tensor([1.0])  # host data: counted only with host_data=True
    assert not s.count, s.report()
    with HostSyncs(host_data=True) as s:
        torch.tensor([1.0])
    assert s.count == {"lift_fresh": 1}
