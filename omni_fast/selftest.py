"""``python -m omni_fast.selftest``: one op per family on its Triton kernel against the pure-PyTorch reference.

A check that an installation works (the wheel's kernels, their launcher and their CUDA sources are where the code
looks for them), not a test suite: tiny shapes, fp32, one call each. On a CPU the Triton kernels run on Triton's
interpreter (``TRITON_INTERPRET=1`` is set here when no GPU is present, before any kernel is imported). Prints one
line per family and exits non-zero if any differs from the reference or raises.
"""

from __future__ import annotations

import os
import sys


def _cases(torch, ops, dev):
    """(family, callable(backend) -> tensor) for each op family; fp32 tiny shapes."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    q, k = rnd(5, 4, 16), rnd(5, 2, 16)
    pos = torch.arange(5, device=dev).expand(3, 5).contiguous()
    x, logits = rnd(6, 32), rnd(6, 8)
    w13, w2 = rnd(8, 2 * 24, 32) / 6, rnd(8, 32, 24) / 5
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=dev)
    aq, ak, av = rnd(7, 4, 16), rnd(7, 2, 16), rnd(7, 2, 16)
    tables, codes = rnd(3, 10, 16), torch.tensor([[1, 2, 3], [9, 0, 4]], device=dev)
    cx, cw = rnd(2, 8, 11), rnd(8, 8, 3) / 4

    def rope(be):
        return torch.cat([t.flatten() for t in ops.mrope(q.clone(), k.clone(), pos, mrope_section=(4, 2, 2),
                                                         backend=be)])

    def moe(be):
        weights, ids = ops.route_topk(logits, 2, backend=be)
        return ops.moe_experts(x, w13, w2, weights, ids, backend=be)

    return [
        ("rope", rope),
        ("moe", moe),
        ("attention", lambda be: ops.flash_attn_varlen(aq, ak, av, cu, cu, 4, 4, causal=True, backend=be)),
        ("rvq", lambda be: ops.rvq_embed(codes, list(tables), backend=be)),
        ("sampling", lambda be: ops.sample(logits, top_k=3, seed=7, backend=be).float()),
        ("code2wav", lambda be: ops.causal_conv1d(cx, cw, dilation=2, backend=be)[0]),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the module doc's checks (``argv``: no options but ``--help``): each family's tiny fp32 op on the triton
    backend against the reference (max abs error <= 1e-4, same shape). Returns 0 if all pass, else 1."""
    import argparse

    argparse.ArgumentParser(prog="python -m omni_fast.selftest", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
                            ).parse_args(argv)  # (--help ran the checks; a stray argument is an error)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import omni_fast
    from omni_fast import ops

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"omni-fast {omni_fast.__version__} from {os.path.dirname(omni_fast.__file__)}; torch {torch.__version__}"
          f", device {dev}")
    failed = 0
    for family, fn in _cases(torch, ops, dev):
        try:
            got, want = fn("triton"), fn("reference")
            err = float((got.float() - want.float()).abs().max()) if got.numel() else 0.0
            ok = got.shape == want.shape and err <= 1e-4
            print(f"  {family:<10} triton vs reference: max abs err {err:.2e}  {'ok' if ok else 'FAIL'}")
        except Exception as exc:  # report every family, then fail
            ok = False
            print(f"  {family:<10} FAIL {type(exc).__name__}: {exc}")
        failed += not ok
    print("selftest: " + ("PASS" if not failed else f"FAIL ({failed} families)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
