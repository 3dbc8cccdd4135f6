"""MoE on the GPU: bf16 real shapes, the TMA path, CUDA graphs; the CUDA C++ routing/alignment kernels, on the GPU
and their logic on the CPU emulator (tests/cuda_emu)."""

import pytest
import torch

from omni_fast import ops
from omni_fast.reference import moe as ref
from omni_fast.testing import DEVICE, assert_matches_reference

from _moe_helpers import (  # noqa: F401  (fixtures)
    _align_dropping_bad_ids,
    _assert_same_alignment,
    _block_weights,
    _check_fused,
    _ids,
    _weights,
    _with_bad_ids,
    weight_path,
)


# --- GPU: bf16 and the real shapes -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("E,k,H,I,T", [(128, 8, 2048, 768, 1), (128, 8, 2048, 768, 333), (128, 6, 1024, 384, 64),
                                       (128, 6, 1024, 192, 4096)])
def test_fused_moe_real_shapes_bf16(E, k, H, I, T):
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    w13, w2 = _weights(E, H, I, torch.bfloat16)
    logits = torch.randn(T, E, device=DEVICE)
    w, ids = ops.route_topk(logits, k)
    _check_fused(x, w13, w2, w, ids)


@pytest.mark.gpu
@pytest.mark.parametrize("E,k,H,I,T", [(128, 8, 2048, 768, 1), (128, 8, 2048, 768, 4096), (128, 6, 1024, 384, 64),
                                       (128, 6, 1024, 192, 333)])
def test_fused_moe_tma_real_shapes_bf16(E, k, H, I, T, weight_path):
    """Both weight paths on the GPU at the real shapes (descriptors really used: the layouts are aligned), and the
    TMA output within the reference tolerance of the pointer output's."""
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    w13, w2 = _weights(E, H, I, torch.bfloat16)
    w, ids = ops.route_topk(torch.randn(T, E, device=DEVICE), k)
    _check_fused(x, w13, w2, w, ids)
    assert weight_path.used == [weight_path.use_tma] * 2


@pytest.mark.gpu
def test_fused_moe_tma_cuda_graph_replay(weight_path):
    """Descriptors are encoded on the host at capture; replays on new activations give the eager result."""
    E, k, H, I, T = 128, 8, 2048, 768, 8
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    w13, w2 = _weights(E, H, I, torch.bfloat16)
    w, ids = ops.route_topk(torch.randn(T, E, device=DEVICE), k)
    ops.moe_experts(x, w13, w2, w, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.moe_experts(x, w13, w2, w, ids)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ops.moe_experts(x, w13, w2, w, ids), rtol=0, atol=0)
    assert all(u == weight_path.use_tma for u in weight_path.used)


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [0, 768])
def test_moe_block_bf16_gpu(shared):
    E, k, H, I, T = 128, 6, 1024, 384, 77
    g, w13, w2, sw13, sw2, sg = _block_weights(E, H, I, shared, torch.bfloat16)
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    out = ops.moe_block(x, g, w13, w2, k, shared_w13=sw13, shared_w2=sw2, shared_gate_weight=sg)
    same = ref.moe_block(x, g, w13, w2, k, True, sw13, sw2, sg)
    w, ids = ref.router(x, g, k)
    d = torch.float64
    exact = ref.fused_moe(x.to(d), w13.to(d), w2.to(d), w.to(d), ids)
    if shared:
        exact = exact + ref.shared_expert(x.to(d), sw13.to(d), sw2.to(d), sg.to(d))
    assert_matches_reference(out, exact, same)


