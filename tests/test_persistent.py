"""The persistent MTP frame (issue 16): schedule builder + checker, and the one-launch kernel against today's path.

CPU (interpreter, grid of one program): the kernel runs every item in queue order, so its codes and next input
must equal the graph-of-kernels path bit for bit (fp32/fp16, greedy, shared and per-row seeds, both codebook-0
sources), rows stay batch invariant, the watchdog turns an unsatisfiable wait into an error flag instead of a
hang, and a frame is ONE launch. gpu-marked: the same on an H100 with a co-resident grid > 1.
"""

import copy
import sys
import time

import pytest
import torch

from omni_fast.kernels.launch import interpreting
from omni_fast.models import CodePredictor
from omni_fast.models.persistent import (FrameShape, PersistentError, PersistentFrame, ScheduleError, build_frame,
                                         check_schedule, co_resident_grid)
from omni_fast.testing import DEVICE  # the interpreter's CPU, or CUDA on a GPU machine (unmarked tests run there)

SMALL = dict(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, num_code_groups=4)
REAL = FrameShape(B=1, hidden=1024, inter=3072, layers=5, nq=16, nk=8, head_dim=128, vocab=2048, groups=16)


def _models(dtype=torch.float32, device=DEVICE, cfg=SMALL):
    from omni_fast.bench.cases.mtp import _build

    m, emb = _build(device, dtype, cfg)
    return CodePredictor.from_transformers(m, emb), CodePredictor.from_transformers(m, emb, persistent=True)


# --- schedule ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [
    FrameShape(B=3, hidden=64, inter=96, layers=2, nq=4, nk=2, head_dim=16, vocab=32, groups=4, tiles=2,
               rvq_block=32),
    FrameShape(B=1, hidden=48, inter=80, layers=1, nq=2, nk=1, head_dim=24, vocab=20, groups=3, tiles=3,
               rvq_block=16),  # head_dim not a multiple of the 16-column tile: one qkv counter per layer
    FrameShape(B=17, hidden=32, inter=48, layers=1, nq=2, nk=2, head_dim=16, vocab=40, groups=3, tiles=1,
               rvq_block=32),  # two 16-row M tiles
])
@pytest.mark.parametrize("c0_embed", [False, True])
def test_schedule_is_topological_and_hazard_free(shape, c0_embed):
    info = check_schedule(build_frame(shape, c0_embed=c0_embed))
    assert info["hazard_pairs"] > 0
    ops = info["ops"]
    assert ops["prefill"] == shape.B and ops["sample"] == shape.B * (shape.groups - 1) and ops["reset"] == 1


