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



def test_use_backend_block_across_a_graph_break():
    """Without fullgraph, a graph break inside the block: the code after the break (the resumed graph) still runs
    on the block's backend, the code after the block does not, and nothing is left behind."""
    from omni_fast import backend

    code = {"triton": 1, "cuda": 2, "reference": 3, "auto": 4}

    def f(x):
        out = [x + code[backend.requested_backend()]]
        with omni_fast.use_backend("reference"):
            out.append(x + code[backend.requested_backend()])
            torch._dynamo.graph_break()
            out.append(x + code[backend.requested_backend()])
        out.append(x + code[backend.requested_backend()])
        return torch.stack(out)

    torch._dynamo.reset()
    fn = torch.compile(f, backend="aot_eager")
    for _ in range(2):
        assert fn(torch.zeros(1))[:, 0].tolist() == [4, 3, 3, 4]
        assert backend._TRACED_BLOCKS == [] and backend.requested_backend() == "auto"


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


# --- the sweep: every public op and compat entry point, compiled vs eager -----------------------------------------
# The calls and their good arguments are the bad-argument sweep's (tests/reliability_cases.py: every entry point),
# plus the compat entry points it does not list. The arguments travel as one dict argument of the compiled
# function, so tensors are graph inputs and ints / floats are symbolic under dynamic=True (as a serving engine's).

I32 = torch.int32
NOT_OPS = ("QuantizedExperts", "QuantizedExperts.fp8_block", "QuantizedExperts.fp8_channel",  # constructors
           "moe_experts[fp8_channel]", "compat.vllm.fused_experts[fp8]", "compat.vllm.fused_experts[int4]")


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _fp8_experts():
    w13, w2 = _t(4, 32, 16).to(torch.float8_e4m3fn), _t(4, 16, 16, seed=1).to(torch.float8_e4m3fn)
    return ops.QuantizedExperts.fp8_channel(w13, w2, torch.rand(4, 32, 1) / 100 + 1e-3,
                                            torch.rand(4, 16, 1) / 100 + 1e-3)


def _fp8_quant_config():
    """vLLM's per-channel fp8 quant_config, built before the region as vLLM builds it (at layer init)."""
    from omni_fast.compat import vllm

    return vllm.fp8_w8a8_moe_quant_config(w1_scale=torch.rand(4, 32) / 100 + 1e-3, w2_scale=torch.rand(4, 16) / 100
                                          + 1e-3, a1_scale=torch.tensor([0.01]), per_out_ch_quant=True)


def _under(fn):
    """A peer-signature function (no backend argument) run inside a use_backend block (inside the region)."""
    def call(backend, **kw):
        with omni_fast.use_backend(backend):
            return fn(**kw)
    return call


def _filled(fn, *names):
    """An out-parameter function (returns None): returns the tensors it filled."""
    def call(backend, **kw):
        _under(fn)(backend, **kw)
        return tuple(kw[n] for n in names)
    return call


def _extra_entries():
    """name -> (fn(backend=..., **kw), good kwargs, whether triton runs it): the entry points the reliability sweep
    does not list, and the quantized ones whose containers are built before the region."""
    from omni_fast.compat import flash_attn as fa
    from omni_fast.compat import vllm

    cu = torch.tensor([0, 1, 4], dtype=I32)
    routing = dict(topk_weights=torch.rand(3, 2), topk_ids=torch.tensor([[0, 3], [1, 2], [3, 1]], dtype=I32))
    return {
        "moe_experts[fp8_channel]": (ops.moe_experts, dict(hidden_states=_t(3, 16), w13=_fp8_experts(), w2=None,
                                                           **routing), True),
        "compat.vllm.fused_experts[fp8]": (_under(vllm.fused_experts), dict(
            hidden_states=_t(3, 16), w1=_t(4, 32, 16, seed=1).to(torch.float8_e4m3fn),
            w2=_t(4, 16, 16, seed=2).to(torch.float8_e4m3fn), **routing, quant_config=_fp8_quant_config()), True),
        "compat.vllm.fused_experts": (_under(vllm.fused_experts), dict(
            hidden_states=_t(3, 8), w1=_t(4, 8, 8, seed=1) * 0.1, w2=_t(4, 8, 4, seed=2) * 0.1, **routing), True),
        "compat.vllm.fused_topk": (_under(vllm.fused_topk), dict(hidden_states=_t(3, 8), gating_output=_t(3, 6),
                                                                 topk=2, renormalize=True), True),
        "compat.vllm.moe_sum": (_filled(vllm.moe_sum, "output"), dict(input=_t(3, 2, 8), output=torch.empty(3, 8),
                                                                      topk_ids=routing["topk_ids"]), False),
        "compat.flash_attn.flash_attn_func": (_under(fa.flash_attn_func), dict(
            q=_t(2, 3, 2, 8), k=_t(2, 3, 1, 8, seed=1), v=_t(2, 3, 1, 8, seed=2), causal=True), True),
        "compat.flash_attn.flash_attn_qkvpacked_func": (_under(fa.flash_attn_qkvpacked_func), dict(
            qkv=_t(2, 3, 3, 2, 8), return_attn_probs=True), False),
        "compat.flash_attn.flash_attn_kvpacked_func": (_under(fa.flash_attn_kvpacked_func), dict(
            q=_t(2, 3, 2, 8), kv=_t(2, 3, 2, 1, 8, seed=1), softcap=5.0), False),
        "compat.flash_attn.flash_attn_varlen_func": (_under(fa.flash_attn_varlen_func), dict(
            q=_t(4, 2, 8), k=_t(4, 1, 8, seed=1), v=_t(4, 1, 8, seed=2), cu_seqlens_q=cu, cu_seqlens_k=cu,
            max_seqlen_q=3, max_seqlen_k=3, causal=True, return_attn_probs=True), True),
        "compat.flash_attn.flash_attn_varlen_qkvpacked_func": (_under(fa.flash_attn_varlen_qkvpacked_func), dict(
            qkv=_t(4, 3, 2, 8), cu_seqlens=cu, max_seqlen=3, window_size=(1, 0)), False),
        "compat.flash_attn.flash_attn_varlen_kvpacked_func": (_under(fa.flash_attn_varlen_kvpacked_func), dict(
            q=_t(4, 2, 8), kv=_t(4, 2, 1, 8, seed=1), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3,
            max_seqlen_k=3), False),
        "compat.flash_attn.flash_attn_with_kvcache": (_under(fa.flash_attn_with_kvcache), dict(
            q=_t(2, 1, 2, 8), k_cache=_t(2, 5, 1, 8, seed=1), v_cache=_t(2, 5, 1, 8, seed=2),
            k=_t(2, 1, 1, 8, seed=3), v=_t(2, 1, 1, 8, seed=4), cache_seqlens=torch.tensor([1, 3], dtype=I32),
            causal=True, return_softmax_lse=True), True),
    }


