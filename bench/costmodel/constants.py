"""Every constant of the cost model, each with its source. Nothing here is measured on this machine.

:func:`calibrate` replaces constants with numbers measured on a GPU (e.g. from ``python -m omni_fast.bench`` JSON
results), so the model's predictions can be checked and tightened once a GPU run exists.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path


@dataclass(frozen=True)
class Constants:
    """The cost model's device constants (H100 SXM by default), each field with its source in a comment;
    :func:`current` gives the ones in force, :func:`calibrate` replaces them from a GPU run."""

    device: str = "NVIDIA H100 80GB HBM3 (SXM)"
    # Device copy bandwidth, bytes/s (read + write counted): ~3.0 TB/s measured on the lent H100s
    # (/work/shared/qwen-omni-facts.md, "Physical limits on an H100 SXM"; NVIDIA's datasheet says 3.35 TB/s peak).
    hbm_bytes_per_s: float = 3.0e12
    # Dense bf16 tensor-core rate, FLOP/s: ~798 TFLOP/s measured on an 8192^3 matmul on the lent H100s (same facts
    # file; the datasheet's 989 TFLOP/s is not reached by cuBLAS on random data).
    mma_flops_per_s: float = 800e12
    # Streaming multiprocessors of an H100 SXM (NVIDIA Hopper architecture whitepaper: 132 SMs on the SXM5 part).
    sms: int = 132
    # Resident warps one SM needs for a streaming kernel to pull its share of HBM bandwidth. Assumption (Little's
    # law: ~23 GB/s per SM x ~700 ns DRAM latency = ~16 KB in flight per SM, ~4 KB per warp with 16-byte vector
    # loads and ~8 loads in flight (pipelined stages); cf. Luo et al. 2024, "Benchmarking and Dissecting the Nvidia
    # Hopper GPU Architecture"). A launch's bandwidth is derated by min(1, resident warps / (sms *
    # warps_per_sm_full_bw)): ~5.7 GB/s per resident warp.
    warps_per_sm_full_bw: int = 4
    # Tensor-core issue per SM per clock (dense bf16): 989 TFLOP/s / (132 SMs x 1.83 GHz) = 4096 FLOP/clk (H100
    # whitepaper), against 128 B/clk of shared memory per SM (same). A wgmma m64nNk16 reading A and B from shared
    # memory moves (64*16 + 16*N) * 2 bytes for 2*64*N*16 FLOPs, so below N = 64 it is shared-memory bound:
    # efficiency = min(1, intensity * smem_bytes_per_clk / tc_flops_per_clk).
    tc_flops_per_clk: int = 4096
    smem_bytes_per_clk: int = 128
    # mma.sync (Ampere-style warp MMA) on Hopper: ~2/3 of the wgmma rate (Luo et al. 2024, same paper: mma.sync
    # peaks at ~660 of ~990 dense TFLOP/s). Kernels whose dots compile to neither use FMA: 1/16 of the rate.
    mma_sync_fraction: float = 0.66
    fma_fraction: float = 1 / 16
    # TF32 tensor-core GEMMs (fp32 storage, 10-bit mantissa inputs): half the bf16 rate (H100 SXM datasheet: 494.7
    # vs 989.4 dense TFLOP/s).
    tf32_fraction: float = 0.5
    # Gap per kernel inside a CUDA graph, seconds: ~1.3 us on an H100 (Hazy Research, "Look Ma, No Bubbles!",
    # May 2025: launch + drain + ramp of back-to-back kernels even when graph-replayed).
    graph_node_s: float = 1.3e-6
    # Eager launch cost per kernel, seconds: host time of a PyTorch op / Triton launch from Python, which bounds a
    # chain of small kernels when the unit is not graph-captured. ~5 us for an aten op (PyTorch dispatcher +
    # cudaLaunchKernel, e.g. the PyTorch "CUDA graphs" blog post, 2021: launch overheads of a few us per op) and
    # ~20 us for a Triton launch from Python (Triton's Python launcher binds and checks every argument; the
    # Triton docs / issue tracker cite 10-40 us per launch before the 3.x launcher fast path).
    eager_aten_s: float = 5e-6
    eager_triton_s: float = 20e-6
    # A host sync (``.item()``, ``.tolist()``): the queue drains; ~10 us round trip (cudaStreamSynchronize +
    # D2H copy latency on PCIe Gen5; assumption).
    sync_s: float = 10e-6
    # Shared memory a block may use on sm_90 (CUDA C programming guide, compute capability 9.0: 227 KB opt-in).
    smem_per_block: int = 227 * 1024
    smem_per_sm: int = 228 * 1024  # same table: 228 KB per SM; 1 KB of it reserved per resident block
    regs_per_sm: int = 65536  # same table: 64K 32-bit registers per SM
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT = Constants()
_current = DEFAULT


def current() -> Constants:
    """The constants in force (the defaults above unless :func:`calibrate` replaced some)."""
    return _current


def calibrate(measured: dict | str | Path | None = None, **overrides) -> Constants:
    """Replace constants with measured values and return the new set (``None`` and no overrides: the defaults).

    ``measured``: a dict, or a JSON file, with any of the field names above (e.g. ``{"hbm_bytes_per_s": 3.05e12,
    "graph_node_s": 1.1e-6}``), or a ``python -m omni_fast.bench`` result JSON, whose ``roofline`` entry (copy
    GB/s, matmul TFLOP/s) sets ``hbm_bytes_per_s`` and ``mma_flops_per_s``.
    """
    global _current
    if isinstance(measured, (str, Path)):
        measured = json.loads(Path(measured).read_text())
    values = measured_values(measured or {})
    values.update(overrides)
    _current = replace(DEFAULT, **values)
    return _current


def measured_values(measured: dict) -> dict:
    """The constant fields a measurement sets (see :func:`calibrate`): a bench result's ``roofline`` (copy GB/s ->
    ``hbm_bytes_per_s``, bf16 matmul TFLOP/s -> ``mma_flops_per_s``) and any field named as in :class:`Constants`;
    a nested ``constants`` dict (the GPU session's ``calibration.json``) is read the same way, and wins."""
    values: dict = {}
    if isinstance(measured.get("constants"), dict):
        return {**measured_values({k: v for k, v in measured.items() if k != "constants"}),
                **measured_values(measured["constants"])}
    roof = measured.get("roofline") if isinstance(measured.get("roofline"), dict) else None
    for key, name, unit in (("copy_gbps", "hbm_bytes_per_s", 1e9), ("matmul_tflops", "mma_flops_per_s", 1e12)):
        got = roof.get(key) if roof else None
        if got is None:
            continue
        if isinstance(got, bool) or not isinstance(got, (int, float)) or not (math.isfinite(got) and got > 0):
            # a failed measurement: a zero ceiling would divide every prediction by zero
            raise ValueError(f"roofline.{key} must be a positive finite number, got {got!r}")
        values[name] = float(got) * unit
    names = {f.name for f in fields(Constants)}
    for k, v in measured.items():
        if k not in names:
            continue
        # a string or NaN failed deep in a prediction (TypeError at a division); only the latency fields may be 0
        latency = k.endswith("_s") and not k.endswith("_per_s")  # seconds per event, not a rate
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (
            v > 0 or (v == 0 and latency))
        if not ok:
            raise ValueError(f"{k} must be a {'non-negative' if latency else 'positive'} finite number, got {v!r}")
        values[k] = v
    return values
