"""omni_fast.compat.vllm: vLLM's fused-MoE signatures and documented behaviour, on omni-fast kernels.

Expected values are written out here densely (fp64 SwiGLU experts, softmax top-k, the alignment's invariants);
no vLLM code is used. Tiny shapes: under the CPU interpreter the Triton kernels run.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from omni_fast.compat import vllm
from omni_fast.testing import DEVICE, assert_graph_replay_matches

_REQ = inspect.Parameter.empty
_KW = inspect.Parameter.KEYWORD_ONLY
# vLLM 0.34.0's signatures (read in its sdist); keyword-only entries (3rd item) are v0.11's, kept for old callers
SIGNATURES = {
    "fused_experts": [("hidden_states", _REQ), ("w1", _REQ), ("w2", _REQ), ("topk_weights", _REQ),
                      ("topk_ids", _REQ), ("activation", vllm.MoEActivation.SILU),
                      ("apply_router_weight_on_input", False), ("global_num_experts", -1), ("expert_map", None),
                      ("quant_config", None), ("inplace", False, _KW), ("allow_deep_gemm", False, _KW)],
    "fused_topk": [("hidden_states", _REQ), ("gating_output", _REQ), ("topk", _REQ), ("renormalize", _REQ),
                   ("indices_type", None), ("scoring_func", "softmax")],
    "topk_softmax": [("topk_weights", _REQ), ("topk_ids", _REQ), ("token_expert_indices", _REQ),
                     ("gating_output", _REQ), ("renormalize", False), ("e_score_correction_bias", None),
                     ("is_padding", None)],
    "moe_align_block_size": [("topk_ids", _REQ), ("block_size", _REQ), ("num_experts", _REQ), ("expert_map", None),
                             ("pad_sorted_ids", False), ("ignore_invalid_experts", False),
                             ("return_scatter_idx", False)],
    "moe_sum": [("input", _REQ), ("output", _REQ), ("topk_ids", None), ("expert_map", None)],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_is_vllm(name):
    params = list(inspect.signature(getattr(vllm, name)).parameters.values())
    assert [(p.name, p.default) for p in params] == [entry[:2] for entry in SIGNATURES[name]]
    assert [p.kind for p in params] == [entry[2] if len(entry) > 2 else inspect.Parameter.POSITIONAL_OR_KEYWORD
                                        for entry in SIGNATURES[name]]


# --- dense expectations -----------------------------------------------------------------------------------------


def dense_experts(x, w1, w2, weights, ids, expert_map=None, weight_on_input=False):
    """fp64: out[t] = sum_j w[t,j] * W2_e (silu(W1g_e x) * W1u_e x), e the local id (pairs of remote experts: 0)."""
    x, w1, w2, weights = x.double(), w1.double(), w2.double(), weights.double()
    inter = w1.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) if expert_map is None else int(expert_map[int(ids[t, j])])
            if e < 0:
                continue
            xin = x[t] * weights[t, j] if weight_on_input else x[t]
            h = w1[e] @ xin
            y = w2[e] @ (torch.nn.functional.silu(h[:inter]) * h[inter:])
            out[t] += y if weight_on_input else weights[t, j] * y
    return out


def _moe_inputs(T=5, H=32, inter=16, E=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(DEVICE)
    w1 = (torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5).to(DEVICE)
    w2 = (torch.randn(E, H, inter, generator=g) / inter ** 0.5).to(DEVICE)
    logits = torch.randn(T, E, generator=g).to(DEVICE)
    return x, w1, w2, logits


# --- routing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_topk_and_topk_softmax(renormalize):
    x, _, _, logits = _moe_inputs(T=6, E=8)
    w, ids, tei = vllm.fused_topk(x, logits, 3, renormalize)
    probs = torch.softmax(logits.double(), -1)
    exp_w, exp_ids = probs.topk(3, -1)
    if renormalize:
        exp_w = exp_w / exp_w.sum(-1, keepdim=True)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and tei.dtype == torch.int32
    assert torch.equal(ids.long(), exp_ids)
    torch.testing.assert_close(w.double(), exp_w, rtol=1e-5, atol=1e-6)
    T = x.shape[0]
    assert torch.equal(tei, torch.tensor([[j * T + t for j in range(3)] for t in range(T)], dtype=torch.int32))
    # the out-parameter form fills what it is given and returns None; renormalize defaults to False
    w2_, ids2, tei2 = torch.empty_like(w), torch.empty_like(ids), torch.empty_like(tei)
    assert vllm.topk_softmax(w2_, ids2, tei2, logits) is None
    torch.testing.assert_close(w2_.double(), probs.topk(3, -1).values, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids2, ids) and torch.equal(tei2, tei)


def test_fused_topk_indices_type():
    x, _, _, logits = _moe_inputs()
    _, ids, _ = vllm.fused_topk(x, logits, 2, False, indices_type=torch.int64)
    assert ids.dtype == torch.int64


# --- alignment --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,k,E,block,pad", [(5, 2, 4, 4, False), (5, 2, 4, 4, True), (1, 2, 8, 16, False),
                                              (7, 3, 5, 3, True), (0, 2, 4, 4, False)])
def test_moe_align_block_size_layout(T, k, E, block, pad):
    ids = torch.randint(0, E, (T, k), dtype=torch.int32, device=DEVICE)
    numel = T * k
    sorted_ids, expert_ids, npost = vllm.moe_align_block_size(ids, block, E, pad_sorted_ids=pad)
    length = numel + E * (block - 1)
    if pad:
        length = -(-length // block) * block
    if numel < E:
        length = min(numel * block, length)
    assert sorted_ids.shape == (length,) and sorted_ids.dtype == torch.int32
    assert expert_ids.shape == (-(-length // block),) and npost.shape == (1,)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
    used = int(((counts + block - 1) // block * block).sum())
    assert int(npost) == used
    assert bool((sorted_ids[used:] == numel).all()), "padding past the used length is the sentinel numel"
    assert bool((expert_ids[-(-used // block):] == -1).all()), "unused blocks hold -1 (vLLM 0.34's kernel)"
    flat = ids.reshape(-1)
    seen = sorted_ids[:used][sorted_ids[:used] < numel]
    assert sorted(seen.tolist()) == list(range(numel)), "every pair exactly once"
    for blk in range(used // block):
        rows = sorted_ids[blk * block:(blk + 1) * block]
        real = rows[rows < numel].long()
        assert bool((flat[real] == expert_ids[blk]).all())


def test_moe_align_expert_map_and_invalid_ids():
    """vLLM 0.34: ids outside [0, E) are never counted; with ignore_invalid_experts the expert_map is applied
    first, so pairs of remote experts are not counted either and blocks hold local ids (no -1 inside the used
    length); without it every valid pair is counted and the blocks are mapped afterwards (-1 = remote)."""
    E = 4
    ids = torch.tensor([[0, 3], [1, -1], [3, 2]], dtype=torch.int32, device=DEVICE)
    emap = torch.tensor([-1, 0, -1, 1], dtype=torch.int32, device=DEVICE)  # experts 1 and 3 live here
    sorted_ids, expert_ids, npost, scatter = vllm.moe_align_block_size(ids, 2, E, emap, ignore_invalid_experts=True,
                                                                       return_scatter_idx=True)
    used = int(npost)
    assert used == 2 * 2  # local expert 0 (global 1): pair 2; local 1 (global 3): pairs 1 and 4
    assert expert_ids[:used // 2].tolist() == [0, 1] and bool((expert_ids[used // 2:] == -1).all())
    assert sorted_ids[:used].tolist() == [2, 6, 1, 4]
    assert scatter.shape == (6, 1) and scatter.view(-1).tolist() == [-1, 1, 2, -1, 4, -1]
    sorted_ids, expert_ids, npost = vllm.moe_align_block_size(ids, 2, E, emap)
    used = int(npost)
    assert used == 2 * 4  # global experts 0, 1, 2, 3: one valid pair each (the -1 pair is skipped)
    assert expert_ids[:used // 2].tolist() == [-1, 0, -1, 1]
    assert bool((expert_ids[used // 2:] == emap[-1]).all()), "vLLM indexes expert_map with the -1 of unused blocks"
    assert 3 not in sorted_ids[:used].tolist(), "the invalid pair (index 3) is dropped"
    with pytest.raises(ValueError, match="ignore_invalid_experts"):
        vllm.moe_align_block_size(ids, 2, E, emap, return_scatter_idx=True)
    _, _, _, scatter = vllm.moe_align_block_size(ids, 2, E, return_scatter_idx=True)
    assert scatter.view(-1).tolist() == [0, 1, 2, -1, 4, 5]


# --- experts ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True])
def test_fused_experts(inplace):
    x, w1, w2, logits = _moe_inputs()
    w, ids, _ = vllm.fused_topk(x, logits, 2, True)
    exp = dense_experts(x, w1, w2, w, ids)
    h = x.clone()
    out = vllm.fused_experts(h, w1, w2, w, ids, inplace)
    torch.testing.assert_close(out.double(), exp, rtol=1e-4, atol=1e-4)
    if inplace:
        assert out is h
    else:
        assert torch.equal(h, x)


def test_fused_experts_expert_map_and_router_weight_on_input():
    x, w1, w2, logits = _moe_inputs(E=6)
    w, ids, _ = vllm.fused_topk(x, logits, 2, False)
    emap = torch.tensor([-1, 0, 1, -1, 2, 3], dtype=torch.int32, device=DEVICE)
    local1, local2 = w1[:4].contiguous(), w2[:4].contiguous()
    out = vllm.fused_experts(x, local1, local2, w, ids, global_num_experts=6, expert_map=emap)
    torch.testing.assert_close(out.double(), dense_experts(x, local1, local2, w, ids, emap), rtol=1e-4, atol=1e-4)
    w1_, ids1, _ = vllm.fused_topk(x, logits, 1, False)
    out = vllm.fused_experts(x, w1[:6], w2[:6], w1_, ids1, apply_router_weight_on_input=True)
    torch.testing.assert_close(out.double(), dense_experts(x, w1, w2, w1_, ids1, weight_on_input=True),
                               rtol=1e-4, atol=1e-4)
    # vLLM 0.34: any top-k; each pair's weight scales that pair's expert input (GEMM1 is linear)
    out = vllm.fused_experts(x, w1, w2, w, ids, apply_router_weight_on_input=True)
    torch.testing.assert_close(out.double(), dense_experts(x, w1, w2, w, ids, weight_on_input=True),
                               rtol=1e-4, atol=1e-4)
    out = vllm.fused_experts(x, local1, local2, w, ids, expert_map=emap, apply_router_weight_on_input=True)
    torch.testing.assert_close(out.double(), dense_experts(x, local1, local2, w, ids, emap, weight_on_input=True),
                               rtol=1e-4, atol=1e-4)


def test_moe_sum():
    inp = torch.randn(4, 3, 8, device=DEVICE)
    out = torch.empty(4, 8, device=DEVICE)
    assert vllm.moe_sum(inp, out) is None
    torch.testing.assert_close(out, inp.sum(1))


def test_moe_sum_pad_aware():
    """vLLM 0.34: with topk_ids, slots whose id is negative (padding rows) or whose expert_map entry is negative
    are left out of the sum (even when they hold NaN)."""
    inp = torch.randn(4, 3, 8, device=DEVICE)
    ids = torch.tensor([[0, 1, 2], [-1, 1, 3], [2, 2, -1], [3, 0, 1]], dtype=torch.int32, device=DEVICE)
    inp[ids < 0] = float("nan")
    out = torch.empty(4, 8, device=DEVICE)
    assert vllm.moe_sum(inp, out, ids) is None
    torch.testing.assert_close(out, (inp.nan_to_num() * (ids >= 0)[..., None]).sum(1))
    emap = torch.tensor([0, -1, 1, -1], dtype=torch.int32, device=DEVICE)
    vllm.moe_sum(inp, out, ids, emap)
    keep = (ids >= 0) & (emap[ids.clamp(min=0).long()] >= 0)
    torch.testing.assert_close(out, (inp.nan_to_num() * keep[..., None]).sum(1))


def test_moe_activation_helpers_are_vllms():
    """vLLM 0.34's MoEActivation.from_str alias and without_mul (missing before)."""
    A = vllm.MoEActivation
    assert A.from_str("gelu_pytorch_tanh") is A.GELU_TANH and A.from_str("silu") is A.SILU
    assert [a.without_mul() for a in (A.SILU, A.GELU, A.GELU_TANH, A.RELU2)] == [
        A.SILU_NO_MUL, A.GELU_NO_MUL, A.GELU_TANH_NO_MUL, A.RELU2_NO_MUL]
    assert A.SWIGLUOAI.without_mul() is A.SWIGLUOAI and A.SILU_NO_MUL.without_mul() is A.SILU_NO_MUL
    with pytest.raises(ValueError, match="Unknown MoE activation"):
        A.from_str("tanh")