def _mutating_entries():
    """Calls that write their inputs (in-place RoPE, conv states, a paged cache, out=): functionalized by the
    compiler, so each is run compiled and the written tensors compared too."""
    def mrope_inplace(backend, q, k, positions):
        ops.mrope(q, k, positions, mrope_section=(4, 0, 0), backend=backend)
        return q, k

    def conv_state(backend, x, weight, state):
        return ops.causal_conv1d(x, weight, state=state, update_state=True, backend=backend) + (state,)

    def varlen_paged(backend, q, k_cache, v_cache, cu, block_table, seqused_k, out):
        return ops.flash_attn_varlen(q, k_cache, v_cache, cu, cu, 3, 5, causal=True, block_table=block_table,
                                     seqused_k=seqused_k, out=out, backend=backend), out

    def kvcache_paged(backend, k_cache, v_cache, **kw):
        return ops.flash_attn_with_kvcache(k_cache=k_cache, v_cache=v_cache, causal=True, backend=backend, **kw), \
            k_cache, v_cache

    return {
        "mrope[inplace]": (mrope_inplace, dict(q=_t(3, 2, 8), k=_t(3, 1, 8, seed=1), positions=torch.arange(3)),
                           False),
        "causal_conv1d[update_state]": (conv_state, dict(x=_t(1, 4, 6), weight=_t(4, 4, 3, seed=1),
                                                         state=_t(1, 4, 2, seed=2)), False),
        "flash_attn_varlen[paged,out]": (varlen_paged, dict(
            q=_t(4, 2, 8), k_cache=_t(3, 4, 1, 8, seed=1), v_cache=_t(3, 4, 1, 8, seed=2),
            cu=torch.tensor([0, 1, 4], dtype=I32), block_table=torch.tensor([[2, 0], [1, 0]], dtype=I32),
            seqused_k=torch.tensor([2, 5], dtype=I32), out=torch.empty(4, 2, 8)), False),
        "flash_attn_with_kvcache[paged]": (kvcache_paged, dict(
            q=_t(2, 1, 2, 8), k_cache=_t(4, 4, 1, 8, seed=1), v_cache=_t(4, 4, 1, 8, seed=2),
            k=_t(2, 1, 1, 8, seed=3), v=_t(2, 1, 1, 8, seed=4), cache_seqlens=torch.tensor([1, 5], dtype=I32),
            block_table=torch.tensor([[3, 0], [1, 2]], dtype=I32)), False),
    }


def _sweep():
    import reliability_cases as rc

    entries = {name: (fn, make(), compare) for name, (fn, make, compare) in rc._entries().items()
               if name not in NOT_OPS}
    return {**entries, **_extra_entries(), **_mutating_entries()}


SWEEP = _sweep()


def _clone(kw):
    # fresh buffers per run (in-place ops write them); containers built before the region are shared, read-only
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def _same(got, want, name):
    if isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), name
        for g, w in zip(got, want):
            _same(g, w, name)
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want) or torch.allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True), name
    else:
        assert got == want, name


def _params():
    for name, (_, _, triton) in SWEEP.items():
        for dynamic in (True, False):
            # Triton (interpreter: slow) once per native op: the trace differs from the reference's only in the
            # backend string of the op call, and a compat wrapper's trace only in the code around the same ops
            triton_too = triton and dynamic and not name.startswith("compat.")
            for backend in ("reference", "triton") if triton_too else ("reference",):
                yield pytest.param(name, dynamic, backend, id=f"{name}-{'dynamic' if dynamic else 'static'}-{backend}")


@pytest.mark.parametrize("name,dynamic,backend", list(_params()))
def test_every_entry_point_compiles_fullgraph_as_eager(name, dynamic, backend):
    fn, kw, _ = SWEEP[name]
    with torch.no_grad():
        want = fn(**_clone(kw), backend=backend)
        got = _compiled(lambda kw: fn(**kw, backend=backend), dynamic)(_clone(kw))
    _same(got, want, name)
