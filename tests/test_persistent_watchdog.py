"""The persistent MTP frame after a watchdog trip (issue 16): defined outputs, the next call refuses, reset() heals.

A tripped launch drains: its programs stop waiting and run only the items that write the call's outputs, so
``codes`` holds ``c0`` in column 0 and valid codes elsewhere and ``next_input`` is their embedding sum (never
uninitialised memory that the Talker's and Code2Wav's embedding gathers would read out of bounds). The host sees the
flag without a sync, after eager calls and after CUDA-graph replays alike. CPU (interpreter, grid of one program):
the kernel's drain, the flag watch with a fake event, the graph wrapper's check with a fake replay. gpu-marked: the
same through a real capture and replay.
"""

import pytest
import torch

from omni_fast import ops
from omni_fast.models.persistent import PersistentError, PersistentFrame
from omni_fast.models.persistent.watch import FlagWatch
from omni_fast.testing import DEVICE

from test_persistent import SMALL, _models

GREEDY = (False, 0, 1.0, 1.0)


def _inputs(B, seed, device=DEVICE, dtype=torch.float32, H=64, vocab=32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, H, generator=g).to(device=device, dtype=dtype)
    c0 = torch.randint(0, vocab, (B,), generator=g).to(device)
    e0 = torch.randn(B, H, generator=g).to(device=device, dtype=dtype)
    return h, c0, e0


def _assert_defined(model, frame, codes, nxt, c0, e0, exact=True):
    """The drain's contract: column 0 is c0, every other code in [0, vocab), next = the embedding sum of the codes
    (bit for bit the rvq the frame runs on the interpreter), finite."""
    V = model.config.vocab_size
    assert torch.equal(codes[:, 0], c0)
    assert ((codes[:, 1:] >= 0) & (codes[:, 1:] < V)).all(), codes
    if e0 is None:
        want = ops.rvq_embed(codes, model.table, offsets=model.offsets, backend="triton")
    else:
        V0, G = model.codec_vocab_size, codes.shape[1]
        tables = [e0] + [model.table[V0 + g * V: V0 + (g + 1) * V] for g in range(G - 1)]
        rows = torch.arange(codes.shape[0], device=codes.device)
        want = ops.rvq_embed(torch.cat((rows[:, None], codes[:, 1:]), 1), tables, backend="triton")
    assert torch.isfinite(nxt).all()
    if exact:
        assert torch.equal(nxt, want)
    else:
        torch.testing.assert_close(nxt, want, rtol=2e-2, atol=2e-2)


def _greedy_frame(torch_seed: int, B: int, c0_embed: bool):
    """(today's CodePredictor, the persistent one, a greedy fp32 PersistentFrame of batch B, its seed tensor)."""
    torch.manual_seed(torch_seed)
    base, pers = _models()
    frame = PersistentFrame(pers, B, torch.float32, torch.device(DEVICE), GREEDY, False, c0_embed)
    return base, pers, frame, torch.zeros(1, dtype=torch.long, device=DEVICE)


def _victim(frame, op, after_step):
    """The first ``op`` item after the samplers of step ``after_step`` (0: from the start)."""
    items = frame.schedule.items
    start = max((i for i, it in enumerate(items) if it.op == "sample" and it.args["step"] == after_step), default=0)
    return next(i for i in range(start, len(items)) if items[i].op == op)


# the victim's wait never completes: nothing sampled yet / step 1 sampled / the sampler itself / an output item
@pytest.mark.parametrize("victim_op,after_step,c0_embed", [("norm", 0, True), ("swiglu", 1, False),
                                                           ("sample", 1, False), ("rvq", 3, False)])
def test_tripped_frame_returns_defined_codes_then_refuses_until_reset(victim_op, after_step, c0_embed):
    B = 3
    base, pers, frame, seed = _greedy_frame(6, B, c0_embed)
    h1, c01, e01 = _inputs(B, 1)
    good = frame(h1, c01, e01 if c0_embed else None, seed)  # fills the codes buffer with this frame's codes
    # (the codes of the steps the trip cuts off are left in the codes buffer from the frame above)
    victim = _victim(frame, victim_op, after_step)
    wait = frame.items[victim, 1:3].clone()
    frame.items[victim, 1:3] = torch.tensor([0, 10**6])  # wait for 10^6 signals of a counter that gets far fewer
    h, c0, e0 = _inputs(B, 2)
    e0 = e0 if c0_embed else None
    codes, nxt = frame(h, c0, e0, seed, spin_limit=20)
    assert frame.error() == victim + 1
    _assert_defined(pers, frame, codes, nxt, c0, e0)
    assert not torch.equal(codes, good[0])  # (c0 differs: not the earlier call's outputs)
    assert frame.ws["counters"].any()  # a drained item signals nothing, the reset item is drained too
    with pytest.raises(PersistentError, match=f"item {victim} waited"):
        frame(h, c0, e0, seed)
    frame.items[victim, 1:3] = wait
    frame.reset()
    assert frame.error() == 0 and not frame.ws["counters"].any()
    again = frame(h, c0, e0, seed)
    want = base.predict_frame(h, c0, c0_embed=e0, do_sample=False, backend="triton", use_graph=False)
    assert torch.equal(again[0], want[0]) and torch.equal(again[1], want[1])
    assert frame.error() == 0 and not frame.ws["counters"].any()


