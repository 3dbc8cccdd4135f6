"""TM-RoPE through the CUDA C++ kernel (kernels/cuda/rope.cu via CuPy): backend "cuda" against the reference and
the Triton kernel. GPU only; skipped without CuPy. Also a CPU test that a missing CuPy gives a clear error."""

import pytest
import torch

import omni_fast
from omni_fast.reference import rope as ref
from omni_fast.testing import assert_matches_reference

SHAPES = [  # (T, Hq, Hk, D, section)
    (1, 32, 4, 128, (24, 20, 20)),
    (37, 16, 2, 128, (24, 20, 20)),
    (5, 3, 1, 64, (12, 10, 10)),
    (129, 16, 8, 128, (16, 24, 24)),
    (3, 5, 3, 34, (5, 6, 6)),  # odd half
]


def _cupy_or_skip():
    return pytest.importorskip("cupy", reason="backend 'cuda' needs CuPy")


def _inputs(T, hq, hk, D, rows, dtype, int32=False):
    q = torch.randn(T, hq, D, device="cuda").to(dtype)
    k = torch.randn(T, hk, D, device="cuda").to(dtype)
    pos = torch.randint(0, 32768, (3, T) if rows == 3 else (T,), device="cuda")
    return q, k, pos.int() if int32 else pos


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("rows", [3, 1])
@pytest.mark.parametrize("norm", [False, True])
def test_cuda_matches_reference(dtype, shape, interleaved, rows, norm):
    _cupy_or_skip()
    T, hq, hk, D, section = shape
    q, k, pos = _inputs(T, hq, hk, D, rows, dtype, int32=(T % 2 == 1))
    qw, kw = torch.rand(D, device="cuda").to(dtype), torch.rand(D, device="cuda").to(dtype)
    kw_args = dict(mrope_section=section, interleaved=interleaved, inplace=False)

    def run(q_, k_, **extra):
        if norm:
            fn = omni_fast.ops.qk_norm_mrope if extra else ref.qk_norm_mrope
            return fn(q_, k_, qw.to(q_.dtype), kw.to(q_.dtype), pos, **kw_args, **extra)
        return (omni_fast.ops.mrope if extra else ref.mrope)(q_, k_, pos, **kw_args, **extra)

    out = run(q, k, backend="cuda")
    exact = run(q.double(), k.double())
    same = run(q, k)
    tri = run(q, k, backend="triton")
    for o, e, s, t, name in zip(out, exact, same, tri, "qk"):
        assert_matches_reference(o, e, s, name=name)
        assert_matches_reference(t, e, s, name=f"triton {name}")
        # The two kernels round the same way; they may differ by an FMA contraction, i.e. one ulp of the output.
        torch.testing.assert_close(o, t, rtol=2 ** -7, atol=2 ** -6)


@pytest.mark.gpu
def test_cuda_in_place_strided_and_empty():
    _cupy_or_skip()
    base = torch.randn(9, 40, 128, device="cuda", dtype=torch.bfloat16)
    q, k = base[:, :32], base[:, 32:36]  # views into one qkv buffer: non-contiguous token stride
    pos = torch.randint(0, 1000, (3, 9), device="cuda")
    exact = ref.mrope(q.double(), k.double(), pos, inplace=False)
    same = ref.mrope(q, k, pos, inplace=False)
    untouched = base[:, 36:].clone()
    omni_fast.ops.mrope(q, k, pos, backend="cuda")
    assert_matches_reference(q, exact[0], same[0], name="q")
    assert_matches_reference(k, exact[1], same[1], name="k")
    torch.testing.assert_close(base[:, 36:], untouched, rtol=0, atol=0)  # heads outside q and k stay as they were
    e = torch.empty(0, 4, 128, device="cuda", dtype=torch.bfloat16)
    omni_fast.ops.mrope(e, e[:, :2], torch.empty(3, 0, dtype=torch.long, device="cuda"), backend="cuda")


def test_cuda_backend_rejects_cpu_tensors():
    q, k = torch.randn(2, 2, 8), torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match="cuda"):
        omni_fast.ops.mrope(q, k, torch.zeros(3, 2, dtype=torch.long), mrope_section=(2, 1, 1), backend="cuda")