# --- CUDA C++ routing / alignment ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (333, 128, 6), (17, 60, 60), (5, 256, 32)])
def test_cuda_topk_softmax_matches(dtype, T, E, k):
    pytest.importorskip("cupy")
    logits = torch.randn(T, E, device=DEVICE).to(dtype)
    w, i = ops.route_topk(logits, k, backend="cuda")
    rw, ri = ref.topk_softmax(logits, k)
    assert torch.equal(i, ri)
    torch.testing.assert_close(w, rw, rtol=2e-6, atol=1e-7)
    tw, ti = ops.route_topk(logits, k, backend="triton")
    assert torch.equal(i, ti)


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,k,bs", [(1, 128, 8, 16), (4096, 128, 8, 64), (77, 9, 3, 16)])
@pytest.mark.parametrize("with_map", [False, True])
def test_cuda_align_matches(T, E, k, bs, with_map):
    pytest.importorskip("cupy")
    ids = _ids(T, E, k)
    emap = torch.where(torch.arange(E) % 3 == 1, -1, torch.arange(E) // 2).to(DEVICE, torch.int32) if with_map else None
    got = ops.align_moe_blocks(ids, bs, E, emap, backend="cuda")
    _assert_same_alignment(got, ref.moe_align_block_size(ids, bs, E, emap), ids.reshape(-1).long())
    _assert_same_alignment(got, ops.align_moe_blocks(ids, bs, E, emap, backend="triton"),
                           ids.reshape(-1).long())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("T,E,k,bs", [(3, 128, 8, 16), (600, 60, 6, 64)])
def test_gpu_out_of_range_ids_are_dropped(backend, T, E, k, bs):
    """On CUDA the ops skip the (host-syncing) value check: ids outside [0, E) and expert_map values outside
    [-1, E_local) reach the kernels, which drop those pairs (no out-of-bounds access; the output as if the
    pairs were routed to a remote expert)."""
    if backend == "cuda":
        pytest.importorskip("cupy")
    g = torch.Generator().manual_seed(T)
    for id_dtype in (torch.int32, torch.int64):
        ids = _with_bad_ids(T, E, k, id_dtype, g)
        got = ops.align_moe_blocks(ids, bs, E, backend=backend)
        _assert_same_alignment(got, _align_dropping_bad_ids(ids, bs, E), ids.reshape(-1).long())
        torch.cuda.synchronize()
    if backend != "cuda":  # moe_experts has no CUDA C++ backend
        H, I = 256, 128
        x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
        w13, w2 = _weights(E, H, I, torch.bfloat16)
        w = torch.rand(T, k, device=DEVICE)
        bad = (ids < 0) | (ids >= E)
        out = ops.moe_experts(x, w13, w2, w, ids, backend=backend)
        clean_w, clean_ids = torch.where(bad, 0.0, w), torch.where(bad, 0, ids)
        assert_matches_reference(out, ref.fused_moe(x.double(), w13.double(), w2.double(), clean_w.double(),
                                                     clean_ids),
                                 ref.fused_moe(x, w13, w2, clean_w, clean_ids), name="fused_moe bad ids")
        emap = torch.arange(E, dtype=torch.int32, device=DEVICE)
        emap[::3] = E + 4  # past E_local = E
        emap[1::5] = -9
        clean_map = torch.where((emap < 0) | (emap >= E), -1, emap)
        out = ops.moe_experts(x, w13, w2, w, clean_ids, expert_map=emap, backend=backend)
        assert_matches_reference(out, ref.fused_moe(x.double(), w13.double(), w2.double(), w.double(), clean_ids,
                                                     expert_map=clean_map),
                                 ref.fused_moe(x, w13, w2, w, clean_ids, expert_map=clean_map), name="bad map")


# --- the CUDA C++ kernels' logic on the CPU emulator (tests/cuda_emu) ---------------------------------------------


@pytest.fixture(scope="module")
def _moe_emu_lib(build_cuda_emu):
    """kernels/cuda/moe_routing.cu compiled for the host with the CUDA emulator tests/cuda_emu/emu.h."""
    return build_cuda_emu("emu_moe.cpp")


@pytest.fixture
def cuda_moe_emulated(_moe_emu_lib, monkeypatch):
    """kernels/cuda_moe.py's own host code (buffers, grids, blocks, launch order) on CPU tensors, with every
    kernel launch run by the emulator instead of CuPy. Returns the list of launched kernel names."""
    import ctypes

    from omni_fast.kernels import cuda_moe

    launched = []

    def run(name, device, grid, block, args):
        fn = getattr(_moe_emu_lib, f"emu_{name}")
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint] + [
            ctypes.c_void_p if a.dtype.name == "uint64" else ctypes.c_longlong if a.dtype.name == "int64"
            else ctypes.c_int for a in args]
        fn.restype = None
        launched.append(name)
        fn(grid[0], block[0], *[int(a) for a in args])

    monkeypatch.setattr(cuda_moe, "_run", run)
    monkeypatch.setattr(cuda_moe, "_check_device", lambda name, t: None)
    return launched