def test_fused_experts_newest_call_forms():
    """vLLM 0.34's fused_experts: activation is the 6th parameter (a MoEActivation; its string works too), no
    inplace (a new tensor), ids outside [0, E) contribute zero; v0.11's calls (positional inplace, keyword
    inplace / allow_deep_gemm, a full 10-argument positional call) give the same result."""
    x, w1, w2, logits = _moe_inputs(E=6)
    w, ids, _ = vllm.fused_topk(x, logits, 2, True)
    exp = dense_experts(x, w1, w2, w, ids)
    for act in (vllm.MoEActivation.SILU, "silu"):
        out = vllm.fused_experts(x, w1, w2, w, ids, act)
        torch.testing.assert_close(out.double(), exp, rtol=1e-4, atol=1e-4)
        assert out.data_ptr() != x.data_ptr()
    emap = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32, device=DEVICE)
    v011 = vllm.fused_experts(x, w1, w2, w, ids, False, "silu", False, 6, emap)  # v0.11's positional order
    torch.testing.assert_close(v011.double(), exp, rtol=1e-4, atol=1e-4)
    h = x.clone()
    assert vllm.fused_experts(h, w1, w2, w, ids, inplace=True, allow_deep_gemm=True) is h
    torch.testing.assert_close(h.double(), exp, rtol=1e-4, atol=1e-4)
    h = x.clone()
    assert vllm.fused_experts(h, w1, w2, w, ids, True, "silu", expert_map=emap) is h  # positional + keyword
    plain = vllm.FUSED_MOE_UNQUANTIZED_CONFIG
    out = vllm.fused_experts(x, w1, w2, w, ids, False, "silu", quant_config=plain)  # v0.11 order + keyword
    torch.testing.assert_close(out.double(), exp, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="activation given twice"):  # two values read as activations
        vllm.fused_experts(x, w1, w2, w, ids, False, "silu", "silu")
    padded = ids.clone()
    padded[1] = -1  # a padding row (topk_softmax with is_padding)
    padded[3, 0] = 6  # past the last expert
    out = vllm.fused_experts(x, w1, w2, w, padded)
    keep = (padded >= 0) & (padded < 6)
    torch.testing.assert_close(out.double(), dense_experts(x, w1, w2, w * keep, padded.clamp(0, 5)),
                               rtol=1e-4, atol=1e-4)
    assert float(out[1].abs().max()) == 0.0