def test_real_schedule_counts():
    sched = build_frame(REAL)
    info = check_schedule(sched, hazards=False)
    s = REAL
    tiles = lambda n: -(-n // 16)  # noqa: E731  one 16-column tile per item (the default)
    per_layer_qkv = (s.nq + 2 * s.nk) * 8  # head_dim 128 = 8 tiles per head
    assert info["ops"]["attn_decode"] == 14 * s.layers * s.nk
    assert info["ops"]["o"] == info["ops"]["down"] == 15 * s.layers * tiles(s.hidden)
    assert info["ops"]["swiglu"] == 15 * s.layers * tiles(s.inter)
    assert info["ops"]["gather"] == 14 * per_layer_qkv
    # every kv head's counter: its 2 q heads, k and v (8 tiles each)
    assert info["items"] == len(sched.items) and max(sched.targets()) == max(s.inter // 16, s.vocab // 16)
    assert info["items"] == 15 * s.layers * (per_layer_qkv + s.nk + 2 * tiles(s.hidden) + tiles(s.inter)) + \
        15 * (tiles(s.vocab) + 1) + 3


def _mutate(sched, fn):
    sched = copy.deepcopy(sched)
    fn(sched)
    return sched


def test_checker_rejects_broken_schedules():
    s = FrameShape(B=2, hidden=32, inter=48, layers=1, nq=2, nk=1, head_dim=16, vocab=16, groups=3, tiles=2,
                   rvq_block=32)
    good = build_frame(s)
    check_schedule(good)
    first_attn = next(i for i, it in enumerate(good.items) if it.op.startswith("attn"))
    first_o = next(i for i, it in enumerate(good.items) if it.op == "o")

    def wrong_target(sc):
        c, t = sc.items[first_attn].waits[0]
        sc.items[first_attn].waits[0] = (c, t - 1)

    def dropped_wait(sc):
        sc.items[first_o].waits.clear()

    def late_signal(sc):  # a qkv item moved after the attention that waits for it
        sc.items.insert(first_attn + 1, sc.items.pop(first_attn - 1))

    def reset_not_last(sc):  # the reset no longer waits: it could zero the counters under a waiter
        sc.items[-1].waits.clear()

    def too_many_waits(sc):
        sc.items[first_o].waits += sc.items[first_o].waits * 2

    for fn, msg in ((wrong_target, "signallers"), (dropped_wait, "without a dependency"),
                    (late_signal, "topological"), (reset_not_last, "reset"), (too_many_waits, "at most 2")):
        with pytest.raises(ScheduleError, match=msg):
            check_schedule(_mutate(good, fn))


# --- the kernel on the interpreter (grid of one program) ----------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(top_k=8, top_p=0.8, seed=3),
                                dict(top_k=5, top_p=0.9, temperature=0.7, seed=torch.tensor([5, 6, 7]))],
                         ids=["greedy", "shared-seed", "per-row-seeds"])
