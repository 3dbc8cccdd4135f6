"""vLLM 0.34's ``fused_experts`` skips pairs whose id is outside ``[0, global_num_experts)`` (the -1 of padding rows,
ids past the last expert): here every backend of the native op drops them itself (the internal ``check_ids=False``
of :func:`omni_fast.ops.moe._experts`), with no masking launch and no host sync, while the native
:func:`omni_fast.ops.moe_experts` still refuses them.

"The masked result" below is what the compat layer computed before (each invalid pair given weight 0 and id 0,
then the native op): the results must equal it, backend by backend, float and quantized experts.
"""

from __future__ import annotations

import pytest
import torch

import omni_fast
from omni_fast import ops
from omni_fast.compat import vllm
from omni_fast.compat import vllm_quant
from omni_fast.ops import moe as native_moe
from omni_fast.testing import DEVICE, HostSyncs

# "cuda": moe_experts has no CUDA C++ twin, so the backend runs the Triton path (checked in the test)
BACKENDS = ["triton", "reference", "cuda"]
H, INTER, E_GLOBAL, E_LOCAL = 32, 16, 6, 4
EMAP = [-1, 0, 1, -1, 2, 3]  # global experts 1, 2, 4, 5 live here


def _masked(weights, ids, num):
    """The former compat masking: invalid pairs get weight 0 and id 0."""
    valid = (ids >= 0) & (ids < num)
    return torch.where(valid, weights, 0), torch.where(valid, ids, 0)


def _bad_routing(T, k, num, id_dtype=torch.int32, nan_on_invalid=True, seed=0):
    """x ``[T, H]``, weights ``[T, k]``, ids ``[T, k]`` with invalid ids: row 1, 4, ... all -1 (padding rows);
    rows 0, 3, ... one bad id in slot 0 (-1, num, num + 5, -3 and, for int64, 2**32 + 1, whose low word is a valid
    id); rows 2, 5, ... one in the last slot. Invalid pairs carry NaN weights with ``nan_on_invalid`` (they must
    contribute exactly zero, not 0 * NaN)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w = torch.rand(T, k, generator=g)
    ids = torch.stack([torch.randperm(num, generator=g)[:k] for _ in range(T)]).to(id_dtype) if T else \
        torch.empty(0, k, dtype=id_dtype)
    bad = [-1, num, num + 5, -3] + ([2 ** 32 + 1] if id_dtype == torch.int64 else [])
    for t in range(T):
        if t % 3 == 1:
            ids[t] = -1
        else:
            ids[t, 0 if t % 3 == 0 else k - 1] = bad[(t // 3 + t % 3) % len(bad)]
    if nan_on_invalid:
        w = torch.where((ids >= 0) & (ids < num), w, float("nan"))
    return x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE)


def _weights(E, seed=1):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(E, 2 * INTER, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, INTER, generator=g) / INTER ** 0.5
    return w1.to(DEVICE), w2.to(DEVICE)


CASES = {  # name: (top_k, id dtype, expert_map?, apply_router_weight_on_input)
    "minus1-and-past-E": (2, torch.int32, False, False),
    "int64-ids": (3, torch.int64, False, False),
    "expert-map-remote": (2, torch.int32, True, False),
    "weight-on-input-k1": (1, torch.int32, False, True),
    "weight-on-input-k2": (2, torch.int32, False, True),
    "expert-map-weight-on-input": (2, torch.int64, True, True),
}


@pytest.mark.parametrize("T", [0, 1, 7])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_ids_match_the_masked_result(backend, case, T):
    k, id_dtype, with_map, on_input = CASES[case]
    x, w, ids = _bad_routing(T, k, E_GLOBAL, id_dtype)
    w1, w2 = _weights(E_LOCAL if with_map else E_GLOBAL)
    kw = dict(apply_router_weight_on_input=on_input)
    if with_map:
        kw.update(global_num_experts=E_GLOBAL, expert_map=torch.tensor(EMAP, dtype=torch.int32, device=DEVICE))
    with omni_fast.use_backend(backend):
        if backend == "cuda":
            assert native_moe._fused_moe_op.resolve((x,), None) == "triton"
        got = vllm.fused_experts(x, w1, w2, w, ids, **kw)
        want = vllm.fused_experts(x, w1, w2, *_masked(w, ids, E_GLOBAL), **kw)
    assert got.shape == (T, H) and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want)
    if T > 1:
        assert float(got[1].abs().max()) == 0.0, "a padding row (all ids -1) is zero"


def _quant_case(fmt):
    from test_compat_vllm_quant import _cfg, _fp8_block_weights, _int4_weights

    if fmt == "fp8_block":
        (w1, w2), (s1, s2), _ = _fp8_block_weights(16, 32)
        return w1, w2, _cfg(use_fp8_w8a8=True, quant_dtype=torch.float8_e4m3fn, block_shape=[16, 32], w1_scale=s1,
                            w2_scale=s2)
    (w1, s1, z1, _), (w2, s2, z2, _) = _int4_weights(16, True, torch.float32)
    return w1, w2, _cfg(use_int4_w4a16=True, block_shape=[0, 16], w1_scale=s1, w2_scale=s2, w1_zp=z1, w2_zp=z2)


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("fmt", ["fp8_block", "int4_w4a16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_invalid_ids_match_the_masked_result(backend, fmt, T):
    from test_compat_vllm_quant import E as E_Q, H as H_Q

    w1, w2, cfg = _quant_case(fmt)
    _, w, ids = _bad_routing(T, 2, E_Q)
    x = torch.randn(T, H_Q, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with omni_fast.use_backend(backend):
        got = vllm.fused_experts(x, w1, w2, w, ids, quant_config=cfg)
        want = vllm.fused_experts(x, w1, w2, *_masked(w, ids, E_Q), quant_config=cfg)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="value checks run on CPU tensors only (no sync on CUDA)")
@pytest.mark.parametrize("quantized", [False, True])
def test_native_moe_experts_still_refuses_invalid_ids(quantized):
    """The switch is internal: the native op's default is unchanged (ValueError naming topk_ids)."""
    x, w, ids = _bad_routing(3, 2, 4, nan_on_invalid=False)
    if quantized:
        w1, w2, cfg = _quant_case("fp8_block")
        from test_compat_vllm_quant import H as H_Q

        x = torch.randn(3, H_Q)
        w13, w2 = vllm_quant.experts_from_vllm(w1, w2, cfg), None
    else:
        w13, w2 = _weights(4)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="topk_ids must lie in"):
            ops.moe_experts(x, w13, w2, w, ids, backend=backend)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the CPU's check (interpreter counter, HostSyncs)")