def test_topk_softmax_bias_and_padding():
    """vLLM 0.34: e_score_correction_bias moves the choice only (weights are the unbiased probabilities,
    renormalised over them); is_padding rows get id -1, their weights and source rows are still written."""
    g = torch.Generator().manual_seed(3)
    T, E, k = 6, 8, 3
    logits = torch.randn(T, E, generator=g).to(DEVICE)
    bias = (torch.randn(E, generator=g) * 0.3).to(DEVICE)
    pad = torch.tensor([False, True, False, False, True, False], device=DEVICE)
    w = torch.empty(T, k, device=DEVICE)
    ids, tei = (torch.empty(T, k, dtype=torch.int32, device=DEVICE) for _ in range(2))
    for renorm in (False, True):
        vllm.topk_softmax(w, ids, tei, logits, renorm, bias, pad)
        probs = logits.double().softmax(-1)
        choice = (probs + bias.double()).topk(k, dim=-1).indices
        exp_w = probs.gather(1, choice)
        if renorm:
            exp_w = exp_w / exp_w.sum(-1, keepdim=True)
        torch.testing.assert_close(w.double(), exp_w, rtol=1e-5, atol=1e-6)
        assert torch.equal(ids.long(), torch.where(pad[:, None], -1, choice))
        assert torch.equal(tei, torch.arange(T * k, dtype=torch.int32, device=DEVICE).view(k, T).t())
    vllm.topk_softmax(w, ids, tei, logits, False, None, pad)  # padding without bias: the fused kernel's choice
    assert bool((ids[pad] == -1).all()) and bool((ids[~pad] >= 0).all())


