"""MoE kernels (Triton; the interpreter on CPU) vs the reference, through the public ops: moe_experts, the TMA weight
path, tuned configs, moe_block; bad input; tracing; the benchmark cases. Also: test_moe_routing.py (routing,
alignment), test_moe_cuda.py (GPU real shapes, CUDA C++ routing and its emulated logic)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omni_fast
from omni_fast import ops
from omni_fast.kernels import moe_gemm
from omni_fast.reference import moe as ref
from omni_fast.testing import DEVICE, KERNEL_DTYPES, assert_matches_reference

from _moe_helpers import (  # noqa: F401  (fixtures)
    _block_weights,
    _check_fused,
    _ids,
    _tma_expected,
    _weights,
    weight_path,
)


# --- moe_experts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,k,H,I", [
    (0, 4, 2, 32, 16),      # no tokens
    (1, 8, 2, 32, 16),      # decode
    (13, 6, 3, 40, 24),     # odd T, E not a power of two, H and I not multiples of the tiles
    (9, 4, 4, 48, 32),      # top_k == E
    (3, 12, 2, 64, 40),     # most experts get no token
    (45, 5, 2, 36, 20),     # several M tiles per expert
])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_fused_moe_kernel(T, E, k, H, I, dtype, weight_path):
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    w13, w2 = _weights(E, H, I, dtype)
    w = torch.rand(T, k, device=DEVICE)
    _check_fused(x, w13, w2, w, _ids(T, E, k))
    assert weight_path.used == _tma_expected(weight_path, T, H, I, dtype)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(0, 40), E=st.integers(1, 12), H=st.integers(1, 70), I=st.integers(1, 50), data=st.data(),
       dtype=st.sampled_from(KERNEL_DTYPES))
def test_fused_moe_kernel_random_shapes(T, E, H, I, data, dtype, weight_path):
    k = data.draw(st.integers(1, E))
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    w13, w2 = _weights(E, H, I, dtype)
    weight_path.used.clear()  # one fixture for every hypothesis example
    _check_fused(x, w13, w2, torch.rand(T, k, device=DEVICE), _ids(T, E, k))
    assert weight_path.used == _tma_expected(weight_path, T, H, I, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_fused_moe_all_tokens_to_one_expert(dtype, weight_path):
    T, E, H, I = 21, 6, 32, 24
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    w13, w2 = _weights(E, H, I, dtype)
    ids = torch.full((T, 1), 4, dtype=torch.int32, device=DEVICE)
    _check_fused(x, w13, w2, torch.rand(T, 1, device=DEVICE), ids)


@pytest.mark.parametrize("cfg", [
    dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=16, BLOCK_SIZE_K=16, GROUP_SIZE_M=2, num_warps=4, num_stages=2),
    dict(BLOCK_SIZE_M=32, BLOCK_SIZE_N=32, BLOCK_SIZE_K=16, GROUP_SIZE_M=4, num_warps=4, num_stages=2,
         down=dict(BLOCK_SIZE_N=16, BLOCK_SIZE_K=32, GROUP_SIZE_M=1)),
])
def test_fused_moe_kernel_small_tiles_grouped_order(cfg, weight_path):
    """Several K iterations, partial N/K tiles, grouped (m, n) order, separate down-GEMM config. On the TMA path,
    gate tiles that run past I read the first up rows and the last expert's tiles run past the end of the weights
    (zero fill): only output columns that are never stored see them."""
    T, E, k, H, I = 19, 5, 2, 56, 40
    x = torch.randn(T, H, device=DEVICE)
    w13, w2 = _weights(E, H, I, torch.float32)
    _check_fused(x, w13, w2, torch.rand(T, k, device=DEVICE), _ids(T, E, k), config=weight_path.config(cfg))
    assert weight_path.used == _tma_expected(weight_path, T, H, I, torch.float32)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_fused_moe_expert_map(dtype, weight_path):
    """Expert parallelism: this rank holds global experts 5, 0, 3 (local 0, 1, 2); the others contribute zero."""
    T, E, k, H, I = 17, 8, 3, 32, 24
    emap = torch.full((E,), -1, dtype=torch.int32)
    emap[[5, 0, 3]] = torch.tensor([0, 1, 2], dtype=torch.int32)
    emap = emap.to(DEVICE)
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    w13, w2 = _weights(3, H, I, dtype)
    ids = _ids(T, E, k)
    out = _check_fused(x, w13, w2, torch.rand(T, k, device=DEVICE), ids, expert_map=emap)
    # A token routed only to remote experts gets exactly zero.
    remote_only = ~((emap[ids.long()] >= 0).any(dim=1))
    assert bool((out[remote_only] == 0).all())
    assert weight_path.used == _tma_expected(weight_path, T, H, I, dtype)


def test_fused_moe_out_argument_and_model_dtype_weights():
    T, E, k, H, I = 6, 4, 2, 32, 16
    x = torch.randn(T, H, device=DEVICE, dtype=torch.float16)
    w13, w2 = _weights(E, H, I, torch.float16)
    w = torch.rand(T, k, device=DEVICE).half()
    ids = _ids(T, E, k)
    out = torch.full_like(x, float("nan"))
    res = ops.moe_experts(x, w13, w2, w, ids, out=out, backend="triton")
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, ops.moe_experts(x, w13, w2, w, ids, backend="reference"), rtol=2e-3, atol=2e-3)


def test_tuned_file_fallback_prefers_the_newest_triton_version(tmp_path, monkeypatch):
    """Another Triton version's file is used when this version has none: 3.10 beats 3.9 (numeric, not text)."""
    from omni_fast.kernels import launch

    assert moe_gemm.version_key("3.10.0+git1a2b") == (3, 10, 0) > moe_gemm.version_key("3.9.1") == (3, 9, 1)
    assert moe_gemm.version_key("nightly") == ()
    family = tmp_path / moe_gemm.CONFIG_FAMILY
    family.mkdir()
    dev = torch.device("cpu")
    for ver, bm in (("3.9.0", 16), ("3.10.0", 32), ("3.2.0", 64)):
        stem = moe_gemm.config_file_stem(8, 16, torch.float16, dev, triton_version=ver)
        (family / f"{stem}.json").write_text('{"1": {"BLOCK_SIZE_M": %d}}' % bm)
    monkeypatch.setattr(launch, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(moe_gemm, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(moe_gemm.triton, "__version__", "9.9.9")  # no file for "this" version
    find = moe_gemm._find_tuned.__wrapped__  # uncached
    assert find(8, 16, torch.float16, dev, 1) == {"BLOCK_SIZE_M": 32}
    assert find(8, 16, torch.bfloat16, dev, 1) is None


def test_tuned_config_directory_is_in_the_package():
    """``omni_fast/configs/moe`` exists in the checkout (so kernels.launch reads it) and omni_fast.bench.tune_moe writes
    there by default."""
    from omni_fast.bench import tune_moe
    from omni_fast.kernels import launch

    assert launch.CONFIG_DIR.name == "configs" and launch.CONFIG_DIR.parent.name == "omni_fast"
    assert tune_moe.OUT_DIR.resolve() == (launch.CONFIG_DIR / moe_gemm.CONFIG_FAMILY).resolve()
    assert (tune_moe.OUT_DIR / "README.md").is_file()


def test_fused_moe_is_deterministic(weight_path):
    T, E, k, H, I = 40, 6, 3, 32, 16
    x = torch.randn(T, H, device=DEVICE)
    w13, w2 = _weights(E, H, I, torch.float32)
    w, ids = torch.rand(T, k, device=DEVICE), _ids(T, E, k)
    a = ops.moe_experts(x, w13, w2, w, ids, backend="triton")
    b = ops.moe_experts(x, w13, w2, w, ids, backend="triton")
    assert torch.equal(a, b)


# --- TMA descriptors for the weight tiles -------------------------------------------------------------------------


def test_stacked_weight_descriptor_layout_checks():
    """A descriptor over ``[E, N, K]`` seen as ``[E*N, K]`` exactly when TMA can address it; ``None`` otherwise."""
    from omni_fast.kernels.tma import matrix_descriptor, stacked_matrix_descriptor

    w = torch.randn(3, 10, 24, dtype=torch.float16)
    d = stacked_matrix_descriptor(w, (16, 32))
    assert d is not None and list(d.shape) == [30, 24] and list(d.strides) == [24, 1]
    assert list(d.block_shape) == [16, 32] and d.base.data_ptr() == w.data_ptr()
    assert stacked_matrix_descriptor(w[1:], (16, 32)).base.data_ptr() == w[1].data_ptr()  # 480 B offset: aligned
    flat = torch.randn(3 * 10 * 24 + 1, dtype=torch.float16)
    rejected = {
        "base not 16-byte aligned": flat[1:].view(3, 10, 24),
        "row stride 36 * 2 B": torch.randn(3, 10, 36, dtype=torch.float16),
        "experts not evenly spaced rows": torch.randn(3, 16, 24, dtype=torch.float16)[:, :10],
        "last dim not unit-stride": torch.randn(3, 24, 10, dtype=torch.float16).transpose(1, 2),
        "integer weights": torch.zeros(3, 10, 24, dtype=torch.int32),
        "no experts": torch.randn(0, 10, 24, dtype=torch.float16),
    }
    for why, bad in rejected.items():
        assert stacked_matrix_descriptor(bad, (16, 32)) is None, why
    for block in ((16, 24), (512, 32), (16, 4), (0, 32)):  # not a power of two, > 256 rows, 8-byte rows, empty
        assert matrix_descriptor(w, 30, 24, 24, block) is None, block
    # Size-1 dimensions may carry any stride: one expert, or one row per expert.
    one_expert = torch.randn(300).as_strided((1, 10, 24), (7, 24, 1))
    assert list(stacked_matrix_descriptor(one_expert, (16, 16)).shape) == [10, 24]
    one_row = torch.randn(4, 32)[:, None, :8]  # [4, 1, 8] with experts 32 elements apart
    assert list(stacked_matrix_descriptor(one_row, (16, 8)).strides) == [32, 1]


@pytest.mark.parametrize("layout", ["unaligned_base", "unaligned_rows", "strided_experts"])
def test_fused_moe_tma_falls_back_to_pointers(layout):
    """USE_TMA with weights TMA cannot address: the kernels take the pointer path and stay exact."""
    T, E, k, H, I = 9, 4, 2, 32, 24
    dtype = torch.float16
    w13, w2 = _weights(E, H, I, dtype)
    if layout == "unaligned_base":
        buf = torch.empty(w13.numel() + 1, dtype=dtype, device=DEVICE)
        w13 = buf[1:].view_as(w13).copy_(w13)
    elif layout == "unaligned_rows":  # H = 36 fp16: 72-byte rows
        H = 36
        w13, w2 = _weights(E, H, I, dtype)
    else:  # every expert's block sits inside a larger allocation
        w13 = torch.cat([w13, w13[:, :8]], dim=1)[:, : 2 * I]
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    cfg = dict(moe_gemm.default_config(T, E, k, H, I, dtype), USE_TMA=True)
    up, down = moe_gemm._split(cfg)
    assert down["USE_TMA"] and moe_gemm.weight_source(w13, up) is w13
    _check_fused(x, w13, w2, torch.rand(T, k, device=DEVICE), _ids(T, E, k), config=cfg)


def test_tuned_config_selects_the_weight_path_per_gemm():
    """``USE_TMA`` at the top level drives the gate/up GEMM; ``down`` may choose differently; absent = pointers."""
    base = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=3)
    assert [c["USE_TMA"] for c in moe_gemm._split(base)] == [False, False]
    assert [c["USE_TMA"] for c in moe_gemm._split(dict(base, USE_TMA=True))] == [True, True]
    assert [c["USE_TMA"] for c in moe_gemm._split(dict(base, USE_TMA=True, down={"USE_TMA": False}))] == [True,
                                                                                                         False]
    assert all(not c.get("USE_TMA", False) for c in moe_gemm._split(moe_gemm.default_config(1, 128, 8, 2048, 768,
                                                                                             torch.bfloat16)))


def test_tune_search_space_includes_the_tma_path():
    from omni_fast.bench import tune_moe

    space = tune_moe.search_space(True, 16, True, 2)
    assert {c["USE_TMA"] for c in space} == {False, True}
    assert all(c["BLOCK_SIZE_N"] <= 256 and c["BLOCK_SIZE_K"] <= 256 for c in space if c["USE_TMA"])


def test_tuner_runs_end_to_end_on_the_interpreter_and_its_file_round_trips(tmp_path, monkeypatch):
    """omni_fast.bench.tune_moe's whole CLI on the CPU (interpreter; on a GPU machine, on the GPU) with a stub timer and a two-config search space (pointer
    and TMA weight path): every candidate launch runs, the JSON lands in --out-dir, and the op's own lookup
    (``moe_gemm._find_tuned`` -> ``kernels.launch.tuned_config``, what get_config uses on a GPU) reads it back into a
    config fused_moe runs with."""
    import json

    from omni_fast.bench import tune_moe
    from omni_fast.kernels import launch

    calls = []

    def bench(fn):
        fn()  # the real launch, on the interpreter
        calls.append(fn)
        return 10.0 - len(calls)  # each candidate "faster" than the last: the last (TMA) one wins

    def space(block_m, gated, elem):
        return [dict(BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=16, BLOCK_SIZE_K=16, GROUP_SIZE_M=1, num_warps=4,
                     num_stages=2, USE_TMA=tma) for tma in (False, True)]

    out = tmp_path / moe_gemm.CONFIG_FAMILY
    E, N, H, k = 4, 16, 32, 2
    argv = ["--device", DEVICE.type, "--n", str(N), "--experts", str(E), "--hidden", str(H), "--top-k", str(k),
            "--tokens", "1", "5", "--dtype", "fp16", "--out-dir", str(out)]
    assert tune_moe.main(argv, bench=bench, space=space) == 0
    assert len(calls) == 2 * 2 * 2  # buckets x GEMMs x candidates (BLOCK_M 16 only at these sizes)
    dev = DEVICE
    path = out / f"{moe_gemm.config_file_stem(E, N, torch.float16, dev)}.json"
    table = json.loads(path.read_text())
    want = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=16, BLOCK_SIZE_K=16, GROUP_SIZE_M=1, num_warps=4, num_stages=2,
                USE_TMA=True, down=dict(BLOCK_SIZE_N=16, BLOCK_SIZE_K=16, GROUP_SIZE_M=1, num_warps=4, num_stages=2,
                                        USE_TMA=True))
    assert table == {"1": want, "5": want}
    monkeypatch.setattr(launch, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(moe_gemm, "CONFIG_DIR", tmp_path)
    cfg = moe_gemm._find_tuned.__wrapped__(E, N, torch.float16, dev, 4)
    assert cfg == want
    x = torch.randn(3, H, device=DEVICE).to(torch.float16)
    w13, w2 = _weights(E, H, N, torch.float16)
    _check_fused(x, w13, w2, torch.rand(3, k, device=DEVICE), _ids(3, E, k), config=cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path of the CLI")
def test_tuner_cli_without_a_gpu_exits_2(tmp_path, capsys):
    from omni_fast.bench import tune_moe

    assert tune_moe.main(["--tokens", "1", "--out-dir", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --- moe_block ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [0, 40], ids=["thinker", "talker"])
@pytest.mark.parametrize("T", [1, 11, 70])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_moe_block_kernel(shared, T, dtype, weight_path):
    E, k, H, I = 10, 3, 48, 24
    g, w13, w2, sw13, sw2, sg = _block_weights(E, H, I, shared, dtype)
    x = torch.randn(1, T, H, device=DEVICE).to(dtype)
    out = ops.moe_block(x, g, w13, w2, k, shared_w13=sw13, shared_w2=sw2, shared_gate_weight=sg, backend="triton")
    same = ref.moe_block(x, g, w13, w2, k, True, sw13, sw2, sg)
    # fp64 reference with the same routing decisions (routing in fp64 could flip near-ties).
    xf = x.reshape(T, H)
    w, ids = ref.router(xf, g, k)
    d = torch.float64
    exact = ref.fused_moe(xf.to(d), w13.to(d), w2.to(d), w.to(d), ids)
    if shared:
        exact = exact + ref.shared_expert(xf.to(d), sw13.to(d), sw2.to(d), sg.to(d))
    assert out.shape == x.shape
    assert_matches_reference(out.reshape(T, H), exact, same.reshape(T, H), name="moe_block")
    assert weight_path.used and all(u == weight_path.use_tma for u in weight_path.used)  # every shape aligned


def test_moe_block_kernel_expert_map_and_no_renorm():
    E, k, H, I, T = 9, 3, 32, 24, 13
    g, w13, w2, sw13, sw2, sg = _block_weights(E, H, I, 40, torch.float32)
    emap = torch.where(torch.arange(E) % 2 == 0, torch.arange(E) // 2, -1).to(DEVICE, torch.int32)
    local = emap >= 0
    x = torch.randn(T, H, device=DEVICE)
    kw = dict(renormalize=False, shared_w13=sw13, shared_w2=sw2, shared_gate_weight=sg, expert_map=emap)
    out = ops.moe_block(x, g, w13[local], w2[local], k, backend="triton", **kw)
    want = ops.moe_block(x, g, w13[local], w2[local], k, backend="reference", **kw)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# --- backends, tracing, bad input --------------------------------------------------------------------------------


def test_backends_agree_and_context_manager_selects():
    T, E, k, H, I = 5, 4, 2, 32, 16
    x = torch.randn(T, H, device=DEVICE)
    w13, w2 = _weights(E, H, I, torch.float32)
    w, ids = torch.rand(T, k, device=DEVICE), _ids(T, E, k)
    with omni_fast.use_backend("reference"):
        a = ops.moe_experts(x, w13, w2, w, ids)
    b = ops.moe_experts(x, w13, w2, w, ids, backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_traces_under_torch_compile():
    T, E, k, H, I = 4, 4, 2, 32, 16
    x = torch.randn(T, H, device=DEVICE)
    g = torch.randn(E, H, device=DEVICE)
    w13, w2 = _weights(E, H, I, torch.float32)

    def f(x):
        # An explicit backend: dynamo cannot trace the use_backend() context variable lookup.
        w, ids = ops.route_topk(x @ g.T, k, backend="triton")
        s, e, n = ops.align_moe_blocks(ids, 16, E, backend="triton")
        return ops.moe_experts(x, w13, w2, w, ids, backend="triton"), s, n

    out, s, n = torch.compile(f, fullgraph=True, backend="eager")(x)
    w, ids = ref.topk_softmax(x @ g.T, k)
    torch.testing.assert_close(out, ref.fused_moe(x, w13, w2, w, ids), rtol=1e-5, atol=1e-5)
    assert s.shape == ref.moe_align_block_size(ids, 16, E)[0].shape


def _good():
    T, E, k, H, I = 3, 4, 2, 16, 8
    return dict(hidden_states=torch.randn(T, H), w13=torch.randn(E, 2 * I, H), w2=torch.randn(E, H, I),
                topk_weights=torch.rand(T, k), topk_ids=torch.tensor([[0, 1], [2, 3], [1, 0]], dtype=torch.int32))


@pytest.mark.parametrize("over,exc,match", [
    (dict(topk_ids=torch.tensor([[0, 1], [2, 4], [1, 0]], dtype=torch.int32)), ValueError, "topk_ids"),
    (dict(topk_ids=torch.tensor([[0, 1], [2, -1], [1, 0]], dtype=torch.int32)), ValueError, "topk_ids"),
    (dict(topk_ids=torch.zeros(3, 2)), TypeError, "topk_ids"),
    (dict(topk_ids=torch.zeros(3, 5, dtype=torch.int32)), ValueError, "top_k"),
    (dict(topk_ids=torch.zeros(2, 2, dtype=torch.int32)), ValueError, "topk_ids"),
    (dict(topk_weights=torch.rand(3, 3)), ValueError, "topk_weights"),
    (dict(w13=torch.randn(4, 16, 16).half()), TypeError, "w13"),
    (dict(w13=torch.randn(4, 15, 16)), ValueError, "w13"),
    (dict(w13=torch.randn(4, 16, 12)), ValueError, "w13"),
    (dict(w2=torch.randn(3, 16, 8)), ValueError, "w2"),
    (dict(w2=torch.randn(4, 16, 9)), ValueError, "w2"),
    (dict(hidden_states=torch.randn(3, 16, 1)), ValueError, "hidden_states"),
    (dict(hidden_states=torch.randint(0, 3, (3, 16))), TypeError, "hidden_states"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(expert_map=torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)), ValueError, "expert_map"),
    (dict(expert_map=torch.tensor([0, 1, 2, 3], dtype=torch.int64)), TypeError, "expert_map"),
    (dict(out=torch.empty(3, 15)), ValueError, "out"),
    (dict(out=torch.empty(3, 16, dtype=torch.float16)), TypeError, "out"),
])
def test_fused_moe_bad_input(over, exc, match):
    args = _good()
    args.update(over)
    kw = {key: args.pop(key) for key in ("activation", "expert_map", "out") if key in args}
    with pytest.raises(exc, match=match):
        ops.moe_experts(*args.values(), **kw)


def test_expert_map_with_fewer_global_experts_than_top_k():
    a = _good()
    emap = torch.tensor([0], dtype=torch.int32)  # one global expert but k = 2
    with pytest.raises(ValueError, match="top_k"):
        ops.moe_experts(a["hidden_states"], a["w13"], a["w2"], a["topk_weights"], a["topk_ids"], expert_map=emap)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.route_topk(torch.randn(3, 4), 5), ValueError, "top_k"),
    (lambda: ops.route_topk(torch.randn(3, 4), 0), ValueError, "top_k"),
    (lambda: ops.route_topk(torch.randn(3, 4, 2), 1), ValueError, "router_logits"),
    (lambda: ops.route_topk(torch.randint(0, 3, (3, 4)), 1), TypeError, "router_logits"),
    (lambda: ops.align_moe_blocks(torch.tensor([[0, 4]]), 16, 4), ValueError, "topk_ids"),
    (lambda: ops.align_moe_blocks(torch.tensor([[0, 1]]), 0, 4), ValueError, "block_size"),
    (lambda: ops.align_moe_blocks(torch.tensor([[0.0, 1.0]]), 16, 4), TypeError, "topk_ids"),
    (lambda: ops.align_moe_blocks(torch.tensor([[0, 1]]), 16, 4, torch.zeros(3, dtype=torch.int32)),
     ValueError, "expert_map"),
    (lambda: ops.moe_block(torch.randn(3, 16), torch.randn(5, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8), 2),
     ValueError, "gate_weight"),
    (lambda: ops.moe_block(torch.randn(3, 16), torch.randn(4, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8), 2,
                           out=torch.empty(16, 3).T), ValueError, "out"),
    (lambda: ops.moe_block(torch.randn(3, 16), torch.randn(4, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8), 5),
     ValueError, "top_k"),
    (lambda: ops.moe_block(torch.randn(3, 16), torch.randn(4, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8), 2,
                           shared_w13=torch.randn(8, 16)), ValueError, "together"),
    (lambda: ops.moe_block(torch.randn(3, 16), torch.randn(4, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8), 2,
                           shared_w13=torch.randn(8, 16), shared_w2=torch.randn(16, 5),
                           shared_gate_weight=torch.randn(1, 16)), ValueError, "shared_w2"),
])
def test_other_ops_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bench_cases_build_and_check():
    from omni_fast.bench.cases import moe as cases

    full = cases.cases("full")
    assert len(full) == 2 * len(cases.TOKENS["full"]) + len(cases.BLOCK_TOKENS["full"])
    assert all(c.op == "moe" and c.bytes > 0 and c.flops > 0 for c in full)
    decode = next(c for c in full if c.name == "thinker experts T=1")
    assert decode.params["touched_experts"] == 8
    # The talker block runs at every T of the issue, like the experts.
    assert sorted(c.params["T"] for c in full if c.params.get("block")) == sorted(cases.TOKENS["full"])
    for check in {c.check for c in full}:
        check()
    # The omni_fast_tma provider: omni_fast's launch config with the TMA weight path in both GEMMs.
    cfg = cases.tma_config(1, 128, 8, 2048, 768, torch.device("cpu"))
    plain = moe_gemm.get_config(1, 128, 8, 2048, 768, torch.bfloat16, torch.device("cpu"))
    assert [c["USE_TMA"] for c in moe_gemm._split(cfg)] == [True, True]
    assert [dict(c, USE_TMA=True) for c in moe_gemm._split(plain)] == list(moe_gemm._split(cfg))


def test_bench_cases_bound_is_the_issues_roofline():
    """% of roofline as the issue defines it: decode (T <= 64) against HBM bandwidth (touched weight bytes),
    prefill (T >= 4096) against the bf16 matmul rate (FLOPs), set explicitly per case, so the thinker at T=4096
    (byte floor larger on an H100-like roofline) still reports % of the compute roof. In between the harness
    picks the larger floor ("auto"): thinker experts at T=1024 are memory bound there."""
    from omni_fast.bench import harness
    from omni_fast.bench.cases import moe as cases

    roof = {"copy_gbps": 3000.0, "matmul_tflops": 800.0}  # bytes/s 3.0e12, flop/s 8.0e14
    by_name = {c.name: c for c in cases.cases("full")}
    for name, c in by_name.items():
        T = c.params["T"]
        numbers = "memory" if c.bytes / 3.0e12 >= c.flops / 8.0e14 else "compute"
        want = "memory" if T <= 64 else "compute" if T >= 4096 else numbers
        assert c.bound == ("memory" if T <= 64 else "compute" if T >= 4096 else "auto"), name
        assert harness.resolve_bound(c, roof) == want, name
        assert c.tags == (("decode",) if T <= 64 else ("prefill",) if T >= 4096 else ()), name
    assert harness.resolve_bound(by_name["thinker experts T=4096"], roof) == "compute"
    assert by_name["thinker experts T=4096"].bytes / 3.0e12 > by_name["thinker experts T=4096"].flops / 8.0e14
    assert harness.resolve_bound(by_name["thinker experts T=1024"], roof) == "memory"
    assert harness.resolve_bound(by_name["talker block T=16384"], roof) == "compute"
    fixed = cases.Case(op="x", name="x", params={}, setup=lambda d: {}, flops=1e15, bytes=1.0, bound="memory")
    assert harness.resolve_bound(fixed, roof) == "memory"


def test_bench_block_case_bytes_use_the_block_routing():
    """The talker block case counts the experts its own router picks for its (fixed) inputs."""
    from omni_fast.bench.cases import moe as cases

    E, k, H, I, Is = cases.MODELS["talker"]
    for T in cases.BLOCK_TOKENS["full"][:3]:
        x, g, touched = cases._block_inputs(T)
        assert touched == int(torch.unique(ref.router(x, g, k)[1]).numel())
        case = next(c for c in cases.cases("full") if c.name == f"talker block T={T}")
        assert case.params["touched_experts"] == touched
        assert case.bytes == float((touched * 3 * H * I + 3 * H * Is + (E + 1) * H) * 2 + 2 * T * H * 2)


def test_bench_block_liger_provider_composes_the_block():
    """The block case's ``liger`` provider: liger's fused experts (stubbed here by the reference experts, which
    take the same arguments) between transformers' router and shared expert equals the whole block; without the
    liger wheel or CUDA it is reported as unavailable."""
    from omni_fast.bench.case import Unavailable
    from omni_fast.bench.cases import moe as cases

    T, E, k, H, I, Is = 7, 6, 2, 32, 16, 24
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: (torch.randn(*s, generator=gen) * 0.2).to(DEVICE)  # noqa: E731
    x, g, w13, w2, sw13, sw2, sg = r(T, H), r(E, H), r(E, 2 * I, H), r(E, H, I), r(2 * Is, H), r(H, Is), r(1, H)
    got = cases.liger_block(ref.fused_moe, x, g, w13, w2, k, sw13, sw2, sg)
    torch.testing.assert_close(got, ref.moe_block(x, g, w13, w2, k, True, sw13, sw2, sg), rtol=1e-6, atol=1e-6)
    if not torch.cuda.is_available():
        fns = cases._block_setup(3, "smoke")(torch.device("cpu"))
        assert isinstance(fns["liger"], Unavailable)


def test_bench_compile_baseline_is_the_reference_without_host_syncs():
    """The ``compile`` provider's grouped formulation: same result as the reference, and one graph (no host sync,
    no data-dependent shapes) under ``torch.compile(fullgraph=True)``."""
    from omni_fast.bench.cases import moe as cases

    if cases._grouped_mm() is None:
        pytest.skip("this torch has no grouped_mm")
    T, E, k, H, I, Is = 13, 6, 3, 32, 16, 24
    dt = torch.bfloat16  # torch.compile's grouped_mm takes bf16 only
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=gen) * 0.3).to(DEVICE, dt)  # noqa: E731
    x, g, w13, w2, sw13, sw2, sg = r(T, H), r(E, H), r(E, 2 * I, H), r(E, H, I), r(2 * Is, H), r(H, Is), r(1, H)
    try:
        cases.grouped_experts(x[:1], w13, w2, *ref.router(x[:1], g, k))
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"grouped_mm does not run on {DEVICE}: {exc}")
    w, ids = ref.router(x, g, k)
    compiled = torch.compile(cases.grouped_experts, fullgraph=True, dynamic=False, backend="eager")
    for got in (cases.grouped_experts(x, w13, w2, w, ids), compiled(x, w13, w2, w, ids)):
        torch.testing.assert_close(got, ref.fused_moe(x, w13, w2, w, ids), rtol=2e-2, atol=2e-2)
    block = torch.compile(cases.grouped_block, fullgraph=True, dynamic=False, backend="eager")
    want = ref.moe_block(x, g, w13, w2, k, True, sw13, sw2, sg)
    torch.testing.assert_close(block(x, g, w13, w2, k, sw13, sw2, sg), want, rtol=2e-2, atol=2e-2)
