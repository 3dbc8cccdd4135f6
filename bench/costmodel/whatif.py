"""What-if predictions for launch configs, without a trace: ``python -m omni_fast.bench.costmodel.whatif``.

For the MoE GEMMs at a given T, the kernel rows the model needs follow from the routing and the config alone:
the alignment pads each expert's pairs to BLOCK_M rows, so (with ``m`` = sum over experts of ceil(pairs / BLOCK_M))
gate/up runs ``m * ceil(I / BLOCK_N)`` CTAs and ``2 * m * BLOCK_M * 2I * H`` FLOPs, down ``m * ceil(H / BLOCK_N)``
CTAs and ``2 * m * BLOCK_M * H * I`` FLOPs; HBM bytes are the touched weights + activations (L2 catches the
re-reads). The instruction (wgmma n, mma.sync), warps and occupancy come from compiling the config for sm_90a.
Predicted from a model, not measured.
"""

from __future__ import annotations

import math

import torch

from .constants import current
from .predict import kernel_time


def moe_rows(model: str, T: int, cfg: dict, facts_up: dict, facts_down: dict) -> dict:
    """Kernel rows of the two routed GEMMs of ``model`` ("thinker"/"talker") at ``T`` tokens under ``cfg``."""
    from omni_fast.reference import moe as ref

    from .units import MOE, _randn

    E, k, H, I, _ = MOE[model]
    x, g = _randn(T, H, dtype=torch.float32, seed=T), _randn(E, H, dtype=torch.float32, seed=1, scale=H ** -0.5)
    ids = ref.router(x, g, k)[1]
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
    bm = cfg["BLOCK_SIZE_M"]
    m = int(sum(math.ceil(int(c) / bm) for c in counts))
    touched = int((counts > 0).sum())
    up_n, down_n = cfg["BLOCK_SIZE_N"], cfg["down"]["BLOCK_SIZE_N"]
    w_bytes = 2 * touched * 3 * I * H
    act = 2 * T * k * (H + 2 * I + H)
    up = dict(launches=1, ctas=[m * math.ceil(I / up_n)], flops=2 * m * bm * 2 * I * H,
              hbm_bytes=2 * touched * 2 * I * H + act / 2)
    down = dict(launches=1, ctas=[m * math.ceil(H / down_n)], flops=2 * m * bm * H * I,
                hbm_bytes=w_bytes - up["hbm_bytes"] + act)
    c = current()
    return {"gate_up": dict(up, **kernel_time(up, facts_up, c)), "down": dict(down, **kernel_time(down, facts_down, c))}


def _facts(cfg: dict, part: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    from omni_fast.bench import static_check as sc
    from omni_fast.kernels import moe_gemm as mg
    from omni_fast.kernels.moe_gemm_static import _gemm_signature

    from .statics import occupancy, tensor_core

    up, down = mg._split(cfg)
    c = up if part == "gate_up" else down
    gated = part == "gate_up"
    tma = bool(c.get("USE_TMA"))  # the weight tiles through a tensor descriptor, as the launcher passes them
    consts = dict(UPCAST=False, DOT_PRECISION="tf32", GATED=gated, MUL_ROUTED_WEIGHT=not gated, A_PER_TOKEN=gated,
                  USE_TMA=tma, SPLIT_K=c["SPLIT_K"], **{key: c[key] for key in mg._KEYS[:4]})
    if tma:
        consts["stride_bn"] = 1
    block = (c["BLOCK_SIZE_N"], c["BLOCK_SIZE_K"]) if tma else None
    fn = sc._jit_function(mg.moe_gemm_kernel)
    case = sc.importlib.import_module("omni_fast.kernels.launch").StaticCase(
        "whatif", fn, _gemm_signature("bf16", "bf16" if gated else "fp32", block, c["SPLIT_K"] > 1), consts,
        c["num_warps"], c["num_stages"],
        ("N", "K", "stride_am", "stride_be", "stride_cm") + (() if tma else ("stride_bn",)))
    src = triton.compiler.ASTSource(fn=fn, signature=case.signature, constexprs=case.constexprs,
                                    attrs=case.attrs(fn.arg_names))
    comp = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": c["num_warps"], "num_stages": c["num_stages"]})
    ptx = comp.asm["ptx"]
    regs, spill, ss = sc._ptxas_usage(ptx)
    smem = comp.metadata.shared + ss
    return dict(regs=regs, spill_bytes=spill, smem=smem, num_warps=c["num_warps"],
                occupancy=occupancy(regs, smem, c["num_warps"]), tensor_core=tensor_core(ptx),
                tma="cp.async.bulk.tensor" in ptx)


OLD_PREFILL = dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=3,
                   down=dict(BLOCK_SIZE_N=128, BLOCK_SIZE_K=32, GROUP_SIZE_M=8, num_warps=8, num_stages=4))


# vLLM's H100 shape for E=128 at M=4096 (128-row tiles), with gate/up at 128x64 (128x128 spills its two accumulators)
VLLM_LIKE = dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=4,
                 down=dict(BLOCK_SIZE_N=256, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=4))


def moe_prefill(T: int = 4096) -> None:
    """Before (the old prefill tier, :data:`OLD_PREFILL`) / after (``default_config`` now) for thinker and talker."""
    from omni_fast.kernels.moe_gemm import default_config

    new = default_config(T, 128, 8, 2048, 768, torch.bfloat16)
    for label, cfg in (("before", OLD_PREFILL), ("vllm-ish", VLLM_LIKE), ("after", new)):
        fu, fd = _facts(cfg, "gate_up"), _facts(cfg, "down")
        for model in ("thinker", "talker"):
            rows = moe_rows(model, T, cfg, fu, fd)
            total = sum(r["gpu_s"] for r in rows.values())
            parts = ", ".join(f"{p}: {r['ctas'][0]} CTAs, {fx['tensor_core']}, {fx['regs']} regs, "
                              f"{r['flops'] / 1e9:.0f} GFLOP, {r['gpu_s'] * 1e6:.0f} us"
                              for (p, r), fx in zip(rows.items(), (fu, fd)))
            print(f"{label:8} {model} T={T}: GEMMs {total * 1e6:.0f} us predicted ({parts})")


def main(argv: list[str] | None = None) -> None:
    """``python -m omni_fast.bench.costmodel.whatif [T]``: print the predicted MoE prefill GEMM times at T tokens
    (default 4096) for each config (module doc)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m omni_fast.bench.costmodel.whatif",
                                     description="MoE prefill GEMMs before / vLLM-like / after (predicted, H100 model)")
    parser.add_argument("tokens", nargs="?", type=int, default=4096, help="tokens T of the prefill (default 4096)")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error(f"argument tokens: must be >= 1, got {args.tokens}")
    moe_prefill(args.tokens)


if __name__ == "__main__":
    main()