def test_fused_topk_sigmoid():
    x, _, _, logits = _moe_inputs(E=8)
    for renorm in (False, True):
        w, ids, tei = vllm.fused_topk(x, logits, 3, renorm, torch.int64, scoring_func="sigmoid")
        top = logits.double().sigmoid().topk(3, dim=-1)
        exp = top.values / top.values.sum(-1, keepdim=True) if renorm else top.values
        torch.testing.assert_close(w.double(), exp, rtol=1e-5, atol=1e-6)
        assert ids.dtype == torch.int64 and torch.equal(ids, top.indices)
        assert torch.equal(tei, torch.arange(15, dtype=torch.int32, device=DEVICE).view(3, 5).t())


# --- torch.compile, CUDA graphs ---------------------------------------------------------------------------------


def test_torch_compile_fullgraph():
    x, w1, w2, logits = _moe_inputs()

    def f(x, logits):
        w, ids, _ = vllm.fused_topk(x, logits, 2, True)
        s, e, n = vllm.moe_align_block_size(ids, 4, 4)
        return vllm.fused_experts(x, w1, w2, w, ids).sum() + s.sum() + e.sum() + n.sum()

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x, logits), f(x, logits))


def test_torch_compile_fullgraph_newest_forms():
    """vLLM 0.34's forms trace without graph breaks too: biased + padded routing into out-parameters, sigmoid
    scoring, scatter_idx, the pad-aware moe_sum, padding ids and router weights on the input in fused_experts."""
    x, w1, w2, logits = _moe_inputs()
    bias = torch.linspace(-0.1, 0.1, 4, device=DEVICE)
    pad = torch.tensor([False, False, True, False, False], device=DEVICE)

    def f(x, logits):
        w = torch.empty(5, 2, device=DEVICE)
        ids, tei = (torch.empty(5, 2, dtype=torch.int32, device=DEVICE) for _ in range(2))
        vllm.topk_softmax(w, ids, tei, logits, True, bias, pad)
        ws, _, _ = vllm.fused_topk(x, logits, 2, True, scoring_func="sigmoid")
        s, e, n, sc = vllm.moe_align_block_size(ids, 4, 4, return_scatter_idx=True)
        out = vllm.fused_experts(x, w1, w2, w, ids, vllm.MoEActivation.SILU, True)
        summed = torch.empty(5, 32, device=DEVICE)
        vllm.moe_sum(out[:, None, :].expand(5, 2, 32), summed, ids)
        return summed.sum() + ws.sum() + s.sum() + e.sum() + n.sum() + sc.sum()

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x, logits), f(x, logits))


