"""Backend fallback rule (omni_fast.backend.resolve_backend): "cuda", wherever it comes from (an op call's backend=,
a use_backend block, the environment variable, a model's or patch's backend=), runs each op without a CUDA C++
implementation on triton. CPU: the resolution logic and real ops on the interpreter; gpu: a whole MTP frame on
backend "cuda"."""

import pytest
import torch

import omni_fast
from omni_fast.backend import resolve_backend
from omni_fast.ops import mtp_layers
from omni_fast.testing import DEVICE

TRITON_AND_REF = ("reference", "triton")
ALL = ("reference", "triton", "cuda")


def test_ambient_cuda_falls_back_to_triton_per_op(monkeypatch):
    x = torch.zeros(2, device=DEVICE)
    with omni_fast.use_backend("cuda"):
        assert resolve_backend("op", [x], TRITON_AND_REF) == "triton"
    monkeypatch.setenv("OMNI_FAST_BACKEND", "cuda")
    assert resolve_backend("op", [x], TRITON_AND_REF) == "triton"
    with omni_fast.use_backend("reference"):  # the innermost choice still wins
        assert resolve_backend("op", [x], TRITON_AND_REF) == "reference"
    with pytest.raises(ValueError, match="not implemented"):  # no triton to fall back to either
        resolve_backend("op", [x], ("reference",))


def test_explicit_cuda_falls_back_too():
    """One rule: a model or patch pinned to "cuda" passes it as each op's backend=, and must run."""
    x = torch.zeros(2, device=DEVICE)
    assert resolve_backend("op", [x], TRITON_AND_REF, "cuda") == "triton"
    with omni_fast.use_backend("reference"):  # the call's own choice still beats the block
        assert resolve_backend("op", [x], TRITON_AND_REF, "cuda") == "triton"
    if DEVICE.type != "cuda":  # an op that has CUDA C++ still needs CUDA tensors, ambient or not
        with omni_fast.use_backend("cuda"), pytest.raises(ValueError, match="needs CUDA tensors"):
            resolve_backend("op", [x], ALL)
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            resolve_backend("op", [x], ALL, "cuda")


def test_real_op_under_ambient_cuda_runs_triton():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, generator=g).to(DEVICE)
    w = torch.randn(16, 32, generator=g).to(DEVICE)
    nw = torch.ones(32, device=DEVICE)
    want = mtp_layers.norm_linear(x, nw, w, backend="triton")
    with omni_fast.use_backend("cuda"):
        got = mtp_layers.norm_linear(x, nw, w)
    assert torch.equal(got, want)
    assert torch.equal(mtp_layers.norm_linear(x, nw, w, backend="cuda"), want)


def test_model_backend_is_applied_as_an_ambient_choice(monkeypatch):
    """CodePredictor.predict_frame(backend=...) runs the frame inside use_backend(...): the ops get no per-call
    backend (so "cuda" can fall back per op), and the ambient choice is the model's."""
    from omni_fast.backend import requested_backend
    from omni_fast.models import CodePredictor
    from omni_fast.ops import sampling as ops_sampling

    c = dict(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, num_code_groups=3)
    cp = CodePredictor(c, codec_vocab_size=10)
    with torch.no_grad():
        for p in cp.parameters():
            p.normal_(0, 0.3)
    seen = []
    real = ops_sampling._sample_op.resolve

    def spy(tensors, backend):
        seen.append((backend, requested_backend()))
        return real(tensors, backend)

    monkeypatch.setattr(ops_sampling._sample_op, "resolve", spy)
    codes, nxt = cp.predict_frame(torch.randn(2, 32), torch.tensor([1, 9]), seed=3, backend="reference")
    assert codes.shape == (2, 3) and nxt.shape == (2, 32)
    assert seen == [(None, "reference")] * 2  # G - 1 = 2 draws


def test_use_backend_as_a_decorator_opens_a_block_per_call():
    """``@use_backend(...)`` worked while it was a contextlib.contextmanager; a recursive call nests its own block
    (one shared instance would overwrite the outer call's token and leave the choice set after the return)."""
    from omni_fast.backend import requested_backend

    seen = []

    @omni_fast.use_backend("reference")
    def f(depth):
        seen.append(requested_backend())
        if depth:
            f(depth - 1)
        seen.append(requested_backend())

    before = requested_backend()
    with omni_fast.use_backend("triton"):
        f(2)
        assert requested_backend() == "triton"
    assert seen == ["reference"] * 6
    assert requested_backend() == before


def test_one_use_backend_object_entered_again_inside_itself_and_by_threads():
    """A use_backend object kept and entered again while open (a module-level ``REF = use_backend("reference")``
    used by a recursive function, or by a server's threads at once) kept one token on the object: the inner entry
    overwrote the outer's, so the outer exit raised and left "reference" set for the rest of the thread (before the
    class, the inner entry raised and the outer block closed cleanly). Tokens are per context now."""
    import threading

    from omni_fast.backend import requested_backend

    ref = omni_fast.use_backend("reference")
    seen = []

    def f(depth):
        with ref:
            seen.append(requested_backend())
            if depth:
                f(depth - 1)
            seen.append(requested_backend())

    before = requested_backend()
    f(2)
    assert seen == ["reference"] * 6 and requested_backend() == before

    inside, leave, errors = threading.Barrier(2), threading.Barrier(2), []

    def worker():  # both threads open the same object, then close it in the opposite order of their entries
        try:
            start = requested_backend()
            inside.wait(10)
            with ref:
                leave.wait(10)
            errors.append(requested_backend() == start or f"left {requested_backend()!r} set")
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == [True, True]