def test_a_launch_with_the_flag_already_set_drains_at_once():
    """A launch that starts with the flag set (a graph replayed before the host saw an earlier trip) runs no item
    that waits, whatever the counters say, and still writes defined outputs."""
    B = 2
    _, pers, frame, seed = _greedy_frame(7, B, False)
    h, c0, _ = _inputs(B, 3)
    first = frame(h, c0, None, seed)
    stale = frame.ws["codes"].clone()
    frame.ws["counters"].fill_(10**6)  # stale counters that would satisfy every wait
    frame.ws["err"].fill_(5)
    frame.watch.clear()  # as if the host had not seen it yet
    h2, c02, _ = _inputs(B, 4)
    codes, nxt = frame(h2, c02, None, seed, spin_limit=20)
    assert frame.error() == 5  # the first trip keeps its item
    _assert_defined(pers, frame, codes, nxt, c02, None)
    assert torch.equal(codes[:, 1:], stale[1:].T)  # no sampler ran: the codes buffer's earlier codes
    assert not torch.equal(codes, first[0])
    frame.reset()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="records the interpreter's load addresses")
def test_drained_rvq_items_stay_in_bounds_whatever_they_read():
    """On a GPU a drained ``rvq`` item may read a codes entry while a late sampler stores it: a racy read, not
    bound to any value written. Whatever it yields (here: the codes buffer poisoned with negative ids, the codebook
    size, ids of the next codebook's rows, 2^31 - 1, the int64 ends), every gather address, masked-off lanes too,
    lies inside the table (rvq_tile's clamp into each codebook), a bad id adds nothing to ``next_input``, and the
    ids copied out are clamped into [0, vocab). The prefill items (no wait: they run in a drained launch too) clamp
    the caller's c0 (value-checked only on the CPU) into codebook 0 the same way."""
    from omni_fast.testing import interpreter_loads

    B = 3
    _, pers, frame, seed = _greedy_frame(11, B, False)
    h, c0, _ = _inputs(B, 12)
    frame(h, c0, None, seed)
    V, V0, G = pers.config.vocab_size, pers.codec_vocab_size, frame.shape.groups
    big = 2**63 - 1
    poison = torch.tensor([-5, V, V + 3, 2**31 - 1, -big - 1, big, big // V, -1, V - 1])
    buf = frame.ws["codes"]
    buf[1:] = poison[torch.arange((G - 1) * B) % len(poison)].view(G - 1, B)
    before = buf.clone()
    c0[1:] = torch.tensor([V0 + 2**40, -7])  # unchecked on CUDA: the caller's ids reach the kernel as they are
    frame.ws["err"].fill_(1)  # drain from the start: only the rvq items and the prefill items (no wait) run
    frame.watch.clear()
    with interpreter_loads() as loads:
        codes, nxt = frame(h, c0, None, seed, spin_limit=20)
    assert torch.equal(buf[0], c0.clamp(0, V0 - 1)) and torch.equal(buf[1:], before[1:])
    # per row: the prefill's x row and table[c0], then G gathers (one D block: hidden 64 = RVQ_BLOCK, no tail lanes)
    assert sum(d.is_floating() for d, _ in loads.loads) == B * (2 + G)
    assert not loads.outside([pers.table, h]), loads.outside([pers.table, h])
    assert torch.equal(codes[:, 0], c0)  # (the contract: the caller's column 0 as given)
    assert torch.equal(codes[:, 1:], before[1:].T.clamp(0, V - 1))
    tables = [pers.table[:V0]] + [pers.table[V0 + g * V: V0 + (g + 1) * V] for g in range(G - 1)]
    want = ops.rvq_embed(buf.T, tables, check_values=False, backend="triton")  # a bad id adds nothing
    assert torch.equal(nxt, want)
    frame.reset()


def test_sampler_ids_stay_in_range_for_nan_logits():
    """The ids feed embedding gathers: NaN (or any) scores must never give an id outside [0, V)."""
    logits = torch.full((3, 40), float("nan"), device=DEVICE)
    logits[1, 7] = 1.0
    for kw in (dict(greedy=True), dict(top_k=5, top_p=0.9, seed=1), dict(top_p=0.5, temperature=0.7, seed=2)):
        ids = ops.sample(logits, backend="triton", **kw)
        assert ((ids >= 0) & (ids < 40)).all(), (kw, ids)


class _FakeEvent:
    def __init__(self):
        self.done, self.records = False, 0

    def record(self):
        self.records += 1

    def query(self):
        return self.done


def test_flag_watch_reads_the_copy_only_once_it_has_landed():
    flag = torch.zeros(1, dtype=torch.int32)
    host = torch.full((1,), -1, dtype=torch.int32)
    event = _FakeEvent()
    watch = FlagWatch(flag, host=host, event=event)
    assert watch.tripped() == 0  # nothing recorded yet
    watch.record()
    assert event.records == 1 and host.item() == 0
    flag.fill_(9)
    assert watch.tripped() == 0  # the copy in flight (event not done)
    event.done = True
    assert watch.tripped() == 0  # the landed copy predates the trip
    watch.record()
    assert watch.tripped() == 9 and watch._host is host  # one host word, reused
    watch.clear()
    assert watch.tripped() == 0
    live = FlagWatch(flag)  # a CPU flag: read directly
    live.record()
    assert live.tripped() == 9


class _TrippingReplay:
    """Stands in for a CUDA graph's replay: the kernel runs with no Python around it, here tripping."""

    def __init__(self, frame):
        self.frame, self.replays = frame, 0

    def replay(self):
        self.replays += 1
        self.frame.ws["err"].fill_(3)


def test_graph_replays_report_a_trip_to_the_next_call():
    torch.manual_seed(8)
    _, pers = _models()
    h, c0, _ = _inputs(2, 5)
    kw = dict(do_sample=False, backend="triton", use_graph=True)
    pers.predict_frame(h, c0, **kw)  # builds the (emulated) graph: it watches the frame its body launched
    (graph,) = pers._graphs.values()
    (frame,) = pers._persistent.values()
    assert graph.watched is frame
    # the CUDA form of the watch (a host word that only a recorded copy fills), with copies that land at once
    event = _FakeEvent()
    event.done = True
    frame.watch = FlagWatch(frame.ws["err"], host=torch.zeros(1, dtype=torch.int32), event=event)
    graph.graph = fake = _TrippingReplay(frame)
    pers.predict_frame(h, c0, **kw)  # replays (trips); the flag is recorded after the replay
    with pytest.raises(PersistentError, match="item 2 waited"):
        pers.predict_frame(h, c0, **kw)
    assert fake.replays == 1 and event.records == 1  # refused before replaying
    frame.reset()
    graph.graph = None  # back to the emulated replay
    pers.predict_frame(h, c0, **kw)
    assert frame.error() == 0


def test_graph_of_kernels_path_watches_nothing():
    torch.manual_seed(9)
    base, _ = _models()
    h, c0, _ = _inputs(2, 6)
    base.predict_frame(h, c0, do_sample=False, backend="triton", use_graph=True)
    (graph,) = base._graphs.values()
    assert graph.watched is None


@pytest.mark.gpu
def test_gpu_graph_replay_that_trips_is_reported_and_defined():
    """A captured frame whose replay trips: defined, in-range outputs; the next replay raises (no sync);
    reset() heals the same graph."""
    base, pers = _models(torch.bfloat16, "cuda", {})
    B = 4
    h, c0, _ = _inputs(B, 10, "cuda", torch.bfloat16, H=1024, vocab=2048)
    kw = dict(do_sample=False, use_graph=True)
    eager = base.predict_frame(h, c0, do_sample=False, use_graph=False)
    pers.predict_frame(h, c0, do_sample=False, use_graph=False)  # the frame the graph will capture
    (frame,) = pers._persistent.values()
    frame.spin_limit = 1 << 16  # captured with the graph: a trip costs ms, not seconds
    g = pers.predict_frame(h, c0, **kw)
    (graph,) = pers._graphs.values()
    assert graph.watched is frame and graph.graph is not None
    assert torch.equal(g[0], eager[0]) and torch.equal(g[1], eager[1])
    victim = next(i for i, it in enumerate(frame.schedule.items) if it.op == "down")
    wait = frame.items[victim, 1:3].clone()
    frame.items[victim, 1:3] = torch.tensor([0, 10**6], device="cuda")  # the graph reads the table by address
    codes, nxt = pers.predict_frame(h, c0, **kw)
    torch.cuda.synchronize()
    assert frame.error() >= 1
    _assert_defined(pers, frame, codes, nxt, c0, None, exact=False)
    with pytest.raises(PersistentError):
        pers.predict_frame(h, c0, **kw)
    frame.items[victim, 1:3] = wait
    frame.reset()
    g = pers.predict_frame(h, c0, **kw)
    torch.cuda.synchronize()
    assert frame.error() == 0
    assert torch.equal(g[0], eager[0]) and torch.equal(g[1], eager[1])


def test_reset_persistent_heals_what_a_user_holds():
    """After a trip the user resets through what they hold (the CodePredictor, the pipeline, a patched model: the
    error message names the call), never through private attributes; anything else is a TypeError naming obj."""
    from omni_fast.models.persistent import reset_persistent

    torch.manual_seed(8)
    base, pers = _models()
    B = 2
    h, c0, _ = _inputs(B, 5)
    kw = dict(do_sample=False, backend="triton", use_graph=False)
    want = base.predict_frame(h, c0, **kw)
    assert torch.equal(pers.predict_frame(h, c0, **kw)[0], want[0])
    (frame,) = pers._persistent.values()
    frame.spin_limit = 20
    victim = _victim(frame, "swiglu", 1)
    wait = frame.items[victim, 1:3].clone()
    frame.items[victim, 1:3] = torch.tensor([0, 10**6])
    pers.predict_frame(h, c0, **kw)  # trips (drains)
    with pytest.raises(PersistentError, match="reset_persistent"):
        pers.predict_frame(h, c0, **kw)
    frame.items[victim, 1:3] = wait
    # the patched-model form: patch keeps the CodePredictor in the talker's __dict__ (under a sub-module here)
    model = torch.nn.Module()
    model.talker = torch.nn.Module()
    model.talker.__dict__["_omni_fast_cp_cache"] = ("weights key", pers)
    assert reset_persistent(model) == 1
    got = pers.predict_frame(h, c0, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert reset_persistent(pers) == 1 and pers.reset_persistent() == 1
    from types import SimpleNamespace

    from omni_fast.models.components import OmniCodePredictor

    assert reset_persistent(SimpleNamespace(code_predictor=OmniCodePredictor(pers), model=None)) == 1  # pipeline
    for wrong in (3, torch.nn.Linear(2, 2), base.config):
        with pytest.raises(TypeError, match="obj must be"):
            reset_persistent(wrong)


def test_frame_built_under_inference_mode_runs_and_resets_outside_it():
    """A frame first built under torch.inference_mode() (the pipeline's / generate's) keeps normal workspace tensors:
    a call outside it and reset_persistent() (what the watchdog's error tells the user to call) work, as inside it
    (was RuntimeError 'Inplace update to inference tensor outside InferenceMode' from reset's counter zeroing)."""
    torch.manual_seed(8)
    _, pers = _models()
    h, c0, _ = _inputs(2, 5)
    kw = dict(do_sample=False, backend="triton", use_graph=False)
    with torch.inference_mode():
        inside = pers.predict_frame(h, c0, **kw)
    (frame,) = pers._persistent.values()
    assert not any(t.is_inference() for t in frame.ws.values())
    outside = pers.predict_frame(h, c0, **kw)
    assert pers.reset_persistent() == 1
    with torch.inference_mode():
        assert pers.reset_persistent() == 1
    assert torch.equal(inside[0], outside[0]) and torch.equal(inside[1], outside[1])


def test_flag_watch_host_word_made_under_inference_mode(monkeypatch):
    """The pinned host word is made by the first record(): made under torch.inference_mode(), the copy_ of a later
    record() outside it raised. (CUDA path, on the CPU: a stand-in for pinned memory and the event.)"""
    import types

    from omni_fast.models.persistent import watch as W

    fake = types.SimpleNamespace(empty=lambda *a, pin_memory=False, **k: torch.empty(*a, **k),
                                 cuda=types.SimpleNamespace(Event=_FakeEvent), inference_mode=torch.inference_mode)
    monkeypatch.setattr(W, "torch", fake)
    flag = torch.zeros(1, dtype=torch.int32)
    watch = FlagWatch(flag)
    watch._live = False  # as for a CUDA flag
    with torch.inference_mode():
        watch.record()
    flag.fill_(3)
    watch.record()
    watch._event.done = True
    assert watch.tripped() == 3


def test_reset_persistent_while_another_thread_builds_a_frame():
    """A server thread building a new persistent frame (another batch size) while reset_persistent walked the frames
    changed the dict under the walk ("dictionary changed size during iteration"). reset_persistent now walks them
    under the code predictor's ReplayGuard, which frame builds take too (stand-in frames; ~0 s)."""
    import threading

    from omni_fast.models import CodePredictor

    cp = CodePredictor()
    built = []

    def another_thread_builds():  # what _persistent_frame does: a new entry, under the guard
        with cp._shared.hold("cpu"):
            cp._persistent["another batch size"] = Frame()
            built.append(True)

    class Frame:
        def reset(self):
            t = threading.Thread(target=another_thread_builds)
            t.start()
            t.join(timeout=0.2)  # under the guard the build waits for the walk to end

    cp._persistent["one batch size"] = Frame()
    assert cp.reset_persistent() == 1
    for _ in range(50):
        if built:
            break
        threading.Event().wait(0.01)
    assert built and len(cp._persistent) == 2
