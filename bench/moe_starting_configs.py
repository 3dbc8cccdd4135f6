"""Untuned STARTING-POINT MoE launch configs for H100 / H200 (bf16, E=128, thinker N=768, talker N=384).

    python -m omni_fast.bench.moe_starting_configs            # (re)write the files under omni_fast/configs/moe/
    python -m omni_fast.bench.moe_starting_configs --check    # exit 1 when the shipped files differ from this
    python -m omni_fast.bench.moe_starting_configs --report   # predicted before (heuristic) / after (file)
    python -m omni_fast.bench.moe_starting_configs --static   # exit 1 unless every prefill config compiles for
                                                              # sm_90a without spills, <= 227 KB, wgmma n >= 128

Derived from public figures + the sm_90a static check, NOT measured: ``python -m omni_fast.bench.tune_moe`` on a
GPU replaces these files with measured ones. The public figures are vLLM's tuned fused-MoE tables
(``vllm/model_executor/layers/fused_moe/configs/E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json``,
``...N=768,device_name=NVIDIA_H200.json``, ``...N=384,device_name=NVIDIA_H100_80GB_HBM3.json``): from a few
thousand tokens on, vLLM's measured winner is a 128-row tile, 256 columns of the fused ``[2I, H]`` gate/up
weight, K 64, 8 warps, 4 stages (from T=1536 on the H100 at N=768 and N=384, from T=1024 on the H200).

Our kernel differs, so the figures are translated, not copied:

- gate/up keeps the gate and up halves in two accumulators, so vLLM's 256 fused columns are our
  ``BLOCK_SIZE_N`` 128. At 128x128 the pointer path needs 255 registers and spills 8 B (any K / stages tried); the
  TMA weight path (``USE_TMA``) frees the B-tile address registers: 128x128x32, 8 warps, 4 stages compiles to 178
  registers, no spills, 96 KB shared memory, ``wgmma m64n128k16`` (the prefill heuristic issues m64n64).
- down: 128x256x64, 8 warps, 4 stages over TMA: 199 registers, 192 KB shared memory, ``wgmma m64n256k16``
  (the heuristic: 64x256, m64n128).
- every smaller bucket is :func:`omni_fast.kernels.moe_gemm.default_config` with the decode grid fill (what the
  library runs today without a file): vLLM's small-T tables are noisy from bucket to bucket and the cost model
  predicts nothing better there (weight-bandwidth bound, the filled grids already cover every SM).

Facts above from ``python -m omni_fast.bench.costmodel.whatif`` / ``static_check`` (sm_90a compile, Triton 3.9 on
a CPU machine); the GPU image runs Triton 3.6, whose files these are (named ``triton=3.6.0``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

PROVENANCE = ("UNTUNED starting point: derived from public vLLM figures (fused_moe/configs E=128,N=768/384 "
              "H100/H200) + the sm_90a static check, not measured; python -m omni_fast.bench.tune_moe on a GPU "
              "replaces this file")
TRITON = "3.6.0"
# torch.cuda.get_device_name strings (vLLM's file names use the same strings with spaces as underscores)
DEVICES = {"NVIDIA H100 80GB HBM3": 1536, "NVIDIA H200": 1024}  # -> first bucket with the 128-row prefill tiles
MODELS = {768: (2048, 8), 384: (1024, 6)}  # N = expert intermediate -> (hidden, top_k): thinker, talker
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384)
PREFILL = dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=128, BLOCK_SIZE_K=32, GROUP_SIZE_M=8, num_warps=8, num_stages=4,
               USE_TMA=True, down=dict(BLOCK_SIZE_N=256, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=4,
                                       USE_TMA=True))


def table(device: str, inter: int) -> dict:
    """The file's content: ``{"provenance": ..., "<T>": config, ...}`` (``tuned_config`` reads digit keys only)."""
    from omni_fast.kernels.moe_gemm import default_config

    hidden, top_k = MODELS[inter]
    out: dict = {"provenance": PROVENANCE}
    for T in BUCKETS:
        big = T >= DEVICES[device]
        out[str(T)] = PREFILL if big else default_config(T, 128, top_k, hidden, inter, torch.bfloat16, fill=True)
    return json.loads(json.dumps(out))  # plain copies


