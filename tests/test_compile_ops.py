"""torch.compile(fullgraph=True) of the public ops, under dynamic=True and dynamic=False, against eager.

A serving engine compiles the model that calls our ops (vLLM: ``torch.compile(dynamic=...)``, fullgraph where it
can), so every entry point must trace without a graph break and give the eager result.
"""

from __future__ import annotations

import pytest
import torch

import omni_fast
from omni_fast import ops

DYNAMIC = [pytest.param(True, id="dynamic"), pytest.param(False, id="static")]


def _compiled(fn, dynamic):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")


# --- sample(suppress_ranges=...) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", DYNAMIC)
def test_sample_suppress_ranges_traces_in_every_form(dynamic):
    """(lo, hi) ints passed to the compiled function: dynamo cannot sort SymInts ("sort with non-constant keys",
    dynamic=True); 0-d tensor ends: ``int()`` of a traced value ("Could not guard on data-dependent expression")."""
    logits = torch.randn(3, 20)
    r = torch.tensor([[0, 4], [10, 12], [15, 15]])

    def from_ints(x, lo, hi):
        return ops.sample(x, seed=3, suppress_ranges=[(lo, hi), (10, 12)], backend="reference")

    def from_0d(x, t):
        return ops.sample(x, seed=3, suppress_ranges=[(t[0, 0], t[0, 1]), (t[1, 0], 12)], backend="reference")

    def from_tensor(x, t):
        return ops.sample(x, seed=3, greedy=True, suppress_ranges=t, backend="reference")

    for fn, args in ((from_ints, (logits, 2, 5)), (from_0d, (logits, r)), (from_tensor, (logits, r)),
                     (from_tensor, (logits, r[:0])), (from_tensor, (logits, r.int()))):
        got = _compiled(fn, dynamic)(*args)
        assert torch.equal(got, fn(*args)), fn.__name__


@pytest.mark.parametrize("dynamic", DYNAMIC)
def test_sample_suppress_ranges_checks_under_compile_as_in_eager(dynamic):
    """Python int ends are checked at trace time (comparisons become guards), as in eager; values inside tensors
    cannot be (data-dependent): the kernels' rule applies, ``[lo, hi)`` with lo >= hi is empty and a row with
    every id suppressed gives id 0, as on a device tensor in eager."""
    logits = torch.randn(2, 8)

    def from_ints(x, lo, hi):
        return ops.sample(x, seed=1, suppress_ranges=[(lo, hi)], backend="reference")

    fn = _compiled(from_ints, dynamic)
    assert torch.equal(fn(logits, 1, 3), from_ints(logits, 1, 3))
    # fullgraph=True reports an error raised while tracing as dynamo's Unsupported("Observed exception"), quoting it
    with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match="lo <= hi"):
        fn(logits, 3, 1)
    with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match="whole vocabulary"):
        fn(logits, 0, 8)
    assert torch.equal(fn(logits, 2, 6), from_ints(logits, 2, 6))

    def from_tensor(x, t):
        return ops.sample(x, seed=1, suppress_ranges=t, backend="reference")

    fn = _compiled(from_tensor, dynamic)
    assert fn(logits, torch.tensor([[-5, 100]])).tolist() == [0, 0]  # every id suppressed: id 0
    empty = torch.tensor([[6, 2]])  # lo > hi: suppresses nothing
    assert torch.equal(fn(logits, empty), ops.sample(logits, seed=1, backend="reference"))



@pytest.mark.parametrize("dynamic", DYNAMIC)
def test_sample_without_a_seed_traces(dynamic):
    """seed=None drew a host int (``.item()``), then range-checked it: "Could not guard on data-dependent
    expression" under fullgraph. Now a tensor drawn from torch's default generator: the same draw in eager, and
    in the graph (aot_eager runs the same generator; inductor has its own RNG, random all the same)."""
    logits = torch.randn(2, 9)

    def f(x):
        return ops.sample(x, backend="reference")

    fn = _compiled(f, dynamic)
    torch.manual_seed(0)
    want = f(logits)
    torch.manual_seed(0)
    assert torch.equal(fn(logits), want)


# --- use_backend inside the compiled region ---------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", DYNAMIC)
def test_use_backend_block_inside_a_compiled_region(dynamic):
    """``with use_backend(...)`` inside the compiled function: ContextVar.set is not traceable ("Unsupported method
    call"). The block's choice holds for the ops inside it, nested blocks and the code after them, and the ambient
    choice outside the region is left as it was."""
    from omni_fast.backend import requested_backend

    code = {"triton": 1, "cuda": 2, "reference": 3, "auto": 4}

    def f(x):
        out = [x + code[requested_backend()]]
        with omni_fast.use_backend("reference"):
            out.append(x + code[requested_backend()])
            with omni_fast.use_backend("triton"):
                out.append(x + code[requested_backend()])
            out.append(x + code[requested_backend()])
        out.append(x + code[requested_backend()])
        return torch.stack(out)

    x = torch.zeros(2)
    assert _compiled(f, dynamic)(x)[:, 0].tolist() == f(x)[:, 0].tolist() == [4, 3, 1, 3, 4]
    with omni_fast.use_backend("cuda"):  # an ambient block is read when the region is traced (docs/ARCHITECTURE.md)
        assert _compiled(f, dynamic)(x)[:, 0].tolist() == f(x)[:, 0].tolist() == [2, 3, 1, 3, 2]
    assert requested_backend() == "auto"


@pytest.mark.parametrize("dynamic", DYNAMIC)
def test_an_op_in_a_use_backend_block_runs_that_backend_when_compiled(dynamic, monkeypatch):
    from omni_fast.ops import sampling

    ran = []
    monkeypatch.setitem(sampling._sample_op._impls, "reference",
                        lambda *a: (ran.append("reference"), sampling._sample_reference(*a))[1])

    def f(x):
        with omni_fast.use_backend("reference"):
            return ops.sample(x, seed=2)

    logits = torch.randn(2, 16)
    assert torch.equal(_compiled(f, dynamic)(logits), ops.sample(logits, seed=2, backend="reference"))
    assert "reference" in ran  # TRITON_INTERPRET=1: "auto" would have run triton


def test_use_backend_checks_its_name_when_traced():
    def f(x):
        with omni_fast.use_backend("tpu"):
            return x + 1

    with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match="use_backend"):
        _compiled(f, False)(torch.zeros(1))

