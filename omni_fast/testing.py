"""Test helpers shared by the test suite and the benchmark's CPU correctness pass.

- :data:`DEVICE`: ``cuda`` when a GPU is present, else ``cpu`` (Triton then runs on the interpreter).
- :data:`KERNEL_DTYPES`: the dtypes kernels are checked in here. The interpreter's bf16 math is wrong, so on a
  CPU that is fp32 and fp16; on a GPU bf16 joins them.
- :func:`assert_matches_reference`: FlashAttention's rule. The kernel's error against an fp64 (or fp32) reference
  may be at most ``factor`` times the error of the reference run in the kernel's dtype, plus a small ``atol``
  for outputs whose reference error is zero.
"""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,
                                                                                             torch.float16)

# One unit in the last place at 1.0, per dtype: the floor for "the reference in this dtype was exact".
_ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


def ulp(dtype: torch.dtype) -> float:
    return _ULP[dtype]


def assert_matches_reference(
    out: torch.Tensor,
    ref_exact: torch.Tensor,
    ref_same_dtype: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float | None = None,
    name: str = "output",
) -> None:
    """``max|out - exact| <= factor * max|ref_same_dtype - exact| + atol`` (all compared in fp64).

    ``ref_exact`` is the reference in fp64/fp32; ``ref_same_dtype`` the reference run in ``out``'s dtype.
    ``atol`` defaults to 2 ulp of ``out``'s dtype at the output's scale (covers exact-reference corner cases
    and the interpreter's truncating fp32 -> bf16 stores).
    """
    assert out.shape == ref_exact.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_exact.shape)}"
    if out.numel() == 0:
        return
    o, e, r = out.double(), ref_exact.double(), ref_same_dtype.double()
    assert torch.isfinite(o).all() == torch.isfinite(e).all(), f"{name}: non-finite values differ from the reference"
    finite = torch.isfinite(e)
    err = (o - e)[finite].abs().max().item()
    ref_err = (r - e)[finite].abs().max().item()
    scale = max(e[finite].abs().max().item(), 1.0)
    if atol is None:
        atol = 2 * ulp(out.dtype) * scale
    bound = factor * ref_err + atol
    assert err <= bound, (
        f"{name}: max error {err:.3e} vs exact exceeds {factor} x reference-in-{out.dtype} error {ref_err:.3e} "
        f"+ atol {atol:.1e}"
    )


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``t`` filled with NaN (floats) or -7 (ints): unwritten outputs show up in checks."""
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, -7)


@torch.no_grad()
def randomize_(*modules: torch.nn.Module, std: float = 0.2) -> None:
    """Random weights for tiny test models, in place: every parameter ~ N(0, std), norm weights ~ 1 + N(0, std).
    transformers' init (std 0.02, norms at 1) is too small for a tiny model to route and attend non-trivially.
    Draws from torch's global generator (seed it first)."""
    for m in modules:
        for name, p in m.named_parameters():
            p.normal_(0, std)
            if "norm" in name:
                p.add_(1.0)


def seeded_weights_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Random weights for a tiny transformers model from a seeded generator (every parameter but the norms
    ~ N(0, scale), norms left at their init), in eval mode: the same model whatever ran before. Returns it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def run_unpatched_then_patched(model: torch.nn.Module, run, **patch_kwargs):
    """``run()`` on ``model`` as it is, then under ``omni_fast.patch(model, **patch_kwargs)`` (unpatched again
    afterwards, whatever happens); returns ``(unpatched result, patched result, PatchReport)``."""
    import omni_fast

    want = run()
    report = omni_fast.patch(model, **patch_kwargs)
    try:
        got = run()
    finally:
        omni_fast.unpatch(model)
    return want, got, report


def assert_graph_replay_matches(run) -> None:
    """Run ``run()`` eagerly, capture it in a CUDA graph, replay, and assert the replayed output equals the eager one
    (the check every "captures in a CUDA graph" test makes; CUDA only)."""
    eager = run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    torch.testing.assert_close(out, eager)
