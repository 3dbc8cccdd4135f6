"""omni_fast.testing.guarded_allocations: memcheck for writes where no sanitizer runs. Tensors allocated inside
the block sit between guard bytes; a kernel that writes before a tensor's start or past its end leaves a
violation. The CPU interpreter's out-of-bounds stores land silently in host memory, so the same check runs the
persistent MTP frame and the phase-fused decode step here; the gpu-marked twins run at real shapes where
compute-sanitizer refuses the device (tests/gpu_first_light.txt)."""

from __future__ import annotations

import pytest
import torch

from omni_fast.testing import DEVICE, guarded_allocations


def test_guards_catch_writes_outside_a_tensor():
    with guarded_allocations(guard_bytes=64) as g:
        a = torch.empty(5, 3)
        b = torch.zeros(7, dtype=torch.int32)
        c = torch.full((2, 2), 1.5)
        d = torch.empty_like(a)
    assert torch.equal(b, torch.zeros(7, dtype=torch.int32)) and torch.equal(c, torch.full((2, 2), 1.5))
    assert a.shape == d.shape == (5, 3) and a.is_contiguous()
    assert g.violations() == []
    torch.as_strided(a, (16,), (1,))[15] = 1.0  # one element past a's end (its slab's after-guard)
    torch.as_strided(b, (1,), (1,), b.storage_offset() - 1)[0] = 3  # one element before b's start
    bad = g.violations()
    assert len(bad) == 2 and "past its end" in bad[0] and "[5, 3]" in bad[0] and "before its start" in bad[1]


def test_guards_leave_other_calls_alone():
    out = torch.empty(3)
    with guarded_allocations(device_type="cuda") as g:
        x = torch.zeros(4)  # cpu: not guarded when guarding cuda only
        torch.ones(2, out=out[:2])  # out= is never guarded
        y = torch.empty(2, 3, memory_format=torch.contiguous_format)
    assert g.slabs == [] and x._base is None and y.shape == (2, 3)
    assert torch.empty is not None and torch.empty(2)._base is None  # restored after the block


def _mtp(persistent: bool):
    from test_persistent import _models  # the persistent tests' small predictor (today's path, persistent)

    return _models()[1 if persistent else 0]


@pytest.mark.parametrize("persistent", [False, True], ids=["today", "persistent"])
def test_mtp_frame_writes_inside_its_tensors(persistent):
    """Every tensor the frame allocates (its workspace, counters, graph buffers, outputs) keeps its guards."""
    torch.manual_seed(0)
    cp = _mtp(persistent)
    h, c0 = torch.randn(3, 64, device=DEVICE), torch.randint(0, 32, (3,), device=DEVICE)
    with guarded_allocations() as g:
        cp.predict_frame(h, c0, top_k=8, top_p=0.8, seed=3, backend="triton", use_graph=False)
    # (> 4: the frame's own allocations are guarded at all; the c0 embedding's three helper tensors went when it
    # moved to rvq_embed's in-kernel offsets)
    assert len(g.slabs) > 4 and g.violations() == []


def test_fused_decode_step_writes_inside_its_tensors():
    """The phase-fused talker step (B = 3, left-padded prompts of 3 / 2 / 1 tokens, 2 steps) writes only
    inside its caches, scratch and outputs: caches and scratch are allocated inside the block here."""
    from test_fused_step import TALKER
    from test_text_decoder import _left_padded, _model, _prefill, _text_positions

    from omni_fast.models.text_decoder import MoeTextDecoder

    m, head = _model("talker", seed=3, **TALKER)
    mask = _left_padded([3, 2, 1], 3)
    pos3 = _text_positions(mask)
    cache = _prefill(m, mask, pos3)
    with guarded_allocations() as g:
        dec = MoeTextDecoder.from_transformers(m, head, backend="triton", fused=True)
        dec.load_prefill(cache, mask, max_new_tokens=3, use_graph=False)
        for i in range(2):
            dec.step(torch.randn(3, m.config.hidden_size), pos3[0, :, -1] + 1 + i)
    assert dec._state.fused is not None and len(g.slabs) > 10
    assert g.violations() == []


