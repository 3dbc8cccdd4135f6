"""Optional third-party peers for the benchmark, imported only when installed.

The GPU machines cannot reach a package index, so a peer travels as a wheel: ``make peer-wheels`` (here, with
network) downloads the pinned wheels into ``.whl/`` (git-ignored), the device call carries ``.whl`` and installs
them with ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` before ``python -m omni_fast.bench``
(BENCHMARKS.md has the exact command). Each function returns None when its peer is missing or cannot run here, so
the suite runs the same with or without them.

- ``liger``: liger-kernel's Triton fused MoE (``LigerFusedMoEFunction``: routing metadata, gather + grouped GEMM +
  SwiGLU, down projection, weighted token gather), the same ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``
  layout as transformers and omni-fast.
"""

from __future__ import annotations

from typing import Callable

import torch

# Pinned so results name the exact peer; scripts/peer_wheels.sh downloads these.
PEER_WHEELS = {"liger-kernel": "0.8.5"}


def liger_fused_moe() -> Callable | None:
    """``fn(x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k], topk_ids int32 [T, k]) -> [T, H]`` running
    liger-kernel's fused MoE forward, or None when liger-kernel is not importable or there is no CUDA device."""
    if not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception:
        return None

    def run(x, w13, w2, topk_weights, topk_ids):
        with torch.inference_mode():
            return LigerFusedMoEFunction.apply(x, w13, w2, topk_ids.to(torch.int32), topk_weights)

    return run


def versions() -> dict[str, str]:
    """Installed peer versions (for the results' metadata)."""
    from importlib import metadata

    out = {}
    for name in PEER_WHEELS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
