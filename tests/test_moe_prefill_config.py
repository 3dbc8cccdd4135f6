"""The MoE prefill tier of ``moe_gemm.default_config`` (rows per expert > 128: 64x128 gate/up tiles, 64x256 down
tiles) computes the reference result on the interpreter: several M tiles per expert, partial N / K tiles, empty
experts, fp32 (which halves BLOCK_K) and fp16."""

from __future__ import annotations

import pytest
import torch

from omni_fast.kernels import moe_gemm
from omni_fast.reference import moe as ref
from omni_fast.testing import assert_matches_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_default_config_matches_reference(dtype):
    T, E, k, H, I = 150, 3, 2, 72, 136  # 100 pairs per expert on average; H, I not multiples of the tiles
    cfg = moe_gemm.default_config(4096, 128, 8, 2048, 768, dtype)
    assert cfg["BLOCK_SIZE_N"] == 128 and cfg["down"]["BLOCK_SIZE_N"] == 256
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    w = torch.rand(T, k, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    ids[:20] = torch.tensor([0, 2], dtype=torch.int32)  # uneven loads; expert 1 never gets these
    out = moe_gemm.fused_moe(x, w13, w2, w, ids, config=cfg)
    exact = ref.fused_moe(x.double(), w13.double(), w2.double(), w.double(), ids)
    same = ref.fused_moe(x, w13, w2, w, ids)
    assert_matches_reference(out, exact, same, name="fused_moe")
