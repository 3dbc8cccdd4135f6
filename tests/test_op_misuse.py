"""Misuse of the public ops that the one-argument sweep (tests/reliability_cases.py) does not reach: inputs that
require grad where the op would drop them silently, meta tensors (shape propagation), and out= buffers of the
quantized MoE path that share memory with an input. Tiny shapes, reference backend unless a kernel is the point."""

import pytest
import torch

from omni_fast import ops

I32 = torch.int32


def _moe_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g)
    w13, w2 = torch.randn(4, 32, 16, generator=g) * 0.1, torch.randn(4, 16, 16, generator=g) * 0.1
    return x, w13, w2, torch.rand(3, 2, generator=g), torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=I32)


def _fp8_experts():
    g = torch.Generator().manual_seed(1)
    w13 = (torch.randn(4, 32, 16, generator=g) * 0.1).to(torch.float8_e4m3fn)
    w2 = (torch.randn(4, 16, 16, generator=g) * 0.1).to(torch.float8_e4m3fn)
    return ops.QuantizedExperts.fp8_channel(w13, w2, torch.rand(4, 32, 1, generator=g) / 10 + 1e-2,
                                            torch.rand(4, 16, 1, generator=g) / 10 + 1e-2)


# --- inputs that require grad: the MoE output was a fresh tensor outside the graph (no error, grads lost) ----------


@pytest.mark.parametrize("arg", ["hidden_states", "w13", "w2", "topk_weights"])
def test_moe_experts_refuses_inputs_that_require_grad(arg):
    x, w13, w2, tw, ids = _moe_inputs()
    kw = dict(hidden_states=x, w13=w13, w2=w2, topk_weights=tw)
    kw[arg] = kw[arg].clone().requires_grad_()
    with pytest.raises(ValueError, match=f"inference-only.*{arg}"):
        ops.moe_experts(kw["hidden_states"], kw["w13"], kw["w2"], kw["topk_weights"], ids, backend="reference")
    with torch.no_grad():  # the documented way: no graph is recorded, the call runs
        ops.moe_experts(kw["hidden_states"], kw["w13"], kw["w2"], kw["topk_weights"], ids, backend="reference")


def test_moe_block_and_quantized_experts_refuse_inputs_that_require_grad():
    x, w13, w2, tw, ids = _moe_inputs()
    xg, gate = x.clone().requires_grad_(), torch.randn(4, 16).requires_grad_()
    with pytest.raises(ValueError, match="inference-only.*hidden_states"):
        ops.moe_block(xg, gate.detach(), w13, w2, 2, backend="reference")
    with pytest.raises(ValueError, match="inference-only.*gate_weight"):
        ops.moe_block(x, gate, w13, w2, 2, backend="reference")
    with pytest.raises(ValueError, match="inference-only.*hidden_states"):
        ops.moe_block(xg, gate.detach(), _fp8_experts(), None, 2, backend="reference")
    with pytest.raises(ValueError, match="inference-only.*topk_weights"):
        ops.moe_experts(x, _fp8_experts(), None, tw.requires_grad_(), ids, backend="reference")


def test_kvcache_append_and_conv_states_refuse_new_tokens_that_require_grad():
    """The appended k/v and the conv-state inputs are copied into buffers outside the graph: their grads were lost."""
    q, kc, vc = torch.randn(2, 1, 2, 8), torch.randn(2, 5, 1, 8), torch.randn(2, 5, 1, 8)
    k, v = torch.randn(2, 1, 1, 8).requires_grad_(), torch.randn(2, 1, 1, 8)
    with pytest.raises(ValueError, match="inference-only.*k"):
        ops.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([1, 3], dtype=I32),
                                    backend="reference")
    with pytest.raises(ValueError, match="inference-only.*inputs\\[0\\]"):
        ops.update_conv_states([torch.randn(2, 3, 4)], [torch.randn(2, 3, 2).requires_grad_()], backend="reference")


# --- meta tensors: every meta tensor has address 0, which read as "overlapping" --------------------------------------


def test_meta_tensors_are_not_reported_as_overlapping():
    m = dict(device="meta")
    out = ops.flash_attn_with_kvcache(torch.empty(2, 1, 2, 8, **m), torch.empty(2, 5, 1, 8, **m),
                                      torch.empty(2, 5, 1, 8, **m), torch.empty(2, 1, 1, 8, **m),
                                      torch.empty(2, 1, 1, 8, **m), cache_seqlens=torch.zeros(2, dtype=I32, **m),
                                      backend="reference")
    assert out.shape == (2, 1, 2, 8) and out.device.type == "meta"
    ops.topk_softmax(torch.empty(3, 2, **m), torch.empty(3, 2, dtype=I32, **m), torch.empty(3, 2, dtype=I32, **m),
                     torch.empty(3, 6, **m), False)
    with pytest.raises(ValueError, match="overlapping"):  # a stride-0 output still overlaps itself
        ops.mrope(torch.empty(1, 2, 8, **m).expand(3, 2, 8), torch.empty(3, 1, 8, **m),
                  torch.zeros(3, dtype=I32, **m), mrope_section=(4, 0, 0))