@pytest.mark.gpu
def test_cuda_graph_capture_moe():
    dev, dt = "cuda", torch.bfloat16
    x, w1, w2, logits = (t.to(dev) for t in _moe_inputs(T=16, H=256, inter=128, E=8))
    x, w1, w2 = x.to(dt), w1.to(dt), w2.to(dt)

    def step():
        w, ids, _ = vllm.fused_topk(x, logits, 2, True)
        return vllm.fused_experts(x, w1, w2, w, ids)

    assert_graph_replay_matches(step)


# --- bad input --------------------------------------------------------------------------------------------------


def _bad_calls():
    x, w1, w2, logits = _moe_inputs()
    w = torch.full((5, 2), 0.5)
    ids = torch.zeros(5, 2, dtype=torch.int32)
    quant = SimpleNamespace(use_int8_w8a8=True, quant_dtype=torch.int8)
    return [
        (lambda: vllm.fused_experts(x, w1, w2, w, ids, quant_config=quant), NotImplementedError, "use_int8_w8a8"),
        (lambda: vllm.fused_experts(x, w1, w2, w, ids, global_num_experts=7), ValueError, "global_num_experts"),
        (lambda: vllm.fused_experts(x, w1, w2, w[:4], ids, apply_router_weight_on_input=True), ValueError,
         "topk_weights"),
        (lambda: vllm.fused_experts(x, w1, w2, w, ids, activation="relu"), ValueError, "activation"),
        (lambda: vllm.fused_experts(x, w1, w2, w, ids, 1.5), TypeError, "activation"),
        (lambda: vllm.fused_experts(x, w1, w2, w, ids, True, inplace=True), TypeError, "inplace given twice"),
        (lambda: vllm.fused_topk(x, logits, 2, True, scoring_func="softplus"), ValueError, "scoring_func"),
        (lambda: vllm.topk_softmax(w, ids, ids.clone(), logits, True, torch.zeros(4, dtype=torch.float16)),
         TypeError, "e_score_correction_bias must have dtype"),
        (lambda: vllm.topk_softmax(w, ids, ids.clone(), logits, True, None, torch.zeros(5, dtype=torch.int32)),
         TypeError, "is_padding must have dtype"),
        (lambda: vllm.moe_sum(torch.zeros(4, 3, 8), torch.zeros(8, 4).t()), ValueError, "output"),
        (lambda: vllm.moe_sum(torch.zeros(4, 3, 8), torch.zeros(4, 8), ids[:3]), ValueError, "topk_ids"),
        (lambda: vllm.fused_experts(x[:, :8], w1, w2, w, ids), ValueError, "w13|w1"),
        (lambda: vllm.topk_softmax(w, ids, ids.clone(), logits[:4]), ValueError, "topk_weights must have shape"),
        (lambda: vllm.topk_softmax(w, ids, ids.long(), logits), TypeError, "token_expert_indices must have dtype"),
        (lambda: vllm.fused_topk(x[:4], logits, 2, True), ValueError, "gating_output"),
        (lambda: vllm.fused_topk(x, logits, 9, True), ValueError, "topk"),
        (lambda: vllm.moe_align_block_size(ids, 0, 4), ValueError, "block_size"),
        (lambda: vllm.moe_align_block_size(ids.float(), 4, 4), TypeError, "topk_ids must have dtype"),
        (lambda: vllm.moe_sum(torch.zeros(4, 3, 8), torch.zeros(4, 7)), ValueError, "output must have shape"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_names_the_argument(i):
    call, exc, match = _bad_calls()[i]
    with pytest.raises(exc, match=match):
        call()


def test_unquantized_config_object_is_accepted():
    x, w1, w2, logits = _moe_inputs()
    w, ids, _ = vllm.fused_topk(x, logits, 2, True)
    plain = SimpleNamespace(use_fp8_w8a8=False, use_int8_w8a8=False, quant_dtype=None, w1_bias=None)
    torch.testing.assert_close(vllm.fused_experts(x, w1, w2, w, ids, quant_config=plain),
                               vllm.fused_experts(x, w1, w2, w, ids))


def test_docs_moe_recipe_runs_against_vllm_module_names(monkeypatch):
    """docs/compat.md's vLLM MoE recipe, run as written against stand-in modules under vLLM 0.34's names (vLLM is
    not installed here): afterwards vLLM's lookups find omni-fast's functions, and a router-style call through
    ``vllm._custom_ops.topk_softmax`` (the in-place output form) routes as ``ops.route_topk`` does."""
    import re
    import sys
    import types
    from pathlib import Path

    from omni_fast import ops

    names = ["vllm", "vllm._custom_ops", "vllm.model_executor", "vllm.model_executor.layers",
             "vllm.model_executor.layers.fused_moe", "vllm.model_executor.layers.fused_moe.fused_moe",
             "vllm.model_executor.layers.fused_moe.router",
             "vllm.model_executor.layers.fused_moe.router.fused_topk_router"]
    for name in names:
        mod = types.ModuleType(name)
        mod.__path__ = []  # a package, so the submodule imports resolve through sys.modules
        monkeypatch.setitem(sys.modules, name, mod)
        if "." in name:
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, mod)
    doc = (Path(__file__).resolve().parent.parent / "docs" / "compat.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "vops.topk_softmax" in b]
    exec(compile(block, "docs/compat.md", "exec"), {})
    vops = sys.modules["vllm._custom_ops"]
    assert vops.topk_softmax is vllm.topk_softmax and vops.moe_sum is vllm.moe_sum
    assert sys.modules["vllm.model_executor.layers.fused_moe.fused_moe"].fused_experts is vllm.fused_experts
    assert sys.modules["vllm.model_executor.layers.fused_moe.router.fused_topk_router"].fused_topk is vllm.fused_topk
    logits = torch.randn(6, 8, device=DEVICE)
    w = torch.empty(6, 2, device=DEVICE)
    ids = torch.empty(6, 2, dtype=torch.int32, device=DEVICE)
    vops.topk_softmax(w, ids, torch.empty(6, 2, dtype=torch.int32, device=DEVICE), logits, True)
    want_w, want_ids = ops.route_topk(logits, top_k=2)
    torch.testing.assert_close(w, want_w)
    assert torch.equal(ids, want_ids.to(ids.dtype))