def test_no_masking_launch_and_no_host_sync(cuda_like_validation):
    """The counter (omni_fast.bench.costmodel) sees the experts' 4 Triton launches and no PyTorch op (the former
    masking was 7 counted aten ops: ge, lt, and, 2 where + their 2 scalar operands); apply_router_weight_on_input
    with k = 2 keeps its documented 3 (scale, ones, sum; fp32 weights on fp32 activations: no cast). No host sync in any of these bodies."""
    from omni_fast.bench.costmodel.counter import count_launches, summarize

    x, w, ids = _bad_routing(4, 2, E_GLOBAL)
    w1, w2 = _weights(E_GLOBAL)
    local1, local2 = _weights(E_LOCAL)
    emap = torch.tensor(EMAP, dtype=torch.int32)
    bodies = {"plain": (lambda: vllm.fused_experts(x, w1, w2, w, ids), 0),
              "expert_map": (lambda: vllm.fused_experts(x, local1, local2, w, ids, expert_map=emap), 0),
              "on_input_k2": (lambda: vllm.fused_experts(x, w1, w2, w, ids, apply_router_weight_on_input=True), 3)}
    for name, (body, torch_ops) in bodies.items():
        counts = summarize(count_launches(body))
        assert counts == {"triton": 4, "torch": torch_ops, "total": 4 + torch_ops}, (name, counts)
        with torch.no_grad(), HostSyncs(host_data=True) as syncs:
            body()
        assert not syncs.count, (name, syncs.report())


@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_nan_weights_on_remote_pairs_add_zero(backend, on_input):
    """Valid ids whose expert lives on another rank (``expert_map`` -1) are dropped like invalid ids: vLLM writes
    zeros for their blocks before any routed weight is applied, so a NaN weight there must not reach the output
    (0 * NaN), in either place the weight is applied."""
    g = torch.Generator().manual_seed(5)
    T, k = 5, 2
    x = torch.randn(T, H, generator=g).to(DEVICE)
    ids = torch.stack([torch.randperm(E_GLOBAL, generator=g)[:k] for _ in range(T)]).to(torch.int32).to(DEVICE)
    w = torch.rand(T, k, generator=g).to(DEVICE)
    emap = torch.tensor(EMAP, dtype=torch.int32, device=DEVICE)
    remote = emap[ids.long()] < 0
    assert bool(remote.any()) and not bool(remote.all())
    w1, w2 = _weights(E_LOCAL)
    kw = dict(global_num_experts=E_GLOBAL, expert_map=emap, apply_router_weight_on_input=on_input)
    with omni_fast.use_backend(backend):
        got = vllm.fused_experts(x, w1, w2, torch.where(remote, float("nan"), w), ids, **kw)
        want = vllm.fused_experts(x, w1, w2, torch.where(remote, 0.0, w), ids, **kw)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want)