@pytest.mark.parametrize("moves", [False, True], ids=["default", "state_moves"])
def test_code2wav_stream_writes_inside_its_tensors(moves):
    """Code2Wav streaming through the Triton kernels (a batch of 2, chunks of 1 / 2 / 5 frames: conv states,
    the sliding-window KV cache, the SnakeBeta-fused convs and transposed convs; the conv states moved per conv or,
    with the fast path code2wav_state_moves, several per launch) keeps every guard."""
    import omni_fast.models
    from _code2wav_helpers import _hf_model, _stream
    from omni_fast import fast_paths

    hf = _hf_model(1, num_hidden_layers=1)
    with guarded_allocations() as g, fast_paths.enable("code2wav_state_moves", moves):
        model = omni_fast.models.Code2Wav.from_transformers(hf, backend="triton")
        _stream(model, torch.randint(0, 16, (2, 4, 8)), [1, 2, 5])
    assert len(g.slabs) > 10 and g.violations() == []


# --- GPU: the same checks at the real shapes (the memcheck stand-in where compute-sanitizer refuses the device) ---


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_gpu_persistent_mtp_real_shapes_writes_inside(B):
    """The real MTP (5 layers, H 1024, 16 groups) in bf16: the persistent frame (co-resident grid, dependency
    counters) and today's path, eager and graph-captured, keep every guard of what they allocate."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from omni_fast.bench.cases.mtp import _build
    from omni_fast.models import CodePredictor

    m, emb = _build(torch.device("cuda"), torch.bfloat16, {})
    torch.manual_seed(B)
    h = torch.randn(B, 1024, device="cuda", dtype=torch.bfloat16)
    c0 = torch.randint(0, 2048, (B,), device="cuda")
    for persistent in (False, True):
        with guarded_allocations(device_type="cuda") as g:
            cp = CodePredictor.from_transformers(m, emb, persistent=persistent)
            for use_graph in (False, True):
                cp.predict_frame(h, c0, top_k=50, top_p=0.8, seed=torch.arange(B, device="cuda"),
                                 use_graph=use_graph)
            torch.cuda.synchronize()
        assert g.slabs and g.violations() == [], persistent


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 8])
def test_gpu_fused_decode_step_real_shapes_writes_inside(B):
    """The real talker layer shapes (2 of 20 layers) in bf16, prompt 1200 in a 2240-token cache (4 attention
    splits): today's step and the phase-fused one, eager and graph-replayed, keep every guard."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from test_fused_step import _real_talker

    from omni_fast.models.text_decoder import MoeTextDecoder

    dev = torch.device("cuda")
    m, head, prefill = _real_talker(dev, layers=2)
    for fused in (False, True):
        torch.manual_seed(0)
        cache, mask, nxt = prefill(m, B, 1200)
        with guarded_allocations(device_type="cuda") as g:
            for use_graph in (False, True):
                dec = MoeTextDecoder.from_transformers(m, head, fused=fused)
                dec.load_prefill(cache, mask, max_new_tokens=8, use_graph=use_graph)
                for i in range(2):
                    e = torch.randn(B, m.config.hidden_size, device=dev, dtype=torch.bfloat16)
                    dec.step(e, nxt[0] + i)
            torch.cuda.synchronize()
        assert g.slabs and g.violations() == [], fused


def test_torch_compile_after_a_block_that_compiled_first():
    """The process's first torch.compile inside the block used to leave compile broken for the whole process
    ("Attempted to call function marked as skipped": torch.empty): tests/test_compat_vllm.py's fullgraph tests
    failed when run after tests/test_reliability_sweep.py. A fresh process, so the block's compile is the first."""
    import subprocess
    import sys

    from omni_fast._layout import REPO_ROOT

    code = ("import torch\n"
            "from omni_fast.testing import guarded_allocations\n"
            "with guarded_allocations():\n"
            "    torch.compile(lambda x: x + 1, backend='eager')(torch.ones(2))\n"
            "f = torch.compile(lambda x: torch.empty(2).fill_(1) + x, backend='eager', fullgraph=True)\n"
            "print(f(torch.ones(2)).tolist())\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1] == "[2.0, 2.0]", res.stderr[-2000:]
