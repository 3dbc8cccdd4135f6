"""Grid fill of the MoE decode GEMMs (``moe_gemm.fill_grid``): narrower N tiles at small T so that every SM of an
H100 gets a program, chosen from the shapes alone; the kernels against the reference with the fill tiles forced at
small and odd shapes (interpreter), and the result independent of the choice."""

import pytest
import torch

from omni_fast import ops
from omni_fast.kernels import moe_gemm
from omni_fast.reference import moe as ref
from omni_fast.testing import DEVICE, KERNEL_DTYPES, assert_matches_reference


def _grid(cfg: dict, T: int, E: int, k: int, N: int) -> int:
    """Programs of one GEMM launch (``_launch_gemm``): alignment blocks x N tiles."""
    blocks = -(-ref.max_padded_tokens(T * k, E, cfg["BLOCK_SIZE_M"]) // cfg["BLOCK_SIZE_M"])
    return blocks * -(-N // cfg["BLOCK_SIZE_N"])


@pytest.mark.parametrize("name,E,k,H,I,before,after", [
    ("thinker", 128, 8, 2048, 768, (96, 256), (192, 256)),
    ("talker", 128, 6, 1024, 384, (36, 96), (144, 192)),
    ("talker shared expert", 1, 1, 1024, 768, (12, 16), (48, 64)),
])
def test_decode_tiles_fill_the_sms_at_the_real_shapes(name, E, k, H, I, before, after):
    """T=1 programs per launch (gate/up, down), before and after the fill; the shared expert (one expert) cannot
    reach 132 with 16-column tiles and stays at the narrowest tile."""
    for fill, want in ((False, before), (True, after)):
        up, down = moe_gemm._split(moe_gemm.default_config(1, E, k, H, I, torch.bfloat16, fill))
        assert (_grid(up, 1, E, k, I), _grid(down, 1, E, k, H)) == want, (name, fill)
        for c in (up, down):
            assert c["BLOCK_SIZE_N"] >= moe_gemm.MIN_BLOCK_N and c["BLOCK_SIZE_K"] == 128


@pytest.mark.parametrize("T", [1, 2, 3, 8, 64, 4096])
def test_fill_only_changes_small_grids(T):
    """Once the decode grid has >= TARGET_CTAS programs (T >= 3 on the talker) or past the decode tier, the
    heuristic is unchanged; where it changes, only N tiles and warps do (BLOCK_M is the alignment's)."""
    for E, k, H, I in ((128, 8, 2048, 768), (128, 6, 1024, 384)):
        plain = moe_gemm.default_config(T, E, k, H, I, torch.bfloat16)
        filled = moe_gemm.default_config(T, E, k, H, I, torch.bfloat16, fill=True)
        up, down = moe_gemm._split(plain)
        if _grid(up, T, E, k, I) >= moe_gemm.TARGET_CTAS and _grid(down, T, E, k, H) >= moe_gemm.TARGET_CTAS:
            assert filled == plain, (T, E, k)
        for a, b in ((plain, filled), (plain["down"], filled["down"])):
            assert {x: v for x, v in a.items() if x not in ("BLOCK_SIZE_N", "num_warps", "down")} == \
                   {x: v for x, v in b.items() if x not in ("BLOCK_SIZE_N", "num_warps", "down")}


@pytest.mark.parametrize("T,E,k,H,I", [
    (0, 4, 2, 40, 24),      # no tokens: no launch
    (1, 8, 2, 72, 40),      # decode: 16-column tiles, H and I not multiples of 16
    (1, 1, 1, 56, 100),     # a one-expert (shared-expert) call, odd I
    (2, 6, 3, 33, 17),      # odd everything
    (3, 12, 4, 64, 48),
])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_fused_moe_with_fill_tiles_matches_reference(T, E, k, H, I, dtype):
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    w13 = (torch.randn(E, 2 * I, H) * H ** -0.5).to(device=DEVICE, dtype=dtype)
    w2 = (torch.randn(E, H, I) * I ** -0.5).to(device=DEVICE, dtype=dtype)
    w = torch.rand(T, k, device=DEVICE)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(DEVICE, torch.int32) if T else \
        torch.zeros(0, k, dtype=torch.int32, device=DEVICE)
    cfg = moe_gemm.default_config(max(T, 1), E, k, H, I, dtype, fill=True)
    assert cfg["BLOCK_SIZE_N"] == 16 and cfg["down"]["BLOCK_SIZE_N"] == 16  # tiny grids: the narrowest tiles
    out = moe_gemm.fused_moe(x, w13, w2, w, ids, config=cfg)
    exact = ref.fused_moe(x.double(), w13.double(), w2.double(), w.double(), ids)
    same = ref.fused_moe(x, w13, w2, w, ids)
    assert_matches_reference(out, exact, same, name="fused_moe (fill tiles)")
    # the default path picks the same tiles (get_config on the interpreter = the heuristic with fill)
    assert torch.equal(ops.moe_experts(x, w13, w2, w, ids, backend="triton"), out)
    wide = moe_gemm.fused_moe(x, w13, w2, w, ids, config=moe_gemm.default_config(max(T, 1), E, k, H, I, dtype))
    torch.testing.assert_close(out, wide, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-3)


def test_moe_block_with_shared_expert_fill_is_deterministic():
    """The talker's block at T=1 (routed + shared expert, both on fill tiles): twice the same bits."""
    T, E, k, H, I, Is = 1, 8, 3, 40, 24, 56
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(DEVICE)
    gate = (torch.randn(E, H, generator=g) * H ** -0.5).to(DEVICE)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(DEVICE)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(DEVICE)
    shared = dict(shared_w13=(torch.randn(2 * Is, H, generator=g) * H ** -0.5).to(DEVICE),
                  shared_w2=(torch.randn(H, Is, generator=g) * Is ** -0.5).to(DEVICE),
                  shared_gate_weight=(torch.randn(1, H, generator=g) * H ** -0.5).to(DEVICE))
    a = ops.moe_block(x, gate, w13, w2, k, backend="triton", **shared)
    b = ops.moe_block(x, gate, w13, w2, k, backend="triton", **shared)
    assert torch.equal(a, b)
    want = ops.moe_block(x, gate, w13, w2, k, backend="reference", **shared)
    torch.testing.assert_close(a, want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("E,k,H,I,Is", [(128, 6, 1024, 384, 768), (128, 8, 2048, 768, 0)])
def test_gpu_decode_fill_real_shapes_bf16(E, k, H, I, Is):
    """T=1 at the real talker (with its shared expert) and thinker shapes, bf16, on the fill tiles (the heuristic:
    no tuned file for this device is assumed; the config is forced): against the reference, and run-to-run equal."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, H, generator=g).to(DEVICE, torch.bfloat16)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(DEVICE, torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(DEVICE, torch.bfloat16)
    w = torch.rand(1, k, generator=g).to(DEVICE)
    ids = torch.randperm(E, generator=g)[:k].reshape(1, k).to(DEVICE, torch.int32)
    cfg = moe_gemm.default_config(1, E, k, H, I, torch.bfloat16, fill=True)
    out = moe_gemm.fused_moe(x, w13, w2, w, ids, config=cfg)
    d = torch.float64
    assert_matches_reference(out, ref.fused_moe(x.to(d), w13.to(d), w2.to(d), w.to(d), ids),
                             ref.fused_moe(x, w13, w2, w, ids), name="fused_moe fill bf16")
    assert torch.equal(out, moe_gemm.fused_moe(x, w13, w2, w, ids, config=cfg))
    if Is:
        sw13 = (torch.randn(1, 2 * Is, H, generator=g) * H ** -0.5).to(DEVICE, torch.bfloat16)
        sw2 = (torch.randn(1, H, Is, generator=g) * Is ** -0.5).to(DEVICE, torch.bfloat16)
        zero = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
        gate = torch.rand(1, 1, generator=g).to(DEVICE)
        scfg = moe_gemm.default_config(1, 1, 1, H, Is, torch.bfloat16, fill=True)
        got = moe_gemm.fused_moe(x, sw13, sw2, gate, zero, config=scfg)
        assert_matches_reference(got, ref.fused_moe(x.to(d), sw13.to(d), sw2.to(d), gate.to(d), zero),
                                 ref.fused_moe(x, sw13, sw2, gate, zero), name="shared expert fill bf16")


# --- opt-in split-K (the moe_splitk fast path) ----------------------------------------------------------------------------


def test_split_k_reaches_the_target_for_the_shared_expert(fast_path):
    """Opt-in: the one-expert shared expert (I 768, H 1024) at T=1: gate/up 48 -> 144 programs (3 splits of K
    1024), down 64 -> 192 (3 of 768); the routed experts' grids are full without it; off, no SPLIT_K at all."""
    assert "SPLIT_K" not in moe_gemm.default_config(1, 1, 1, 1024, 768, torch.bfloat16, fill=True)
    fast_path("moe_splitk")  # OMNI_FAST_MOE_SPLITK=1
    up, down = moe_gemm._split(moe_gemm.default_config(1, 1, 1, 1024, 768, torch.bfloat16, fill=True))
    assert (up["SPLIT_K"], down["SPLIT_K"]) == (3, 3)
    assert (_grid(up, 1, 1, 1, 768) * 3, _grid(down, 1, 1, 1, 1024) * 3) == (144, 192)
    for E, k, H, I in ((128, 6, 1024, 384), (128, 8, 2048, 768)):
        up, down = moe_gemm._split(moe_gemm.default_config(1, E, k, H, I, torch.bfloat16, fill=True))
        assert up["SPLIT_K"] == down["SPLIT_K"] == 1


@pytest.mark.parametrize("T,E,k,H,I", [(0, 1, 1, 200, 150), (1, 1, 1, 200, 150), (3, 1, 1, 257, 130),
                                       (2, 8, 2, 200, 150), (1, 5, 3, 131, 97)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_fused_moe_split_k_matches_reference(T, E, k, H, I, dtype):
    """Split-K forced at odd sizes (K not a multiple of BLOCK_K, the last split partial; T = 0 / 1 / 3; one
    expert and several): against the reference, bitwise run-to-run, counters back to zero, close to unsplit."""
    from omni_fast.kernels import tile_counters

    g = torch.Generator().manual_seed(T + E + H)
    x = torch.randn(T, H, generator=g).to(DEVICE, dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(DEVICE, dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(DEVICE, dtype)
    w = torch.rand(T, k, generator=g).to(DEVICE)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEVICE, torch.int32) if T else \
        torch.zeros(0, k, dtype=torch.int32, device=DEVICE)
    plain = moe_gemm.default_config(max(T, 1), E, k, H, I, dtype, fill=True)
    cfg = dict(plain, SPLIT_K=3, down=dict(plain["down"], SPLIT_K=2))
    out = moe_gemm.fused_moe(x, w13, w2, w, ids, config=cfg)
    d = torch.float64
    assert_matches_reference(out, ref.fused_moe(x.to(d), w13.to(d), w2.to(d), w.to(d), ids),
                             ref.fused_moe(x, w13, w2, w, ids), name="fused_moe split-K")
    assert torch.equal(out, moe_gemm.fused_moe(x, w13, w2, w, ids, config=cfg))
    cnt = tile_counters.eager_counters(DEVICE)
    assert cnt is None or not cnt.any()  # every tile reset its counter
    torch.testing.assert_close(out, moe_gemm.fused_moe(x, w13, w2, w, ids, config=plain), rtol=0,
                               atol=1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.gpu
def test_gpu_shared_expert_split_k_bf16(fast_path):
    """The opt-in split-K on the GPU at the talker's shared-expert shape (T=1, I 768): against the reference,
    20 runs bit-identical (last-arriver reduction), counters zero, and a CUDA-graph replay equal to eager."""
    from omni_fast.kernels import tile_counters

    fast_path("moe_splitk")  # OMNI_FAST_MOE_SPLITK=1
    g = torch.Generator().manual_seed(2)
    H, Is = 1024, 768
    x = torch.randn(1, H, generator=g).to(DEVICE, torch.bfloat16)
    sw13 = (torch.randn(1, 2 * Is, H, generator=g) * H ** -0.5).to(DEVICE, torch.bfloat16)
    sw2 = (torch.randn(1, H, Is, generator=g) * Is ** -0.5).to(DEVICE, torch.bfloat16)
    zero = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    gate = torch.rand(1, 1, generator=g).to(DEVICE)
    cfg = moe_gemm.default_config(1, 1, 1, H, Is, torch.bfloat16, fill=True)
    assert cfg["SPLIT_K"] == 3
    out = moe_gemm.fused_moe(x, sw13, sw2, gate, zero, config=cfg)
    d = torch.float64
    assert_matches_reference(out, ref.fused_moe(x.to(d), sw13.to(d), sw2.to(d), gate.to(d), zero),
                             ref.fused_moe(x, sw13, sw2, gate, zero), name="shared expert split-K bf16")
    for _ in range(20):
        assert torch.equal(out, moe_gemm.fused_moe(x, sw13, sw2, gate, zero, config=cfg))
    torch.cuda.synchronize()
    assert not tile_counters.eager_counters(x.device).any()
    static = torch.empty_like(out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_gemm.fused_moe(x, sw13, sw2, gate, zero, out=static, config=cfg)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, out)