@pytest.mark.parametrize("T,E,k", [(0, 8, 2), (1, 128, 8), (6, 6, 6), (9, 60, 4), (2, 256, 32), (5, 33, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_topk_softmax_logic_emulated(cuda_moe_emulated, T, E, k, dtype):
    """The CUDA C++ router (one warp per token, warp arg-max rounds) on the emulator vs the reference: E not a
    power of two, top_k == E, T = 0/1, T not a multiple of the 4 warps of a block (idle warps), ties, NaN rows."""
    from omni_fast.kernels import cuda_moe

    g = torch.Generator().manual_seed(T * 7 + E)
    logits = (torch.randn(T, E, generator=g) * 3).to(dtype)
    if T >= 6:
        logits[1] = logits[1].round()  # ties: lowest index first
        logits[2, E // 2] = float("nan")  # a NaN row: ids 0..k-1, NaN weights
    for renorm in (True, False):
        w, i = cuda_moe.topk_softmax(logits, k, renorm)
        rw, ri = ref.topk_softmax(logits, k, renorm)
        assert torch.equal(i, ri)
        torch.testing.assert_close(w, rw, rtol=2e-6, atol=1e-7, equal_nan=True)
    assert cuda_moe_emulated == ([] if T == 0 else [f"omni_fast_topk_softmax_kernel_{ref_name}"
                                                    for ref_name in [{torch.float32: "fp32", torch.float16: "fp16",
                                                                      torch.bfloat16: "bf16"}[dtype]] * 2])


@pytest.mark.parametrize("T,E,k,bs", [(0, 4, 2, 16), (1, 128, 8, 16), (13, 6, 6, 4), (70, 9, 3, 8),
                                      (300, 60, 4, 16), (40, 1, 1, 32)])
@pytest.mark.parametrize("with_map", [False, True])
def test_cuda_align_logic_emulated(cuda_moe_emulated, T, E, k, bs, with_map):
    """The CUDA C++ alignment (atomic counts -> one-block Hillis-Steele scan + binary search per block -> atomic
    scatter) on the emulator vs the reference and the Triton kernel: T = 0/1, E not a power of two, top_k == E,
    several count/scatter blocks, one expert, int32 and int64 ids, expert_map with remote experts."""
    from omni_fast.kernels import cuda_moe, moe_align

    emap = (torch.where(torch.arange(E) % 3 == 1, -1, torch.arange(E) // 2).to(torch.int32) if with_map else None)
    for id_dtype in (torch.int32, torch.int64):
        ids = _ids(T, E, k, "cpu").to(id_dtype)  # host memory: the emulator dereferences the pointers
        got = cuda_moe.moe_align_block_size(ids, bs, E, emap)
        flat = ids.reshape(-1).long()
        _assert_same_alignment(got, ref.moe_align_block_size(ids, bs, E, emap), flat)
        triton_out = moe_align.moe_align_block_size(ids.to(DEVICE), bs, E, None if emap is None else emap.to(DEVICE))
        _assert_same_alignment(got, tuple(t.cpu() for t in triton_out), flat)
    assert cuda_moe_emulated == ([] if T == 0 else ["omni_fast_moe_align_count_i32", "omni_fast_moe_align_prefix",
                                                    "omni_fast_moe_align_scatter_i32", "omni_fast_moe_align_count_i64",
                                                    "omni_fast_moe_align_prefix", "omni_fast_moe_align_scatter_i64"])


@pytest.mark.parametrize("T,E,k,bs", [(3, 8, 2, 4), (90, 7, 3, 8)])
def test_cuda_align_logic_emulated_drops_out_of_range_ids(cuda_moe_emulated, T, E, k, bs):
    """Unchecked bad ids (E, E + 5, -1, -3, and 2**32 + 1 as int64) on the CUDA alignment: dropped, no
    out-of-bounds atomics; negative expert_map values read as -1."""
    from omni_fast.kernels import cuda_moe

    g = torch.Generator().manual_seed(T)
    emap = torch.tensor([2, -1, 0, -4, 1, 3, -1, 5][:E], dtype=torch.int32)
    for id_dtype in (torch.int32, torch.int64):
        ids = _with_bad_ids(T, E, k, id_dtype, g, "cpu")
        for m in (None, emap):
            got = cuda_moe.moe_align_block_size(ids, bs, E, m)
            _assert_same_alignment(got, _align_dropping_bad_ids(ids, bs, E, m), ids.reshape(-1).long())


def test_cuda_fill_kernel_emulated(_moe_emu_lib):
    """omni_fast_moe_fill_i32 (the C-ABI launcher's sentinel fill; the CuPy path fills with torch): a grid-stride
    loop over more rows than threads."""
    import ctypes

    out = torch.zeros(1000, dtype=torch.int32)
    fn = _moe_emu_lib.emu_omni_fast_moe_fill_i32
    fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int]
    fn(3, 64, out.data_ptr(), 999, 7)
    assert bool((out[:999] == 7).all()) and int(out[999]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 40, 1000])
def test_fused_moe_cuda_graph_capture_and_replay(T):
    """No host sync, fixed sizes: the whole block captures in a CUDA graph and replays on new inputs."""
    E, k, H, I = 128, 6, 1024, 384
    g, w13, w2, sw13, sw2, sg = _block_weights(E, H, I, 768, torch.bfloat16)
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)

    def run():
        return ops.moe_block(x, g, w13, w2, k, shared_w13=sw13, shared_w2=sw2, shared_gate_weight=sg)

    run()  # compile the kernels before capturing
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, run(), rtol=0, atol=0)


