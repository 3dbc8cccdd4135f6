"""Shared helpers of the MoE kernel tests (tests/test_moe*.py): random ids and weights, the weight_path
fixture (pointer or TMA weight tiles), the fused-MoE and alignment checkers, the moe_block weights."""

import types

import pytest
import torch

from omni_fast import ops
from omni_fast.kernels import moe_gemm
from omni_fast.reference import moe as ref
from omni_fast.testing import DEVICE, assert_matches_reference


GPU_DTYPES = [pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _ids(T, E, k, device=DEVICE):
    """Distinct experts per token (as top-k gives), int32 [T, k]."""
    if T == 0:
        return torch.zeros(0, k, dtype=torch.int32, device=device)
    return torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(device=device, dtype=torch.int32)


def _weights(E, H, I, dtype, device=DEVICE):
    w13 = (torch.randn(E, 2 * I, H) * H ** -0.5).to(device=device, dtype=dtype)
    w2 = (torch.randn(E, H, I) * I ** -0.5).to(device=device, dtype=dtype)
    return w13, w2


@pytest.fixture(params=[False, True], ids=["ptr", "tma"])
def weight_path(request, monkeypatch):
    """Run the fused-MoE GEMMs with the weight tiles read through pointers or through TMA tensor descriptors
    (``USE_TMA`` in both GEMMs' configs). ``.used`` records, per GEMM launch, whether a descriptor was used (the
    TMA path falls back to pointers where the layout does not allow a descriptor); ``.config(cfg)`` adds the
    choice to an explicit config."""
    use_tma = request.param

    def with_tma(cfg):
        cfg = dict(cfg, USE_TMA=use_tma)
        cfg["down"] = dict(cfg.get("down", {}), USE_TMA=use_tma)
        return cfg

    real_config, real_source, used = moe_gemm.get_config, moe_gemm.weight_source, []

    def weight_source(b, cfg):
        src = real_source(b, cfg)
        used.append(src is not b)
        return src

    monkeypatch.setattr(moe_gemm, "get_config", lambda *a, **kw: with_tma(real_config(*a, **kw)))
    monkeypatch.setattr(moe_gemm, "weight_source", weight_source)
    return types.SimpleNamespace(use_tma=use_tma, used=used, config=with_tma)


def _tma_expected(path, T, H, I, dtype):
    """What ``path.used`` must be after one fused_moe call: a descriptor for w13 ``[E, 2I, H]`` when its rows
    (H elements) are 16-byte multiples, for w2 ``[E, H, I]`` when I elements are; no launch at all for T = 0."""
    if T == 0:
        return []
    elem = torch.finfo(dtype).bits // 8
    return [path.use_tma and H * elem % 16 == 0, path.use_tma and I * elem % 16 == 0]


def _check_fused(x, w13, w2, w, ids, expert_map=None, config=None, backend="triton"):
    if config is None:
        out = ops.moe_experts(x, w13, w2, w, ids, expert_map=expert_map, backend=backend)
    else:
        out = moe_gemm.fused_moe(x, w13, w2, w, ids, expert_map=expert_map, config=config)
    exact = ref.fused_moe(x.double(), w13.double(), w2.double(), w.double(), ids, expert_map=expert_map)
    same = ref.fused_moe(x, w13, w2, w, ids, expert_map=expert_map)
    assert_matches_reference(out, exact, same, name="fused_moe")
    return out


def _assert_same_alignment(got, want, flat_ids):
    (s, e, n), (rs, re, rn) = got, want
    assert s.shape == rs.shape and e.shape == re.shape and n.shape == rn.shape == (1,)
    assert torch.equal(n, rn) and torch.equal(e, re)
    sentinel = flat_ids.numel()
    assert torch.equal(s == sentinel, rs == sentinel)
    real = s != sentinel
    # Same expert at every row (order inside an expert's run is unspecified), each (kept) pair exactly once.
    assert torch.equal(flat_ids[s[real].long()], flat_ids[rs[real].long()])
    assert torch.equal(torch.sort(s[real]).values, torch.sort(rs[real]).values)
    assert torch.unique(s[real]).numel() == int(real.sum())


def _align_dropping_bad_ids(ids, bs, E, expert_map=None):
    """What the kernels must give for ids with values outside ``[0, E)`` (never value-checked on CUDA): those
    pairs dropped, like pairs of a remote expert. Built from the reference: the bad pairs moved to an extra last
    expert ``E``, whose run (the last one) is then cut off; negative map values read as -1."""
    flat = ids.reshape(-1).cpu().long()
    n = flat.numel()
    bad = (flat < 0) | (flat >= E)
    emap = None if expert_map is None else torch.cat([expert_map.cpu(), torch.tensor([-1], dtype=torch.int32)])
    s, e, npost = ref.moe_align_block_size(torch.where(bad, E, flat), bs, E + 1, emap)
    keep = int(npost) - -(-int(bad.sum()) // bs) * bs
    blocks = -(-ref.max_padded_tokens(n, E, bs) // bs)
    want_s = torch.full((blocks * bs,), n, dtype=torch.int32)
    want_s[:keep] = s[:keep]
    want_e = torch.full((blocks,), -1, dtype=torch.int32)
    want_e[:keep // bs] = e[:keep // bs].clamp(min=-1)
    dev = ids.device
    return want_s.to(dev), want_e.to(dev), torch.tensor([keep], dtype=torch.int32, device=dev)


def _with_bad_ids(T, E, k, dtype, g, device=DEVICE):
    """Random top-k ids with some pairs out of range: E, E + 5, -1, -3 and (int64) 2**32 + 1, which an int32
    truncation would turn into the valid id 1."""
    ids = _ids(T, E, k, device).to(dtype)
    bad = [E, E + 5, -1, -3] + ([2 ** 32 + 1] if dtype == torch.int64 else [])
    flat = ids.view(-1)
    where = torch.randperm(flat.numel(), generator=g)[:max(1, flat.numel() // 4)]
    flat[where] = torch.tensor(bad, dtype=dtype)[torch.arange(where.numel()) % len(bad)].to(flat.device)
    return ids


def _block_weights(E, H, I, Is, dtype):
    g = (torch.randn(E, H) * H ** -0.5).to(DEVICE, dtype)
    w13, w2 = _weights(E, H, I, dtype)
    if not Is:
        return g, w13, w2, None, None, None
    sw13, sw2 = _weights(1, H, Is, dtype)
    sg = (torch.randn(1, H) * H ** -0.5).to(DEVICE, dtype)
    return g, w13, w2, sw13[0], sw2[0], sg