def test_persistent_frame_equals_todays_path(kw):
    torch.manual_seed(0)
    base, pers = _models()
    h, c0 = torch.randn(3, 64, device=DEVICE), torch.randint(0, 32, (3,), device=DEVICE)
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    a = base.predict_frame(h, c0, backend="triton", use_graph=False, **kw)
    b = pers.predict_frame(h, c0, backend="triton", use_graph=False, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    frame = next(iter(pers._persistent.values()))
    assert frame.error() == 0 and not frame.ws["counters"].any()  # the last item zeroed the counters
    c = pers.predict_frame(h, c0, backend="triton", use_graph=False, **kw)  # a second launch reuses them
    assert torch.equal(b[0], c[0]) and torch.equal(b[1], c[1])


def test_persistent_frame_c0_embed_and_fp16():
    torch.manual_seed(1)
    base, pers = _models(torch.float16)
    h, c0 = torch.randn(2, 64, dtype=torch.float16, device=DEVICE), torch.randint(0, 32, (2,), device=DEVICE)
    e0 = torch.randn(2, 64, dtype=torch.float16, device=DEVICE)
    for kw in (dict(do_sample=False), dict(top_k=8, top_p=0.8, seed=torch.tensor([11, 12], device=DEVICE))):
        a = base.predict_frame(h, c0, c0_embed=e0, backend="triton", use_graph=False, **kw)
        b = pers.predict_frame(h, c0, c0_embed=e0, backend="triton", use_graph=False, **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_persistent_rows_are_batch_invariant():
    torch.manual_seed(2)
    _, pers = _models()
    h, c0 = torch.randn(3, 64, device=DEVICE), torch.randint(0, 32, (3,), device=DEVICE)
    seeds = torch.tensor([21, 22, 23], device=DEVICE)
    full = pers.predict_frame(h, c0, top_k=8, top_p=0.8, seed=seeds, backend="triton", use_graph=False)
    alone = pers.predict_frame(h[1:2], c0[1:2], top_k=8, top_p=0.8, seed=seeds[1:2], backend="triton",
                               use_graph=False)
    assert torch.equal(full[0][1:2], alone[0]) and torch.equal(full[1][1:2], alone[1])


def test_reference_backend_and_fp64_keep_the_op_path():
    torch.manual_seed(3)
    _, pers = _models()
    h, c0 = torch.randn(2, 64, device=DEVICE), torch.randint(0, 32, (2,), device=DEVICE)
    pers.predict_frame(h, c0, do_sample=False, backend="reference", use_graph=False)
    assert not pers._persistent


def test_watchdog_flags_a_wait_that_never_completes():
    torch.manual_seed(4)
    _, pers = _models()
    frame = PersistentFrame(pers, 2, torch.float32, torch.device(DEVICE), (False, 0, 1.0, 1.0), False, False)
    victim = next(i for i, it in enumerate(frame.schedule.items) if it.op == "swiglu")
    wait = frame.items[victim, 1:3].clone()
    frame.items[victim, 1:3] = torch.tensor([0, 10**6])  # wait for 10^6 signals of a counter that gets 2
    h, c0 = torch.randn(2, 64, device=DEVICE), torch.randint(0, 32, (2,), device=DEVICE)
    seed = torch.zeros(1, dtype=torch.long, device=DEVICE)
    t = time.monotonic()
    frame(h, c0, None, seed, spin_limit=20)
    assert time.monotonic() - t < 600
    # the first item that timed out, and the kernel returned (with several programs on a GPU, one waiting behind
    # the victim may time out first)
    assert frame.error() == victim + 1 if interpreting() else frame.error() >= 1
    assert frame.ws["counters"].any()  # left as they were: reset() is the way back
    # the next call refuses (no silent garbage frames after a trip), without a host sync of its own
    with pytest.raises(PersistentError, match=f"item {frame.error() - 1} waited"):
        frame(h, c0, None, seed, spin_limit=20)
    frame.reset()
    assert frame.error() == 0 and not frame.ws["counters"].any()
    frame.items[victim, 1:3] = wait  # the schedule's own wait again: the frame runs after reset()
    frame(h, c0, None, seed)
    assert frame.error() == 0


def _count_launches(monkeypatch):
    """Counts every Triton launch through omni_fast.kernels.launch.launch (each kernel module binds it by name)."""
    from omni_fast.kernels import launch as L

    calls = []
    real = L.launch

    def counting(kernel, grid, *args, **kw):
        calls.append(getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?"))
        return real(kernel, grid, *args, **kw)

    for name, mod in list(sys.modules.items()):
        if name.startswith("omni_fast.") and getattr(mod, "launch", None) is real:
            monkeypatch.setattr(mod, "launch", counting)
    return calls


def test_one_launch_per_frame(monkeypatch):
    torch.manual_seed(5)
    base, pers = _models()
    h, c0 = torch.randn(2, 64, device=DEVICE), torch.randint(0, 32, (2,), device=DEVICE)
    kw = dict(top_k=8, top_p=0.8, seed=9, backend="triton", use_graph=False)
    pers.predict_frame(h, c0, **kw)  # build the schedule (and compile) outside the count
    calls = _count_launches(monkeypatch)
    base.predict_frame(h, c0, **kw)
    today = len(calls)
    calls.clear()
    pers.predict_frame(h, c0, **kw)
    assert calls == ["mtp_frame_kernel"]
    G, layers = SMALL["num_code_groups"], SMALL["num_hidden_layers"]
    assert today == (G - 1) * (5 * layers + 2) + 1  # 5 per layer + lm_head + sampler per step, + rvq_embed


@pytest.mark.parametrize("B", [1, 2, 3])
def test_odd_batches_launch_the_registered_aligned_specialisation(B):
    """Every batch size of a layout whose sizes are multiples of 16 launches ALIGNED=True, the only specialisation
    the sm_90a static check registers (ALIGNED=False spills there, and loses cp.async pipelining). A gather item's
    code-index pointer is row (step-1)*B of the int64 codes, 8-byte aligned for odd B: it must not count."""
    from omni_fast.kernels.launch import STATIC_CASES
    from omni_fast.kernels.mtp_persistent import mtp_frame_kernel  # (importing it registers its static cases)

    registered = {c.constexprs["ALIGNED"] for c in STATIC_CASES if c.kernel is mtp_frame_kernel}
    _, pers = _models()
    frame = PersistentFrame(pers, B, torch.float32, torch.device(DEVICE), (False, 0, 1.0, 1.0), False, False)
    assert frame.aligned and registered == {True}


def test_attention_pointers_count_for_alignment():
    """The attention items claim their pointers aligned too (qkv, caches, output, q/k norm weights): one that is not
    16-byte aligned (a norm weight viewed at an odd float offset of packed storage) turns ALIGNED off."""
    _, pers = _models()
    layer = pers.layers[-1]
    packed = torch.zeros(layer.k_norm.numel() + 1, dtype=layer.k_norm.dtype, device=layer.k_norm.device)
    packed[1:].copy_(layer.k_norm)
    layer.k_norm.data = packed[1:]
    frame = PersistentFrame(pers, 2, torch.float32, torch.device(DEVICE), (False, 0, 1.0, 1.0), False, False)
    assert not frame.aligned


# --- GPU ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 16, 64])
def test_gpu_persistent_matches_fused_bf16(B):
    base, pers = _models(torch.bfloat16, "cuda", {})
    torch.manual_seed(B)
    h = torch.randn(B, 1024, device="cuda", dtype=torch.bfloat16)
    c0 = torch.randint(0, 2048, (B,), device="cuda")
    a = base.predict_frame(h, c0, do_sample=False, use_graph=False)
    b = pers.predict_frame(h, c0, do_sample=False, use_graph=False)
    frame = next(iter(pers._persistent.values()))
    assert frame.error() == 0
    assert frame._compiled is not None and co_resident_grid(frame, h.device) > 1
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    seeds = torch.arange(B, device="cuda") + 100
    a = base.predict_frame(h, c0, top_k=50, top_p=0.8, seed=seeds, use_graph=False)
    b = pers.predict_frame(h, c0, top_k=50, top_p=0.8, seed=seeds, use_graph=False)
    # the sampler runs with 4 warps here, 8 in its own kernel: its fp32 sums may differ by an ulp (near-ties only)
    assert (a[0] != b[0]).any(1).sum() <= 1
    g = pers.predict_frame(h, c0, top_k=50, top_p=0.8, seed=seeds, use_graph=True)  # captured: one launch
    assert torch.equal(g[0], b[0]) and torch.equal(g[1], b[1])


@pytest.mark.gpu
def test_gpu_watchdog_with_a_full_grid():
    _, pers = _models(torch.bfloat16, "cuda", {})
    frame = PersistentFrame(pers, 4, torch.bfloat16, torch.device("cuda"), (False, 0, 1.0, 1.0), False, False)
    h = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    c0 = torch.randint(0, 2048, (4,), device="cuda")
    seed = torch.zeros(1, dtype=torch.long, device="cuda")
    frame(h, c0, None, seed)  # compile; from now on the co-resident grid
    assert frame.error() == 0
    victim = next(i for i, it in enumerate(frame.schedule.items) if it.op == "down")
    wait = frame.items[victim, 1:3].clone()
    frame.items[victim, 1:3] = torch.tensor([0, 10**6], device="cuda")
    codes, nxt = frame(h, c0, None, seed, spin_limit=1 << 16)
    torch.cuda.synchronize()
    assert frame.error() >= 1  # some program timed out (the victim, or one waiting behind it) and all returned
    # every program drained: the outputs are written, in range (tests/test_persistent_watchdog.py on the CPU)
    assert torch.equal(codes[:, 0], c0) and ((codes >= 0) & (codes < 2048)).all() and torch.isfinite(nxt).all()
    with pytest.raises(PersistentError):  # the copy of the flag has landed (synchronized above)
        frame(h, c0, None, seed)
    frame.items[victim, 1:3] = wait
    frame.reset()
    frame(h, c0, None, seed)
    torch.cuda.synchronize()
    assert frame.error() == 0