# --- quantized MoE out=: written while the inputs are read -------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quantized_moe_out_must_not_overlap_an_input(backend):
    x, _, _, _, ids = _moe_inputs()
    experts = _fp8_experts()
    with pytest.raises(ValueError, match="out must not overlap hidden_states"):
        ops.moe_block(x, torch.randn(4, 16), experts, None, 2, out=x, backend=backend)
    buf = torch.rand(64)  # out's last row and topk_weights share memory (the combine reads it while writing out)
    with pytest.raises(ValueError, match="out must not overlap topk_weights"):
        ops.moe_experts(x, experts, None, buf[40:46].view(3, 2), ids, out=buf[:48].view(3, 16), backend=backend)


def test_update_conv_states_names_the_list_index_after_an_empty_state():
    """Empty states are skipped: the errors named the index among the non-empty pairs (states[0] for states[1])."""
    empty, s1, x1 = torch.randn(2, 3, 0), torch.randn(2, 5, 4), torch.randn(2, 5, 2)
    with pytest.raises(ValueError, match=r"states\[1\] must not overlap inputs\[1\]"):
        ops.update_conv_states([empty, s1], [torch.randn(2, 3, 2), s1[:, :, :2]], backend="reference")
    with pytest.raises(TypeError, match=r"inputs\[1\] must have the same dtype"):
        ops.update_conv_states([empty, s1], [torch.randn(2, 3, 2), x1.double().half()], backend="reference")


# --- empty dimensions past the first (the sweep empties dim 0 only) ----------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_padded_conv1d_refuses_an_empty_kernel_or_an_input_shorter_than_it(backend):
    """k = 0: the Triton backend returned 10 samples of garbage for 7 inputs, the reference a RuntimeError; an input
    too short for the kernel (or empty): the reference raised torch's RuntimeError, Triton returned [] or bias-only
    samples (nn.Conv1d refuses both)."""
    w = torch.randn(5, 4, 3)
    with pytest.raises(ValueError, match="weight needs a kernel size of at least 1"):
        ops.padded_conv1d(torch.randn(1, 4, 7), torch.randn(5, 4, 0), padding=1, backend=backend)
    for x, padding in ((torch.randn(1, 4, 1), 0), (torch.randn(1, 4, 0), 2)):
        with pytest.raises(ValueError, match="x has 1 samples|x has 0 samples"):
            ops.padded_conv1d(x, w, padding=padding, backend=backend)
    assert ops.padded_conv1d(torch.randn(0, 4, 7), w, padding=1, backend=backend).shape == (0, 5, 7)


def test_moe_block_with_an_empty_hidden_dimension_is_a_named_error():
    """hidden_states [T, 0]: ``reshape(-1, 0)`` raised torch's RuntimeError before any check."""
    _, w13, w2, _, _ = _moe_inputs()
    with pytest.raises(ValueError, match="w13 must have shape"):
        ops.moe_block(torch.randn(3, 0), torch.randn(4, 0), w13, w2, 2, backend="reference")
    with pytest.raises(ValueError, match="hidden size"):
        ops.moe_block(torch.randn(3, 0), torch.randn(4, 0), _fp8_experts(), None, 2, backend="reference")


# --- torch.compile(dynamic=True): a default float argument is a SymFloat there -------------------------------------


def test_ops_compile_fullgraph_with_dynamic_shapes():
    """Under ``dynamic=True`` dynamo makes the ops' default floats (softcap, theta, eps, temperature) symbolic, and
    ``math.isnan`` of a SymFloat in check_float broke the graph ("torch.* op returned non-Tensor")."""
    torch._dynamo.reset()
    cu = torch.tensor([0, 1, 4], dtype=I32)

    def f(q, k, v, x, logits):
        o = ops.flash_attn_varlen(q, k, v, cu, cu, None, None, causal=True, backend="reference")
        rq, _ = ops.mrope(q, k, torch.arange(q.shape[0]), mrope_section=(4, 0, 0), inplace=False, backend="reference")
        y = ops.ada_layer_norm(x, x[:, 0], x[:, 1], backend="reference")
        return o, rq, y, ops.sample(logits, seed=3, backend="reference")

    args = (torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8), torch.randn(2, 5, 7), torch.randn(2, 9))
    with torch.no_grad():
        got = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)(*args)
        want = f(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# --- inference tensors written outside torch.inference_mode() ---------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_writing_an_inference_tensor_outside_inference_mode_is_a_named_error(backend):
    """A cache / state / out= buffer made under torch.inference_mode() (a server's warm-up) and written outside it:
    the reference raised torch's RuntimeError ("Inplace update to inference tensor ...") from inside the op, the
    Triton kernels wrote it anyway (the two backends disagreed); now a ValueError naming the buffer on both."""
    with torch.inference_mode():
        kc, vc, state, out = torch.randn(2, 5, 1, 8), torch.randn(2, 5, 1, 8), torch.randn(2, 3, 4), torch.empty(3, 16)
    q, k, v = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8)
    lens = torch.tensor([1, 3], dtype=I32)
    with pytest.raises(ValueError, match="k_cache is an inference tensor"):
        ops.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, backend=backend)
    with pytest.raises(ValueError, match=r"states\[0\] is an inference tensor"):
        ops.update_conv_states([state], [torch.randn(2, 3, 2)], backend=backend)
    x, w13, w2, tw, ids = _moe_inputs()
    with pytest.raises(ValueError, match="out is an inference tensor"):
        ops.moe_experts(x, w13, w2, tw, ids, out=out, backend=backend)
    with torch.inference_mode():  # where they were made, they are written
        ops.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, backend=backend)
        ops.update_conv_states([state], [torch.randn(2, 3, 2)], backend=backend)