def files() -> dict[str, dict]:
    """``{file name: content}`` of every starting-point file."""
    from omni_fast.kernels.launch import file_safe

    return {f"E=128,N={n},dtype=bf16,device={file_safe(dev)},triton={TRITON}.json": table(dev, n)
            for dev in DEVICES for n in MODELS}


def report(tokens=(64, 1024, 1536, 2048, 4096)) -> None:
    """Cost-model rows (``bench.costmodel.whatif``, predicted, not measured) of the heuristic vs the file's config
    for the thinker / talker routed GEMMs at each T (the model uses the H100 constants for both devices)."""
    from omni_fast.bench.costmodel import whatif
    from omni_fast.kernels.moe_gemm import default_config

    for dev in DEVICES:
        for model, n in (("thinker", 768), ("talker", 384)):
            hidden, top_k = MODELS[n]
            tab = table(dev, n)
            for T in tokens:
                after = tab[str(min(BUCKETS, key=lambda b: abs(b - T)))]
                parts = []
                for label, cfg in (("before", default_config(T, 128, top_k, hidden, n, torch.bfloat16, fill=True)),
                                   ("after", after)):
                    fu, fd = whatif._facts(cfg, "gate_up"), whatif._facts(cfg, "down")
                    rows = whatif.moe_rows(model, T, cfg, fu, fd)
                    parts.append(f"{label} {sum(r['gpu_s'] for r in rows.values()) * 1e6:.1f} us (" + "; ".join(
                        f"{p}: {r['ctas'][0]} CTAs, {f['tensor_core']}, {f['regs']} regs, spill {f['spill_bytes']},"
                        f" {f['smem'] // 1024} KB, {'tma' if f['tma'] else 'ptr'}, mma {r['mma_s'] * 1e6:.0f} us"
                        for (p, r), f in zip(rows.items(), (fu, fd))) + ")")
                print(f"{dev} {model} T={T} predicted: " + " | ".join(parts), flush=True)


def static_problems() -> list[str]:
    """sm_90a compile of each shipped config that is not the heuristic's (the 128-row prefill tiles): spills, shared
    memory over the H100 limit, or a wgmma narrower than n128 (both GEMMs) are problems."""
    from omni_fast.bench.costmodel import whatif
    from omni_fast.bench.static_check import H100_SMEM_LIMIT

    out = []
    for part in ("gate_up", "down"):
        f = whatif._facts(PREFILL, part)
        n = int(f["tensor_core"].split("n")[1].split("k")[0]) if f["tensor_core"].startswith("wgmma") else 0
        print(f"prefill {part}: {f}")
        if f["spill_bytes"] or f["smem"] > H100_SMEM_LIMIT or n < 128 or not f["tma"]:
            out.append(f"{part}: {f}")
    return out


def main(argv=None) -> int:
    from omni_fast.kernels.moe_gemm import CONFIG_DIR, CONFIG_FAMILY

    p = argparse.ArgumentParser(prog="python -m omni_fast.bench.moe_starting_configs",
                                description="(re)write the untuned H100/H200 MoE starting configs under "
                                "omni_fast/configs/moe/ (predicted, not measured)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when the shipped files differ (writes nothing)")
    mode.add_argument("--report", action="store_true", help="print predicted before (heuristic) / after (file)")
    mode.add_argument("--static", action="store_true",
                      help="exit 1 unless every prefill config compiles for sm_90a (no spills, <= 227 KB, "
                      "wgmma n >= 128)")
    args = p.parse_args(argv)  # (a typo or --help used to fall through to rewriting the files)
    folder = Path(CONFIG_DIR) / CONFIG_FAMILY
    if args.report:
        report()
        return 0
    if args.static:
        return 1 if static_problems() else 0
    check = args.check
    bad = 0
    for name, content in files().items():
        path = folder / name
        text = json.dumps(content, indent=1) + "\n"
        if check:
            if not path.is_file() or json.loads(path.read_text()) != content:
                print(f"differs: {path}")
                bad = 1
        else:
            path.write_text(text)
            print(f"wrote {path}")
    return bad


if __name__ == "__main__":
    sys.exit(main())
